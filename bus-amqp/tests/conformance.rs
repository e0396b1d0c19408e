//! The shared conformance suite against a real RabbitMQ (`AMQP_ADDR`, by
//! default the local broker), one test per case, on the real clock. The
//! recovery cases drop their own connections with `rabbitmqctl
//! close_connection`.

mod support;

use std::sync::Arc;

use async_trait::async_trait;
use bus_amqp::{AmqpConnection, AmqpOptions, ReconnectPolicy, ReplyMode};
use bus_core::conformance::{DroppableConnection, Harness};
use bus_core::{Capabilities, Connection};
use futures::FutureExt;

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

    async fn connect_droppable(&self, recover: bool) -> Option<DroppableConnection> {
        // The connection gets a fresh name, so only this test's own
        // connection is ever closed on the shared broker.
        let name = support::fresh("droppable");
        let mut options = AmqpOptions::default().with_connection_name(&name);
        if !recover {
            options = options.with_reconnect(ReconnectPolicy::disabled());
        }
        let conn = support::connect_with(options).await;
        let events = conn.events();
        Some(DroppableConnection::new(conn, events, move || {
            let name = name.clone();
            async move {
                tokio::task::spawn_blocking(move || support::close_connection(&name))
                    .await
                    .expect("rabbitmqctl close_connection ran");
            }
            .boxed()
        }))
    }
}

#[test]
fn harness_capabilities_are_the_transports() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn: Arc<AmqpConnection> = rt.block_on(support::connect());
    assert_eq!(conn.capabilities(), AmqpHarness::new().capabilities());
}

bus_core::conformance_tests!(AmqpHarness::new(), #[tokio::test]);
