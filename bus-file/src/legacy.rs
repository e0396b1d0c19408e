//! Legacy folder mode: the folder integration of programs that know nothing
//! of this library (contract 2 of the legacy system).
//!
//! * [`Inbox`]: an input folder where a legacy producer drops one plain
//!   file per request, consumed as a [`Consumer`] of [`Delivery`]s. A file
//!   is taken only once it is complete by the configured [`Readiness`] rule.
//!   Ack finishes it ([`Consumed`]: delete, or move to a done folder);
//!   nack or reject without requeue moves it to the failed folder with a
//!   `<name>.error` file beside it ([`Inbox::fail`] sets the text); nack with
//!   requeue puts it back. Several consumers, in one process or several,
//!   share an inbox: each file is claimed by an atomic rename into
//!   `.bus/claims/<owner>/`, so exactly one gets it, and the claims of a
//!   process that dies go back to the folder (an `flock` proves it is gone).
//! * [`ResultWriter`]: writes one result per request into a result folder,
//!   named with the request's stem (`in/job42.wav` → `out/job42.json`),
//!   atomically (a hidden temporary name, fsync, rename), so a legacy reader
//!   never sees half a file. It is also a [`Publisher`], so a [`bridge`]
//!   can move results from a queue into the folder.
//! * [`LegacyRpc`]: a call writes a request file and waits for the result
//!   file with the same stem.
//!
//! Names that start with a dot, and names ending in `.done`, `.tmp` or
//! `.part`, are never taken as requests; sub-folders (like `done/` and
//! `failed/`) are ignored. Any other entry that is not a plain file (a
//! symlink, which is never followed, a pipe, a socket, a device) and any
//! name that is not UTF-8 is moved as it is to the failed folder with a
//! `<name>.error` file saying why, so nothing dropped there goes unreported.
//!
//! [`bridge`]: bus_core::bridge

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bus_core::engine::unacked::Unacked;
use bus_core::{
    AckOptions, Acknowledger, Consumer, ConsumerControl, Delivery, Error, FieldValue, Message,
    NackOptions, PublishOptions, Publisher, Requeue, Result,
};
use futures::Stream;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::connection::blocking;
use crate::fsys::{self, FileLock, Root};
use crate::names;
use crate::sync::Mutex;

/// When a file in an input folder counts as complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The writer renames finished files into the folder, so every visible
    /// file is complete.
    RenamedIn,
    /// A marker `<name>.done` appears once `<name>` is complete; the marker
    /// is removed with the file.
    DoneMarker,
    /// The file's size and modification time have not changed for this
    /// long (measured on tokio's clock).
    Stable(Duration),
}

/// What happens to an input once it was processed (acked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Consumed {
    /// It is deleted.
    Delete,
    /// It is moved into this folder (created if missing).
    MoveTo(PathBuf),
}

/// Header carrying the input file's name on every inbox delivery, and
/// read by [`ResultWriter`] to name a result.
pub const FILE_HEADER: &str = "x-legacy-file";

const IGNORED_SUFFIXES: [&str; 3] = [".done", ".tmp", ".part"];

fn is_candidate(name: &str) -> bool {
    !name.starts_with('.') && !IGNORED_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// An input folder of plain files, consumed as deliveries.
#[derive(Clone, Debug)]
pub struct Inbox {
    shared: Arc<InboxShared>,
}

#[derive(Debug)]
struct InboxShared {
    dir: PathBuf,
    readiness: Readiness,
    consumed: Consumed,
    failed: PathBuf,
    rescan: Duration,
    max_size: u64,
    reasons: Mutex<HashMap<String, String>>,
}

impl Inbox {
    /// An inbox on `dir` with the defaults: files ready once stable for
    /// 2 s, consumed inputs moved to `dir/done/`, failed ones to
    /// `dir/failed/`, a rescan every second.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Inbox {
            shared: Arc::new(InboxShared {
                readiness: Readiness::Stable(Duration::from_secs(2)),
                consumed: Consumed::MoveTo(dir.join("done")),
                failed: dir.join("failed"),
                rescan: Duration::from_secs(1),
                max_size: crate::connection::DEFAULT_MAX_MESSAGE_SIZE,
                reasons: Mutex::new(HashMap::new()),
                dir,
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut InboxShared)) -> Self {
        let s = Arc::get_mut(&mut self.shared).expect("configure an inbox before consuming");
        f(s);
        self
    }

    /// Sets the readiness rule.
    #[must_use]
    pub fn with_readiness(self, r: Readiness) -> Self {
        self.with(|s| s.readiness = r)
    }

    /// Sets what happens to processed inputs.
    #[must_use]
    pub fn with_consumed(self, c: Consumed) -> Self {
        self.with(|s| s.consumed = c)
    }

    /// Sets the folder failed inputs move to.
    #[must_use]
    pub fn with_failed_dir(self, dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        self.with(|s| s.failed = dir)
    }

    /// Sets how often the folder is listed again (events are the fast path).
    #[must_use]
    pub fn with_rescan_interval(self, every: Duration) -> Self {
        self.with(|s| s.rescan = every)
    }

    /// Sets the largest input file taken (default 128 MiB): a bigger one
    /// moves to the failed folder unread, with the reason beside it.
    #[must_use]
    pub fn with_max_size(self, bytes: u64) -> Self {
        self.with(|s| s.max_size = bytes)
    }

    /// The input folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Rejects a delivery of this inbox as failed with `reason`: the input
    /// moves to the failed folder and `<name>.error` beside it says why.
    ///
    /// # Errors
    /// As [`Delivery::reject`].
    pub async fn fail(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        if let Some(name) = delivery
            .message
            .properties
            .headers
            .get(FILE_HEADER)
            .and_then(FieldValue::as_str)
        {
            self.shared
                .reasons
                .lock()
                .insert(name.to_owned(), reason.to_owned());
        }
        delivery.reject(Requeue::No).await
    }

    /// Starts consuming the folder: a stream of one delivery per ready
    /// file, in name order, at most `prefetch` unsettled at once (0: no
    /// limit).
    ///
    /// # Errors
    /// [`Error::Io`] when the folders cannot be created or locked.
    pub async fn consume(&self, prefetch: u16) -> Result<Consumer> {
        let s = self.shared.clone();
        let opened = blocking(move || open_inbox(&s)).await?;
        let (fs, failed_fs, done_fs, owner, claims, lock) = opened;
        let s = &self.shared;

        let (tx, rx) = mpsc::channel(64);
        let state = Arc::new(InboxConsumer {
            inbox: self.shared.clone(),
            fs,
            failed_fs,
            done_fs,
            owner,
            claims,
            prefetch,
            tx: Mutex::new(Some(tx)),
            unacked: Mutex::new(Unacked::new()),
            next_tag: AtomicU64::new(0),
            wake: Notify::new(),
            stopped: AtomicBool::new(false),
            requeued: Mutex::new(HashSet::new()),
            _lock: lock,
        });
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = watch(&s.dir, events_tx);
        tokio::spawn(run_inbox(state.clone(), events_rx, watcher));
        let tag = format!("inbox-{}", state.owner);
        Ok(Consumer::new(
            tag,
            s.dir.display().to_string(),
            Box::pin(InboxStream {
                rx,
                state: state.clone(),
            }),
            Arc::new(InboxControl { state }),
        ))
    }
}

type OpenedInbox = (Root, Root, Option<Root>, String, PathBuf, FileLock);

/// Creates an inbox's folders (never through a symlink), opens them as
/// roots, and registers a new owner, locked.
fn open_inbox(s: &InboxShared) -> Result<OpenedInbox> {
    let mut done = None;
    for d in std::iter::once(&s.dir)
        .chain(std::iter::once(&s.failed))
        .chain(match &s.consumed {
            Consumed::MoveTo(d) => Some(d),
            Consumed::Delete => None,
        })
    {
        fsys::create_dir_private(d, fsys::DIR_MODE)?;
    }
    let fs = Root::open(&s.dir)?;
    let failed_fs = Root::open(&s.failed)?;
    if let Consumed::MoveTo(d) = &s.consumed {
        done = Some(Root::open(d)?);
    }
    for d in [".bus/owners", ".bus/claims"] {
        fs.create_dir_all(Path::new(d), fsys::DIR_MODE)?;
    }
    let owner = names::new_owner_id();
    let tmp_lock = PathBuf::from(format!(".bus/owners/.{owner}.tmp"));
    let lock = FileLock::lock_file(fs.create_new(&tmp_lock, fsys::FILE_MODE)?)?;
    fs.rename(&tmp_lock, &owner_lock(&owner))?;
    let claims = PathBuf::from(".bus/claims").join(&owner);
    fs.create_dir_all(&claims, fsys::DIR_MODE)?;
    Ok((fs, failed_fs, done, owner, claims, lock))
}

fn owner_lock(owner: &str) -> PathBuf {
    PathBuf::from(format!(".bus/owners/{owner}.lock"))
}

/// The name of the `.error` file beside a failed input: `<name>.error`
/// when that fits in a file name (255 bytes), else a shortened name with a
/// hash of the full one, so the reason is never lost to `ENAMETOOLONG`
/// (the full name is then the first line of the file).
fn error_file_name(name: &OsStr) -> (OsString, bool) {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    if bytes.len() + ".error".len() <= 255 {
        let mut n = name.to_owned();
        n.push(".error");
        return (n, false);
    }
    let lossy = name.to_string_lossy();
    let short = crate::layout::truncate_bytes(&lossy, 200);
    let hash = crate::codec::crc32(bytes);
    (OsString::from(format!("{short}.{hash:08x}.error")), true)
}

/// Starts a watcher whose events only wake a task (never locks on
/// notify's thread); `None` when events are unavailable (rescans remain).
fn watch(dir: &Path, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Opening and reading (an access) changes nothing a scan looks
        // for, and the scans themselves open the folder: only other events
        // wake the task, or every scan would wake the next.
        if !matches!(&ev, Ok(ev) if ev.kind.is_access()) {
            let _ = tx.send(());
        }
    })
    .ok()?;
    w.watch(dir, notify::RecursiveMode::NonRecursive).ok()?;
    Some(w)
}

#[derive(Debug)]
struct Held {
    name: String,
}

#[derive(Debug)]
struct InboxConsumer {
    inbox: Arc<InboxShared>,
    /// The input folder, opened once: nothing under it is reached through
    /// a symlink.
    fs: Root,
    failed_fs: Root,
    done_fs: Option<Root>,
    owner: String,
    claims: PathBuf,
    prefetch: u16,
    tx: Mutex<Option<mpsc::Sender<Result<Delivery>>>>,
    unacked: Mutex<Unacked<Held>>,
    next_tag: AtomicU64,
    wake: Notify,
    stopped: AtomicBool,
    /// Files this consumer put back, delivered again as redelivered.
    requeued: Mutex<HashSet<String>>,
    _lock: FileLock,
}

/// What a scan knows of a file not yet ready.
#[derive(Debug)]
struct Seen {
    size: u64,
    mtime_ns: i64,
    since: Instant,
}

async fn run_inbox(
    c: Arc<InboxConsumer>,
    mut events: mpsc::UnboundedReceiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
) {
    let mut seen: HashMap<String, Seen> = HashMap::new();
    loop {
        if c.stopped.load(Ordering::Acquire) {
            return;
        }
        // The scan's file work runs on the blocking pool.
        let c2 = c.clone();
        let (back, next) = match tokio::task::spawn_blocking(move || {
            reap_dead(&c2.fs);
            let next = c2.scan(&mut seen);
            (seen, next)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "inbox scan failed");
                (HashMap::new(), None)
            }
        };
        seen = back;
        let wait = next.map_or(c.inbox.rescan, |d| d.min(c.inbox.rescan));
        tokio::select! {
            _ = c.wake.notified() => {}
            Some(()) = events.recv() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Gives back the claims of inbox consumers whose process died. Only
/// entries shaped like owner ids count, and their claim folders are
/// listed without following a symlink: an entry planted there cannot make
/// the inbox read or move files from elsewhere.
fn reap_dead(fs: &Root) {
    let claims_dir = Path::new(".bus/claims");
    for owner in crate::layout::list_utf8(fs.list_raw(claims_dir).unwrap_or_default()) {
        if !names::is_owner_id(&owner) {
            tracing::warn!(
                entry = owner,
                "ignoring an inbox claim folder with an invalid owner name"
            );
            continue;
        }
        let lock = owner_lock(&owner);
        let dead = match FileLock::try_lock(fs, &lock) {
            Ok(Some(_)) => true,
            Ok(None) => false,
            Err(e) => fsys::is_not_found(&e),
        };
        if !dead {
            continue;
        }
        let claims = claims_dir.join(&owner);
        let listed = match fs.list_raw(&claims) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(entry = owner, error = %e, "not taking back an inbox claim folder");
                continue;
            }
        };
        for f in listed {
            let _ = fs.rename(&claims.join(&f), Path::new(&f));
        }
        let _ = fs.remove_dir(&claims);
        let _ = fs.remove_file(&lock);
    }
}

impl InboxConsumer {
    fn capacity(&self) -> bool {
        let tx = self.tx.lock();
        let Some(tx) = tx.as_ref() else { return false };
        tx.capacity() > 0
            && (self.prefetch == 0 || self.unacked.lock().len() < usize::from(self.prefetch))
    }

    /// Lists the folder, claims ready files and delivers them; returns how
    /// long until a file being watched for stability may be ready.
    fn scan(self: &Arc<Self>, seen: &mut HashMap<String, Seen>) -> Option<Duration> {
        let fs = &self.fs;
        let mut names = Vec::new();
        for raw in fs.list_raw(Path::new("")).unwrap_or_default() {
            match raw.into_string() {
                Ok(n) => names.push(n),
                Err(raw) => self.refuse_raw(&raw, "the file name is not UTF-8"),
            }
        }
        names.retain(|n| is_candidate(n));
        names.sort();
        let now = Instant::now();
        let mut next: Option<Duration> = None;
        seen.retain(|n, _| names.contains(n));
        for name in names {
            if !self.capacity() {
                break;
            }
            let path = PathBuf::from(&name);
            let Ok(meta) = fs.stat(&path) else {
                continue;
            };
            match rustix::fs::FileType::from_raw_mode(meta.st_mode) {
                rustix::fs::FileType::RegularFile => {}
                // Folders (the failed and done folders may live here) are
                // not inputs.
                rustix::fs::FileType::Directory => continue,
                // A symlink (never followed), a pipe, a socket or a device
                // dropped here is reported, not silently skipped.
                kind => {
                    self.refuse(
                        OsStr::new(&name),
                        &format!("not a regular file but a {kind:?}; inputs must be plain files"),
                    );
                    continue;
                }
            }
            let ready = match &self.inbox.readiness {
                Readiness::RenamedIn => true,
                Readiness::DoneMarker => fs.exists(Path::new(&format!("{name}.done"))),
                Readiness::Stable(d) => {
                    let size = meta.st_size as u64;
                    let mtime_ns = meta
                        .st_mtime
                        .saturating_mul(1_000_000_000)
                        .saturating_add(meta.st_mtime_nsec as i64);
                    let entry = seen.entry(name.clone()).or_insert(Seen {
                        size,
                        mtime_ns,
                        since: now,
                    });
                    if entry.size != size || entry.mtime_ns != mtime_ns {
                        *entry = Seen {
                            size,
                            mtime_ns,
                            since: now,
                        };
                    }
                    let stable_for = now - entry.since;
                    if stable_for >= *d {
                        true
                    } else {
                        let left = *d - stable_for;
                        next = Some(next.map_or(left, |n| n.min(left)));
                        false
                    }
                }
            };
            if !ready {
                continue;
            }
            seen.remove(&name);
            let claimed = self.claims.join(&name);
            match fs.rename(&path, &claimed) {
                Ok(()) => {}
                Err(_) => continue,
            }
            // Bounded by the configured maximum, checked against the real
            // size before reading; a hard link (a file of elsewhere given a
            // second name here) is refused.
            let body = match fs.read_checked(&claimed, 0, self.inbox.max_size, true) {
                Ok(b) => b,
                Err(e) => {
                    self.fail_file(&name, &format!("unreadable: {e}"));
                    continue;
                }
            };
            let was = self.requeued.lock().remove(&name);
            self.deliver(name, body, meta.st_mtime.max(0) as u64, was);
        }
        next
    }

    fn deliver(self: &Arc<Self>, name: String, body: Vec<u8>, mtime: u64, redelivered: bool) {
        let tx = self.tx.lock().clone();
        let Some(Ok(permit)) = tx.as_ref().map(mpsc::Sender::try_reserve) else {
            let _ = self.fs.rename(&self.claims.join(&name), Path::new(&name));
            return;
        };
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed) + 1;
        let size = body.len() as i64;
        let message = Message::new(body)
            .with_message_id(name.clone())
            .with_timestamp(mtime)
            .with_header(FILE_HEADER, name.as_str())
            .with_header("x-legacy-size", size);
        self.unacked.lock().insert(tag, Held { name: name.clone() });
        let acker: Arc<dyn Acknowledger> = Arc::new(InboxAcker(self.clone()));
        permit.send(Ok(Delivery::new(
            message,
            "",
            name,
            redelivered,
            tag,
            Some(acker),
        )));
    }

    fn finish(&self, name: &str) -> io::Result<()> {
        let claimed = self.claims.join(name);
        match &self.done_fs {
            None => self.fs.remove_file(&claimed)?,
            Some(done) => self.fs.rename_to(&claimed, done, Path::new(name))?,
        }
        let _ = self.fs.remove_file(Path::new(&format!("{name}.done")));
        Ok(())
    }

    /// Writes the `.error` file of a failed input (`name` is its name in
    /// the failed folder).
    fn write_error(&self, name: &OsStr, reason: &str) {
        let (note, long) = error_file_name(name);
        let text = if long {
            format!("file: {}\n{reason}", name.to_string_lossy())
        } else {
            reason.to_owned()
        };
        let tmp = format!(".{}.error.tmp", uuid::Uuid::new_v4().simple());
        if let Err(e) = self.failed_fs.write_atomic(
            Path::new(&tmp),
            Path::new(&note),
            text.as_bytes(),
            fsys::FILE_MODE,
            true,
        ) {
            tracing::warn!(file = %name.to_string_lossy(), reason, error = %e, "could not write the reason of a failed input");
        }
    }

    fn fail_file(&self, name: &str, reason: &str) {
        self.write_error(OsStr::new(name), reason);
        if let Err(e) = self
            .fs
            .rename_to(&self.claims.join(name), &self.failed_fs, Path::new(name))
        {
            tracing::warn!(file = name, error = %e, "could not move a failed input");
        }
        let _ = self.fs.remove_file(Path::new(&format!("{name}.done")));
    }

    /// An input that cannot even be claimed under its name (not UTF-8):
    /// moved straight to the failed folder with the reason beside it, so
    /// it is reported rather than skipped.
    fn refuse_raw(&self, raw: &OsStr, reason: &str) {
        let path = Path::new(raw);
        if !self.fs.stat(path).is_ok_and(|m| {
            rustix::fs::FileType::from_raw_mode(m.st_mode) != rustix::fs::FileType::Directory
        }) {
            return;
        }
        self.refuse(raw, reason);
    }

    /// Moves an entry of the input folder as it is (a symlink is moved, not
    /// followed) to the failed folder, with the reason beside it.
    fn refuse(&self, raw: &OsStr, reason: &str) {
        let path = Path::new(raw);
        self.write_error(raw, reason);
        match self.fs.rename_to(path, &self.failed_fs, path) {
            Ok(()) => tracing::warn!(file = %raw.to_string_lossy(), reason, "refused an input"),
            Err(e) => {
                tracing::warn!(file = %raw.to_string_lossy(), error = %e, "could not move a refused input")
            }
        }
    }

    fn requeue(&self, held: &Held) {
        self.requeued.lock().insert(held.name.clone());
        let _ = self
            .fs
            .rename(&self.claims.join(&held.name), Path::new(&held.name));
        self.wake.notify_one();
    }

    fn take(&self, tag: u64, multiple: bool) -> Result<Vec<Held>> {
        let mut unacked = self.unacked.lock();
        let taken = unacked.take(tag, multiple).map(Iterator::collect);
        match taken {
            Ok(held) => Ok(held),
            Err(_) if self.stopped.load(Ordering::Acquire) => {
                Err(Error::Closed("the inbox consumer is gone".into()))
            }
            Err(e) => Err(Error::PreconditionFailed(
                format!("{e} on the inbox {}", self.inbox.dir.display()).into(),
            )),
        }
    }

    fn stop(&self, requeue: bool) {
        self.stopped.store(true, Ordering::Release);
        self.tx.lock().take();
        if requeue {
            let held: Vec<Held> = self.unacked.lock().drain().map(|(_, h)| h).collect();
            for h in &held {
                self.requeue(h);
            }
            let _ = self.fs.remove_dir(&self.claims);
            let _ = self.fs.remove_file(&owner_lock(&self.owner));
        }
        self.wake.notify_one();
    }
}

#[derive(Debug)]
struct InboxAcker(Arc<InboxConsumer>);

#[async_trait]
impl Acknowledger for InboxAcker {
    async fn ack(&self, tag: u64, options: AckOptions) -> Result<()> {
        let held = self.0.take(tag, options.multiple)?;
        let c = self.0.clone();
        // The moves and deletions run on the blocking pool.
        blocking(move || {
            for h in held {
                c.finish(&h.name)?;
            }
            Ok(())
        })
        .await?;
        self.0.wake.notify_one();
        Ok(())
    }

    async fn nack(&self, tag: u64, options: NackOptions) -> Result<()> {
        let held = self.0.take(tag, options.multiple)?;
        let requeue = options.requeue == Requeue::Yes;
        let c = self.0.clone();
        blocking(move || {
            for h in held {
                if requeue {
                    c.requeue(&h);
                } else {
                    let reason = c
                        .inbox
                        .reasons
                        .lock()
                        .remove(&h.name)
                        .unwrap_or_else(|| "rejected by the consumer".to_owned());
                    c.fail_file(&h.name, &reason);
                }
            }
            Ok(())
        })
        .await?;
        self.0.wake.notify_one();
        Ok(())
    }
}

struct InboxControl {
    state: Arc<InboxConsumer>,
}

#[async_trait]
impl ConsumerControl for InboxControl {
    async fn cancel(&self) -> Result<()> {
        self.state.stop(false);
        Ok(())
    }
}

struct InboxStream {
    rx: mpsc::Receiver<Result<Delivery>>,
    state: Arc<InboxConsumer>,
}

impl Stream for InboxStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let r = self.rx.poll_recv(cx);
        if matches!(r, Poll::Ready(Some(_))) {
            self.state.wake.notify_one();
        }
        r
    }
}

impl Drop for InboxStream {
    fn drop(&mut self) {
        self.rx.close();
        self.state.stop(true);
    }
}

/// Writes results into a result folder atomically, named after their
/// request's stem (or, from [`ResultWriter::keeping_names`], after the
/// request's whole name).
#[derive(Clone, Debug)]
pub struct ResultWriter {
    dir: PathBuf,
    /// The folder, opened once: a result is never written through a
    /// symlink swapped in for it later.
    fs: Arc<Root>,
    /// `None`: the request's own name, extension included.
    extension: Option<String>,
}

impl ResultWriter {
    /// A writer into `dir` (created private if missing) whose results get
    /// the extension `extension` (without a dot; empty for none).
    ///
    /// # Errors
    /// [`Error::Io`] when the folder cannot be created.
    pub fn new(dir: impl Into<PathBuf>, extension: &str) -> Result<Self> {
        Self::open(
            dir.into(),
            Some(extension.trim_start_matches('.').to_owned()),
        )
    }

    /// A writer into `dir` (created private if missing) whose results keep
    /// their request's whole name, extension included (`job42.wav` gives
    /// `job42.wav`): for moving files on unchanged.
    ///
    /// # Errors
    /// [`Error::Io`] when the folder cannot be created.
    pub fn keeping_names(dir: impl Into<PathBuf>) -> Result<Self> {
        Self::open(dir.into(), None)
    }

    fn open(dir: PathBuf, extension: Option<String>) -> Result<Self> {
        fsys::create_dir_private(&dir, fsys::DIR_MODE)?;
        let fs = Arc::new(Root::open(&dir)?);
        Ok(ResultWriter { dir, fs, extension })
    }

    /// The result file name for a request file name: its stem and this
    /// writer's extension, or the name itself for a writer
    /// [`keeping_names`](ResultWriter::keeping_names).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a name that is not a plain file name.
    pub fn result_name(&self, request: &str) -> Result<String> {
        check_file_name(request)?;
        let Some(extension) = &self.extension else {
            return Ok(request.to_owned());
        };
        let stem = Path::new(request)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(request);
        Ok(if extension.is_empty() {
            stem.to_owned()
        } else {
            format!("{stem}.{extension}")
        })
    }

    /// Writes the result of request `request` (a file name such as
    /// `job42.wav`): to a hidden temporary name, fsynced, then renamed to
    /// `<stem>.<extension>`. Returns the result's path.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a name that is not a plain file name;
    /// [`Error::Io`] when writing fails (nothing partial is left visible).
    pub async fn write(&self, request: &str, content: &[u8]) -> Result<PathBuf> {
        let name = self.result_name(request)?;
        let dest = self.dir.join(&name);
        let tmp = PathBuf::from(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let content = content.to_vec();
        let fs = self.fs.clone();
        tokio::task::spawn_blocking(move || {
            fs.write_atomic(&tmp, Path::new(&name), &content, fsys::FILE_MODE, true)
        })
        .await
        .map_err(|e| Error::backend("file", true, e.to_string()))??;
        Ok(dest)
    }
}

/// Refuses names that are not one plain file name inside a folder.
fn check_file_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 200
    {
        return Err(Error::InvalidArgument(format!(
            "{name:?} is not a plain file name (no separators, no leading dot, at most 200 bytes)"
        )));
    }
    Ok(())
}

/// A result arriving from a queue becomes a result file: named from the
/// [`FILE_HEADER`] header (the request's file name), else the message id,
/// else the routing key. The exchange is ignored.
#[async_trait]
impl Publisher for ResultWriter {
    async fn publish(
        &self,
        _exchange: &str,
        routing_key: &str,
        message: Message,
        _options: PublishOptions,
    ) -> Result<()> {
        let p = &message.properties;
        let name = p
            .headers
            .get(FILE_HEADER)
            .and_then(FieldValue::as_str)
            .map(str::to_owned)
            .or_else(|| p.message_id.clone())
            .unwrap_or_else(|| routing_key.to_owned());
        self.write(&name, &message.body).await.map(|_| ())
    }
}

/// Request/reply over legacy folders: a call writes a request file
/// (atomically) into the request folder and waits for the result file with
/// the same stem in the result folder.
#[derive(Clone, Debug)]
pub struct LegacyRpc {
    requests: PathBuf,
    results: PathBuf,
    readiness: Readiness,
    timeout: Duration,
    poll: Duration,
}

impl LegacyRpc {
    /// Calls through `requests` and `results`, with the legacy timeout
    /// (180 s) and results taken once stable for 1 s.
    pub fn new(requests: impl Into<PathBuf>, results: impl Into<PathBuf>) -> Self {
        LegacyRpc {
            requests: requests.into(),
            results: results.into(),
            readiness: Readiness::Stable(Duration::from_secs(1)),
            timeout: Duration::from_secs(180),
            poll: Duration::from_millis(250),
        }
    }

    /// Sets the readiness rule for result files.
    #[must_use]
    pub fn with_readiness(mut self, r: Readiness) -> Self {
        self.readiness = r;
        self
    }

    /// Sets the per-call timeout.
    #[must_use]
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sets how often the result folder is looked at besides its events.
    #[must_use]
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// Writes `content` as request file `name` and returns the content of
    /// the result with the same stem, which is then deleted.
    ///
    /// # Errors
    /// [`Error::Timeout`] when no complete result appears in time (the
    /// request file stays for the legacy side); [`Error::InvalidArgument`]
    /// for a name that is not a plain file name; [`Error::Io`].
    pub async fn call(&self, name: &str, content: &[u8]) -> Result<Vec<u8>> {
        check_file_name(name)?;
        fsys::create_dir_private(&self.requests, fsys::DIR_MODE)?;
        fsys::create_dir_private(&self.results, fsys::DIR_MODE)?;
        let requests = Root::open(&self.requests)?;
        let results = Root::open(&self.results)?;
        let stem = Path::new(name)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(name)
            .to_owned();
        let (tx, mut events) = mpsc::unbounded_channel();
        let _watcher = watch(&self.results, tx);
        let tmp = PathBuf::from(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        requests.write_atomic(&tmp, Path::new(name), content, fsys::FILE_MODE, true)?;

        let deadline = Instant::now() + self.timeout;
        let mut seen: Option<(String, u64, i64, Instant)> = None;
        loop {
            let now = Instant::now();
            if let Some((file, ready)) = self.find_result(&results, &stem, &mut seen, now) {
                if ready {
                    let path = Path::new(&file);
                    let body = results.read_checked(
                        path,
                        0,
                        crate::connection::DEFAULT_MAX_MESSAGE_SIZE,
                        true,
                    )?;
                    let _ = results.remove_file(path);
                    let _ = results.remove_file(Path::new(&format!("{file}.done")));
                    return Ok(body);
                }
            }
            if now >= deadline {
                return Err(Error::Timeout(self.timeout));
            }
            let mut wait = self.poll.min(deadline - now);
            if let (Readiness::Stable(d), Some((_, _, _, since))) = (&self.readiness, &seen) {
                wait = wait.min((*since + *d).saturating_duration_since(now));
            }
            tokio::select! {
                Some(()) = events.recv() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn find_result(
        &self,
        results: &Root,
        stem: &str,
        seen: &mut Option<(String, u64, i64, Instant)>,
        now: Instant,
    ) -> Option<(String, bool)> {
        let mut names = crate::layout::list_utf8(results.list_raw(Path::new("")).ok()?);
        names.retain(|n| {
            is_candidate(n) && Path::new(n).file_stem().and_then(|s| s.to_str()) == Some(stem)
        });
        names.sort();
        let file = names.into_iter().next()?;
        let meta = results.stat(Path::new(&file)).ok()?;
        if rustix::fs::FileType::from_raw_mode(meta.st_mode) != rustix::fs::FileType::RegularFile {
            return None;
        }
        let ready = match &self.readiness {
            Readiness::RenamedIn => true,
            Readiness::DoneMarker => results.exists(Path::new(&format!("{file}.done"))),
            Readiness::Stable(d) => {
                let size = meta.st_size as u64;
                let mtime = meta
                    .st_mtime
                    .saturating_mul(1_000_000_000)
                    .saturating_add(meta.st_mtime_nsec as i64);
                match seen {
                    Some((f, s, m, since)) if *f == file && *s == size && *m == mtime => {
                        now - *since >= *d
                    }
                    _ => {
                        *seen = Some((file.clone(), size, mtime, now));
                        d.is_zero()
                    }
                }
            }
        };
        Some((file, ready))
    }
}
