//! The worker runtime on the in-process broker under tokio's paused clock:
//! delayed retries complete at once and their delays are exact; tower's
//! layers wrap a handler unchanged.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::worker::{
    DelayOptions, FailureReport, HandlerError, Job, PoisonReason, RetryPolicy, Worker,
};
use bus_core::{Connection, Message, PublishOptions};
use bus_local::LocalBroker;
use tokio::time::Instant;

async fn publish(conn: &dyn Connection, queue: &str, body: &'static [u8]) {
    conn.publish("", queue, Message::new(body), PublishOptions::default())
        .await
        .expect("publish");
}

#[tokio::test(start_paused = true)]
async fn delayed_retries_take_exactly_their_delays() {
    let broker = LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let times = Arc::new(Mutex::new(Vec::new()));
    let log = times.clone();
    let worker = Worker::builder(conn.clone(), "jobs")
        .retry(
            RetryPolicy::none()
                .immediate(1)
                .backoff(Duration::from_millis(50), Duration::from_millis(50))
                .jitter(false)
                .delayed([Duration::from_secs(1), Duration::from_secs(10)]),
        )
        .handle_raw(move |job: Job| {
            log.lock().unwrap().push((job.attempt, Instant::now()));
            async { Err::<(), _>(HandlerError::transient("still failing")) }
        })
        .await
        .expect("start the worker");
    let start = Instant::now();
    publish(&*conn, "jobs", b"job").await;
    let stats = worker.wait_until(|s| s.poisoned == 1).await.unwrap();
    assert_eq!((stats.failures, stats.retried, stats.delayed), (6, 3, 2));
    let times = times.lock().unwrap().clone();
    let at: Vec<(u32, Duration)> = times.iter().map(|(a, t)| (*a, *t - start)).collect();
    let ms = Duration::from_millis;
    assert_eq!(
        at,
        [
            (1, ms(0)),
            (2, ms(50)),
            (3, ms(1_050)),
            (4, ms(1_100)),
            (5, ms(11_100)),
            (6, ms(11_150)),
        ],
        "each retry after exactly its backoff or delay"
    );
    // What the broker holds, through its own test helpers.
    broker.wait_idle().await;
    assert_eq!(broker.queue_depth("jobs"), Some(0));
    assert_eq!(broker.unacked_count("jobs"), Some(0));
    assert_eq!(broker.queue_depth("jobs.error"), Some(1));
    assert_eq!(broker.queue_depth("jobs.delay.1000ms"), Some(0));
    let report = worker.shutdown(Duration::from_secs(1)).await.unwrap();
    assert_eq!(report.stats.poisoned, 1);
}

/// A worker trusts its declaration of a delay queue for half the linger
/// only: a retry later than that declares the queue again (restarting its
/// expiry), so the queue cannot expire while the retry waits in it. Here
/// the queue (delay 1 s, linger 2 s) would expire 3 s after the first
/// declaration, with the retry published at 2.5 s still in it.
#[tokio::test(start_paused = true)]
async fn a_delay_queue_is_declared_again_before_it_could_expire() {
    let broker = LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let times = Arc::new(Mutex::new(Vec::new()));
    let log = times.clone();
    let worker = Worker::builder(conn.clone(), "jobs")
        .retry(RetryPolicy::none().delayed([Duration::from_secs(1)]))
        .delay_options(DelayOptions::default().linger(Duration::from_secs(2)))
        .handle_raw(move |job: Job| {
            log.lock().unwrap().push((job.attempt, Instant::now()));
            async move {
                if job.attempt == 1 {
                    Err(HandlerError::transient("not yet"))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .expect("start the worker");
    let start = Instant::now();
    publish(&*conn, "jobs", b"a").await;
    worker.wait_until(|s| s.handled == 1).await.unwrap();
    tokio::time::sleep_until(start + Duration::from_millis(2_500)).await;
    publish(&*conn, "jobs", b"b").await;
    let second = worker.wait_until(|s| s.handled == 2 || s.poisoned > 0);
    let stats = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("the second message is handled, not lost with an expired queue")
        .unwrap();
    assert_eq!((stats.handled, stats.delayed, stats.poisoned), (2, 2, 0));
    let times = times.lock().unwrap().clone();
    let at: Vec<(u32, Duration)> = times.iter().map(|(a, t)| (*a, *t - start)).collect();
    let ms = Duration::from_millis;
    assert_eq!(
        at,
        [(1, ms(0)), (2, ms(1_000)), (1, ms(2_500)), (2, ms(3_500))],
        "the second retry was delivered after its delay, past the first expiry"
    );
    // Idle since the second declaration at 2.5 s: gone at 5.5 s.
    tokio::time::sleep_until(start + Duration::from_millis(5_600)).await;
    broker.wait_idle().await;
    assert_eq!(broker.queue_depth("jobs.delay.1000ms"), None);
    worker.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// A linger out of range is refused when the worker starts, not at its
/// first retry.
#[tokio::test(start_paused = true)]
async fn a_linger_out_of_range_is_refused_at_start() {
    let broker = LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let started = Worker::builder(conn, "jobs")
        .delay_options(DelayOptions::default().linger(Duration::from_millis(1)))
        .handle_raw(|_: Job| async { Ok::<(), HandlerError>(()) })
        .await;
    assert!(
        matches!(started, Err(bus_core::Error::InvalidArgument(_))),
        "{started:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn tower_layers_wrap_a_handler() {
    let broker = LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let handler = tower::service_fn(|job: Job| async move {
        if job.attempt == 1 {
            // Longer than the timeout layer allows: a transient failure.
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Ok::<_, HandlerError>(())
    });
    let service = tower::ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .service(handler);
    let worker = Worker::builder(conn.clone(), "timed")
        .retry(RetryPolicy::none().immediate(1).jitter(false))
        .service(service)
        .await
        .expect("start the worker");
    publish(&*conn, "timed", b"job").await;
    let stats = worker.wait_until(|s| s.handled == 1).await.unwrap();
    assert_eq!((stats.failures, stats.retried, stats.poisoned), (1, 1, 0));

    // A service error that is a permanent HandlerError keeps its kind
    // through the layer.
    let failing = tower::ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .service(tower::service_fn(|_: Job| async {
            Err::<(), _>(HandlerError::permanent("bad job"))
        }));
    let strict = Worker::builder(conn.clone(), "strict")
        .retry(RetryPolicy::none().immediate(3))
        .service(failing)
        .await
        .expect("start the second worker");
    publish(&*conn, "strict", b"job").await;
    let stats = strict.wait_until(|s| s.poisoned == 1).await.unwrap();
    assert_eq!(stats.failures, 1, "no retry of a permanent failure");
    let mut errors = conn
        .consume("strict.error", bus_core::ConsumeOptions::auto_ack())
        .await
        .unwrap();
    let poisoned = futures_next(&mut errors).await;
    let report = FailureReport::of(&poisoned.message);
    assert_eq!(report.reason, Some(PoisonReason::Permanent));
    assert_eq!(report.error.as_deref(), Some("bad job"));
    drop(errors);
    worker.shutdown(Duration::from_secs(1)).await.unwrap();
    strict.shutdown(Duration::from_secs(1)).await.unwrap();
}

async fn futures_next(consumer: &mut bus_core::Consumer) -> bus_core::Delivery {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a poisoned message")
        .expect("the consumer is open")
        .expect("a delivery")
}

/// A handler function that panics while it makes its future, before the
/// future runs, fails that attempt like a panic inside the future: the job
/// is retried and handled, and the worker goes on. For raw and typed jobs
/// alike.
#[tokio::test(start_paused = true)]
async fn a_panic_before_the_handlers_future_is_a_transient_failure() {
    let broker = LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let retry_once = || RetryPolicy::none().immediate(2).jitter(false);
    let raw = Worker::builder(conn.clone(), "panics-raw")
        .retry(retry_once())
        .handle_raw(|job: Job| {
            assert!(job.attempt > 1, "the model crashed");
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("start the raw worker");
    let typed = Worker::builder(conn.clone(), "panics-typed")
        .retry(retry_once())
        .handle(|job: Job<u32>| {
            assert!(job.attempt > 1, "the model crashed on {}", job.body);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .expect("start the typed worker");
    publish(&*conn, "panics-raw", b"job").await;
    // msgpack for 7.
    publish(&*conn, "panics-typed", &[7]).await;
    for worker in [&raw, &typed] {
        let stats = worker.wait_until(|s| s.handled == 1).await.unwrap();
        assert_eq!(
            (stats.failures, stats.retried, stats.poisoned),
            (1, 1, 0),
            "{}: {stats:?}",
            worker.queue()
        );
    }
    raw.shutdown(Duration::from_secs(1)).await.unwrap();
    typed.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// A worker that stops on its own (here: its queue is deleted under it)
/// ends the waits on its statistics with an error instead of leaving them
/// hanging, and reports why it stopped.
#[tokio::test(start_paused = true)]
async fn waiting_on_a_worker_that_stopped_fails() {
    let broker = LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let worker = Worker::builder(conn.clone(), "doomed")
        .handle_raw(|_: Job| async { Ok::<_, HandlerError>(()) })
        .await
        .expect("start the worker");
    publish(&*conn, "doomed", b"job").await;
    worker.wait_until(|s| s.handled == 1).await.unwrap();
    conn.delete_queue("doomed", bus_core::DeleteQueueOptions::default())
        .await
        .expect("delete the queue");
    let e = tokio::time::timeout(
        Duration::from_secs(60),
        worker.wait_until(|s| s.handled == 2),
    )
    .await
    .expect("the wait ends once the worker stopped")
    .expect_err("never two handled");
    assert!(matches!(e, bus_core::Error::Closed(_)), "{e:?}");
    assert!(worker.is_finished());
    let e = worker.wait().await.expect_err("the worker's own end");
    assert!(matches!(e, bus_core::Error::ConnectionLost(_)), "{e:?}");
}

/// A tower service cloned for each job, whose clone panics once: that
/// attempt fails as a transient failure, the retry runs, the worker goes
/// on.
#[tokio::test(start_paused = true)]
async fn a_panic_cloning_a_service_is_the_jobs_failure() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    struct Flaky(Arc<AtomicUsize>);
    impl Clone for Flaky {
        fn clone(&self) -> Self {
            // The first clone, for the first attempt, fails.
            assert!(self.0.fetch_add(1, Ordering::SeqCst) != 0, "clone failed");
            Flaky(self.0.clone())
        }
    }
    impl tower::Service<Job> for Flaky {
        type Response = ();
        type Error = HandlerError;
        type Future = std::future::Ready<Result<(), HandlerError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Job) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }

    let broker = LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let clones = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(conn.clone(), "flaky")
        .retry(RetryPolicy::none().immediate(2).jitter(false))
        .service(Flaky(clones.clone()))
        .await
        .expect("start the worker");
    publish(&*conn, "flaky", b"job").await;
    let stats = worker.wait_until(|s| s.handled == 1).await.unwrap();
    assert_eq!((stats.failures, stats.retried, stats.poisoned), (1, 1, 0));
    assert_eq!(clones.load(Ordering::SeqCst), 2, "one clone per attempt");
    worker.shutdown(Duration::from_secs(1)).await.unwrap();
}
