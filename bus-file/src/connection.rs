//! [`FileConnection`]: the transport contract over a folder.

use bus_core::equivalence::{self, ExchangeSettings};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bus_core::engine::dead_letter::{cycles_into, dead_letter, DeadLetter, Death, Reason};
use bus_core::engine::policy::{self, Admission, Depth, Limits};
use bus_core::routing::{
    alternate_exchange, auto_delete, check_binding_arguments, check_sender_routes, delete_exchange,
    sender_routes, strip_bcc, BindingStore, Destination, Exchange, ExchangeGraph,
};
use bus_core::{
    classic_reply_queue, is_reserved_name, Capabilities, Connection, ConsumeOptions, Consumer,
    DeleteExchangeOptions, DeleteQueueOptions, Error, ErrorDetail, ExchangeKind, ExchangeOptions,
    FieldTable, FieldValue, Message, PublishOptions, QueueArguments, QueueInfo, QueueOptions,
    QueueType, ReplyQueue, Result, Subject, DEFAULT_EXCHANGE, PREDECLARED_EXCHANGES,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::commit::Committer;
use crate::consumer::{self, Claim, Dispatcher};
use crate::envelope::Envelope;
use crate::fsys::{self, FileLock};
use crate::layout::{self, Layout, FORMAT_VERSION};
use crate::names::{self, check_path_name, MessageName};
use crate::sync::Mutex;
use crate::topology::{
    self, BindingRecord, ExchangeBindingRecord, ExchangeRecord, FileStamp, QueueRecord, Topology,
};

/// Settings of a [`FileConnection`], as `#[must_use]` builder methods over
/// the defaults.
#[derive(Clone, Debug)]
pub struct FileOptions {
    /// How often folders are listed again in full, as a safety net behind
    /// file-system events (which can overflow) and to find dead owners'
    /// claims. Default 1 s.
    pub rescan_interval: Duration,
    /// Whether persistent messages bound for durable queues are fsynced
    /// (file and folder) before their publish resolves. Default true;
    /// turning it off trades crash durability for speed.
    pub sync_persistent: bool,
    /// The largest message body accepted, by publish and when reading a
    /// message file: a bigger publish fails with
    /// [`Error::PreconditionFailed`] (as RabbitMQ's `max_message_size`), a
    /// bigger file is quarantined unread. Default 128 MiB, RabbitMQ's
    /// default.
    pub max_message_size: u64,
    /// Whether the root may be shared with the members of its group: with
    /// it, folders may be group-writable (and owned by another member);
    /// without it (the default), the root and its folders must be owned by
    /// the current user and writable by nobody else, or the open fails.
    ///
    /// Every member of the group can then read, forge, move or delete any
    /// message, queue and topology entry: only share a root with programs
    /// you trust as much as your own.
    pub shared_group: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            rescan_interval: Duration::from_secs(1),
            sync_persistent: true,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            shared_group: false,
        }
    }
}

impl FileOptions {
    /// Sets [`FileOptions::rescan_interval`].
    #[must_use]
    pub fn with_rescan_interval(mut self, every: Duration) -> Self {
        self.rescan_interval = every;
        self
    }

    /// Sets [`FileOptions::sync_persistent`].
    #[must_use]
    pub fn with_sync_persistent(mut self, on: bool) -> Self {
        self.sync_persistent = on;
        self
    }

    /// Sets [`FileOptions::max_message_size`].
    #[must_use]
    pub fn with_max_message_size(mut self, bytes: u64) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`FileOptions::shared_group`] (read its risks first).
    #[must_use]
    pub fn with_shared_group(mut self, on: bool) -> Self {
        self.shared_group = on;
        self
    }
}

/// The default of [`FileOptions::max_message_size`]: 128 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 128 << 20;

/// A connection to the folder transport: every process that opens the same
/// root shares its exchanges, queues and messages.
///
/// Dropping it closes it (as [`Connection::close`]).
#[derive(Debug)]
pub struct FileConnection {
    inner: Arc<Inner>,
}

/// The routing view of one topology version: its exchanges and bindings
/// indexed once in the exchange graph, for every publish until the
/// topology changes.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) topo: Topology,
    graph: ExchangeGraph<String>,
}

impl Snapshot {
    fn new(topo: Topology) -> Self {
        let mut graph = ExchangeGraph::with_predeclared();
        for (name, x) in &topo.exchanges {
            // A file written before alternate exchanges were checked may
            // hold one that is not a string: ignored, as it was then.
            let alternate = alternate_exchange(name, &x.arguments).ok().flatten();
            graph.insert(
                name,
                Exchange::new(
                    x.kind.clone(),
                    x.durable,
                    x.auto_delete,
                    x.internal,
                    alternate,
                ),
            );
        }
        for b in &topo.bindings {
            if let Some(x) = graph.get_mut(&b.exchange) {
                x.bind(
                    &b.routing_key,
                    Destination::Queue(b.queue.clone()),
                    b.arguments.clone(),
                );
            }
        }
        for b in &topo.exchange_bindings {
            if let Some(x) = graph.get_mut(&b.source) {
                x.bind(
                    &b.routing_key,
                    Destination::Exchange(b.destination.clone()),
                    b.arguments.clone(),
                );
            }
        }
        Snapshot { topo, graph }
    }

    /// The queues a message goes to, each once, in name order.
    fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: &FieldTable,
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let keys = std::iter::once(routing_key).chain(sender_routes(headers));
        let queues = &self.topo.queues;
        let found = self.graph.route(
            exchange,
            keys,
            headers,
            |q| queues.contains_key(q).then(|| q.to_owned()),
            &mut out,
        );
        if !found {
            return Err(Error::exchange_not_found(exchange));
        }
        Ok(out)
    }
}

fn exchange_kind(topo: &Topology, name: &str) -> Option<ExchangeKind> {
    PREDECLARED_EXCHANGES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| k.clone())
        .or_else(|| topo.exchanges.get(name).map(|x| x.kind.clone()))
}

fn predeclared(name: &str) -> Option<ExchangeKind> {
    PREDECLARED_EXCHANGES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| k.clone())
}

/// Connections of this process by root, so that a publish wakes this
/// process's consumers at once instead of waiting for a file-system event.
fn registry() -> &'static Mutex<Vec<Weak<Inner>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Weak<Inner>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The state of one connection, shared with its tasks.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) layout: Layout,
    pub(crate) owner: String,
    pub(crate) options: FileOptions,
    open: AtomicBool,
    owner_lock: Mutex<Option<FileLock>>,
    cache: Mutex<Option<(Option<FileStamp>, Arc<Snapshot>)>>,
    pub(crate) dispatchers: Mutex<HashMap<String, Arc<Dispatcher>>>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    committer: Arc<Committer>,
    pub(crate) janitor_wake: Notify,
    /// Publishes of this connection take it, first come first served, for
    /// their file work: messages reach their queues in the order their
    /// publishes were called, as on one AMQP channel, even with many in
    /// flight. The durable flush happens after it is released, so
    /// concurrent publishes still share one group commit.
    publish_order: tokio::sync::Mutex<()>,
    janitor: Mutex<Option<JoinHandle<()>>>,
    tmp_seq: AtomicU64,
    consumer_seq: AtomicU64,
    /// This connection itself, for handing file work to the blocking pool.
    me: Weak<Inner>,
}

impl FileConnection {
    /// Opens (creating it if needed) the transport rooted at `root`.
    ///
    /// # Errors
    /// [`Error::NotSupported`] when the root holds another on-disk format
    /// version; [`Error::Io`] when the folders cannot be created or locked.
    pub async fn open(root: impl AsRef<Path>) -> Result<FileConnection> {
        Self::open_with(root, FileOptions::default()).await
    }

    /// Opens the transport with explicit settings.
    ///
    /// # Errors
    /// As [`FileConnection::open`].
    pub async fn open_with(root: impl AsRef<Path>, options: FileOptions) -> Result<FileConnection> {
        let root = root.as_ref().to_owned();
        let shared_group = options.shared_group;
        let (layout, owner, lock) = blocking(move || open_root(&root, shared_group)).await?;

        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            layout,
            owner,
            options,
            open: AtomicBool::new(true),
            owner_lock: Mutex::new(Some(lock)),
            cache: Mutex::new(None),
            dispatchers: Mutex::new(HashMap::new()),
            watcher: Mutex::new(None),
            committer: Arc::new(Committer::default()),
            janitor_wake: Notify::new(),
            publish_order: tokio::sync::Mutex::new(()),
            janitor: Mutex::new(None),
            tmp_seq: AtomicU64::new(0),
            consumer_seq: AtomicU64::new(0),
        });
        // The watcher's callback runs on notify's own thread, which
        // `watch`/`unwatch` wait on: it only forwards events, and a task
        // handles them, so no lock of ours is ever taken on that thread.
        let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
        match notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let _ = events_tx.send(ev);
        }) {
            Ok(w) => *inner.watcher.lock() = Some(w),
            Err(e) => tracing::warn!(error = %e, "no file-system events; relying on rescans"),
        }
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(ev) = events_rx.recv().await {
                match weak.upgrade() {
                    Some(inner) => inner.on_fs_event(ev),
                    None => return,
                }
            }
        });
        {
            let mut reg = registry().lock();
            reg.retain(|w| w.strong_count() > 0);
            reg.push(Arc::downgrade(&inner));
        }
        let task = tokio::spawn(crate::janitor::run(Arc::downgrade(&inner)));
        *inner.janitor.lock() = Some(task);
        Ok(FileConnection { inner })
    }

    /// The root folder (canonical).
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.inner.layout.root
    }
}

fn check_format(layout: &Layout) -> Result<()> {
    let path = layout.format_file();
    let text = match layout.fs.read_checked(&path, 0, 4096, false) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if fsys::is_not_found(&e) => {
            let content = format!("bus-file on-disk format {FORMAT_VERSION}\n");
            let tmp = layout
                .tmp()
                .join(format!(".FORMAT.{}", names::process_tag()));
            layout
                .fs
                .write_atomic(&tmp, &path, content.as_bytes(), fsys::FILE_MODE, true)?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let version = text
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse::<u32>().ok());
    match version {
        Some(FORMAT_VERSION) => Ok(()),
        _ => Err(Error::NotSupported(format!(
            "{} says {:?}; this library reads format {FORMAT_VERSION}",
            layout.root.join(path).display(),
            text.trim()
        ))),
    }
}

impl Drop for FileConnection {
    fn drop(&mut self) {
        // Drop cannot wait: the shutdown's file work (which may wait on the
        // topology lock) goes to the blocking pool.
        let inner = self.inner.clone();
        off_runtime(move || inner.shutdown());
    }
}

/// Runs `f` on the blocking pool without waiting for it when a runtime is
/// there (from a `Drop` or another synchronous path on a runtime thread),
/// else right here.
pub(crate) fn off_runtime(f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            drop(h.spawn_blocking(f));
        }
        Err(_) => f(),
    }
}

/// What a publish did on disk, for the rest of it to finish: the links it
/// made (queue, file name, arguments), which of them succeeded, and the
/// queues that refused it.
struct Prepared {
    envelope: Envelope,
    links: Vec<(String, String, QueueArguments)>,
    linked: Vec<usize>,
    durable: bool,
    expiring: bool,
    refused: Vec<(String, QueueArguments, bool)>,
}

impl Inner {
    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// This connection as an `Arc`, to move into blocking work.
    pub(crate) fn arc(&self) -> Result<Arc<Inner>> {
        self.me
            .upgrade()
            .ok_or_else(|| Error::Closed("the file connection is closed".into()))
    }

    fn check_open(&self) -> Result<()> {
        if self.is_open() {
            Ok(())
        } else {
            Err(Error::Closed("the file connection is closed".into()))
        }
    }

    /// The current topology, re-read only when the file changed.
    pub(crate) fn snapshot(&self) -> Result<Arc<Snapshot>> {
        let stamp = topology::stamp(&self.layout.fs)?;
        let mut cache = self.cache.lock();
        if let Some((s, snap)) = cache.as_ref() {
            if *s == stamp {
                return Ok(snap.clone());
            }
        }
        let snap = Arc::new(Snapshot::new(topology::read(&self.layout.fs)?));
        *cache = Some((stamp, snap.clone()));
        Ok(snap)
    }

    /// Changes the topology under the root's lock: `f` sees the latest
    /// version and returns its result and whether it changed anything.
    pub(crate) fn modify<T>(
        &self,
        f: impl FnOnce(&mut Topology) -> Result<(T, bool)>,
    ) -> Result<T> {
        let _lock = FileLock::lock(&self.layout.fs, &self.layout.topology_lock())?;
        let mut t = topology::read(&self.layout.fs)?;
        let (out, changed) = f(&mut t)?;
        if changed {
            t.generation += 1;
            topology::write(&self.layout.fs, &t)?;
            *self.cache.lock() = None;
        }
        Ok(out)
    }

    /// Whether the connection `owner` is alive: it holds its lock.
    pub(crate) fn owner_alive(&self, owner: &str) -> bool {
        if owner == self.owner {
            return self.is_open();
        }
        if !names::is_owner_id(owner) {
            return false;
        }
        match FileLock::try_lock(&self.layout.fs, &self.layout.owner_lock(owner)) {
            Ok(Some(_unlocked)) => false,
            Ok(None) => true,
            Err(e) if fsys::is_not_found(&e) => false,
            Err(_) => true,
        }
    }

    /// The binding a bind or unbind names, after the checks both make: the
    /// connection is open, the names are safe path components, and the
    /// exchange is not the default one (which takes no explicit bindings).
    fn binding_record(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<BindingRecord> {
        self.check_open()?;
        check_path_name("queue", queue)?;
        if exchange == DEFAULT_EXCHANGE {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(""),
                "operation not permitted on the default exchange",
            )));
        }
        check_path_name("exchange", exchange)?;
        Ok(BindingRecord {
            exchange: exchange.to_owned(),
            queue: queue.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments,
        })
    }

    fn check_exclusive(&self, name: &str, q: &QueueRecord) -> Result<()> {
        match &q.exclusive_owner {
            Some(o) if *o != self.owner => Err(Error::queue_locked(name)),
            _ => Ok(()),
        }
    }

    /// Consumers of a queue whose owners are alive: (owner, exclusive).
    pub(crate) fn live_consumers(&self, queue: &str) -> Vec<(String, bool)> {
        self.layout
            .list_names(&self.layout.consumers(queue))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| {
                let (owner, exclusive) = names::consumer_file_owner(&f)?;
                Some((owner.to_owned(), exclusive))
            })
            .filter(|(o, _)| self.owner_alive(o))
            .collect()
    }

    fn counts(&self, name: &str) -> Result<QueueInfo> {
        let now = names::now_ms().max(0) as u64;
        let ready = self
            .layout
            .list_messages(&self.layout.ready(name))?
            .into_iter()
            .filter(|(_, m)| m.expires_at_ms.is_none_or(|e| !policy::is_expired(e, now)))
            .count();
        Ok(QueueInfo {
            name: name.to_owned(),
            message_count: u32::try_from(ready).unwrap_or(u32::MAX),
            consumer_count: u32::try_from(self.live_consumers(name).len()).unwrap_or(u32::MAX),
        })
    }

    /// Hands a message that just became ready in `queue` to every
    /// dispatcher of this process on that queue.
    pub(crate) fn announce(&self, queue: &str, file: &str) {
        let reg = registry().lock().clone();
        for w in reg {
            let Some(other) = w.upgrade() else { continue };
            if other.layout.root != self.layout.root {
                continue;
            }
            let d = other.dispatchers.lock().get(queue).cloned();
            if let Some(d) = d {
                d.offer(file);
            }
        }
    }

    /// Ends the local consumers of a queue that no longer exists.
    pub(crate) fn queue_gone(&self, queue: &str) {
        let reg = registry().lock().clone();
        for w in reg {
            let Some(other) = w.upgrade() else { continue };
            if other.layout.root != self.layout.root {
                continue;
            }
            let d = other.dispatchers.lock().remove(queue);
            if let Some(d) = d {
                other.unwatch(&d);
                d.stop();
            }
        }
    }

    fn on_fs_event(&self, ev: notify::Result<notify::Event>) {
        use notify::event::{EventKind, ModifyKind, RenameMode};
        let ev = match ev {
            Ok(ev) if !ev.need_rescan() => ev,
            _ => {
                for d in self.dispatchers.lock().values() {
                    d.request_rescan();
                }
                return;
            }
        };
        // Only names arriving matter: a name leaving the ready folder (a
        // claim) offered back would cost a failed claim per message.
        let arriving = match ev.kind {
            EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Any))
            | EventKind::Modify(ModifyKind::Name(RenameMode::Other)) => &ev.paths[..],
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                ev.paths.get(1..).unwrap_or_default()
            }
            _ => return,
        };
        for path in arriving {
            let (Some(file), Some(dir)) = (path.file_name(), path.parent()) else {
                continue;
            };
            if dir.file_name().is_none_or(|n| n != "ready") {
                continue;
            }
            let Some(queue) = dir
                .parent()
                .and_then(Path::file_name)
                .and_then(|q| q.to_str())
            else {
                continue;
            };
            let d = self.dispatchers.lock().get(queue).cloned();
            if let (Some(d), Some(file)) = (d, file.to_str()) {
                d.offer(file);
            }
        }
    }

    pub(crate) fn unwatch(&self, d: &Dispatcher) {
        use notify::Watcher;
        if let Some(w) = self.watcher.lock().as_mut() {
            let _ = w.unwatch(&self.layout.ready(&d.queue));
        }
    }

    /// The dispatcher of a queue in this connection, started on first use.
    fn dispatcher(self: &Arc<Self>, name: &str, record: &QueueRecord) -> Result<Arc<Dispatcher>> {
        let mut map = self.dispatchers.lock();
        if let Some(d) = map.get(name) {
            if d.queue_id == record.id {
                return Ok(d.clone());
            }
        }
        self.layout
            .fs
            .create_dir_all(&self.layout.claim_dir(name, &self.owner), fsys::DIR_MODE)?;
        let args = QueueArguments::from_table(&record.arguments)?;
        let d = Arc::new(Dispatcher::new(
            name.to_owned(),
            record.id.clone(),
            args,
            self.layout.clone(),
        ));
        {
            use notify::Watcher;
            if let Some(w) = self.watcher.lock().as_mut() {
                if let Err(e) = w.watch(
                    &self.layout.ready(name),
                    notify::RecursiveMode::NonRecursive,
                ) {
                    tracing::warn!(queue = name, error = %e, "no file-system events for queue");
                }
            }
        }
        if let Some(old) = map.insert(name.to_owned(), d.clone()) {
            old.stop();
        }
        tokio::spawn(consumer::run_dispatcher(d.clone(), Arc::downgrade(self)));
        Ok(d)
    }

    /// Requeues a claimed message at its original position with the
    /// redelivered mark.
    pub(crate) fn requeue(&self, queue: &str, claim: &Claim) {
        let name = claim.name.redelivered().file_name();
        match self
            .layout
            .fs
            .rename(&claim.path, &self.layout.ready(queue).join(&name))
        {
            Ok(()) => self.announce(queue, &name),
            Err(e) if fsys::is_not_found(&e) => {}
            Err(e) => tracing::warn!(queue, error = %e, "could not requeue a message"),
        }
    }

    /// Settles a claimed message negatively without requeue: dead-letters
    /// it when the queue has a dead-letter exchange, else drops it.
    pub(crate) fn dead_letter_or_drop<'a>(
        &'a self,
        queue: &'a str,
        args: &'a QueueArguments,
        claim: &'a Claim,
        reason: Reason,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
        // Boxed and typed as `dyn Send`: dead-lettering publishes, and
        // publishing can dead-letter (max-length), a cycle the compiler
        // cannot see through otherwise.
        Box::pin(async move {
            if let Some(dl) = dead_letter_of(&claim.envelope, queue, reason, args) {
                match self.publish_dead_letter(&claim.envelope, dl).await {
                    // RabbitMQ drops what it cannot dead-letter to a missing
                    // exchange; so does this transport.
                    Ok(()) | Err(Error::NotFound(_)) | Err(Error::Nacked(_)) => {}
                    Err(e) => {
                        let (me, q, c) = (self.arc()?, queue.to_owned(), claim.clone());
                        off_runtime(move || me.requeue(&q, &c));
                        return Err(e);
                    }
                }
            }
            let (fs, path) = (self.layout.fs.clone(), claim.path.clone());
            blocking(move || match fs.remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if fsys::is_not_found(&e) => Ok(()),
                Err(e) => Err(e.into()),
            })
            .await
        })
    }

    fn admission(&self, queue: &str, args: &QueueArguments, body_len: u64) -> Result<Admission> {
        let limits = Limits::of(args);
        if !limits.checks_admission() {
            return Ok(Admission::Accept);
        }
        let ready = self.layout.list_messages(&self.layout.ready(queue))?;
        Ok(limits.admit(depth_of(&ready), body_len))
    }

    /// Drops (or dead-letters, reason `maxlen`) the oldest ready messages
    /// of a `drop-head` queue until it is within its limits.
    async fn enforce_drop_head(&self, queue: &str, args: &QueueArguments) -> Result<()> {
        if !Limits::of(args).drops_head() {
            return Ok(());
        }
        let (me, q, a) = (self.arc()?, queue.to_owned(), args.clone());
        let claims = blocking(move || me.drop_head_claims(&q, &a)).await?;
        for claim in claims {
            self.dead_letter_or_drop(queue, args, &claim, Reason::MaxLen)
                .await?;
        }
        Ok(())
    }

    /// Claims the oldest ready messages of a `drop-head` queue beyond its
    /// limits, for [`Inner::enforce_drop_head`] to drop or dead-letter.
    fn drop_head_claims(&self, queue: &str, args: &QueueArguments) -> Result<Vec<Claim>> {
        let mut claims = Vec::new();
        let mut ready = self.layout.list_messages(&self.layout.ready(queue))?;
        ready.sort_by(|a, b| a.0.cmp(&b.0));
        let limits = Limits::of(args);
        let mut depth = depth_of(&ready);
        for (file, name) in ready {
            if !limits.must_drop_head(depth) {
                break;
            }
            depth.messages -= 1;
            depth.bytes = depth.bytes.saturating_sub(name.body_len);
            if let Some(claim) = self.claim_file(queue, &file, name)? {
                claims.push(claim);
            }
        }
        Ok(claims)
    }

    /// Claims a ready message for this connection and reads it. `None` when
    /// another consumer took it first or it was quarantined.
    pub(crate) fn claim_file(
        &self,
        queue: &str,
        file: &str,
        name: MessageName,
    ) -> Result<Option<Claim>> {
        let claim_dir = self.layout.claim_dir(queue, &self.owner);
        let path = claim_dir.join(file);
        let from = self.layout.ready(queue).join(file);
        // The claim folder is made when the queue's dispatcher starts, not
        // per claim: a missing one (taken back by a reaper) shows as a
        // rename failing with "not found", and is made again then.
        let fs = &self.layout.fs;
        match fs.rename(&from, &path) {
            Ok(()) => {}
            Err(e) if fsys::is_not_found(&e) => {
                match fs.stat(&claim_dir) {
                    Ok(_) => return Ok(None),
                    Err(e) if fsys::is_not_found(&e) => {}
                    Err(e) => return Err(e.into()),
                }
                if !fs.exists(&from) {
                    return Ok(None);
                }
                fs.create_dir_all(&claim_dir, fsys::DIR_MODE)?;
                match fs.rename(&from, &path) {
                    Ok(()) => {}
                    Err(e) if fsys::is_not_found(&e) => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
        Ok(consumer::read_claim(
            &self.layout,
            queue,
            path,
            name,
            self.options.max_message_size,
        ))
    }

    /// Publishes a dead letter of a message that was in `envelope` to its
    /// dead-letter exchange, with the dead-letter routing key or the
    /// message's own; queues it would close a cycle into are left out.
    /// Behind a `dyn Send` box, for the recursion of dead-lettering a
    /// refused publish.
    fn publish_dead_letter<'a>(
        &'a self,
        envelope: &'a Envelope,
        dl: DeadLetter,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            let routing_key = dl.routing_key.as_deref().unwrap_or(&envelope.routing_key);
            self.publish_routed(
                &dl.exchange,
                routing_key,
                dl.message,
                false,
                Some(dl.reason),
            )
            .await
        })
    }

    /// Publishes a message: routes it, writes it once, links it into every
    /// queue it goes to, and (for a persistent message bound for a durable
    /// queue) waits for the group commit.
    pub(crate) async fn publish_message(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        mandatory: bool,
    ) -> Result<()> {
        self.publish_routed(exchange, routing_key, message, mandatory, None)
            .await
    }

    /// [`Inner::publish_message`]; a dead letter (`dead`: why it died)
    /// skips the queues it would close a cycle into.
    async fn publish_routed(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        mandatory: bool,
        dead: Option<Reason>,
    ) -> Result<()> {
        let msg_ttl = message.ttl()?;
        if message.body.len() as u64 > self.options.max_message_size {
            return Err(Error::PreconditionFailed(
                format!(
                    "message size {} is larger than the configured maximum {}",
                    message.body.len(),
                    self.options.max_message_size
                )
                .into(),
            ));
        }
        crate::envelope::check_overhead(exchange, routing_key, &message.properties)?;
        let me = self.arc()?;
        let (x, rk) = (exchange.to_owned(), routing_key.to_owned());
        // Routing, admission and the writes run whole on the blocking pool,
        // one publish of this connection at a time, in call order.
        let order = self.publish_order.lock().await;
        let prepared =
            blocking(move || me.prepare_publish(&x, &rk, message, mandatory, msg_ttl, dead)).await;
        drop(order);
        let Some(Prepared {
            envelope,
            links,
            linked,
            durable,
            expiring,
            refused,
        }) = prepared?
        else {
            return Ok(());
        };
        if durable && !linked.is_empty() {
            let dirs = linked
                .iter()
                .map(|&i| self.layout.ready(&links[i].0))
                .collect();
            self.committer
                .sync_dirs(self.layout.fs.clone(), dirs)
                .await?;
        }
        for &i in &linked {
            let (q, f, args) = &links[i];
            self.announce(q, f);
            self.enforce_drop_head(q, args).await?;
        }
        if expiring {
            self.janitor_wake.notify_one();
        }
        if refused.is_empty() {
            return Ok(());
        }
        for (q, args, dead_letter) in &refused {
            if !*dead_letter {
                continue;
            }
            if let Some(dl) = dead_letter_of(&envelope, q, Reason::MaxLen, args) {
                let _ = self.publish_dead_letter(&envelope, dl).await;
            }
        }
        Err(Error::Nacked(format!(
            "queue {:?} is full (x-overflow reject-publish)",
            refused[0].0
        )))
    }

    /// The file work of a publish: routes it, checks every target queue's
    /// limits, writes the message once and links it into each queue that
    /// takes it. `None` when it goes nowhere (and is not mandatory).
    fn prepare_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        mandatory: bool,
        msg_ttl: Option<std::time::Duration>,
        dead: Option<Reason>,
    ) -> Result<Option<Prepared>> {
        let snap = self.snapshot()?;
        if dead.is_none() {
            // A dead letter may go to an internal exchange, as in RabbitMQ,
            // and carries headers its first publish was checked for.
            snap.graph.check_publish(exchange)?;
            check_sender_routes(&message.properties.headers)?;
        }
        let mut targets = snap.route(exchange, routing_key, &message.properties.headers)?;
        if let Some(reason) = dead {
            targets.retain(|q| !cycles_into(reason, q, &message.properties.headers));
        }
        if targets.is_empty() {
            if mandatory {
                return Err(Error::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                    message: Box::new(message),
                });
            }
            return Ok(None);
        }
        // BCC routes but is never delivered.
        let mut message = message;
        strip_bcc(&mut message.properties.headers);
        let now = names::now_ms();
        let stamp = names::next_stamp();
        let body_len = message.body.len() as u64;
        let persistent = message.is_persistent();
        let priority = message.properties.priority;
        let envelope = Envelope {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            published_at_ms: now,
            message,
        };

        let mut links = Vec::new();
        let mut refused = Vec::new();
        let mut durable = false;
        let mut expiring = false;
        for q in &targets {
            let Some(rec) = snap.topo.queues.get(q) else {
                continue;
            };
            let args = QueueArguments::from_table(&rec.arguments)?;
            match self.admission(q, &args, body_len)? {
                Admission::Accept => {}
                Admission::Refuse { dead_letter } => {
                    refused.push((q.clone(), args, dead_letter));
                    continue;
                }
            }
            let ttl = policy::message_ttl(args.message_ttl, msg_ttl);
            let expires_at_ms =
                ttl.map(|t| (now.max(0) as u64).saturating_add(t.as_millis() as u64));
            expiring |= expires_at_ms.is_some();
            let rank = 255 - policy::priority_level(args.max_priority, priority);
            let name = MessageName {
                rank,
                stamp,
                origin: names::process_tag().to_owned(),
                body_len,
                expires_at_ms,
                redelivered: false,
            };
            durable |= persistent && rec.durable && self.options.sync_persistent;
            links.push((q.clone(), name.file_name(), args));
        }

        let linked = if links.is_empty() {
            Vec::new()
        } else {
            let bytes = envelope.encode();
            let tmp = self.layout.tmp().join(format!(
                "{}.{}",
                self.owner,
                self.tmp_seq.fetch_add(1, Ordering::Relaxed)
            ));
            let dests: Vec<PathBuf> = links
                .iter()
                .map(|(q, f, _)| self.layout.ready(q).join(f))
                .collect();
            // Where the group commit flushes the whole file system once
            // per batch, that flush covers the files' data too.
            let fsync_files = durable && !crate::commit::SYNCS_FILE_SYSTEM;
            write_and_link(&self.layout.fs, &tmp, &bytes, fsync_files, &dests)?
        };
        Ok(Some(Prepared {
            envelope,
            links,
            linked,
            durable,
            expiring,
            refused,
        }))
    }

    /// [`Connection::consume`] on the blocking pool: checks the queue,
    /// registers the consumer under the topology lock and starts it.
    fn consume_sync(self: &Arc<Self>, queue: &str, options: &ConsumeOptions) -> Result<Consumer> {
        let inner = self;
        let snap = inner.snapshot()?;
        let rec = snap
            .topo
            .queues
            .get(queue)
            .ok_or_else(|| Error::queue_not_found(queue))?
            .clone();
        inner.check_exclusive(queue, &rec)?;
        let tag = options
            .consumer_tag
            .clone()
            .unwrap_or_else(|| format!("ctag-{}", uuid::Uuid::new_v4().simple()));
        if inner.dispatchers.lock().values().any(|d| d.has_tag(&tag)) {
            return Err(Error::PreconditionFailed(
                format!("consumer tag {tag:?} is already in use on this connection").into(),
            ));
        }
        // Registered under the topology lock so exclusive consumers are
        // checked against every process at once.
        let file = inner.next_consumer_file(options.exclusive);
        let consumer_file = inner.layout.consumers(queue).join(&file);
        inner.modify(|t| {
            if t.queues.get(queue).is_none_or(|q| q.id != rec.id) {
                return Err(Error::queue_not_found(queue));
            }
            let live = inner.live_consumers(queue);
            if live.iter().any(|(_, x)| *x) {
                // RabbitMQ answers ACCESS_REFUSED ("in exclusive use").
                return Err(Error::AccessRefused(ErrorDetail::about(
                    Subject::queue(queue),
                    format!("queue {queue:?} is in exclusive use by a consumer"),
                )));
            }
            if options.exclusive && !live.is_empty() {
                return Err(Error::AccessRefused(ErrorDetail::about(
                    Subject::queue(queue),
                    format!("queue {queue:?} has consumers; cannot consume exclusively"),
                )));
            }
            // An empty file: its name says all there is to know, and
            // creating it is the one step (nothing written after it can
            // fail and leave a phantom half-registered consumer; creating an
            // empty file needs no data block, so it works on a full disk,
            // where consuming is how the disk gets freed).
            inner
                .layout
                .fs
                .create_new(&consumer_file, fsys::FILE_MODE)?;
            Ok(((), false))
        })?;
        let dispatcher = match inner.dispatcher(queue, &rec) {
            Ok(d) => d,
            Err(e) => {
                let _ = inner.layout.fs.remove_file(&consumer_file);
                return Err(e);
            }
        };
        Ok(consumer::start(
            inner,
            &dispatcher,
            tag,
            consumer_file,
            options,
        ))
    }

    /// Ends the connection: consumers end, their unsettled deliveries go
    /// back to their queues, exclusive queues are deleted, the owner lock
    /// is released. Idempotent.
    fn shutdown(&self) {
        if !self.open.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Some(t) = self.janitor.lock().take() {
            t.abort();
        }
        let dispatchers: Vec<_> = self.dispatchers.lock().drain().map(|(_, d)| d).collect();
        let mut queues_left = BTreeSet::new();
        for d in dispatchers {
            for c in d.stop() {
                c.release(self);
                queues_left.insert(c.queue.clone());
            }
        }
        for q in queues_left {
            self.consumer_left(&q);
        }
        let owner = self.owner.clone();
        let deleted = self.modify(|t| {
            let mine: Vec<String> = t
                .queues
                .iter()
                .filter(|(_, q)| q.exclusive_owner.as_deref() == Some(owner.as_str()))
                .map(|(n, _)| n.clone())
                .collect();
            for n in &mine {
                t.remove_queue(n);
            }
            let changed = !mine.is_empty();
            Ok((mine, changed))
        });
        for q in deleted.unwrap_or_default() {
            let _ = self.layout.remove_queue_dir(&q);
            self.queue_gone(&q);
        }
        crate::janitor::release_owner(self, &self.owner);
        *self.watcher.lock() = None;
        let _ = self
            .layout
            .fs
            .remove_file(&self.layout.owner_lock(&self.owner));
        self.owner_lock.lock().take();
        registry()
            .lock()
            .retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), self));
    }

    /// A consumer of `queue` went away: an auto-delete queue without live
    /// consumers left is deleted.
    pub(crate) fn consumer_left(&self, queue: &str) {
        let snap = match self.snapshot() {
            Ok(s) => s,
            Err(_) => return,
        };
        if !snap.topo.queues.get(queue).is_some_and(|q| q.auto_delete) {
            return;
        }
        let deleted = self.modify(|t| {
            let auto = t.queues.get(queue).is_some_and(|q| q.auto_delete);
            if auto && self.live_consumers(queue).is_empty() {
                t.remove_queue(queue);
                Ok((true, true))
            } else {
                Ok((false, false))
            }
        });
        if let Ok(true) = deleted {
            let _ = self.layout.remove_queue_dir(queue);
            self.queue_gone(queue);
        }
    }

    pub(crate) fn next_consumer_file(&self, exclusive: bool) -> String {
        let n = self.consumer_seq.fetch_add(1, Ordering::Relaxed);
        if exclusive {
            format!("{}.{n}.x", self.owner)
        } else {
            format!("{}.{n}", self.owner)
        }
    }
}

/// Writes the envelope under its name into each queue folder, one file per
/// queue (written under `tmp/`, then renamed in: the one step that makes it
/// visible, whole). Not hard links: a message file has exactly one name, so
/// a reader can refuse any file with more (a hard link planted from
/// elsewhere). Returns the indexes of the destinations it reached (a queue
/// deleted meanwhile is skipped).
fn write_and_link(
    root: &fsys::Root,
    tmp: &Path,
    bytes: &[u8],
    durable: bool,
    dests: &[PathBuf],
) -> io::Result<Vec<usize>> {
    let mut linked = Vec::with_capacity(dests.len());
    for (i, dest) in dests.iter().enumerate() {
        let mut tmp = tmp.as_os_str().to_owned();
        tmp.push(format!(".{i}"));
        let tmp = PathBuf::from(tmp);
        let mut f = root.create_new(&tmp, fsys::FILE_MODE)?;
        let written = f
            .write_all(bytes)
            .and_then(|()| if durable { f.sync_all() } else { Ok(()) });
        drop(f);
        match written.and_then(|()| root.rename(&tmp, dest)) {
            Ok(()) => linked.push(i),
            Err(e) => {
                let _ = root.remove_file(&tmp);
                if !fsys::is_not_found(&e) {
                    return Err(e);
                }
            }
        }
    }
    Ok(linked)
}

/// The sum of the body lengths file names claim, saturating.
/// The depth of a queue from its listed ready names. Lengths come from file
/// names anyone with write access can craft: the sum saturates (a queue
/// "holding" u64::MAX bytes is full).
fn depth_of(ready: &[(String, MessageName)]) -> Depth {
    Depth {
        messages: ready.len() as u64,
        bytes: ready
            .iter()
            .fold(0u64, |acc, (_, m)| acc.saturating_add(m.body_len)),
    }
}

/// Runs file-system work on the blocking pool, so that a slow disk or a
/// lock held by another process never stalls the runtime's threads, and a
/// `tokio::time::timeout` around any call returns on time (as object_store's
/// local store does).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::backend("file", false, e.to_string()))?
}

/// Opens (creating it private if missing) a root: checks who owns it,
/// creates its folders, checks its format, and creates and locks this
/// connection's owner file.
fn open_root(root: &Path, shared_group: bool) -> Result<(Layout, String, FileLock)> {
    let root = normalize_root(root)?;
    fsys::create_dir_private(&root, fsys::DIR_MODE)?;
    let root = root.canonicalize()?;
    let fs = Arc::new(fsys::Root::open(&root)?);
    let layout = Layout {
        root,
        fs: fs.clone(),
    };
    check_owned(&layout, Path::new(""), shared_group)?;
    layout.create()?;
    for d in [
        layout.owners(),
        layout.tmp(),
        layout.quarantine(),
        layout.trash(),
        layout.queues(),
    ] {
        check_owned(&layout, &d, shared_group)?;
    }
    for q in layout::list_queue_dirs(&layout) {
        for d in [
            layout.queue(&q),
            layout.ready(&q),
            layout.claims(&q),
            layout.consumers(&q),
        ] {
            match check_owned(&layout, &d, shared_group) {
                Err(Error::Io(e)) if fsys::is_not_found(&e) => {}
                other => other?,
            }
        }
    }
    check_format(&layout)?;

    let owner = names::new_owner_id();
    // Locked before it has its final name, so no scanner can ever see
    // the lock file of a live connection unlocked.
    let tmp_lock = layout.owners().join(format!(".{owner}.lock.tmp"));
    let lock = FileLock::lock_file(fs.create_new(&tmp_lock, fsys::FILE_MODE)?)?;
    fs.rename(&tmp_lock, &layout.owner_lock(&owner))?;
    lock.file().sync_all()?;
    Ok((layout, owner, lock))
}

/// A root path as given, with `.` and `..` resolved lexically; one that
/// climbs above `/` (`/../..`) is refused rather than taken as `/`.
fn normalize_root(root: &Path) -> Result<PathBuf> {
    use std::path::Component;
    let mut out = PathBuf::new();
    let mut depth = 0usize;
    for c in root.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "the root {} climbs out of its top folder",
                        root.display()
                    )));
                }
                out.pop();
                depth -= 1;
            }
            Component::Normal(n) => {
                out.push(n);
                depth += 1;
            }
        }
    }
    if depth == 0 {
        return Err(Error::InvalidArgument(format!(
            "the root {} is a top folder, not a folder of its own",
            root.display()
        )));
    }
    Ok(out)
}

/// Refuses a folder of the root owned by someone else or writable by
/// others (by the group too, unless `shared_group`): whoever can write
/// there can forge, move and delete messages and topology.
fn check_owned(layout: &Layout, rel: &Path, shared_group: bool) -> Result<()> {
    let st = if rel.as_os_str().is_empty() {
        layout.fs.stat_root()?
    } else {
        layout.fs.stat(rel)?
    };
    let me = rustix::process::geteuid().as_raw();
    let mode = st.st_mode;
    let path = layout.root.join(rel);
    if st.st_uid != me && !shared_group {
        return Err(Error::AccessRefused(
            format!(
                "{} is owned by uid {}, not by this user (uid {me}); the file transport \
             refuses a root others control (FileOptions::shared_group relaxes this for \
             a shared group)",
                path.display(),
                st.st_uid
            )
            .into(),
        ));
    }
    let forbidden = if shared_group { 0o002 } else { 0o022 };
    if mode & forbidden != 0 {
        return Err(Error::AccessRefused(
            format!(
                "{} is writable by {} (mode {:o}); the file transport refuses a root \
             others can write into",
                path.display(),
                if mode & 0o002 != 0 {
                    "everyone"
                } else {
                    "its group"
                },
                mode & 0o7777
            )
            .into(),
        ));
    }
    Ok(())
}

/// The dead letter of the message in `envelope` leaving `queue` for
/// `reason`, or `None` when the queue drops it (no dead-letter exchange).
fn dead_letter_of(
    envelope: &Envelope,
    queue: &str,
    reason: Reason,
    args: &QueueArguments,
) -> Option<DeadLetter> {
    let death = Death::new(reason, queue, &envelope.exchange, &envelope.routing_key);
    dead_letter(&envelope.message, &death, args)
}

/// Checks a redeclaration of the queue `name` against its record, as
/// RabbitMQ does: flags, then the arguments it compares, naming the first
/// that differs.
fn check_queue_redeclare(
    name: &str,
    existing: &QueueRecord,
    options: &QueueOptions,
    wanted: &QueueArguments,
) -> Result<()> {
    equivalence::check_queue_flags(name, existing.durable, existing.auto_delete, options)?;
    // The record holds arguments this transport normalised and accepted.
    let have = QueueArguments::from_table(&existing.arguments)?;
    equivalence::check_queue_arguments(name, &have, wanted)
}

/// The topology operations, synchronous: each runs whole on the blocking
/// pool ([`blocking`]), since it takes the topology `flock`, which another
/// process may hold for as long as it likes.
impl Inner {
    fn declare_exchange_sync(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
    ) -> Result<()> {
        tracing::debug!(exchange = name, ?kind, "declare exchange");
        let inner = self;
        inner.check_open()?;
        // As RabbitMQ, the type is checked first, and not at all by a
        // passive declaration.
        if !options.passive {
            kind.require_built_in("file")?;
        }
        if name == DEFAULT_EXCHANGE {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(""),
                "operation not permitted on the default exchange",
            )));
        }
        check_path_name("exchange", name)?;
        if let Some(k) = predeclared(name) {
            if options.passive {
                return Ok(());
            }
            let predeclared = ExchangeSettings {
                kind: &k,
                durable: true,
                auto_delete: false,
                internal: false,
                alternate: None,
            };
            return equivalence::check_exchange(
                name,
                &predeclared,
                &ExchangeSettings::declared(&kind, &options),
            );
        }
        if options.passive {
            return if inner.snapshot()?.topo.exchanges.contains_key(name) {
                Ok(())
            } else {
                Err(Error::exchange_not_found(name))
            };
        }
        if is_reserved_name(name) {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(name),
                format!("exchange name {name:?} contains reserved prefix 'amq.*'"),
            )));
        }
        alternate_exchange(name, &options.arguments)?;
        let rec = ExchangeRecord {
            kind,
            durable: options.durable,
            auto_delete: options.auto_delete,
            internal: options.internal,
            arguments: options.arguments,
        };
        inner.modify(|t| match t.exchanges.get(name) {
            Some(existing) => {
                let have = ExchangeSettings {
                    kind: &existing.kind,
                    durable: existing.durable,
                    auto_delete: existing.auto_delete,
                    internal: existing.internal,
                    alternate: existing
                        .arguments
                        .get("alternate-exchange")
                        .and_then(FieldValue::as_str),
                };
                let want = ExchangeSettings {
                    kind: &rec.kind,
                    durable: rec.durable,
                    auto_delete: rec.auto_delete,
                    internal: rec.internal,
                    alternate: rec
                        .arguments
                        .get("alternate-exchange")
                        .and_then(FieldValue::as_str),
                };
                equivalence::check_exchange(name, &have, &want).map(|()| ((), false))
            }
            None => {
                t.exchanges.insert(name.to_owned(), rec);
                Ok(((), true))
            }
        })
    }

    fn delete_exchange_sync(&self, name: &str, if_unused: bool) -> Result<()> {
        let inner = self;
        inner.check_open()?;
        if name == DEFAULT_EXCHANGE {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(""),
                "operation not permitted on the default exchange",
            )));
        }
        check_path_name("exchange", name)?;
        if is_reserved_name(name) {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::exchange(name),
                format!("exchange name {name:?} contains reserved prefix 'amq.*'"),
            )));
        }
        inner.modify(|t| {
            if !t.exchanges.contains_key(name) {
                return Ok(((), false));
            }
            if if_unused && t.has_bindings_from(name) {
                return Err(Error::PreconditionFailed(ErrorDetail::about(
                    Subject::exchange(name),
                    format!("exchange {name:?} in use"),
                )));
            }
            delete_exchange(t, name);
            Ok(((), true))
        })
    }

    fn declare_queue_sync(&self, name: &str, options: QueueOptions) -> Result<QueueInfo> {
        tracing::debug!(queue = name, durable = options.durable, "declare queue");
        let inner = self;
        inner.check_open()?;
        if options.passive {
            check_path_name("queue", name)?;
            let snap = inner.snapshot()?;
            let q = snap
                .topo
                .queues
                .get(name)
                .ok_or_else(|| Error::queue_not_found(name))?;
            if let Some(o) = &q.exclusive_owner {
                if *o != inner.owner && inner.owner_alive(o) {
                    return Err(Error::queue_locked(name));
                }
            }
            return inner.counts(name);
        }
        let name = if name.is_empty() {
            format!("amq.gen-{}", uuid::Uuid::new_v4().simple())
        } else {
            check_path_name("queue", name)?;
            if is_reserved_name(name) {
                return Err(Error::AccessRefused(ErrorDetail::about(
                    Subject::queue(name),
                    format!("queue name {name:?} contains reserved prefix 'amq.*'"),
                )));
            }
            name.to_owned()
        };
        let args = options.arguments.normalized()?;
        if args.expires.is_some() {
            return Err(Error::NotSupported(
                "x-expires (queue expiry) is not offered by the file transport".into(),
            ));
        }
        match args.queue_type {
            None | Some(QueueType::Classic) => {}
            Some(other) => {
                return Err(Error::NotSupported(format!(
                    "x-queue-type {:?} is not offered by the file transport",
                    other.as_str()
                )))
            }
        }
        let rec = QueueRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            durable: options.durable,
            exclusive_owner: options.exclusive.then(|| inner.owner.clone()),
            auto_delete: options.auto_delete,
            arguments: args.to_table(),
        };
        let layout = inner.layout.clone();
        inner.modify(|t| {
            if let Some(existing) = t.queues.get(&name) {
                match &existing.exclusive_owner {
                    Some(o) if *o != inner.owner && inner.owner_alive(o) => {
                        return Err(Error::queue_locked(&name))
                    }
                    Some(o) if *o != inner.owner => {
                        // Its owner died before anyone reaped it.
                        t.remove_queue(&name);
                        layout.remove_queue_dir(&name)?;
                    }
                    _ => {
                        check_queue_redeclare(&name, existing, &options, &args)?;
                        return Ok(((), false));
                    }
                }
            }
            // A folder without a topology entry is left from a crash.
            layout.remove_queue_dir(&name)?;
            layout.create_queue(&name)?;
            t.queues.insert(name.clone(), rec);
            Ok(((), true))
        })?;
        inner.counts(&name)
    }

    fn delete_queue_sync(&self, name: &str, options: DeleteQueueOptions) -> Result<u32> {
        let inner = self;
        inner.check_open()?;
        check_path_name("queue", name)?;
        let deleted = inner.modify(|t| {
            let Some(q) = t.queues.get(name) else {
                return Ok((None, false));
            };
            if let Some(o) = &q.exclusive_owner {
                if *o != inner.owner && inner.owner_alive(o) {
                    return Err(Error::queue_locked(name));
                }
            }
            let info = inner.counts(name)?;
            if options.if_unused && info.consumer_count > 0 {
                return Err(Error::PreconditionFailed(ErrorDetail::about(
                    Subject::queue(name),
                    format!("queue {name:?} in use"),
                )));
            }
            if options.if_empty && info.message_count > 0 {
                return Err(Error::PreconditionFailed(ErrorDetail::about(
                    Subject::queue(name),
                    format!("queue {name:?} not empty"),
                )));
            }
            t.remove_queue(name);
            inner.layout.remove_queue_dir(name)?;
            Ok((Some(info.message_count), true))
        })?;
        match deleted {
            Some(n) => {
                inner.queue_gone(name);
                Ok(n)
            }
            None => Ok(0),
        }
    }

    fn purge_queue_sync(&self, name: &str) -> Result<u32> {
        let inner = self;
        inner.check_open()?;
        check_path_name("queue", name)?;
        let snap = inner.snapshot()?;
        let q = snap
            .topo
            .queues
            .get(name)
            .ok_or_else(|| Error::queue_not_found(name))?;
        inner.check_exclusive(name, q)?;
        let ready = inner.layout.ready(name);
        let mut n = 0u32;
        for (file, _) in inner.layout.list_messages(&ready)? {
            match inner.layout.fs.remove_file(&ready.join(file)) {
                Ok(()) => n += 1,
                Err(e) if fsys::is_not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }

    fn bind_queue_sync(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        let inner = self;
        let b = inner.binding_record(queue, exchange, routing_key, arguments)?;
        inner.modify(|t| {
            let q = t
                .queues
                .get(queue)
                .ok_or_else(|| Error::queue_not_found(queue))?;
            inner.check_exclusive(queue, q)?;
            let kind =
                exchange_kind(t, exchange).ok_or_else(|| Error::exchange_not_found(exchange))?;
            check_binding_arguments(&kind, &b.arguments)?;
            if t.bindings.contains(&b) {
                return Ok(((), false));
            }
            t.bindings.push(b);
            Ok(((), true))
        })
    }

    fn unbind_queue_sync(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        let inner = self;
        let b = inner.binding_record(queue, exchange, routing_key, arguments)?;
        inner.modify(|t| {
            if let Some(q) = t.queues.get(queue) {
                inner.check_exclusive(queue, q)?;
            }
            let before = t.bindings.len();
            t.bindings.retain(|x| *x != b);
            if t.bindings.len() == before {
                return Ok(((), false));
            }
            auto_delete(t, [exchange.to_owned()]);
            Ok(((), true))
        })
    }

    fn bind_exchange_sync(&self, b: ExchangeBindingRecord) -> Result<()> {
        let b = self.exchange_binding_record(b)?;
        self.modify(|t| {
            for name in [&b.destination, &b.source] {
                if exchange_kind(t, name).is_none() {
                    return Err(Error::exchange_not_found(name));
                }
            }
            let kind = exchange_kind(t, &b.source).expect("checked above");
            check_binding_arguments(&kind, &b.arguments)?;
            if t.exchange_bindings.contains(&b) {
                return Ok(((), false));
            }
            t.exchange_bindings.push(b);
            Ok(((), true))
        })
    }

    fn unbind_exchange_sync(&self, b: ExchangeBindingRecord) -> Result<()> {
        let b = self.exchange_binding_record(b)?;
        self.modify(|t| {
            let before = t.exchange_bindings.len();
            t.exchange_bindings.retain(|x| *x != b);
            if t.exchange_bindings.len() == before {
                return Ok(((), false));
            }
            auto_delete(t, [b.source.clone()]);
            Ok(((), true))
        })
    }

    /// The checks binding and unbinding exchanges make first: the
    /// connection is open, the names are safe path components, and neither
    /// is the default exchange.
    fn exchange_binding_record(&self, b: ExchangeBindingRecord) -> Result<ExchangeBindingRecord> {
        self.check_open()?;
        for name in [&b.destination, &b.source] {
            if name == DEFAULT_EXCHANGE {
                return Err(Error::AccessRefused(ErrorDetail::about(
                    Subject::exchange(""),
                    "operation not permitted on the default exchange",
                )));
            }
            check_path_name("exchange", name)?;
        }
        Ok(b)
    }
}

#[async_trait]
impl Connection for FileConnection {
    fn capabilities(&self) -> Capabilities {
        crate::capabilities()
    }

    async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
    ) -> Result<()> {
        let inner = self.inner.clone();
        let name = name.to_owned();
        blocking(move || inner.declare_exchange_sync(&name, kind, options)).await
    }

    async fn delete_exchange(&self, name: &str, options: DeleteExchangeOptions) -> Result<()> {
        let if_unused = options.if_unused;
        tracing::debug!(exchange = name, if_unused, "delete exchange");
        let inner = self.inner.clone();
        let name = name.to_owned();
        blocking(move || inner.delete_exchange_sync(&name, if_unused)).await
    }

    async fn declare_queue(&self, name: &str, options: QueueOptions) -> Result<QueueInfo> {
        let inner = self.inner.clone();
        let name = name.to_owned();
        blocking(move || inner.declare_queue_sync(&name, options)).await
    }

    async fn delete_queue(&self, name: &str, options: DeleteQueueOptions) -> Result<u32> {
        tracing::debug!(queue = name, "delete queue");
        let inner = self.inner.clone();
        let name = name.to_owned();
        blocking(move || inner.delete_queue_sync(&name, options)).await
    }

    async fn purge_queue(&self, name: &str) -> Result<u32> {
        let inner = self.inner.clone();
        let name = name.to_owned();
        blocking(move || inner.purge_queue_sync(&name)).await
    }

    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        tracing::debug!(queue, exchange, routing_key, "bind queue");
        let inner = self.inner.clone();
        let queue = queue.to_owned();
        let exchange = exchange.to_owned();
        let routing_key = routing_key.to_owned();
        blocking(move || inner.bind_queue_sync(&queue, &exchange, &routing_key, arguments)).await
    }

    async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        tracing::debug!(queue, exchange, routing_key, "unbind queue");
        let inner = self.inner.clone();
        let queue = queue.to_owned();
        let exchange = exchange.to_owned();
        let routing_key = routing_key.to_owned();
        blocking(move || inner.unbind_queue_sync(&queue, &exchange, &routing_key, arguments)).await
    }

    async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        let inner = self.inner.clone();
        let b = ExchangeBindingRecord {
            destination: destination.to_owned(),
            source: source.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments,
        };
        blocking(move || inner.bind_exchange_sync(b)).await
    }

    async fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        let inner = self.inner.clone();
        let b = ExchangeBindingRecord {
            destination: destination.to_owned(),
            source: source.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments,
        };
        blocking(move || inner.unbind_exchange_sync(b)).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        options: PublishOptions,
    ) -> Result<()> {
        tracing::debug!(exchange, routing_key, "publish");
        let inner = &self.inner;
        inner.check_open()?;
        if !exchange.is_empty() {
            check_path_name("exchange", exchange)?;
        }
        inner
            .publish_message(exchange, routing_key, message, options.mandatory)
            .await
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Consumer> {
        self.inner.check_open()?;
        check_path_name("queue", queue)?;
        // The registration runs whole on the blocking pool: it waits on the
        // topology lock.
        let (inner, queue) = (self.inner.clone(), queue.to_owned());
        blocking(move || inner.consume_sync(&queue, &options)).await
    }

    async fn reply_queue(&self) -> Result<ReplyQueue> {
        classic_reply_queue(self).await
    }

    async fn close(&self) -> Result<()> {
        let inner = self.inner.clone();
        blocking(move || {
            inner.shutdown();
            Ok(())
        })
        .await
    }

    fn is_open(&self) -> bool {
        self.inner.is_open()
    }
}
