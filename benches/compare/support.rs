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

/// What one side of a scenario did in its measured time: items processed,
/// wall time and this process's CPU time (user + system, every thread).
#[derive(Clone, Copy, Debug, Default)]
pub struct Measured {
    pub items: u64,
    pub wall: Duration,
    pub cpu: Duration,
}

impl Measured {
    /// Items per second of wall time.
    pub fn per_sec(&self) -> f64 {
        self.items as f64 / self.wall.as_secs_f64()
    }

    /// Microseconds of CPU time per item.
    pub fn cpu_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.items as f64
    }

    fn add(&mut self, other: Measured) {
        self.items += other.items;
        self.wall += other.wall;
        self.cpu += other.cpu;
    }
}

/// A measurement in progress: wall and CPU time since [`Span::start`].
pub struct Span {
    wall: Instant,
    cpu: Duration,
}

impl Span {
    pub fn start() -> Span {
        Span {
            cpu: cpu_time(),
            wall: Instant::now(),
        }
    }

    /// Ends the span, crediting it with `items`.
    pub fn stop(self, items: u64) -> Measured {
        let wall = self.wall.elapsed();
        Measured {
            items,
            wall,
            cpu: cpu_time() - self.cpu,
        }
    }
}

/// Measures `work`, which processes `n` items, as a whole.
pub async fn timed(n: u64, work: impl std::future::Future<Output = ()>) -> Measured {
    let span = Span::start();
    work.await;
    span.stop(n)
}

/// Runs batches until their measured time reaches `budget`.
async fn run_for<F, Fut>(n: u64, batch: &mut F, budget: Duration) -> Measured
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Measured>,
{
    let mut total = Measured::default();
    while total.wall < budget {
        total.add(batch(n).await);
    }
    total
}

/// How many turns each side of [`side_by_side`] takes.
pub const ROUNDS: u32 = 4;

/// Measures two sides of a comparison. Each batch processes `n` items and
/// reports what it measured (use [`timed`] for a whole batch, or a
/// [`Span`] around the part that counts, leaving set-up such as pre-filling
/// a queue out). After a warm-up of each side (a fifth of the run time),
/// the sides take turns, [`ROUNDS`] rounds each, so that a machine whose
/// speed drifts (other work, a shared disk) weighs on both.
pub async fn side_by_side<A, AF, B, BF>(
    n: u64,
    mut ours: A,
    mut baseline: B,
) -> (Measured, Measured)
where
    A: FnMut(u64) -> AF,
    AF: std::future::Future<Output = Measured>,
    B: FnMut(u64) -> BF,
    BF: std::future::Future<Output = Measured>,
{
    let total = run_time();
    run_for(n, &mut ours, total / 5).await;
    run_for(n, &mut baseline, total / 5).await;
    let mut o = Measured::default();
    let mut b = Measured::default();
    for _ in 0..ROUNDS {
        o.add(run_for(n, &mut ours, total / ROUNDS).await);
        b.add(run_for(n, &mut baseline, total / ROUNDS).await);
    }
    (o, b)
}

/// Measures one side alone (its baseline is measured elsewhere, e.g. by
/// another process): a warm-up of a fifth of the run time, then the run
/// time.
pub async fn alone<F, Fut>(n: u64, mut batch: F) -> Measured
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Measured>,
{
    let total = run_time();
    run_for(n, &mut batch, total / 5).await;
    run_for(n, &mut batch, total).await
}

/// A scratch folder for the file scenarios, removed when dropped. Under the
/// system's temporary folder unless that is a tmpfs, where fsync costs
/// nothing and the durable scenarios would measure nothing: then under
/// `/var/tmp`. `BENCH_DIR` overrides both.
pub fn scratch_dir(what: &str) -> tempfile::TempDir {
    let base = match std::env::var_os("BENCH_DIR") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            let tmp = std::env::temp_dir();
            if is_tmpfs(&tmp) {
                std::path::PathBuf::from("/var/tmp")
            } else {
                tmp
            }
        }
    };
    assert!(
        !is_tmpfs(&base),
        "{} is a tmpfs, where fsync is free: set BENCH_DIR to a folder on a disk",
        base.display()
    );
    tempfile::Builder::new()
        .prefix(&format!("bus-bench-{what}-"))
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("cannot create a scratch folder in {}: {e}", base.display()))
}

fn is_tmpfs(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs reads the NUL-terminated path and writes into the
    // struct we pass.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut fs) };
    rc == 0 && fs.f_type as i64 == TMPFS_MAGIC
}

/// The broker of the AMQP scenarios: `AMQP_ADDR`, as scripts/test-all sets
/// it, or the local RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The `p`-th percentile (0-100) of `samples`, nearest rank.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    assert!(!samples.is_empty(), "no samples");
    samples.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
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
