//! Topic routing cost against the number of bindings: one key matched
//! against 10 and against 10,000 bindings, the trie and a scan with the
//! reference side by side.

use std::hint::black_box;

use bus_core::routing::{topic_matches, TopicMatcher};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

/// `n` bindings of the shapes services use: exact prefixes with `*` and `#`,
/// wildcards first, `#` in the middle. The key below matches two of them
/// whatever `n` is, so the cost measured is the index's, not the result's.
fn patterns(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 4 {
            0 => format!("app{i}.*.created"),
            1 => format!("app{i}.#"),
            2 => format!("*.svc{i}.#"),
            _ => format!("#.evt{i}.done"),
        })
        .collect()
}

const KEY: &str = "app1.svc2.orders.created";

fn topic(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic_match");
    for n in [10, 10_000] {
        let patterns = patterns(n);
        let mut matcher = TopicMatcher::new();
        for (i, p) in patterns.iter().enumerate() {
            matcher.insert(p, i);
        }
        assert_eq!(matcher.matches(KEY).len(), 2);
        group.bench_with_input(BenchmarkId::new("trie", n), &matcher, |b, m| {
            b.iter(|| {
                let mut hits = 0usize;
                m.for_each_match(black_box(KEY), |_| hits += 1);
                hits
            });
        });
        group.bench_with_input(BenchmarkId::new("reference_scan", n), &patterns, |b, ps| {
            b.iter(|| {
                ps.iter()
                    .filter(|p| topic_matches(p, black_box(KEY)))
                    .count()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, topic);
criterion_main!(benches);
