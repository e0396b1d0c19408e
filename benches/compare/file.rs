//! Scenarios on the folder transport: bus-file against the raw file loops a
//! user would write (maildir-style write, fsync, rename; rename, read,
//! unlink; polling a folder).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bus::{Bytes, Connection, ConnectionExt, ConsumeOptions, Message, QueueOptions};
use bus_file::FileConnection;
use futures::StreamExt;

use crate::support::{self, side_by_side, Report, Span};

const BODY: usize = 256;
const PREFETCH: u16 = 256;
const QUEUE: &str = "jobs";

pub async fn run(wanted: &dyn Fn(&str) -> bool, report: &mut Report) {
    if wanted("file-publish-durable") {
        durable(1, report).await;
    }
    if wanted("file-publish-durable-8") {
        durable(8, report).await;
    }
    if wanted("file-consume") {
        consume(report).await;
    }
    if wanted("file-latency") {
        latency(report).await;
    }
}

fn body() -> Bytes {
    Bytes::from(vec![0x5a; BODY])
}

async fn open(root: &Path) -> Arc<dyn Connection> {
    let conn = FileConnection::open(root).await.unwrap_or_else(|e| {
        panic!(
            "cannot open the folder transport at {}: {e}",
            root.display()
        )
    });
    conn.declare_queue(QUEUE, QueueOptions::durable())
        .await
        .expect("declare queue");
    Arc::new(conn)
}

/// The raw folder a baseline works in: `tmp/` for files being written,
/// `ready/` for complete ones, `claimed/` for files being consumed.
struct RawFolder {
    tmp: PathBuf,
    ready: PathBuf,
    claimed: PathBuf,
}

impl RawFolder {
    fn new(root: &Path) -> RawFolder {
        let f = RawFolder {
            tmp: root.join("tmp"),
            ready: root.join("ready"),
            claimed: root.join("claimed"),
        };
        for d in [&f.tmp, &f.ready, &f.claimed] {
            fs::create_dir_all(d).expect("raw folder");
        }
        f
    }

    /// Writes one message file atomically: to `tmp/`, renamed into
    /// `ready/`; with `durable`, the file is fsynced before the rename and
    /// the folder after it.
    fn put(&self, name: &str, body: &[u8], durable: bool) {
        let tmp = self.tmp.join(name);
        let mut f = fs::File::create(&tmp).expect("create");
        f.write_all(body).expect("write");
        if durable {
            f.sync_all().expect("fsync");
        }
        drop(f);
        fs::rename(&tmp, self.ready.join(name)).expect("rename");
        if durable {
            fs::File::open(&self.ready)
                .and_then(|d| d.sync_all())
                .expect("fsync folder");
        }
    }

    fn clear(&self) {
        for e in fs::read_dir(&self.ready).expect("list") {
            fs::remove_file(e.expect("entry").path()).expect("remove");
        }
    }
}

fn name(i: u64) -> String {
    format!("{i:020}")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking task")
}

async fn durable(publishers: u64, report: &mut Report) {
    let dir = support::scratch_dir("durable");
    let conn = open(&dir.path().join("bus")).await;
    let raw = Arc::new(RawFolder::new(&dir.path().join("raw")));
    let body = body();
    let mut next = 0u64;
    let batch = 25 * publishers;
    let (o, b) = side_by_side(
        batch,
        |n| {
            let (conn, body) = (conn.clone(), body.clone());
            async move {
                let span = Span::start();
                let tasks: Vec<_> = (0..publishers)
                    .map(|_| {
                        let (conn, body) = (conn.clone(), body.clone());
                        tokio::spawn(async move {
                            for _ in 0..n / publishers {
                                conn.send_to_queue(QUEUE, Message::new(body.clone()).persistent())
                                    .await
                                    .expect("publish");
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("publisher");
                }
                let m = span.stop(n);
                conn.purge_queue(QUEUE).await.expect("purge");
                m
            }
        },
        |n| {
            let (raw, body) = (raw.clone(), body.clone());
            let first = next;
            next += n;
            async move {
                blocking(move || {
                    // As many raw writers as publishers, each its own
                    // write-fsync-rename-fsync loop on the same disk: what
                    // independent processes would do without group commit.
                    let each = n / publishers;
                    let span = Span::start();
                    std::thread::scope(|scope| {
                        for p in 0..publishers {
                            let (raw, body) = (&raw, &body);
                            let start = first + p * each;
                            scope.spawn(move || {
                                for i in start..start + each {
                                    raw.put(&name(i), body, true);
                                }
                            });
                        }
                    });
                    let m = span.stop(each * publishers);
                    raw.clear();
                    m
                })
                .await
            }
        },
    )
    .await;
    conn.close().await.expect("close");
    let (scenario, note) = if publishers == 1 {
        (
            "file-publish-durable".to_owned(),
            format!("persistent {BODY}-byte messages to a durable queue, one publisher; raw: write, fsync, rename, fsync the folder"),
        )
    } else {
        (
            format!("file-publish-durable-{publishers}"),
            format!(
                "{publishers} concurrent publishers (group commit) against {publishers} threads each running the raw loop"
            ),
        )
    };
    report.throughput(
        &scenario,
        o.per_sec(),
        "raw-fsync-loop",
        b.per_sec(),
        "msg/s",
        note,
    );
}

async fn consume(report: &mut Report) {
    let dir = support::scratch_dir("consume");
    let conn = open(&dir.path().join("bus")).await;
    let raw = Arc::new(RawFolder::new(&dir.path().join("raw")));
    let body = body();
    let mut next = 0u64;
    let batch = 5_000;
    let (o, b) = side_by_side(
        batch,
        |n| {
            let (conn, body) = (conn.clone(), body.clone());
            async move {
                futures::stream::iter(0..n)
                    .map(|_| conn.send_to_queue(QUEUE, Message::new(body.clone())))
                    .buffer_unordered(64)
                    .for_each(|r| async move { r.expect("pre-fill") })
                    .await;
                let span = Span::start();
                let mut consumer = conn
                    .consume(QUEUE, ConsumeOptions::prefetch(PREFETCH))
                    .await
                    .expect("consume");
                for _ in 0..n {
                    let d = consumer.next().await.expect("a delivery").expect("ok");
                    assert_eq!(d.message.body.len(), BODY);
                    d.ack().await.expect("ack");
                }
                let m = span.stop(n);
                consumer.cancel().await.expect("cancel");
                m
            }
        },
        |n| {
            let (raw, body) = (raw.clone(), body.clone());
            let first = next;
            next += n;
            async move {
                blocking(move || {
                    for i in first..first + n {
                        raw.put(&name(i), &body, false);
                    }
                    let span = Span::start();
                    let mut done = 0;
                    while done < n {
                        let mut names: Vec<_> = fs::read_dir(&raw.ready)
                            .expect("list")
                            .map(|e| e.expect("entry").file_name())
                            .collect();
                        // Oldest first, as the queue delivers.
                        names.sort();
                        for file in names {
                            let claimed = raw.claimed.join(&file);
                            if fs::rename(raw.ready.join(&file), &claimed).is_err() {
                                continue;
                            }
                            let data = fs::read(&claimed).expect("read");
                            assert_eq!(data.len(), BODY);
                            fs::remove_file(&claimed).expect("unlink");
                            done += 1;
                        }
                    }
                    span.stop(n)
                })
                .await
            }
        },
    )
    .await;
    conn.close().await.expect("close");
    report.throughput(
        "file-consume",
        o.per_sec(),
        "raw-rename-read-unlink",
        b.per_sec(),
        "msg/s",
        format!("claim, read, ack one by one, prefetch {PREFETCH}, {BODY}-byte bodies, {batch} pre-filled (untimed)"),
    );
}

const WRITER_ARG: &str = "bus-bench-file-writer";

/// The writer process's request, when this process is one: mode (`bus` or
/// `raw`), folder, message count, gap between messages.
pub fn writer_request() -> Option<(String, PathBuf, u64, Duration)> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == WRITER_ARG)?;
    let mode = args.get(i + 1)?.clone();
    let dir = PathBuf::from(args.get(i + 2)?);
    let count = args.get(i + 3)?.parse().ok()?;
    let gap = Duration::from_millis(args.get(i + 4)?.parse().ok()?);
    Some((mode, dir, count, gap))
}

fn stamped_body() -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos();
    let mut body = vec![0x5a; BODY];
    body[..16].copy_from_slice(&now.to_le_bytes());
    body
}

/// Microseconds since the stamp a writer put in `body`.
fn age_us(body: &[u8]) -> f64 {
    let stamp = u128::from_le_bytes(body[..16].try_into().expect("a stamped body"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos();
    now.saturating_sub(stamp) as f64 / 1_000.0
}

/// The writer process: publishes `count` stamped messages, `gap` apart,
/// through bus-file (`bus`: transient messages to the durable queue, as
/// the raw writer does not fsync either) or as raw files renamed into a
/// folder (`raw`).
pub fn writer(mode: &str, dir: &Path, count: u64, gap: Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let conn = match mode {
            "bus" => Some(open(dir).await),
            _ => None,
        };
        let raw = RawFolder::new(dir);
        for i in 0..count {
            tokio::time::sleep(gap).await;
            match &conn {
                Some(conn) => conn
                    .send_to_queue(QUEUE, Message::new(stamped_body()))
                    .await
                    .expect("publish"),
                None => raw.put(&name(i), &stamped_body(), false),
            }
        }
        if let Some(conn) = conn {
            conn.close().await.expect("close");
        }
    });
}

fn start_writer(mode: &str, dir: &Path, count: u64, gap: Duration) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().expect("the bench's own path"))
        .arg(WRITER_ARG)
        .arg(mode)
        .arg(dir)
        .arg(count.to_string())
        .arg(gap.as_millis().to_string())
        .spawn()
        .expect("the writer process starts")
}

async fn finish_writer(mut child: std::process::Child) {
    let status = blocking(move || child.wait()).await.expect("wait");
    assert!(status.success(), "the writer process failed: {status}");
}

async fn latency(report: &mut Report) {
    let dir = support::scratch_dir("latency");
    let secs = support::run_time().as_secs_f64();

    // Ours: a consumer in this process, the publisher in another, so the
    // delivery goes through the file system's notifications as it does
    // between services.
    let root = dir.path().join("bus");
    let conn = open(&root).await;
    let mut consumer = conn
        .consume(QUEUE, ConsumeOptions::prefetch(PREFETCH))
        .await
        .expect("consume");
    let warm = 10;
    let count = warm + (secs * 100.0) as u64;
    let writer = start_writer("bus", &root, count, Duration::from_millis(10));
    let mut ours = Vec::new();
    for i in 0..count {
        let d = consumer.next().await.expect("a delivery").expect("ok");
        let age = age_us(&d.message.body);
        d.ack().await.expect("ack");
        if i >= warm {
            ours.push(age);
        }
    }
    finish_writer(writer).await;
    drop(consumer);
    conn.close().await.expect("close");

    // Baseline: the legacy consumer, listing the folder once a second. The
    // writer's gap (370 ms) is not a fraction of a second with a small
    // denominator, so the messages land at phases spread over the polling
    // period.
    let polled = dir.path().join("raw");
    let raw = RawFolder::new(&polled);
    let count = ((secs * 4.0) as u64).clamp(6, 40);
    let writer = start_writer("raw", &polled, count, Duration::from_millis(370));
    let mut baseline = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while (baseline.len() as u64) < count {
        tick.tick().await;
        let mut names: Vec<_> = fs::read_dir(&raw.ready)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .collect();
        names.sort();
        for path in names {
            let data = fs::read(&path).expect("read");
            baseline.push(age_us(&data));
            fs::remove_file(&path).expect("unlink");
        }
    }
    finish_writer(writer).await;

    for (p, scenario) in [(50.0, "file-latency-p50"), (99.0, "file-latency-p99")] {
        let o = support::percentile(&mut ours, p);
        let b = support::percentile(&mut baseline, p);
        report.cost(
            scenario,
            o,
            "poll-1s",
            b,
            "us",
            format!(
                "publish (another process) to delivery, transient {BODY}-byte messages; {} samples ours, {} baseline (a folder listed once a second)",
                ours.len(),
                baseline.len()
            ),
        );
    }
}
