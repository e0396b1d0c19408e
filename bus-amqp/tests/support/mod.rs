//! What the broker tests share: the broker's address, fresh names,
//! `rabbitmqctl`, and bounded waits.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bus_amqp::{AmqpConnection, AmqpOptions, RecoveryEvent};
use bus_core::Connection;

/// The broker under test: `AMQP_ADDR`, or the local RabbitMQ.
pub fn amqp_addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test uses.
pub fn fresh(prefix: &str) -> String {
    format!("bus-amqp-test.{prefix}.{}", uuid::Uuid::new_v4().simple())
}

/// Connects, failing the test with a clear message when no broker answers:
/// broker tests never pass by skipping.
pub async fn connect_with(options: AmqpOptions) -> Arc<AmqpConnection> {
    match AmqpConnection::connect_with(&amqp_addr(), options).await {
        Ok(c) => Arc::new(c),
        Err(e) => panic!(
            "RabbitMQ is not reachable at {} ({e}); start it (rabbitmq-server -detached) or set AMQP_ADDR",
            bus_amqp::redact_url(&amqp_addr())
        ),
    }
}

/// Connects with default options.
pub async fn connect() -> Arc<AmqpConnection> {
    connect_with(AmqpOptions::default()).await
}

/// Bounds a wait: fails the test if `f` takes longer than `secs`.
pub async fn within<T>(secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs}s waiting for {what}"),
    }
}

/// Runs `rabbitmqctl` with these arguments and returns its standard output.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The broker's pids of the connections whose client-given name is `name`.
pub fn connection_pids(name: &str) -> Vec<String> {
    let out = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    out.lines()
        .filter(|l| l.contains(&format!("{{\"connection_name\",\"{name}\"}}")))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Has the broker close the connection named `name` (as an operator would).
pub fn close_connection(name: &str) {
    let pids = connection_pids(name);
    assert_eq!(
        pids.len(),
        1,
        "expected one connection named {name}, found {pids:?}"
    );
    rabbitmqctl(&["close_connection", &pids[0], "closed by a test"]);
}

/// Waits for the first event `pred` accepts.
pub async fn wait_event(
    rx: &mut tokio::sync::broadcast::Receiver<RecoveryEvent>,
    what: &str,
    pred: impl Fn(&RecoveryEvent) -> bool,
) -> RecoveryEvent {
    within(60, what, async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(e) => panic!("event stream failed while waiting for {what}: {e}"),
            }
        }
    })
    .await
}

/// Deletes a queue at the end of a test.
pub async fn cleanup_queue(conn: &dyn Connection, name: &str) {
    let _ = conn
        .delete_queue(name, bus_core::DeleteQueueOptions::default())
        .await;
}
