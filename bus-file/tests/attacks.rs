//! The folder transport under attack by someone who can write into its
//! folders: crafted topology, symlinked folders, hard links, lying files,
//! overflowing names, a lock held elsewhere, a full disk, a foreign root.
//! Each test puts sentinel files outside the root and checks they are
//! untouched, and that good messages next to bad ones are still delivered.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bus_core::{
    Connection, ConnectionExt, ConsumeOptions, Error, Message, Overflow, QueueArguments,
    QueueOptions,
};
use bus_file::{FileConnection, FileOptions};
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(10);
const OWNER: &str = "o0123456789abcdef0123456789abcdef";

/// A folder outside the root with files whose content and names must stay
/// exactly as they are.
struct Sentinel {
    dir: PathBuf,
}

impl Sentinel {
    fn new(parent: &Path) -> Sentinel {
        let dir = parent.join("outside");
        std::fs::create_dir_all(&dir).expect("mkdir outside");
        std::fs::write(dir.join("secret.txt"), b"do not touch").expect("write");
        std::fs::write(
            dir.join("255-00000000000000000001-00ab-12"),
            b"do not touch",
        )
        .expect("write");
        Sentinel { dir }
    }

    fn assert_untouched(&self) {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .expect("ls outside")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec!["255-00000000000000000001-00ab-12", "secret.txt"],
            "nothing added to or removed from the outside folder"
        );
        for n in &names {
            assert_eq!(
                std::fs::read(self.dir.join(n)).expect("read"),
                b"do not touch",
                "{n} unchanged"
            );
        }
    }
}

async fn open(root: &Path) -> FileConnection {
    FileConnection::open_with(
        root,
        FileOptions::default().with_rescan_interval(Duration::from_millis(200)),
    )
    .await
    .expect("open")
}

async fn deliver_one(conn: &FileConnection, queue: &str, body: &[u8]) {
    conn.send_to_queue(queue, Message::new(body.to_vec()))
        .await
        .expect("publish a good message");
    let mut c = conn
        .consume(queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let d = tokio::time::timeout(WAIT, c.next())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect("no error");
    assert_eq!(&d.message.body[..], body);
    d.ack().await.expect("ack");
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rewrites `from` (same length) into `to` everywhere in the topology file
/// and fixes its checksum, as an attacker would.
fn craft_topology(root: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let path = root.join("topology");
    let mut bytes = std::fs::read(&path).expect("read topology");
    let n = bytes.len() - 4;
    let mut i = 0;
    let mut hits = 0;
    while i + from.len() <= n {
        if &bytes[i..i + from.len()] == from.as_bytes() {
            bytes[i..i + from.len()].copy_from_slice(to.as_bytes());
            hits += 1;
        }
        i += 1;
    }
    assert!(hits > 0, "{from} is in the topology");
    let crc = crc32(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, bytes).expect("write topology");
}

#[tokio::test(start_paused = true)]
async fn a_crafted_topology_is_refused_as_corrupt_and_touches_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sentinel = Sentinel::new(dir.path());
    let root = dir.path().join("bus");
    {
        let conn = open(&root).await;
        // A binding whose queue name will become "../../outside".
        conn.declare_queue("aaaaaaaaaaaaa", QueueOptions::default())
            .await
            .expect("declare");
        conn.bind_queue("aaaaaaaaaaaaa", "amq.fanout", "", Default::default())
            .await
            .expect("bind");
        conn.close().await.expect("close");
    }
    craft_topology(&root, "aaaaaaaaaaaaa", "../../outside");
    let conn = open(&root).await;
    let e = conn
        .publish(
            "amq.fanout",
            "",
            Message::new(&b"x"[..]),
            Default::default(),
        )
        .await
        .expect_err("a corrupt topology is refused");
    assert!(e.to_string().contains("corrupt topology"), "{e}");
    let e = conn
        .declare_queue("other", QueueOptions::default())
        .await
        .expect_err("no change on a corrupt topology");
    assert!(e.to_string().contains("corrupt topology"), "{e}");
    // Rescans and the janitor run meanwhile: nothing outside moves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sentinel.assert_untouched();
}

#[tokio::test(start_paused = true)]
async fn an_exclusive_queue_named_outside_with_a_dead_owner_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sentinel = Sentinel::new(dir.path());
    let root = dir.path().join("bus");
    let outside = sentinel.dir.display().to_string();
    let fake: String = "q".repeat(outside.len());
    {
        let other = open(&root).await;
        other
            .declare_queue(&fake, QueueOptions::default().with_exclusive(true))
            .await
            .expect("declare");
        // Dies without cleaning up: its topology entry stays.
        std::mem::forget(other);
    }
    // Its owner made to look dead: an owner id with no lock file.
    let owner = std::fs::read_dir(root.join("owners"))
        .expect("ls owners")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .find_map(|n| n.strip_suffix(".lock").map(str::to_owned))
        .expect("the owner's lock file");
    craft_topology(&root, &owner, OWNER);
    craft_topology(&root, &fake, &outside);
    let conn = open(&root).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(conn);
    sentinel.assert_untouched();
}

#[tokio::test(start_paused = true)]
async fn symlinked_folders_at_every_level_are_never_followed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sentinel = Sentinel::new(dir.path());
    let root = dir.path().join("bus");
    let conn = open(&root).await;
    for q in ["ready-link", "queue-link", "claims-link", "good"] {
        conn.declare_queue(q, QueueOptions::default())
            .await
            .expect("declare");
    }
    let queues = root.join("queues");
    // queues/<q>/ready swapped for a symlink.
    std::fs::remove_dir_all(queues.join("ready-link/ready")).expect("rm");
    symlink(&sentinel.dir, queues.join("ready-link/ready")).expect("symlink");
    // queues/<q> itself swapped for a symlink.
    std::fs::remove_dir_all(queues.join("queue-link")).expect("rm");
    symlink(&sentinel.dir, queues.join("queue-link")).expect("symlink");
    // A fake dead owner's claim folder pointing outside.
    symlink(
        &sentinel.dir,
        queues.join(format!("claims-link/claims/{OWNER}")),
    )
    .expect("symlink");

    for q in ["ready-link", "queue-link"] {
        assert!(
            conn.send_to_queue(q, Message::new(&b"m"[..]))
                .await
                .is_err(),
            "a publish into a symlinked folder fails"
        );
        let _c = conn.consume(q, ConsumeOptions::default()).await;
    }
    let _c = conn
        .consume("claims-link", ConsumeOptions::default())
        .await
        .expect("consume");
    // Several rescans and janitor passes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sentinel.assert_untouched();
    deliver_one(&conn, "good", b"still delivered").await;

    // tmp/ swapped for a symlink: publishes fail, nothing lands outside.
    std::fs::remove_dir_all(root.join("tmp")).expect("rm");
    symlink(&sentinel.dir, root.join("tmp")).expect("symlink");
    assert!(conn
        .send_to_queue("good", Message::new(&b"m"[..]))
        .await
        .is_err());
    assert!(conn
        .declare_queue("new", QueueOptions::default())
        .await
        .is_err());
    sentinel.assert_untouched();
}

#[tokio::test(start_paused = true)]
async fn hard_links_sparse_and_lying_files_are_quarantined_unread() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sentinel = Sentinel::new(dir.path());
    let root = dir.path().join("bus");
    let conn = open(&root).await;
    conn.declare_queue("q", QueueOptions::default())
        .await
        .expect("declare");
    conn.declare_queue("src", QueueOptions::default())
        .await
        .expect("declare");
    // A real message file, moved outside, hard-linked back in.
    conn.send_to_queue("src", Message::new(&b"linked"[..]))
        .await
        .expect("publish");
    let src_ready = root.join("queues/src/ready");
    let file = std::fs::read_dir(&src_ready)
        .expect("ls")
        .next()
        .expect("one")
        .expect("entry");
    let linked_outside = dir.path().join("linked-outside");
    let outside_bytes = std::fs::read(file.path()).expect("read the message file");
    std::fs::rename(file.path(), &linked_outside).expect("move out");
    let ready = root.join("queues/q/ready");
    std::fs::hard_link(
        &linked_outside,
        ready.join("255-00000000000000000002-00ab-6"),
    )
    .expect("hard link");
    // A 2 GiB sparse file whose name claims 4 bytes.
    let sparse =
        std::fs::File::create(ready.join("255-00000000000000000003-00ab-4")).expect("create");
    sparse.set_len(2 << 30).expect("sparse");
    // A name claiming u64::MAX bytes.
    std::fs::write(
        ready.join("255-00000000000000000004-00ab-18446744073709551615"),
        b"tiny",
    )
    .expect("write");
    deliver_one(&conn, "q", b"good one").await;
    let quarantined = std::fs::read_dir(root.join("quarantine"))
        .expect("ls")
        .filter(|e| {
            !e.as_ref()
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .ends_with(".reason")
        })
        .count();
    assert_eq!(quarantined, 3, "the three bad files are quarantined");
    assert_eq!(
        std::fs::read(&linked_outside).expect("the linked file outside survives"),
        outside_bytes,
        "the linked file outside is unchanged"
    );
    sentinel.assert_untouched();
}

#[tokio::test(start_paused = true)]
async fn lengths_from_names_cannot_overflow_max_length_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("bus");
    let conn = open(&root).await;
    let args = QueueArguments::default()
        .max_length_bytes(1_000)
        .overflow(Overflow::RejectPublish);
    conn.declare_queue("capped", QueueOptions::default().with_arguments(args))
        .await
        .expect("declare");
    let ready = root.join("queues/capped/ready");
    for i in 1..=2 {
        std::fs::write(
            ready.join(format!(
                "255-0000000000000000000{i}-00ab-18446744073709551615"
            )),
            b"x",
        )
        .expect("write");
    }
    // Would panic (debug) or wrap (release) with a plain sum.
    let e = conn
        .send_to_queue("capped", Message::new(&b"m"[..]))
        .await
        .expect_err("the queue counts as full");
    assert!(matches!(e, Error::Nacked(_)), "{e:?}");
}

#[tokio::test(start_paused = true)]
async fn headers_too_long_for_the_reader_are_refused_at_publish() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("bus");
    let conn = open(&root).await;
    conn.declare_queue("q", QueueOptions::default())
        .await
        .expect("declare");
    let big = "h".repeat((1 << 20) + 1);
    let err = conn
        .send_to_queue(
            "q",
            Message::new(&b"x"[..]).with_header("big", big.as_str()),
        )
        .await
        .expect_err("an envelope over the reader's bound is refused");
    assert!(
        matches!(err, Error::PreconditionFailed(_)),
        "a precondition error: {err:?}"
    );
    assert!(!err.is_temporary(), "permanent: {err}");
    assert!(err.to_string().contains("headers"), "says why: {err}");
    let info = conn
        .declare_queue("q", QueueOptions::passive())
        .await
        .expect("passive");
    assert_eq!(info.message_count, 0, "nothing was written");
    assert!(
        std::fs::read_dir(root.join("tmp"))
            .expect("ls tmp")
            .next()
            .is_none(),
        "no temp file left"
    );
    // Headers well within the bound go through and are read back whole.
    let fits = "h".repeat(512 * 1024);
    conn.send_to_queue(
        "q",
        Message::new(&b"ok"[..]).with_header("big", fits.as_str()),
    )
    .await
    .expect("publish with large headers that fit");
    let mut c = conn
        .consume("q", ConsumeOptions::default())
        .await
        .expect("consume");
    let d = next_delivery(&mut c).await;
    assert_eq!(&d.message.body[..], b"ok");
    assert_eq!(d.message.header("big"), Some(&fits.as_str().into()));
    d.ack().await.expect("ack");
    assert!(
        std::fs::read_dir(root.join("quarantine"))
            .expect("ls quarantine")
            .next()
            .is_none(),
        "nothing quarantined"
    );
}

/// Whether `fut` was cut off by a short timeout (`true`) or finished;
/// either way it must come back on time, not when a lock is released.
async fn on_time<T>(fut: impl std::future::Future<Output = T>) -> bool {
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_millis(300), fut).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "returned at the timeout, not when the lock was released"
    );
    r.is_err()
}

#[tokio::test]
async fn a_topology_lock_held_elsewhere_does_not_freeze_the_runtime() {
    use std::os::unix::io::AsRawFd;
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("bus");
    let conn = open(&root).await;
    conn.declare_queue("work", QueueOptions::default())
        .await
        .expect("declare");
    let auto = conn
        .declare_queue("auto", QueueOptions::default().with_auto_delete(true))
        .await
        .expect("declare auto-delete");
    let auto_consumer = conn
        .consume(&auto.name, ConsumeOptions::default())
        .await
        .expect("consume auto-delete");
    let dropped_consumer = conn
        .consume("work", ConsumeOptions::default())
        .await
        .expect("consume");
    // Another open file description: flock is per description, so this is
    // what another process holding it looks like.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(root.join("topology.lock"))
        .expect("open lock");
    // SAFETY: a valid descriptor owned by `holder`.
    assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);

    assert!(
        on_time(conn.declare_queue("q", QueueOptions::default())).await,
        "declare waits for the lock"
    );
    assert!(
        on_time(conn.consume("work", ConsumeOptions::default())).await,
        "consume's registration waits for the lock"
    );
    // Publishing reads the topology without the lock: it may finish.
    on_time(conn.send_to_queue("work", Message::new(&b"held"[..]))).await;
    // The last consumer of an auto-delete queue leaving deletes it under
    // the lock: cancelling returns on time, and so does dropping.
    assert!(
        on_time(auto_consumer.cancel()).await,
        "the auto-delete waits for the lock"
    );
    let started = std::time::Instant::now();
    drop(auto_consumer);
    drop(dropped_consumer);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "dropping consumers does not wait for the lock"
    );
    assert!(
        on_time(conn.close()).await,
        "close waits for the lock (it deletes exclusive queues under it)"
    );
    let other = open(&root).await;
    let started = std::time::Instant::now();
    drop(other);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "dropping a connection does not wait for the lock"
    );

    // Once the lock is free, the work handed off finishes: the auto-delete
    // queue goes, and the connection is closed.
    drop(holder);
    let check = open(&root).await;
    tokio::time::timeout(WAIT, async {
        loop {
            let passive = QueueOptions::passive();
            match check.declare_queue(&auto.name, passive).await {
                Err(Error::NotFound(_)) => break,
                Ok(_) => tokio::task::yield_now().await,
                Err(e) => panic!("passive declare: {e}"),
            }
        }
    })
    .await
    .expect("the auto-delete queue is deleted once the lock is free");
    tokio::time::timeout(WAIT, conn.close())
        .await
        .expect("close in time once the lock is free")
        .expect("close");
    assert!(!conn.is_open());
    tokio::time::timeout(WAIT, check.declare_queue("q", QueueOptions::default()))
        .await
        .expect("in time once the lock is free")
        .expect("declare");
    check.close().await.expect("close");
}

#[tokio::test(start_paused = true)]
async fn a_root_of_another_user_or_writable_by_others_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).expect("chown (needs root)");
    let e = FileConnection::open(&foreign)
        .await
        .expect_err("a foreign root is refused");
    assert!(e.to_string().contains("owned by uid 65534"), "{e}");

    let open_to_all = dir.path().join("world");
    std::fs::create_dir(&open_to_all).expect("mkdir");
    std::fs::set_permissions(&open_to_all, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let e = FileConnection::open(&open_to_all)
        .await
        .expect_err("a world-writable root is refused");
    assert!(e.to_string().contains("writable by everyone"), "{e}");

    // A sub-folder of another user under an otherwise good root.
    let root = dir.path().join("bus");
    drop(FileConnection::open(&root).await.expect("open"));
    std::os::unix::fs::chown(root.join("queues"), Some(65534), None).expect("chown");
    let e = FileConnection::open(&root)
        .await
        .expect_err("a foreign sub-folder is refused");
    assert!(e.to_string().contains("queues"), "{e}");

    // The shared-group option accepts a group-writable root, not others.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o770)).expect("chmod");
    assert!(FileConnection::open(&shared).await.is_err());
    FileConnection::open_with(&shared, FileOptions::default().with_shared_group(true))
        .await
        .expect("a shared group root opens with the option");
}

#[tokio::test(start_paused = true)]
async fn roots_that_climb_out_are_refused() {
    for bad in ["/../..", "/..", "/"] {
        let e = FileConnection::open(bad).await.expect_err("refused");
        assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e:?}");
    }
}

async fn next_delivery(c: &mut bus_core::Consumer) -> bus_core::Delivery {
    tokio::time::timeout(WAIT, c.next())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect("no error")
}

#[tokio::test(start_paused = true)]
async fn legacy_claims_symlinks_and_fake_owners_are_never_followed() {
    use bus_file::legacy::{Inbox, Readiness};
    let dir = tempfile::tempdir().expect("temp dir");
    let sentinel = Sentinel::new(dir.path());
    let input = dir.path().join("in");
    std::fs::create_dir_all(input.join(".bus/claims")).expect("mkdir");
    // `ln -s ~victim/.ssh IN/.bus/claims/<dead owner>`, with both a valid
    // owner id and a made-up name.
    symlink(&sentinel.dir, input.join(format!(".bus/claims/{OWNER}"))).expect("symlink");
    symlink(&sentinel.dir, input.join(".bus/claims/ofake")).expect("symlink");
    std::fs::write(input.join("job.wav"), b"good").expect("write");
    let inbox = Inbox::new(&input)
        .with_readiness(Readiness::RenamedIn)
        .with_rescan_interval(Duration::from_millis(100));
    let mut c = inbox.consume(0).await.expect("consume");
    let d = next_delivery(&mut c).await;
    assert_eq!(&d.message.body[..], b"good");
    d.ack().await.expect("ack");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), c.next())
            .await
            .is_err(),
        "nothing of the outside folder is delivered"
    );
    sentinel.assert_untouched();
}

#[tokio::test(start_paused = true)]
async fn legacy_hard_links_and_non_utf8_names_fail_with_a_reason() {
    use bus_file::legacy::{Inbox, Readiness};
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let sentinel = Sentinel::new(dir.path());
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).expect("mkdir");
    std::fs::hard_link(sentinel.dir.join("secret.txt"), input.join("linked.txt"))
        .expect("hard link");
    let raw = std::ffi::OsStr::from_bytes(b"bad-\xff.wav");
    std::fs::write(input.join(raw), b"x").expect("write");
    let long = format!("{}.wav", "l".repeat(251));
    std::fs::write(input.join(&long), b"long").expect("write");
    let inbox = Inbox::new(&input)
        .with_readiness(Readiness::RenamedIn)
        .with_rescan_interval(Duration::from_millis(100));
    let mut c = inbox.consume(0).await.expect("consume");
    let d = next_delivery(&mut c).await;
    assert_eq!(&d.message.body[..], b"long", "the good input is delivered");
    inbox.fail(&d, "the model gave up").await.expect("fail");
    let failed = input.join("failed");
    let error_files: Vec<String> = std::fs::read_dir(&failed)
        .expect("ls failed")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".error"))
        .collect();
    assert_eq!(error_files.len(), 3, "three reasons kept: {error_files:?}");
    let long_reason = error_files
        .iter()
        .find(|n| n.starts_with("lll"))
        .expect("the long name's reason, shortened");
    let text = std::fs::read_to_string(failed.join(long_reason)).expect("read");
    assert!(
        text.contains(&long) && text.contains("the model gave up"),
        "{text}"
    );
    assert!(
        failed.join(raw).exists(),
        "the non-UTF-8 input is in failed/"
    );
    assert!(
        failed.join("linked.txt").exists(),
        "the hard link is in failed/"
    );
    // The hard link moved; the file it named outside is unchanged.
    sentinel.assert_untouched();
}

#[tokio::test(start_paused = true)]
async fn legacy_symlinks_and_special_files_are_reported_in_failed() {
    use bus_file::legacy::{Inbox, Readiness};
    let dir = tempfile::tempdir().expect("temp dir");
    let sentinel = Sentinel::new(dir.path());
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).expect("mkdir");
    symlink(sentinel.dir.join("secret.txt"), input.join("a-link.txt")).expect("symlink");
    let fifo = std::ffi::CString::new(
        input
            .join("b-pipe.txt")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    std::fs::write(input.join("z-good.txt"), b"good").expect("write");
    let inbox = Inbox::new(&input)
        .with_readiness(Readiness::RenamedIn)
        .with_rescan_interval(Duration::from_millis(100));
    let mut c = inbox.consume(0).await.expect("consume");
    // Inputs are taken in name order, so the two bad entries were handled
    // by the time the good one arrives.
    let d = next_delivery(&mut c).await;
    assert_eq!(&d.message.body[..], b"good", "the good input is delivered");
    d.ack().await.expect("ack");
    let failed = input.join("failed");
    for (name, kind) in [("a-link.txt", "Symlink"), ("b-pipe.txt", "Fifo")] {
        let meta = std::fs::symlink_metadata(failed.join(name))
            .unwrap_or_else(|e| panic!("{name} moved to failed/: {e}"));
        assert!(!meta.is_file(), "{name} moved as it is");
        let reason = std::fs::read_to_string(failed.join(format!("{name}.error")))
            .unwrap_or_else(|e| panic!("{name}.error beside it: {e}"));
        assert!(
            reason.contains("not a regular file") && reason.contains(kind),
            "{name}: {reason}"
        );
        assert!(!input.join(name).exists() && std::fs::symlink_metadata(input.join(name)).is_err());
    }
    assert!(
        std::fs::read_link(failed.join("a-link.txt")).is_ok(),
        "the symlink itself moved, not its target"
    );
    sentinel.assert_untouched();
}

#[tokio::test(start_paused = true)]
async fn a_result_writer_never_writes_through_a_swapped_folder() {
    use bus_file::legacy::ResultWriter;
    let dir = tempfile::tempdir().expect("temp dir");
    let sentinel = Sentinel::new(dir.path());
    let out = dir.path().join("out");
    let writer = ResultWriter::new(&out, "json").expect("writer");
    std::fs::rename(&out, dir.path().join("out.old")).expect("move aside");
    symlink(&sentinel.dir, &out).expect("swap in a symlink");
    writer.write("job42.wav", b"{}").await.expect("write");
    assert_eq!(
        std::fs::read(dir.path().join("out.old/job42.json")).expect("in the real folder"),
        b"{}"
    );
    sentinel.assert_untouched();
}

/// A small tmpfs, unmounted when dropped. Mounting needs root, which CI
/// has; where it is refused the test fails saying so, it never passes by
/// skipping.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path) -> SmallDisk {
        std::fs::create_dir_all(at).expect("mkdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs"])
            .arg(at)
            .status();
        match status {
            Ok(s) if s.success() => SmallDisk(at.to_owned()),
            other => panic!(
                "this test needs to mount a 512 KiB tmpfs at {} to fill a disk, \
                 which needs root (CI runs as root); mount gave {other:?}",
                at.display()
            ),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: detached at once, freed once the connection's last
        // descriptors (closed by its tasks as they wind down) are gone.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(start_paused = true)]
async fn a_queue_that_filled_the_disk_can_be_drained() {
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = SmallDisk::mount(&dir.path().join("disk"));
    let root = disk.0.join("bus");
    let conn = open(&root).await;
    conn.declare_queue("fill", QueueOptions::default())
        .await
        .expect("declare");
    let mut sent = 0usize;
    let full = loop {
        match conn
            .send_to_queue("fill", Message::new(vec![7u8; 16 * 1024]))
            .await
        {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 1000, "a 512 KiB disk fills up");
    };
    assert!(
        full.to_string().contains("No space left"),
        "the publish fails cleanly: {full}"
    );
    assert!(sent > 0);
    let mut c = conn
        .consume("fill", ConsumeOptions::prefetch(10))
        .await
        .expect("consuming works on a full disk");
    let info = conn
        .declare_queue("fill", QueueOptions::passive())
        .await
        .expect("passive");
    assert_eq!(info.consumer_count, 1);
    for _ in 0..sent {
        let d = next_delivery(&mut c).await;
        d.ack().await.expect("ack");
    }
    drop(c);
    // Space is back: publishing works again.
    conn.send_to_queue("fill", Message::new(&b"again"[..]))
        .await
        .expect("publish after the drain");
    conn.close().await.expect("close");
    drop(conn);
    drop(disk);
}
