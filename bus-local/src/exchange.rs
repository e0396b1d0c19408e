//! Exchanges and their bindings: which queues a routing key (or a message's
//! headers) reaches.

use std::collections::HashMap;
use std::sync::Arc;

use bus_core::routing::{headers_match, TopicMatcher};
use bus_core::{Error, ErrorDetail, ExchangeKind, FieldTable, FieldValue, Result, Subject};

use crate::queue::Queue;

/// One binding's target: a queue and the binding's arguments (part of the
/// binding's identity, and the match criteria of a headers exchange).
#[derive(Clone)]
pub(crate) struct Binding {
    pub(crate) queue: Arc<Queue>,
    pub(crate) arguments: FieldTable,
}

impl PartialEq for Binding {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.queue, &other.queue) && self.arguments == other.arguments
    }
}

/// Bindings indexed the way the exchange kind routes.
enum Bindings {
    /// Routing key to bindings with exactly that key.
    Direct(HashMap<String, Vec<Binding>>),
    /// Every binding, with its (ignored) key.
    Fanout(Vec<(String, Binding)>),
    /// Patterns in a word trie.
    Topic(TopicMatcher<Binding>),
    /// Every binding, with its (ignored) key; matched on arguments.
    Headers(Vec<(String, Binding)>),
}

/// An exchange as declared, with its bindings.
pub(crate) struct Exchange {
    pub(crate) kind: ExchangeKind,
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
    pub(crate) internal: bool,
    /// `alternate-exchange`: where messages no binding matches go.
    pub(crate) alternate: Option<String>,
    bindings: Bindings,
}

/// Checks the arguments of an exchange declaration as RabbitMQ does.
pub(crate) fn alternate_exchange(name: &str, arguments: &FieldTable) -> Result<Option<String>> {
    match arguments.get("alternate-exchange") {
        None => Ok(None),
        Some(FieldValue::String(ae)) => Ok(Some(ae.clone())),
        Some(other) => Err(Error::PreconditionFailed(
            ErrorDetail::about(
                Subject::exchange(name),
                format!(
                "invalid arg 'alternate-exchange' for exchange '{name}': expected a string, got {}",
                other.type_name()
            ),
            )
            .with_argument("alternate-exchange"),
        )),
    }
}

impl Exchange {
    pub(crate) fn new(
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        alternate: Option<String>,
    ) -> Self {
        let bindings = match kind {
            ExchangeKind::Direct => Bindings::Direct(HashMap::new()),
            ExchangeKind::Fanout => Bindings::Fanout(Vec::new()),
            ExchangeKind::Topic => Bindings::Topic(TopicMatcher::new()),
            ExchangeKind::Headers => Bindings::Headers(Vec::new()),
            // Never built: `declare_exchange` refuses custom kinds first
            // (`ExchangeKind::require_built_in`); such an exchange would
            // route nothing.
            ExchangeKind::Custom(_) => Bindings::Fanout(Vec::new()),
        };
        Exchange {
            kind,
            durable,
            auto_delete,
            internal,
            alternate,
            bindings,
        }
    }

    /// Checks binding arguments the exchange interprets.
    pub(crate) fn check_binding(&self, name: &str, arguments: &FieldTable) -> Result<()> {
        if self.kind == ExchangeKind::Headers {
            if let Some(mode) = arguments.get("x-match") {
                if !matches!(
                    mode.as_str(),
                    Some("all" | "any" | "all-with-x" | "any-with-x")
                ) {
                    return Err(Error::PreconditionFailed(
                        ErrorDetail::about(
                            Subject::exchange(name),
                            format!(
                        "invalid x-match field value {mode} for a binding to exchange '{name}'; \
                         expected all, any, all-with-x or any-with-x"
                    ),
                        )
                        .with_argument("x-match"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Adds a binding; `false` if the same one existed.
    pub(crate) fn bind(&mut self, key: &str, binding: Binding) -> bool {
        match &mut self.bindings {
            Bindings::Direct(map) => {
                let list = map.entry(key.to_owned()).or_default();
                if list.contains(&binding) {
                    return false;
                }
                list.push(binding);
                true
            }
            Bindings::Fanout(list) | Bindings::Headers(list) => {
                if list.iter().any(|(k, b)| k == key && *b == binding) {
                    return false;
                }
                list.push((key.to_owned(), binding));
                true
            }
            Bindings::Topic(trie) => trie.insert(key, binding),
        }
    }

    /// Removes a binding; `false` if there was none.
    pub(crate) fn unbind(&mut self, key: &str, binding: &Binding) -> bool {
        match &mut self.bindings {
            Bindings::Direct(map) => {
                let Some(list) = map.get_mut(key) else {
                    return false;
                };
                let before = list.len();
                list.retain(|b| b != binding);
                let removed = list.len() != before;
                if list.is_empty() {
                    map.remove(key);
                }
                removed
            }
            Bindings::Fanout(list) | Bindings::Headers(list) => {
                let before = list.len();
                list.retain(|(k, b)| !(k == key && b == binding));
                list.len() != before
            }
            Bindings::Topic(trie) => trie.remove(key, binding),
        }
    }

    /// Removes every binding to `queue`; returns whether there were any.
    pub(crate) fn unbind_queue(&mut self, queue: &Arc<Queue>) -> bool {
        let before = self.binding_count();
        match &mut self.bindings {
            Bindings::Direct(map) => map.retain(|_, list| {
                list.retain(|b| !Arc::ptr_eq(&b.queue, queue));
                !list.is_empty()
            }),
            Bindings::Fanout(list) | Bindings::Headers(list) => {
                list.retain(|(_, b)| !Arc::ptr_eq(&b.queue, queue));
            }
            Bindings::Topic(trie) => trie.retain(|b| !Arc::ptr_eq(&b.queue, queue)),
        }
        self.binding_count() != before
    }

    pub(crate) fn binding_count(&self) -> usize {
        match &self.bindings {
            Bindings::Direct(map) => map.values().map(Vec::len).sum(),
            Bindings::Fanout(list) | Bindings::Headers(list) => list.len(),
            Bindings::Topic(trie) => trie.len(),
        }
    }

    /// Appends the queues `key` (and `headers`) reach, possibly with
    /// repeats; the caller orders and deduplicates them.
    pub(crate) fn route(&self, key: &str, headers: &FieldTable, out: &mut Vec<Arc<Queue>>) {
        match &self.bindings {
            Bindings::Direct(map) => {
                if let Some(list) = map.get(key) {
                    out.extend(list.iter().map(|b| b.queue.clone()));
                }
            }
            Bindings::Fanout(list) => out.extend(list.iter().map(|(_, b)| b.queue.clone())),
            Bindings::Topic(trie) => trie.for_each_match(key, |b| out.push(b.queue.clone())),
            Bindings::Headers(list) => out.extend(
                list.iter()
                    .filter(|(_, b)| headers_match(&b.arguments, headers))
                    .map(|(_, b)| b.queue.clone()),
            ),
        }
    }
}
