//! Scenarios on RabbitMQ: bus-amqp against raw lapin (the same lapin
//! version, the same settings), and the RPC client against the legacy
//! Python one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::rpc::{RpcClient, RpcServer};
use bus::{
    Bytes, Connection, ConnectionExt, ConsumeOptions, DeleteQueueOptions, Message, Overflow,
    QueueArguments, QueueOptions,
};
use bus_amqp::{AmqpConnection, AmqpOptions};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation};
use serde::{Deserialize, Serialize};

use crate::support::{self, side_by_side, timed, Report, Span};

const BODY: usize = 256;
/// Publishes in flight in `amqp-publish` and the prefetch of
/// `amqp-consume`.
const WINDOW: usize = 256;
/// Bounds the publish queues, which have no consumer: the same on both
/// sides, so the broker does the same work for each.
const MAX_LENGTH: u64 = 10_000;
const RPC_IN_FLIGHT: usize = 64;
/// The timeout our client sets on calls (the legacy default); the raw
/// client sends the same `expiration`.
const RPC_TIMEOUT: Duration = Duration::from_secs(180);

/// Acks per coalesced `basic.ack` in `amqp-consume-batched`, and the
/// longest an ack waits.
const COALESCE_ACKS: u16 = 64;
const COALESCE_DELAY: Duration = Duration::from_millis(20);

const SCENARIOS: [&str; 11] = [
    "amqp-worker",
    "amqp-publish",
    "amqp-publish-cpu",
    "amqp-consume",
    "amqp-consume-cpu",
    "amqp-consume-batched",
    "amqp-rpc-seq",
    "amqp-rpc-seq-cpu",
    "amqp-rpc-64",
    "amqp-rpc-64-cpu",
    "amqp-rpc-legacy",
];

pub async fn run(wanted: &dyn Fn(&str) -> bool, report: &mut Report) {
    let any = |names: &[&str]| names.iter().any(|n| wanted(n));
    if !any(&SCENARIOS) && !wanted("amqp-rpc-legacy-64") {
        return;
    }
    let url = support::amqp_url();
    let ours = connect_ours(&url, "bench-ours").await;
    let raw = connect_raw(&url, "bench-raw").await;
    if any(&["amqp-publish", "amqp-publish-cpu"]) {
        publish(&ours, &raw, report).await;
    }
    if any(&["amqp-consume", "amqp-consume-cpu"]) {
        consume(&ours, &raw, report).await;
    }
    if wanted("amqp-worker") {
        worker(&ours, &raw, report).await;
    }
    if wanted("amqp-consume-batched") {
        consume_batched(&url, &raw, report).await;
    }
    let seq = any(&["amqp-rpc-seq", "amqp-rpc-seq-cpu"]);
    let par = any(&["amqp-rpc-64", "amqp-rpc-64-cpu"]);
    if seq || par {
        rpc(&url, seq, par, report).await;
    }
    if any(&["amqp-rpc-legacy", "amqp-rpc-legacy-64"]) {
        legacy(&url, report).await;
    }
    ours.close().await.expect("close");
    let _ = raw.close(200, "done".into()).await;
}

fn broker_down(url: &str, e: &dyn std::fmt::Display) -> ! {
    panic!(
        "RabbitMQ is not reachable at {} ({e}). The amqp-* scenarios need the broker \
         scripts/test-all ensures: start it (rabbitmq-server -detached) or point AMQP_ADDR \
         at one, or run only the other scenarios (cargo bench --bench compare -- local file)",
        bus_amqp::redact_url(url)
    )
}

async fn connect_ours(url: &str, name: &str) -> Arc<dyn Connection> {
    match AmqpConnection::connect_with(url, AmqpOptions::default().with_connection_name(name)).await
    {
        Ok(c) => Arc::new(c),
        Err(e) => broker_down(url, &e),
    }
}

async fn connect_raw(url: &str, name: &str) -> lapin::Connection {
    let props = lapin::ConnectionProperties::default().with_connection_name(name.into());
    match lapin::Connection::connect(url, props).await {
        Ok(c) => c,
        Err(e) => broker_down(url, &e),
    }
}

fn body() -> Bytes {
    Bytes::from(vec![0x5a; BODY])
}

fn short(s: &str) -> ShortString {
    s.into()
}

/// A fresh queue for a publish run: non-durable, bounded with drop-head.
async fn bounded_queue_ours(conn: &Arc<dyn Connection>, name: &str) {
    conn.delete_queue(name, DeleteQueueOptions::default())
        .await
        .expect("delete queue");
    let arguments = QueueArguments::default()
        .max_length(MAX_LENGTH)
        .overflow(Overflow::DropHead);
    conn.declare_queue(name, QueueOptions::default().with_arguments(arguments))
        .await
        .expect("declare queue");
}

async fn bounded_queue_raw(ch: &lapin::Channel, name: &str) {
    ch.queue_delete(short(name), QueueDeleteOptions::default())
        .await
        .expect("delete queue");
    let mut args = FieldTable::default();
    args.insert(
        short("x-max-length"),
        AMQPValue::LongLongInt(MAX_LENGTH as i64),
    );
    args.insert(
        short("x-overflow"),
        AMQPValue::LongString(LongString::from("drop-head")),
    );
    ch.queue_declare(short(name), QueueDeclareOptions::default(), args)
        .await
        .expect("declare queue");
}

async fn confirm_channel(raw: &lapin::Connection) -> lapin::Channel {
    let ch = raw.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    ch
}

/// Publishes `n` bodies to `queue` with confirms, `WINDOW` in flight, as a
/// lapin user writes it.
async fn raw_publish(ch: &lapin::Channel, queue: &str, body: &Bytes, n: u64) {
    let exchange = short("");
    let key = short(queue);
    futures::stream::iter(0..n)
        .map(|_| {
            let (exchange, key) = (exchange.clone(), key.clone());
            async move {
                let confirm = ch
                    .basic_publish(
                        exchange,
                        key,
                        BasicPublishOptions::default(),
                        body,
                        BasicProperties::default(),
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm");
                assert!(matches!(confirm, Confirmation::Ack(None)), "{confirm:?}");
            }
        })
        .buffer_unordered(WINDOW)
        .for_each(|()| async {})
        .await;
}

async fn publish(ours: &Arc<dyn Connection>, raw: &lapin::Connection, report: &mut Report) {
    let (q_ours, q_raw) = ("bench-publish-ours", "bench-publish-raw");
    bounded_queue_ours(ours, q_ours).await;
    let ch = confirm_channel(raw).await;
    bounded_queue_raw(&ch, q_raw).await;
    let body = body();
    let batch = 5_000;
    let (o, b) = side_by_side(
        batch,
        |n| {
            let body = body.clone();
            timed(n, async move {
                futures::stream::iter(0..n)
                    .map(|_| ours.send_to_queue(q_ours, Message::new(body.clone())))
                    .buffer_unordered(WINDOW)
                    .for_each(|r| async move { r.expect("publish") })
                    .await;
            })
        },
        |n| timed(n, raw_publish(&ch, q_raw, &body, n)),
    )
    .await;
    ours.delete_queue(q_ours, DeleteQueueOptions::default())
        .await
        .expect("delete");
    ch.queue_delete(short(q_raw), QueueDeleteOptions::default())
        .await
        .expect("delete");
    let _ = ch.close(200, "done".into()).await;
    let note = format!(
        "publisher confirms, {WINDOW} in flight, {BODY}-byte bodies, queue x-max-length {MAX_LENGTH} drop-head"
    );
    report.throughput(
        "amqp-publish",
        o.per_sec(),
        "lapin",
        b.per_sec(),
        "msg/s",
        &note,
    );
    report.cost(
        "amqp-publish-cpu",
        o.cpu_us(),
        "lapin",
        b.cpu_us(),
        "us/msg",
        format!("client CPU (user+system) per publish; {note}"),
    );
}

async fn consume(ours: &Arc<dyn Connection>, raw: &lapin::Connection, report: &mut Report) {
    let batch = 10_000;
    let (o, b) = consume_compare(
        ours,
        raw,
        ("bench-consume-ours", "bench-consume-raw"),
        batch,
    )
    .await;
    let note = format!(
        "consume and ack one by one, prefetch {WINDOW}, {BODY}-byte bodies, queue pre-filled with {batch} (untimed)"
    );
    report.throughput(
        "amqp-consume",
        o.per_sec(),
        "lapin",
        b.per_sec(),
        "msg/s",
        &note,
    );
    report.cost(
        "amqp-consume-cpu",
        o.cpu_us(),
        "lapin",
        b.cpu_us(),
        "us/msg",
        format!("client CPU (user+system) per message; {note}"),
    );
}

/// Our consumer with coalesced acks against raw lapin's per-message ack
/// loop: the application code is the same (`ack()` per delivery).
async fn consume_batched(url: &str, raw: &lapin::Connection, report: &mut Report) {
    let ours: Arc<dyn Connection> = match AmqpConnection::connect_with(
        url,
        AmqpOptions::default()
            .with_connection_name("bench-ours-batched")
            .with_ack_coalescing(COALESCE_ACKS, COALESCE_DELAY),
    )
    .await
    {
        Ok(c) => Arc::new(c),
        Err(e) => broker_down(url, &e),
    };
    let batch = 10_000;
    let (o, b) = consume_compare(
        &ours,
        raw,
        ("bench-consume-batched-ours", "bench-consume-batched-raw"),
        batch,
    )
    .await;
    ours.close().await.expect("close");
    report.throughput(
        "amqp-consume-batched",
        o.per_sec(),
        "lapin",
        b.per_sec(),
        "msg/s",
        format!(
            "ack() per message, coalesced by bus-amqp into one multiple ack per {COALESCE_ACKS} (or {COALESCE_DELAY:?}); lapin acks one by one; prefetch {WINDOW}, {BODY}-byte bodies, queue pre-filled with {batch} (untimed)"
        ),
    );
}

/// Consumes `n` pre-filled messages and acks each, by `ours` and by raw
/// lapin on their own queues, side by side.
async fn consume_compare(
    ours: &Arc<dyn Connection>,
    raw: &lapin::Connection,
    (q_ours, q_raw): (&'static str, &'static str),
    batch: u64,
) -> (support::Measured, support::Measured) {
    // Both queues are filled the same way: by raw lapin, untimed.
    let filler = confirm_channel(raw).await;
    for q in [q_ours, q_raw] {
        filler
            .queue_delete(short(q), QueueDeleteOptions::default())
            .await
            .expect("delete queue");
        filler
            .queue_declare(
                short(q),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare queue");
    }
    let body = body();
    let prefill = |q: &'static str, n: u64| {
        let (filler, body) = (&filler, &body);
        async move {
            filler
                .queue_purge(short(q), QueuePurgeOptions::default())
                .await
                .expect("purge");
            raw_publish(filler, q, body, n).await;
        }
    };
    let (o, b) = side_by_side(
        batch,
        |n| async move {
            prefill(q_ours, n).await;
            let span = Span::start();
            let mut consumer = ours
                .consume(q_ours, ConsumeOptions::prefetch(WINDOW as u16))
                .await
                .expect("consume");
            for _ in 0..n {
                let d = consumer.next().await.expect("a delivery").expect("ok");
                assert_eq!(d.message.body.len(), BODY);
                d.ack().await.expect("ack");
            }
            let m = span.stop(n);
            consumer.cancel().await.expect("cancel");
            m
        },
        |n| async move {
            prefill(q_raw, n).await;
            let span = Span::start();
            let ch = raw.create_channel().await.expect("channel");
            ch.basic_qos(WINDOW as u16, BasicQosOptions::default())
                .await
                .expect("qos");
            let mut consumer = ch
                .basic_consume(
                    short(q_raw),
                    short(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("consume");
            for _ in 0..n {
                let d = consumer.next().await.expect("a delivery").expect("ok");
                assert_eq!(d.data.len(), BODY);
                // On the channel, as bus-amqp acks: lapin's `Delivery::ack`
                // goes through an extra internal hop and is slower.
                ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                    .await
                    .expect("ack");
            }
            let m = span.stop(n);
            let _ = ch.close(200, "done".into()).await;
            m
        },
    )
    .await;
    for q in [q_ours, q_raw] {
        filler
            .queue_delete(short(q), QueueDeleteOptions::default())
            .await
            .expect("delete");
    }
    let _ = filler.close(200, "done".into()).await;
    (o, b)
}

#[derive(Serialize, Deserialize)]
struct Job {
    #[serde(with = "serde_bytes")]
    audio: Vec<u8>,
    n: u32,
}

#[derive(Serialize, Deserialize)]
struct Answer {
    n: u32,
}

fn job(n: u32) -> Job {
    Job {
        audio: vec![7; BODY],
        n,
    }
}

/// Starts our server on `queue`: bus-amqp, its own connection.
async fn our_server(url: &str, queue: &str) -> (RpcServer, Arc<dyn Connection>) {
    let conn = connect_ours(url, "bench-ours-server").await;
    conn.delete_queue(queue, DeleteQueueOptions::default())
        .await
        .expect("delete queue");
    let server = RpcServer::builder(conn.clone(), queue)
        .concurrency(RPC_IN_FLIGHT as u16)
        .serve(|job: Job| async move { Ok::<_, String>(Answer { n: job.n }) })
        .await
        .expect("server");
    (server, conn)
}

/// `calls` calls numbered from 0, `in_flight` at a time, each checking its
/// answer.
async fn calls<F, Fut>(calls: u64, in_flight: usize, call: F)
where
    F: Fn(u32) -> Fut,
    Fut: std::future::Future<Output = u32>,
{
    futures::stream::iter(0..calls as u32)
        .map(|i| {
            let answer = call(i);
            async move { assert_eq!(answer.await, i) }
        })
        .buffer_unordered(in_flight)
        .for_each(|()| async {})
        .await;
}

async fn rpc(url: &str, seq: bool, par: bool, report: &mut Report) {
    let (q_ours, q_raw) = ("bench-rpc-ours", "bench-rpc-raw");
    let (server, server_conn) = our_server(url, q_ours).await;
    let client_conn = connect_ours(url, "bench-ours-client").await;
    let client = RpcClient::new(client_conn.clone()).await.expect("client");
    let raw_server = RawServer::start(url, q_raw).await;
    let raw_client = RawClient::new(url).await;
    let mut sides = Vec::new();
    if seq {
        sides.push(("amqp-rpc-seq", 1usize, 200u64));
    }
    if par {
        sides.push(("amqp-rpc-64", RPC_IN_FLIGHT, 64 * 40));
    }
    for (name, in_flight, batch) in sides {
        let (o, b) = side_by_side(
            batch,
            |n| {
                timed(
                    n,
                    calls(n, in_flight, |i| {
                        let client = &client;
                        async move {
                            let a: Answer = client.call(q_ours, &job(i)).await.expect("call");
                            a.n
                        }
                    }),
                )
            },
            |n| timed(n, calls(n, in_flight, |i| raw_client.call(q_raw, i))),
        )
        .await;
        let note = format!(
            "{in_flight} call(s) in flight, msgpack, direct reply-to, confirms on requests (mandatory) and replies, server prefetch {RPC_IN_FLIGHT}; each side its own client and server in this process"
        );
        report.throughput(name, o.per_sec(), "lapin", b.per_sec(), "calls/s", &note);
        report.cost(
            &format!("{name}-cpu"),
            o.cpu_us(),
            "lapin",
            b.cpu_us(),
            "us/call",
            format!("CPU (user+system) per call, client and server together; {note}"),
        );
    }
    server.shutdown().await.expect("shutdown");
    server_conn
        .delete_queue(q_ours, DeleteQueueOptions::default())
        .await
        .expect("delete");
    let _ = server_conn.close().await;
    let _ = client_conn.close().await;
    raw_server.stop().await;
    raw_client.close().await;
}

/// The raw lapin RPC server: a consumer with prefetch that, for each
/// request, publishes the reply (with a confirm) and then acks, as our
/// server does.
struct RawServer {
    conn: lapin::Connection,
    queue: String,
    task: tokio::task::JoinHandle<()>,
}

impl RawServer {
    async fn start(url: &str, queue: &str) -> RawServer {
        let conn = connect_raw(url, "bench-raw-server").await;
        let ch = conn.create_channel().await.expect("channel");
        ch.queue_delete(short(queue), QueueDeleteOptions::default())
            .await
            .expect("delete queue");
        ch.queue_declare(
            short(queue),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare queue");
        ch.basic_qos(RPC_IN_FLIGHT as u16, BasicQosOptions::default())
            .await
            .expect("qos");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm_select");
        let consumer = ch
            .basic_consume(
                short(queue),
                short(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let task = tokio::spawn(async move {
            let ch = &ch;
            consumer
                .map(|d| async move {
                    let Ok(d) = d else { return };
                    let job: Job = rmp_serde::from_slice(&d.data).expect("a request");
                    let reply = rmp_serde::to_vec_named(&Answer { n: job.n }).expect("encode");
                    let mut props = BasicProperties::default();
                    if let Some(id) = d.properties.correlation_id() {
                        props = props.with_correlation_id(id.clone());
                    }
                    let reply_to = d.properties.reply_to().clone().expect("reply_to");
                    let confirm = ch
                        .basic_publish(
                            short(""),
                            reply_to,
                            BasicPublishOptions::default(),
                            &reply,
                            props,
                        )
                        .await
                        .expect("reply")
                        .await
                        .expect("confirm");
                    assert!(confirm.is_ack());
                    ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                        .await
                        .expect("ack");
                })
                .buffer_unordered(RPC_IN_FLIGHT)
                .for_each(|()| async {})
                .await;
        });
        RawServer {
            conn,
            queue: queue.to_owned(),
            task,
        }
    }

    async fn stop(self) {
        let ch = self.conn.create_channel().await.expect("channel");
        ch.queue_delete(short(&self.queue), QueueDeleteOptions::default())
            .await
            .expect("delete");
        let _ = self.conn.close(200, "done".into()).await;
        self.task.abort();
    }
}

type Waiting = Arc<Mutex<HashMap<String, tokio::sync::oneshot::Sender<Vec<u8>>>>>;

/// The raw lapin RPC client: direct reply-to on a channel in confirm mode,
/// a UUID4 correlation id per call, requests mandatory with an expiration,
/// replies matched through a map, as our client does.
struct RawClient {
    conn: lapin::Connection,
    ch: lapin::Channel,
    waiting: Waiting,
    reader: tokio::task::JoinHandle<()>,
}

const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

impl RawClient {
    async fn new(url: &str) -> RawClient {
        let conn = connect_raw(url, "bench-raw-client").await;
        let ch = confirm_channel(&conn).await;
        let mut replies = ch
            .basic_consume(
                short(DIRECT_REPLY_TO),
                short(""),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume replies");
        let waiting = Waiting::default();
        let reader = {
            let waiting = waiting.clone();
            tokio::spawn(async move {
                while let Some(Ok(d)) = replies.next().await {
                    let Some(id) = d.properties.correlation_id() else {
                        continue;
                    };
                    let tx = waiting.lock().expect("lock").remove(id.as_str());
                    if let Some(tx) = tx {
                        let _ = tx.send(d.data);
                    }
                }
            })
        };
        RawClient {
            conn,
            ch,
            waiting,
            reader,
        }
    }

    async fn call(&self, queue: &str, i: u32) -> u32 {
        let id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.lock().expect("lock").insert(id.clone(), tx);
        let body = rmp_serde::to_vec_named(&job(i)).expect("encode");
        let props = BasicProperties::default()
            .with_correlation_id(id.as_str().into())
            .with_reply_to(short(DIRECT_REPLY_TO))
            .with_expiration(RPC_TIMEOUT.as_millis().to_string().as_str().into());
        let confirm = self
            .ch
            .basic_publish(
                short(""),
                short(queue),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(matches!(confirm, Confirmation::Ack(None)), "{confirm:?}");
        let reply = tokio::time::timeout(RPC_TIMEOUT, rx)
            .await
            .expect("a reply in time")
            .expect("the reply reader");
        let answer: Answer = rmp_serde::from_slice(&reply).expect("decode");
        answer.n
    }

    async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
        self.reader.abort();
    }
}

/// The legacy client, as docs/LEGACY.md contract 1 describes it and the pika
/// tutorial writes it: a server-named exclusive callback queue consumed
/// with auto-ack, a UUID4 correlation id per call, blocking until the
/// matching reply. Calls in a loop for the given seconds after a warm-up
/// and prints `calls/s <rate>`.
const LEGACY_CLIENT: &str = r#"
import sys, time, uuid
import msgpack, pika

url, queue, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
callback_queue = ch.queue_declare(queue="", exclusive=True).method.queue
state = {"id": None, "response": None}

def on_response(ch, method, props, body):
    if props.correlation_id == state["id"]:
        state["response"] = msgpack.unpackb(body)

ch.basic_consume(queue=callback_queue, on_message_callback=on_response, auto_ack=True)

def call(args, timeout=180):
    state["response"] = None
    state["id"] = str(uuid.uuid4())
    ch.basic_publish(
        exchange="",
        routing_key=queue,
        properties=pika.BasicProperties(reply_to=callback_queue, correlation_id=state["id"]),
        body=msgpack.packb(args),
    )
    deadline = time.monotonic() + timeout
    while state["response"] is None and time.monotonic() < deadline:
        conn.process_data_events(time_limit=None)
    return state["response"]

audio = bytes([7]) * 256

def run(seconds):
    n = 0
    start = time.monotonic()
    cpu = time.process_time()
    while time.monotonic() - start < seconds:
        reply = call({"audio": audio, "n": n})
        assert reply == {"n": n}, reply
        n += 1
    return n / (time.monotonic() - start), (time.process_time() - cpu) * 1e6 / n

run(secs / 5)
rate, cpu_us = run(secs)
print("calls/s", rate)
print("cpu-us/call", cpu_us)
conn.close()
"#;

async fn legacy(url: &str, report: &mut Report) {
    let queue = "bench-rpc-legacy";
    let (server, server_conn) = our_server(url, queue).await;
    let client_conn = connect_ours(url, "bench-ours-client").await;
    let client = RpcClient::new(client_conn.clone()).await.expect("client");
    let secs = support::run_time().as_secs_f64();
    let url = url.to_owned();
    let python = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", LEGACY_CLIENT, &url, queue, &secs.to_string()])
            .output()
    })
    .await
    .expect("the python runner")
    .unwrap_or_else(|e| panic!("cannot run python3 for the legacy client: {e}"));
    assert!(
        python.status.success(),
        "the legacy Python client failed (it needs python3 with pika and msgpack, which \
         scripts/test-all installs): {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let out = String::from_utf8_lossy(&python.stdout);
    let legacy_rate: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("calls/s ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("the legacy client printed no rate: {out}"));
    let call = |i: u32| {
        let client = &client;
        async move {
            let a: Answer = client.call(queue, &job(i)).await.expect("call");
            a.n
        }
    };
    let mut rates = Vec::new();
    for (in_flight, batch) in [(1usize, 200u64), (RPC_IN_FLIGHT, 64 * 40)] {
        let o = support::alone(batch, |n| timed(n, calls(n, in_flight, call))).await;
        rates.push(o.per_sec());
    }
    let note = "msgpack over RabbitMQ, both calling the same server (ours, bus-amqp, prefetch 64); legacy = python3 pika BlockingConnection + msgpack, sequential";
    report.throughput(
        "amqp-rpc-legacy",
        rates[0],
        "pika-legacy",
        legacy_rate,
        "calls/s",
        format!("sequential calls; {note}"),
    );
    report.throughput(
        "amqp-rpc-legacy-64",
        rates[1],
        "pika-legacy",
        legacy_rate,
        "calls/s",
        format!("ours with 64 calls in flight against the legacy client's sequential calls (target >= 4); {note}"),
    );
    server.shutdown().await.expect("shutdown");
    server_conn
        .delete_queue(queue, DeleteQueueOptions::default())
        .await
        .expect("delete");
    let _ = server_conn.close().await;
    let _ = client_conn.close().await;
}

async fn worker(ours: &Arc<dyn Connection>, raw: &lapin::Connection, report: &mut Report) {
    // The queues are filled by raw lapin, untimed.
    let filler = confirm_channel(raw).await;
    let body = body();
    let batch = 10_000;
    let fill = |queue: String, n: u64| {
        let (filler, body) = (&filler, &body);
        async move { raw_publish(filler, &queue, body, n).await }
    };
    let prefix = format!("bench-worker-{}", uuid::Uuid::new_v4().simple());
    let (o, b) = crate::worker::compare(ours, &prefix, batch, 1, fill).await;
    let _ = filler.close(200, "done".into()).await;
    report.throughput(
        "amqp-worker",
        o.per_sec(),
        "consume-loop",
        b.per_sec(),
        "msg/s",
        crate::worker::note(batch, 1),
    );
}
