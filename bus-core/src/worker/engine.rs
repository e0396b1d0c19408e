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
//! Under a steady load the loop yields to the runtime once a poll has run
//! for [`SLICE`] (checked every [`BUDGET`] deliveries), so a full queue
//! never starves the other tasks of its thread.
//!
//! A handler that succeeded hands its delivery back ([`Processed::Ack`]),
//! and the loop acks the deliveries of one turn together, with one
//! `multiple` ack for those below the lowest delivery still in hand (see
//! [`Acks`]): under a steady load the transport settles once per turn
//! instead of once per message.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::delivery::{Consumer, Delivery};
use crate::error::{Error, Result};
use crate::transport::Connection;
use crate::Requeue;

/// How many deliveries one turn of the loop starts, and handlers it sees
/// finish: a turn's handled deliveries are acked together at its end, and
/// the loop yields to the runtime after a turn once [`SLICE`] is used up.
pub(crate) const BUDGET: u32 = 128;

/// How long one poll of the loop goes on, turn after turn of [`BUDGET`]
/// deliveries, under a steady load before it yields to the runtime: a full
/// queue holds its thread for about this long (plus one handler) at a time.
/// Yielding after every turn would wake an idle runtime thread each time,
/// which costs a quick handler more than its work.
pub(crate) const SLICE: Duration = Duration::from_micros(500);

/// How many yields in a row (a queue that never runs dry) the loop makes
/// between two calls of [`Observer::idle`].
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

/// What processing one delivery came to.
pub(crate) enum Processed {
    /// The processor settled the delivery itself (or it needed no
    /// settling) before it resolved. Never a delivery dropped unsettled:
    /// its requeue could still be on its way when a later `multiple` ack
    /// covers it.
    Settled,
    /// Handled: the engine acks it, together with the other deliveries
    /// handled in the same turn (see [`Acks`]).
    Ack(Delivery),
}

/// What the loop tells the component it runs for.
pub(crate) trait Observer {
    /// The loop is about to wait, yields under a steady load (every
    /// [`BUSY_IDLE`] yields), saw a handler finish while draining, or
    /// ends: the worker publishes its statistics here, so that a waiter is
    /// woken once per burst of messages rather than once per message.
    fn idle(&self);

    /// `count` deliveries returned as [`Processed::Ack`] were acked, or
    /// could not be (`result`).
    fn acked(&self, count: u64, result: &Result<()>);
}

/// An observer that counts nothing: it logs the acks that failed.
impl Observer for () {
    fn idle(&self) {}

    fn acked(&self, count: u64, result: &Result<()>) {
        if let Err(e) = result {
            tracing::warn!(error = %e, count, "could not ack handled messages");
        }
    }
}

/// The handlers in hand. A new handler is polled at once in a slot reused
/// for every delivery: one that finishes in that first poll (a quick
/// handler, an ack that needs no round trip) costs no allocation and never
/// joins the set. One that has to wait is parked in the set, in its own
/// box, and the slot is replaced. The tags of the parked ones are kept in
/// order: no delivery at or above the lowest of them may be covered by a
/// `multiple` ack.
struct Handling<F> {
    slot: Pin<Box<Option<F>>>,
    waiting: FuturesUnordered<Parked<F>>,
    /// The delivery tags of the parked handlers, ascending (deliveries
    /// arrive, and are started, in tag order).
    parked: VecDeque<u64>,
}

/// A handler that did not finish in its first poll, with its delivery's
/// tag.
struct Parked<F>(Pin<Box<Option<F>>>, u64);

impl<F: Future<Output = Processed>> Future for Parked<F> {
    type Output = (u64, Processed);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(u64, Processed)> {
        let tag = self.1;
        match self.0.as_mut().as_pin_mut() {
            Some(handler) => handler.poll(cx).map(|done| (tag, done)),
            None => Poll::Ready((tag, Processed::Settled)),
        }
    }
}

impl<F: Future<Output = Processed>> Handling<F> {
    fn new() -> Self {
        Handling {
            slot: Box::pin(None),
            waiting: FuturesUnordered::new(),
            parked: VecDeque::new(),
        }
    }

    /// Handlers waiting to finish.
    fn len(&self) -> usize {
        self.waiting.len()
    }

    /// The lowest delivery tag still in hand.
    fn lowest(&self) -> Option<u64> {
        self.parked.front().copied()
    }

    /// Starts the handler of delivery `tag` and polls it once: what it
    /// came to if it finished, `None` if it was parked to wait.
    fn start(
        &mut self,
        tag: u64,
        handler: impl FnOnce() -> F,
        cx: &mut Context<'_>,
    ) -> Option<Processed> {
        // Built in its slot: a handler's future is large, and moving it
        // costs more than a quick handler's work.
        self.slot.set(Some(handler()));
        let first = match self.slot.as_mut().as_pin_mut() {
            Some(handler) => handler.poll(cx),
            None => Poll::Ready(Processed::Settled),
        };
        match first {
            Poll::Ready(done) => {
                self.slot.set(None);
                Some(done)
            }
            Poll::Pending => {
                let parked = std::mem::replace(&mut self.slot, Box::pin(None));
                self.waiting.push(Parked(parked, tag));
                // Tags arrive in order on every transport, so this is the
                // back; kept sorted whatever happens, as `lowest` needs.
                let at = self.parked.partition_point(|&t| t < tag);
                self.parked.insert(at, tag);
                None
            }
        }
    }

    /// Drives the parked handlers: `Ready(Some(..))` when one finished,
    /// `Ready(None)` when there are none.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Processed>> {
        self.waiting.poll_next_unpin(cx).map(|next| {
            next.map(|(tag, done)| {
                let found = self
                    .parked
                    .binary_search(&tag)
                    .map(|i| self.parked.remove(i));
                debug_assert!(found.is_ok(), "a parked tag {tag} was not kept");
                done
            })
        })
    }

    /// Drops the parked handlers (their deliveries are requeued).
    fn clear(&mut self) {
        self.waiting.clear();
        self.parked.clear();
    }
}

/// Handled deliveries waiting for their ack, and acks on their way.
///
/// The loop acks the deliveries handled in one turn together: one
/// `multiple` ack covers those below the lowest delivery still in hand
/// (all deliveries below it are settled, or in this batch), and each of the
/// others is acked alone. A turn ends before the loop waits or yields, so
/// a handled message is never left unacked while the loop sleeps. Under a
/// steady load of handlers that finish without waiting, a turn's batch is
/// many deliveries and the transport settles once for them; a handler that
/// waits is usually acked alone, in the turn it finishes in.
struct Acks {
    batch: Vec<Delivery>,
    /// Acks the transport could not settle at once, with how many
    /// deliveries each covers.
    sending: FuturesUnordered<Sending>,
}

/// An ack on its way, with how many deliveries it covers.
type Sending = Pin<Box<dyn Future<Output = (u64, Result<()>)> + Send>>;

impl Acks {
    fn new() -> Self {
        Acks {
            batch: Vec::new(),
            sending: FuturesUnordered::new(),
        }
    }

    /// Takes what a handler came to.
    fn push(&mut self, done: Processed) {
        if let Processed::Ack(delivery) = done {
            self.batch.push(delivery);
        }
    }

    /// Acks the batch, the deliveries below `lowest` (the lowest tag still
    /// in hand) with one `multiple` ack. Returns how many it acked.
    fn flush(&mut self, lowest: Option<u64>, observer: &impl Observer) -> usize {
        let n = self.batch.len();
        if n == 0 {
            return 0;
        }
        let lowest = lowest.unwrap_or(u64::MAX);
        // The highest tag below `lowest` carries the `multiple` ack (in tag
        // order, that is the last one).
        let last = self
            .batch
            .iter()
            .enumerate()
            .filter(|(_, d)| d.delivery_tag < lowest)
            .max_by_key(|(_, d)| d.delivery_tag)
            .map(|(i, _)| i);
        if let Some(i) = last {
            let last = self.batch.remove(i);
            let (tag, by) = (last.delivery_tag, last.settled_by());
            // Only deliveries of the same channel: after a transport
            // recovered a consumer on a new one, the old channel's
            // deliveries are settled (or fail) on their own, and first: a
            // `multiple` recorded before would count them as settled.
            let alone = |d: &Delivery| d.delivery_tag > tag || d.settled_by() != by;
            let (mut below, mut above) = (Vec::new(), Vec::new());
            // Usually none: the batch keeps its room.
            if self.batch.iter().any(alone) {
                for d in std::mem::take(&mut self.batch) {
                    match (alone(&d), d.delivery_tag < tag) {
                        (false, _) => self.batch.push(d),
                        (true, true) => below.push(d),
                        (true, false) => above.push(d),
                    }
                }
            }
            for delivery in below {
                Self::send(&mut self.sending, delivery, false, 1, observer);
            }
            let covered = self.batch.len() as u64;
            // Alone, `ack` is the same as `ack_multiple`, and a transport
            // may settle it more cheaply.
            Self::send(&mut self.sending, last, covered > 0, covered + 1, observer);
            // Claimed, and the `multiple` recorded, once `send` returned:
            // dropping the deliveries it covers sends nothing.
            self.batch.clear();
            for delivery in above {
                Self::send(&mut self.sending, delivery, false, 1, observer);
            }
        }
        for delivery in self.batch.drain(..) {
            Self::send(&mut self.sending, delivery, false, 1, observer);
        }
        n
    }

    /// Acks `delivery` (and, with `multiple`, the earlier ones: `count`
    /// in all), at once or through `sending`.
    fn send(
        sending: &mut FuturesUnordered<Sending>,
        delivery: Delivery,
        multiple: bool,
        count: u64,
        observer: &impl Observer,
    ) {
        match delivery.ack_eagerly(multiple) {
            Ok(None) => observer.acked(count, &Ok(())),
            Ok(Some(ack)) => sending.push(Box::pin(async move { (count, ack.await) })),
            Err(e) => observer.acked(count, &Err(e)),
        }
    }

    /// Drives the acks on their way: `Ready(true)` when one finished.
    fn poll_sent(&mut self, cx: &mut Context<'_>, observer: &impl Observer) -> Poll<bool> {
        match self.sending.poll_next_unpin(cx) {
            Poll::Ready(Some((count, result))) => {
                observer.acked(count, &result);
                Poll::Ready(true)
            }
            Poll::Ready(None) => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waits for every ack on its way.
    async fn finish(&mut self, observer: &impl Observer) {
        while std::future::poll_fn(|cx| self.poll_sent(cx, observer)).await {}
    }
}

/// Runs the loop until a stop is requested (then `Ok`) or the consumer ends
/// or fails (then the error, after the handlers in hand have finished).
///
/// `process` handles one delivery, and resolves once it has settled it
/// ([`Processed::Settled`]) or to hand it back for the engine to ack
/// ([`Processed::Ack`]). `observer` is told of those acks, and whenever the
/// loop is about to wait (see [`Observer::idle`]).
pub(crate) async fn run<P, F>(
    mut consumer: Consumer,
    concurrency: usize,
    process: P,
    mut stop: watch::Receiver<Stop>,
    observer: impl Observer,
    slice: Duration,
) -> (Result<()>, Drained)
where
    P: Fn(Delivery) -> F,
    F: Future<Output = Processed>,
{
    let mut handling = Handling::new();
    let mut acks = Acks::new();
    let mut stop_seen = stop.clone();
    let ended = {
        // `wait_for` also returns when the sender is gone: that stops too.
        let mut stopped = pin!(stop.wait_for(|s| s.requested));
        let mut yields = 0u32;
        std::future::poll_fn(|cx| {
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            // A turn of deliveries after another while the slice lasts.
            let poll_start = (!slice.is_zero()).then(std::time::Instant::now);
            loop {
                // Deliveries started and handlers finished in this turn.
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
                                let tag = delivery.delivery_tag;
                                if let Some(done) = handling.start(tag, || process(delivery), cx) {
                                    acks.push(done);
                                }
                                progress = true;
                                budget -= 1;
                            }
                            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                            Poll::Ready(None) => {
                                return Poll::Ready(Err(consumer_ended(&consumer)))
                            }
                            Poll::Pending => break,
                        }
                    }
                    while let Poll::Ready(Some(done)) = handling.poll_next(cx) {
                        acks.push(done);
                        progress = true;
                        budget = budget.saturating_sub(1);
                    }
                    while let Poll::Ready(true) = acks.poll_sent(cx, &observer) {}
                    if !progress {
                        // Acks free prefetch slots: the consumer may have more.
                        if acks.flush(handling.lowest(), &observer) > 0 {
                            continue;
                        }
                        observer.idle();
                        return Poll::Pending;
                    }
                }
                acks.flush(handling.lowest(), &observer);
                // Yielding wakes an idle runtime thread to look for work: under
                // a steady load, a poll goes on for turn after turn until the
                // slice is used up.
                if poll_start.is_none_or(|start| start.elapsed() >= slice) {
                    break;
                }
            }
            // Under a steady load the loop never waits: it still tells
            // every [`BUSY_IDLE`] yields.
            yields += 1;
            if yields % BUSY_IDLE == 0 {
                observer.idle();
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    };
    let deadline = stop.borrow().deadline;
    // Handled deliveries are acked before the consumer is cancelled (within
    // the deadline: a stalled connection does not hold the stop up).
    acks.flush(handling.lowest(), &observer);
    until(deadline.map(|d| Instant::now() + d), acks.finish(&observer)).await;
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
    let end = deadline.map(|d| Instant::now() + d);
    // The consumer stays alive until the deliveries in hand are settled:
    // dropping it would requeue them. Each one's ack goes out as it
    // finishes.
    let finish = async {
        while let Some(done) = std::future::poll_fn(|cx| handling.poll_next(cx)).await {
            acks.push(done);
            acks.flush(handling.lowest(), &observer);
            acks.finish(&observer).await;
            drained.finished += 1;
            observer.idle();
        }
    };
    if !until(end, finish).await {
        drained.abandoned = handling.len() as u64;
        // Dropping a handler drops its delivery unsettled, which requeues
        // it.
        handling.clear();
    }
    // Past the deadline, acks still on their way are dropped: their
    // deliveries go back to the queue with the consumer.
    acks.flush(None, &observer);
    until(end, acks.finish(&observer)).await;
    observer.idle();
    drop(consumer);
    (ended, drained)
}

/// Why the loop stopped when its consumer's stream ended.
fn consumer_ended(consumer: &Consumer) -> Error {
    Error::ConnectionLost(format!(
        "the consumer of queue {:?} ended: its connection was closed or lost, or the queue deleted",
        consumer.queue()
    ))
}

/// Runs `work` to its end, or until `end` when there is one: whether it
/// ended.
async fn until(end: Option<Instant>, work: impl Future<Output = ()>) -> bool {
    match end {
        None => {
            work.await;
            true
        }
        Some(end) => tokio::time::timeout_at(end, work).await.is_ok(),
    }
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
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use async_trait::async_trait;
    use futures::task::noop_waker_ref;
    use futures::FutureExt;
    use tokio::sync::{watch, Notify};

    use super::{run, Observer, Processed, Stop, BUDGET, BUSY_IDLE};
    use crate::delivery::{
        AckOptions, Acknowledger, Consumer, ConsumerControl, Delivery, NackOptions,
    };
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

    /// Records the settles it is asked for, and settles at once.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, bool)>>);

    #[async_trait]
    impl Acknowledger for Recorder {
        async fn ack(&self, tag: u64, options: AckOptions) -> Result<()> {
            self.0.lock().unwrap().push((tag, options.multiple));
            Ok(())
        }
        async fn nack(&self, _: u64, _: NackOptions) -> Result<()> {
            panic!("nothing is nacked here");
        }
        fn ack_now(&self, tag: u64, options: AckOptions) -> Option<Result<()>> {
            self.0.lock().unwrap().push((tag, options.multiple));
            Some(Ok(()))
        }
    }

    /// Counts the hook calls.
    #[derive(Clone, Default)]
    struct Counting {
        idles: Arc<AtomicU64>,
        acked: Arc<AtomicU64>,
    }

    impl Observer for Counting {
        fn idle(&self) {
            self.idles.fetch_add(1, Ordering::Relaxed);
        }
        fn acked(&self, count: u64, result: &Result<()>) {
            assert!(result.is_ok(), "{result:?}");
            self.acked.fetch_add(count, Ordering::Relaxed);
        }
    }

    /// A consumer with `n` deliveries ready at once, each settled through
    /// what `acker` gives for its tag (`None`: auto-acked).
    fn full_queue(
        n: u64,
        acker: impl Fn(u64) -> Option<Arc<dyn Acknowledger>> + Send + 'static,
    ) -> Consumer {
        let deliveries = (1..=n).map(move |tag| {
            Ok(Delivery::new(
                Message::new(&b"x"[..]),
                "",
                "q",
                false,
                tag,
                acker(tag),
            ))
        });
        Consumer::new(
            "tag".into(),
            "q".into(),
            Box::pin(futures::stream::iter(deliveries).chain(futures::stream::pending())),
            Arc::new(NoControl),
        )
    }

    /// A handler that counts the deliveries it is given in `handled`, and
    /// settles nothing (they are auto-acked).
    fn counting(handled: &Arc<AtomicU64>) -> impl Fn(Delivery) -> std::future::Ready<Processed> {
        let handled = handled.clone();
        move |_| {
            handled.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Processed::Settled)
        }
    }

    /// A processor that hands every delivery back to be acked, delivery
    /// `held` once `release` is notified.
    fn holding(
        held: u64,
        release: &Arc<Notify>,
    ) -> impl Fn(Delivery) -> futures::future::BoxFuture<'static, Processed> {
        let release = release.clone();
        move |delivery| {
            let release = release.clone();
            Box::pin(async move {
                if delivery.delivery_tag == held {
                    release.notified().await;
                }
                Processed::Ack(delivery)
            })
        }
    }

    /// Every delivery settled through `recorder`.
    fn through(recorder: &Arc<Recorder>) -> impl Fn(u64) -> Option<Arc<dyn Acknowledger>> {
        let recorder: Arc<dyn Acknowledger> = recorder.clone();
        move |_| Some(recorder.clone())
    }

    /// Under a queue that never runs dry, with handlers that finish at
    /// once, one poll handles [`BUDGET`] deliveries and yields (asking to be
    /// polled again), and the stats hook runs every [`BUSY_IDLE`] yields.
    #[test]
    fn a_full_queue_yields_after_the_budget() {
        for concurrency in [1, 256] {
            let handled = Arc::new(AtomicU64::new(0));
            let observer = Counting::default();
            let (_stop, stopped) = watch::channel(Stop::default());
            let mut engine = Box::pin(run(
                full_queue(100_000, |_| None),
                concurrency,
                counting(&handled),
                stopped,
                observer.clone(),
                std::time::Duration::ZERO,
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
                observer.idles.load(Ordering::Relaxed),
                1,
                "concurrency {concurrency}"
            );
        }
    }

    /// Within its time slice, one poll goes on turn after turn: here, with
    /// a slice no run reaches, until the queue runs dry.
    #[test]
    fn a_poll_goes_on_while_its_slice_lasts() {
        let handled = Arc::new(AtomicU64::new(0));
        let observer = Counting::default();
        let (_stop, stopped) = watch::channel(Stop::default());
        let n = 10 * u64::from(BUDGET) + 3;
        let mut engine = Box::pin(run(
            full_queue(n, |_| None),
            1,
            counting(&handled),
            stopped,
            observer.clone(),
            std::time::Duration::from_secs(3600),
        ));
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(engine.poll_unpin(&mut cx).is_pending());
        assert_eq!(handled.load(Ordering::Relaxed), n);
        assert_eq!(observer.idles.load(Ordering::Relaxed), 1);
    }

    /// Once the queue runs dry, the loop waits, and tells its hook first.
    #[test]
    fn an_empty_queue_waits_and_publishes() {
        let handled = Arc::new(AtomicU64::new(0));
        let observer = Counting::default();
        let (_stop, stopped) = watch::channel(Stop::default());
        let mut engine = Box::pin(run(
            full_queue(10, |_| None),
            4,
            counting(&handled),
            stopped,
            observer.clone(),
            std::time::Duration::ZERO,
        ));
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(matches!(engine.poll_unpin(&mut cx), Poll::Pending));
        assert_eq!(handled.load(Ordering::Relaxed), 10);
        assert_eq!(observer.idles.load(Ordering::Relaxed), 1);
    }

    /// The deliveries handled in one turn are acked with one `multiple`
    /// ack, before the loop waits; a turn cut by the budget is acked before
    /// the loop yields.
    #[test]
    fn one_turn_is_one_multiple_ack() {
        let recorder = Arc::new(Recorder::default());
        let observer = Counting::default();
        let (_stop, stopped) = watch::channel(Stop::default());
        let n = u64::from(BUDGET) + 10;
        let mut engine = Box::pin(run(
            full_queue(n, through(&recorder)),
            1,
            |delivery| async move { Processed::Ack(delivery) },
            stopped,
            observer.clone(),
            std::time::Duration::ZERO,
        ));
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(engine.poll_unpin(&mut cx).is_pending());
        assert_eq!(*recorder.0.lock().unwrap(), [(u64::from(BUDGET), true)]);
        assert!(engine.poll_unpin(&mut cx).is_pending());
        assert_eq!(
            *recorder.0.lock().unwrap(),
            [(u64::from(BUDGET), true), (n, true)]
        );
        assert_eq!(observer.acked.load(Ordering::Relaxed), n);
    }

    /// Writes down the settles and the cancel it sees, in order; settles
    /// only through futures (no `ack_now`), as a transport with a round
    /// trip does.
    struct Logging {
        log: Arc<Mutex<Vec<String>>>,
        /// The consumer's feed: dropped by the cancel, which ends it.
        feed: Mutex<Option<futures::channel::mpsc::UnboundedSender<Result<Delivery>>>>,
    }

    #[async_trait]
    impl Acknowledger for Logging {
        async fn ack(&self, tag: u64, options: AckOptions) -> Result<()> {
            let multiple = if options.multiple { " and before" } else { "" };
            self.log
                .lock()
                .unwrap()
                .push(format!("ack {tag}{multiple}"));
            Ok(())
        }
        async fn nack(&self, tag: u64, _: NackOptions) -> Result<()> {
            self.log.lock().unwrap().push(format!("nack {tag}"));
            Ok(())
        }
    }

    #[async_trait]
    impl ConsumerControl for Logging {
        async fn cancel(&self) -> Result<()> {
            self.log.lock().unwrap().push("cancel".into());
            self.feed.lock().unwrap().take();
            Ok(())
        }
    }

    /// Acks that need a future go out in the turn too; a stop acks what
    /// was handled before it cancels the consumer, and what finishes while
    /// it drains as it finishes.
    #[tokio::test]
    async fn acks_on_their_way_go_out_before_the_cancel_and_during_the_drain() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (feed, deliveries) = futures::channel::mpsc::unbounded();
        let logging = Arc::new(Logging {
            log: log.clone(),
            feed: Mutex::new(Some(feed.clone())),
        });
        for tag in 1..=3 {
            let acker: Arc<dyn Acknowledger> = logging.clone();
            let d = Delivery::new(Message::new(&b"x"[..]), "", "q", false, tag, Some(acker));
            feed.unbounded_send(Ok(d)).unwrap();
        }
        drop(feed);
        let consumer = Consumer::new("tag".into(), "q".into(), Box::pin(deliveries), logging);
        let (stop, stopped) = watch::channel(Stop::default());
        let release = Arc::new(Notify::new());
        let observer = Counting::default();
        let mut engine = Box::pin(run(
            consumer,
            4,
            holding(3, &release),
            stopped,
            observer.clone(),
            std::time::Duration::ZERO,
        ));
        assert!(futures::poll!(engine.as_mut()).is_pending());
        assert_eq!(*log.lock().unwrap(), ["ack 2 and before"]);
        stop.send_modify(|s| {
            s.requested = true;
            s.deadline = Some(std::time::Duration::from_secs(60));
        });
        release.notify_one();
        let (ended, drained) = engine.await;
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(drained.finished, 1);
        assert_eq!(drained.abandoned, 0);
        assert_eq!(
            *log.lock().unwrap(),
            ["ack 2 and before", "cancel", "ack 3"]
        );
        assert_eq!(observer.acked.load(Ordering::Relaxed), 3);
    }

    /// A `multiple` ack covers only deliveries settled the same way (one
    /// channel): those of another (a consumer recovered on a new channel)
    /// are acked alone, and first.
    #[test]
    fn a_multiple_ack_stays_on_its_channel() {
        let (old, new) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let consumer = full_queue(4, {
            let (old, new) = (old.clone(), new.clone());
            move |tag| {
                let acker: Arc<dyn Acknowledger> = if tag <= 2 { old.clone() } else { new.clone() };
                Some(acker)
            }
        });
        let observer = Counting::default();
        let (_stop, stopped) = watch::channel(Stop::default());
        let mut engine = Box::pin(run(
            consumer,
            1,
            |delivery| async move { Processed::Ack(delivery) },
            stopped,
            observer.clone(),
            std::time::Duration::ZERO,
        ));
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(engine.poll_unpin(&mut cx).is_pending());
        assert_eq!(*old.0.lock().unwrap(), [(1, false), (2, false)]);
        assert_eq!(*new.0.lock().unwrap(), [(4, true)]);
        assert_eq!(observer.acked.load(Ordering::Relaxed), 4);
    }

    /// A `multiple` ack never covers a delivery still in hand: deliveries
    /// handled after it, below it in the queue, are acked alone until it
    /// is done.
    #[test]
    fn a_delivery_in_hand_is_never_covered() {
        let recorder = Arc::new(Recorder::default());
        let observer = Counting::default();
        let (_stop, stopped) = watch::channel(Stop::default());
        let release = Arc::new(Notify::new());
        let mut engine = Box::pin(run(
            full_queue(4, through(&recorder)),
            4,
            // Delivery 2 waits until released.
            holding(2, &release),
            stopped,
            observer.clone(),
            std::time::Duration::ZERO,
        ));
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(engine.poll_unpin(&mut cx).is_pending());
        // 1 alone, below 2 (a `multiple` of one is a plain ack); 3 and 4
        // one by one, above it.
        assert_eq!(
            *recorder.0.lock().unwrap(),
            [(1, false), (3, false), (4, false)]
        );
        release.notify_one();
        assert!(engine.poll_unpin(&mut cx).is_pending());
        assert_eq!(
            *recorder.0.lock().unwrap(),
            [(1, false), (3, false), (4, false), (2, false)]
        );
        assert_eq!(observer.acked.load(Ordering::Relaxed), 4);
    }
}
