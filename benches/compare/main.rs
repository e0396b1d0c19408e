//! Side-by-side benchmarks: each scenario measures the library and the
//! baseline a user would otherwise pick, in the same run, on the same
//! payloads, and prints their ratio.
//!
//! ```text
//! cargo bench --bench compare                       # every scenario
//! cargo bench --bench compare -- local-throughput   # only the named ones
//! BENCH_SECS=1 cargo bench --bench compare          # shorter runs
//! # one side of local-worker alone, for an instruction count:
//! valgrind --tool=callgrind target/release/deps/compare-<hash> bus-bench-worker-alone worker 20000 1
//! ```
//!
//! Each comparison prints one line
//! `RESULT scenario=<name> ours=<v> baseline=<name>:<v> unit=<unit> ratio=<r>`
//! where a higher ratio is better for the library, then a markdown table of
//! every result.

mod support;

mod amqp;
mod file;
mod local;
mod worker;

use support::Report;

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if let Some(n) = support::rss_child_request() {
        support::rss_child(n);
        return;
    }
    if let Some((side, n, concurrency)) = worker::alone_request() {
        worker::alone(&side, n, concurrency);
        return;
    }
    if let Some((mode, dir, count, gap)) = file::writer_request() {
        file::writer(&mode, &dir, count, gap);
        return;
    }
    let wanted =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let mut report = Report::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        local::run(&wanted, &mut report).await;
        file::run(&wanted, &mut report).await;
        amqp::run(&wanted, &mut report).await;
    });
    report.print_table();
}
