//! Names cannot leave the root, files are private, symlinks are not
//! followed, and a file that is not a message is quarantined while the
//! queue goes on.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use bus_core::{
    Connection, ConnectionExt, ConsumeOptions, Error, ExchangeKind, ExchangeOptions, Message,
    QueueOptions,
};
use bus_file::FileConnection;
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(start_paused = true)]
async fn names_that_could_leave_the_root_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let conn = FileConnection::open(dir.path()).await.expect("open");
    for bad in ["..", "../escape", "a/b", ".hidden", "a\\b", "a\0b"] {
        let e = conn.declare_queue(bad, QueueOptions::default()).await;
        assert!(
            matches!(e, Err(Error::InvalidArgument(_))),
            "queue {bad:?}: {e:?}"
        );
        let e = conn
            .declare_exchange(bad, ExchangeKind::Direct, ExchangeOptions::default())
            .await;
        assert!(
            matches!(e, Err(Error::InvalidArgument(_))),
            "exchange {bad:?}: {e:?}"
        );
    }
    assert!(!dir.path().parent().expect("parent").join("escape").exists());
}

#[tokio::test(start_paused = true)]
async fn folders_and_files_are_private() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("bus");
    let conn = FileConnection::open(&root).await.expect("open");
    conn.declare_queue("q", QueueOptions::durable())
        .await
        .expect("declare");
    conn.send_to_queue("q", Message::new(&b"secret"[..]).persistent())
        .await
        .expect("publish");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    for d in ["", "queues", "queues/q", "queues/q/ready", "owners", "tmp"] {
        assert_eq!(mode(&root.join(d)), 0o700, "folder {d:?}");
    }
    let ready = root.join("queues/q/ready");
    let file = std::fs::read_dir(&ready)
        .expect("ls")
        .next()
        .expect("a message")
        .expect("entry")
        .path();
    assert_eq!(mode(&file), 0o600, "message file");
    assert_eq!(mode(&root.join("topology")), 0o600, "topology");
}

#[tokio::test(start_paused = true)]
async fn symlinks_and_garbage_are_quarantined_and_the_queue_goes_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("bus");
    let outside = dir.path().join("outside-secret");
    std::fs::write(&outside, b"do not read me").expect("write");
    let conn = FileConnection::open(&root).await.expect("open");
    conn.declare_queue("q", QueueOptions::default())
        .await
        .expect("declare");
    let ready = root.join("queues/q/ready");
    // Named like messages, so they are claimed and opened: the symlink must
    // not be followed, the garbage must not be delivered.
    std::os::unix::fs::symlink(&outside, ready.join("255-00000000000000000001-00ab-14"))
        .expect("symlink");
    std::fs::write(ready.join("255-00000000000000000002-00ab-5"), b"junk!").expect("garbage");
    std::fs::write(ready.join("stray.txt"), b"not even a message name").expect("stray");
    conn.send_to_queue("q", Message::new(&b"real"[..]))
        .await
        .expect("publish");

    let mut c = conn
        .consume("q", ConsumeOptions::prefetch(1))
        .await
        .expect("consume");
    let d = tokio::time::timeout(WAIT, c.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("ok");
    assert_eq!(
        &d.message.body[..],
        b"real",
        "the queue goes on past bad files"
    );
    d.ack().await.expect("ack");

    let quarantine = root.join("quarantine");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let names: Vec<String> = std::fs::read_dir(&quarantine)
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        let reasons = names.iter().filter(|n| n.ends_with(".reason")).count();
        if reasons == 3 {
            let linked = names
                .iter()
                .find(|n| n.ends_with("-14"))
                .expect("the symlink quarantined");
            let meta = std::fs::symlink_metadata(quarantine.join(linked)).expect("stat");
            assert!(
                meta.file_type().is_symlink(),
                "moved as a link, never followed"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "quarantined: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        std::fs::read(&outside).expect("still there"),
        b"do not read me"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_persistent_publishes_share_commits_and_all_land() {
    let dir = tempfile::tempdir().expect("temp dir");
    let conn = std::sync::Arc::new(FileConnection::open(dir.path()).await.expect("open"));
    conn.declare_queue("durable", QueueOptions::durable())
        .await
        .expect("declare");
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move {
                conn.send_to_queue("durable", Message::new(format!("{i}")).persistent())
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("confirmed");
    }
    assert_eq!(
        conn.inspect_queue("durable")
            .await
            .expect("inspect")
            .message_count,
        64
    );
}
