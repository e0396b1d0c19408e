//! The consumers of a connection: how many are alive (each holds a
//! channel, and they must leave the channels publishing and topology need)
//! and their coalesced acks, flushed on close.

use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Consumers alive (each holds a channel), so that they never take
    /// the channels publishing and topology need.
    live: AtomicUsize,
    /// The coalesced acks of this connection's consumers, flushed on close.
    ack_batches: Mutex<Vec<Weak<AckBatch>>>,
}

impl Consumers {
    pub(super) fn new() -> Self {
        Consumers {
            live: AtomicUsize::new(0),
            ack_batches: Mutex::new(Vec::new()),
        }
    }
}

impl Shared {
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

    /// Counts a new consumer in, or refuses it when it would take one of
    /// the channels kept for publishing and topology operations. The check
    /// and the count are one atomic step, so consumers started at once
    /// cannot race past the limit; the caller gives the count back when
    /// the consumer ends or fails to start.
    pub(crate) fn reserve_consumer_channel(&self, link: &Link) -> Result<()> {
        let channel_max = match link.conn.configuration().channel_max() {
            0 => usize::from(u16::MAX),
            n => usize::from(n),
        };
        let room = channel_max.saturating_sub(RESERVED_CHANNELS);
        let reserved = self
            .consumers
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < room).then_some(n + 1)
            });
        if let Err(consumers) = reserved {
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
        Ok(())
    }

    /// Gives back the count taken by
    /// [`reserve_consumer_channel`](Shared::reserve_consumer_channel).
    pub(crate) fn release_consumer_channel(&self) {
        self.consumers.live.fetch_sub(1, Ordering::AcqRel);
    }
}
