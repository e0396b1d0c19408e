//! An in-process message broker that behaves like RabbitMQ 3.10 (AMQP
//! 0-9-1), for running messaging code in tests and single-process tools
//! without a broker.
//!
//! [`LocalBroker`] is the broker; [`LocalBroker::connect`] opens a
//! [`LocalConnection`], which implements [`bus_core::Connection`], so code
//! written against the transport contract runs on it unchanged. Several
//! connections to one broker are independent clients: exclusive queues,
//! exclusive consumers and consumer loss behave as they do across
//! connections to RabbitMQ. [`LocalBroker::named`] gives every part of a
//! process the same broker by name (`bus::connect("memory://NAME")` uses it).
//!
//! ```
//! use bus_core::{ConnectionExt, ConsumeOptions, Connection, Message, QueueOptions};
//! use bus_local::LocalBroker;
//! use futures::StreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> bus_core::Result<()> {
//! let broker = LocalBroker::new();
//! let conn = broker.connect();
//! conn.declare_queue("jobs", QueueOptions::default()).await?;
//! conn.send_to_queue("jobs", Message::new("resize 1.png")).await?;
//! let mut jobs = conn.consume("jobs", ConsumeOptions::prefetch(1)).await?;
//! let job = jobs.next().await.unwrap()?;
//! assert_eq!(&job.message.body[..], b"resize 1.png");
//! job.ack().await?;
//! assert_eq!(broker.queue_depth("jobs"), Some(0));
//! # Ok(())
//! # }
//! ```
//!
//! # What it implements
//! Everything the behaviour contract (`docs/SEMANTICS.md` in the repository)
//! lists, as RabbitMQ 3.10
//! does it, down to the error each mistake gets: the default and the
//! pre-declared `amq.*` exchanges; direct, fanout, topic and headers
//! exchanges (with `x-match` `all`, `any`, `all-with-x`, `any-with-x`);
//! alternate exchanges; `CC`/`BCC` sender-selected routing; server-named,
//! exclusive and auto-delete queues; FIFO delivery, round-robin among
//! consumers with free prefetch (consumer priorities via `x-priority`);
//! requeue to the original position with `redelivered`; dead-lettering with
//! `x-death` and `x-first-death-*` written as RabbitMQ writes them (cycles
//! without a rejection dropped), by [`bus_core::engine`], which the folder
//! transport shares; per-queue and per-message TTL (only the
//! head of a queue expires, as in RabbitMQ); `x-expires`; `x-max-length` and
//! `x-max-length-bytes` with `drop-head`, `reject-publish` and
//! `reject-publish-dlx`; priority queues; single active consumer; exclusive
//! consumers; mandatory publishes. Exchange types of broker plugins
//! ([`bus_core::ExchangeKind::Custom`]) are refused with
//! [`bus_core::Error::NotSupported`].
//!
//! A publish returns once every queue the message reached has taken it: that
//! is the publisher confirm. A queue full under `reject-publish` makes it
//! fail with [`bus_core::Error::Nacked`] (other queues still got their copy,
//! as with RabbitMQ).
//!
//! # Determinism
//! Nothing happens in the background except timers. A publish, ack, nack,
//! consume or cancel hands every message that can now be delivered to its
//! consumer before it returns, choosing consumers and queues in a fixed
//! order (consumers in RabbitMQ's rotation, queues by creation). So a test on
//! a current-thread runtime delivers the same messages to the same consumers
//! in the same order on every run. Time-based behaviour (TTL, `x-expires`)
//! runs on tokio's clock: under `#[tokio::test(start_paused = true)]` (which
//! needs tokio's `test-util` feature in the test's dev-dependencies) a
//! `tokio::time::sleep` moves through it instantly and exactly.
//!
//! # Test conveniences
//! - [`LocalBroker::wait_idle`]: resolves once every delivery handed to a
//!   consumer has been read from its stream, giving consumer tasks their turn
//!   to run.
//! - [`LocalBroker::queue_depth`] and [`LocalBroker::unacked_count`].
//! - [`LocalBroker::record_exchange`] and [`LocalBroker::published`]: what was
//!   published to an exchange, routed or not.
//!
//! # Simulated faults
//! [`LocalBroker::with_faults`] builds a broker that does to a service what
//! RabbitMQ does when something fails, by a [`FaultPlan`]: scripted at the
//! `n`th publish, ack, delivery or declaration ([`PublishFault`],
//! [`AckFault`]), drawn from a seed at given [`FaultRates`], or commanded
//! by the test ([`LocalBroker::close_connection`], [`LocalBroker::restart`]).
//!
//! - Closing a connection requeues its consumers' unacked deliveries with
//!   `redelivered` (settling them then fails with the permanent `Closed`),
//!   deletes its exclusive queues, and fails the publish in flight with the
//!   temporary [`bus_core::Error::ConnectionLost`] (the message was not
//!   taken).
//! - A lost ack succeeds for the caller but never reaches the queue; the
//!   connection then drops, so the message comes again (on RabbitMQ an ack
//!   is only lost with its connection).
//! - A lost confirm queues the message, drops the connection and fails the
//!   publish with `ConnectionLost`: a retry makes a duplicate.
//! - A restart drops every connection; durable exchanges, durable queues
//!   that are neither exclusive nor auto-delete, the bindings between them
//!   and their persistent messages survive; everything else vanishes.
//! - A delayed delivery holds that delivery, and those behind it on the same
//!   consumer, back on tokio's clock; a nacked publish fails with the
//!   temporary `Nacked`; a refused declaration or binding with the
//!   temporary `ResourceLocked`.
//!
//! Every fault, delivery and reconnection goes to the broker's [`Trace`]
//! ([`LocalBroker::trace`], printable). On a current-thread runtime the
//! same plan and the same scenario give the same trace: under a plan,
//! server-named queues and consumer tags are numbered instead of random.
//! `sim::Explorer` (feature `simulation`) runs a scenario under many
//! seeds and reports the first that breaks an invariant, with its trace
//! and a one-line replay.
//!
//! # Recovery
//! A connection of a broker with a fault plan (or opened with
//! [`LocalBroker::connect_with`]`(`[`Recovery::Enabled`]`)`) recovers as
//! bus-amqp's do on RabbitMQ, from the same journal
//! ([`bus_core::recovery::Journal`]): after the plan's reconnection delay
//! it gets a new link (a new [`LocalConnection::id`]), declares again the
//! exchanges, queues and bindings it declared (a server-named queue gets a
//! new name, [`bus_core::RecoveryEvent::QueueRenamed`], and every call
//! naming the old one goes to the new one), then resumes its consumers on
//! the same streams, their delivery tags going on growing. A consumer of an
//! exclusive queue first yields `Err(ConnectionLost)`: its messages died
//! with the queue. Calls made while the connection is down wait for it.
//! [`LocalConnection::events`] reports each step with the
//! [`bus_core::RecoveryEvent`]s bus-amqp reports. A connection opened with
//! [`Recovery::Disabled`] stays lost, as a process that died.
//!
//! Without a fault plan none of this costs anything: publish, consume and
//! ack take the same paths as before, behind a branch on a flag each.
//!
//! # Cost
//! The topology is behind one read-write lock taken only to route or change
//! it; each queue has its own lock, so publishes to unrelated queues do not
//! wait on each other. A message routed to several queues is one shared
//! allocation (the body is never copied); each delivery clones the
//! properties, when the consumer reads it from its stream rather than under
//! the queue's lock. A consumer is handed at most its prefetch of unacked
//! messages; the rest wait in the queue. (Auto-ack consumers ignore prefetch,
//! as in RabbitMQ, and take messages as fast as they are routed.) An ack
//! touches only its queue's lock. Acked messages with bodies up to 1 KiB
//! are freed by the queue's next publish rather than by the ack (at most
//! 128 per queue wait for it), so that memory goes back to the thread that
//! allocated it instead of making the allocator's locks bounce between a
//! publishing and a consuming thread.
//!
//! # Differences from RabbitMQ
//! - Nothing survives the process: `durable` and persistent messages are
//!   accepted and reported, not written anywhere
//!   (`Capabilities::durability` is false).
//! - `x-queue-type: quorum` is accepted with RabbitMQ's declaration rules
//!   (durable, not exclusive, not auto-delete, no priorities) and keeps a
//!   quorum queue's delivery count as RabbitMQ 3.10 does
//!   ([`bus_core::engine::delivery_limit`]): every return (a requeueing
//!   nack, a dropped consumer or connection with the message unsettled)
//!   counts, a redelivery carries `x-delivery-count`, and a message
//!   returned more times than its `x-delivery-limit` is dead-lettered with
//!   reason `delivery_limit` (dropped without a dead-letter exchange), so a
//!   crash loop ends here as on RabbitMQ (`Capabilities::delivery_limit`
//!   is true). Across [`LocalBroker::restart`] it keeps all its messages,
//!   persistent or not, as RabbitMQ does. Otherwise the queue behaves as a
//!   classic one: a requeued
//!   message goes back to its original position (a quorum queue puts it at
//!   the back), so `Capabilities::quorum_queues` is false. Stream queues
//!   are refused with `NotSupported`.
//! - There is no user: `user_id` is not checked against one.
//! - There are no channels: each consumer acts as if on its own channel, so
//!   delivery tags count from 1 per consumer. Dropping a consumer requeues
//!   its unsettled deliveries, as closing its channel would.
//! - No direct reply-to: [`Connection::reply_queue`](bus_core::Connection::reply_queue)
//!   declares an exclusive server-named queue.
//! - No exchange-to-exchange bindings.
//! - Queue and exchange names with a NUL character are refused
//!   ([`bus_core::Error::InvalidArgument`]), as every transport of this
//!   library refuses them (see [`bus_core::validate_name`]); RabbitMQ
//!   accepts them.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod broker;
mod connection;
mod consumer;
mod dead_letter;
mod declaration;
mod faults;
mod queue;
mod recovery;
#[cfg(feature = "simulation")]
pub mod sim;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use bus_core::sync::Mutex;
use bus_core::Message;

pub use connection::{LocalConnection, Recovery};
pub use faults::{
    AckFault, Fault, FaultPlan, FaultRates, PublishFault, Trace, TraceEntry, TraceEvent,
};

use broker::BrokerInner;

/// An in-process broker. Cloning gives another handle to the same broker; it
/// lives while a handle, a connection or a consumer does.
#[derive(Clone)]
pub struct LocalBroker {
    inner: Arc<BrokerInner>,
}

impl fmt::Debug for LocalBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBroker")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl Default for LocalBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalBroker {
    /// A new, empty broker with only the pre-declared exchanges.
    #[must_use]
    pub fn new() -> Self {
        LocalBroker {
            inner: Arc::new(BrokerInner::new(None, None)),
        }
    }

    /// A new, empty broker that injects the faults of `plan` and whose
    /// connections recover from them (see the crate documentation).
    #[must_use]
    pub fn with_faults(plan: FaultPlan) -> Self {
        LocalBroker {
            inner: Arc::new(BrokerInner::new(None, Some(faults::FaultState::new(plan)))),
        }
    }

    /// Whether the broker was built with a fault plan.
    #[must_use]
    pub fn has_faults(&self) -> bool {
        self.inner.faults.is_some()
    }

    /// The process-wide broker registered under `name`, created on first
    /// use: every call with the same name returns a handle to the same
    /// broker, for the life of the process.
    #[must_use]
    pub fn named(name: &str) -> Self {
        static REGISTRY: OnceLock<Mutex<HashMap<String, LocalBroker>>> = OnceLock::new();
        let mut registry = REGISTRY.get_or_init(Mutex::default).lock();
        registry
            .entry(name.to_owned())
            .or_insert_with(|| LocalBroker {
                inner: Arc::new(BrokerInner::new(Some(name.to_owned()), None)),
            })
            .clone()
    }

    /// Opens a connection to this broker. It recovers from being dropped
    /// when the broker has a fault plan ([`LocalBroker::with_faults`]).
    #[must_use]
    pub fn connect(&self) -> LocalConnection {
        let recovery = if self.inner.faults.is_some() {
            Recovery::Enabled
        } else {
            Recovery::Disabled
        };
        LocalConnection::new(self.inner.clone(), recovery)
    }

    /// Opens a connection that does or does not recover from being dropped
    /// by the broker, whether or not the broker has a fault plan.
    #[must_use]
    pub fn connect_with(&self, recovery: Recovery) -> LocalConnection {
        LocalConnection::new(self.inner.clone(), recovery)
    }

    /// Drops `conn` from the broker's side, as `rabbitmqctl
    /// close_connection` does on RabbitMQ: its consumers end and their
    /// unacked deliveries are requeued with `redelivered`, its exclusive
    /// queues go, and settling what it had received fails with the
    /// permanent `Closed`. A recovering connection comes back after the
    /// plan's reconnection delay (50 ms without a plan); another stays
    /// lost. Nothing happens to a connection that is not open.
    pub fn close_connection(&self, conn: &LocalConnection) {
        connection::drop_from_broker(conn, "closed by the broker (LocalBroker::close_connection)");
    }

    /// Restarts the broker, as a RabbitMQ node restart does: every
    /// connection drops (recovering ones come back after their delay);
    /// durable exchanges and durable queues that are neither exclusive nor
    /// auto-delete survive with the bindings between them and their
    /// persistent messages (requeued ones included, marked
    /// `redelivered`), and a quorum queue all of its messages, persistent
    /// or not; transient messages and every other exchange and queue are
    /// gone.
    pub fn restart(&self) {
        self.inner.restart();
    }

    /// What the fault plan did so far: faults, deliveries, reconnections.
    /// Empty for a broker without a plan.
    #[must_use]
    pub fn trace(&self) -> Trace {
        self.inner
            .faults
            .as_ref()
            .map(|f| f.trace())
            .unwrap_or_default()
    }

    /// Resolves when nothing is in flight that a consumer could still
    /// receive: every delivery handed to a consumer has been read from its
    /// stream, and nothing new was handed over while the other tasks had a
    /// turn to run.
    ///
    /// Dispatch itself never lags (a ready message a consumer has room for is
    /// handed over by the call that made it deliverable), so this waits on
    /// the consumers: call it after publishing to let consumer tasks take
    /// what they were sent. It does not wait for acks, nor for TTL timers.
    /// On a current-thread runtime, when it returns, every consumer task has
    /// taken its deliveries and run until its next wait. A consumer whose
    /// stream nobody polls keeps it waiting.
    pub async fn wait_idle(&self) {
        self.inner.activity.wait_idle().await;
    }

    /// The number of ready messages in a queue (not counting deliveries
    /// waiting for an ack), or `None` if there is no such queue. Expired
    /// messages at the head are removed first, as a RabbitMQ queue would
    /// have done by now.
    #[must_use]
    pub fn queue_depth(&self, queue: &str) -> Option<usize> {
        self.inner.queue_depth(queue)
    }

    /// The number of deliveries of a queue that consumers hold unsettled, or
    /// `None` if there is no such queue.
    #[must_use]
    pub fn unacked_count(&self, queue: &str) -> Option<usize> {
        self.inner.unacked_count(queue)
    }

    /// Starts recording what is published to `exchange` (`""` for the
    /// default exchange): from now on, every message published to it, routed
    /// or not, and every message dead-lettered to it, is kept for
    /// [`LocalBroker::published`]. Recording an exchange again keeps what
    /// was recorded. The exchange need not exist yet.
    pub fn record_exchange(&self, exchange: &str) {
        self.inner.record_exchange(exchange);
    }

    /// What was published to `exchange` since [`LocalBroker::record_exchange`]
    /// started recording it: routing key and message, in publish order (as
    /// published, before `BCC` is removed). Empty if it is not recorded.
    #[must_use]
    pub fn published(&self, exchange: &str) -> Vec<(String, Message)> {
        self.inner.published(exchange)
    }
}
