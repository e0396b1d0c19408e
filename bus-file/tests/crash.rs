//! Crash safety with real processes: the helper binary is started and
//! killed with SIGKILL at many points.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bus_core::{Connection, ConnectionExt, ConsumeOptions, Message, QueueOptions};
use bus_file::{Envelope, FileConnection, FileOptions};
use futures::StreamExt;

const HELPER: &str = env!("CARGO_BIN_EXE_bus-file-crash-helper");

/// Bounds every wait of these tests; reached only when something is broken.
const WAIT: Duration = Duration::from_secs(30);

fn helper(args: &[&str]) -> Child {
    Command::new(HELPER)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the crash helper")
}

/// Reads stdout lines of `child` until `n` were read (or it ended).
fn read_lines(child: &mut Child, n: usize) -> Vec<String> {
    let out = child.stdout.as_mut().expect("piped stdout");
    let mut reader = BufReader::new(out);
    let mut lines = Vec::new();
    while lines.len() < n {
        let mut l = String::new();
        if reader.read_line(&mut l).expect("read helper output") == 0 {
            break;
        }
        lines.push(l.trim_end().to_owned());
    }
    lines
}

fn kill(child: &mut Child) {
    // SIGKILL: no destructor, no flush, no unlock but the kernel's.
    child.kill().expect("kill the helper");
    child.wait().expect("reap the helper");
}

fn options() -> FileOptions {
    FileOptions::default().with_rescan_interval(Duration::from_millis(100))
}

fn files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_publishers_never_leave_a_partial_message() {
    let root = tempfile::tempdir().expect("temp dir");
    let root_s = root.path().to_str().expect("utf-8 path").to_owned();
    // Kills at many points: right after start, and after 1, 4, 7, ...
    // confirmations, with bodies large enough that a kill often lands in
    // the middle of a write or an fsync. One queue per round.
    let rounds = 12usize;
    let mut confirmed: Vec<Vec<u64>> = Vec::new();
    for round in 0..rounds {
        let queue = format!("crash-pub-{round}");
        let size = (4096 + round * 65536).to_string();
        let mut child = helper(&["publish", &root_s, &queue, "100000", &size]);
        let lines = if round == 0 {
            Vec::new()
        } else {
            read_lines(&mut child, round * 3 - 2)
        };
        kill(&mut child);
        confirmed.push(
            lines
                .iter()
                .map(|l| {
                    l.strip_prefix("P ")
                        .expect("a P line")
                        .parse()
                        .expect("an index")
                })
                .collect(),
        );
    }
    let conn = FileConnection::open_with(root.path(), options())
        .await
        .expect("open");
    for (round, confirmed) in confirmed.iter().enumerate() {
        let queue = format!("crash-pub-{round}");
        let ready = root.path().join("queues").join(&queue).join("ready");
        let mut present = Vec::new();
        for f in files_in(&ready) {
            let bytes = std::fs::read(&f).expect("read message file");
            // Every visible file is a whole, valid message.
            let env = Envelope::decode(&bytes)
                .unwrap_or_else(|e| panic!("{} is not a whole message: {e}", f.display()));
            let body = String::from_utf8(env.message.body.to_vec()).expect("text body");
            let (i, filler) = body.split_once(':').expect("index:filler");
            assert!(
                filler.bytes().all(|b| b == b'x'),
                "body intact in {}",
                f.display()
            );
            assert_eq!(body.len(), 4096 + round * 65536, "full length");
            present.push(i.parse::<u64>().expect("index"));
        }
        present.sort_unstable();
        // Confirmed means on disk: each confirmed message is there, and
        // what is there is a prefix of the publish sequence (one publisher,
        // in order; it may have confirmed more than was read before the
        // kill).
        for i in confirmed {
            assert!(
                present.binary_search(i).is_ok(),
                "round {round}: confirmed message {i} is missing"
            );
        }
        let expected: Vec<u64> = (0..present.len() as u64).collect();
        assert_eq!(
            present, expected,
            "round {round}: messages form the publish sequence"
        );
        match conn.inspect_queue(&queue).await {
            Ok(info) => assert_eq!(info.message_count as usize, present.len()),
            // Killed before it declared its queue.
            Err(bus_core::Error::NotFound(_)) => assert!(present.is_empty()),
            Err(e) => panic!("inspect {queue}: {e:?}"),
        }
    }
    assert!(
        files_in(&root.path().join("quarantine")).is_empty(),
        "nothing was quarantined"
    );
    conn.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumer_has_its_message_redelivered() {
    let root = tempfile::tempdir().expect("temp dir");
    let root_s = root.path().to_str().expect("utf-8 path").to_owned();
    let conn = FileConnection::open_with(root.path(), options())
        .await
        .expect("open");
    conn.declare_queue("crash-consume", QueueOptions::durable())
        .await
        .expect("declare");
    conn.send_to_queue("crash-consume", Message::new(&b"the job"[..]).persistent())
        .await
        .expect("publish");

    let mut child = helper(&["hold", &root_s, "crash-consume"]);
    assert_eq!(read_lines(&mut child, 1), vec!["GOT the job".to_owned()]);
    // Claimed by the helper: not ready for anyone else while it lives.
    assert_eq!(
        conn.inspect_queue("crash-consume")
            .await
            .expect("inspect")
            .message_count,
        0
    );
    kill(&mut child);

    let mut c = conn
        .consume("crash-consume", ConsumeOptions::prefetch(1))
        .await
        .expect("consume");
    let d = tokio::time::timeout(WAIT, c.next())
        .await
        .expect("redelivered after the holder died")
        .expect("a delivery")
        .expect("no error");
    assert_eq!(&d.message.body[..], b"the job");
    assert!(d.redelivered, "marked redelivered");
    d.ack().await.expect("ack");
    conn.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_ack_twenty_thousand_messages_exactly_once() {
    const N: usize = 20_000;
    let root = tempfile::tempdir().expect("temp dir");
    let root_s = root.path().to_str().expect("utf-8 path").to_owned();
    let conn = std::sync::Arc::new(FileConnection::open(root.path()).await.expect("open"));
    conn.declare_queue("compete", QueueOptions::default())
        .await
        .expect("declare");
    // Published first (four concurrent publishers), so that when a
    // consumer finds the queue empty, everything was taken by someone.
    let mut publishers = Vec::new();
    for p in 0..4 {
        let conn = conn.clone();
        publishers.push(tokio::spawn(async move {
            for i in (p..N).step_by(4) {
                conn.send_to_queue("compete", Message::new(format!("m{i}")))
                    .await
                    .expect("publish");
            }
        }));
    }
    for p in publishers {
        p.await.expect("publisher task");
    }
    let children: Vec<Child> = (0..4)
        .map(|_| helper(&["compete", &root_s, "compete"]))
        .collect();
    let outputs = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().expect("helper output");
                assert!(out.status.success(), "helper failed: {:?}", out.status);
                String::from_utf8(out.stdout).expect("utf-8 output")
            })
            .collect::<Vec<_>>()
    });
    let outputs = tokio::time::timeout(Duration::from_secs(240), outputs)
        .await
        .expect("the competing consumers finish")
        .expect("join");
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut per_process = Vec::new();
    for out in &outputs {
        let mut n = 0;
        for l in out.lines() {
            let body = l.strip_prefix("A ").expect("an A line");
            *seen.entry(body.to_owned()).or_default() += 1;
            n += 1;
        }
        per_process.push(n);
    }
    let twice: Vec<_> = seen.iter().filter(|(_, &c)| c != 1).collect();
    assert!(
        twice.is_empty(),
        "acked more than once: {:?}",
        &twice[..twice.len().min(10)]
    );
    let missing: Vec<_> = (0..N)
        .map(|i| format!("m{i}"))
        .filter(|b| !seen.contains_key(b))
        .collect();
    assert!(
        missing.is_empty(),
        "never acked: {:?}",
        &missing[..missing.len().min(10)]
    );
    assert_eq!(seen.len(), N);
    assert_eq!(
        conn.inspect_queue("compete")
            .await
            .expect("inspect")
            .message_count,
        0
    );
    assert!(
        per_process.iter().filter(|&&n| n > 0).count() >= 2,
        "work was shared: {per_process:?}"
    );
    conn.close().await.expect("close");
}

/// A message another process publishes wakes this process's consumer at
/// once, through the file-system watch on the queue's `ready/` folder,
/// not at the next rescan (an hour away here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_from_another_process_wakes_the_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_owned();
    let options = FileOptions::default().with_rescan_interval(Duration::from_secs(3600));
    let conn = FileConnection::open_with(&root, options).await.unwrap();
    conn.declare_queue("woken", QueueOptions::durable())
        .await
        .unwrap();
    let mut consumer = conn
        .consume("woken", ConsumeOptions::prefetch(1))
        .await
        .unwrap();
    let mut publisher = helper(&["publish", &root, "woken", "1", "8"]);
    assert_eq!(read_lines(&mut publisher, 1), ["P 0"]);
    publisher.wait().expect("the publisher exits");
    let d = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("woken by the watch, long before the next rescan")
        .expect("the stream goes on")
        .expect("a delivery");
    assert!(d.message.body.starts_with(b"0:"));
    d.ack().await.unwrap();
}
