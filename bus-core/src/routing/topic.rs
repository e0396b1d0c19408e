//! Topic routing: `*` matches one word, `#` zero or more.
//!
//! Words are split as RabbitMQ splits them: the empty string has no words at
//! all, while any other string is its `.`-separated words, empty ones
//! included (`"."` is two empty words, `"a."` is `a` and an empty word). So
//! `*` does not match the empty key, `#` does, and `a.#` matches `a`.

use std::collections::{HashMap, HashSet};
use std::fmt;

/// The words of a routing key or binding pattern.
fn words(s: &str) -> impl Iterator<Item = &str> {
    // RabbitMQ's `split_topic_key` maps "" to no words, not to one empty word.
    (!s.is_empty()).then(|| s.split('.')).into_iter().flatten()
}

/// Whether a topic `pattern` matches a routing `key`: the reference
/// definition, word by word (`*` exactly one word, `#` zero or more words,
/// words split on `.`, empty words allowed, the empty string having no words
/// at all).
///
/// Runs in time proportional to the product of the pattern's and the key's
/// word counts, whatever the number of `#` in the pattern.
#[must_use]
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let key: Vec<&str> = words(key).collect();
    // reachable[j]: the pattern words seen so far can match exactly the first
    // j key words. A table row per pattern word keeps this linear in memory
    // and free of the backtracking a recursive definition needs for `#`.
    let mut reachable = vec![false; key.len() + 1];
    reachable[0] = true;
    for word in words(pattern) {
        match word {
            "#" => {
                let mut any = false;
                for r in reachable.iter_mut() {
                    any |= *r;
                    *r = any;
                }
            }
            _ => {
                for j in (1..=key.len()).rev() {
                    reachable[j] = reachable[j - 1] && (word == "*" || word == key[j - 1]);
                }
                reachable[0] = false;
            }
        }
    }
    reachable[key.len()]
}

/// Patterns with more words than this are kept out of the trie, so that no
/// recursive walk (matching, removal, clone, drop) can go deeper than this
/// whatever a caller passes. AMQP limits binding keys to 255 bytes, at most
/// 256 words, so every pattern a broker accepts fits in the trie.
const MAX_TRIE_DEPTH: usize = 256;

/// One step along a pattern.
#[derive(Clone, Copy)]
enum Edge<'a> {
    Word(&'a str),
    Star,
    Hash,
}

impl<'a> Edge<'a> {
    fn of(word: &'a str) -> Self {
        match word {
            "*" => Edge::Star,
            "#" => Edge::Hash,
            w => Edge::Word(w),
        }
    }
}

/// A trie node: the pattern spelled by the path from the root.
#[derive(Clone)]
struct Node<T> {
    words: HashMap<Box<str>, Node<T>>,
    star: Option<Box<Node<T>>>,
    hash: Option<Box<Node<T>>>,
    /// Values of the bindings whose pattern ends here, in insertion order.
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            words: HashMap::new(),
            star: None,
            hash: None,
            values: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }

    #[cfg(test)]
    fn child(&self, edge: Edge<'_>) -> Option<&Node<T>> {
        match edge {
            Edge::Word(w) => self.words.get(w),
            Edge::Star => self.star.as_deref(),
            Edge::Hash => self.hash.as_deref(),
        }
    }

    fn child_or_insert(&mut self, edge: Edge<'_>) -> &mut Node<T> {
        match edge {
            Edge::Word(w) => self.words.entry(w.into()).or_default(),
            Edge::Star => self.star.get_or_insert_with(Default::default),
            Edge::Hash => self.hash.get_or_insert_with(Default::default),
        }
    }

    /// Removes `value` from the binding at the end of `path`, dropping the
    /// nodes that are left with nothing below them.
    fn remove<'p>(&mut self, mut path: impl Iterator<Item = &'p str>, value: &T) -> bool
    where
        T: PartialEq,
    {
        let Some(word) = path.next() else {
            let Some(i) = self.values.iter().position(|v| v == value) else {
                return false;
            };
            // `remove`, not `swap_remove`: the order of matches stays the
            // order of insertion, which keeps routing reproducible.
            self.values.remove(i);
            return true;
        };
        match Edge::of(word) {
            Edge::Word(w) => {
                let Some(child) = self.words.get_mut(w) else {
                    return false;
                };
                let removed = child.remove(path, value);
                if removed && child.is_empty() {
                    self.words.remove(w);
                }
                removed
            }
            Edge::Star => Self::remove_in_slot(&mut self.star, path, value),
            Edge::Hash => Self::remove_in_slot(&mut self.hash, path, value),
        }
    }

    fn remove_in_slot<'p>(
        slot: &mut Option<Box<Node<T>>>,
        path: impl Iterator<Item = &'p str>,
        value: &T,
    ) -> bool
    where
        T: PartialEq,
    {
        let Some(child) = slot else {
            return false;
        };
        let removed = child.remove(path, value);
        if removed && child.is_empty() {
            *slot = None;
        }
        removed
    }

    /// Keeps the values `keep` accepts, prunes emptied nodes, and returns
    /// how many values were dropped.
    fn retain(&mut self, keep: &mut impl FnMut(&T) -> bool) -> usize {
        let before = self.values.len();
        self.values.retain(|v| keep(v));
        let mut dropped = before - self.values.len();
        self.words.retain(|_, child| {
            dropped += child.retain(keep);
            !child.is_empty()
        });
        for slot in [&mut self.star, &mut self.hash] {
            if let Some(child) = slot {
                dropped += child.retain(keep);
                if child.is_empty() {
                    *slot = None;
                }
            }
        }
        dropped
    }

    /// Calls `f` with every binding below this node and its pattern.
    fn for_each_binding<'s>(
        &'s self,
        pattern: &mut Vec<&'s str>,
        f: &mut impl FnMut(String, &'s T),
    ) {
        for v in &self.values {
            f(pattern.join("."), v);
        }
        let children = self
            .words
            .iter()
            .map(|(w, c)| (&**w, c))
            .chain(self.star.as_deref().map(|c| ("*", c)))
            .chain(self.hash.as_deref().map(|c| ("#", c)));
        for (word, child) in children {
            pattern.push(word);
            child.for_each_binding(pattern, f);
            pattern.pop();
        }
    }
}

/// The key words still to match: `None` once all are consumed. A suffix of
/// the key, so its length identifies the position.
type Rest<'k> = Option<&'k str>;

fn split_first_word(rest: &str) -> (&str, Rest<'_>) {
    match rest.split_once('.') {
        Some((word, tail)) => (word, Some(tail)),
        None => (rest, None),
    }
}

/// One matching pass over the trie for one key.
struct Walk<F> {
    emit: F,
    /// `(node address, remaining key length)` of the `#` nodes already
    /// expanded. Only needed below a second `#`: with at most one `#` on a
    /// path, each trie node is reached at each key position at most once.
    /// Allocated the first time that happens.
    expanded: Option<HashSet<(*const (), usize)>>,
}

impl<F> Walk<F> {
    fn visit<'t, T>(&mut self, node: &'t Node<T>, rest: Rest<'_>, hashes_on_path: u32)
    where
        F: FnMut(&'t T),
    {
        match rest {
            None => {
                for v in &node.values {
                    (self.emit)(v);
                }
                if let Some(hash) = node.hash.as_deref() {
                    self.visit_hash(hash, None, hashes_on_path + 1);
                }
            }
            Some(r) => {
                let (word, tail) = split_first_word(r);
                if let Some(child) = node.words.get(word) {
                    self.visit(child, tail, hashes_on_path);
                }
                if let Some(child) = node.star.as_deref() {
                    self.visit(child, tail, hashes_on_path);
                }
                if let Some(hash) = node.hash.as_deref() {
                    self.visit_hash(hash, rest, hashes_on_path + 1);
                }
            }
        }
    }

    /// Enters a `#` node having consumed the key up to `rest`, and lets the
    /// `#` swallow each number of further words in turn (a loop rather than
    /// recursion, so a long key cannot deepen the stack).
    fn visit_hash<'t, T>(&mut self, hash: &'t Node<T>, mut rest: Rest<'_>, hashes_on_path: u32)
    where
        F: FnMut(&'t T),
    {
        loop {
            if hashes_on_path >= 2 {
                let address = std::ptr::from_ref(hash).cast::<()>();
                let position = rest.map_or(usize::MAX, str::len);
                let expanded = self.expanded.get_or_insert_with(HashSet::new);
                // Whoever expanded this node at this position also went on
                // through every later position: nothing left to do, and
                // going on would report its bindings twice.
                if !expanded.insert((address, position)) {
                    return;
                }
            }
            self.visit(hash, rest, hashes_on_path);
            match rest {
                None => return,
                Some(r) => rest = split_first_word(r).1,
            }
        }
    }
}

/// An index of topic bindings: pattern and value pairs, matched against
/// routing keys.
///
/// A trie over the patterns' words: matching a key costs in proportion to
/// the key's words and the bindings that match, not to the number of
/// bindings, so thousands of bindings route as fast as ten. Patterns that
/// reach the same binding along several paths (`#.#`, `#.a.#`) still report
/// it once.
///
/// Inserting the same pattern and value twice keeps one entry. Patterns and
/// keys follow [`topic_matches`] exactly.
pub struct TopicMatcher<T> {
    root: Node<T>,
    /// Bindings whose pattern has more than [`MAX_TRIE_DEPTH`] words, in
    /// insertion order; matched one by one with [`topic_matches`].
    deep: Vec<(Box<str>, T)>,
    len: usize,
}

impl<T> Default for TopicMatcher<T> {
    fn default() -> Self {
        TopicMatcher {
            root: Node::default(),
            deep: Vec::new(),
            len: 0,
        }
    }
}

impl<T: Clone> Clone for TopicMatcher<T> {
    fn clone(&self) -> Self {
        TopicMatcher {
            root: self.root.clone(),
            deep: self.deep.clone(),
            len: self.len,
        }
    }
}

/// Lists the bindings as `pattern: value`, sorted by pattern so the output
/// is the same on every run.
impl<T: fmt::Debug> fmt::Debug for TopicMatcher<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bindings: Vec<(String, &T)> = Vec::with_capacity(self.len);
        self.root
            .for_each_binding(&mut Vec::new(), &mut |p, v| bindings.push((p, v)));
        bindings.extend(self.deep.iter().map(|(p, v)| (p.to_string(), v)));
        bindings.sort_by(|a, b| a.0.cmp(&b.0));
        f.debug_struct("TopicMatcher")
            .field("len", &self.len)
            .field("bindings", &DebugBindings(&bindings))
            .finish()
    }
}

struct DebugBindings<'a, T>(&'a [(String, &'a T)]);

impl<T: fmt::Debug> fmt::Debug for DebugBindings<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(p, v)| (p, v)))
            .finish()
    }
}

fn is_deep(pattern: &str) -> bool {
    words(pattern).nth(MAX_TRIE_DEPTH).is_some()
}

impl<T: Clone + PartialEq> TopicMatcher<T> {
    /// An empty index.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a binding; returns `false` if it was there already.
    ///
    /// Costs the pattern's words plus the number of values already bound
    /// with the same pattern (values are only comparable, not hashable).
    pub fn insert(&mut self, pattern: &str, value: T) -> bool {
        if is_deep(pattern) {
            if self
                .deep
                .iter()
                .any(|(p, v)| **p == *pattern && *v == value)
            {
                return false;
            }
            self.deep.push((pattern.into(), value));
            self.len += 1;
            return true;
        }
        let node = words(pattern).fold(&mut self.root, |node, word| {
            node.child_or_insert(Edge::of(word))
        });
        // When the value is already there the path existed before, so the
        // walk above created no empty node to clean up.
        if node.values.contains(&value) {
            return false;
        }
        node.values.push(value);
        self.len += 1;
        true
    }

    /// Removes a binding; returns whether it was there. Trie nodes left
    /// without bindings below them are freed.
    pub fn remove(&mut self, pattern: &str, value: &T) -> bool {
        let removed = if is_deep(pattern) {
            let before = self.deep.len();
            self.deep.retain(|(p, v)| !(**p == *pattern && v == value));
            before != self.deep.len()
        } else {
            self.root.remove(words(pattern), value)
        };
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Removes every binding whose value does not satisfy `f` (keeps those
    /// for which it returns `true`). `f` sees each binding once, in no
    /// particular order.
    pub fn retain(&mut self, mut f: impl FnMut(&T) -> bool) {
        let mut dropped = self.root.retain(&mut f);
        let before = self.deep.len();
        self.deep.retain(|(_, v)| f(v));
        dropped += before - self.deep.len();
        self.len -= dropped;
    }

    /// Calls `f` with the value of every binding whose pattern matches
    /// `key`, once per binding.
    ///
    /// The order is unspecified but reproducible: the same inserts and
    /// removes in the same order give the same order of matches on every
    /// run. Allocates nothing unless a matching pattern holds two or more
    /// `#`.
    pub fn for_each_match<'t>(&'t self, key: &str, mut f: impl FnMut(&'t T)) {
        let rest = (!key.is_empty()).then_some(key);
        let mut walk = Walk {
            emit: &mut f,
            expanded: None,
        };
        walk.visit(&self.root, rest, 0);
        for (pattern, value) in &self.deep {
            if topic_matches(pattern, key) {
                f(value);
            }
        }
    }

    /// The values of every binding that matches `key`, in the order of
    /// [`for_each_match`](Self::for_each_match).
    #[must_use]
    pub fn matches(&self, key: &str) -> Vec<T> {
        let mut out = Vec::new();
        self.for_each_match(key, |v| out.push(v.clone()));
        out
    }

    /// Number of bindings.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bindings.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> TopicMatcher<T> {
    /// Whether the trie holds a node for the exact pattern `pattern` (bound
    /// or only on the way to a binding); lets tests check pruning.
    #[cfg(test)]
    fn has_node(&self, pattern: &str) -> bool {
        let mut node = &self.root;
        for word in words(pattern) {
            match node.child(Edge::of(word)) {
                Some(child) => node = child,
                None => return false,
            }
        }
        true
    }

    #[cfg(test)]
    fn node_count(&self) -> usize {
        fn count<T>(n: &Node<T>) -> usize {
            1 + n.words.values().map(count).sum::<usize>()
                + n.star.as_deref().map_or(0, count)
                + n.hash.as_deref().map_or(0, count)
        }
        count(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What RabbitMQ 3.10.8 routed: a topic exchange with one queue bound
    /// per pattern, every key in `PROBE_KEYS` published once; each pattern
    /// is listed with the keys whose message reached its queue, and no
    /// other key did.
    const PROBE_KEYS: [&str; 23] = [
        "", "a", "b", "a.b", "a.c", "a.b.c", "a..b", "a.", ".a", ".", "..", "a.x.b", "a.a",
        "a.b.b", "b.a", "a.x.c", "a.c.c", "#", "*", "a*", "##", "x.a.y", "a.b.c.d",
    ];
    const PROBE_MATCHES: &[(&str, &[&str])] = &[
        (
            "#",
            &[
                "", "a", "b", "a.b", "a.c", "a.b.c", "a..b", "a.", ".a", ".", "..", "a.x.b", "a.a",
                "a.b.b", "b.a", "a.x.c", "a.c.c", "#", "*", "a*", "##", "x.a.y", "a.b.c.d",
            ],
        ),
        ("*", &["a", "b", "#", "*", "a*", "##"]),
        ("", &[""]),
        ("a", &["a"]),
        (
            "a.#",
            &[
                "a", "a.b", "a.c", "a.b.c", "a..b", "a.", "a.x.b", "a.a", "a.b.b", "a.x.c",
                "a.c.c", "a.b.c.d",
            ],
        ),
        ("#.a", &["a", ".a", "a.a", "b.a"]),
        ("a.*", &["a.b", "a.c", "a.", "a.a"]),
        ("*.a", &[".a", "a.a", "b.a"]),
        ("a.*.c", &["a.b.c", "a.x.c", "a.c.c"]),
        (
            "#.#",
            &[
                "", "a", "b", "a.b", "a.c", "a.b.c", "a..b", "a.", ".a", ".", "..", "a.x.b", "a.a",
                "a.b.b", "b.a", "a.x.c", "a.c.c", "#", "*", "a*", "##", "x.a.y", "a.b.c.d",
            ],
        ),
        (
            "#.a.#",
            &[
                "a", "a.b", "a.c", "a.b.c", "a..b", "a.", ".a", "a.x.b", "a.a", "a.b.b", "b.a",
                "a.x.c", "a.c.c", "x.a.y", "a.b.c.d",
            ],
        ),
        (
            "a.#.#",
            &[
                "a", "a.b", "a.c", "a.b.c", "a..b", "a.", "a.x.b", "a.a", "a.b.b", "a.x.c",
                "a.c.c", "a.b.c.d",
            ],
        ),
        (
            "#.*",
            &[
                "a", "b", "a.b", "a.c", "a.b.c", "a..b", "a.", ".a", ".", "..", "a.x.b", "a.a",
                "a.b.b", "b.a", "a.x.c", "a.c.c", "#", "*", "a*", "##", "x.a.y", "a.b.c.d",
            ],
        ),
        (
            "*.#",
            &[
                "a", "b", "a.b", "a.c", "a.b.c", "a..b", "a.", ".a", ".", "..", "a.x.b", "a.a",
                "a.b.b", "b.a", "a.x.c", "a.c.c", "#", "*", "a*", "##", "x.a.y", "a.b.c.d",
            ],
        ),
        ("*.*", &["a.b", "a.c", "a.", ".a", ".", "a.a", "b.a"]),
        (
            "#.*.#",
            &[
                "a", "b", "a.b", "a.c", "a.b.c", "a..b", "a.", ".a", ".", "..", "a.x.b", "a.a",
                "a.b.b", "b.a", "a.x.c", "a.c.c", "#", "*", "a*", "##", "x.a.y", "a.b.c.d",
            ],
        ),
        ("a..b", &["a..b"]),
        ("a.*.b", &["a..b", "a.x.b", "a.b.b"]),
        ("a.#.b", &["a.b", "a..b", "a.x.b", "a.b.b"]),
        ("a.", &["a."]),
        (".a", &[".a"]),
        (".", &["."]),
        ("*.", &["a.", "."]),
        (".*", &[".a", "."]),
        ("#.", &["a.", ".", ".."]),
        (".#", &[".a", ".", ".."]),
        ("..", &[".."]),
        (
            "#.#.#",
            &[
                "", "a", "b", "a.b", "a.c", "a.b.c", "a..b", "a.", ".a", ".", "..", "a.x.b", "a.a",
                "a.b.b", "b.a", "a.x.c", "a.c.c", "#", "*", "a*", "##", "x.a.y", "a.b.c.d",
            ],
        ),
        (
            "a.#.*",
            &[
                "a.b", "a.c", "a.b.c", "a..b", "a.", "a.x.b", "a.a", "a.b.b", "a.x.c", "a.c.c",
                "a.b.c.d",
            ],
        ),
        ("#.b", &["b", "a.b", "a..b", "a.x.b", "a.b.b"]),
        ("a.b.#", &["a.b", "a.b.c", "a.b.b", "a.b.c.d"]),
        (
            "*.*.*",
            &[
                "a.b.c", "a..b", "..", "a.x.b", "a.b.b", "a.x.c", "a.c.c", "x.a.y",
            ],
        ),
        ("#..#", &["a..b", "a.", ".a", ".", ".."]),
        ("##", &["##"]),
        ("a*", &["a*"]),
        ("a.#.c.#", &["a.c", "a.b.c", "a.x.c", "a.c.c", "a.b.c.d"]),
    ];
    #[test]
    fn reference_agrees_with_rabbitmq() {
        for (pattern, expected) in PROBE_MATCHES {
            for key in PROBE_KEYS {
                assert_eq!(
                    topic_matches(pattern, key),
                    expected.contains(&key),
                    "pattern {pattern:?} key {key:?}"
                );
            }
        }
    }

    #[test]
    fn matcher_agrees_with_rabbitmq() {
        let mut m = TopicMatcher::new();
        for (pattern, _) in PROBE_MATCHES {
            assert!(m.insert(pattern, (*pattern).to_owned()));
        }
        for key in PROBE_KEYS {
            let mut got = m.matches(key);
            got.sort();
            let mut want: Vec<String> = PROBE_MATCHES
                .iter()
                .filter(|(_, keys)| keys.contains(&key))
                .map(|(p, _)| (*p).to_owned())
                .collect();
            want.sort();
            assert_eq!(got, want, "key {key:?}");
        }
    }

    #[test]
    fn a_binding_reached_along_several_paths_is_reported_once() {
        let mut m = TopicMatcher::new();
        for p in ["#.#", "#.a.#", "#.#.#", "a.#.#", "#.a.#.a.#", "#"] {
            m.insert(p, p);
        }
        let mut got = m.matches("a.a.a.a");
        got.sort_unstable();
        assert_eq!(got, ["#", "#.#", "#.#.#", "#.a.#", "#.a.#.a.#", "a.#.#"]);
        assert_eq!(m.matches("").len(), 3, "# #.# #.#.# match the empty key");
    }

    #[test]
    fn many_hashes_against_a_long_key_stay_polynomial() {
        let pattern = vec!["#"; 60].join(".") + ".z";
        let key = vec!["a"; 200].join(".");
        let mut m = TopicMatcher::new();
        m.insert(&pattern, 1);
        assert!(m.matches(&key).is_empty());
        assert_eq!(m.matches(&(key + ".z")), [1]);
        assert!(topic_matches(&pattern, "z"));
    }

    #[test]
    fn insert_is_idempotent_and_values_share_patterns() {
        let mut m = TopicMatcher::new();
        assert!(m.insert("a.*", 1));
        assert!(!m.insert("a.*", 1));
        assert!(m.insert("a.*", 2));
        assert!(m.insert("a.#", 1));
        assert_eq!(m.len(), 3);
        assert_eq!(m.matches("a.b"), [1, 2, 1]);
    }

    #[test]
    fn remove_prunes_empty_nodes() {
        let mut m = TopicMatcher::new();
        m.insert("a.b.c.#", 1);
        m.insert("a.b", 2);
        m.insert("a.*.#.d", 3);
        assert!(!m.remove("a.b.c.#", &2));
        assert!(!m.remove("a.b.c", &1));
        assert!(m.remove("a.b.c.#", &1));
        assert!(!m.has_node("a.b.c"));
        assert!(m.has_node("a.b"));
        assert!(m.remove("a.b", &2));
        assert!(!m.has_node("a.b"));
        assert!(m.remove("a.*.#.d", &3));
        assert!(!m.has_node("a"));
        assert_eq!(m.node_count(), 1);
        assert!(m.is_empty());
        assert!(m.matches("a.b").is_empty());
    }

    #[test]
    fn retain_drops_values_and_prunes() {
        let mut m = TopicMatcher::new();
        for (i, p) in ["a", "a.b", "*.#", "a.b", "#"].iter().enumerate() {
            m.insert(p, i);
        }
        m.retain(|&v| v % 2 == 0);
        assert_eq!(m.len(), 3);
        assert!(!m.has_node("a.b"));
        let mut got = m.matches("a");
        got.sort_unstable();
        assert_eq!(got, [0, 2, 4]);
        m.retain(|_| false);
        assert!(m.is_empty());
        assert_eq!(m.node_count(), 1);
    }

    #[test]
    fn patterns_deeper_than_the_trie_still_match() {
        let deep = vec!["*"; MAX_TRIE_DEPTH + 5].join(".");
        let key = vec!["k"; MAX_TRIE_DEPTH + 5].join(".");
        let mut m = TopicMatcher::new();
        assert!(m.insert(&deep, 7));
        assert!(!m.insert(&deep, 7));
        assert!(m.insert("#", 8));
        assert_eq!(m.len(), 2);
        assert_eq!(m.matches(&key), [8, 7]);
        assert_eq!(m.matches("k"), [8]);
        assert!(m.remove(&deep, &7));
        assert_eq!(m.len(), 1);
        assert_eq!(m.matches(&key), [8]);
    }

    #[test]
    fn match_order_is_insertion_order_within_a_pattern() {
        let mut m = TopicMatcher::new();
        for v in [5, 3, 9, 1] {
            m.insert("x.#", v);
        }
        m.remove("x.#", &3);
        assert_eq!(m.matches("x.y"), [5, 9, 1]);
    }

    #[test]
    fn debug_lists_bindings_sorted_by_pattern() {
        let mut m = TopicMatcher::new();
        m.insert("b.*", 1);
        m.insert("a.#", 2);
        m.insert("", 3);
        assert_eq!(
            format!("{m:?}"),
            r#"TopicMatcher { len: 3, bindings: {"": 3, "a.#": 2, "b.*": 1} }"#
        );
    }

    #[test]
    fn clone_is_independent() {
        let mut m = TopicMatcher::new();
        m.insert("a.*", 1);
        let c = m.clone();
        m.remove("a.*", &1);
        assert_eq!(c.matches("a.b"), [1]);
        assert!(m.matches("a.b").is_empty());
    }
}
