//! [`FileConnection`]: the transport contract over a folder.
//!
//! By concern: [`root`] opens and checks a root, [`snapshot`] keeps the
//! routing view of the topology and changes it under the root's lock,
//! [`changes`] holds the topology operations, [`publish`] publishing and
//! queue admission, [`queues`] claiming, consuming and counting,
//! [`local`] this process's dispatchers and file-system events; this module
//! the public types, the connection's state and the trait impl.

mod changes;
mod local;
mod publish;
mod queues;
mod root;
mod snapshot;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{
    classic_reply_queue, Capabilities, Connection, ConsumeOptions, Consumer, DeleteExchangeOptions,
    DeleteQueueOptions, Error, ExchangeKind, ExchangeOptions, FieldTable, Message, PublishOptions,
    QueueInfo, QueueOptions, ReplyQueue, Result,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use self::local::registry;
use self::publish::Publishing;
use self::root::open_root;
use self::snapshot::SnapshotCache;
use crate::consumer::Dispatcher;
use crate::fsys::{self, FileLock};
use crate::layout::Layout;
use crate::names::{self, check_path_name};
use crate::sync::Mutex;
use crate::topology::ExchangeBindingRecord;

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

/// The state of one connection, shared with its tasks.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) layout: Layout,
    pub(crate) owner: String,
    pub(crate) options: FileOptions,
    open: AtomicBool,
    owner_lock: Mutex<Option<FileLock>>,
    /// The routing view of the topology, until the topology changes.
    snapshots: SnapshotCache,
    pub(crate) dispatchers: Mutex<HashMap<String, Arc<Dispatcher>>>,
    watcher: Mutex<Option<crate::watch::Watcher>>,
    pub(crate) janitor_wake: Notify,
    /// The publishing side: call order, temporary names, group commit.
    publishing: Publishing,
    janitor: Mutex<Option<JoinHandle<()>>>,
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
            snapshots: SnapshotCache::default(),
            dispatchers: Mutex::new(HashMap::new()),
            watcher: Mutex::new(None),
            publishing: Publishing::default(),
            janitor_wake: Notify::new(),
            janitor: Mutex::new(None),
            consumer_seq: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        let handler: crate::watch::Handler = Arc::new(move |seen| {
            if let Some(inner) = weak.upgrade() {
                inner.on_seen(seen);
            }
        });
        match crate::watch::Watcher::start(handler) {
            Ok(w) => *inner.watcher.lock() = Some(w),
            Err(e) => tracing::warn!(error = %e, "no file-system events; relying on rescans"),
        }
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
        tracing::debug!(destination, source, routing_key, "bind exchange");
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
        tracing::debug!(destination, source, routing_key, "unbind exchange");
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
        mut message: Message,
        options: PublishOptions,
    ) -> Result<()> {
        tracing::debug!(exchange, routing_key, "publish");
        bus_core::propagation::trace(&mut message);
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
}
