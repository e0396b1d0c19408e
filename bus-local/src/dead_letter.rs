//! Dead letters on their way through this broker. What a dead-lettered
//! message carries, and which queues a dead letter skips, is decided by
//! [`bus_core::engine::dead_letter`]; this broker only carries it.

use bus_core::engine::dead_letter::Reason;

use crate::queue::Envelope;

/// A message on its way to a dead-letter exchange.
#[derive(Debug)]
pub(crate) struct DeadLetter {
    pub(crate) envelope: Envelope,
    pub(crate) reason: Reason,
}
