//! The worker runtime: a service consuming one queue with a handler, with
//! explicit outcomes, two tiers of retries, a poison queue and graceful
//! shutdown, on every transport.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use bus_core::worker::{HandlerError, Job, RetryPolicy, Worker};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Transcribe {
//!     language: String,
//! }
//!
//! # async fn example(conn: std::sync::Arc<dyn bus_core::Connection>) -> bus_core::Result<()> {
//! let worker = Worker::builder(conn, "asr")
//!     .concurrency(4)
//!     .retry(
//!         RetryPolicy::default()
//!             .immediate(2)
//!             .delayed([Duration::from_secs(5), Duration::from_secs(60)]),
//!     )
//!     .handle(|job: Job<Transcribe>| async move {
//!         if job.body.language.is_empty() {
//!             return Err(HandlerError::permanent("no language"));
//!         }
//!         Ok(())
//!     })
//!     .await?;
//! // ... later, or on Ctrl-C (see `shutdown_signal`):
//! let report = worker.shutdown(Duration::from_secs(30)).await?;
//! println!("{report:?}");
//! # Ok(())
//! # }
//! ```
//!
//! # Outcomes
//! What the handler returns decides how the delivery is settled:
//! - `Ok(())` acks it (see [Acks](#acks) for when);
//! - a transient failure ([`HandlerError::transient`], any other error, a
//!   panic) is retried: first in process, after an exponential backoff with
//!   jitter ([`RetryPolicy::immediate`]); then through the broker after each
//!   of [`RetryPolicy::delayed`]'s delays (the message is republished to a
//!   delay queue and the delivery acked, so a worker restart loses nothing);
//!   once every attempt is used, it is poisoned (and at once, as
//!   `exhausted`, when the delay queue refuses the retry for good, e.g. a
//!   queue of that name declared by someone else with other arguments, or
//!   by a version of this library whose delay queues did not expire (see
//!   [Delay queues](#delay-queues)): requeueing it would loop);
//! - a permanent failure ([`HandlerError::permanent`]), a body that does not
//!   decode as the handler's type, and a message that arrives with its
//!   attempts already used up go to the poison queue at once.
//!
//! The poison queue is `<queue>.error` (declared durable) unless
//! [`WorkerBuilder::dead_letter_exchange`] names an exchange of the user's.
//! A poisoned message keeps its body and properties and gains the headers
//! [`REASON_HEADER`], [`ERROR_HEADER`], [`ATTEMPTS_HEADER`],
//! [`ORIGINAL_EXCHANGE_HEADER`], [`ORIGINAL_ROUTING_KEY_HEADER`],
//! [`FAILED_AT_HEADER`] and [`WORKER_HEADER`] ([`FailureReport::of`] reads
//! them back, with the broker's `x-death` history). A poisoned message is published
//! (and confirmed) before its delivery is acked, so nothing is lost:
//! - if that publish fails for a reason that can pass (the connection was
//!   lost, the broker nacked it or holds publishers back), the delivery is
//!   requeued and handled again later;
//! - if the destination refuses it for good (a dead-letter exchange that
//!   routes it nowhere: the poison publish is mandatory; a poison queue
//!   deleted meanwhile), the message goes to the fallback queue instead:
//!   the worker's poison queue, declared again, or `<queue>.error` for a
//!   dead-letter exchange, with [`POISON_REFUSED_HEADER`] saying why. So a
//!   broken poison destination never sends a message round the queue again
//!   and again;
//! - if the fallback fails for good too (the broker refuses the
//!   declaration), the delivery is rejected without requeue: the queue's
//!   own dead-lettering applies, or the broker drops it. That is logged as
//!   an error and counted in [`WorkerStats::unsettled`].
//!
//! The attempt count travels in the [`ATTEMPTS_HEADER`] header of the
//! retried message, so it survives delay queues and restarts. A redelivery
//! (a worker died mid-message, an unsettled delivery was dropped) does not
//! count as an attempt.
//!
//! # Delay queues
//! A delayed retry waits in the queue `<queue>.delay.<ms>ms`, one per
//! distinct delay, whose uniform TTL dead-letters it back to the worker's
//! queue through the default exchange; the message is published to the
//! fanout exchange of the same name, bound to that queue.
//! [`publish_delayed`] uses the same mechanism with queues
//! `bus.delay.<ms>ms[.<exchange>]` ([`DELAY_PREFIX`]): every message of a
//! delay queue has the same TTL, so none waits behind a later one.
//!
//! Where the transport offers queue expiry (RabbitMQ, the
//! in-process broker), a delay queue no retry has used for `delay +
//! linger` is deleted by the broker, and its auto-delete exchange with it,
//! so delays that are no longer used leave nothing behind; the linger is
//! the longer of the delay and [`DEFAULT_DELAY_LINGER`] unless
//! [`WorkerBuilder::delay_options`] sets it. A worker declares a delay
//! queue before its first retry and again before any retry more than
//! `linger / 2` after its last declaration ([`publish_delayed`] before
//! every message). The broker counts declarations and consumers, not
//! publishes, as use of a queue, and drops the messages of a queue it
//! deletes; hence the declarations: a message is never published to a
//! delay queue that could expire before the message is due. The queue
//! lives at least `delay + linger` after that declaration, the message is
//! due at most `delay + linger / 2` after it, and the other half of the
//! linger is the margin for the broker's lag. The publish is mandatory: should the queue be
//! gone all the same (deleted by hand), the message comes back instead of
//! being dropped, and the worker declares the queue again and publishes
//! once more. On the folder transport, which has no queue expiry, delay
//! queues and their exchanges are permanent.
//!
//! Upgrading from a version whose delay queues did not expire: RabbitMQ
//! refuses the new declaration of an existing delay queue
//! (`PRECONDITION_FAILED`, inequivalent `x-expires`) and of its exchange
//! (`auto_delete`): the worker poisons such retries as `exhausted`, and
//! [`publish_delayed`] fails. Stop the old workers and publishers, let
//! each old delay queue (`<queue>.delay.<ms>ms`, `bus.delay.<ms>ms[...]`)
//! empty, delete it and its exchange (`bus delete queue <name> --if-empty`,
//! `bus delete exchange <name>`), then start the new ones. The folder
//! transport's delay queues are declared as before: nothing to migrate.
//!
//! # Crash loops
//! A handler that kills its process (an abort, the OOM killer) leaves no
//! attempt behind: the broker redelivers the message with `redelivered`
//! set, and the next worker runs it again, for ever. The worker does not
//! count such redeliveries as attempts, because it cannot tell them from
//! harmless ones: a graceful shutdown requeues the deliveries the transport
//! had sent ahead but no handler had started, and a lost connection
//! requeues those in hand, all with `redelivered` set; counting them would
//! poison messages that never failed. The handler can see
//! [`Job::redelivered`] and decide. The broker-side answer is a quorum
//! queue with a delivery limit
//! ([`QueueArguments::delivery_limit`](crate::QueueArguments::delivery_limit),
//! through [`WorkerBuilder::queue_options`]): the broker counts every
//! return of a message to the queue (a requeue, a lost connection or
//! channel, whatever ended the delivery), shows it as `x-delivery-count` on
//! the redelivery, and dead-letters the message (reason `delivery_limit`)
//! once it has come back more than that many times. The harmless returns
//! count too, so leave room for them in the limit. RabbitMQ and the
//! in-process broker (bus-local) both do this, so a crash-loop protection
//! can be tested in process; the folder transport (bus-file) keeps no
//! delivery count and refuses `x-delivery-limit` with
//! [`Error::NotSupported`](crate::Error::NotSupported) (as it refuses
//! quorum queues) rather than ignore it.
//!
//! # Concurrency
//! A worker runs up to [`WorkerBuilder::concurrency`] handlers at once, all
//! on the worker's own task: no task is spawned per message, which keeps
//! its cost per message close to a hand-written consume-and-ack loop (see
//! `docs/BENCHMARKS.md`). The handlers are concurrent, not parallel: one
//! that awaits I/O lets the others run, one that computes holds them up.
//! CPU-heavy handlers run on tokio's blocking pool
//! ([`WorkerBuilder::handle_blocking`]), or spawn their own task.
//!
//! # Acks
//! The deliveries handled successfully in one turn of the worker's loop
//! are acked together, with one `multiple` ack, the way RabbitMQ
//! recommends acking at a high rate. A turn ends when the loop has nothing
//! left to do without waiting (no delivery ready, no handler able to go
//! on), and after at most 128 deliveries; the acks go out before it waits
//! or yields. So a handled message is acked in the turn its handler
//! returns in, and never left unacked while the worker sleeps. The saving
//! is for handlers that finish without waiting, under a steady load: many
//! of them make one turn, acked at once. A handler that awaits I/O is
//! usually acked alone, as soon as it returns. The `multiple` ack never
//! covers a delivery still in hand (being handled, retried in process, or
//! settled another way) nor one of another channel: deliveries handled
//! while an earlier one is still in hand are acked one by one. A worker
//! that dies between handling a message and its turn's ack has it
//! redelivered, as it would if the ack were lost with the connection:
//! handlers must be idempotent either way (at-least-once delivery).
//! [`WorkerStats::handled`] counts a message once its ack went out.
//!
//! # Handlers and tower
//! A handler is an async function of a [`Job`] ([`WorkerBuilder::handle`]
//! and its siblings), or any [`tower::Service`] from [`Job`] (the raw
//! message) to `()` ([`WorkerBuilder::service`]), so tower's layers
//! (timeout, rate and concurrency limits, load shedding) apply unchanged:
//! wrap the function with `tower::service_fn` and layer it. A function is
//! called in place for each job; a service is cloned for each job and
//! called once ready, as tower's services are. Either way a panic is
//! caught as the attempt's transient failure. A service's error is
//! classified by [`HandlerError::classify`]: a [`HandlerError`] or an
//! [`Error`](crate::Error) keeps its kind, anything else (a timeout, an
//! overloaded service) is transient.

mod delay;
pub(crate) mod engine;
mod job;
mod poison;
mod policy;
mod runtime;
mod shutdown;

pub use delay::{
    publish_delayed, publish_delayed_with, DelayOptions, DEFAULT_DELAY_LINGER, DELAY_PREFIX,
    MIN_DELAY_LINGER,
};
pub use job::{HandlerError, Job};
pub use poison::{
    Death, FailureReport, PoisonReason, ATTEMPTS_HEADER, ERROR_HEADER, FAILED_AT_HEADER,
    ORIGINAL_EXCHANGE_HEADER, ORIGINAL_ROUTING_KEY_HEADER, POISON_REFUSED_HEADER, REASON_HEADER,
    WORKER_HEADER,
};
pub use policy::RetryPolicy;
pub use runtime::{Worker, WorkerBuilder, WorkerStats};
pub use shutdown::{shutdown_signal, Host, ShutdownReport, Stopper};
