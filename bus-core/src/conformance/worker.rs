//! The worker runtime's cases: outcomes, retries, the poison queue, delayed
//! delivery, restarts, shutdown, and deliveries dropped unsettled.
//!
//! Delays are short (tens of milliseconds) so that a real broker runs them
//! quickly; on a paused clock they complete at once and the recorded times
//! are exact.

use crate::sync::Mutex;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::support::{
    bind, body, consume, exchange, not_applicable, publish, recv, until_exchange_gone,
    until_queue_gone, WAIT,
};
use super::{fresh_name, Harness};
use crate::worker::{
    publish_delayed, publish_delayed_with, DelayOptions, FailureReport, HandlerError, Job,
    PoisonReason, RetryPolicy, Worker, WorkerStats,
};
use crate::{
    Connection, ConnectionExt, ConsumeOptions, DeleteExchangeOptions, DeleteQueueOptions,
    ExchangeKind, Message, QueueOptions,
};

const SHORT: Duration = Duration::from_millis(40);

/// A short linger for delay queues, so that an idle one expires within
/// seconds on a real broker: it expires once unused for `SHORT + LINGER`.
/// The linger is also the margin the broker has to dead-letter a due
/// message before its queue expires: with 200 ms, a case failed once on
/// a loaded host (the delayed message never came, most likely because its
/// queue expired before RabbitMQ dead-lettered it), so it is 2 s.
const LINGER: Duration = Duration::from_secs(2);

/// How often a case checks whether a delay queue has expired: a check
/// counts as use of the queue on RabbitMQ, so checks are spaced beyond
/// its expiry.
const EXPIRY_CHECKS: Duration = Duration::from_millis(2500);

/// Waits until the delay queue `name` and its exchange are gone: the
/// broker deleted the idle queue, and the exchange went with its binding.
async fn until_delay_queue_gone(conn: &dyn Connection, name: &str) {
    until_queue_gone(conn, name, EXPIRY_CHECKS, "idle delay queue").await;
    until_exchange_gone(
        conn,
        name,
        Duration::from_millis(10),
        "the exchange of an expired delay queue",
    )
    .await;
}

/// Deletes a delay queue and its exchange (either may be gone already).
async fn delete_delay_queue(conn: &dyn Connection, name: &str) {
    conn.delete_queue(name, DeleteQueueOptions::default())
        .await
        .unwrap_or_else(|e| panic!("delete delay queue {name:?}: {e:?}"));
    conn.delete_exchange(name, DeleteExchangeOptions::default())
        .await
        .unwrap_or_else(|e| panic!("delete delay exchange {name:?}: {e:?}"));
}

/// Deletes the queue `q` and the exchange `x` a delayed publish targets.
async fn delete_target(conn: &dyn Connection, q: &str, x: &str) {
    conn.delete_queue(q, DeleteQueueOptions::default())
        .await
        .unwrap_or_else(|e| panic!("delete queue {q:?}: {e:?}"));
    conn.delete_exchange(x, DeleteExchangeOptions::default())
        .await
        .unwrap_or_else(|e| panic!("delete exchange {x:?}: {e:?}"));
}

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing happened within {WAIT:?}"))
}

/// Declares the worker's queue (durable, as the worker declares it).
async fn work_queue(conn: &dyn Connection, prefix: &str) -> String {
    let q = fresh_name(prefix);
    conn.declare_queue(&q, QueueOptions::durable())
        .await
        .unwrap_or_else(|e| panic!("declare {q:?}: {e:?}"));
    q
}

/// A policy with exact (unjittered) backoffs of 1 ms.
fn policy() -> RetryPolicy {
    RetryPolicy::none()
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .jitter(false)
}

async fn until(worker: &Worker, what: &str, done: impl FnMut(&WorkerStats) -> bool) -> WorkerStats {
    within(what, worker.wait_until(done))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// The one message of the poison queue of `q`, acked.
async fn poisoned(conn: &dyn Connection, q: &str) -> Message {
    let mut errors = consume(conn, &format!("{q}.error"), ConsumeOptions::prefetch(1)).await;
    let d = recv(&mut errors, "the poisoned message").await;
    d.ack().await.expect("ack the poisoned message");
    let message = d.message.clone();
    drop(d);
    message
}

/// Deletes the worker's queues and the delay queues and exchanges of
/// `delays`.
async fn cleanup(conn: &dyn Connection, q: &str, delays: &[Duration]) {
    let mut queues = vec![q.to_owned(), format!("{q}.error")];
    let mut exchanges = Vec::new();
    for d in delays {
        let name = format!("{q}.delay.{}ms", d.as_millis());
        queues.push(name.clone());
        exchanges.push(name);
    }
    for name in &queues {
        conn.delete_queue(name, DeleteQueueOptions::default())
            .await
            .unwrap_or_else(|e| panic!("cleanup: delete queue {name:?}: {e:?}"));
    }
    for name in &exchanges {
        conn.delete_exchange(name, DeleteExchangeOptions::default())
            .await
            .unwrap_or_else(|e| panic!("cleanup: delete exchange {name:?}: {e:?}"));
    }
}

async fn stop(worker: Worker) {
    within("stop the worker", worker.shutdown(WAIT))
        .await
        .unwrap_or_else(|e| panic!("stop the worker: {e:?}"));
}

/// A handled message is acked: the handler sees body, properties, headers,
/// attempt 1, and can publish through the connection.
pub async fn worker_success_acks(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "worker-success").await;
    let events = work_queue(&*conn, "worker-success-events").await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let events_q = events.clone();
    let worker = Worker::builder(conn.clone(), &q)
        .retry(policy())
        .handle(move |job: Job<u64>| {
            let (seen_tx, events_q) = (seen_tx.clone(), events_q.clone());
            async move {
                let header = job
                    .headers()
                    .get("x-job")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned);
                let _ = seen_tx.send((
                    job.body,
                    job.attempt,
                    job.redelivered,
                    header,
                    job.properties.message_id.clone(),
                ));
                job.publish_value("", &events_q, &(job.body * 2)).await?;
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("start a worker on {q:?}: {e:?}"));
    let mut m = crate::rpc::Format::MsgPack
        .to_message(&21u64)
        .unwrap()
        .with_header("x-job", "j1");
    m.properties.message_id = Some("m-1".into());
    publish(&*conn, "", &q, m).await;
    let got = within("the handler runs", seen.recv())
        .await
        .expect("a job");
    assert_eq!(got, (21, 1, false, Some("j1".into()), Some("m-1".into())));
    let stats = until(&worker, "the job is acked", |s| s.handled == 1).await;
    assert_eq!(
        (stats.failures, stats.poisoned, stats.delayed),
        (0, 0, 0),
        "{stats:?}"
    );
    let mut ev = consume(&*conn, &events, ConsumeOptions::auto_ack()).await;
    let e = recv(&mut ev, "the event the handler published").await;
    assert_eq!(
        crate::rpc::Format::MsgPack
            .decode::<u64>(&e.message.body)
            .unwrap(),
        42
    );
    drop(ev);
    let report = within("stop", worker.shutdown(WAIT)).await.expect("stop");
    assert_eq!(report.stats.handled, 1);
    assert_eq!(
        conn.inspect_queue(&q).await.unwrap().message_count,
        0,
        "the job was acked"
    );
    cleanup(&*conn, &q, &[]).await;
    conn.delete_queue(&events, DeleteQueueOptions::default())
        .await
        .unwrap();
}

/// A transient failure is retried in process after the backoff, then
/// through the broker after the delay, and the handler sees the attempt
/// number grow; on success the message is acked. The gaps between
/// attempts are at least the backoff and the delay.
pub async fn worker_transient_then_success(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "worker-transient").await;
    let backoff = Duration::from_millis(5);
    let p = policy()
        .immediate(1)
        .backoff(backoff, backoff)
        .delayed([SHORT]);
    let times = Arc::new(Mutex::new(Vec::new()));
    let log = times.clone();
    let worker = Worker::builder(conn.clone(), &q)
        .retry(p)
        .handle_raw(move |job: Job| {
            let log = log.clone();
            async move {
                log.lock().push((job.attempt, Instant::now()));
                if job.attempt < 3 {
                    Err(HandlerError::transient(format!(
                        "not yet ({})",
                        job.attempt
                    )))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("start a worker on {q:?}: {e:?}"));
    publish(&*conn, "", &q, Message::new(&b"job"[..])).await;
    let stats = until(&worker, "handled on the third attempt", |s| s.handled == 1).await;
    assert_eq!(
        (stats.failures, stats.retried, stats.delayed, stats.poisoned),
        (2, 1, 1, 0),
        "{stats:?}"
    );
    let times = times.lock().clone();
    let attempts: Vec<u32> = times.iter().map(|t| t.0).collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert!(
        times[1].1 - times[0].1 >= backoff,
        "in-process retry after the backoff: {times:?}"
    );
    assert!(
        times[2].1 - times[1].1 >= SHORT,
        "delayed retry after the delay: {times:?}"
    );
    stop(worker).await;
    cleanup(&*conn, &q, &[SHORT]).await;
}

/// Transient failures past the last attempt poison the message: body and
/// properties intact, and headers naming the error, the attempts, the
/// original exchange and routing key, the time, the worker, with the
/// delay queue's `x-death` history.
pub async fn worker_retries_exhausted_go_to_poison_queue(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "worker-exhausted").await;
    let x = exchange(&*conn, "worker-exhausted-x", ExchangeKind::Direct).await;
    bind(&*conn, &q, &x, "speech.en").await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = calls.clone();
    let worker = Worker::builder(conn.clone(), &q)
        .retry(policy().immediate(1).delayed([SHORT]))
        .identity("asr-worker-7")
        .handle_raw(move |job: Job| {
            let log = log.clone();
            async move {
                log.lock()
                    .push((job.attempt, job.exchange.clone(), job.routing_key.clone()));
                Err::<(), _>(HandlerError::transient("model not loaded"))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("start a worker on {q:?}: {e:?}"));
    let mut m = Message::new(&b"audio"[..])
        .with_header("x-tenant", "t1")
        .persistent();
    m.properties.message_id = Some("job-9".into());
    publish(&*conn, &x, "speech.en", m).await;
    let stats = until(&worker, "the job is poisoned", |s| s.poisoned == 1).await;
    assert_eq!((stats.failures, stats.handled), (4, 0), "{stats:?}");
    let calls = calls.lock().clone();
    assert_eq!(calls.len(), 4, "{calls:?}");
    for (i, (attempt, ex, key)) in calls.iter().enumerate() {
        assert_eq!(*attempt as usize, i + 1, "{calls:?}");
        assert_eq!(
            (ex.as_str(), key.as_str()),
            (x.as_str(), "speech.en"),
            "the job names its origin, after a delay too"
        );
    }
    let p = poisoned(&*conn, &q).await;
    assert_eq!(&p.body[..], b"audio");
    assert_eq!(p.properties.message_id.as_deref(), Some("job-9"));
    assert_eq!(
        p.properties
            .headers
            .get("x-tenant")
            .and_then(|v| v.as_str()),
        Some("t1")
    );
    let report = FailureReport::of(&p);
    assert_eq!(report.reason, Some(PoisonReason::Exhausted));
    assert_eq!(report.error.as_deref(), Some("model not loaded"));
    assert_eq!(report.attempts, Some(4));
    assert_eq!(report.original_exchange.as_deref(), Some(x.as_str()));
    assert_eq!(report.original_routing_key.as_deref(), Some("speech.en"));
    assert_eq!(report.worker.as_deref(), Some("asr-worker-7"));
    assert!(
        report.failed_at.is_some_and(|t| t > 1_600_000_000),
        "{report:?}"
    );
    let delay_q = format!("{q}.delay.{}ms", SHORT.as_millis());
    assert!(
        report
            .deaths
            .iter()
            .any(|d| d.queue == delay_q && d.reason == "expired" && d.count == 1),
        "x-death records the delay queue: {report:?}"
    );
    stop(worker).await;
    cleanup(&*conn, &q, &[SHORT]).await;
    conn.delete_exchange(&x, DeleteExchangeOptions::default())
        .await
        .unwrap();
}

/// A permanent failure poisons at once, without retries.
pub async fn worker_permanent_failure_poisons_at_once(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "worker-permanent").await;
    let worker = Worker::builder(conn.clone(), &q)
        .retry(policy().immediate(3).delayed([SHORT]))
        .handle(|_: Job<String>| async {
            Err::<(), _>(HandlerError::permanent("unsupported language"))
        })
        .await
        .unwrap_or_else(|e| panic!("start a worker on {q:?}: {e:?}"));
    let m = crate::rpc::Format::Json.to_message("xx").unwrap();
    publish(&*conn, "", &q, m).await;
    let stats = until(&worker, "poisoned", |s| s.poisoned == 1).await;
    assert_eq!(
        (stats.failures, stats.retried, stats.delayed),
        (1, 0, 0),
        "{stats:?}"
    );
    let report = FailureReport::of(&poisoned(&*conn, &q).await);
    assert_eq!(report.reason, Some(PoisonReason::Permanent));
    assert_eq!(report.error.as_deref(), Some("unsupported language"));
    assert_eq!(report.attempts, Some(1));
    assert_eq!(report.original_exchange.as_deref(), Some(""));
    assert_eq!(report.original_routing_key.as_deref(), Some(q.as_str()));
    stop(worker).await;
    cleanup(&*conn, &q, &[]).await;
}

/// A poison destination that refuses the message for good (here a
/// dead-letter exchange with no binding: the poison publish is mandatory)
/// does not send it round the queue again: it goes to `<queue>.error` once,
/// saying why, and the handler ran once.
pub async fn worker_refused_poison_falls_back_without_looping(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "worker-refused-poison").await;
    let dlx = exchange(&*conn, "worker-refused-dlx", ExchangeKind::Direct).await;
    let (runs_tx, runs) = watch::channel(0u32);
    let worker = Worker::builder(conn.clone(), &q)
        .retry(policy().immediate(2))
        .dead_letter_exchange(&dlx)
        .handle_raw(move |_: Job| {
            runs_tx.send_modify(|n| *n += 1);
            async { Err::<(), _>(HandlerError::permanent("broken input")) }
        })
        .await
        .unwrap_or_else(|e| panic!("start a worker on {q:?}: {e:?}"));
    publish(&*conn, "", &q, Message::new("one")).await;
    // Without the fallback, the message went back to the queue after each
    // refused poison publish and failed again: a second failure ends the
    // wait as well, and the assertions below report it.
    let stats = until(&worker, "poisoned, or failed again", |s| {
        s.poisoned == 1 || s.failures > 1
    })
    .await;
    assert_eq!(
        (stats.poisoned, stats.failures, stats.unsettled),
        (1, 1, 0),
        "poisoned once, nothing requeued: {stats:?}"
    );
    let message = poisoned(&*conn, &q).await;
    stop(worker).await;
    assert_eq!(*runs.borrow(), 1, "the handler ran once: no redelivery");
    let report = FailureReport::of(&message);
    assert_eq!(report.reason, Some(PoisonReason::Permanent));
    assert_eq!(report.error.as_deref(), Some("broken input"));
    assert_eq!(report.original_routing_key.as_deref(), Some(q.as_str()));
    let refused = message
        .properties
        .headers
        .get(crate::worker::POISON_REFUSED_HEADER)
        .and_then(crate::FieldValue::as_str)
        .unwrap_or_else(|| panic!("no refusal header: {:?}", message.properties.headers));
    assert!(!refused.is_empty());
    let left = conn
        .inspect_queue(&q)
        .await
        .unwrap_or_else(|e| panic!("inspect {q:?}: {e:?}"));
    assert_eq!(left.message_count, 0, "nothing went back to the queue");
    cleanup(&*conn, &q, &[]).await;
    conn.delete_exchange(&dlx, DeleteExchangeOptions::default())
        .await
        .unwrap();
}

/// A delay queue that refuses the retry for good (here one of the same name
/// declared beforehand with other arguments) does not send the message
/// round the queue again: it is poisoned as exhausted, once.
pub async fn worker_refused_delay_poisons_without_looping(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "worker-refused-delay").await;
    // The worker would declare it durable, with a TTL and a dead-letter
    // exchange.
    let squatter = format!("{q}.delay.{}ms", SHORT.as_millis());
    conn.declare_queue(&squatter, QueueOptions::default())
        .await
        .unwrap_or_else(|e| panic!("declare {squatter:?}: {e:?}"));
    let worker = Worker::builder(conn.clone(), &q)
        .retry(policy().delayed([SHORT]))
        .handle_raw(|_: Job| async { Err::<(), _>(HandlerError::transient("flaky")) })
        .await
        .unwrap_or_else(|e| panic!("start a worker on {q:?}: {e:?}"));
    publish(&*conn, "", &q, Message::new("one")).await;
    // Without the fallback, each refused retry requeued the message and it
    // failed again: a second failure ends the wait as well.
    let stats = until(&worker, "poisoned, or failed again", |s| {
        s.poisoned == 1 || s.failures > 1
    })
    .await;
    assert_eq!(
        (
            stats.poisoned,
            stats.failures,
            stats.delayed,
            stats.unsettled
        ),
        (1, 1, 0, 0),
        "poisoned once, nothing requeued: {stats:?}"
    );
    let report = FailureReport::of(&poisoned(&*conn, &q).await);
    stop(worker).await;
    assert_eq!(report.reason, Some(PoisonReason::Exhausted));
    let error = report.error.unwrap_or_default();
    assert!(
        error.starts_with("flaky; its delayed retry was refused: "),
        "{error:?}"
    );
    let left = conn
        .inspect_queue(&q)
        .await
        .unwrap_or_else(|e| panic!("inspect {q:?}: {e:?}"));
    assert_eq!(left.message_count, 0, "nothing went back to the queue");
    cleanup(&*conn, &q, &[SHORT]).await;
}

/// A body that does not decode as the handler's type (here a valid value
/// followed by a trailing byte, and an unknown content type) is poisoned at
/// once and the handler never runs.
pub async fn worker_undecodable_body_poisons_at_once(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "worker-undecodable").await;
    let (ran_tx, ran) = watch::channel(0u32);
    let worker = Worker::builder(conn.clone(), &q)
        .retry(policy().immediate(3).delayed([SHORT]))
        .handle(move |_: Job<u64>| {
            ran_tx.send_modify(|n| *n += 1);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .unwrap_or_else(|e| panic!("start a worker on {q:?}: {e:?}"));
    publish(&*conn, "", &q, Message::new(&b"30"[..])).await;
    publish(
        &*conn,
        "",
        &q,
        Message::new(&b"3"[..]).with_content_type("text/plain"),
    )
    .await;
    until(&worker, "both poisoned", |s| s.poisoned == 2).await;
    assert_eq!(*ran.borrow(), 0, "the handler never ran");
    let mut errors = consume(&*conn, &format!("{q}.error"), ConsumeOptions::auto_ack()).await;
    for expected in ["30", "3"] {
        let d = recv(&mut errors, "a poisoned body").await;
        assert_eq!(body(&d), expected);
        let r = FailureReport::of(&d.message);
        assert_eq!(r.reason, Some(PoisonReason::Undecodable), "{r:?}");
        assert_eq!(r.attempts, Some(1));
        assert!(r.error.is_some_and(|e| !e.is_empty()));
    }
    drop(errors);
    stop(worker).await;
    cleanup(&*conn, &q, &[]).await;
}

/// A panicking handler counts as a transient failure: retried, then
/// handled; the worker goes on.
pub async fn worker_panic_is_transient(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "worker-panic").await;
    let worker = Worker::builder(conn.clone(), &q)
        .retry(policy().immediate(1))
        .handle_raw(|job: Job| async move {
            if job.attempt == 1 {
                panic!("the model crashed");
            }
            Ok::<_, HandlerError>(())
        })
        .await
        .unwrap_or_else(|e| panic!("start a worker on {q:?}: {e:?}"));
    publish(&*conn, "", &q, Message::new(&b"a"[..])).await;
    publish(&*conn, "", &q, Message::new(&b"b"[..])).await;
    let stats = until(&worker, "both handled", |s| s.handled == 2).await;
    assert_eq!(
        (stats.failures, stats.retried, stats.poisoned),
        (2, 2, 0),
        "{stats:?}"
    );
    stop(worker).await;
    cleanup(&*conn, &q, &[]).await;
}

/// Delayed delivery has no head-of-line blocking: a message due later,
/// published first, does not hold back one due sooner; each arrives after
/// its own delay.
pub async fn worker_delayed_publish_has_no_head_of_line_blocking(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "delayed-x", ExchangeKind::Direct).await;
    let q = work_queue(&*conn, "delayed").await;
    bind(&*conn, &q, &x, "k").await;
    let (long, short) = (Duration::from_millis(1500), SHORT);
    let mut consumer = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let start = Instant::now();
    publish_delayed(&*conn, &x, "k", Message::new(&b"late"[..]), long)
        .await
        .expect("publish late");
    publish_delayed(&*conn, &x, "k", Message::new(&b"soon"[..]), short)
        .await
        .expect("publish soon");
    let first = recv(&mut consumer, "the sooner message").await;
    let first_at = start.elapsed();
    let second = recv(&mut consumer, "the later message").await;
    let second_at = start.elapsed();
    assert_eq!(
        (body(&first), body(&second)),
        ("soon".to_owned(), "late".to_owned())
    );
    assert!(
        first_at >= short && first_at < long,
        "the sooner one came after {first_at:?}"
    );
    assert!(second_at >= long, "the later one came after {second_at:?}");
    assert_eq!(
        first.exchange, x,
        "dead-lettered back to the target exchange"
    );
    assert_eq!(first.routing_key, "k", "with its own routing key");
    drop(consumer);
    for d in [long, short] {
        delete_delay_queue(&*conn, &format!("bus.delay.{}ms.{x}", d.as_millis())).await;
    }
    delete_target(&*conn, &q, &x).await;
}

/// A delay queue nothing uses is deleted by the broker once its expiry
/// (delay + linger) has passed, and its exchange with it: delays no longer
/// used leave nothing behind.
pub async fn delay_queue_and_exchange_expire_when_idle(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().queue_expiry,
        "delay_queue_and_exchange_expire_when_idle",
        "no queue expiry: delay queues are permanent",
    ) {
        return;
    }
    let conn = h.connect().await;
    let x = exchange(&*conn, "delay-expiry-x", ExchangeKind::Direct).await;
    let q = work_queue(&*conn, "delay-expiry").await;
    bind(&*conn, &q, &x, "k").await;
    let mut consumer = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let options = DelayOptions::default().linger(LINGER);
    publish_delayed_with(&*conn, &x, "k", Message::new("one"), SHORT, &options)
        .await
        .expect("publish delayed");
    let d = recv(&mut consumer, "the delayed message").await;
    assert_eq!(body(&d), "one");
    let name = format!("bus.delay.{}ms.{x}", SHORT.as_millis());
    let info = conn
        .inspect_queue(&name)
        .await
        .unwrap_or_else(|e| panic!("the delay queue {name:?} exists after use: {e:?}"));
    assert_eq!(info.message_count, 0, "the delay queue is empty");
    until_delay_queue_gone(&*conn, &name).await;
    drop(consumer);
    delete_target(&*conn, &q, &x).await;
}

/// A delayed message published after its delay queue was idle for a while
/// (on a transport with queue expiry: long enough for the broker to delete
/// the queue and its exchange) is still delivered, after its delay, to its
/// target exchange.
pub async fn delayed_publish_after_an_idle_delay_queue_is_delivered(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "delay-idle-x", ExchangeKind::Direct).await;
    let q = work_queue(&*conn, "delay-idle").await;
    bind(&*conn, &q, &x, "k").await;
    let mut consumer = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let options = DelayOptions::default().linger(LINGER);
    let name = format!("bus.delay.{}ms.{x}", SHORT.as_millis());
    publish_delayed_with(&*conn, &x, "k", Message::new("one"), SHORT, &options)
        .await
        .expect("publish delayed");
    assert_eq!(body(&recv(&mut consumer, "the first message").await), "one");
    if h.capabilities().queue_expiry {
        until_delay_queue_gone(&*conn, &name).await;
    }
    let start = Instant::now();
    publish_delayed_with(&*conn, &x, "k", Message::new("two"), SHORT, &options)
        .await
        .expect("publish delayed after the delay queue was idle");
    let d = recv(&mut consumer, "the message published after the idle time").await;
    assert_eq!(body(&d), "two");
    assert!(start.elapsed() >= SHORT, "it waited for its delay");
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str()),
        (x.as_str(), "k"),
        "dead-lettered to the target exchange with its own routing key"
    );
    drop(consumer);
    delete_delay_queue(&*conn, &name).await;
    delete_target(&*conn, &q, &x).await;
}

/// Publishes `a` to `q` and waits until `worker` handled it (after one
/// delayed retry), runs `between`, then does the same with `b`, and checks
/// that both went through their delay queue without being poisoned or left
/// unsettled.
async fn two_delayed_retries(
    conn: &dyn Connection,
    worker: &Worker,
    q: &str,
    between: impl Future<Output = ()>,
) {
    publish(conn, "", q, Message::new("a")).await;
    until(worker, "the first message, retried once", |s| {
        s.handled == 1
    })
    .await;
    between.await;
    publish(conn, "", q, Message::new("b")).await;
    let stats = until(worker, "the second message, retried once", |s| {
        s.handled == 2 || s.poisoned > 0 || s.unsettled > 0
    })
    .await;
    assert_eq!(
        (
            stats.handled,
            stats.delayed,
            stats.poisoned,
            stats.unsettled
        ),
        (2, 2, 0, 0),
        "{stats:?}"
    );
}

/// A worker whose delay queue expired while no retry used it (the worker
/// had declared it earlier) still retries through it: the retry is not
/// lost, and comes back at the next attempt.
pub async fn worker_delayed_retry_after_its_delay_queue_expired(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "worker-delay-expired").await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let worker = Worker::builder(conn.clone(), &q)
        .retry(policy().delayed([SHORT]))
        .delay_options(DelayOptions::default().linger(LINGER))
        .handle_raw(move |job: Job| {
            let _ = seen_tx.send((String::from_utf8_lossy(&job.body).into_owned(), job.attempt));
            async move {
                if job.attempt == 1 {
                    Err(HandlerError::transient("not yet"))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("start a worker on {q:?}: {e:?}"));
    let name = format!("{q}.delay.{}ms", SHORT.as_millis());
    two_delayed_retries(&*conn, &worker, &q, async {
        if h.capabilities().queue_expiry {
            until_delay_queue_gone(&*conn, &name).await;
        }
    })
    .await;
    stop(worker).await;
    let mut got = Vec::new();
    while let Ok(s) = seen.try_recv() {
        got.push(s);
    }
    let expected: Vec<(String, u32)> = [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
        .iter()
        .map(|(b, n)| ((*b).to_owned(), *n))
        .collect();
    assert_eq!(
        got, expected,
        "each message retried once through the broker"
    );
    cleanup(&*conn, &q, &[SHORT]).await;
}

/// A delay queue deleted by hand while a worker trusts its earlier
/// declaration of it: the next retry is not lost (its publish is mandatory,
/// so it comes back, and the worker declares the queue again).
pub async fn worker_delayed_retry_after_its_delay_queue_was_deleted(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "worker-delay-deleted").await;
    let worker = Worker::builder(conn.clone(), &q)
        .retry(policy().delayed([SHORT]))
        .handle_raw(move |job: Job| async move {
            if job.attempt == 1 {
                Err(HandlerError::transient("not yet"))
            } else {
                Ok(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("start a worker on {q:?}: {e:?}"));
    let name = format!("{q}.delay.{}ms", SHORT.as_millis());
    two_delayed_retries(&*conn, &worker, &q, async {
        conn.delete_queue(&name, DeleteQueueOptions::default())
            .await
            .unwrap_or_else(|e| panic!("delete the delay queue {name:?}: {e:?}"));
    })
    .await;
    stop(worker).await;
    cleanup(&*conn, &q, &[SHORT]).await;
}

/// The attempt count travels with the message: a worker stopped while a
/// retry waits in the delay queue, and a new worker on a new connection
/// picks it up at the next attempt.
pub async fn worker_attempts_survive_a_restart(h: &dyn Harness) {
    let first_conn = h.connect().await;
    let q = work_queue(&*first_conn, "worker-restart").await;
    let p = policy().delayed([SHORT, SHORT]);
    let first = Worker::builder(first_conn.clone(), &q)
        .retry(p.clone())
        .handle_raw(|_: Job| async { Err::<(), _>(HandlerError::transient("busy")) })
        .await
        .unwrap_or_else(|e| panic!("start the first worker on {q:?}: {e:?}"));
    publish(&*first_conn, "", &q, Message::new(&b"job"[..]).persistent()).await;
    until(&first, "the first attempt is delayed", |s| s.delayed == 1).await;
    stop(first).await;
    first_conn
        .close()
        .await
        .expect("close the first worker's connection");

    let conn = h.connect().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let second = Worker::builder(conn.clone(), &q)
        .retry(p)
        .handle_raw(move |job: Job| {
            let _ = seen_tx.send(job.attempt);
            async { Ok::<_, HandlerError>(()) }
        })
        .await
        .unwrap_or_else(|e| panic!("start the second worker on {q:?}: {e:?}"));
    let attempt = within("the second worker gets the retry", seen.recv()).await;
    assert_eq!(attempt, Some(2), "the attempt count survived the restart");
    until(&second, "handled", |s| s.handled == 1).await;
    stop(second).await;
    cleanup(&*conn, &q, &[SHORT]).await;
}

/// Shutdown stops consuming, lets the handler in hand finish within the
/// deadline, requeues what it had not started, and reports it; a handler
/// past the deadline is stopped and its message requeued.
pub async fn worker_shutdown_drains_and_requeues(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "worker-shutdown").await;
    let (held_tx, mut held) = mpsc::unbounded_channel();
    let (release, released) = watch::channel(false);
    let worker = Worker::builder(conn.clone(), &q)
        .prefetch(3)
        .retry(policy())
        .handle_raw(move |job: Job| {
            let (held_tx, mut released) = (held_tx.clone(), released.clone());
            async move {
                let _ = held_tx.send(String::from_utf8_lossy(&job.body).into_owned());
                let _ = released.wait_for(|r| *r).await;
                Ok::<_, HandlerError>(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("start a worker on {q:?}: {e:?}"));
    for b in ["one", "two", "three"] {
        publish(&*conn, "", &q, Message::new(b.to_owned())).await;
    }
    assert_eq!(
        within("the first job is in hand", held.recv())
            .await
            .as_deref(),
        Some("one")
    );
    // The stop is requested before the handler is released, so the
    // worker never starts "two".
    worker.stopper().stop(WAIT);
    let stopping = tokio::spawn(worker.wait());
    release.send_replace(true);
    let report = within("shutdown", stopping)
        .await
        .unwrap()
        .expect("shutdown");
    assert_eq!(report.stats.handled, 1, "{report:?}");
    assert_eq!(report.abandoned, 0, "{report:?}");
    assert!(report.requeued <= 2, "{report:?}");
    // The two it had not started are back in the queue, in order.
    let mut rest = consume(&*conn, &q, ConsumeOptions::prefetch(2)).await;
    let two = recv(&mut rest, "the second job, requeued").await;
    let three = recv(&mut rest, "the third job, requeued").await;
    assert_eq!(
        (body(&two), body(&three)),
        ("two".to_owned(), "three".to_owned())
    );
    two.ack().await.unwrap();
    three.ack().await.unwrap();
    drop(rest);

    // A handler that does not finish in time is stopped; its job requeued.
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let worker = Worker::builder(conn.clone(), &q)
        .retry(policy())
        .handle_raw(move |_: Job| {
            let _ = started_tx.send(());
            futures::future::pending::<Result<(), HandlerError>>()
        })
        .await
        .unwrap_or_else(|e| panic!("restart a worker on {q:?}: {e:?}"));
    publish(&*conn, "", &q, Message::new(&b"stuck"[..])).await;
    within("the stuck job is in hand", started.recv()).await;
    let report = within("shutdown past the deadline", worker.shutdown(SHORT))
        .await
        .expect("shutdown");
    assert_eq!(
        (report.abandoned, report.stats.handled),
        (1, 0),
        "{report:?}"
    );
    let mut again = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let stuck = recv(&mut again, "the abandoned job, requeued").await;
    assert_eq!(body(&stuck), "stuck");
    assert!(stuck.redelivered, "an abandoned job comes back redelivered");
    stuck.ack().await.unwrap();
    drop(stuck);
    drop(again);
    cleanup(&*conn, &q, &[]).await;
}

/// A delivery dropped without being settled is requeued at once (nacked
/// with requeue): its prefetch slot is freed and it comes again,
/// redelivered.
pub async fn worker_unsettled_delivery_dropped_is_requeued(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = work_queue(&*conn, "unsettled-drop").await;
    publish(&*conn, "", &q, Message::new(&b"forgotten"[..])).await;
    let mut consumer = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let d = recv(&mut consumer, "the first delivery").await;
    assert!(!d.redelivered);
    drop(d);
    let again = recv(
        &mut consumer,
        "the dropped delivery, again on the same consumer",
    )
    .await;
    assert_eq!(body(&again), "forgotten");
    assert!(again.redelivered, "it comes back redelivered");
    again.ack().await.expect("ack");
    drop(again);
    drop(consumer);
    conn.delete_queue(&q, DeleteQueueOptions::default())
        .await
        .unwrap();
}
