//! The shared conformance suite against a real RabbitMQ (`AMQP_ADDR`, by
//! default the local broker), one test per case, on the real clock.

mod support;

use std::sync::Arc;

use async_trait::async_trait;
use bus_amqp::AmqpConnection;
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
        // What every connection of this transport reports (direct reply-to
        // with the default options).
        Capabilities {
            name: "amqp",
            exclusive_queues: true,
            auto_delete_queues: true,
            server_named_queues: true,
            headers_exchange: true,
            message_ttl: true,
            queue_expiry: true,
            max_length: true,
            dead_lettering: true,
            priorities: true,
            single_active_consumer: true,
            mandatory: true,
            durability: true,
            cross_process: true,
            quorum_queues: true,
            direct_reply: true,
            exact_counts: true,
        }
    }
}

#[test]
fn harness_capabilities_are_the_transports() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn: Arc<AmqpConnection> = rt.block_on(support::connect());
    assert_eq!(conn.capabilities(), AmqpHarness::new().capabilities());
}

bus_core::conformance_tests!(AmqpHarness::new(), #[tokio::test]);
