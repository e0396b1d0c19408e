//! Delivery: one dispatcher per queue and connection claims ready messages
//! (an atomic rename into the connection's claim folder) and hands them
//! round-robin to the connection's consumers with free prefetch capacity.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use async_trait::async_trait;
use bus_core::engine::dead_letter::Reason;
use bus_core::engine::policy;
use bus_core::engine::unacked::{Unacked, UnknownTag};
use bus_core::{
    AckOptions, Acknowledger, ConsumeOptions, Consumer, ConsumerControl, Delivery, Error,
    NackOptions, QueueArguments, Requeue, Result,
};
use futures::Stream;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::connection::{blocking, Inner};
use crate::envelope::Envelope;
use crate::fsys::{self, FileLock};
use crate::layout::{self, Layout};
use crate::names::{self, MessageName};
use crate::sync::{Mutex, MutexGuard};

/// Deliveries a consumer's stream buffers beyond what it has read.
const STREAM_BUFFER: usize = 256;

/// Names a dispatching round claims at most before handing them out.
const CLAIM_BATCH: usize = 32;

/// Acks of at most this many messages unlink their files in place rather
/// than on the blocking pool.
const INLINE_ACKS: usize = 16;

/// A message this connection has claimed: its file in the claim folder and
/// its content.
#[derive(Clone, Debug)]
pub(crate) struct Claim {
    /// The file, relative to the root.
    pub(crate) path: PathBuf,
    /// The claim folder holding it, open: settling it needs no walk.
    pub(crate) dir: Arc<fsys::Dir>,
    pub(crate) name: MessageName,
    pub(crate) envelope: Envelope,
}

impl Claim {
    /// The file's name in its claim folder.
    pub(crate) fn file(&self) -> &OsStr {
        self.path.file_name().unwrap_or_default()
    }

    /// Removes the file: the message is settled. Already gone is fine.
    pub(crate) fn remove(&self) -> std::io::Result<()> {
        match self.dir.remove_file(self.file()) {
            Err(e) if !fsys::is_not_found(&e) => Err(e),
            _ => Ok(()),
        }
    }
}

/// A queue's folders, open for a run of claims: the queue's folder, its
/// `ready/` and this connection's claim folder in it.
#[derive(Debug)]
pub(crate) struct ClaimDirs {
    queue: fsys::Dir,
    ready: fsys::Dir,
    claims: Arc<fsys::Dir>,
}

impl ClaimDirs {
    /// Opens the folders of `queue`, making this connection's claim folder
    /// if it is missing (inside the opened queue folder: a queue deleted
    /// meanwhile is never made again). `NotFound` when the queue is gone.
    pub(crate) fn open(layout: &Layout, queue: &str, owner: &str) -> std::io::Result<ClaimDirs> {
        let q = layout.fs.open_dir(&layout.queue(queue))?;
        let ready = q.open_dir(OsStr::new("ready"))?;
        let claims = Arc::new(Self::claims(&q, owner)?);
        Ok(ClaimDirs {
            queue: q,
            ready,
            claims,
        })
    }

    fn claims(queue: &fsys::Dir, owner: &str) -> std::io::Result<fsys::Dir> {
        let (claims, owner) = (OsStr::new("claims"), OsStr::new(owner));
        let open = || queue.open_dir(claims)?.open_dir(owner);
        match open() {
            Err(e) if fsys::is_not_found(&e) => {
                queue.create_dir(claims, fsys::DIR_MODE)?;
                queue.open_dir(claims)?.create_dir(owner, fsys::DIR_MODE)?;
                open()
            }
            r => r,
        }
    }

    /// Claims the ready message `file` by renaming it into the claim
    /// folder. `false` when it is not there (another consumer took it).
    pub(crate) fn claim(&mut self, file: &OsStr, owner: &str) -> std::io::Result<bool> {
        match self.ready.rename_to(file, &self.claims, file) {
            Ok(()) => Ok(true),
            Err(e) if fsys::is_not_found(&e) => {
                if !self.ready.exists(file) {
                    return Ok(false);
                }
                // The message is there, so the claim folder is not (taken
                // back by a reaper): made again, once.
                self.claims = Arc::new(Self::claims(&self.queue, owner)?);
                match self.ready.rename_to(file, &self.claims, file) {
                    Ok(()) => Ok(true),
                    Err(e) if fsys::is_not_found(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Puts a claimed, unsettled message back under its name `file`.
    fn unclaim(&self, claim: &Claim, file: &OsStr) -> std::io::Result<()> {
        claim.dir.rename_to(claim.file(), &self.ready, file)
    }

    /// The claim folder claims go to.
    pub(crate) fn claim_dir(&self) -> &Arc<fsys::Dir> {
        &self.claims
    }
}

/// Reads a claimed file, `file` in the claim folder `dir` (`path` relative
/// to the root); a file that is not a valid message is quarantined and
/// `None` returned.
pub(crate) fn read_claim(
    layout: &Layout,
    queue: &str,
    dir: &Arc<fsys::Dir>,
    path: PathBuf,
    name: MessageName,
    max_message_size: u64,
) -> Option<Claim> {
    // The name's length and the configured maximum bound the read, checked
    // against the file's real size before anything is allocated: a sparse
    // or lying file is quarantined unread.
    let file = path.file_name().unwrap_or_default();
    let decoded = if name.body_len > max_message_size {
        Err(format!(
            "the name claims a {}-byte body, over the maximum of {max_message_size}",
            name.body_len
        ))
    } else {
        let max = crate::envelope::max_file_len(name.body_len);
        dir.read_checked(file, name.body_len, max, true)
            .map_err(|e| format!("unreadable: {e}"))
    }
    .and_then(|bytes| Envelope::decode(&bytes).map_err(|e| e.to_string()))
    .and_then(|env| {
        if env.message.body.len() as u64 == name.body_len {
            Ok(env)
        } else {
            Err(format!(
                "the body is {} bytes, the name says {}",
                env.message.body.len(),
                name.body_len
            ))
        }
    });
    match decoded {
        Ok(envelope) => Some(Claim {
            path,
            dir: dir.clone(),
            name,
            envelope,
        }),
        Err(reason) => {
            layout::quarantine(layout, queue, &path, &reason);
            None
        }
    }
}

/// Claims and hands out the messages of one queue for one connection.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    pub(crate) queue: String,
    pub(crate) queue_id: String,
    pub(crate) args: QueueArguments,
    layout: Layout,
    state: Mutex<DispatchState>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct DispatchState {
    /// Names believed ready, in delivery order (a stale one fails to claim
    /// and is skipped).
    ready: BTreeSet<String>,
    /// The names of `ready` that carry an expiry, soonest first, so the
    /// next expiry is found without parsing every name at each wakeup.
    expiring: BTreeSet<(u64, String)>,
    rescan: bool,
    /// Names offered while a rescan lists the folder (`Some` meanwhile):
    /// the listing may have missed them, so they survive it replacing
    /// `ready`.
    offered_in_scan: Option<Vec<String>>,
    consumers: Vec<Arc<ConsumerShared>>,
    next: usize,
    stopped: bool,
    /// Held while this dispatcher is the queue's single active consumer.
    single_active: Option<FileLock>,
}

impl DispatchState {
    fn insert_ready(&mut self, file: String, name: &MessageName) {
        if let Some(at) = name.expires_at_ms {
            self.expiring.insert((at, file.clone()));
        }
        self.ready.insert(file);
    }

    fn pop_ready(&mut self) -> Option<String> {
        let file = self.ready.pop_first()?;
        if !self.expiring.is_empty() {
            if let Some(at) = MessageName::parse(&file).and_then(|n| n.expires_at_ms) {
                self.expiring.remove(&(at, file.clone()));
            }
        }
        Some(file)
    }

    /// Where `c` is among the consumers.
    fn position(&self, c: &Arc<ConsumerShared>) -> Option<usize> {
        self.consumers.iter().position(|x| Arc::ptr_eq(x, c))
    }

    fn set_ready(&mut self, listed: Vec<(String, MessageName)>) {
        self.ready.clear();
        self.expiring.clear();
        for (file, name) in listed {
            self.insert_ready(file, &name);
        }
    }
}

impl Dispatcher {
    pub(crate) fn new(
        queue: String,
        queue_id: String,
        args: QueueArguments,
        layout: Layout,
    ) -> Self {
        Dispatcher {
            queue,
            queue_id,
            args,
            layout,
            state: Mutex::new(DispatchState {
                rescan: true,
                ..DispatchState::default()
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, DispatchState> {
        self.state.lock()
    }

    /// A message file appeared in the ready folder.
    pub(crate) fn offer(&self, file: &str) {
        if let Some(name) = MessageName::parse(file) {
            let mut st = self.lock();
            if let Some(offered) = st.offered_in_scan.as_mut() {
                offered.push(file.to_owned());
            }
            st.insert_ready(file.to_owned(), &name);
            drop(st);
            self.wake.notify_one();
        }
    }

    /// File-system events may have been lost: list the folder again.
    pub(crate) fn request_rescan(&self) {
        self.lock().rescan = true;
        self.wake.notify_one();
    }

    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) fn has_tag(&self, tag: &str) -> bool {
        self.lock().consumers.iter().any(|c| c.tag == tag)
    }

    /// Stops dispatching and ends every consumer's stream; returns the
    /// consumers so the caller can requeue what they held.
    pub(crate) fn stop(&self) -> Vec<Arc<ConsumerShared>> {
        let mut st = self.lock();
        st.stopped = true;
        st.single_active = None;
        let cs = std::mem::take(&mut st.consumers);
        drop(st);
        for c in &cs {
            c.end_stream();
        }
        self.wake.notify_one();
        cs
    }

    fn remove_consumer(&self, c: &ConsumerShared) -> bool {
        let mut st = self.lock();
        let before = st.consumers.len();
        st.consumers.retain(|x| !std::ptr::eq(&**x, c));
        if st.consumers.is_empty() {
            st.single_active = None;
        }
        let removed = st.consumers.len() != before;
        drop(st);
        self.wake.notify_one();
        removed
    }

    fn rescan(&self, inner: &Inner) {
        self.lock().offered_in_scan = Some(Vec::new());
        let listed = self.list_ready(inner);
        let mut st = self.lock();
        let offered = st.offered_in_scan.take().unwrap_or_default();
        if let Some(listed) = listed {
            st.set_ready(listed);
            for file in offered {
                if let Some(name) = MessageName::parse(&file) {
                    st.insert_ready(file, &name);
                }
            }
        }
    }

    /// Lists the ready folder (quarantining what is not a message), or
    /// `None` when it cannot be listed or the queue is gone.
    fn list_ready(&self, inner: &Inner) -> Option<Vec<(String, MessageName)>> {
        let ready = self.layout.ready(&self.queue);
        for foreign in self.layout.list_foreign(&ready).unwrap_or_default() {
            layout::quarantine(
                &self.layout,
                &self.queue,
                &ready.join(&foreign),
                "not a message file name",
            );
        }
        let listed = match self.layout.list_messages(&ready) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(queue = self.queue, error = %e, "cannot list queue");
                return None;
            }
        };
        let still_there = inner
            .snapshot()
            .map(|s| {
                s.topo
                    .queues
                    .get(&self.queue)
                    .is_some_and(|q| q.id == self.queue_id)
            })
            .unwrap_or(true);
        if !still_there {
            inner.queue_gone(&self.queue);
            return None;
        }
        Some(listed)
    }

    /// Claims and delivers while there are ready messages and consumers
    /// with capacity. Returns claimed messages that had expired, for the
    /// caller to dead-letter.
    ///
    /// Works in rounds: under the lock, it takes what the consumers can
    /// hold (at most [`CLAIM_BATCH`] names); without it, it claims and
    /// reads them, so publishes offering names never wait on file work;
    /// under the lock again, it hands them out round-robin. The queue's
    /// folders are opened once per pass, not walked to per message.
    fn deliver(&self, inner: &Inner) -> Vec<Claim> {
        let mut expired = Vec::new();
        let mut dirs: Option<ClaimDirs> = None;
        let now = names::now_ms().max(0) as u64;
        loop {
            let (mut credits, files) = {
                let mut st = self.lock();
                if st.stopped || st.consumers.is_empty() || st.ready.is_empty() {
                    break;
                }
                let candidates = if self.args.single_active_consumer {
                    if st.single_active.is_none() {
                        match FileLock::try_lock_create(
                            &self.layout.fs,
                            &self.layout.sac_lock(&self.queue),
                        ) {
                            Ok(Some(l)) => st.single_active = Some(l),
                            _ => break,
                        }
                    }
                    1
                } else {
                    st.consumers.len()
                };
                let n = st.consumers.len();
                let start = if candidates == 1 { 0 } else { st.next % n };
                // In round-robin order from the next consumer's turn.
                let credits: Vec<(Arc<ConsumerShared>, usize)> = (0..candidates)
                    .map(|i| &st.consumers[(start + i) % n])
                    .map(|c| (c.clone(), c.credit()))
                    .filter(|(_, k)| *k > 0)
                    .collect();
                let room: usize = credits.iter().map(|(_, k)| k).sum();
                let files: Vec<String> = std::iter::from_fn(|| st.pop_ready())
                    .take(room.min(CLAIM_BATCH))
                    .collect();
                (credits, files)
            };
            if files.is_empty() {
                break;
            }
            if dirs.is_none() {
                match inner.claim_dirs(&self.queue) {
                    Ok(d) => dirs = Some(d),
                    Err(e) => {
                        // The queue is gone (the rescan ends this
                        // dispatcher) or unreachable: the names stay known.
                        if !fsys::is_not_found(&e) {
                            tracing::warn!(queue = self.queue, error = %e, "cannot open queue");
                        }
                        let mut st = self.lock();
                        for f in files {
                            if let Some(name) = MessageName::parse(&f) {
                                st.insert_ready(f, &name);
                            }
                        }
                        break;
                    }
                }
            }
            let Some(dirs) = dirs.as_mut() else { break };
            let mut claims = Vec::with_capacity(files.len());
            for file in files {
                let Some(name) = MessageName::parse(&file) else {
                    continue;
                };
                match inner.claim_in(&self.queue, dirs, &file, name) {
                    Ok(Some(c)) => {
                        if c.name
                            .expires_at_ms
                            .is_some_and(|e| policy::is_expired(e, now))
                        {
                            expired.push(c);
                        } else {
                            claims.push((file, c));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(queue = self.queue, error = %e, "claim failed");
                    }
                }
            }
            let mut st = self.lock();
            let mut turn = 0;
            for (file, claim) in claims {
                let taker = (0..credits.len())
                    .map(|i| (turn + i) % credits.len())
                    .find(|&i| credits[i].1 > 0);
                let claim = match taker {
                    Some(i) => match credits[i].0.hand_over(claim) {
                        None => {
                            credits[i].1 -= 1;
                            turn = i + 1;
                            if let Some(at) = st.position(&credits[i].0) {
                                st.next = at + 1;
                            }
                            continue;
                        }
                        Some(claim) => {
                            // Its stream is gone: it takes no more.
                            credits[i].1 = 0;
                            let gone = credits[i].0.clone();
                            st.consumers.retain(|c| !Arc::ptr_eq(c, &gone));
                            claim
                        }
                    },
                    None => claim,
                };
                // Nobody can take it: it goes back untouched.
                if dirs.unclaim(&claim, OsStr::new(&file)).is_ok() {
                    st.insert_ready(file, &claim.name);
                }
            }
        }
        expired
    }

    /// Whether a pass would claim something: a ready name is known and a
    /// consumer has room for it.
    fn has_work(&self) -> bool {
        let st = self.lock();
        !st.stopped && !st.ready.is_empty() && st.consumers.iter().any(|c| c.credit() > 0)
    }

    /// The earliest expiry among the names believed ready.
    fn next_expiry(&self) -> Option<u64> {
        let st = self.lock();
        if st.consumers.is_empty() {
            return None;
        }
        st.expiring.first().map(|(at, _)| *at)
    }
}

/// The dispatcher's task: rescans on a timer or request, delivers when
/// woken (new message, freed capacity, new consumer).
pub(crate) async fn run_dispatcher(d: Arc<Dispatcher>, inner: Weak<Inner>) {
    let mut next_rescan = Instant::now();
    loop {
        let notified = d.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let Some(inner) = inner.upgrade() else { return };
            if d.lock().stopped || !inner.is_open() {
                return;
            }
            let due = std::mem::take(&mut d.lock().rescan);
            let rescan = due || Instant::now() >= next_rescan;
            if rescan {
                next_rescan = Instant::now() + inner.options.rescan_interval;
            }
            // Nothing to list, or nothing to claim for nobody: no hop.
            if rescan || d.has_work() {
                // Listing, claiming and reading run on the blocking pool.
                let (d2, i2) = (d.clone(), inner.clone());
                let expired = match tokio::task::spawn_blocking(move || {
                    if rescan {
                        d2.rescan(&i2);
                    }
                    d2.deliver(&i2)
                })
                .await
                {
                    Ok(expired) => expired,
                    Err(e) => {
                        tracing::warn!(queue = d.queue, error = %e, "dispatching failed");
                        Vec::new()
                    }
                };
                for claim in expired {
                    if let Err(e) = inner
                        .dead_letter_or_drop(&d.queue, &d.args, &claim, Reason::Expired)
                        .await
                    {
                        tracing::warn!(queue = d.queue, error = %e, "dead-lettering failed");
                    }
                }
            }
        }
        let wake_at = match d.next_expiry() {
            Some(ms) => {
                let now = names::now_ms().max(0) as u64;
                let at = Instant::now() + std::time::Duration::from_millis(ms.saturating_sub(now));
                at.min(next_rescan)
            }
            None => next_rescan,
        };
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(wake_at) => {}
        }
    }
}

/// One consumer's state, shared by its stream, its deliveries' acks and
/// the dispatcher.
#[derive(Debug)]
pub(crate) struct ConsumerShared {
    pub(crate) tag: String,
    pub(crate) queue: String,
    consumer_file: PathBuf,
    prefetch: u16,
    auto_ack: bool,
    tx: Mutex<Option<mpsc::Sender<Result<Delivery>>>>,
    unacked: Mutex<Unacked<Claim>>,
    next_tag: AtomicU64,
    released: AtomicBool,
    dispatcher: Weak<Dispatcher>,
    inner: Weak<Inner>,
    me: Weak<ConsumerShared>,
    fs: Arc<fsys::Root>,
}

impl ConsumerShared {
    /// How many more deliveries it can take now: its stream's free room,
    /// within its prefetch.
    fn credit(&self) -> usize {
        let tx = self.tx.lock();
        let Some(tx) = tx.as_ref() else { return 0 };
        let room = tx.capacity();
        if self.auto_ack || self.prefetch == 0 {
            room
        } else {
            let held = self.unacked.lock().len();
            room.min(usize::from(self.prefetch).saturating_sub(held))
        }
    }

    /// Sends a claimed message to the stream; gives it back (`Some`) if the
    /// stream is gone.
    fn hand_over(&self, claim: Claim) -> Option<Claim> {
        let tx = self.tx.lock().clone();
        let Some(tx) = tx else { return Some(claim) };
        let Ok(permit) = tx.try_reserve() else {
            return Some(claim);
        };
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed) + 1;
        let env = &claim.envelope;
        let acker: Option<Arc<dyn Acknowledger>> = if self.auto_ack {
            None
        } else {
            self.me.upgrade().map(|a| a as Arc<dyn Acknowledger>)
        };
        let delivery = Delivery::new(
            env.message.clone(),
            env.exchange.as_str(),
            env.routing_key.as_str(),
            claim.name.redelivered,
            tag,
            acker,
        );
        if self.auto_ack {
            let _ = claim.remove();
        } else {
            self.unacked.lock().insert(tag, claim);
        }
        permit.send(Ok(delivery));
        None
    }

    fn end_stream(&self) {
        self.tx.lock().take();
    }

    /// Stops deliveries: the consumer leaves its dispatcher and its
    /// registration is removed. Deliveries already handed out stay
    /// settleable.
    fn cancel(&self) {
        self.end_stream();
        let removed = self
            .dispatcher
            .upgrade()
            .is_some_and(|d| d.remove_consumer(self));
        let _ = self.fs.remove_file(&self.consumer_file);
        if removed {
            if let Some(inner) = self.inner.upgrade() {
                inner.consumer_left(&self.queue);
            }
        }
    }

    /// The consumer is gone for good: everything it held unsettled goes
    /// back to the queue, redelivered.
    pub(crate) fn release(&self, inner: &Inner) {
        self.end_stream();
        let _ = self.fs.remove_file(&self.consumer_file);
        self.released.store(true, Ordering::Release);
        let held = std::mem::take(&mut *self.unacked.lock());
        for (_, claim) in held.iter() {
            inner.requeue(&self.queue, claim);
        }
    }

    /// The error for a tag this consumer does not hold: `Closed` once it is
    /// gone (its deliveries were requeued), else the unknown tag.
    fn settle_error(&self, e: UnknownTag) -> Error {
        if self.released.load(Ordering::Acquire) {
            Error::Closed(format!(
                "the consumer of delivery {} on queue '{}' is gone; its deliveries were requeued",
                e.tag, self.queue
            ))
        } else {
            e.on_queue(&self.queue)
        }
    }

    fn take(&self, tag: u64, multiple: bool) -> Result<Vec<Claim>> {
        let mut unacked = self.unacked.lock();
        let taken = unacked
            .take(tag, multiple)
            .map_err(|e| self.settle_error(e))?;
        Ok(taken.collect())
    }

    /// Takes the deliveries back to the queue. They stay in the unsettled
    /// set until they are back, so the dispatcher (running elsewhere)
    /// cannot see the freed capacity and hand out a later message first;
    /// no lock is held meanwhile (requeueing takes the dispatcher's).
    fn take_and_requeue(&self, inner: &Inner, tag: u64, multiple: bool) -> Result<()> {
        let claims: Vec<(u64, Claim)> = {
            let unacked = self.unacked.lock();
            let peeked = unacked
                .peek(tag, multiple)
                .map_err(|e| self.settle_error(e))?;
            peeked.map(|(k, c)| (k, c.clone())).collect()
        };
        for (_, claim) in &claims {
            inner.requeue(&self.queue, claim);
        }
        let mut unacked = self.unacked.lock();
        for (k, _) in claims {
            unacked.remove(k);
        }
        Ok(())
    }

    fn after_settle(&self) {
        if let Some(d) = self.dispatcher.upgrade() {
            d.wake();
        }
    }

    /// Wakes the dispatcher once this consumer has room for a round of
    /// claims ([`CLAIM_BATCH`], or half of what it may hold when that is
    /// less), rather than at every read and ack: the dispatcher then claims
    /// a batch per wakeup instead of one message per thread hop, and is
    /// woken while the consumer still has deliveries to read, so the
    /// consumer seldom waits for it. It never starves the consumer,
    /// because the read that empties the stream, and every ack after it,
    /// wake it.
    fn after_progress(&self) {
        let unread = {
            let tx = self.tx.lock();
            let Some(tx) = tx.as_ref() else { return };
            tx.max_capacity() - tx.capacity()
        };
        let room = if self.auto_ack || self.prefetch == 0 {
            STREAM_BUFFER
        } else {
            STREAM_BUFFER.min(usize::from(self.prefetch))
        };
        let round = CLAIM_BATCH.min(room.div_ceil(2));
        if room.saturating_sub(unread) >= round {
            self.after_settle();
        }
    }
}

#[async_trait]
impl Acknowledger for ConsumerShared {
    async fn ack(&self, tag: u64, options: AckOptions) -> Result<()> {
        let claims = self.take(tag, options.multiple)?;
        let inline = claims.len() <= INLINE_ACKS;
        let remove = move || -> Result<()> {
            for claim in &claims {
                claim.remove()?;
            }
            Ok(())
        };
        // An ack is one unlink in the open claim folder per message: a few
        // are done right here, where a hop to the blocking pool would cost
        // more than they do; many (a `multiple` ack) go there.
        if inline {
            remove()?;
        } else {
            blocking(remove).await?;
        }
        self.after_progress();
        Ok(())
    }

    async fn nack(&self, tag: u64, options: NackOptions) -> Result<()> {
        let multiple = options.multiple;
        let inner = self
            .inner
            .upgrade()
            .ok_or_else(|| Error::Closed("the file connection is closed".into()))?;
        if options.requeue == Requeue::Yes {
            let me = self
                .me
                .upgrade()
                .ok_or_else(|| Error::Closed("the consumer is gone".into()))?;
            blocking(move || me.take_and_requeue(&inner, tag, multiple)).await?;
            self.after_settle();
            return Ok(());
        }
        let claims = self.take(tag, multiple)?;
        let args = self
            .dispatcher
            .upgrade()
            .map(|d| d.args.clone())
            .unwrap_or_default();
        let mut result = Ok(());
        for claim in &claims {
            if let Err(e) = inner
                .dead_letter_or_drop(&self.queue, &args, claim, Reason::Rejected)
                .await
            {
                result = Err(e);
            }
        }
        self.after_settle();
        result
    }
}

struct Control {
    shared: Arc<ConsumerShared>,
}

#[async_trait]
impl ConsumerControl for Control {
    async fn cancel(&self) -> Result<()> {
        let shared = self.shared.clone();
        blocking(move || {
            shared.cancel();
            Ok(())
        })
        .await
    }
}

struct ConsumerStream {
    rx: mpsc::Receiver<Result<Delivery>>,
    shared: Arc<ConsumerShared>,
}

impl Stream for ConsumerStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let r = self.rx.poll_recv(cx);
        if matches!(r, Poll::Ready(Some(_))) {
            // A slot of the stream's buffer freed up.
            self.shared.after_progress();
        }
        r
    }
}

impl Drop for ConsumerStream {
    fn drop(&mut self) {
        self.shared.end_stream();
        self.rx.close();
        // Drop cannot wait: leaving the queue (which may delete an
        // auto-delete queue under the topology lock) and giving back what
        // it held run on the blocking pool.
        let shared = self.shared.clone();
        crate::connection::off_runtime(move || {
            shared.cancel();
            if let Some(inner) = shared.inner.upgrade() {
                shared.release(&inner);
            }
        });
    }
}

/// Registers a consumer with its queue's dispatcher and builds the
/// [`Consumer`] handed to the user.
pub(crate) fn start(
    inner: &Arc<Inner>,
    dispatcher: &Arc<Dispatcher>,
    tag: String,
    consumer_file: PathBuf,
    options: &ConsumeOptions,
) -> Consumer {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let shared = Arc::new_cyclic(|me| ConsumerShared {
        tag: tag.clone(),
        queue: dispatcher.queue.clone(),
        consumer_file,
        prefetch: options.prefetch,
        auto_ack: options.auto_ack,
        tx: Mutex::new(Some(tx)),
        unacked: Mutex::new(Unacked::new()),
        next_tag: AtomicU64::new(0),
        released: AtomicBool::new(false),
        dispatcher: Arc::downgrade(dispatcher),
        inner: Arc::downgrade(inner),
        me: me.clone(),
        fs: inner.layout.fs.clone(),
    });
    dispatcher.lock().consumers.push(shared.clone());
    dispatcher.wake();
    let stream = ConsumerStream {
        rx,
        shared: shared.clone(),
    };
    Consumer::new(
        tag,
        dispatcher.queue.clone(),
        Box::pin(stream),
        Arc::new(Control { shared }),
    )
}
