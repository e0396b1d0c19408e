//! Properties of the routing module against naive references written here.

use std::collections::BTreeSet;

use bus_core::routing::{headers_match, topic_matches, TopicMatcher};
use bus_core::{Bytes, FieldTable, FieldValue};
use proptest::prelude::*;

/// The definition of topic matching, as directly as it can be written:
/// backtracking over `#`, the empty string having no words.
fn naive_topic_matches(pattern: &str, key: &str) -> bool {
    fn words(s: &str) -> Vec<&str> {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split('.').collect()
        }
    }
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
    go(&words(pattern), &words(key))
}

/// Words over a small alphabet, so random patterns and keys collide often.
fn key_word() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "c", ""])
}

fn pattern_word() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "c", "", "*", "#", "#", "*"])
}

fn key() -> impl Strategy<Value = String> {
    prop::collection::vec(key_word(), 0..7).prop_map(|w| w.join("."))
}

fn pattern() -> impl Strategy<Value = String> {
    prop::collection::vec(pattern_word(), 0..6).prop_map(|w| w.join("."))
}

#[derive(Debug, Clone)]
enum Op {
    Insert(String, u8),
    Remove(String, u8),
    /// Keep only the values not divisible by this.
    RetainNotMultipleOf(u8),
}

fn op(patterns: Vec<String>) -> impl Strategy<Value = Op> {
    let pick = prop::sample::select(patterns);
    prop_oneof![
        6 => (pick.clone(), 0u8..4).prop_map(|(p, v)| Op::Insert(p, v)),
        3 => (pick, 0u8..4).prop_map(|(p, v)| Op::Remove(p, v)),
        1 => (2u8..5).prop_map(Op::RetainNotMultipleOf),
    ]
}

/// A pool of patterns, then operations drawing from it (so removes hit
/// bindings that exist), then keys to route.
fn scenario() -> impl Strategy<Value = (Vec<Op>, Vec<String>)> {
    prop::collection::vec(pattern(), 1..12).prop_flat_map(|pool| {
        (
            prop::collection::vec(op(pool), 0..60),
            prop::collection::vec(key(), 1..12),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn reference_follows_the_definition(p in pattern(), k in key()) {
        prop_assert_eq!(topic_matches(&p, &k), naive_topic_matches(&p, &k));
    }

    #[test]
    fn matcher_equals_filtering_with_the_reference((ops, keys) in scenario()) {
        let mut matcher = TopicMatcher::new();
        // The model: the set of bindings, each (pattern, value) once.
        let mut model: BTreeSet<(String, u8)> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Insert(p, v) => {
                    let fresh = model.insert((p.clone(), v));
                    prop_assert_eq!(matcher.insert(&p, v), fresh);
                }
                Op::Remove(p, v) => {
                    let present = model.remove(&(p.clone(), v));
                    prop_assert_eq!(matcher.remove(&p, &v), present);
                }
                Op::RetainNotMultipleOf(d) => {
                    model.retain(|(_, v)| v % d != 0);
                    matcher.retain(|v| v % d != 0);
                }
            }
            prop_assert_eq!(matcher.len(), model.len());
            prop_assert_eq!(matcher.is_empty(), model.is_empty());
        }
        for k in &keys {
            // Collected as a multiset: a binding reported twice would show.
            let mut got: Vec<u8> = Vec::new();
            matcher.for_each_match(k, |v| got.push(*v));
            let mut want: Vec<u8> = model
                .iter()
                .filter(|(p, _)| topic_matches(p, k))
                .map(|(_, v)| *v)
                .collect();
            got.sort_unstable();
            want.sort_unstable();
            prop_assert_eq!(&got, &want, "key {:?}", k);
            let mut via_matches = matcher.matches(k);
            via_matches.sort_unstable();
            prop_assert_eq!(via_matches, want);
        }
    }

    #[test]
    fn each_binding_is_reported_once(patterns in prop::collection::vec(pattern(), 1..20), k in key()) {
        let mut matcher = TopicMatcher::new();
        for (i, p) in patterns.iter().enumerate() {
            matcher.insert(p, i);
        }
        let mut got = matcher.matches(&k);
        got.sort_unstable();
        let want: Vec<usize> = (0..patterns.len())
            .filter(|&i| topic_matches(&patterns[i], &k))
            .collect();
        prop_assert_eq!(got, want);
    }
}

/// The headers-exchange rule as RabbitMQ states it, written independently of
/// the library: the arguments that count, then all/any over them.
fn naive_headers_match(arguments: &FieldTable, headers: &FieldTable) -> bool {
    let mode = match arguments.get("x-match") {
        Some(FieldValue::String(s)) => s.as_str(),
        _ => "all",
    };
    let with_x = mode.ends_with("-with-x");
    let any = mode.starts_with("any");
    let counted: Vec<(&String, &FieldValue)> = arguments
        .iter()
        .filter(|(k, _)| *k != "x-match")
        .filter(|(k, _)| with_x || !k.starts_with("x-"))
        .collect();
    let satisfied = counted
        .iter()
        .filter(|(k, v)| match headers.get(*k) {
            None => false,
            Some(h) => matches!(v, FieldValue::Void) || naive_equal(v, h),
        })
        .count();
    if any {
        satisfied > 0
    } else {
        satisfied == counted.len()
    }
}

/// Erlang's `==` on parsed AMQP values at the top level: numbers by value,
/// binaries (strings and bytes) by content, `[]` for empty tables and
/// arrays, anything else by type and value.
fn naive_equal(a: &FieldValue, b: &FieldValue) -> bool {
    fn number(v: &FieldValue) -> Option<f64> {
        // Exact for the small numbers the strategies below produce.
        Some(match *v {
            FieldValue::I8(n) => n.into(),
            FieldValue::U8(n) => n.into(),
            FieldValue::I16(n) => n.into(),
            FieldValue::U16(n) => n.into(),
            FieldValue::I32(n) => n.into(),
            FieldValue::U32(n) => n.into(),
            FieldValue::I64(n) => n as f64,
            FieldValue::Timestamp(n) => n as f64,
            FieldValue::F32(x) => x.into(),
            FieldValue::F64(x) => x,
            _ => return None,
        })
    }
    fn binary(v: &FieldValue) -> Option<&[u8]> {
        match v {
            FieldValue::String(s) => Some(s.as_bytes()),
            FieldValue::Bytes(b) => Some(b),
            _ => None,
        }
    }
    fn empty_list(v: &FieldValue) -> bool {
        matches!(v, FieldValue::Array(a) if a.is_empty())
            || matches!(v, FieldValue::Table(t) if t.is_empty())
    }
    if let (Some(x), Some(y)) = (number(a), number(b)) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (binary(a), binary(b)) {
        return x == y;
    }
    if empty_list(a) && empty_list(b) {
        return true;
    }
    a == b
}

fn field_value() -> impl Strategy<Value = FieldValue> {
    let leaf = prop_oneof![
        (0i8..3).prop_map(FieldValue::I8),
        (0u8..3).prop_map(FieldValue::U8),
        (0i16..3).prop_map(FieldValue::I16),
        (0i32..3).prop_map(FieldValue::I32),
        (0u32..3).prop_map(FieldValue::U32),
        (0i64..3).prop_map(FieldValue::I64),
        (0u64..3).prop_map(FieldValue::Timestamp),
        prop::sample::select(vec![0.0f32, 0.5, 1.0, 2.0]).prop_map(FieldValue::F32),
        prop::sample::select(vec![0.0f64, -0.0, 0.5, 1.0, 2.0]).prop_map(FieldValue::F64),
        any::<bool>().prop_map(FieldValue::Bool),
        prop::sample::select(vec!["", "1", "x"]).prop_map(FieldValue::from),
        prop::sample::select(vec!["", "1", "x"])
            .prop_map(|s| FieldValue::Bytes(Bytes::from_static(s.as_bytes()))),
        (0u8..2, 0u32..3).prop_map(|(scale, value)| FieldValue::Decimal { scale, value }),
        Just(FieldValue::Void),
    ];
    leaf.prop_recursive(2, 8, 2, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..2).prop_map(FieldValue::Array),
            prop::collection::btree_map(
                prop::sample::select(vec!["p".to_owned(), "q".to_owned()]),
                inner,
                0..2
            )
            .prop_map(FieldValue::Table),
        ]
    })
}

fn header_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c", "x-a", "x-b", "x-match"]).prop_map(str::to_owned)
}

fn headers() -> impl Strategy<Value = FieldTable> {
    prop::collection::btree_map(header_name(), field_value(), 0..5)
}

fn binding_arguments() -> impl Strategy<Value = FieldTable> {
    let mode = prop::option::of(prop::sample::select(vec![
        "all",
        "any",
        "all-with-x",
        "any-with-x",
    ]));
    (
        prop::collection::btree_map(header_name(), field_value(), 0..4),
        mode,
    )
        .prop_map(|(mut arguments, mode)| {
            match mode {
                Some(m) => {
                    arguments.insert("x-match".to_owned(), FieldValue::from(m));
                }
                None => {
                    arguments.remove("x-match");
                }
            }
            arguments
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn headers_match_equals_the_naive_rule(arguments in binding_arguments(), mut headers in headers()) {
        prop_assert_eq!(
            headers_match(&arguments, &headers),
            naive_headers_match(&arguments, &headers),
            "arguments {:?} headers {:?}", arguments, headers
        );
        // Copying the counted arguments into the headers always satisfies
        // `all`, and `any` whenever something counts.
        for (k, v) in &arguments {
            if k != "x-match" {
                headers.insert(k.clone(), v.clone());
            }
        }
        let mode = arguments.get("x-match").and_then(FieldValue::as_str).unwrap_or("all");
        let counts_something = arguments
            .keys()
            .any(|k| k != "x-match" && (mode.ends_with("-with-x") || !k.starts_with("x-")));
        prop_assert_eq!(
            headers_match(&arguments, &headers),
            mode.starts_with("all") || counts_something
        );
    }
}
