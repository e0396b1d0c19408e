//! A quorum queue's delivery count and delivery limit, as RabbitMQ 3.10's
//! quorum queues keep them (pinned against RabbitMQ 3.10.8 by the
//! conformance suite):
//! - every return of a delivered message to its queue counts: a nack or
//!   reject with requeue (one message or `multiple`), a recover, and the
//!   unsettled deliveries of a consumer whose channel closes or whose
//!   connection is lost. A cancelled consumer's unsettled deliveries count
//!   when its channel closes, not when it is cancelled. Acks and rejections
//!   without requeue end the message and count nothing.
//! - a consumer's delivery of a message returned `n` times (`n` ≥ 1)
//!   carries the header `x-delivery-count` = `n` (a 64-bit integer),
//!   replacing any the publisher set; a first delivery adds none (a
//!   publisher's own `x-delivery-count` reaches the consumer untouched).
//!   Quorum queues add it with or without a limit; classic queues never do
//!   (and refuse `x-delivery-limit`: PRECONDITION_FAILED "invalid arg").
//! - with `x-delivery-limit` = `L`, the return that makes the count pass
//!   `L` ends the message instead of requeueing it: it is dead-lettered with
//!   reason `delivery_limit`, or dropped when the queue has no dead-letter
//!   exchange. The message is delivered `L + 1` times in all (`L` = 0: once).
//! - the dead-lettered message is the message as it was published (plus
//!   the `x-death` headers of [`dead_letter`](super::dead_letter)): no
//!   `x-delivery-count` is added to it.
//!
//! A transport keeps a count per message in a quorum queue, asks
//! [`DeliveryCount::on_return`] what a return does, and writes the header
//! into each delivery with [`DeliveryCount::stamp`].

use crate::{FieldValue, Message, QueueArguments, QueueType};

/// The header a redelivered message of a quorum queue carries: how many
/// times it was returned to the queue before this delivery.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// What a return does to a message of a queue that counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// It goes back to the queue to be delivered again.
    Requeue,
    /// It passed the delivery limit: dead-lettered with reason
    /// [`delivery_limit`](super::dead_letter::Reason::DeliveryLimit), or
    /// dropped without a dead-letter exchange.
    DeadLetter,
}

/// How a queue counts returns: present for quorum queues only
/// ([`DeliveryCount::of`]), with the queue's `x-delivery-limit` if it has
/// one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryCount {
    /// The queue's `x-delivery-limit`: returns a message may have before
    /// the next one ends it. `None`: returns are counted, never limited.
    pub limit: Option<u32>,
}

impl DeliveryCount {
    /// How a queue declared with `args` counts returns: `Some` for a quorum
    /// queue (with or without a limit), `None` for any other queue, which
    /// counts nothing. (RabbitMQ 3.10 refuses `x-delivery-limit` on a
    /// classic queue, PRECONDITION_FAILED "invalid arg": a transport refuses
    /// it at declaration, before this is asked.)
    #[must_use]
    pub fn of(args: &QueueArguments) -> Option<Self> {
        (args.queue_type == Some(QueueType::Quorum)).then_some(DeliveryCount {
            limit: args.delivery_limit,
        })
    }

    /// Counts one more return of a message returned `count` times before
    /// (saturating), and says what the return does: [`Fate::DeadLetter`]
    /// once the new count passes the limit.
    #[must_use]
    pub fn on_return(&self, count: &mut u32) -> Fate {
        *count = count.saturating_add(1);
        match self.limit {
            Some(limit) if *count > limit => Fate::DeadLetter,
            _ => Fate::Requeue,
        }
    }

    /// Writes the `x-delivery-count` header of a delivery of a message
    /// returned `count` times into the message: set to `count` when it is
    /// at least 1 (replacing any value there), untouched for a first
    /// delivery, whose properties stay shared with the queue's copy (see
    /// [`SharedProperties`](crate::SharedProperties)).
    pub fn stamp(count: u32, message: &mut Message) {
        if count > 0 {
            message.properties.headers.insert(
                DELIVERY_COUNT_HEADER.into(),
                FieldValue::I64(i64::from(count)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Properties;

    fn quorum(limit: Option<u32>) -> QueueArguments {
        QueueArguments {
            queue_type: Some(QueueType::Quorum),
            delivery_limit: limit,
            ..QueueArguments::default()
        }
    }

    /// Deliveries of a message that every consumer returns, until its
    /// queue ends it.
    fn deliveries(counting: DeliveryCount) -> u32 {
        let mut count = 0;
        let mut delivered = 1;
        while counting.on_return(&mut count) == Fate::Requeue {
            delivered += 1;
            assert!(delivered < 100, "never ended");
        }
        delivered
    }

    #[test]
    fn only_quorum_queues_count() {
        let classic = QueueArguments {
            delivery_limit: Some(2),
            ..QueueArguments::default()
        };
        assert_eq!(DeliveryCount::of(&classic), None);
        assert_eq!(
            DeliveryCount::of(&quorum(None)),
            Some(DeliveryCount { limit: None })
        );
        assert_eq!(
            DeliveryCount::of(&quorum(Some(2))),
            Some(DeliveryCount { limit: Some(2) })
        );
    }

    #[test]
    fn a_limit_of_n_delivers_n_plus_one_times() {
        for limit in [0, 1, 2, 5] {
            let counting = DeliveryCount::of(&quorum(Some(limit))).unwrap();
            assert_eq!(deliveries(counting), limit + 1, "limit {limit}");
        }
        let unlimited = DeliveryCount { limit: None };
        let mut count = u32::MAX - 1;
        assert_eq!(unlimited.on_return(&mut count), Fate::Requeue);
        assert_eq!(unlimited.on_return(&mut count), Fate::Requeue);
        assert_eq!(count, u32::MAX, "saturates");
        let limited = DeliveryCount {
            limit: Some(u32::MAX),
        };
        assert_eq!(limited.on_return(&mut count), Fate::Requeue);
    }

    #[test]
    fn the_header_counts_returns_and_a_first_delivery_has_none() {
        let mut m = Message::new(&b"x"[..]);
        m.properties
            .headers
            .insert(DELIVERY_COUNT_HEADER.into(), FieldValue::I32(7));
        DeliveryCount::stamp(0, &mut m);
        assert_eq!(
            m.properties.headers[DELIVERY_COUNT_HEADER],
            FieldValue::I32(7)
        );
        DeliveryCount::stamp(1, &mut m);
        assert_eq!(
            m.properties.headers[DELIVERY_COUNT_HEADER],
            FieldValue::I64(1)
        );
        // A first delivery leaves the properties as they were: empty ones
        // allocate nothing, shared ones are not copied.
        let mut none = Message::new(&b"x"[..]);
        DeliveryCount::stamp(0, &mut none);
        assert!(none.properties.is_empty());
        let queued = Message::new(&b"x"[..]).with_properties(Properties {
            content_type: Some("text/plain".into()),
            ..Properties::default()
        });
        let mut delivered = queued.clone();
        DeliveryCount::stamp(0, &mut delivered);
        assert!(std::ptr::eq(&*delivered.properties, &*queued.properties));
    }
}
