//! The topology a connection declared, kept to declare it again after a
//! reconnection, and the map from the names server-named queues were first
//! given to their current names.

use std::collections::BTreeMap;

use bus_core::{ExchangeKind, ExchangeOptions, FieldTable, QueueOptions};

#[derive(Clone, Debug)]
pub(crate) struct QueueRecord {
    pub(crate) options: QueueOptions,
    /// Declared with an empty name: a new name comes with each recovery.
    pub(crate) server_named: bool,
    /// The queue's name on the current link.
    pub(crate) current: String,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BindingRecord {
    /// The queue as the application names it (see [`Journal::resolve`]).
    pub(crate) queue: String,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) arguments: FieldTable,
}

/// Exchanges, queues and bindings this connection declared and did not
/// delete since, in the order they must be replayed.
#[derive(Clone, Debug, Default)]
pub(crate) struct Journal {
    pub(crate) exchanges: BTreeMap<String, (ExchangeKind, ExchangeOptions)>,
    /// Keyed by the name the application holds: for a server-named queue,
    /// the first name the broker gave it.
    pub(crate) queues: BTreeMap<String, QueueRecord>,
    pub(crate) bindings: Vec<BindingRecord>,
}

impl Journal {
    /// The current name of a queue the application names `name`.
    pub(crate) fn resolve(&self, name: &str) -> String {
        self.queues
            .get(name)
            .map_or_else(|| name.to_owned(), |q| q.current.clone())
    }

    /// The name the application holds for a queue currently named
    /// `current` (the reverse of [`Journal::resolve`]).
    fn handle_of(&self, current: &str) -> String {
        self.queues
            .iter()
            .find(|(_, q)| q.current == current)
            .map_or_else(|| current.to_owned(), |(k, _)| k.clone())
    }

    pub(crate) fn record_exchange(
        &mut self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
    ) {
        self.exchanges.insert(name.to_owned(), (kind, options));
    }

    pub(crate) fn forget_exchange(&mut self, name: &str) {
        self.exchanges.remove(name);
        self.bindings.retain(|b| b.exchange != name);
    }

    /// Records a declared queue. `requested` is the name the application
    /// asked for (empty for a server-named queue), `actual` the broker's.
    pub(crate) fn record_queue(&mut self, requested: &str, actual: &str, options: QueueOptions) {
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

    pub(crate) fn forget_queue(&mut self, name: &str) {
        let handle = self.handle_of(name);
        self.queues.remove(&handle);
        self.bindings
            .retain(|b| b.queue != handle && b.queue != name);
    }

    pub(crate) fn record_binding(&mut self, b: BindingRecord) {
        let b = BindingRecord {
            queue: self.handle_of(&b.queue),
            ..b
        };
        if !self.bindings.contains(&b) {
            self.bindings.push(b);
        }
    }

    pub(crate) fn forget_binding(&mut self, b: &BindingRecord) {
        let handle = self.handle_of(&b.queue);
        self.bindings.retain(|x| {
            !(x.queue == handle
                && x.exchange == b.exchange
                && x.routing_key == b.routing_key
                && x.arguments == b.arguments)
        });
    }

    /// After a recovery: the queue known as `handle` is now `current`.
    pub(crate) fn rename(&mut self, handle: &str, current: &str) {
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
    fn deleting_an_exchange_forgets_its_bindings() {
        let mut j = Journal::default();
        j.record_exchange("x", ExchangeKind::Topic, ExchangeOptions::default());
        j.record_queue("q", "q", QueueOptions::default());
        j.record_binding(binding("q"));
        j.forget_exchange("x");
        assert!(j.exchanges.is_empty() && j.bindings.is_empty());
        assert_eq!(j.queues.len(), 1);
    }
}
