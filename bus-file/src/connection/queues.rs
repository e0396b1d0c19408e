//! Queue operations of a connection: claiming a ready message, requeueing
//! it, counting, registering consumers, auto-delete when the last one goes.

use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bus_core::engine::policy;
use bus_core::{ConsumeOptions, Consumer, Error, ErrorDetail, QueueInfo, Result, Subject};

use super::Inner;
use crate::consumer::{self, Claim, ClaimDirs};
use crate::fsys;
use crate::names::{self, MessageName};
use crate::topology::QueueRecord;

impl Inner {
    pub(super) fn check_exclusive(&self, name: &str, q: &QueueRecord) -> Result<()> {
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

    pub(super) fn counts(&self, name: &str) -> Result<QueueInfo> {
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

    /// Opens `queue`'s folders for a run of [`Inner::claim_in`].
    pub(crate) fn claim_dirs(&self, queue: &str) -> std::io::Result<ClaimDirs> {
        ClaimDirs::open(&self.layout, queue, &self.owner)
    }

    /// Claims a ready message for this connection and reads it. `None` when
    /// another consumer took it first or it was quarantined.
    pub(crate) fn claim_in(
        &self,
        queue: &str,
        dirs: &mut ClaimDirs,
        file: &str,
        name: MessageName,
    ) -> Result<Option<Claim>> {
        if !dirs.claim(OsStr::new(file), &self.owner)? {
            return Ok(None);
        }
        let path = self.layout.claim_dir(queue, &self.owner).join(file);
        Ok(consumer::read_claim(
            &self.layout,
            queue,
            dirs.claim_dir(),
            path,
            name,
            self.options.max_message_size,
        ))
    }

    /// Claims the ready messages `files` of `queue` (skipping those gone
    /// meanwhile, and every one when the queue is).
    pub(crate) fn claim_files(
        &self,
        queue: &str,
        files: impl IntoIterator<Item = (String, MessageName)>,
    ) -> Result<Vec<Claim>> {
        let mut files = files.into_iter().peekable();
        if files.peek().is_none() {
            return Ok(Vec::new());
        }
        let mut dirs = match self.claim_dirs(queue) {
            Ok(d) => d,
            Err(e) if fsys::is_not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut claims = Vec::new();
        for (file, name) in files {
            if let Some(c) = self.claim_in(queue, &mut dirs, &file, name)? {
                claims.push(c);
            }
        }
        Ok(claims)
    }

    /// [`Connection::consume`](bus_core::Connection::consume) on the
    /// blocking pool: checks the queue, registers the consumer under the
    /// topology lock and starts it.
    pub(super) fn consume_sync(
        self: &Arc<Self>,
        queue: &str,
        options: &ConsumeOptions,
    ) -> Result<Consumer> {
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
