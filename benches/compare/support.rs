//! Measuring, reporting, and the child process for the memory check.

use std::time::{Duration, Instant};

/// How long each side of a scenario runs after its warm-up.
pub fn run_time() -> Duration {
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs.max(0.2))
}

/// One comparison's outcome.
pub struct Outcome {
    pub scenario: String,
    pub ours: f64,
    pub baseline_name: String,
    pub baseline: f64,
    pub unit: &'static str,
    /// Higher is better for the library.
    pub ratio: f64,
    pub note: String,
}

/// Collects outcomes and prints them.
#[derive(Default)]
pub struct Report {
    outcomes: Vec<Outcome>,
}

impl Report {
    /// Records a throughput comparison (higher is better): ratio = ours/baseline.
    pub fn throughput(
        &mut self,
        scenario: &str,
        ours: f64,
        baseline_name: &str,
        baseline: f64,
        unit: &'static str,
        note: impl Into<String>,
    ) {
        self.push(Outcome {
            scenario: scenario.into(),
            ours,
            baseline_name: baseline_name.into(),
            baseline,
            unit,
            ratio: ours / baseline,
            note: note.into(),
        });
    }

    /// Records a cost comparison (lower is better, e.g. microseconds or
    /// bytes): ratio = baseline/ours so that higher is still better.
    pub fn cost(
        &mut self,
        scenario: &str,
        ours: f64,
        baseline_name: &str,
        baseline: f64,
        unit: &'static str,
        note: impl Into<String>,
    ) {
        self.push(Outcome {
            scenario: scenario.into(),
            ours,
            baseline_name: baseline_name.into(),
            baseline,
            unit,
            ratio: baseline / ours,
            note: note.into(),
        });
    }

    fn push(&mut self, o: Outcome) {
        println!(
            "RESULT scenario={} ours={} baseline={}:{} unit={} ratio={:.3}",
            o.scenario,
            fmt(o.ours),
            o.baseline_name,
            fmt(o.baseline),
            o.unit,
            o.ratio
        );
        self.outcomes.push(o);
    }

    /// Prints every outcome as a markdown table.
    pub fn print_table(&self) {
        println!();
        println!("| scenario | ours | baseline | unit | ratio | note |");
        println!("|---|---:|---|---|---:|---|");
        for o in &self.outcomes {
            println!(
                "| {} | {} | {}: {} | {} | {:.3} | {} |",
                o.scenario,
                fmt(o.ours),
                o.baseline_name,
                fmt(o.baseline),
                o.unit,
                o.ratio,
                o.note
            );
        }
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Runs `batch` (which processes `n` items and returns) repeatedly: a
/// warm-up of about a fifth of the run time, then batches until the run
/// time is spent. Returns items per second over the measured batches.
pub async fn rate<F, Fut>(n: u64, mut batch: F) -> f64
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let total = run_time();
    let warm = Instant::now();
    while warm.elapsed() < total / 5 {
        batch(n).await;
    }
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < total {
        batch(n).await;
        done += n;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

/// User + system CPU time this process has used so far.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

const RSS_CHILD_ARG: &str = "bus-bench-rss-child";

/// The message count, when this process is the child started by
/// [`peak_rss_after`].
pub fn rss_child_request() -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == RSS_CHILD_ARG)?;
    args.get(i + 1)?.parse().ok()
}

/// Child side: pushes `n` messages through bus-local and prints its peak
/// resident set size in KiB.
pub fn rss_child(n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(crate::local::pump(n));
    println!("{}", peak_rss_kib());
}

/// Peak resident memory (KiB) of a fresh process that pushed `n` messages
/// through bus-local.
pub fn peak_rss_after(n: u64) -> f64 {
    let exe = std::env::current_exe().expect("the bench's own path");
    let out = std::process::Command::new(exe)
        .arg(RSS_CHILD_ARG)
        .arg(n.to_string())
        .output()
        .expect("the memory child runs");
    assert!(out.status.success(), "the memory child failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("the memory child prints its peak RSS")
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
