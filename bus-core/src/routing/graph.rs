//! The exchange graph: exchanges with indexed bindings, and the one routing
//! algorithm over them (alternate exchanges, sender-selected distribution,
//! exchange-to-exchange bindings), checked against RabbitMQ 3.10.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use super::{headers_match, validate_headers_binding, TopicMatcher};
use crate::equivalence::ExchangeSettings;
use crate::error::{Error, ErrorDetail, Result, Subject};
use crate::message::Message;
use crate::topology::{ExchangeKind, ExchangeOptions, PREDECLARED_EXCHANGES};
use crate::value::{FieldTable, FieldValue};

/// The exchange argument naming the alternate exchange.
pub const ALTERNATE_EXCHANGE: &str = "alternate-exchange";

/// Reads the `alternate-exchange` argument of a declaration of exchange
/// `name`: `None` without one.
///
/// # Errors
/// [`Error::PreconditionFailed`] when the argument is not a string (a long
/// string on the wire), as RabbitMQ refuses it ("invalid type ... for arg
/// 'alternate-exchange'"); the declaration must then change nothing.
pub fn alternate_exchange(name: &str, arguments: &FieldTable) -> Result<Option<String>> {
    match arguments.get(ALTERNATE_EXCHANGE) {
        None => Ok(None),
        Some(FieldValue::String(ae)) => Ok(Some(ae.clone())),
        Some(other) => Err(Error::PreconditionFailed(
            ErrorDetail::about(
                Subject::exchange(name),
                format!(
                    "invalid type '{}' for arg '{ALTERNATE_EXCHANGE}' in exchange '{name}': \
                     expected a string",
                    other.type_name()
                ),
            )
            .with_argument(ALTERNATE_EXCHANGE),
        )),
    }
}

/// Checks the arguments of a binding from an exchange of `kind`: those the
/// kind interprets (a headers exchange's `x-match`) must be valid.
///
/// # Errors
/// [`Error::PreconditionFailed`] for an `x-match` RabbitMQ refuses.
pub fn check_binding_arguments(kind: &ExchangeKind, arguments: &FieldTable) -> Result<()> {
    if *kind == ExchangeKind::Headers {
        validate_headers_binding(arguments)?;
    }
    Ok(())
}

/// The headers of sender-selected distribution: their routing keys are
/// routed as well as the publish routing key.
const SENDER_HEADERS: [&str; 2] = ["CC", "BCC"];

/// Checks the `CC` and `BCC` headers of a message being published: each,
/// when present, must be an array.
///
/// # Errors
/// [`Error::PreconditionFailed`] naming the header, as RabbitMQ refuses
/// such a message (`unacceptable_type_in_header`).
pub fn check_sender_routes(headers: &FieldTable) -> Result<()> {
    for name in SENDER_HEADERS {
        match headers.get(name) {
            None | Some(FieldValue::Array(_)) => {}
            Some(other) => {
                return Err(Error::PreconditionFailed(
                    ErrorDetail::new(format!(
                        "invalid message: header {name} must be an array of routing keys, got {}",
                        other.type_name()
                    ))
                    .with_argument(name),
                ))
            }
        }
    }
    Ok(())
}

/// The extra routing keys of sender-selected distribution: the string
/// entries of the `CC` header, then those of `BCC`. Entries that are not
/// strings are ignored, as RabbitMQ ignores them; so are headers that are
/// not arrays (which [`check_sender_routes`] refuses at publish).
pub fn sender_routes(headers: &FieldTable) -> impl Iterator<Item = &str> + Clone {
    SENDER_HEADERS
        .into_iter()
        .filter_map(|h| headers.get(h).and_then(FieldValue::as_array))
        .flatten()
        .filter_map(FieldValue::as_str)
}

/// Removes the `BCC` header, which routes but is never delivered (RabbitMQ
/// strips it; `CC` stays). Returns whether there was one. A message
/// without one is left untouched (its shared properties are not copied).
pub fn strip_bcc(message: &mut Message) -> bool {
    if !message.properties.headers.contains_key("BCC") {
        return false;
    }
    message.properties.headers.remove("BCC").is_some()
}

/// A fast hash for exchange names and routing keys. Every publish looks
/// one up; names come from the process's own code and its peers, so
/// flooding resistance buys little and SipHash was a visible cost.
#[derive(Default, Clone, Copy)]
pub struct NameHasher(u64);

impl NameHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl fmt::Debug for NameHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NameHasher")
    }
}

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A hash map keyed by names, with [`NameHasher`].
pub type NameMap<V> = HashMap<String, V, BuildHasherDefault<NameHasher>>;

/// Where a binding leads: a queue, in the transport's own handle, or
/// another exchange (an exchange-to-exchange binding, `exchange.bind`).
#[derive(Clone, Debug, PartialEq)]
pub enum Destination<Q> {
    /// A queue.
    Queue(Q),
    /// An exchange, by name.
    Exchange(String),
}

/// One binding as the index keeps it.
#[derive(Clone, Debug, PartialEq)]
struct Binding<Q> {
    destination: Destination<Q>,
    arguments: FieldTable,
}

/// Bindings indexed the way the exchange kind routes.
#[derive(Clone)]
enum Index<Q> {
    /// Routing key to the bindings with exactly that key.
    Direct(NameMap<Vec<Binding<Q>>>),
    /// Every binding with its (ignored) key.
    Fanout(Vec<(String, Binding<Q>)>),
    /// Patterns in a word trie.
    Topic(TopicMatcher<Binding<Q>>),
    /// Every binding with its (ignored) key; matched on arguments.
    Headers(Vec<(String, Binding<Q>)>),
    /// Bindings of a plugin exchange type, kept but never matched.
    Custom(Vec<(String, Binding<Q>)>),
}

/// An exchange as declared, with its bindings indexed for its kind: a hash
/// map by key (direct), a list (fanout), the topic trie
/// ([`TopicMatcher`]), or a list matched on arguments (headers).
///
/// A binding is identified by its key, destination and arguments; binding
/// the same one twice keeps one.
#[derive(Clone)]
pub struct Exchange<Q> {
    kind: ExchangeKind,
    /// Survives a restart of the broker.
    pub durable: bool,
    /// Deleted when its last binding (as source) goes, once it has had one.
    pub auto_delete: bool,
    /// Refuses direct publishes; reachable through bindings and as an
    /// alternate exchange.
    pub internal: bool,
    alternate: Option<String>,
    index: Index<Q>,
    len: usize,
}

impl<Q> fmt::Debug for Exchange<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchange")
            .field("kind", &self.kind)
            .field("durable", &self.durable)
            .field("auto_delete", &self.auto_delete)
            .field("internal", &self.internal)
            .field("alternate", &self.alternate)
            .field("bindings", &self.len)
            .finish()
    }
}

impl<Q: Clone + PartialEq> Exchange<Q> {
    /// An exchange without bindings. `alternate` is where messages no
    /// binding matches go (read it with [`alternate_exchange`]).
    #[must_use]
    pub fn new(
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        alternate: Option<String>,
    ) -> Self {
        let index = match kind {
            ExchangeKind::Direct => Index::Direct(NameMap::default()),
            ExchangeKind::Fanout => Index::Fanout(Vec::new()),
            ExchangeKind::Topic => Index::Topic(TopicMatcher::new()),
            ExchangeKind::Headers => Index::Headers(Vec::new()),
            // A plugin's type: its routing is the plugin's, unknown here.
            // Transports refuse to declare one (`require_built_in`); if
            // one is built anyway, it routes nothing.
            ExchangeKind::Custom(_) => Index::Custom(Vec::new()),
        };
        Exchange {
            kind,
            durable,
            auto_delete,
            internal,
            alternate,
            index,
            len: 0,
        }
    }

    /// An exchange as a declaration of `name` with `options` describes it.
    ///
    /// # Errors
    /// As [`alternate_exchange`].
    pub fn declared(name: &str, kind: ExchangeKind, options: &ExchangeOptions) -> Result<Self> {
        let alternate = alternate_exchange(name, &options.arguments)?;
        Ok(Self::new(
            kind,
            options.durable,
            options.auto_delete,
            options.internal,
            alternate,
        ))
    }

    /// Its kind.
    #[must_use]
    pub fn kind(&self) -> &ExchangeKind {
        &self.kind
    }

    /// What a redeclaration must match ([`crate::equivalence::check_exchange`]).
    #[must_use]
    pub fn settings(&self) -> ExchangeSettings<'_> {
        ExchangeSettings {
            kind: &self.kind,
            durable: self.durable,
            auto_delete: self.auto_delete,
            internal: self.internal,
            alternate: self.alternate.as_deref(),
        }
    }

    /// Its alternate exchange, if it has one.
    #[must_use]
    pub fn alternate(&self) -> Option<&str> {
        self.alternate.as_deref()
    }

    /// How many bindings it is the source of.
    #[must_use]
    pub fn binding_count(&self) -> usize {
        self.len
    }

    /// Checks binding arguments this exchange interprets (a headers
    /// exchange's `x-match`).
    ///
    /// # Errors
    /// [`Error::PreconditionFailed`] for an `x-match` RabbitMQ refuses.
    pub fn check_binding(&self, arguments: &FieldTable) -> Result<()> {
        check_binding_arguments(&self.kind, arguments)
    }

    /// Adds a binding; `false` if the same one was there.
    pub fn bind(&mut self, key: &str, destination: Destination<Q>, arguments: FieldTable) -> bool {
        let binding = Binding {
            destination,
            arguments,
        };
        let added = match &mut self.index {
            Index::Direct(map) => {
                let list = map.entry(key.to_owned()).or_default();
                if list.contains(&binding) {
                    false
                } else {
                    list.push(binding);
                    true
                }
            }
            Index::Fanout(list) | Index::Headers(list) | Index::Custom(list) => {
                if list.iter().any(|(k, b)| k == key && *b == binding) {
                    false
                } else {
                    list.push((key.to_owned(), binding));
                    true
                }
            }
            Index::Topic(trie) => trie.insert(key, binding),
        };
        self.len += usize::from(added);
        added
    }

    /// Removes a binding; `false` if there was none.
    pub fn unbind(
        &mut self,
        key: &str,
        destination: &Destination<Q>,
        arguments: &FieldTable,
    ) -> bool {
        let same = |b: &Binding<Q>| b.destination == *destination && b.arguments == *arguments;
        let removed = match &mut self.index {
            Index::Direct(map) => {
                let Some(list) = map.get_mut(key) else {
                    return false;
                };
                let before = list.len();
                list.retain(|b| !same(b));
                let removed = list.len() != before;
                if list.is_empty() {
                    map.remove(key);
                }
                removed
            }
            Index::Fanout(list) | Index::Headers(list) | Index::Custom(list) => {
                let before = list.len();
                list.retain(|(k, b)| !(k == key && same(b)));
                list.len() != before
            }
            Index::Topic(trie) => {
                let probe = Binding {
                    destination: destination.clone(),
                    arguments: arguments.clone(),
                };
                trie.remove(key, &probe)
            }
        };
        self.len -= usize::from(removed);
        removed
    }

    /// Removes every binding whose destination `keep` refuses; returns how
    /// many went.
    pub fn retain(&mut self, mut keep: impl FnMut(&Destination<Q>) -> bool) -> usize {
        let before = self.len;
        match &mut self.index {
            Index::Direct(map) => map.retain(|_, list| {
                list.retain(|b| keep(&b.destination));
                !list.is_empty()
            }),
            Index::Fanout(list) | Index::Headers(list) | Index::Custom(list) => {
                list.retain(|(_, b)| keep(&b.destination))
            }
            Index::Topic(trie) => trie.retain(|b| keep(&b.destination)),
        }
        self.len = match &self.index {
            Index::Direct(map) => map.values().map(Vec::len).sum(),
            Index::Fanout(list) | Index::Headers(list) | Index::Custom(list) => list.len(),
            Index::Topic(trie) => trie.len(),
        };
        before - self.len
    }

    /// Calls `f` with the destination of every binding `key` (and, for a
    /// headers exchange, `headers`) matches, once per binding.
    fn matches<'x>(
        &'x self,
        key: &str,
        headers: &FieldTable,
        mut f: impl FnMut(&'x Destination<Q>),
    ) {
        match &self.index {
            Index::Direct(map) => {
                if let Some(list) = map.get(key) {
                    list.iter().for_each(|b| f(&b.destination));
                }
            }
            Index::Fanout(list) => list.iter().for_each(|(_, b)| f(&b.destination)),
            Index::Topic(trie) => trie.for_each_match(key, |b| f(&b.destination)),
            Index::Headers(list) => list
                .iter()
                .filter(|(_, b)| headers_match(&b.arguments, headers))
                .for_each(|(_, b)| f(&b.destination)),
            Index::Custom(_) => {}
        }
    }
}

/// The exchanges of a broker and the bindings between them and to queues:
/// the routing half of a broker, for transports that route messages
/// themselves (the in-process and folder transports). RabbitMQ routes on
/// its own; its transport never uses this.
///
/// `Q` is the transport's handle of a queue: its order is the order in
/// which [`ExchangeGraph::route`] lists the queues a message reaches (each
/// once), and its equality identifies a binding's queue.
///
/// The default exchange (`""`) is not in the graph: it routes to the queue
/// named by each routing key, which the transport looks up.
#[derive(Clone)]
pub struct ExchangeGraph<Q> {
    exchanges: NameMap<Exchange<Q>>,
}

impl<Q> fmt::Debug for ExchangeGraph<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.exchanges.keys().collect();
        names.sort();
        f.debug_struct("ExchangeGraph")
            .field("exchanges", &names)
            .finish()
    }
}

impl<Q> Default for ExchangeGraph<Q> {
    fn default() -> Self {
        ExchangeGraph {
            exchanges: NameMap::default(),
        }
    }
}

impl<Q: Clone + Ord> ExchangeGraph<Q> {
    /// A graph holding the [`PREDECLARED_EXCHANGES`] (durable, no bindings).
    #[must_use]
    pub fn with_predeclared() -> Self {
        let mut g = Self::default();
        for (name, kind) in PREDECLARED_EXCHANGES {
            g.exchanges.insert(
                name.to_owned(),
                Exchange::new(kind, true, false, false, None),
            );
        }
        g
    }

    /// The exchange of that name.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Exchange<Q>> {
        self.exchanges.get(name)
    }

    /// The exchange of that name, to bind or unbind.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Exchange<Q>> {
        self.exchanges.get_mut(name)
    }

    /// Adds (or replaces) an exchange.
    pub fn insert(&mut self, name: &str, exchange: Exchange<Q>) {
        self.exchanges.insert(name.to_owned(), exchange);
    }

    /// Every exchange with its name, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Exchange<Q>)> {
        self.exchanges.iter().map(|(n, x)| (n.as_str(), x))
    }

    /// Keeps the exchanges `keep` accepts and drops the bindings that led to
    /// the others, without auto-deleting anything (a broker restart keeps
    /// its durable exchanges this way).
    pub fn retain_exchanges(&mut self, mut keep: impl FnMut(&str, &Exchange<Q>) -> bool) {
        self.exchanges.retain(|n, x| keep(n, x));
        let names: Vec<String> = self.exchanges.keys().cloned().collect();
        for x in self.exchanges.values_mut() {
            x.retain(|d| match d {
                Destination::Exchange(e) => names.contains(e),
                Destination::Queue(_) => true,
            });
        }
    }

    /// Adds a binding from exchange `source` to `destination`; `false` if
    /// the same one was there. The caller has checked that a destination
    /// queue exists.
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the missing source, or the missing
    /// destination exchange (checked first, as RabbitMQ does);
    /// [`Error::PreconditionFailed`] for binding arguments the source
    /// refuses.
    pub fn bind(
        &mut self,
        source: &str,
        key: &str,
        destination: Destination<Q>,
        arguments: FieldTable,
    ) -> Result<bool> {
        if let Destination::Exchange(d) = &destination {
            if !self.exchanges.contains_key(d) {
                return Err(Error::exchange_not_found(d));
            }
        }
        let x = self
            .exchanges
            .get_mut(source)
            .ok_or_else(|| Error::exchange_not_found(source))?;
        x.check_binding(&arguments)?;
        Ok(x.bind(key, destination, arguments))
    }

    /// Removes a binding (nothing if it, or its source, is missing, as in
    /// RabbitMQ), then auto-deletes the source if that was its last
    /// binding. Returns the exchanges auto-deleted.
    pub fn unbind(
        &mut self,
        source: &str,
        key: &str,
        destination: &Destination<Q>,
        arguments: &FieldTable,
    ) -> Vec<String> {
        let removed = self
            .exchanges
            .get_mut(source)
            .is_some_and(|x| x.unbind(key, destination, arguments));
        if removed {
            auto_delete(self, [source.to_owned()])
        } else {
            Vec::new()
        }
    }

    /// Removes every binding to `queue` (the queue is being deleted), then
    /// auto-deletes the exchanges left without bindings. Returns those.
    pub fn remove_queue(&mut self, queue: &Q) -> Vec<String> {
        let mut sources = Vec::new();
        for (name, x) in &mut self.exchanges {
            if x.retain(|d| !matches!(d, Destination::Queue(q) if q == queue)) > 0 {
                sources.push(name.clone());
            }
        }
        auto_delete(self, sources)
    }

    /// Deletes an exchange as RabbitMQ does (see [`delete_exchange`]).
    /// Returns every exchange deleted, `name` first; empty if it did not
    /// exist.
    pub fn delete_exchange(&mut self, name: &str) -> Vec<String> {
        delete_exchange(self, name)
    }

    /// Checks that a message may be published to `exchange`: it exists and
    /// is not internal (the default exchange always may).
    ///
    /// # Errors
    /// [`Error::NotFound`] for a missing exchange; [`Error::AccessRefused`]
    /// for an internal one.
    pub fn check_publish(&self, exchange: &str) -> Result<()> {
        if exchange.is_empty() {
            return Ok(());
        }
        match self.exchanges.get(exchange) {
            None => Err(Error::exchange_not_found(exchange)),
            Some(x) if x.internal => Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(exchange),
                format!("cannot publish to internal exchange '{exchange}'"),
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Routes a message published (or dead-lettered) to `exchange` with
    /// `keys` (the routing key, then the [`sender_routes`]) and `headers`,
    /// appending the queues it reaches to `out`, in `Q`'s order, each once.
    /// Returns `false` (and appends nothing) if `exchange` does not exist.
    ///
    /// RabbitMQ's algorithm: the exchange's bindings matching any key lead
    /// to queues and to exchanges, which route the message in turn; an
    /// exchange none of whose bindings match hands the message to its
    /// alternate exchange, if any. Each exchange routes a message at most
    /// once, so loops of bindings or alternate exchanges end. Missing
    /// destination or alternate exchanges are skipped. The default
    /// exchange routes to `queue(key)` for each key.
    ///
    /// Allocates nothing beyond `out` unless the message goes through more
    /// than one exchange.
    pub fn route<'k>(
        &self,
        exchange: &str,
        keys: impl Iterator<Item = &'k str> + Clone,
        headers: &FieldTable,
        mut queue: impl FnMut(&str) -> Option<Q>,
        out: &mut Vec<Q>,
    ) -> bool {
        let start = out.len();
        if exchange.is_empty() {
            out.extend(keys.filter_map(&mut queue));
        } else {
            let Some(first) = self.exchanges.get(exchange) else {
                return false;
            };
            // Exchanges reached and not routed yet, and every exchange
            // reached so far (the first one included).
            let mut pending: Vec<&Exchange<Q>> = Vec::new();
            let mut seen: Vec<&str> = Vec::new();
            let mut current = first;
            loop {
                let mut matched = false;
                for key in keys.clone() {
                    current.matches(key, headers, |d| {
                        matched = true;
                        match d {
                            Destination::Queue(q) => out.push(q.clone()),
                            Destination::Exchange(e) => {
                                self.reach(exchange, e, &mut seen, &mut pending)
                            }
                        }
                    });
                }
                if !matched {
                    if let Some(ae) = &current.alternate {
                        self.reach(exchange, ae, &mut seen, &mut pending);
                    }
                }
                match pending.pop() {
                    Some(next) => current = next,
                    None => break,
                }
            }
        }
        let routed = &mut out[start..];
        if routed.len() > 1 {
            // Equal handles are dropped next, so stability buys nothing,
            // and an unstable sort never allocates.
            routed.sort_unstable();
            let mut kept = start + 1;
            for i in start + 1..out.len() {
                if out[i] != out[kept - 1] {
                    out.swap(kept, i);
                    kept += 1;
                }
            }
            out.truncate(kept);
        }
        true
    }

    /// Notes that routing reached exchange `name` from the `first` one: it
    /// routes next unless it routed (or was reached) already or is missing.
    fn reach<'g>(
        &'g self,
        first: &str,
        name: &'g str,
        seen: &mut Vec<&'g str>,
        pending: &mut Vec<&'g Exchange<Q>>,
    ) {
        if name == first || seen.contains(&name) {
            return;
        }
        seen.push(name);
        if let Some(x) = self.exchanges.get(name) {
            pending.push(x);
        }
    }
}

/// What the topology rules need from a transport's stored bindings, so
/// that a transport keeping its topology in its own form (the folder
/// transport's records) applies them exactly as [`ExchangeGraph`] does.
pub trait BindingStore {
    /// Whether exchange `name` exists and is auto-delete.
    fn is_auto_delete(&self, name: &str) -> bool;
    /// Whether exchange `name` is the source of any binding.
    fn has_bindings_from(&self, name: &str) -> bool;
    /// Removes exchange `name` and the bindings it is the source of;
    /// `false` if it did not exist.
    fn remove_exchange(&mut self, name: &str) -> bool;
    /// Removes every binding whose destination is exchange `name` and
    /// returns their sources.
    fn remove_bindings_to_exchange(&mut self, name: &str) -> Vec<String>;
}

impl<Q: Clone + Ord> BindingStore for ExchangeGraph<Q> {
    fn is_auto_delete(&self, name: &str) -> bool {
        self.exchanges.get(name).is_some_and(|x| x.auto_delete)
    }

    fn has_bindings_from(&self, name: &str) -> bool {
        self.exchanges.get(name).is_some_and(|x| x.len > 0)
    }

    fn remove_exchange(&mut self, name: &str) -> bool {
        self.exchanges.remove(name).is_some()
    }

    fn remove_bindings_to_exchange(&mut self, name: &str) -> Vec<String> {
        let mut sources = Vec::new();
        for (source, x) in &mut self.exchanges {
            if x.retain(|d| !matches!(d, Destination::Exchange(e) if e == name)) > 0 {
                sources.push(source.clone());
            }
        }
        sources
    }
}

/// Deletes exchange `name` as RabbitMQ does: with the bindings it is the
/// source of and those it is the destination of; a source left without
/// bindings by that goes too if it is auto-delete, and so on. Returns every
/// exchange deleted, `name` first; empty if it did not exist.
///
/// The caller checks `if-unused` first ([`BindingStore::has_bindings_from`]:
/// only bindings it is the source of make an exchange used).
pub fn delete_exchange<S: BindingStore + ?Sized>(store: &mut S, name: &str) -> Vec<String> {
    let mut deleted = Vec::new();
    let mut work = vec![name.to_owned()];
    while let Some(x) = work.pop() {
        if !store.remove_exchange(&x) {
            continue;
        }
        for source in store.remove_bindings_to_exchange(&x) {
            if store.is_auto_delete(&source) && !store.has_bindings_from(&source) {
                work.push(source);
            }
        }
        deleted.push(x);
    }
    deleted
}

/// Deletes those of `sources` (exchanges that just lost bindings) that are
/// auto-delete and left without bindings, as [`delete_exchange`] does
/// (cascading). Returns every exchange deleted.
pub fn auto_delete<S: BindingStore + ?Sized>(
    store: &mut S,
    sources: impl IntoIterator<Item = String>,
) -> Vec<String> {
    let mut deleted = Vec::new();
    for source in sources {
        if store.is_auto_delete(&source) && !store.has_bindings_from(&source) {
            deleted.extend(delete_exchange(store, &source));
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    type G = ExchangeGraph<u32>;

    fn graph(exchanges: &[(&str, ExchangeKind, Option<&str>)]) -> G {
        let mut g = G::default();
        for (name, kind, ae) in exchanges {
            g.insert(
                name,
                Exchange::new(kind.clone(), false, false, false, ae.map(str::to_owned)),
            );
        }
        g
    }

    fn bind(g: &mut G, x: &str, key: &str, q: u32) {
        assert!(g
            .get_mut(x)
            .unwrap()
            .bind(key, Destination::Queue(q), FieldTable::new()));
    }

    /// Binds exchange `destination` to `source`.
    fn bind_x(
        g: &mut G,
        destination: &str,
        source: &str,
        key: &str,
        args: FieldTable,
    ) -> Result<bool> {
        g.bind(
            source,
            key,
            Destination::Exchange(destination.to_owned()),
            args,
        )
    }

    fn route(g: &G, x: &str, keys: &[&str]) -> Option<Vec<u32>> {
        let mut out = Vec::new();
        g.route(
            x,
            keys.iter().copied(),
            &FieldTable::new(),
            |k| k.parse().ok(),
            &mut out,
        )
        .then_some(out)
    }

    #[test]
    fn alternate_chains_follow_until_something_matches() {
        use ExchangeKind::*;
        let mut g = graph(&[
            ("a", Direct, Some("b")),
            ("b", Direct, Some("c")),
            ("c", Fanout, None),
        ]);
        bind(&mut g, "a", "k", 1);
        bind(&mut g, "b", "j", 2);
        bind(&mut g, "c", "", 3);
        assert_eq!(route(&g, "a", &["k"]), Some(vec![1]));
        assert_eq!(route(&g, "a", &["j"]), Some(vec![2]));
        assert_eq!(route(&g, "a", &["x"]), Some(vec![3]));
        assert_eq!(route(&g, "missing", &["x"]), None);
    }

    #[test]
    fn loops_of_alternates_and_bindings_end() {
        use ExchangeKind::*;
        let mut g = graph(&[("a", Direct, Some("b")), ("b", Direct, Some("a"))]);
        assert_eq!(route(&g, "a", &["k"]), Some(vec![]));
        bind_x(&mut g, "b", "a", "k", FieldTable::new()).unwrap();
        bind_x(&mut g, "a", "b", "k", FieldTable::new()).unwrap();
        bind_x(&mut g, "a", "a", "k", FieldTable::new()).unwrap();
        bind(&mut g, "b", "k", 7);
        bind(&mut g, "a", "k", 7);
        assert_eq!(route(&g, "a", &["k", "k"]), Some(vec![7]));
    }

    #[test]
    fn a_binding_to_an_exchange_counts_as_a_match_for_the_alternate() {
        use ExchangeKind::*;
        let mut g = graph(&[
            ("a", Fanout, Some("ae")),
            ("b", Direct, None),
            ("ae", Fanout, None),
        ]);
        bind(&mut g, "ae", "", 9);
        bind_x(&mut g, "b", "a", "", FieldTable::new()).unwrap();
        assert_eq!(route(&g, "a", &["k"]), Some(vec![]));
    }

    #[test]
    fn queues_come_once_in_their_order() {
        use ExchangeKind::*;
        let mut g = graph(&[("f", Fanout, None), ("t", Topic, None)]);
        bind_x(&mut g, "t", "f", "", FieldTable::new()).unwrap();
        bind(&mut g, "f", "", 5);
        bind(&mut g, "t", "#", 5);
        bind(&mut g, "t", "a.*", 2);
        bind(&mut g, "t", "*.b", 4);
        assert_eq!(route(&g, "f", &["a.b", "c"]), Some(vec![2, 4, 5]));
        assert_eq!(route(&g, "", &["3", "1", "3"]), Some(vec![1, 3]));
    }

    #[test]
    fn deleting_cascades_through_auto_delete_sources() {
        let mut g = G::default();
        g.insert(
            "src",
            Exchange::new(ExchangeKind::Fanout, false, true, false, None),
        );
        g.insert(
            "mid",
            Exchange::new(ExchangeKind::Fanout, false, true, false, None),
        );
        g.insert(
            "dst",
            Exchange::new(ExchangeKind::Fanout, false, false, false, None),
        );
        g.insert(
            "keep",
            Exchange::new(ExchangeKind::Fanout, false, true, false, None),
        );
        bind_x(&mut g, "mid", "src", "", FieldTable::new()).unwrap();
        bind_x(&mut g, "dst", "mid", "", FieldTable::new()).unwrap();
        bind_x(&mut g, "dst", "keep", "", FieldTable::new()).unwrap();
        bind(&mut g, "keep", "", 1);
        assert_eq!(g.delete_exchange("dst"), vec!["dst", "mid", "src"]);
        assert!(g.get("keep").is_some_and(|x| x.binding_count() == 1));
        assert_eq!(g.remove_queue(&1), vec!["keep"]);
        assert!(g.delete_exchange("dst").is_empty());
    }

    #[test]
    fn binding_checks_and_removals() {
        let mut g = graph(&[("h", ExchangeKind::Headers, None)]);
        let bad: FieldTable = [("x-match".to_owned(), FieldValue::from("most"))].into();
        assert!(matches!(
            bind_x(&mut g, "h", "h", "", bad),
            Err(Error::PreconditionFailed(_))
        ));
        assert!(matches!(
            bind_x(&mut g, "nope", "h", "", FieldTable::new()),
            Err(Error::NotFound(m)) if m.contains("nope")
        ));
        assert!(bind_x(&mut g, "h", "h", "", FieldTable::new()).unwrap());
        assert!(!bind_x(&mut g, "h", "h", "", FieldTable::new()).unwrap());
        let h = Destination::Exchange("h".to_owned());
        assert!(g.unbind("h", "", &h, &FieldTable::new()).is_empty());
        assert_eq!(g.get("h").unwrap().binding_count(), 0);
    }

    #[test]
    fn sender_routes_take_strings_of_cc_then_bcc() {
        let h: FieldTable = [
            (
                "BCC".to_owned(),
                FieldValue::Array(vec!["b".into(), FieldValue::I32(1)]),
            ),
            ("CC".to_owned(), FieldValue::Array(vec!["c".into()])),
        ]
        .into();
        assert_eq!(sender_routes(&h).collect::<Vec<_>>(), vec!["c", "b"]);
        assert!(check_sender_routes(&h).is_ok());
        let bad: FieldTable = [("CC".to_owned(), FieldValue::from("c"))].into();
        assert!(
            matches!(check_sender_routes(&bad), Err(Error::PreconditionFailed(m)) if m.contains("CC"))
        );
        let ae: FieldTable = [(ALTERNATE_EXCHANGE.to_owned(), FieldValue::I32(1))].into();
        assert!(
            matches!(alternate_exchange("x", &ae), Err(Error::PreconditionFailed(m)) if m.contains("alternate-exchange"))
        );
    }
}
