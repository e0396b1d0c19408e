//! What the broker tests share: the broker's address, fresh names,
//! `rabbitmqctl`, bounded waits, recovery events, deliveries and confirmed
//! publishing.
// Each test binary compiles this module on its own and uses only some of
// it: what one binary leaves unused is not dead.
#![allow(dead_code, unreachable_pub)]

pub mod cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_amqp::{AmqpConnection, AmqpOptions, AmqpUrl, RecoveryEvent};
use bus_core::{Connection, ConnectionExt, Consumer, Delivery, Message, QueueOptions};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The broker under test: `AMQP_ADDR`, or the local RabbitMQ.
pub fn amqp_addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The virtual host of [`amqp_addr`].
pub fn vhost() -> String {
    AmqpUrl::parse(&amqp_addr())
        .expect("AMQP_ADDR is a valid AMQP URL")
        .vhost
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

/// Runs `rabbitmqctl` with these arguments for a clean-up that must not
/// fail the test itself: its outcome is ignored.
pub fn rabbitmqctl_quiet(args: &[&str]) {
    let _ = Command::new("rabbitmqctl").args(args).output();
}

/// Deletes the test's queues with `rabbitmqctl` if the test fails before
/// deleting them itself (that is, when dropped while the test panics).
pub struct QueueCleanup {
    queues: Vec<String>,
}

impl QueueCleanup {
    /// Guards `queues`.
    pub fn new(queues: &[&str]) -> Self {
        QueueCleanup {
            queues: queues.iter().map(|q| (*q).to_owned()).collect(),
        }
    }
}

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let vhost = vhost();
        for q in &self.queues {
            rabbitmqctl_quiet(&["delete_queue", "-p", &vhost, q]);
        }
    }
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

/// Waits for a `Disconnected` event and returns its reason.
pub async fn wait_disconnected(rx: &mut tokio::sync::broadcast::Receiver<RecoveryEvent>) -> String {
    match wait_event(rx, "Disconnected", |e| {
        matches!(e, RecoveryEvent::Disconnected { .. })
    })
    .await
    {
        RecoveryEvent::Disconnected { reason } => reason,
        _ => unreachable!(),
    }
}

/// Waits for a `Reconnected` event, of any generation.
pub async fn wait_reconnected(rx: &mut tokio::sync::broadcast::Receiver<RecoveryEvent>) {
    wait_event(rx, "Reconnected", |e| {
        matches!(e, RecoveryEvent::Reconnected { .. })
    })
    .await;
}

/// Waits for a `ConsumerResumed` event.
pub async fn wait_consumer_resumed(rx: &mut tokio::sync::broadcast::Receiver<RecoveryEvent>) {
    wait_event(rx, "ConsumerResumed", |e| {
        matches!(e, RecoveryEvent::ConsumerResumed { .. })
    })
    .await;
}

/// The next delivery of `consumer`, failing the test if none comes within
/// `secs`, or the stream ends or yields an error.
pub async fn next_delivery(consumer: &mut Consumer, secs: u64, what: &str) -> Delivery {
    within(secs, what, consumer.next())
        .await
        .unwrap_or_else(|| panic!("the consumer stream ended while waiting for {what}"))
        .unwrap_or_else(|e| panic!("the consumer stream failed while waiting for {what}: {e}"))
}

/// A new exclusive, server-named queue of `conn`.
pub async fn exclusive_queue(conn: &dyn Connection) -> String {
    conn.declare_queue("", QueueOptions::exclusive())
        .await
        .unwrap()
        .name
}

/// The number a test message carries as its body.
pub fn number(message: &Message) -> u32 {
    std::str::from_utf8(&message.body)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected body {:?}", message.body))
}

/// Persistent messages numbered from 0 being published with confirms, at
/// most `in_flight` at once, until `stop` is set or `max` were started.
pub struct CountingPublisher {
    /// Every attempt and its outcome, once publishing is over.
    pub outcomes: JoinHandle<Vec<(u32, bus_core::Result<()>)>>,
    /// How many were confirmed so far, so that tests wait on confirms
    /// rather than on time.
    pub confirms: watch::Receiver<u32>,
    /// Set to stop publishing.
    pub stop: Arc<AtomicBool>,
}

/// Starts a [`CountingPublisher`] to `queue` on `conn`.
pub fn publish_counting_confirms(
    conn: Arc<AmqpConnection>,
    queue: String,
    max: u32,
    in_flight: usize,
) -> CountingPublisher {
    let (confirmed_so_far, confirms) = watch::channel(0u32);
    let confirmed_so_far = Arc::new(confirmed_so_far);
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = {
        let stop = stop.clone();
        tokio::spawn(async move {
            futures::stream::iter(0..max)
                .take_while(move |_| futures::future::ready(!stop.load(Ordering::Relaxed)))
                .map(|i| {
                    let conn = conn.clone();
                    let queue = queue.clone();
                    let confirmed_so_far = confirmed_so_far.clone();
                    async move {
                        let r = conn
                            .send_to_queue(&queue, Message::new(i.to_string()).persistent())
                            .await;
                        if r.is_ok() {
                            confirmed_so_far.send_modify(|n| *n += 1);
                        }
                        (i, r)
                    }
                })
                .buffer_unordered(in_flight)
                .collect::<Vec<_>>()
                .await
        })
    };
    CountingPublisher {
        outcomes,
        confirms,
        stop,
    }
}

/// The numbers of the publishes that were confirmed.
pub fn confirmed(outcomes: &[(u32, bus_core::Result<()>)]) -> BTreeSet<u32> {
    outcomes
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| *i)
        .collect()
}

/// Consumes and acknowledges `total` numbered messages, each within `secs`,
/// and counts how often each number came.
pub async fn consume_counting(
    consumer: &mut Consumer,
    total: u32,
    secs: u64,
) -> BTreeMap<u32, u32> {
    let mut got: BTreeMap<u32, u32> = BTreeMap::new();
    for _ in 0..total {
        let d = next_delivery(consumer, secs, "a message").await;
        *got.entry(number(&d.message)).or_default() += 1;
        d.ack().await.unwrap();
    }
    got
}

/// Asserts that every confirmed message was consumed exactly once.
pub fn assert_each_confirmed_consumed_once<'a>(
    confirmed: impl IntoIterator<Item = &'a u32>,
    got: &BTreeMap<u32, u32>,
) {
    for i in confirmed {
        assert_eq!(
            got.get(i),
            Some(&1),
            "confirmed message {i} consumed {:?} times",
            got.get(i)
        );
    }
}

/// Deletes the queue `name`, failing the test if the broker refuses.
pub async fn delete_queue(conn: &dyn Connection, name: &str) {
    conn.delete_queue(name, bus_core::DeleteQueueOptions::default())
        .await
        .unwrap();
}
