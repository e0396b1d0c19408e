//! The worker: builder, running handle, and what happens to each delivery.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::delay::{DelayOptions, Delays};
use super::engine::{self, Drained, Observer, Processed, Stop};
use super::job::{HandlerError, Job, Kind};
use super::poison::{self, PoisonReason, Poisoning};
use super::policy::RetryPolicy;
use super::shutdown::{ShutdownReport, Stopper};
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::message::{Message, SharedStr};
use crate::rpc::panic_message;
use crate::topology::{QueueOptions, DEFAULT_EXCHANGE};
use crate::transport::{Connection, ConsumeOptions, PublishOptions};
use crate::value::FieldValue;
use crate::Requeue;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a worker has done so far. Counts only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Messages handled successfully and acked.
    pub handled: u64,
    /// Handler runs that failed (each attempt counts, panics included).
    pub failures: u64,
    /// In-process retries made.
    pub retried: u64,
    /// Messages sent to a delay queue for a retry through the broker.
    pub delayed: u64,
    /// Messages sent to the poison queue.
    pub poisoned: u64,
    /// Deliveries that could not be settled as decided: the ack, the
    /// delayed retry or the poison publish failed, and the transport gives
    /// them back to the queue; or the poison destination and its fallback
    /// both refused the message, and it was rejected without requeue (see
    /// [the module docs](super)).
    pub unsettled: u64,
}

/// Where poisoned messages go.
#[derive(Clone, Debug)]
enum PoisonTo {
    /// `<queue>.error` or another queue, declared durable by the worker.
    Queue(Option<String>),
    /// An exchange of the user's, with the message's routing key.
    Exchange(String),
}

/// Starts a [`Worker`]: the queue, how it is declared, prefetch and
/// concurrency, the retry policy, where poisoned messages go, and finally
/// the handler.
#[must_use = "a builder does nothing until one of its handle methods is called"]
pub struct WorkerBuilder {
    conn: Arc<dyn Connection>,
    queue: String,
    queue_options: QueueOptions,
    prefetch: Option<u16>,
    concurrency: usize,
    policy: RetryPolicy,
    poison: PoisonTo,
    identity: Option<String>,
    delay_options: DelayOptions,
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("queue", &self.queue)
            .field("queue_options", &self.queue_options)
            .field("prefetch", &self.prefetch)
            .field("concurrency", &self.concurrency)
            .field("policy", &self.policy)
            .field("poison", &self.poison)
            .field("delay_options", &self.delay_options)
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    /// How the queue is declared; durable unless set.
    /// [`QueueOptions::passive`] only checks that it exists.
    pub fn queue_options(mut self, options: QueueOptions) -> Self {
        self.queue_options = options;
        self
    }

    /// How many handlers run at once; 1 unless set. They run concurrently
    /// on the worker's own task (no task is spawned per message), not in
    /// parallel: a handler that computes for long belongs on the blocking
    /// pool ([`WorkerBuilder::handle_blocking`]) or in a task of its own.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// The consumer's prefetch (unacked deliveries the transport may hand
    /// over ahead); the concurrency unless set (0: unlimited).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch);
        self
    }

    /// The retry policy; [`RetryPolicy::default`] unless set.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The poison queue, `<queue>.error` unless set; declared durable when
    /// the worker starts.
    pub fn error_queue(mut self, queue: impl Into<String>) -> Self {
        self.poison = PoisonTo::Queue(Some(queue.into()));
        self
    }

    /// Sends poisoned messages to this exchange (which must exist), with
    /// their routing key, instead of a poison queue. A message it refuses
    /// (routes to no queue, or the exchange is gone) goes to `<queue>.error`
    /// instead, with [`POISON_REFUSED_HEADER`](super::POISON_REFUSED_HEADER)
    /// saying why.
    pub fn dead_letter_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.poison = PoisonTo::Exchange(exchange.into());
        self
    }

    /// The worker's name in the poison headers; `<queue>@<process id>` with
    /// a random suffix unless set.
    pub fn identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// How the delay queues of [`RetryPolicy::delayed`] are declared (how
    /// long an idle one lingers before the broker deletes it; see
    /// [`DelayOptions`]); `DelayOptions::default()` unless set. Every
    /// worker of one queue must use the same options: the broker refuses a
    /// delay queue declared with another expiry.
    pub fn delay_options(mut self, options: DelayOptions) -> Self {
        self.delay_options = options;
        self
    }

    /// Handles typed jobs with an async function: the body is decoded from
    /// msgpack, or JSON when its content type says so; a body that does
    /// not decode (trailing bytes included) is poisoned without running the
    /// handler.
    ///
    /// # Errors
    /// As [`WorkerBuilder::service`].
    pub async fn handle<T, F, Fut, E>(self, handler: F) -> Result<Worker>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Job<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<HandlerError> + Send + 'static,
    {
        self.start(TypedFn(handler, PhantomData)).await
    }

    /// Handles raw jobs (the body as bytes) with an async function.
    ///
    /// # Errors
    /// As [`WorkerBuilder::service`].
    pub async fn handle_raw<F, Fut, E>(self, handler: F) -> Result<Worker>
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<HandlerError> + Send + 'static,
    {
        self.start(RawFn(handler)).await
    }

    /// Handles typed jobs with a blocking function, run on tokio's blocking
    /// thread pool so that CPU-heavy work does not stall the runtime.
    /// Otherwise as [`WorkerBuilder::handle`].
    ///
    /// # Errors
    /// As [`WorkerBuilder::service`].
    pub async fn handle_blocking<T, F, E>(self, handler: F) -> Result<Worker>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Job<T>) -> std::result::Result<(), E> + Send + Sync + 'static,
        E: Into<HandlerError> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.service(tower::service_fn(move |job: Job| {
            let handler = handler.clone();
            async move {
                let job = job.decode::<T>()?;
                match tokio::task::spawn_blocking(move || handler(job)).await {
                    Ok(result) => result.map_err(Into::into),
                    Err(join) if join.is_panic() => {
                        Err(HandlerError::transient(panic_message(&*join.into_panic())))
                    }
                    Err(_) => Err(HandlerError::transient("the handler was cancelled")),
                }
            }
        }))
        .await
    }

    /// Handles raw jobs with a [`tower::Service`], so that tower's layers
    /// apply. Each job runs on a clone of the service, after the service is
    /// ready; its error is classified by [`HandlerError::classify`]. (The
    /// other handle methods call their function in place, with no service
    /// to clone per job; their outcomes are the same.)
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a concurrency of 0;
    /// [`Error::NotSupported`] outside a tokio runtime; whatever declaring
    /// the queues or consuming reports.
    pub async fn service<S>(self, service: S) -> Result<Worker>
    where
        S: Service<Job, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.start(Tower(service)).await
    }

    /// Starts the worker with `handler` running its jobs.
    async fn start(self, handler: impl Handler) -> Result<Worker> {
        if self.concurrency == 0 {
            return Err(Error::InvalidArgument(format!(
                "worker for queue '{}': concurrency must be at least 1, got 0",
                self.queue
            )));
        }
        self.delay_options.check()?;
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| u16::try_from(self.concurrency).unwrap_or(u16::MAX));
        let conn = self.conn;
        let info = conn.declare_queue(&self.queue, self.queue_options).await?;
        let queue = info.name;
        let poison = match self.poison {
            PoisonTo::Queue(name) => {
                let name = name.unwrap_or_else(|| format!("{queue}.error"));
                conn.declare_queue(&name, QueueOptions::durable()).await?;
                (DEFAULT_EXCHANGE.to_owned(), Some(name))
            }
            PoisonTo::Exchange(exchange) => (exchange, None),
        };
        let identity = self.identity.unwrap_or_else(|| {
            let suffix = uuid::Uuid::new_v4().simple().to_string();
            format!("{queue}@{}.{}", std::process::id(), &suffix[..8])
        });
        let system = engine::system(&*conn);
        let stats = Stats::new(&queue);
        let (tx, published) = watch::channel(WorkerStats::default());
        let ctx = Ctx {
            conn: conn.clone(),
            delays: Delays::new(format!("{queue}.delay"), self.delay_options),
            queue: queue.clone(),
            handler,
            policy: self.policy,
            fallback_queue: poison.1.clone().unwrap_or_else(|| format!("{queue}.error")),
            poison_exchange: poison.0,
            poison_queue: poison.1,
            identity,
            system,
            stats: stats.clone(),
        };
        let consumer = conn
            .consume(&queue, ConsumeOptions::prefetch(prefetch))
            .await?;
        let (stop, stopped) = watch::channel(Stop::default());
        let concurrency = self.concurrency;
        let observer = Publisher {
            stats: stats.clone(),
            tx,
        };
        let task = engine::spawn_on_current(&format!("worker for queue '{queue}'"), async move {
            // The task owns the context, and each delivery's future borrows
            // it: no reference count to touch per message.
            let ctx = &ctx;
            let process = |delivery| ctx.process(delivery);
            engine::run(
                consumer,
                concurrency,
                process,
                stopped,
                observer,
                engine::SLICE,
            )
            .await
        })?;
        tracing::debug!(
            queue,
            prefetch,
            concurrency = self.concurrency,
            "worker started"
        );
        Ok(Worker {
            queue,
            stop: Arc::new(stop),
            task: Some(task),
            stats,
            published,
        })
    }
}

/// A running worker: consumes its queue and settles each delivery by its
/// handler's outcome (see [the module docs](super)).
///
/// Start one with [`Worker::builder`]. It runs as tokio tasks until
/// [`Worker::shutdown`], until its connection goes away, or until the handle
/// is dropped (which stops it gracefully in the background, waiting for the
/// handlers in hand).
#[derive(Debug)]
pub struct Worker {
    queue: String,
    stop: Arc<watch::Sender<Stop>>,
    task: Option<JoinHandle<(Result<()>, Drained)>>,
    stats: Arc<Stats>,
    /// The snapshots the engine publishes.
    published: watch::Receiver<WorkerStats>,
}

impl Worker {
    /// Starts building a worker of `queue` on `conn`. An empty name asks the
    /// transport for a generated one ([`Worker::queue`] tells it).
    pub fn builder(conn: Arc<dyn Connection>, queue: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            conn,
            queue: queue.into(),
            queue_options: QueueOptions::durable(),
            prefetch: None,
            concurrency: 1,
            policy: RetryPolicy::default(),
            poison: PoisonTo::Queue(None),
            identity: None,
            delay_options: DelayOptions::default(),
        }
    }

    /// The queue served.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// What the worker has done so far. Each count is exact; read while
    /// handlers run, two counts may be a few messages apart (each is
    /// updated on its own). [`Worker::wait_until`] sees them as the worker
    /// publishes them, together, once per turn.
    #[must_use]
    pub fn stats(&self) -> WorkerStats {
        self.stats.snapshot()
    }

    /// Waits until `done` holds for the worker's stats (checked now and
    /// after every change), and returns them; for tests and supervisors.
    ///
    /// # Errors
    /// [`Error::Closed`] if the worker stopped before `done` held.
    pub async fn wait_until(
        &self,
        mut done: impl FnMut(&WorkerStats) -> bool,
    ) -> Result<WorkerStats> {
        let mut stats = self.published.clone();
        let result = stats.wait_for(|s| done(s)).await.map(|s| *s);
        result.map_err(|_| Error::Closed(format!("the worker of queue '{}' stopped", self.queue)))
    }

    /// A handle that stops the worker from anywhere (a signal handler,
    /// another task) while this one waits on [`Worker::wait`].
    #[must_use]
    pub fn stopper(&self) -> Stopper {
        Stopper {
            stop: self.stop.clone(),
        }
    }

    /// Whether the worker has stopped.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops gracefully: consumes no more (deliveries the transport had
    /// sent ahead are requeued), lets the handlers in hand finish within
    /// `deadline`, stops the others (their deliveries are requeued), and
    /// reports what it did.
    ///
    /// # Errors
    /// What stopped the worker earlier if it stopped on its own (the
    /// connection was lost, the queue deleted).
    pub async fn shutdown(self, deadline: Duration) -> Result<ShutdownReport> {
        self.stopper().stop(deadline);
        self.wait().await
    }

    /// Waits until the worker stops: asked to through a [`Stopper`], or on
    /// its own because its connection was closed or lost or its queue
    /// deleted (handlers in hand are finished first).
    ///
    /// # Errors
    /// What stopped it, if it stopped on its own.
    pub async fn wait(mut self) -> Result<ShutdownReport> {
        let task = self.task.take();
        let (ended, drained) = match task {
            None => (Ok(()), Drained::default()),
            Some(task) => task.await.unwrap_or_else(|e| {
                (
                    Err(Error::Closed(format!("the worker's task failed: {e}"))),
                    Drained::default(),
                )
            }),
        };
        ended?;
        let report = ShutdownReport {
            queue: self.queue.clone(),
            requeued: drained.requeued,
            finished: drained.finished,
            abandoned: drained.abandoned,
            stats: self.stats(),
        };
        tracing::debug!(?report, "worker stopped");
        Ok(report)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.send_modify(|s| s.requested = true);
    }
}

/// One of a worker's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stat {
    Handled,
    Failures,
    Retried,
    Delayed,
    Poisoned,
    Unsettled,
}

impl Stat {
    /// Every counter, in the order of [`Stats::counters`].
    #[cfg(feature = "metrics")]
    const ALL: [Stat; 6] = [
        Stat::Handled,
        Stat::Failures,
        Stat::Retried,
        Stat::Delayed,
        Stat::Poisoned,
        Stat::Unsettled,
    ];

    /// The name of its `metrics` counter.
    #[cfg(feature = "metrics")]
    fn metric(self) -> &'static str {
        match self {
            Stat::Handled => "bus_worker_handled_total",
            Stat::Failures => "bus_worker_failures_total",
            Stat::Retried => "bus_worker_retried_total",
            Stat::Delayed => "bus_worker_delayed_total",
            Stat::Poisoned => "bus_worker_poisoned_total",
            Stat::Unsettled => "bus_worker_unsettled_total",
        }
    }
}

/// A worker's statistics as its handlers update them: one atomic counter
/// each, so a handled message costs an atomic add, not a lock. Updates do
/// not wake the waiters of [`Worker::wait_until`] one by one: the engine
/// publishes a snapshot whenever it is about to wait or yield (see
/// [`Publisher`]), so a waiter is woken once per burst of messages, and
/// [`Worker::stats`] reads the counters themselves.
struct Stats {
    counters: [AtomicU64; 6],
    /// The `metrics` counters, `bus_worker_<stat>_total` labelled with the
    /// queue, in [`Stat`] order, and the handling-time histogram,
    /// `bus_worker_handling_seconds`: registered once, when the worker
    /// starts, with the recorder installed then.
    #[cfg(feature = "metrics")]
    exported: ([metrics::Counter; 6], metrics::Histogram),
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl Stats {
    fn new(queue: &str) -> Arc<Self> {
        #[cfg(not(feature = "metrics"))]
        let _ = queue;
        #[cfg(feature = "metrics")]
        let exported = {
            let counter =
                |stat: Stat| metrics::counter!(stat.metric(), "queue" => queue.to_owned());
            (
                Stat::ALL.map(counter),
                metrics::histogram!("bus_worker_handling_seconds", "queue" => queue.to_owned()),
            )
        };
        Arc::new(Stats {
            counters: Default::default(),
            #[cfg(feature = "metrics")]
            exported,
        })
    }

    /// Counts `n` more of `stat`, and adds them to its `metrics` counter,
    /// `bus_worker_<stat>_total` labelled with the queue.
    fn add(&self, stat: Stat, n: u64) {
        self.counters[stat as usize].fetch_add(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.exported.0[stat as usize].increment(n);
    }

    /// The counters now. Each is exact; read while handlers run, two of
    /// them may be one message apart.
    fn snapshot(&self) -> WorkerStats {
        let read = |stat: Stat| self.counters[stat as usize].load(Ordering::Relaxed);
        WorkerStats {
            handled: read(Stat::Handled),
            failures: read(Stat::Failures),
            retried: read(Stat::Retried),
            delayed: read(Stat::Delayed),
            poisoned: read(Stat::Poisoned),
            unsettled: read(Stat::Unsettled),
        }
    }
}

/// Publishes a worker's statistics to the waiters of
/// [`Worker::wait_until`]. Owned by the worker's task: when the task ends,
/// however it ends, the waiters learn that the worker stopped.
struct Publisher {
    stats: Arc<Stats>,
    tx: watch::Sender<WorkerStats>,
}

/// The engine tells a worker's statistics what it acked, and when to
/// publish them.
impl Observer for Publisher {
    /// Wakes the waiters if anything changed since the last call.
    fn idle(&self) {
        let now = self.stats.snapshot();
        self.tx.send_if_modified(|published| {
            let changed = *published != now;
            *published = now;
            changed
        });
    }

    fn acked(&self, count: u64, result: &Result<()>) {
        // Logged as every engine's acks are.
        ().acked(count, result);
        if result.is_err() {
            self.stats.add(Stat::Unsettled, count);
        }
        self.stats.add(Stat::Handled, count);
    }
}

/// The last snapshot goes out with the task, however it ends (a panic or
/// an abort included): a waiter whose condition the final counters meet
/// gets them rather than an error.
impl Drop for Publisher {
    fn drop(&mut self) {
        self.idle();
    }
}

/// What runs a worker's jobs: a tower service, or a function called in
/// place.
trait Handler: Send + Sync + 'static {
    /// Runs `job`. The future does the work, the handler's own call
    /// included, so that a panic anywhere in it is caught as the job's.
    fn call(
        &self,
        job: Job,
    ) -> impl Future<Output = std::result::Result<(), HandlerError>> + Send + '_;
}

/// A tower service, cloned for each job as tower's services are called
/// concurrently; readiness is awaited before the call.
struct Tower<S>(S);

impl<S> Handler for Tower<S>
where
    S: Service<Job, Response = ()> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    async fn call(&self, job: Job) -> std::result::Result<(), HandlerError> {
        // Cloned inside the future, where a panic is the job's. `oneshot`
        // keeps the job and the service's future in one place.
        self.0
            .clone()
            .oneshot(job)
            .await
            .map_err(|e| HandlerError::classify(e.into()))
    }
}

/// An async function of raw jobs. Borrowed for each job: no service to
/// clone, no readiness to poll.
struct RawFn<F>(F);

impl<F, Fut, E> Handler for RawFn<F>
where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<HandlerError> + Send + 'static,
{
    async fn call(&self, job: Job) -> std::result::Result<(), HandlerError> {
        (self.0)(job).await.map_err(Into::into)
    }
}

/// An async function of typed jobs: a body that does not decode is the
/// job's undecodable failure, and the function does not run.
struct TypedFn<T, F>(F, PhantomData<fn() -> T>);

impl<T, F, Fut, E> Handler for TypedFn<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(Job<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<HandlerError> + Send + 'static,
{
    async fn call(&self, job: Job) -> std::result::Result<(), HandlerError> {
        (self.0)(job.decode::<T>()?).await.map_err(Into::into)
    }
}

/// Everything a worker's deliveries are processed with.
struct Ctx<H> {
    conn: Arc<dyn Connection>,
    queue: String,
    handler: H,
    policy: RetryPolicy,
    delays: Delays,
    /// Poisoned messages are published here, with the routing key
    /// `poison_queue` or else their own.
    poison_exchange: String,
    poison_queue: Option<String>,
    /// Where a message goes when its poison destination refuses it for
    /// good: the poison queue (declared again), or `<queue>.error`.
    fallback_queue: String,
    identity: String,
    system: &'static str,
    stats: Arc<Stats>,
}

impl<H: Handler> Ctx<H> {
    fn count(&self, stat: Stat) {
        self.stats.add(stat, 1);
    }

    /// The future that processes one delivery. Kept small (no wrapper
    /// around `settle`, the failure paths boxed): the engine moves it once
    /// per delivery.
    fn process(&self, delivery: Delivery) -> impl Future<Output = Processed> + '_ {
        let props = &delivery.message.properties;
        let text = |name: &str| {
            props
                .headers
                .get(name)
                .and_then(FieldValue::as_str)
                .map(SharedStr::from)
        };
        // A delayed retry comes back through the delay queue: its headers
        // name where the message was first published.
        let exchange = text(poison::ORIGINAL_EXCHANGE_HEADER);
        let routing_key = text(poison::ORIGINAL_ROUTING_KEY_HEADER);
        let prior = poison::attempts(&props.headers).unwrap_or(0);
        let span = engine::process_span(
            self.system,
            &self.queue,
            &delivery,
            routing_key.as_deref().unwrap_or(&delivery.routing_key),
            Some(prior + 1),
        );
        self.settle(delivery, exchange, routing_key, prior)
            .instrument(span)
    }

    async fn settle(
        &self,
        delivery: Delivery,
        exchange: Option<SharedStr>,
        routing_key: Option<SharedStr>,
        prior: u32,
    ) -> Processed {
        // Where the message was first published: as the headers say, or else
        // as the delivery does.
        let exchange = exchange.as_ref().unwrap_or(&delivery.exchange);
        let routing_key = routing_key.as_ref().unwrap_or(&delivery.routing_key);
        let max = self.policy.max_attempts();
        if prior >= max {
            let error =
                format!("it arrived with {prior} attempts made, and the policy allows {max}");
            // The failure paths are boxed: their futures are large, and
            // would otherwise make every delivery's future as large.
            Box::pin(self.poison(
                &delivery,
                PoisonReason::Exhausted,
                &error,
                prior,
                exchange,
                routing_key,
            ))
            .await;
            return Processed::Settled;
        }
        let round = prior / self.policy.attempts_per_round();
        let mut attempt = prior + 1;
        let mut retry = 0;
        loop {
            let job = Job {
                body: delivery.message.body.clone(),
                properties: delivery.message.properties.clone(),
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                redelivered: delivery.redelivered,
                attempt,
                conn: self.conn.clone(),
            };
            #[cfg(feature = "metrics")]
            let started = std::time::Instant::now();
            let result = self.call(job).await;
            #[cfg(feature = "metrics")]
            self.stats
                .exported
                .1
                .record(started.elapsed().as_secs_f64());
            let error = match result {
                // The engine acks it, with the others handled in its turn.
                Ok(()) => return Processed::Ack(delivery),
                Err(error) => error,
            };
            self.count(Stat::Failures);
            let reason = match error.kind {
                Kind::Permanent => PoisonReason::Permanent,
                Kind::Undecodable => PoisonReason::Undecodable,
                Kind::Transient if retry < self.policy.attempts_per_round() - 1 => {
                    let backoff = self.policy.backoff_for(retry);
                    tracing::debug!(attempt, error = %error, ?backoff, "retrying in process");
                    Box::pin(tokio::time::sleep(backoff)).await;
                    retry += 1;
                    attempt += 1;
                    self.count(Stat::Retried);
                    continue;
                }
                Kind::Transient => match self.policy.delay_after(round) {
                    Some(delay) => {
                        Box::pin(self.delay(
                            &delivery,
                            delay,
                            attempt,
                            &error,
                            exchange,
                            routing_key,
                        ))
                        .await;
                        return Processed::Settled;
                    }
                    None => PoisonReason::Exhausted,
                },
            };
            Box::pin(self.poison(
                &delivery,
                reason,
                &error.message,
                attempt,
                exchange,
                routing_key,
            ))
            .await;
            return Processed::Settled;
        }
    }

    /// Runs the handler on one job, a panic caught.
    fn call(
        &self,
        job: Job<Bytes>,
    ) -> impl Future<Output = std::result::Result<(), HandlerError>> + '_ {
        AssertUnwindSafe(self.handler.call(job))
            .catch_unwind()
            .map(|outcome| match outcome {
                Ok(result) => result,
                Err(panic) => Err(HandlerError::transient(panic_message(&*panic))),
            })
    }

    async fn delay(
        &self,
        delivery: &Delivery,
        delay: Duration,
        attempts: u32,
        error: &HandlerError,
        exchange: &str,
        routing_key: &str,
    ) {
        let mut message: Message = delivery.message.clone();
        let h = &mut message.properties.headers;
        h.insert(
            poison::ATTEMPTS_HEADER.into(),
            FieldValue::I64(i64::from(attempts)),
        );
        h.entry(poison::ORIGINAL_EXCHANGE_HEADER.into())
            .or_insert_with(|| exchange.into());
        h.entry(poison::ORIGINAL_ROUTING_KEY_HEADER.into())
            .or_insert_with(|| routing_key.into());
        crate::propagation::retrace(&mut message);
        tracing::debug!(attempts, error = %error, ?delay, "retrying through a delay queue");
        match self
            .delays
            .publish(&*self.conn, &self.queue, message, delay)
            .await
        {
            Ok(()) => {
                self.count(Stat::Delayed);
                self.settle_ack(delivery, "delayed for a retry").await;
            }
            Err(e) if e.is_temporary() => {
                tracing::warn!(error = %e, "could not delay a retry; requeueing the message");
                self.requeue(delivery).await;
            }
            Err(e) => {
                // A delay queue that cannot be had (declared by someone else
                // with other arguments, no permission) would refuse every
                // retry: requeueing would loop, so the message is poisoned.
                tracing::warn!(error = %e, "the delay queue refused a retry; poisoning the message");
                let text = format!("{error}; its delayed retry was refused: {e}");
                self.poison(
                    delivery,
                    PoisonReason::Exhausted,
                    &text,
                    attempts,
                    exchange,
                    routing_key,
                )
                .await;
            }
        }
    }

    async fn poison(
        &self,
        delivery: &Delivery,
        reason: PoisonReason,
        error: &str,
        attempts: u32,
        exchange: &str,
        routing_key: &str,
    ) {
        let mut message = delivery.message.clone();
        Poisoning {
            reason,
            error,
            attempts,
            exchange,
            routing_key,
            worker: &self.identity,
        }
        .mark(&mut message);
        crate::propagation::retrace(&mut message);
        let key = self.poison_queue.as_deref().unwrap_or(routing_key);
        tracing::warn!(
            reason = reason.as_str(),
            error,
            attempts,
            "poisoning a message"
        );
        let refused = match self
            .conn
            .publish(
                &self.poison_exchange,
                key,
                message.clone(),
                PublishOptions::mandatory(),
            )
            .await
        {
            Ok(()) => {
                self.count(Stat::Poisoned);
                return self.settle_ack(delivery, "poisoned").await;
            }
            Err(e) if e.is_temporary() => {
                tracing::warn!(error = %e, "could not publish to the poison queue; requeueing the message");
                return self.requeue(delivery).await;
            }
            Err(e) => e,
        };
        // Requeueing would bring the message back here for ever: send it to
        // the fallback queue instead.
        let fallback = &self.fallback_queue;
        tracing::warn!(
            error = %refused,
            fallback,
            "the poison destination refused a message; sending it to the fallback queue"
        );
        message.properties.headers.insert(
            poison::POISON_REFUSED_HEADER.into(),
            FieldValue::String(refused.to_string()),
        );
        let sent = match self
            .conn
            .declare_queue(fallback, QueueOptions::durable())
            .await
        {
            Ok(_) => {
                self.conn
                    .publish(
                        DEFAULT_EXCHANGE,
                        fallback,
                        message,
                        PublishOptions::mandatory(),
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => {
                self.count(Stat::Poisoned);
                self.settle_ack(delivery, "poisoned").await;
            }
            Err(e) if e.is_temporary() => {
                tracing::warn!(error = %e, "could not publish to the fallback queue; requeueing the message");
                self.requeue(delivery).await;
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    fallback,
                    "the fallback queue refused a poisoned message too; rejecting it without requeue"
                );
                self.count(Stat::Unsettled);
                if let Err(e) = delivery.nack(Requeue::No).await {
                    tracing::warn!(error = %e, "could not reject a message");
                }
            }
        }
    }

    async fn settle_ack(&self, delivery: &Delivery, what: &str) {
        if let Err(e) = delivery.ack().await {
            tracing::warn!(error = %e, "could not ack a message {what}");
            self.count(Stat::Unsettled);
        }
    }

    async fn requeue(&self, delivery: &Delivery) {
        self.count(Stat::Unsettled);
        if let Err(e) = delivery.nack(Requeue::Yes).await {
            tracing::warn!(error = %e, "could not requeue a message");
        }
    }
}
