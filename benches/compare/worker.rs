//! `local-worker` and `amqp-worker`: consume, handle (a no-op) and ack
//! through the worker runtime, against a hand-written consume loop with the
//! same prefetch on the same connection, in the same run. Each batch starts
//! on a queue pre-filled with the batch (untimed) and ends once every
//! message is acked; starting the consumer or worker is timed on both sides.

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
                let mut consumer = conn
                    .consume(&q, ConsumeOptions::prefetch(PREFETCH))
                    .await
                    .expect("consume");
                for _ in 0..n {
                    let d = consumer.next().await.expect("a delivery").expect("ok");
                    std::hint::black_box(&d.message.body);
                    d.ack().await.expect("ack");
                }
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

/// The note both scenarios print.
pub fn note(batch: u64, concurrency: usize) -> String {
    format!(
        "consume, no-op handler, ack; prefetch {PREFETCH}, worker concurrency {concurrency}; baseline: a consume-ack loop on the same connection; queue pre-filled with {batch} (untimed)"
    )
}
