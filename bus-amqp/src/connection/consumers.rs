//! The consumers of a connection: which are alive (each holds a channel,
//! and they must leave the channels publishing and topology need), what
//! each must know of its queue's deletion through this connection, and
//! their coalesced acks, flushed on close.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use bus_core::sync::Mutex;
use bus_core::{Error, Result};

use super::Shared;
use crate::consume::AckBatch;
use crate::link::Link;

/// Channels a connection keeps from its consumers: channel 0, the
/// publisher channel, the topology channel, and one for replacing the
/// publisher channel or declaring the topology again.
const RESERVED_CHANNELS: usize = 4;

/// The consumers' share of a connection.
pub(super) struct Consumers {
    /// The consumers alive and the queue deletions in flight.
    live: Mutex<Live>,
    /// The coalesced acks of this connection's consumers, flushed on close.
    ack_batches: Mutex<Vec<Weak<AckBatch>>>,
}

impl Consumers {
    pub(super) fn new() -> Self {
        Consumers {
            live: Mutex::new(Live::default()),
            ack_batches: Mutex::new(Vec::new()),
        }
    }
}

/// The consumers alive on a connection, and the deletions of queues this
/// connection has in flight.
///
/// When a queue is deleted the broker cancels its consumers
/// (`basic.cancel`, on each consumer's channel), before or after it
/// answers the deletion on the topology channel, and a consumer may look
/// at its cancellation much later. A cancellation that this connection's
/// deletion caused ends the stream quietly; any other is news. So a
/// deletion counts as in flight from before it is sent until its answer,
/// and when it succeeds it is recorded on every consumer of the queue
/// alive then, in the same step: whenever a consumer looks, one or the
/// other tells it. A consumer counts as alive from before it asks the
/// broker to consume until it ends, so one started while a deletion is in
/// flight is recorded too.
///
/// Nothing outlives what it is about: an entry per live consumer (bounded
/// by the channels) and per deletion in flight, however many queues the
/// connection creates and deletes.
#[derive(Default)]
struct Live {
    next_id: u64,
    consumers: HashMap<u64, LiveConsumer>,
    /// Queues (current names) being deleted through this connection, with
    /// how many deletions of each are in flight.
    deleting: HashMap<String, usize>,
}

struct LiveConsumer {
    /// The queue as the application names it.
    queue: String,
    /// This connection deleted the consumer's queue since it was last
    /// declared.
    deleted_here: bool,
}

impl Live {
    /// Counts in a consumer of `queue` (the application's name); its id.
    fn add(&mut self, queue: &str) -> u64 {
        self.next_id += 1;
        self.consumers.insert(
            self.next_id,
            LiveConsumer {
                queue: queue.to_owned(),
                deleted_here: false,
            },
        );
        self.next_id
    }

    fn remove(&mut self, id: u64) {
        self.consumers.remove(&id);
    }

    /// A deletion of the queue now named `current` is about to be sent.
    fn delete_started(&mut self, current: &str) {
        *self.deleting.entry(current.to_owned()).or_default() += 1;
    }

    /// A deletion of the queue now named `current` ended; when `deleted`,
    /// every consumer of it (`is_current` tells which consumers' queue
    /// names it) is told.
    fn delete_ended(&mut self, current: &str, deleted: bool, is_current: &dyn Fn(&str) -> bool) {
        if let Some(n) = self.deleting.get_mut(current) {
            *n -= 1;
            if *n == 0 {
                self.deleting.remove(current);
            }
        }
        if deleted {
            self.mark(is_current);
        }
    }

    /// Marks the consumers of the queue `is_current` names. A mark is
    /// never taken back: every consumer alive when its queue is deleted is
    /// cancelled by the broker, so a declaration of the queue afterwards
    /// (the "reset a queue" pattern) concerns new consumers only.
    fn mark(&mut self, is_current: &dyn Fn(&str) -> bool) {
        for consumer in self.consumers.values_mut() {
            if is_current(&consumer.queue) {
                consumer.deleted_here = true;
            }
        }
    }

    /// Whether consumer `id`, whose queue is now named `current`, was
    /// cancelled by a deletion through this connection (done, or in
    /// flight).
    fn deleted_here(&self, id: u64, current: &str) -> bool {
        self.consumers.get(&id).is_some_and(|c| c.deleted_here)
            || self.deleting.contains_key(current)
    }
}

/// A deletion of a queue through this connection, in flight until it is
/// dropped. Dropped after [`QueueDeletion::refused`], it leaves the
/// consumers of the queue as they were; dropped otherwise, it marks them:
/// the broker deleted the queue ([`QueueDeletion::succeeded`]), or the
/// outcome is unknown (the caller gave up waiting, the operation timed
/// out, the connection went) and the request may have reached the broker,
/// which would cancel them as an ordinary end.
pub(super) struct QueueDeletion<'a> {
    shared: &'a Shared,
    current: String,
    refused: bool,
}

impl QueueDeletion<'_> {
    /// The broker deleted the queue: its consumers' cancellations are
    /// their ordinary end. Call before the journal forgets the queue, so
    /// that renamed queues still resolve.
    pub(super) fn succeeded(self) {}

    /// The broker refused the deletion: the queue and its consumers stay,
    /// and a later cancellation of them is news.
    pub(super) fn refused(mut self) {
        self.refused = true;
    }
}

impl Drop for QueueDeletion<'_> {
    fn drop(&mut self) {
        let deleted = !self.refused;
        self.shared
            .update_live(&self.current, |live, current, is_current| {
                live.delete_ended(current, deleted, is_current);
            });
    }
}

impl Shared {
    /// Notes that this connection is about to delete the queue now named
    /// `current`, until the returned deletion is dropped.
    pub(super) fn deleting_queue(&self, current: &str) -> QueueDeletion<'_> {
        self.consumers.live.lock().delete_started(current);
        QueueDeletion {
            shared: self,
            current: current.to_owned(),
            refused: false,
        }
    }

    /// Runs `update` on the live consumers with the queue name `current`
    /// and a test of whether a queue name of the application's is now
    /// `current`.
    fn update_live(
        &self,
        current: &str,
        update: impl FnOnce(&mut Live, &str, &dyn Fn(&str) -> bool),
    ) {
        // The journal, then the consumers: nothing takes them the other
        // way round.
        let renames = self.renames();
        let is_current = |name: &str| match &renames {
            Some(journal) => journal.resolve(name) == current,
            None => name == current,
        };
        update(&mut self.consumers.live.lock(), current, &is_current);
    }

    /// Whether the broker's cancellation of consumer `id` (of the queue
    /// the application names `queue`) came from a deletion of the queue
    /// through this connection.
    pub(crate) fn deleted_here(&self, id: u64, queue: &str) -> bool {
        let current = self.resolve_queue(queue);
        self.consumers.live.lock().deleted_here(id, &current)
    }

    /// Keeps `batch` to be flushed when the connection closes.
    pub(crate) fn register_ack_batch(&self, batch: &Arc<AckBatch>) {
        let mut batches = self.consumers.ack_batches.lock();
        batches.retain(|b| b.strong_count() > 0);
        batches.push(Arc::downgrade(batch));
    }

    /// Sends every consumer's coalesced acks; the first failure.
    pub(super) async fn flush_ack_batches(&self) -> Result<()> {
        let batches: Vec<Arc<AckBatch>> = self
            .consumers
            .ack_batches
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut result = Ok(());
        for batch in batches {
            if let Err(e) = batch.flush().await {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Counts a new consumer of `queue` (the application's name) in, or
    /// refuses it when it would take one of the channels kept for
    /// publishing and topology operations; the consumer's id. The check
    /// and the count are one step, so consumers started at once cannot
    /// race past the limit. Called before the consumer asks the broker to
    /// consume, so that a deletion of its queue in flight meanwhile is
    /// recorded on it; the caller gives the count back when the consumer
    /// ends or fails to start.
    pub(crate) fn reserve_consumer_channel(&self, link: &Link, queue: &str) -> Result<u64> {
        let channel_max = match link.conn.configuration().channel_max() {
            0 => usize::from(u16::MAX),
            n => usize::from(n),
        };
        let room = channel_max.saturating_sub(RESERVED_CHANNELS);
        let mut live = self.consumers.live.lock();
        let consumers = live.consumers.len();
        if consumers >= room {
            return Err(Error::backend(
                "amqp",
                true,
                format!(
                    "no channel left for another consumer: this connection has {consumers} consumers, each on its own channel, \
                     and the broker allows {channel_max} channels (channel_max), {RESERVED_CHANNELS} of which are kept for publishing \
                     and topology; drop a consumer, use another connection, or raise channel_max"
                ),
            ));
        }
        Ok(live.add(queue))
    }

    /// Gives back the count taken by
    /// [`reserve_consumer_channel`](Shared::reserve_consumer_channel) for
    /// consumer `id`.
    pub(crate) fn release_consumer_channel(&self, id: u64) {
        self.consumers.live.lock().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::Live;

    fn named(current: &str) -> impl Fn(&str) -> bool + '_ {
        move |name| name == current
    }

    #[test]
    fn deleting_many_queues_leaves_nothing_behind() {
        let mut live = Live::default();
        for i in 0..1000 {
            let q = format!("reply-{i}");
            let id = live.add(&q);
            live.delete_started(&q);
            live.delete_ended(&q, true, &named(&q));
            assert!(live.deleted_here(id, &q), "consumer {i} ends quietly");
            live.remove(id);
        }
        assert!(live.consumers.is_empty(), "no consumer kept");
        assert!(live.deleting.is_empty(), "no deletion kept");
    }

    #[test]
    fn a_cancellation_before_or_after_the_answer_is_this_connections() {
        let mut live = Live::default();
        let id = live.add("q");
        live.delete_started("q");
        // The broker's cancel came before its answer to the deletion.
        assert!(live.deleted_here(id, "q"));
        live.delete_ended("q", true, &named("q"));
        // Or after it.
        assert!(live.deleted_here(id, "q"));
        assert!(live.deleting.is_empty());
    }

    #[test]
    fn a_consumer_started_while_its_queue_is_deleted_is_told() {
        let mut live = Live::default();
        live.delete_started("q");
        let id = live.add("q");
        live.delete_ended("q", true, &named("q"));
        assert!(live.deleted_here(id, "q"));
    }

    #[test]
    fn other_deletions_are_news() {
        let mut live = Live::default();
        let id = live.add("q");
        let other = live.add("other");
        // Nothing deleted here.
        assert!(!live.deleted_here(id, "q"));
        // A refused deletion.
        live.delete_started("q");
        live.delete_ended("q", false, &named("q"));
        assert!(!live.deleted_here(id, "q"));
        // Another queue's deletion.
        live.delete_started("other");
        live.delete_ended("other", true, &named("other"));
        assert!(!live.deleted_here(id, "q"));
        assert!(live.deleted_here(other, "other"));
        assert!(live.deleting.is_empty());
    }

    #[test]
    fn a_deletion_still_in_flight_outlasts_a_refused_one() {
        let mut live = Live::default();
        let id = live.add("q");
        live.delete_started("q");
        live.delete_started("q");
        live.delete_ended("q", false, &named("q"));
        assert!(live.deleted_here(id, "q"), "the second is still in flight");
        live.delete_ended("q", true, &named("q"));
        assert!(live.deleted_here(id, "q"));
        assert!(live.deleting.is_empty());
    }

    #[test]
    fn a_mark_outlasts_the_queues_next_declaration() {
        // Deleted and declared again at once ("reset a queue"), before the
        // consumer looked at the broker's cancel: still this connection's.
        let mut live = Live::default();
        let id = live.add("q");
        live.delete_started("q");
        live.delete_ended("q", true, &named("q"));
        // A consumer of the new queue is not marked.
        let new = live.add("q");
        assert!(live.deleted_here(id, "q"));
        assert!(!live.deleted_here(new, "q"));
    }

    #[test]
    fn consumers_are_found_by_their_queues_current_names() {
        let mut live = Live::default();
        // A server-named queue a recovery renamed: the consumer holds its
        // first name, the deletion goes to its current one.
        let id = live.add("amq.gen-first");
        let renamed = |name: &str| name == "amq.gen-first";
        live.delete_started("amq.gen-now");
        assert!(live.deleted_here(id, "amq.gen-now"));
        live.delete_ended("amq.gen-now", true, &renamed);
        // Once the journal forgot the queue, the consumer's name resolves
        // to itself: the mark on the consumer still tells.
        assert!(live.deleted_here(id, "amq.gen-first"));
    }
}
