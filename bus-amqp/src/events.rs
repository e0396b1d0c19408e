//! What recovery reports: [`RecoveryEvent`]s, also written as tracing events.

use std::time::Duration;

/// Something that happened to the link to the broker, as broadcast by
/// [`AmqpConnection::events`](crate::AmqpConnection::events).
///
/// A lost connection gives `Disconnected`, then zero or more
/// `ReconnectFailed`, then either `Reconnected` (preceded by a
/// `QueueRenamed` for each server-named queue and a
/// `TopologyRecoveryFailed` for each declaration that could not be
/// replayed, and followed by a `ConsumerResumed` for each consumer) or
/// `GaveUp`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecoveryEvent {
    /// The connection was lost; recovery starts.
    Disconnected {
        /// What the broker or the network said: lapin's error, such as
        /// the missed heartbeat of a silent network or the I/O error of a
        /// reset.
        reason: String,
    },
    /// One attempt to reconnect failed.
    ReconnectFailed {
        /// 1 for the first failed attempt of this recovery.
        attempt: u32,
        /// Why, with credentials hidden.
        error: String,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// A server-named queue was declared again and got a new name. Every
    /// operation of this connection that names the old queue (consume,
    /// bind, delete, publish through the default exchange, `reply_to`)
    /// is directed to the new one.
    QueueRenamed {
        /// The name the queue was first given (what the application holds).
        old: String,
        /// Its name on the new connection.
        new: String,
    },
    /// A declaration or binding of this connection could not be replayed
    /// (e.g. an exclusive queue still held by the broker for the dead
    /// connection, or an exchange another client deleted).
    TopologyRecoveryFailed {
        /// What could not be replayed.
        what: String,
        /// The broker's answer.
        error: String,
    },
    /// The connection is back, its topology declared again.
    Reconnected {
        /// The node connected to, `host:port`.
        host: String,
        /// Counts links: 1 for the first connection, +1 for each recovery.
        generation: u64,
    },
    /// A consumer started again (after a reconnection, or after the broker
    /// closed its channel).
    ConsumerResumed {
        /// The consumer tag.
        consumer_tag: String,
        /// The queue, as the application named it.
        queue: String,
    },
    /// A consumer could not be started again; its stream ends with this
    /// error.
    ConsumerLost {
        /// The consumer tag.
        consumer_tag: String,
        /// The queue, as the application named it.
        queue: String,
        /// Why.
        error: String,
    },
    /// The broker cancelled a consumer (`basic.cancel` from the server:
    /// its queue was deleted, or RabbitMQ stopped it for another reason,
    /// such as a queue moving to another node). Its stream yields an
    /// error saying why, then ends. A deleted queue is forgotten: recovery
    /// does not declare it again.
    ConsumerCancelled {
        /// The consumer tag.
        consumer_tag: String,
        /// The queue, as the application named it.
        queue: String,
        /// Why, as far as the connection could tell.
        reason: String,
    },
    /// The broker holds back this connection's publishers
    /// (`connection.blocked`, RabbitMQ's memory or disk alarm): publishes
    /// and topology operations wait, without being sent, until
    /// [`RecoveryEvent::Unblocked`] or their deadline
    /// ([`AmqpOptions::publish_timeout`](crate::AmqpOptions::publish_timeout)).
    Blocked {
        /// The broker's reason, e.g. `low on memory`.
        reason: String,
    },
    /// The broker lifted its block (`connection.unblocked`), or the
    /// connection was replaced by a new one that is not blocked.
    Unblocked,
    /// Reconnection gave up ([`ReconnectPolicy::max_attempts`](crate::ReconnectPolicy));
    /// the connection is closed for good.
    GaveUp {
        /// The last failure.
        reason: String,
    },
}
