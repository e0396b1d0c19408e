//! Scenarios on the in-process broker.

use std::sync::Arc;

use bus::rpc::{RpcClient, RpcServer};
use bus::{
    Bytes, Connection, ConnectionExt, ConsumeOptions, ExchangeKind, ExchangeOptions, FieldTable,
    Message, Overflow, PublishOptions, QueueArguments, QueueOptions,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::support::{self, Report};

const BODY: usize = 256;
const PREFETCH: u16 = 256;

pub async fn run(wanted: &dyn Fn(&str) -> bool, report: &mut Report) {
    if wanted("local-throughput") {
        throughput(report).await;
    }
    if wanted("local-topic-10k") {
        topic(report).await;
    }
    if wanted("local-rpc") {
        rpc(report).await;
    }
    if wanted("local-worker") {
        worker(report, 1).await;
        worker(report, 256).await;
    }
    if wanted("local-memory") {
        let small = support::peak_rss_after(10_000);
        let large = support::peak_rss_after(1_000_000);
        report.cost(
            "local-memory",
            large,
            "after-10k-messages",
            small,
            "KiB",
            "peak RSS after 1,000,000 messages vs after 10,000 (1.0 = no growth)",
        );
    }
}

fn body() -> Bytes {
    Bytes::from(vec![0x5a; BODY])
}

/// Publishes `n` messages and consumes them with acks on one fresh broker:
/// the work measured by `local-throughput`, also used by the memory child.
/// The producer keeps at most `BACKLOG` messages ahead of the consumer, as
/// the baseline's bounded channel does: otherwise a producer that outruns
/// the consumer piles up the whole run in the queue, and the memory check
/// would measure that backlog instead of a leak.
pub async fn pump(n: u64) {
    const BACKLOG: usize = 2 * PREFETCH as usize;
    let broker = bus::local::LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let queue = conn
        .declare_queue("", QueueOptions::default())
        .await
        .expect("declare")
        .name;
    let mut consumer = conn
        .consume(&queue, ConsumeOptions::prefetch(PREFETCH))
        .await
        .expect("consume");
    let room = Arc::new(tokio::sync::Semaphore::new(BACKLOG));
    let producer = {
        let conn = conn.clone();
        let queue = queue.clone();
        let room = room.clone();
        tokio::spawn(async move {
            let body = body();
            for _ in 0..n {
                room.acquire().await.expect("open").forget();
                conn.send_to_queue(&queue, Message::new(body.clone()))
                    .await
                    .expect("publish");
            }
        })
    };
    for _ in 0..n {
        let d = consumer.next().await.expect("a delivery").expect("ok");
        d.ack().await.expect("ack");
        room.add_permits(1);
    }
    producer.await.expect("producer");
}

async fn throughput(report: &mut Report) {
    let batch = 20_000;
    let ours = support::rate(batch, pump).await;
    let baseline = support::rate(batch, |n| async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(PREFETCH as usize);
        let producer = tokio::spawn(async move {
            let body = body();
            for _ in 0..n {
                tx.send(body.clone()).await.expect("send");
            }
        });
        for _ in 0..n {
            let b = rx.recv().await.expect("a body");
            std::hint::black_box(b);
        }
        producer.await.expect("producer");
    })
    .await;
    report.throughput(
        "local-throughput",
        ours,
        "tokio-mpsc",
        baseline,
        "msg/s",
        "publish, deliver, ack; 256-byte bodies; one producer, one consumer",
    );
}

/// Publishes through a topic exchange with `bindings` bindings; every key
/// matches exactly one of them.
async fn topic_rate(bindings: usize) -> f64 {
    let broker = bus::local::LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    conn.declare_exchange("events", ExchangeKind::Topic, ExchangeOptions::default())
        .await
        .expect("exchange");
    let queues = 10;
    for q in 0..queues {
        let args = QueueArguments::default()
            .max_length(1)
            .overflow(Overflow::DropHead);
        conn.declare_queue(
            &format!("q{q}"),
            QueueOptions::default().with_arguments(args),
        )
        .await
        .expect("queue");
    }
    for i in 0..bindings {
        let pattern = match i % 3 {
            0 => format!("region{}.svc{i}.*", i % 100),
            1 => format!("region{}.svc{i}.#", i % 100),
            _ => format!("*.svc{i}.done"),
        };
        conn.bind_queue(
            &format!("q{}", i % queues),
            "events",
            &pattern,
            FieldTable::new(),
        )
        .await
        .expect("bind");
    }
    let keys: Vec<String> = (0..bindings)
        .map(|i| format!("region{}.svc{i}.done", i % 100))
        .collect();
    let body = body();
    support::rate(10_000, |n| {
        let conn = conn.clone();
        let keys = &keys;
        let body = body.clone();
        async move {
            for i in 0..n as usize {
                conn.publish(
                    "events",
                    &keys[i % keys.len()],
                    Message::new(body.clone()),
                    PublishOptions::default(),
                )
                .await
                .expect("publish");
            }
        }
    })
    .await
}

async fn topic(report: &mut Report) {
    let ours = topic_rate(10_000).await;
    let baseline = topic_rate(10).await;
    report.throughput(
        "local-topic-10k",
        ours,
        "10-bindings",
        baseline,
        "msg/s",
        "topic publish against 10,000 bindings vs 10 (routing cost growth)",
    );
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

async fn rpc(report: &mut Report) {
    const IN_FLIGHT: u64 = 64;
    let broker = bus::local::LocalBroker::new();
    let server_conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let client_conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let server = RpcServer::builder(server_conn, "bench-rpc")
        .concurrency(IN_FLIGHT as u16)
        .serve(|job: Job| async move { Ok::<_, String>(Answer { n: job.n }) })
        .await
        .expect("server");
    let client = Arc::new(RpcClient::new(client_conn).await.expect("client"));
    let ours = support::rate(IN_FLIGHT * 50, |n| {
        let client = client.clone();
        async move {
            let calls = futures::stream::iter(0..n)
                .map(|i| {
                    let client = client.clone();
                    async move {
                        let job = Job {
                            audio: vec![7; BODY],
                            n: i as u32,
                        };
                        let a: Answer = client.call("bench-rpc", &job).await.expect("call");
                        assert_eq!(a.n, i as u32);
                    }
                })
                .buffer_unordered(IN_FLIGHT as usize);
            calls.for_each(|()| async {}).await;
        }
    })
    .await;
    server.shutdown().await.expect("shutdown");

    // Baseline: the same request/reply hand-rolled over tokio channels, with
    // msgpack both ways and a oneshot per call.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<u8>, tokio::sync::oneshot::Sender<Vec<u8>>)>(
        IN_FLIGHT as usize,
    );
    let server = tokio::spawn(async move {
        while let Some((req, reply)) = rx.recv().await {
            let job: Job = rmp_serde::from_slice(&req).expect("decode");
            let _ = reply.send(rmp_serde::to_vec_named(&Answer { n: job.n }).expect("encode"));
        }
    });
    let baseline = support::rate(IN_FLIGHT * 50, |n| {
        let tx = tx.clone();
        async move {
            let calls = futures::stream::iter(0..n)
                .map(|i| {
                    let tx = tx.clone();
                    async move {
                        let job = Job {
                            audio: vec![7; BODY],
                            n: i as u32,
                        };
                        let (otx, orx) = tokio::sync::oneshot::channel();
                        tx.send((rmp_serde::to_vec_named(&job).expect("encode"), otx))
                            .await
                            .expect("send");
                        let a: Answer =
                            rmp_serde::from_slice(&orx.await.expect("reply")).expect("decode");
                        assert_eq!(a.n, i as u32);
                    }
                })
                .buffer_unordered(IN_FLIGHT as usize);
            calls.for_each(|()| async {}).await;
        }
    })
    .await;
    drop(tx);
    server.await.expect("baseline server");
    report.throughput(
        "local-rpc",
        ours,
        "mpsc-oneshot-rpc",
        baseline,
        "calls/s",
        "64 calls in flight, msgpack both ways",
    );
}

async fn worker(report: &mut Report, concurrency: usize) {
    let broker = bus::local::LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let batch = 20_000;
    let fill = |queue: String, n: u64| {
        let conn = conn.clone();
        async move {
            let body = body();
            for _ in 0..n {
                conn.send_to_queue(&queue, Message::new(body.clone()))
                    .await
                    .expect("publish");
            }
        }
    };
    let (o, b) = crate::worker::compare(&conn, "bench-worker", batch, concurrency, fill).await;
    let scenario = match concurrency {
        1 => "local-worker".to_owned(),
        n => format!("local-worker-{n}"),
    };
    report.throughput(
        &scenario,
        o.per_sec(),
        "consume-loop",
        b.per_sec(),
        "msg/s",
        crate::worker::note(batch, concurrency),
    );
}
