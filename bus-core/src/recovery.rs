//! What recovering connections share across transports: the
//! [`RecoveryEvent`]s they report and the [`Journal`] of the topology they
//! declare again after a reconnection.
//!
//! A transport that recovers (bus-amqp on RabbitMQ, bus-local under
//! simulated faults) records every declaration, binding and deletion of a
//! connection in its journal, replays it on the new link in the journal's
//! order (exchanges, queues, bindings), gives server-named queues new
//! names and directs the application's old names to them through
//! [`Journal::resolve`].

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{ExchangeKind, ExchangeOptions, FieldTable, QueueOptions};

/// Something that happened to the link to the broker, as broadcast by
/// a recovering connection (`AmqpConnection::events` in bus-amqp,
/// `LocalConnection::events` in bus-local): both report the same steps.
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
        /// The node connected to: `host:port` for RabbitMQ, `memory://NAME`
        /// for the in-process broker.
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
    /// [`RecoveryEvent::Unblocked`] or their deadline (bus-amqp's
    /// `AmqpOptions::publish_timeout`).
    Blocked {
        /// The broker's reason, e.g. `low on memory`.
        reason: String,
    },
    /// The broker lifted its block (`connection.unblocked`), or the
    /// connection was replaced by a new one that is not blocked.
    Unblocked,
    /// Reconnection gave up (the transport's reconnect policy ran out);
    /// the connection is closed for good.
    GaveUp {
        /// The last failure.
        reason: String,
    },
}

/// A queue the connection declared.
#[derive(Clone, Debug)]
pub struct QueueRecord {
    /// The options it was declared with.
    pub options: QueueOptions,
    /// Declared with an empty name: a new name comes with each recovery.
    pub server_named: bool,
    /// The queue's name on the current link.
    pub current: String,
}

/// A binding the connection made.
#[derive(Clone, Debug, PartialEq)]
pub struct BindingRecord {
    /// The queue as the application names it (see [`Journal::resolve`]).
    pub queue: String,
    /// The exchange.
    pub exchange: String,
    /// The binding key.
    pub routing_key: String,
    /// The binding arguments.
    pub arguments: FieldTable,
}

/// An exchange-to-exchange binding the connection made.
#[derive(Clone, Debug, PartialEq)]
pub struct ExchangeBindingRecord {
    /// The exchange the binding leads to.
    pub destination: String,
    /// The exchange whose messages it takes.
    pub source: String,
    /// The binding key.
    pub routing_key: String,
    /// The binding arguments.
    pub arguments: FieldTable,
}

/// Exchanges, queues and bindings this connection declared and did not
/// delete since, in the order they must be replayed: exchanges, queues,
/// queue bindings, then exchange-to-exchange bindings.
#[derive(Clone, Debug, Default)]
pub struct Journal {
    /// Exchanges by name, with their kind and options.
    pub exchanges: BTreeMap<String, (ExchangeKind, ExchangeOptions)>,
    /// Keyed by the name the application holds: for a server-named queue,
    /// the first name the broker gave it.
    pub queues: BTreeMap<String, QueueRecord>,
    /// Bindings, in the order they were made.
    pub bindings: Vec<BindingRecord>,
    /// Exchange-to-exchange bindings, in the order they were made.
    pub exchange_bindings: Vec<ExchangeBindingRecord>,
}

impl Journal {
    /// The current name of a queue the application names `name`.
    pub fn resolve(&self, name: &str) -> String {
        self.queues
            .get(name)
            .map_or_else(|| name.to_owned(), |q| q.current.clone())
    }

    /// The name the application holds for a queue currently named
    /// `current` (the reverse of [`Journal::resolve`]).
    pub fn handle_of(&self, current: &str) -> String {
        self.queues
            .iter()
            .find(|(_, q)| q.current == current)
            .map_or_else(|| current.to_owned(), |(k, _)| k.clone())
    }

    /// Whether the queue `name` (the name the application holds, or its
    /// current one) was declared exclusive; `false` for a queue not in the
    /// journal.
    pub fn is_exclusive(&self, name: &str) -> bool {
        self.queues
            .get(name)
            .or_else(|| self.queues.values().find(|q| q.current == name))
            .is_some_and(|q| q.options.exclusive)
    }

    /// Records a declared exchange (a redeclaration replaces it).
    pub fn record_exchange(&mut self, name: &str, kind: ExchangeKind, options: ExchangeOptions) {
        self.exchanges.insert(name.to_owned(), (kind, options));
    }

    /// Forgets a deleted exchange and its bindings: queue bindings from it
    /// and exchange bindings from or to it.
    pub fn forget_exchange(&mut self, name: &str) {
        self.exchanges.remove(name);
        self.bindings.retain(|b| b.exchange != name);
        self.exchange_bindings
            .retain(|b| b.source != name && b.destination != name);
    }

    /// Records a declared queue. `requested` is the name the application
    /// asked for (empty for a server-named queue), `actual` the broker's.
    pub fn record_queue(&mut self, requested: &str, actual: &str, options: QueueOptions) {
        let handle = if requested.is_empty() {
            actual.to_owned()
        } else {
            self.handle_of(requested)
        };
        let server_named =
            requested.is_empty() || self.queues.get(&handle).is_some_and(|q| q.server_named);
        self.queues.insert(
            handle,
            QueueRecord {
                options,
                server_named,
                current: actual.to_owned(),
            },
        );
    }

    /// Forgets a deleted queue (by either of its names) and its bindings.
    pub fn forget_queue(&mut self, name: &str) {
        let handle = self.handle_of(name);
        self.queues.remove(&handle);
        self.bindings
            .retain(|b| b.queue != handle && b.queue != name);
    }

    /// Records a binding, once.
    pub fn record_binding(&mut self, b: BindingRecord) {
        let b = BindingRecord {
            queue: self.handle_of(&b.queue),
            ..b
        };
        if !self.bindings.contains(&b) {
            self.bindings.push(b);
        }
    }

    /// Forgets an unbound binding.
    pub fn forget_binding(&mut self, b: &BindingRecord) {
        let handle = self.handle_of(&b.queue);
        self.bindings.retain(|x| {
            !(x.queue == handle
                && x.exchange == b.exchange
                && x.routing_key == b.routing_key
                && x.arguments == b.arguments)
        });
    }

    /// Records an exchange-to-exchange binding, once.
    pub fn record_exchange_binding(&mut self, b: ExchangeBindingRecord) {
        if !self.exchange_bindings.contains(&b) {
            self.exchange_bindings.push(b);
        }
    }

    /// Forgets an unbound exchange-to-exchange binding.
    pub fn forget_exchange_binding(&mut self, b: &ExchangeBindingRecord) {
        self.exchange_bindings.retain(|x| x != b);
    }

    /// After a recovery: the queue known as `handle` is now `current`.
    pub fn rename(&mut self, handle: &str, current: &str) {
        if let Some(q) = self.queues.get_mut(handle) {
            q.current = current.to_owned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(q: &str) -> BindingRecord {
        BindingRecord {
            queue: q.into(),
            exchange: "x".into(),
            routing_key: "k".into(),
            arguments: FieldTable::new(),
        }
    }

    #[test]
    fn server_named_queues_keep_their_first_name_as_handle() {
        let mut j = Journal::default();
        j.record_queue("", "amq.gen-1", QueueOptions::exclusive());
        j.record_binding(binding("amq.gen-1"));
        j.rename("amq.gen-1", "amq.gen-2");
        assert_eq!(j.resolve("amq.gen-1"), "amq.gen-2");
        // Operations may name the queue by either name.
        j.record_binding(binding("amq.gen-2"));
        assert_eq!(j.bindings.len(), 1);
        j.forget_binding(&binding("amq.gen-2"));
        assert!(j.bindings.is_empty());
        j.record_binding(binding("amq.gen-1"));
        j.forget_queue("amq.gen-2");
        assert!(j.queues.is_empty() && j.bindings.is_empty());
    }

    #[test]
    fn exclusivity_is_found_by_either_name() {
        let mut j = Journal::default();
        let exclusive = QueueOptions {
            exclusive: true,
            ..QueueOptions::default()
        };
        j.record_queue("", "amq.gen-1", exclusive);
        j.record_queue("plain", "plain", QueueOptions::default());
        j.rename("amq.gen-1", "amq.gen-2");
        assert!(j.is_exclusive("amq.gen-1"));
        assert!(j.is_exclusive("amq.gen-2"));
        assert!(!j.is_exclusive("plain"));
        assert!(!j.is_exclusive("unknown"));
    }

    #[test]
    fn deleting_an_exchange_forgets_its_bindings() {
        let mut j = Journal::default();
        j.record_exchange("x", ExchangeKind::Topic, ExchangeOptions::default());
        j.record_queue("q", "q", QueueOptions::default());
        j.record_binding(binding("q"));
        let e2e = |d: &str, s: &str| ExchangeBindingRecord {
            destination: d.into(),
            source: s.into(),
            routing_key: "k".into(),
            arguments: FieldTable::new(),
        };
        j.record_exchange_binding(e2e("x", "a"));
        j.record_exchange_binding(e2e("b", "x"));
        j.record_exchange_binding(e2e("b", "x"));
        j.record_exchange_binding(e2e("b", "a"));
        assert_eq!(j.exchange_bindings.len(), 3);
        j.forget_exchange("x");
        assert!(j.exchanges.is_empty() && j.bindings.is_empty());
        assert_eq!(j.exchange_bindings, vec![e2e("b", "a")]);
        j.forget_exchange_binding(&e2e("b", "a"));
        assert!(j.exchange_bindings.is_empty());
        assert_eq!(j.queues.len(), 1);
    }
}
