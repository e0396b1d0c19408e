//! The consume-handle-settle loop every serving component runs: the worker
//! runtime and the RPC server alike.
//!
//! It takes deliveries from one consumer and runs at most `concurrency`
//! handlers at once, and stops on request: it cancels the consumer,
//! requeues what the transport had sent but nobody started, lets the
//! handlers in hand finish within a deadline, and abandons the rest (their
//! deliveries, dropped unsettled, go back to the queue).
//!
//! The handlers run inside the loop's own task, concurrently but not in
//! parallel: no task is spawned per delivery, and a delivery that is ready
//! is taken and handled in the same poll. That keeps the cost per message
//! close to a hand-written consume-and-ack loop. Handlers that compute for
//! long run on the blocking pool (`handle_blocking`, `serve_blocking`).
//! The loop yields to the runtime after [`BUDGET`] deliveries in a row, so
//! a full queue never starves the other tasks of its thread.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::watch;

use crate::delivery::{Consumer, Delivery};
use crate::error::{Error, Result};
use crate::transport::Connection;
use crate::Requeue;

/// How many deliveries one poll of the loop starts, and handlers it sees
/// finish, before it yields to the runtime.
pub(crate) const BUDGET: u32 = 128;

/// How many yields in a row (a queue that never runs dry) the loop makes
/// between two calls of its `idle` hook.
pub(crate) const BUSY_IDLE: u32 = 8;

/// When to stop, and how long handlers in hand may take to finish.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stop {
    pub(crate) requested: bool,
    /// `None`: wait for every handler in hand, however long it takes.
    pub(crate) deadline: Option<Duration>,
}

/// What the loop did when it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Deliveries the transport had sent but no handler had started,
    /// requeued once the consumer was cancelled.
    pub(crate) requeued: u64,
    /// Handlers still running at the deadline: stopped, their deliveries
    /// requeued.
    pub(crate) abandoned: u64,
    /// Handlers that finished during the drain.
    pub(crate) finished: u64,
}

/// The handlers in hand. A new handler is polled at once in a slot reused
/// for every delivery: one that finishes in that first poll (a quick
/// handler, an ack that needs no round trip) costs no allocation and never
/// joins the set. One that has to wait is parked in the set, in its own
/// box, and the slot is replaced.
struct Handling<F> {
    slot: Pin<Box<Option<F>>>,
    waiting: FuturesUnordered<Parked<F>>,
}

/// A handler that did not finish in its first poll.
struct Parked<F>(Pin<Box<Option<F>>>);

impl<F: Future<Output = ()>> Future for Parked<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.0.as_mut().as_pin_mut() {
            Some(handler) => handler.poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl<F: Future<Output = ()>> Handling<F> {
    fn new() -> Self {
        Handling {
            slot: Box::pin(None),
            waiting: FuturesUnordered::new(),
        }
    }

    /// Handlers waiting to finish.
    fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Starts a handler and polls it once; parks it when it has to wait.
    fn start(&mut self, handler: F, cx: &mut Context<'_>) {
        self.slot.set(Some(handler));
        let first = match self.slot.as_mut().as_pin_mut() {
            Some(handler) => handler.poll(cx),
            None => Poll::Ready(()),
        };
        match first {
            Poll::Ready(()) => self.slot.set(None),
            Poll::Pending => {
                let parked = std::mem::replace(&mut self.slot, Box::pin(None));
                self.waiting.push(Parked(parked));
            }
        }
    }

    /// Drives the parked handlers: `Ready(Some(()))` when one finished,
    /// `Ready(None)` when there are none.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<()>> {
        self.waiting.poll_next_unpin(cx)
    }

    /// Drops the parked handlers (their deliveries are requeued).
    fn clear(&mut self) {
        self.waiting.clear();
    }
}

/// Runs the loop until a stop is requested (then `Ok`) or the consumer ends
/// or fails (then the error, after the handlers in hand have finished).
///
/// `process` handles one delivery, settling it before it resolves. `idle`
/// is called whenever the loop is about to wait, every [`BUSY_IDLE`]
/// yields under a steady load, after each handler finished while draining,
/// and once more at the end: the worker publishes its statistics there, so
/// that a waiter is woken once per burst of messages rather than once per
/// message.
pub(crate) async fn run<P, F>(
    mut consumer: Consumer,
    concurrency: usize,
    process: P,
    mut stop: watch::Receiver<Stop>,
    idle: impl Fn(),
) -> (Result<()>, Drained)
where
    P: Fn(Delivery) -> F,
    F: Future<Output = ()>,
{
    let mut handling = Handling::new();
    let mut stop_seen = stop.clone();
    let ended = {
        // `wait_for` also returns when the sender is gone: that stops too.
        let mut stopped = pin!(stop.wait_for(|s| s.requested));
        let mut yields = 0u32;
        std::future::poll_fn(|cx| {
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            // Deliveries started and handlers finished in this poll.
            let mut budget = BUDGET;
            while budget > 0 {
                let mut progress = false;
                while handling.len() < concurrency && budget > 0 {
                    // A stop asked for during this poll: start nothing more.
                    if stop_seen.has_changed().unwrap_or(true)
                        && stop_seen.borrow_and_update().requested
                    {
                        return Poll::Ready(Ok(()));
                    }
                    match consumer.poll_next_unpin(cx) {
                        Poll::Ready(Some(Ok(delivery))) => {
                            // A quick handler finishes in here.
                            handling.start(process(delivery), cx);
                            progress = true;
                            budget -= 1;
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        Poll::Ready(None) => {
                            return Poll::Ready(Err(Error::ConnectionLost(format!(
                                "the consumer of queue {:?} ended: its connection was closed or lost, or the queue deleted",
                                consumer.queue()
                            ))))
                        }
                        Poll::Pending => break,
                    }
                }
                while let Poll::Ready(Some(())) = handling.poll_next(cx) {
                    progress = true;
                    budget = budget.saturating_sub(1);
                }
                if !progress {
                    idle();
                    return Poll::Pending;
                }
            }
            // Under a steady load the loop never waits: it still tells
            // every [`BUSY_IDLE`] yields.
            yields += 1;
            if yields % BUSY_IDLE == 0 {
                idle();
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    };
    let mut drained = Drained::default();
    if ended.is_ok() {
        match consumer.cancel().await {
            // Deliveries sent before the cancel went through go back to the
            // queue for another consumer.
            Ok(()) => {
                while let Some(Ok(delivery)) = consumer.next().await {
                    match delivery.nack(Requeue::Yes).await {
                        Ok(()) => drained.requeued += 1,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not requeue a delivery while stopping");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not cancel a consumer while stopping"),
        }
    }
    let deadline = stop.borrow().deadline;
    // The consumer stays alive until the deliveries in hand are settled:
    // dropping it would requeue them.
    let finish = async {
        while std::future::poll_fn(|cx| handling.poll_next(cx))
            .await
            .is_some()
        {
            drained.finished += 1;
            idle();
        }
    };
    match deadline {
        None => finish.await,
        Some(deadline) => {
            if tokio::time::timeout(deadline, finish).await.is_err() {
                drained.abandoned = handling.len() as u64;
                // Dropping a handler drops its delivery unsettled, which
                // requeues it.
                handling.clear();
            }
        }
    }
    idle();
    drop(consumer);
    (ended, drained)
}

/// Spawns `future` on the current runtime, or fails with a clear error when
/// there is none.
pub(crate) fn spawn_on_current<F>(
    what: &str,
    future: F,
) -> Result<tokio::task::JoinHandle<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::NotSupported(format!("{what} must be started inside a tokio runtime"))
    })?;
    Ok(runtime.spawn(future))
}

/// The OpenTelemetry `messaging.system` of a connection's transport.
pub(crate) fn system(conn: &dyn Connection) -> &'static str {
    match conn.capabilities().name {
        "amqp" => "rabbitmq",
        other => other,
    }
}

/// The span one delivery is processed in, with the OpenTelemetry messaging
/// attributes; with feature `otel`, its parent is the trace the message
/// carries, if any.
pub(crate) fn process_span(
    system: &'static str,
    queue: &str,
    delivery: &Delivery,
    routing_key: &str,
    attempt: Option<u32>,
) -> tracing::Span {
    let props = &delivery.message.properties;
    let span = tracing::info_span!(
        "process",
        messaging.system = system,
        messaging.destination.name = %queue,
        messaging.operation = "process",
        messaging.message.id = props.message_id.as_deref(),
        messaging.message.conversation_id = props.correlation_id.as_deref(),
        messaging.rabbitmq.destination.routing_key = %routing_key,
        attempt = tracing::field::Empty,
    );
    if let Some(attempt) = attempt {
        // OpenTelemetry has no unsigned integers: an i64 stays a number.
        span.record("attempt", i64::from(attempt));
    }
    #[cfg(feature = "otel")]
    crate::otel::set_parent(&span, &props.headers);
    span
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use async_trait::async_trait;
    use futures::task::noop_waker_ref;
    use futures::FutureExt;
    use tokio::sync::watch;

    use super::{run, Stop, BUDGET, BUSY_IDLE};
    use crate::delivery::{Consumer, ConsumerControl, Delivery};
    use crate::error::Result;
    use crate::message::Message;
    use futures::StreamExt;

    struct NoControl;

    #[async_trait]
    impl ConsumerControl for NoControl {
        async fn cancel(&self) -> Result<()> {
            Ok(())
        }
    }

    /// A consumer with `n` auto-acked deliveries ready at once.
    fn full_queue(n: u64) -> Consumer {
        let deliveries = (1..=n).map(|tag| {
            Ok(Delivery::new(
                Message::new(&b"x"[..]),
                String::new(),
                "q".into(),
                false,
                tag,
                None,
            ))
        });
        Consumer::new(
            "tag".into(),
            "q".into(),
            Box::pin(futures::stream::iter(deliveries).chain(futures::stream::pending())),
            Arc::new(NoControl),
        )
    }

    /// Under a queue that never runs dry, with handlers that finish at
    /// once, one poll handles [`BUDGET`] deliveries and yields (asking to be
    /// polled again), and the stats hook runs every [`BUSY_IDLE`] yields.
    #[test]
    fn a_full_queue_yields_after_the_budget() {
        for concurrency in [1, 256] {
            let handled = Arc::new(AtomicU64::new(0));
            let idles = Arc::new(AtomicU64::new(0));
            let (_stop, stopped) = watch::channel(Stop::default());
            let count = handled.clone();
            let idle = idles.clone();
            let mut engine = Box::pin(run(
                full_queue(100_000),
                concurrency,
                move |_delivery| {
                    let count = count.clone();
                    async move {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                },
                stopped,
                move || {
                    idle.fetch_add(1, Ordering::Relaxed);
                },
            ));
            let mut cx = Context::from_waker(noop_waker_ref());
            for poll in 1..=u64::from(BUSY_IDLE) {
                assert!(engine.poll_unpin(&mut cx).is_pending());
                assert_eq!(
                    handled.load(Ordering::Relaxed),
                    poll * u64::from(BUDGET),
                    "concurrency {concurrency}, poll {poll}"
                );
            }
            assert_eq!(
                idles.load(Ordering::Relaxed),
                1,
                "concurrency {concurrency}"
            );
        }
    }

    /// Once the queue runs dry, the loop waits, and tells its hook first.
    #[test]
    fn an_empty_queue_waits_and_publishes() {
        let handled = Arc::new(AtomicU64::new(0));
        let idles = Arc::new(AtomicU64::new(0));
        let (_stop, stopped) = watch::channel(Stop::default());
        let count = handled.clone();
        let idle = idles.clone();
        let mut engine = Box::pin(run(
            full_queue(10),
            4,
            move |_delivery| {
                let count = count.clone();
                async move {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            },
            stopped,
            move || {
                idle.fetch_add(1, Ordering::Relaxed);
            },
        ));
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(matches!(engine.poll_unpin(&mut cx), Poll::Pending));
        assert_eq!(handled.load(Ordering::Relaxed), 10);
        assert_eq!(idles.load(Ordering::Relaxed), 1);
    }
}
