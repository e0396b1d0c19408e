//! Dead letters on their way through this broker. What a dead-lettered
//! message carries, and which queues a dead letter skips, is decided by
//! [`bus_core::engine::dead_letter`]; this broker only carries it.

use bus_core::engine::dead_letter::Reason;
use bus_core::{FieldTable, FieldValue};

use crate::queue::Envelope;

/// A message on its way to a dead-letter exchange.
#[derive(Debug)]
pub(crate) struct DeadLetter {
    pub(crate) envelope: Envelope,
    pub(crate) reason: Reason,
}

/// The routing keys carried by the `CC` and `BCC` headers (RabbitMQ's
/// sender-selected distribution). Entries that are not strings are ignored,
/// as RabbitMQ ignores them.
pub(crate) fn header_routes(headers: &FieldTable) -> impl Iterator<Item = &str> {
    ["CC", "BCC"]
        .into_iter()
        .filter_map(|h| headers.get(h).and_then(FieldValue::as_array))
        .flatten()
        .filter_map(FieldValue::as_str)
}
