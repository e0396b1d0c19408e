//! `local-worker` and `amqp-worker`: consume, handle (a no-op) and ack
//! through the worker runtime, against a hand-written consume loop with the
//! same prefetch on the same connection, in the same run. Each batch starts
//! on a queue pre-filled with the batch (untimed) and ends once every
//! message is acked; starting the consumer or worker is timed on both sides.
//! Both run as a task of the runtime, as a service runs them (the worker
//! spawns its own; the loop is spawned), not on the thread that filled the
//! queue.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bus::worker::{HandlerError, Job, Worker};
use bus::{Connection, ConsumeOptions, DeleteQueueOptions, QueueOptions};
use futures::StreamExt;

use crate::support::{side_by_side, Measured, Span};

/// The prefetch of both sides.
pub const PREFETCH: u16 = 256;

/// Measures both sides on `conn`, the worker running `concurrency`
/// handlers at once (1: one at a time, as the loop does); `fill(queue, n)` puts `n` messages in a
/// queue declared with [`QueueOptions::default`] and nothing else in it.
pub async fn compare<F, Fut>(
    conn: &Arc<dyn Connection>,
    prefix: &str,
    batch: u64,
    concurrency: usize,
    fill: F,
) -> (Measured, Measured)
where
    F: Fn(String, u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let (q_worker, q_loop) = (format!("{prefix}-worker"), format!("{prefix}-loop"));
    for q in [&q_worker, &q_loop] {
        conn.declare_queue(q, QueueOptions::default())
            .await
            .expect("declare");
    }
    let fill = &fill;
    let result = side_by_side(
        batch,
        |n| {
            let q = q_worker.clone();
            async move {
                fill(q.clone(), n).await;
                let span = Span::start();
                let worker = Worker::builder(conn.clone(), q)
                    .queue_options(QueueOptions::default())
                    .prefetch(PREFETCH)
                    .concurrency(concurrency)
                    .handle_raw(|job: Job| async move {
                        std::hint::black_box(&job.body);
                        Ok::<(), HandlerError>(())
                    })
                    .await
                    .expect("start the worker");
                let stats = worker
                    .wait_until(|s| s.handled >= n)
                    .await
                    .expect("handled");
                let m = span.stop(n);
                assert_eq!(stats.handled, n);
                worker
                    .shutdown(Duration::from_secs(10))
                    .await
                    .expect("shutdown");
                m
            }
        },
        |n| {
            let q = q_loop.clone();
            async move {
                fill(q.clone(), n).await;
                let span = Span::start();
                let conn = conn.clone();
                let consumer = tokio::spawn(async move { consume_loop(&*conn, &q, n).await })
                    .await
                    .expect("the loop's task");
                let m = span.stop(n);
                consumer.cancel().await.expect("cancel");
                m
            }
        },
    )
    .await;
    for q in [q_worker.clone(), format!("{q_worker}.error"), q_loop] {
        conn.delete_queue(&q, DeleteQueueOptions::default())
            .await
            .expect("delete");
    }
    result
}

/// The baseline: consumes `n` messages of `q` with prefetch [`PREFETCH`],
/// acking each, and returns the consumer to cancel.
async fn consume_loop(conn: &dyn Connection, q: &str, n: u64) -> bus::Consumer {
    let mut consumer = conn
        .consume(q, ConsumeOptions::prefetch(PREFETCH))
        .await
        .expect("consume");
    for _ in 0..n {
        let d = consumer.next().await.expect("a delivery").expect("ok");
        std::hint::black_box(&d.message.body);
        d.ack().await.expect("ack");
    }
    consumer
}

/// The note both scenarios print.
pub fn note(batch: u64, concurrency: usize) -> String {
    format!(
        "consume, no-op handler, ack; prefetch {PREFETCH}, worker concurrency {concurrency}; baseline: a consume-ack loop on the same connection; queue pre-filled with {batch} (untimed)"
    )
}

const ALONE_ARG: &str = "bus-bench-worker-alone";

/// `(side, messages, concurrency)` when this process was started to run one
/// side of `local-worker` alone, for an instruction count:
/// `valgrind --tool=callgrind <bench binary> bus-bench-worker-alone worker|loop N CONCURRENCY`.
pub fn alone_request() -> Option<(String, u64, usize)> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == ALONE_ARG)?;
    let side = args.get(i + 1)?.clone();
    let n = args.get(i + 2)?.parse().ok()?;
    let concurrency = args.get(i + 3)?.parse().ok()?;
    Some((side, n, concurrency))
}

/// Fills a bus-local queue with `n` messages, then runs one side of
/// `local-worker` over them once (`worker`: the runtime with a no-op
/// handler; `loop`: the consume-and-ack loop) and prints its rate. Under
/// callgrind, the difference between the two sides' totals is the
/// runtime's cost (the fill is the same on both).
pub fn alone(side: &str, n: u64, concurrency: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let broker = bus::local::LocalBroker::new();
        let conn: Arc<dyn Connection> = Arc::new(broker.connect());
        let q = "bench-alone".to_owned();
        conn.declare_queue(&q, QueueOptions::default())
            .await
            .expect("declare");
        let body = bus::Bytes::from(vec![0x5a; 256]);
        for _ in 0..n {
            bus::ConnectionExt::send_to_queue(&*conn, &q, bus::Message::new(body.clone()))
                .await
                .expect("publish");
        }
        let span = Span::start();
        match side {
            "worker" => {
                let worker = Worker::builder(conn.clone(), q)
                    .queue_options(QueueOptions::default())
                    .prefetch(PREFETCH)
                    .concurrency(concurrency)
                    .handle_raw(|job: Job| async move {
                        std::hint::black_box(&job.body);
                        Ok::<(), HandlerError>(())
                    })
                    .await
                    .expect("start the worker");
                worker
                    .wait_until(|s| s.handled >= n)
                    .await
                    .expect("handled");
                let m = span.stop(n);
                worker
                    .shutdown(Duration::from_secs(10))
                    .await
                    .expect("shutdown");
                println!("worker: {:.0} msg/s", m.per_sec());
            }
            "loop" => {
                let consumer = consume_loop(&*conn, &q, n).await;
                let m = span.stop(n);
                consumer.cancel().await.expect("cancel");
                println!("loop: {:.0} msg/s", m.per_sec());
            }
            other => panic!("unknown side {other:?}: expected worker or loop"),
        }
    });
}
