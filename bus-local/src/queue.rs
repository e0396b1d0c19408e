//! One queue: its ready messages, its consumers and what they hold unacked.
//!
//! Everything here runs under the queue's own mutex and never waits: a
//! publish, ack or consume hands messages to consumers before it returns, so
//! the order of deliveries follows the order of calls. Work that reaches
//! beyond the queue (dead-lettering, deleting it) is collected in [`Effects`]
//! and done by the broker once the lock is released.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bus_core::engine::dead_letter::{dead_letter, Death, Reason};
use bus_core::engine::delivery_limit::{DeliveryCount, Fate};
use bus_core::engine::policy::{self, Admission, Depth, Limits};
use bus_core::engine::unacked::Unacked;
use bus_core::routing::sender_routes;
use bus_core::sync::Mutex;
use bus_core::{Error, ErrorDetail, Message, QueueArguments, Result, SharedStr, Subject};
use tokio::time::Instant;

use crate::consumer::{ConsumerShared, Handover};
use crate::dead_letter::DeadLetter;

/// The time, read from tokio's clock at most once per operation and only
/// when something needs it: most queues have no TTL, and reading the clock
/// is a measurable part of a publish or an ack.
#[derive(Debug, Default)]
pub(crate) struct Now(Option<Instant>);

impl Now {
    pub(crate) fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

/// A message as routed: shared by every queue it went to, so a fan-out
/// copies neither body nor properties until delivery.
#[derive(Clone, Debug)]
pub(crate) struct Envelope {
    pub(crate) message: Message,
    /// The exchange it was published (or dead-lettered) to.
    pub(crate) exchange: SharedStr,
    /// The publish routing key.
    pub(crate) routing_key: SharedStr,
    /// The keys of the `CC` and `BCC` headers, routed as well (usually
    /// none: no list to allocate).
    pub(crate) cc: Vec<String>,
}

impl Envelope {
    /// A message as published to `exchange` with `routing_key`, with the
    /// keys its `CC` and `BCC` headers add.
    pub(crate) fn published(exchange: &str, routing_key: &str, message: Message) -> Arc<Self> {
        let cc = if message.properties.headers.is_empty() {
            Vec::new()
        } else {
            sender_routes(&message.properties.headers)
                .map(str::to_owned)
                .collect()
        };
        Arc::new(Envelope {
            message,
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            cc,
        })
    }

    pub(crate) fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// The publish routing key first, then the `CC` and `BCC` keys.
    pub(crate) fn routing_keys(&self) -> impl Iterator<Item = &str> + Clone {
        std::iter::once(self.routing_key.as_str()).chain(self.cc.iter().map(String::as_str))
    }
}

/// One copy of a message in one queue.
#[derive(Debug)]
struct Entry {
    /// Arrival order in this queue; a requeued message goes back by it.
    seq: u64,
    envelope: Arc<Envelope>,
    redelivered: bool,
    /// How many times it came back to a quorum queue (always 0 in other
    /// queues, which do not count).
    returns: u32,
    expires_at: Option<Instant>,
    /// Priority level (0 unless the queue has `x-max-priority`).
    level: usize,
}

impl Entry {
    fn size(&self) -> u64 {
        self.envelope.message.body.len() as u64
    }
}

/// Ready messages: one FIFO per priority level, the highest level first.
#[derive(Debug)]
struct Ready {
    levels: Vec<VecDeque<Entry>>,
    len: usize,
    bytes: u64,
}

impl Ready {
    fn new(max_priority: Option<u8>) -> Self {
        Ready {
            levels: (0..=usize::from(max_priority.unwrap_or(0)))
                .map(|_| VecDeque::new())
                .collect(),
            len: 0,
            bytes: 0,
        }
    }

    fn push_back(&mut self, entry: Entry) {
        self.len += 1;
        self.bytes += entry.size();
        self.levels[entry.level].push_back(entry);
    }

    /// Puts a requeued message back where it was: RabbitMQ's classic queues
    /// restore publish order among ready messages.
    fn restore(&mut self, entry: Entry) {
        self.len += 1;
        self.bytes += entry.size();
        let level = &mut self.levels[entry.level];
        let at = level.partition_point(|e| e.seq < entry.seq);
        level.insert(at, entry);
    }

    fn taken(&mut self, entry: Option<Entry>) -> Option<Entry> {
        if let Some(e) = &entry {
            self.len -= 1;
            self.bytes -= e.size();
        }
        entry
    }

    fn pop_head(&mut self) -> Option<Entry> {
        let level = self.levels.iter().rposition(|l| !l.is_empty())?;
        let entry = self.levels[level].pop_front();
        self.taken(entry)
    }

    /// Takes one expired message at the head of a level. Like RabbitMQ, only
    /// heads expire: a message behind a longer-lived one waits its turn.
    fn pop_expired(&mut self, now: &mut Now) -> Option<Entry> {
        let level = self.levels.iter().rposition(|l| {
            l.front()
                .and_then(|e| e.expires_at)
                .is_some_and(|at| policy::is_expired(at, now.get()))
        })?;
        let entry = self.levels[level].pop_front();
        self.taken(entry)
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.levels
            .iter()
            .filter_map(|l| l.front().and_then(|e| e.expires_at))
            .min()
    }

    /// Drops the messages that are not persistent; returns how many.
    fn retain_persistent(&mut self) -> usize {
        let before = self.len;
        for level in &mut self.levels {
            level.retain(|e| e.envelope.message.is_persistent());
        }
        self.len = self.levels.iter().map(VecDeque::len).sum();
        self.bytes = self.levels.iter().flatten().map(Entry::size).sum();
        before - self.len
    }

    fn depth(&self) -> Depth {
        Depth {
            messages: self.len as u64,
            bytes: self.bytes,
        }
    }

    fn clear(&mut self) -> usize {
        let n = self.len;
        self.levels.iter_mut().for_each(VecDeque::clear);
        self.len = 0;
        self.bytes = 0;
        n
    }
}

/// How a consumer settles deliveries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    Requeue,
    Reject,
}

/// A consumer as its queue sees it.
struct Slot {
    shared: Arc<ConsumerShared>,
    prefetch: u16,
    auto_ack: bool,
    exclusive: bool,
    priority: i64,
    /// Cancelled: receives nothing more, no longer counted, but its unacked
    /// deliveries can still be settled until its stream is dropped.
    cancelled: bool,
    next_tag: u64,
    /// Unsettled deliveries by tag.
    unacked: Unacked<Entry>,
    /// In the queue's round-robin list.
    in_active: bool,
}

impl Slot {
    fn has_capacity(&self) -> bool {
        !self.cancelled
            && (self.auto_ack
                || self.prefetch == 0
                || self.unacked.len() < usize::from(self.prefetch))
    }
}

/// What a consumer asks for when it starts.
pub(crate) struct NewConsumer {
    pub(crate) shared: Arc<ConsumerShared>,
    pub(crate) prefetch: u16,
    pub(crate) auto_ack: bool,
    pub(crate) exclusive: bool,
    pub(crate) priority: i64,
    /// The tag of its first delivery (a resumed consumer's tags go on
    /// growing).
    pub(crate) first_tag: u64,
}

/// Work a queue operation leaves for the broker, done after the queue's lock
/// is released (it may touch other queues or the topology).
#[derive(Default)]
pub(crate) struct Effects {
    pub(crate) dead: Vec<DeadLetter>,
    /// The queue must be deleted (auto-delete or `x-expires`).
    pub(crate) delete: bool,
    /// A message an ack released, freed once the lock is released: freeing
    /// a message is most of the cost of an ack, and the publisher waits on
    /// this lock.
    pub(crate) released: Option<Arc<Envelope>>,
    /// Acked messages handed back to the publishing side to free.
    pub(crate) reclaimed: Vec<Arc<Envelope>>,
}

/// How many acked messages wait for the publishing side to free them
/// before a publish takes them, and how many at most.
const RECLAIM_BATCH: usize = 16;
const RECLAIM_CAPACITY: usize = 128;
/// Messages with larger bodies are freed by the ack itself, so what waits
/// to be reclaimed stays small.
const RECLAIM_MAX_BODY: usize = 1024;

/// The mutable part of a queue.
pub(crate) struct QueueState {
    pub(crate) deleted: bool,
    ready: Ready,
    next_seq: u64,
    /// Consumers in the order they started (the order single active consumer
    /// hands over in).
    consumers: Vec<Slot>,
    /// Consumer ids that have capacity, in RabbitMQ's rotation order.
    active: VecDeque<u64>,
    had_consumer: bool,
    /// Since when the queue has had no consumer or declaration (`x-expires`).
    idle_since: Instant,
    /// The deadline the pending timer task will wake at.
    pub(crate) timer: Option<Instant>,
    /// Bumped to retire a pending timer task.
    pub(crate) timer_gen: u64,
    /// Acked messages for the next publish to free. A message is allocated
    /// by its publisher's thread; freed by an acking consumer on another
    /// thread, the allocator's locks bounce between the two (glibc's arena
    /// lock showed as most of the futex calls of a publish-consume pair).
    /// Freed by the publisher, the memory goes back where it came from.
    /// Bounded by [`RECLAIM_CAPACITY`], small bodies only; the buffer is
    /// allocated by the publishing side too.
    reclaim: Vec<Arc<Envelope>>,
}

/// A queue: its settings, fixed at declaration, and its state.
pub(crate) struct Queue {
    pub(crate) name: String,
    /// Creation order in the broker: routing visits queues by it, so fan-out
    /// order does not depend on hashing.
    pub(crate) seq: u64,
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
    /// The connection an exclusive queue belongs to.
    pub(crate) owner: Option<u64>,
    /// Normalised arguments.
    pub(crate) args: QueueArguments,
    /// How a quorum queue counts returns (`None`: a classic queue).
    counting: Option<DeliveryCount>,
    pub(crate) state: Mutex<QueueState>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.name)
            .field("durable", &self.durable)
            .field("auto_delete", &self.auto_delete)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Queue {
    pub(crate) fn new(
        name: String,
        seq: u64,
        durable: bool,
        auto_delete: bool,
        owner: Option<u64>,
        args: QueueArguments,
        now: Instant,
    ) -> Self {
        Queue {
            state: Mutex::new(QueueState {
                deleted: false,
                ready: Ready::new(args.max_priority),
                next_seq: 0,
                consumers: Vec::new(),
                active: VecDeque::new(),
                had_consumer: false,
                idle_since: now,
                timer: None,
                timer_gen: 0,
                reclaim: Vec::new(),
            }),
            name,
            seq,
            durable,
            auto_delete,
            owner,
            counting: DeliveryCount::of(&args),
            args,
        }
    }

    /// Locks the state. A panic elsewhere while holding the lock leaves the
    /// state consistent (every method finishes its bookkeeping before it can
    /// fail), so a poisoned lock is taken over.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock()
    }

    fn dead_or_drop(&self, envelope: &Envelope, reason: Reason, fx: &mut Effects) {
        if self.args.dead_letter_exchange.is_none() {
            return;
        }
        let death = Death::new(
            reason,
            &self.name,
            &envelope.exchange,
            &envelope.routing_key,
        );
        let Some(dl) = dead_letter(&envelope.message, &death, &self.args) else {
            return;
        };
        // A dead-letter routing key replaces every routing key; without one
        // the message keeps those it was published with.
        let (routing_key, cc) = match dl.routing_key {
            Some(key) => (key.into(), Vec::new()),
            None => (envelope.routing_key.clone(), envelope.cc.clone()),
        };
        fx.dead.push(DeadLetter {
            envelope: Envelope {
                message: dl.message,
                exchange: dl.exchange.into(),
                routing_key,
                cc,
            },
            reason,
        });
    }

    /// Puts a returned delivery back in its place; a quorum queue counts
    /// the return first and ends a message past its delivery limit instead
    /// (dead-lettered, reason `delivery_limit`, or dropped).
    fn requeue(&self, ready: &mut Ready, mut entry: Entry, fx: &mut Effects) {
        if let Some(counting) = &self.counting {
            if counting.on_return(&mut entry.returns) == Fate::DeadLetter {
                self.dead_or_drop(&entry.envelope, Reason::DeliveryLimit, fx);
                return;
            }
        }
        ready.restore(entry);
    }

    fn expire(&self, st: &mut QueueState, now: &mut Now, fx: &mut Effects) {
        while let Some(e) = st.ready.pop_expired(now) {
            self.dead_or_drop(&e.envelope, Reason::Expired, fx);
        }
    }

    fn drop_head(&self, st: &mut QueueState, fx: &mut Effects) {
        let limits = Limits::of(&self.args);
        while limits.must_drop_head(st.ready.depth()) {
            match st.ready.pop_head() {
                Some(e) => self.dead_or_drop(&e.envelope, Reason::MaxLen, fx),
                None => break,
            }
        }
    }

    fn level_of(&self, message: &Message) -> usize {
        usize::from(policy::priority_level(
            self.args.max_priority,
            message.properties.priority,
        ))
    }

    fn slot_index(st: &QueueState, id: u64) -> Option<usize> {
        st.consumers.iter().position(|s| s.shared.id == id)
    }

    /// The consumer the next message goes to, as RabbitMQ picks it: with
    /// single active consumer, the earliest one; otherwise the front of the
    /// rotation among the highest consumer priority. A consumer found without
    /// capacity leaves the rotation until it has some again.
    fn pick(&self, st: &mut QueueState) -> Option<usize> {
        if self.args.single_active_consumer {
            let idx = st.consumers.iter().position(|s| !s.cancelled)?;
            return st.consumers[idx].has_capacity().then_some(idx);
        }
        // (position in the rotation, priority, slot index)
        let mut best: Option<(usize, i64, usize)> = None;
        let mut i = 0;
        while i < st.active.len() {
            let id = st.active[i];
            let Some(idx) = Self::slot_index(st, id) else {
                st.active.remove(i);
                continue;
            };
            let slot = &mut st.consumers[idx];
            if !slot.has_capacity() {
                slot.in_active = false;
                st.active.remove(i);
                continue;
            }
            if best.is_none_or(|(_, p, _)| slot.priority > p) {
                best = Some((i, slot.priority, idx));
            }
            i += 1;
        }
        let (pos, _, idx) = best?;
        // Back of the rotation; dropped from it by the next pick if full.
        if pos == 0 {
            st.active.rotate_left(1);
        } else {
            let id = st.active.remove(pos).expect("position is in range");
            st.active.push_back(id);
        }
        Some(idx)
    }

    /// Hands one message to a consumer. The consumer's stream builds the
    /// [`bus_core::Delivery`] from the handover when it is read, so that the
    /// copying happens on the consumer's side, outside this lock.
    fn deliver(&self, st: &mut QueueState, idx: usize, mut entry: Entry) {
        let slot = &mut st.consumers[idx];
        slot.next_tag += 1;
        let handover = Handover {
            envelope: entry.envelope.clone(),
            tag: slot.next_tag,
            redelivered: entry.redelivered,
            returns: entry.returns,
        };
        if !slot.auto_ack {
            // Any later delivery of this copy is a redelivery.
            entry.redelivered = true;
            slot.unacked.insert(slot.next_tag, entry);
        }
        slot.shared.push(handover);
    }

    /// Hands ready messages to consumers with capacity until one side runs
    /// out, dropping expired heads on the way.
    fn dispatch(&self, st: &mut QueueState, now: &mut Now, fx: &mut Effects) {
        loop {
            self.expire(st, now, fx);
            if st.ready.len == 0 {
                return;
            }
            let Some(idx) = self.pick(st) else { return };
            let entry = st.ready.pop_head().expect("ready is not empty");
            self.deliver(st, idx, entry);
        }
    }

    fn reactivate(st: &mut QueueState, idx: usize) {
        let slot = &mut st.consumers[idx];
        if !slot.in_active && slot.has_capacity() {
            slot.in_active = true;
            let id = slot.shared.id;
            st.active.push_back(id);
        }
    }

    fn consumer_gone(&self, st: &mut QueueState, now: &mut Now, fx: &mut Effects) {
        if Self::consumer_count(st) == 0 {
            st.idle_since = now.get();
            if self.auto_delete && st.had_consumer {
                fx.delete = true;
            }
        }
    }

    /// Lets go of an acked message: kept for the publishing side to free
    /// when there is room (see [`QueueState::reclaim`]), else freed by the
    /// caller once the lock is released.
    fn release(st: &mut QueueState, envelope: Arc<Envelope>, fx: &mut Effects) {
        if st.reclaim.len() < st.reclaim.capacity()
            && envelope.message.body.len() <= RECLAIM_MAX_BODY
            && Arc::strong_count(&envelope) == 1
        {
            st.reclaim.push(envelope);
        } else {
            fx.released = Some(envelope);
        }
    }

    /// Puts a published message in the queue (or straight into a waiting
    /// consumer). Returns `false` when the queue refuses it
    /// (`reject-publish`): the publisher gets a nack.
    pub(crate) fn publish(
        &self,
        st: &mut QueueState,
        envelope: &Arc<Envelope>,
        message_ttl: Option<Duration>,
        now: &mut Now,
        fx: &mut Effects,
    ) -> bool {
        if st.deleted {
            // Deleted between routing and now: as if routed just before.
            return true;
        }
        if st.reclaim.capacity() == 0 || st.reclaim.len() >= RECLAIM_BATCH {
            fx.reclaimed = std::mem::replace(&mut st.reclaim, Vec::with_capacity(RECLAIM_CAPACITY));
        }
        self.expire(st, now, fx);
        let size = envelope.message.body.len() as u64;
        match Limits::of(&self.args).admit(st.ready.depth(), size) {
            Admission::Accept => {}
            Admission::Refuse { dead_letter } => {
                if dead_letter {
                    self.dead_or_drop(envelope, Reason::MaxLen, fx);
                }
                return false;
            }
        }
        let ttl = policy::message_ttl(self.args.message_ttl, message_ttl);
        let entry = Entry {
            seq: st.next_seq,
            envelope: envelope.clone(),
            redelivered: false,
            returns: 0,
            expires_at: ttl.and_then(|d| now.get().checked_add(d)),
            level: self.level_of(&envelope.message),
        };
        st.next_seq += 1;
        // A waiting consumer takes it at once, even with a TTL of 0 or a
        // max length of 0, as in RabbitMQ.
        if st.ready.len == 0 {
            if let Some(idx) = self.pick(st) {
                self.deliver(st, idx, entry);
                return true;
            }
        }
        st.ready.push_back(entry);
        self.drop_head(st, fx);
        self.expire(st, now, fx);
        true
    }

    /// Adds a consumer and feeds it.
    ///
    /// # Errors
    /// `AccessRefused` when the queue has an exclusive consumer, or when an
    /// exclusive consumer is asked for and the queue has consumers (RabbitMQ:
    /// "in exclusive use").
    pub(crate) fn add_consumer(
        &self,
        st: &mut QueueState,
        new: NewConsumer,
        now: &mut Now,
        fx: &mut Effects,
    ) -> Result<()> {
        let has_exclusive = st.consumers.iter().any(|s| !s.cancelled && s.exclusive);
        if has_exclusive || (new.exclusive && Self::consumer_count(st) > 0) {
            return Err(Error::AccessRefused(ErrorDetail::about(
                Subject::queue(self.name.as_str()),
                format!("queue '{}' is in exclusive use", self.name),
            )));
        }
        let id = new.shared.id;
        st.consumers.push(Slot {
            shared: new.shared,
            prefetch: new.prefetch,
            auto_ack: new.auto_ack,
            exclusive: new.exclusive,
            priority: new.priority,
            cancelled: false,
            next_tag: new.first_tag.saturating_sub(1),
            unacked: Unacked::new(),
            in_active: true,
        });
        st.active.push_back(id);
        st.had_consumer = true;
        self.dispatch(st, now, fx);
        Ok(())
    }

    /// Stops deliveries to a consumer; its unacked deliveries stay with it.
    pub(crate) fn cancel_consumer(
        &self,
        st: &mut QueueState,
        id: u64,
        now: &mut Now,
        fx: &mut Effects,
    ) {
        let Some(idx) = Self::slot_index(st, id) else {
            return;
        };
        let slot = &mut st.consumers[idx];
        if slot.cancelled {
            return;
        }
        slot.cancelled = true;
        slot.in_active = false;
        slot.shared.end(false);
        st.active.retain(|a| *a != id);
        self.consumer_gone(st, now, fx);
        self.dispatch(st, now, fx);
    }

    /// Removes a consumer whose stream or connection is gone: its unacked
    /// deliveries go back to their places, marked redelivered.
    pub(crate) fn remove_consumer(
        &self,
        st: &mut QueueState,
        id: u64,
        now: &mut Now,
        fx: &mut Effects,
    ) {
        let Some(idx) = Self::slot_index(st, id) else {
            return;
        };
        let mut slot = st.consumers.remove(idx);
        st.active.retain(|a| *a != id);
        slot.shared.end(true);
        let requeued = !slot.unacked.is_empty();
        for (_, entry) in slot.unacked.drain() {
            self.requeue(&mut st.ready, entry, fx);
        }
        if requeued {
            self.drop_head(st, fx);
        }
        if !slot.cancelled {
            self.consumer_gone(st, now, fx);
        }
        self.dispatch(st, now, fx);
    }

    /// Acks, requeues or rejects deliveries of one consumer.
    ///
    /// # Errors
    /// `Closed` when the consumer is gone (its deliveries were requeued);
    /// `PreconditionFailed` for a tag it does not hold (settled already).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn settle(
        &self,
        st: &mut QueueState,
        id: u64,
        tag: u64,
        multiple: bool,
        how: Settle,
        now: &mut Now,
        fx: &mut Effects,
    ) -> Result<()> {
        let Some(idx) = Self::slot_index(st, id) else {
            return Err(Error::Closed(format!(
                "the consumer of delivery {tag} on queue '{}' is gone; its unsettled deliveries were requeued",
                self.name
            )));
        };
        let slot = &mut st.consumers[idx];
        let taken = slot
            .unacked
            .take(tag, multiple)
            .map_err(|e| e.on_queue(&self.name))?;
        if how == Settle::Ack {
            // Dropping the entries is all an ack does; a single one is
            // released for the publishing side to free.
            if multiple {
                drop(taken);
            } else {
                let entry = { taken }.next();
                if let Some(entry) = entry {
                    Self::release(st, entry.envelope, fx);
                }
            }
        } else {
            for entry in taken {
                if how == Settle::Requeue {
                    self.requeue(&mut st.ready, entry, fx);
                } else {
                    self.dead_or_drop(&entry.envelope, Reason::Rejected, fx);
                }
            }
        }
        if how == Settle::Requeue {
            self.drop_head(st, fx);
        }
        Self::reactivate(st, idx);
        self.dispatch(st, now, fx);
        Ok(())
    }

    /// Drops expired messages, feeds consumers, and marks the queue for
    /// deletion when it has been unused past its `x-expires`.
    pub(crate) fn tick(&self, st: &mut QueueState, now: &mut Now, fx: &mut Effects) {
        self.dispatch(st, now, fx);
        if self.idle_expired(st, now.get()) {
            fx.delete = true;
        }
    }

    /// Whether the queue has had no consumer and no declaration for its
    /// `x-expires`.
    pub(crate) fn idle_expired(&self, st: &QueueState, now: Instant) -> bool {
        match self.args.expires {
            Some(after) => {
                Self::consumer_count(st) == 0
                    && st.idle_since.checked_add(after).is_some_and(|at| at <= now)
            }
            None => false,
        }
    }

    /// A declaration uses the queue: it restarts the `x-expires` clock.
    pub(crate) fn touch(st: &mut QueueState, now: Instant) {
        st.idle_since = now;
    }

    /// When the queue next needs attention without any call: a message
    /// expires or the queue does.
    pub(crate) fn next_deadline(&self, st: &QueueState) -> Option<Instant> {
        let queue = match self.args.expires {
            Some(after) if Self::consumer_count(st) == 0 => st.idle_since.checked_add(after),
            _ => None,
        };
        match (st.ready.next_expiry(), queue) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Ready messages (RabbitMQ's `message_count`).
    pub(crate) fn ready_count(st: &QueueState) -> usize {
        st.ready.len
    }

    pub(crate) fn consumer_count(st: &QueueState) -> usize {
        st.consumers.iter().filter(|s| !s.cancelled).count()
    }

    pub(crate) fn unacked_count(st: &QueueState) -> usize {
        st.consumers.iter().map(|s| s.unacked.len()).sum()
    }

    /// Removes the ready messages; returns how many there were.
    pub(crate) fn purge(st: &mut QueueState) -> usize {
        st.ready.clear()
    }

    /// What a broker restart leaves of a durable queue: its persistent
    /// messages. Returns how many messages were dropped.
    pub(crate) fn drop_transient(st: &mut QueueState) -> usize {
        st.ready.retain_persistent()
    }

    /// Marks the queue deleted: messages dropped, consumers' streams ended
    /// (after what they already received). Returns the ready count.
    pub(crate) fn mark_deleted(st: &mut QueueState) -> usize {
        st.deleted = true;
        let n = st.ready.clear();
        for slot in st.consumers.drain(..) {
            slot.shared.end(false);
        }
        st.active.clear();
        st.reclaim = Vec::new();
        st.timer = None;
        st.timer_gen += 1;
        n
    }
}
