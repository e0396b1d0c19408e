//! The shared behaviour suite, run against the in-process broker: one test
//! per case, each on a fresh broker.

use std::sync::Arc;

use async_trait::async_trait;
use bus_core::conformance::Harness;
use bus_core::{Capabilities, Connection};
use bus_local::{LocalBroker, LocalConnection};

/// Connections to one fresh [`LocalBroker`].
struct LocalHarness {
    broker: LocalBroker,
}

impl LocalHarness {
    fn new() -> Self {
        LocalHarness {
            broker: LocalBroker::new(),
        }
    }
}

#[async_trait]
impl Harness for LocalHarness {
    async fn connect(&self) -> Arc<dyn Connection> {
        Arc::new(self.broker.connect())
    }

    fn capabilities(&self) -> Capabilities {
        LocalConnection::local_capabilities()
    }
}

bus_core::conformance_tests!(LocalHarness::new(), #[tokio::test(start_paused = true)]);
