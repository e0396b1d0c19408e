//! Legacy folder mode with plain files written as a legacy program would:
//! slowly, in pieces, in place, without renaming. Time is tokio's paused
//! clock, so "stable for 2 s" is decided without waiting 2 s.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use bus_core::bridge::Bridge;
use bus_core::{Connection, ConsumeOptions, Consumer, Delivery, QueueOptions, Requeue};
use bus_file::legacy::{Consumed, Inbox, LegacyRpc, Readiness, ResultWriter, FILE_HEADER};
use bus_file::FileConnection;
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(30);

fn append(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(bytes).expect("write");
}

async fn next(c: &mut Consumer) -> Delivery {
    tokio::time::timeout(WAIT, c.next())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect("no error")
}

/// Whether a delivery arrives within `d` of (paused) time.
async fn nothing_within(c: &mut Consumer, d: Duration) -> bool {
    tokio::time::timeout(d, c.next()).await.is_err()
}

#[tokio::test(start_paused = true)]
async fn a_file_still_being_written_is_taken_only_once_stable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in");
    std::fs::create_dir(&input).expect("mkdir");
    let inbox = Inbox::new(&input).with_readiness(Readiness::Stable(Duration::from_secs(2)));
    let mut c = inbox.consume(1).await.expect("consume");

    // The legacy writer writes in pieces, in place, pausing in between.
    let file = input.join("job42.wav");
    append(&file, b"RIFF");
    assert!(
        nothing_within(&mut c, Duration::from_millis(1500)).await,
        "not stable yet"
    );
    append(&file, b"....more audio");
    assert!(
        nothing_within(&mut c, Duration::from_millis(1500)).await,
        "changed: the clock restarts"
    );
    append(&file, b"...end");
    let d = next(&mut c).await;
    assert_eq!(
        &d.message.body[..],
        b"RIFF....more audio...end",
        "the whole file, never a part"
    );
    assert_eq!(
        d.message
            .properties
            .headers
            .get(FILE_HEADER)
            .and_then(|v| v.as_str()),
        Some("job42.wav")
    );
    d.ack().await.expect("ack");
    assert!(
        input.join("done").join("job42.wav").exists(),
        "moved to done/"
    );
    assert!(!file.exists());
}

#[tokio::test(start_paused = true)]
async fn a_done_marker_makes_a_file_ready_and_failures_keep_the_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in");
    std::fs::create_dir(&input).expect("mkdir");
    let inbox = Inbox::new(&input)
        .with_readiness(Readiness::DoneMarker)
        .with_consumed(Consumed::Delete);
    let mut c = inbox.consume(0).await.expect("consume");
    append(&input.join("a.txt"), b"first");
    append(&input.join("b.txt"), b"second");
    assert!(
        nothing_within(&mut c, Duration::from_secs(5)).await,
        "no marker, no delivery"
    );
    append(&input.join("b.txt.done"), b"");
    let b = next(&mut c).await;
    assert_eq!(&b.message.body[..], b"second");
    inbox.fail(&b, "model crashed on b").await.expect("fail");
    let failed = input.join("failed");
    assert_eq!(
        std::fs::read(failed.join("b.txt")).expect("failed input kept"),
        b"second"
    );
    assert_eq!(
        std::fs::read_to_string(failed.join("b.txt.error")).expect("error beside it"),
        "model crashed on b"
    );
    assert!(
        !input.join("b.txt.done").exists(),
        "the marker goes with its file"
    );

    append(&input.join("a.txt.done"), b"");
    let a = next(&mut c).await;
    a.nack(Requeue::Yes).await.expect("requeue");
    let again = next(&mut c).await;
    assert_eq!(&again.message.body[..], b"first");
    assert!(again.redelivered, "requeued input comes back redelivered");
    again.ack().await.expect("ack");
    assert!(!input.join("a.txt").exists(), "deleted once consumed");
}

#[tokio::test(start_paused = true)]
async fn two_consumers_never_get_the_same_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in");
    std::fs::create_dir(&input).expect("mkdir");
    for i in 0..20 {
        append(&input.join(format!("f{i:02}")), format!("{i}").as_bytes());
    }
    let inbox = Inbox::new(&input).with_readiness(Readiness::RenamedIn);
    let mut a = inbox.consume(0).await.expect("consume a");
    let mut b = inbox.consume(0).await.expect("consume b");
    let mut got = Vec::new();
    while got.len() < 20 {
        let d = tokio::select! {
            d = next(&mut a) => d,
            d = next(&mut b) => d,
        };
        got.push(String::from_utf8(d.message.body.to_vec()).expect("text"));
        d.ack().await.expect("ack");
    }
    got.sort_by_key(|s| s.parse::<u32>().expect("number"));
    assert_eq!(got, (0..20).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn results_are_written_atomically_with_the_request_stem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let w = ResultWriter::new(&out, "json").expect("writer");
    let path = w.write("job42.wav", b"{\"ok\":true}").await.expect("write");
    assert_eq!(path, out.join("job42.json"));
    assert_eq!(std::fs::read(&path).expect("read"), b"{\"ok\":true}");
    let names: Vec<_> = std::fs::read_dir(&out)
        .expect("ls")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("job42.json")],
        "no temporary left"
    );
    assert!(matches!(
        w.write("../escape", b"x").await,
        Err(bus_core::Error::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn a_writer_keeping_names_writes_each_file_under_its_own_name() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let w = ResultWriter::keeping_names(&out).expect("writer");
    assert_eq!(w.result_name("job42.wav").unwrap(), "job42.wav");
    let path = w.write("job42.wav", b"RIFF").await.expect("write");
    assert_eq!(path, out.join("job42.wav"));
    assert_eq!(std::fs::read(&path).expect("read"), b"RIFF");
    // Created private, as every result folder.
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o077, 0, "result folder mode {mode:o}");
    assert!(matches!(
        w.write("../escape", b"x").await,
        Err(bus_core::Error::InvalidArgument(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn rpc_over_folders_waits_for_the_result_with_the_same_stem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (req, res) = (dir.path().join("req"), dir.path().join("res"));
    let rpc = LegacyRpc::new(&req, &res)
        .with_readiness(Readiness::Stable(Duration::from_secs(1)))
        .with_timeout(Duration::from_secs(60));
    // The legacy worker: sees the request, writes the result slowly, in place.
    let worker = {
        let (req, res) = (req.clone(), res.clone());
        tokio::spawn(async move {
            let request = loop {
                if let Ok(b) = std::fs::read(req.join("q7.txt")) {
                    break b;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            std::fs::create_dir_all(&res).expect("mkdir");
            append(&res.join("q7.out"), b"answer to ");
            tokio::time::sleep(Duration::from_millis(500)).await;
            append(&res.join("q7.out"), &request);
        })
    };
    let answer = rpc.call("q7.txt", b"question").await.expect("call");
    assert_eq!(answer, b"answer to question");
    worker.await.expect("worker");
    let timeout = LegacyRpc::new(&req, &res).with_timeout(Duration::from_secs(3));
    assert!(matches!(
        timeout.call("lonely.txt", b"?").await,
        Err(bus_core::Error::Timeout(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn the_bridge_moves_an_inbox_into_a_queue_and_results_back_out() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in");
    let out = dir.path().join("out");
    std::fs::create_dir(&input).expect("mkdir");
    let conn = std::sync::Arc::new(
        FileConnection::open(dir.path().join("bus"))
            .await
            .expect("open"),
    );
    conn.declare_queue("requests", QueueOptions::durable())
        .await
        .expect("declare");
    conn.declare_queue("results", QueueOptions::durable())
        .await
        .expect("declare");

    append(&input.join("job1.wav"), b"audio-1");
    append(&input.join("job2.wav"), b"audio-2");
    let inbox = Inbox::new(&input).with_readiness(Readiness::RenamedIn);
    let to_queue = Bridge::new(conn.clone(), "").with_routing_key("requests");
    let source = inbox.consume(4).await.expect("inbox");
    let forward = tokio::spawn(async move { to_queue.run(source).await });

    // A worker on the queue answers into "results", keeping the file name.
    let mut requests = conn
        .consume("requests", ConsumeOptions::prefetch(1))
        .await
        .expect("consume");
    for _ in 0..2 {
        let d = next(&mut requests).await;
        let name = d
            .message
            .properties
            .headers
            .get(FILE_HEADER)
            .and_then(|v| v.as_str())
            .expect("file name")
            .to_owned();
        let reply =
            bus_core::Message::new(format!("done:{}", String::from_utf8_lossy(&d.message.body)))
                .with_header(FILE_HEADER, name.as_str());
        conn.publish("", "results", reply, Default::default())
            .await
            .expect("reply");
        d.ack().await.expect("ack");
    }
    let writer = ResultWriter::new(&out, "json").expect("writer");
    let back = Bridge::new(writer, "");
    let results = conn
        .consume("results", ConsumeOptions::prefetch(1))
        .await
        .expect("consume");
    let mut results = Box::pin(results);
    for _ in 0..2 {
        let d = next(&mut results).await;
        back.forward(&d).await.expect("forward");
    }
    assert_eq!(
        std::fs::read(out.join("job1.json")).expect("job1"),
        b"done:audio-1"
    );
    assert_eq!(
        std::fs::read(out.join("job2.json")).expect("job2"),
        b"done:audio-2"
    );
    assert!(
        input.join("done").join("job1.wav").exists(),
        "inputs acked only after the queue confirmed"
    );
    forward.abort();
}
