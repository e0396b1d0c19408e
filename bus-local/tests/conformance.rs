//! The shared behaviour suite, run against the in-process broker: one test
//! per case, each on a fresh broker. The recovery cases drop connections
//! with a simulated fault ([`LocalBroker::close_connection`]).

use std::sync::Arc;

use async_trait::async_trait;
use bus_core::conformance::{DroppableConnection, Harness};
use bus_core::{Capabilities, Connection};
use bus_local::{LocalBroker, LocalConnection, Recovery};
use futures::FutureExt;

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

    async fn connect_droppable(&self, recover: bool) -> Option<DroppableConnection> {
        let recovery = if recover {
            Recovery::Enabled
        } else {
            Recovery::Disabled
        };
        let conn = self.broker.connect_with(recovery);
        let events = conn.events();
        let broker = self.broker.clone();
        let target = conn.clone();
        Some(DroppableConnection::new(
            Arc::new(conn),
            events,
            move || {
                broker.close_connection(&target);
                async {}.boxed()
            },
        ))
    }
}

bus_core::conformance_tests!(LocalHarness::new(), #[tokio::test(start_paused = true)]);
