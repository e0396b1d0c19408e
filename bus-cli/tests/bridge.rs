//! `bus bridge`: a legacy folder written slowly in place into a queue, a
//! queue into a legacy result folder, queue to queue, and SIGTERM in the
//! middle losing nothing.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use support::*;

const LIMIT: Duration = Duration::from_secs(60);

fn bridge(url: &str, args: &[&str]) -> Background {
    Background::start(bus(url).arg("bridge").args(args))
}

#[test]
fn a_folder_written_slowly_in_place_arrives_whole() {
    let url = amqp_url();
    let q = unique("cli-inbox");
    ok(&url, &["declare", "queue", &q, "--durable"]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let mut b = bridge(
        &url,
        &[
            "--from-folder",
            input.to_str().unwrap(),
            "--to-queue",
            &q,
            "--readiness",
            "stable:2s",
            "--persistent",
        ],
    );
    // A plain writer: creates the file in place and appends to it slowly,
    // as a legacy producer does. The pauses are the behaviour under test.
    let mut f = std::fs::File::create(input.join("job1.wav")).unwrap();
    let mut want = Vec::new();
    for i in 0..10u8 {
        let chunk = vec![0xf0 + i; 1000]; // not UTF-8: the body comes back as base64
        f.write_all(&chunk).unwrap();
        f.flush().unwrap();
        want.extend(chunk);
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(f);
    let got = take(&url, &q, 1, LIMIT);
    let m = &got[0];
    assert_eq!(m["headers"]["x-legacy-file"], "job1.wav");
    assert_eq!(m["properties"]["delivery_mode"], 2);
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD
        .decode(m["body"].as_str().unwrap())
        .unwrap();
    assert_eq!(body.len(), want.len(), "the whole file, not a prefix");
    assert_eq!(body, want);
    // The input moved to done/ once the broker confirmed.
    wait_until(LIMIT, "job1.wav in done/", || {
        files_in(&input.join("done")) == ["job1.wav"]
    });
    assert!(files_in(&input).is_empty());
    b.signal("TERM");
    assert_eq!(b.wait(LIMIT).code(), Some(0));
    ok(&url, &["delete", "queue", &q]);
}

#[test]
fn done_markers_and_results_back_into_a_legacy_folder() {
    let url = amqp_url();
    let q = unique("cli-results");
    ok(&url, &["declare", "queue", &q]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // queue -> folder: named after the request's file.
    let mut b = bridge(
        &url,
        &[
            "--from-queue",
            &q,
            "--to-folder",
            out.to_str().unwrap(),
            "--extension",
            "json",
        ],
    );
    ok(
        &url,
        &[
            "publish",
            "-q",
            &q,
            "--header",
            "x-legacy-file=job42.wav",
            r#"{"text":"hi"}"#,
        ],
    );
    wait_until(LIMIT, "out/job42.json", || files_in(&out) == ["job42.json"]);
    assert_eq!(
        std::fs::read_to_string(out.join("job42.json")).unwrap(),
        r#"{"text":"hi"}"#
    );
    wait_until(LIMIT, "the result acked", || ready(&url, &q) == 0);
    b.signal("INT");
    assert_eq!(b.wait(LIMIT).code(), Some(0));
    let totals = b.stderr_lines().join("\n");
    assert!(totals.contains("forwarded 1"), "totals on exit: {totals}");

    // folder (done markers) -> queue.
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("a.txt"), "partial").unwrap();
    let mut b = bridge(
        &url,
        &[
            "--from-folder",
            input.to_str().unwrap(),
            "--to-queue",
            &q,
            "--readiness",
            "done-marker",
            "--delete-done",
        ],
    );
    std::fs::write(input.join("a.txt"), "complete").unwrap();
    std::fs::write(input.join("a.txt.done"), "").unwrap();
    let got = take(&url, &q, 1, LIMIT);
    assert_eq!(got[0]["body"], "complete");
    wait_until(LIMIT, "a.txt deleted", || files_in(&input).is_empty());
    b.signal("TERM");
    assert_eq!(b.wait(LIMIT).code(), Some(0));
    ok(&url, &["delete", "queue", &q]);
}

#[test]
fn sigterm_mid_bridge_loses_nothing_queue_to_queue() {
    let url = amqp_url();
    let from = unique("cli-from");
    let to = unique("cli-to");
    ok(&url, &["declare", "queue", &from]);
    ok(&url, &["declare", "queue", &to]);
    const N: usize = 3000;
    let lines: String = (0..N).map(|i| format!("{i}\n")).collect();
    assert_success(
        &run_with_input(&url, &["publish", "-q", &from, "--lines"], lines.as_bytes()),
        &["publish"],
    );
    let mut b = bridge(
        &url,
        &["--from-queue", &from, "--to-queue", &to, "--prefetch", "1"],
    );
    wait_until(LIMIT, "the bridge to start forwarding", || {
        ready(&url, &to) > 0
    });
    b.signal("TERM");
    assert_eq!(b.wait(LIMIT).code(), Some(0));
    let totals = b.stderr_lines().join("\n");
    let left = ready(&url, &from) as usize;
    let moved = ready(&url, &to) as usize;
    eprintln!("stopped with {moved} forwarded and {left} left: {totals}");
    assert!(totals.contains(&format!("forwarded {moved},")), "{totals}");
    assert_eq!(
        left + moved,
        N,
        "every message is in one queue or the other"
    );
    let mut all = BTreeSet::new();
    for q in [&from, &to] {
        for m in take(&url, q, ready(&url, q) as usize, LIMIT) {
            assert!(
                all.insert(m["body"].as_str().unwrap().to_owned()),
                "a duplicate: {m}"
            );
        }
    }
    assert_eq!(all.len(), N);
    ok(&url, &["delete", "queue", &from]);
    ok(&url, &["delete", "queue", &to]);
}

#[test]
fn sigterm_mid_bridge_loses_nothing_folder_to_queue() {
    let url = amqp_url();
    let q = unique("cli-fold");
    ok(&url, &["declare", "queue", &q]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    const N: usize = 300;
    for i in 0..N {
        std::fs::write(input.join(format!("f{i:04}.txt")), format!("{i}")).unwrap();
    }
    let mut b = bridge(
        &url,
        &[
            "--from-folder",
            input.to_str().unwrap(),
            "--to-queue",
            &q,
            "--readiness",
            "renamed",
            "--prefetch",
            "8",
        ],
    );
    wait_until(LIMIT, "the bridge to start forwarding", || {
        ready(&url, &q) > 0
    });
    b.signal("TERM");
    assert_eq!(b.wait(LIMIT).code(), Some(0));
    let done = files_in(&input.join("done"));
    let waiting = files_in(&input);
    let queued = ready(&url, &q) as usize;
    eprintln!(
        "{} done, {} waiting, {queued} queued",
        done.len(),
        waiting.len()
    );
    assert_eq!(done.len(), queued, "every file in done/ is in the queue");
    assert_eq!(
        done.len() + waiting.len(),
        N,
        "no file lost or stuck in a claim"
    );
    ok(&url, &["delete", "queue", &q]);
}

#[test]
fn queue_to_exchange_across_urls() {
    // From a folder transport to RabbitMQ: two URLs.
    let dir = tempfile::tempdir().unwrap();
    let file_url = format!("file://{}", dir.path().display());
    let url = amqp_url();
    let x = unique("cli-bx");
    let q = unique("cli-bq");
    ok(&url, &["declare", "exchange", &x, "--type", "topic"]);
    ok(&url, &["declare", "queue", &q]);
    ok(&url, &["bind", &q, &x, "-k", "jobs.#"]);
    ok(&file_url, &["declare", "queue", "outbox", "--durable"]);
    ok(
        &file_url,
        &["publish", "-q", "outbox", "--persistent", "hello across"],
    );
    let mut b = Background::start(bus(&file_url).args([
        "bridge",
        "--from-queue",
        "outbox",
        "--to-url",
        &url,
        "--to-exchange",
        &x,
        "--routing-key",
        "jobs.new",
    ]));
    let got = take(&url, &q, 1, LIMIT);
    assert_eq!(got[0]["body"], "hello across");
    assert_eq!(got[0]["exchange"], x.as_str());
    assert_eq!(got[0]["routing_key"], "jobs.new");
    wait_until(LIMIT, "the source acked", || {
        ready(&file_url, "outbox") == 0
    });
    b.signal("TERM");
    assert_eq!(b.wait(LIMIT).code(), Some(0));
    ok(&url, &["delete", "queue", &q]);
    ok(&url, &["delete", "exchange", &x]);
}
