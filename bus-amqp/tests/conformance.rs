//! The shared conformance suite against a real RabbitMQ (`AMQP_ADDR`, by
//! default the local broker), one test per case, on the real clock.

mod support;

use std::sync::Arc;

use async_trait::async_trait;
use bus_amqp::{AmqpConnection, ReplyMode};
use bus_core::conformance::Harness;
use bus_core::{Capabilities, Connection};

struct AmqpHarness;

impl AmqpHarness {
    fn new() -> Self {
        AmqpHarness
    }
}

#[async_trait]
impl Harness for AmqpHarness {
    async fn connect(&self) -> Arc<dyn Connection> {
        support::connect().await
    }

    fn capabilities(&self) -> Capabilities {
        // What every connection of this transport reports with the default
        // options (direct reply-to); `capabilities()` is sync, so it cannot
        // ask a connection.
        bus_amqp::capabilities(ReplyMode::default())
    }
}

#[test]
fn harness_capabilities_are_the_transports() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn: Arc<AmqpConnection> = rt.block_on(support::connect());
    assert_eq!(conn.capabilities(), AmqpHarness::new().capabilities());
}

bus_core::conformance_tests!(AmqpHarness::new(), #[tokio::test]);
