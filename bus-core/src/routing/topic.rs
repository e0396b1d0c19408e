//! Topic routing: `*` matches one word, `#` zero or more.

/// Whether a topic `pattern` matches a routing `key`: the reference
/// definition, word by word (`*` exactly one word, `#` zero or more words,
/// words split on `.`, empty words allowed).
#[must_use]
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&w, rest)) => match k.split_first() {
                Some((&kw, krest)) => (w == "*" || w == kw) && go(rest, krest),
                None => false,
            },
        }
    }
    go(&p, &k)
}

/// An index of topic bindings: pattern and value pairs, matched against
/// routing keys.
///
/// Inserting the same pattern and value twice keeps one entry.
#[derive(Debug, Clone)]
pub struct TopicMatcher<T> {
    entries: Vec<(String, T)>,
}

impl<T> Default for TopicMatcher<T> {
    fn default() -> Self {
        TopicMatcher {
            entries: Vec::new(),
        }
    }
}

impl<T: Clone + PartialEq> TopicMatcher<T> {
    /// An empty index.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a binding; returns `false` if it was there already.
    pub fn insert(&mut self, pattern: &str, value: T) -> bool {
        if self.entries.iter().any(|(p, v)| p == pattern && *v == value) {
            return false;
        }
        self.entries.push((pattern.to_owned(), value));
        true
    }

    /// Removes a binding; returns whether it was there.
    pub fn remove(&mut self, pattern: &str, value: &T) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(p, v)| !(p == pattern && v == value));
        before != self.entries.len()
    }

    /// Removes every binding whose value satisfies `f`.
    pub fn retain(&mut self, mut f: impl FnMut(&T) -> bool) {
        self.entries.retain(|(_, v)| f(v));
    }

    /// Calls `f` with the value of every binding whose pattern matches
    /// `key`, once per binding.
    pub fn for_each_match(&self, key: &str, mut f: impl FnMut(&T)) {
        for (p, v) in &self.entries {
            if topic_matches(p, key) {
                f(v);
            }
        }
    }

    /// The values of every binding that matches `key`.
    #[must_use]
    pub fn matches(&self, key: &str) -> Vec<T> {
        let mut out = Vec::new();
        self.for_each_match(key, |v| out.push(v.clone()));
        out
    }

    /// Number of bindings.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no bindings.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
