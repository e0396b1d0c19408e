//! Queue policy as RabbitMQ's classic queues decide it: length limits and
//! what overflowing them does, message TTLs, priority levels. The transport
//! measures (how many messages and bytes are ready, what time it is) and
//! stores; these functions decide.

use std::time::Duration;

use crate::{Overflow, QueueArguments};

/// How full a queue is: its ready messages (not those delivered and
/// unacked, which RabbitMQ does not count against a limit) and the bytes of
/// their bodies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Depth {
    /// Ready messages.
    pub messages: u64,
    /// Body bytes of the ready messages.
    pub bytes: u64,
}

/// What a queue does with a publish (RabbitMQ's `will_overflow` under the
/// `reject-publish` modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The message goes in (a `drop-head` queue may then drop its oldest:
    /// [`Limits::must_drop_head`]).
    Accept,
    /// The queue refuses the message: a confirming publisher gets a nack.
    Refuse {
        /// `reject-publish-dlx`: the refused message is also dead-lettered
        /// (reason `maxlen`).
        dead_letter: bool,
    },
}

/// A queue's length limits (`x-max-length`, `x-max-length-bytes`) and its
/// `x-overflow` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most ready messages.
    pub max_length: Option<u64>,
    /// Most body bytes of ready messages.
    pub max_length_bytes: Option<u64>,
    /// What a full queue does (`drop-head` when the queue does not say).
    pub overflow: Overflow,
}

impl Limits {
    /// The limits of a queue declared with `args`.
    #[must_use]
    pub fn of(args: &QueueArguments) -> Self {
        Limits {
            max_length: args.max_length,
            max_length_bytes: args.max_length_bytes,
            overflow: args.overflow.unwrap_or(Overflow::DropHead),
        }
    }

    /// Whether the queue has a limit at all.
    #[must_use]
    pub fn is_bounded(&self) -> bool {
        self.max_length.is_some() || self.max_length_bytes.is_some()
    }

    /// Whether a publish needs the queue's depth to be admitted: the queue
    /// is bounded and refuses on overflow. Other publishes are
    /// [`Admission::Accept`]ed whatever the depth.
    #[must_use]
    pub fn checks_admission(&self) -> bool {
        self.is_bounded() && self.overflow != Overflow::DropHead
    }

    /// Whether the queue drops its oldest messages on overflow: bounded and
    /// `drop-head`.
    #[must_use]
    pub fn drops_head(&self) -> bool {
        self.is_bounded() && self.overflow == Overflow::DropHead
    }

    /// What a publish of a body of `size` bytes into the queue at `depth`
    /// does: refused under `reject-publish` and `reject-publish-dlx` when one
    /// more message, or `size` more bytes, would pass a limit; accepted
    /// otherwise. Sums saturate: a depth read from untrusted storage cannot
    /// overflow them.
    #[must_use]
    pub fn admit(&self, depth: Depth, size: u64) -> Admission {
        if !self.checks_admission() {
            return Admission::Accept;
        }
        let full = self.max_length.is_some_and(|max| depth.messages >= max)
            || self
                .max_length_bytes
                .is_some_and(|max| depth.bytes.saturating_add(size) > max);
        if full {
            Admission::Refuse {
                dead_letter: self.overflow == Overflow::RejectPublishDlx,
            }
        } else {
            Admission::Accept
        }
    }

    /// Whether a `drop-head` queue at `depth` must drop (or dead-letter,
    /// reason `maxlen`) its oldest ready message: it is past a limit. Always
    /// `false` for the other modes. The transport drops heads until this is
    /// `false`.
    #[must_use]
    pub fn must_drop_head(&self, depth: Depth) -> bool {
        self.drops_head()
            && (self.max_length.is_some_and(|max| depth.messages > max)
                || self.max_length_bytes.is_some_and(|max| depth.bytes > max))
    }
}

/// The TTL a message gets in a queue: the shorter of the queue's
/// `x-message-ttl` and the message's own `expiration`
/// ([`Message::ttl`](crate::Message::ttl)), or whichever there is.
#[must_use]
pub fn message_ttl(queue_ttl: Option<Duration>, message_ttl: Option<Duration>) -> Option<Duration> {
    match (queue_ttl, message_ttl) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether a message that expires at `expires_at` has expired at `now`
/// (in whatever clock the transport keeps): once its time is reached, not
/// only after. A TTL of 0 thus expires a message at once unless a consumer
/// takes it as it arrives.
#[must_use]
pub fn is_expired<T: PartialOrd>(expires_at: T, now: T) -> bool {
    expires_at <= now
}

/// The priority level a message with `priority` gets in a queue with
/// `x-max-priority` `max_priority`: its priority capped at the maximum
/// (none counts as 0); always 0 in a queue without priorities. Higher levels
/// are delivered first, FIFO within a level.
#[must_use]
pub fn priority_level(max_priority: Option<u8>, priority: Option<u8>) -> u8 {
    match max_priority {
        Some(max) => priority.unwrap_or(0).min(max),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(len: Option<u64>, bytes: Option<u64>, overflow: Option<Overflow>) -> Limits {
        Limits::of(&QueueArguments {
            max_length: len,
            max_length_bytes: bytes,
            overflow,
            ..QueueArguments::default()
        })
    }

    fn depth(messages: u64, bytes: u64) -> Depth {
        Depth { messages, bytes }
    }

    #[test]
    fn unbounded_queues_take_everything() {
        for overflow in [
            None,
            Some(Overflow::RejectPublish),
            Some(Overflow::RejectPublishDlx),
        ] {
            let l = limits(None, None, overflow);
            assert!(!l.is_bounded() && !l.checks_admission() && !l.drops_head());
            assert_eq!(
                l.admit(depth(u64::MAX, u64::MAX), u64::MAX),
                Admission::Accept
            );
            assert!(!l.must_drop_head(depth(u64::MAX, u64::MAX)));
        }
    }

    #[test]
    fn drop_head_accepts_then_drops_past_the_limit() {
        let l = limits(Some(2), Some(10), None);
        assert_eq!(l.overflow, Overflow::DropHead);
        assert_eq!(l.admit(depth(5, 50), 1), Admission::Accept);
        assert!(!l.must_drop_head(depth(2, 10)), "at the limit is within it");
        assert!(l.must_drop_head(depth(3, 3)));
        assert!(l.must_drop_head(depth(1, 11)));
    }

    #[test]
    fn reject_publish_refuses_what_would_pass_a_limit() {
        let l = limits(Some(2), Some(10), Some(Overflow::RejectPublish));
        assert_eq!(l.admit(depth(1, 0), 10), Admission::Accept);
        assert_eq!(
            l.admit(depth(2, 0), 0),
            Admission::Refuse { dead_letter: false }
        );
        assert_eq!(
            l.admit(depth(0, 6), 5),
            Admission::Refuse { dead_letter: false }
        );
        assert_eq!(
            l.admit(depth(0, u64::MAX), 1),
            Admission::Refuse { dead_letter: false }
        );
        assert!(!l.must_drop_head(depth(9, 90)));
        let dlx = limits(Some(0), None, Some(Overflow::RejectPublishDlx));
        assert_eq!(
            dlx.admit(depth(0, 0), 0),
            Admission::Refuse { dead_letter: true }
        );
    }

    #[test]
    fn ttl_is_the_shorter_of_queue_and_message() {
        let ms = Duration::from_millis;
        assert_eq!(message_ttl(None, None), None);
        assert_eq!(message_ttl(Some(ms(5)), None), Some(ms(5)));
        assert_eq!(message_ttl(None, Some(ms(7))), Some(ms(7)));
        assert_eq!(message_ttl(Some(ms(5)), Some(ms(7))), Some(ms(5)));
        assert_eq!(message_ttl(Some(ms(9)), Some(ms(0))), Some(ms(0)));
        assert!(is_expired(5, 5) && is_expired(4, 5) && !is_expired(6, 5));
    }

    #[test]
    fn priorities_are_capped_at_the_queue_maximum() {
        assert_eq!(priority_level(None, Some(9)), 0);
        assert_eq!(priority_level(Some(5), None), 0);
        assert_eq!(priority_level(Some(5), Some(3)), 3);
        assert_eq!(priority_level(Some(5), Some(200)), 5);
    }
}
