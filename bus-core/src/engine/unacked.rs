//! Delivery-tag bookkeeping for one consumer: what it holds unsettled, and
//! which deliveries an ack or nack of a tag settles, as RabbitMQ's channel
//! decides (`rabbit_channel:collect_acks`):
//! - a tag settles the delivery with that tag; with `multiple`, also every
//!   earlier unsettled one;
//! - the tag must be unsettled, with or without `multiple`: settling a tag
//!   settled already (one by one or by an earlier `multiple`), or one never
//!   handed out, is an error, even when earlier tags are still unsettled
//!   (RabbitMQ closes the channel with PRECONDITION_FAILED "unknown delivery
//!   tag");
//! - tag 0 with `multiple` settles everything unsettled, which may be
//!   nothing.
//!
//! Tags are handed out by the transport, growing; this type only keeps them.

use std::collections::vec_deque::{self, VecDeque};
use std::fmt;

use crate::Error;

/// A settle named a tag the consumer does not hold unsettled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownTag {
    /// The tag named.
    pub tag: u64,
}

impl fmt::Display for UnknownTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown delivery tag {}", self.tag)
    }
}

impl std::error::Error for UnknownTag {}

impl UnknownTag {
    /// The error a transport returns for it, naming the consumer's queue:
    /// [`Error::PreconditionFailed`] (the channel error RabbitMQ closes the
    /// channel with), permanent.
    #[must_use]
    pub fn on_queue(self, queue: &str) -> Error {
        Error::PreconditionFailed(crate::ErrorDetail::about(
            crate::Subject::queue(queue),
            format!("{self} on queue '{queue}'"),
        ))
    }
}

/// The unsettled deliveries of one consumer, by tag, each with what the
/// transport keeps for it (`T`: the message, a claimed file's name).
#[derive(Clone)]
pub struct Unacked<T> {
    /// Sorted by tag: tags are handed out growing, so the usual in-order
    /// ack takes the front.
    entries: VecDeque<(u64, T)>,
}

impl<T> fmt::Debug for Unacked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unacked")
            .field("len", &self.entries.len())
            .field("first", &self.entries.front().map(|(t, _)| *t))
            .field("last", &self.entries.back().map(|(t, _)| *t))
            .finish()
    }
}

impl<T> Default for Unacked<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Which entries a settle covers.
enum Span {
    One(usize),
    UpTo(usize),
}

impl<T> Unacked<T> {
    /// Nothing unsettled.
    #[must_use]
    pub fn new() -> Self {
        Unacked {
            entries: VecDeque::new(),
        }
    }

    /// How many deliveries are unsettled (what prefetch counts).
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is unsettled.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keeps `value` as the unsettled delivery `tag`. Tags normally arrive
    /// growing (appended); one that arrives late (handed out by another
    /// thread that lost the race to this lock) goes to its place.
    ///
    /// # Panics
    /// In debug builds, if `tag` is held already: the transport handed the
    /// same tag out twice.
    pub fn insert(&mut self, tag: u64, value: T) {
        match self.entries.back() {
            Some((last, _)) if *last >= tag => {
                let at = self.entries.partition_point(|(t, _)| *t < tag);
                debug_assert!(
                    self.entries.get(at).is_none_or(|(t, _)| *t != tag),
                    "delivery tag {tag} handed out twice"
                );
                self.entries.insert(at, (tag, value));
            }
            _ => self.entries.push_back((tag, value)),
        }
    }

    fn position(&self, tag: u64) -> Option<usize> {
        match self.entries.front() {
            Some((first, _)) if *first == tag => Some(0),
            _ => self.entries.binary_search_by_key(&tag, |(t, _)| *t).ok(),
        }
    }

    fn span(&self, tag: u64, multiple: bool) -> Result<Option<Span>, UnknownTag> {
        if multiple && tag == 0 {
            return Ok(self.entries.len().checked_sub(1).map(Span::UpTo));
        }
        let at = self.position(tag).ok_or(UnknownTag { tag })?;
        Ok(Some(if multiple {
            Span::UpTo(at)
        } else {
            Span::One(at)
        }))
    }

    /// Settles `tag` (and, with `multiple`, every earlier unsettled tag):
    /// takes their values out, in tag order.
    ///
    /// # Errors
    /// [`UnknownTag`] when `tag` is not unsettled (see the
    /// [module](self) documentation); nothing is taken then.
    pub fn take(&mut self, tag: u64, multiple: bool) -> Result<Taken<'_, T>, UnknownTag> {
        Ok(Taken(match self.span(tag, multiple)? {
            None => TakenInner::One(None),
            Some(Span::One(at)) => TakenInner::One(self.entries.remove(at)),
            Some(Span::UpTo(at)) => TakenInner::Many(self.entries.drain(..=at)),
        }))
    }

    /// What [`Unacked::take`] would take, without taking it: the tags and
    /// values, in tag order. For a transport that must finish the settle
    /// (put messages back) before the deliveries stop counting against the
    /// prefetch; it then [`Unacked::remove`]s them.
    ///
    /// # Errors
    /// As [`Unacked::take`].
    pub fn peek(
        &self,
        tag: u64,
        multiple: bool,
    ) -> Result<impl Iterator<Item = (u64, &T)> + '_, UnknownTag> {
        let range = match self.span(tag, multiple)? {
            None => 0..0,
            Some(Span::One(at)) => at..at + 1,
            Some(Span::UpTo(at)) => 0..at + 1,
        };
        Ok(self.entries.range(range).map(|(t, v)| (*t, v)))
    }

    /// Takes out the one delivery `tag`, if it is unsettled.
    pub fn remove(&mut self, tag: u64) -> Option<T> {
        let at = self.position(tag)?;
        self.entries.remove(at).map(|(_, v)| v)
    }

    /// Takes out everything (a consumer that went away), in tag order.
    pub fn drain(&mut self) -> impl Iterator<Item = (u64, T)> + '_ {
        self.entries.drain(..)
    }

    /// The unsettled deliveries, in tag order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.entries.iter().map(|(t, v)| (*t, v))
    }
}

/// The values a settle took out, in tag order (see [`Unacked::take`]).
/// What is not read is dropped with it.
pub struct Taken<'a, T>(TakenInner<'a, T>);

enum TakenInner<'a, T> {
    One(Option<(u64, T)>),
    Many(vec_deque::Drain<'a, (u64, T)>),
}

impl<T> fmt::Debug for Taken<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Taken").finish_non_exhaustive()
    }
}

impl<T> Iterator for Taken<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match &mut self.0 {
            TakenInner::One(one) => one.take().map(|(_, v)| v),
            TakenInner::Many(drain) => drain.next().map(|(_, v)| v),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match &self.0 {
            TakenInner::One(one) => {
                let n = usize::from(one.is_some());
                (n, Some(n))
            }
            TakenInner::Many(drain) => drain.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(tags: &[u64]) -> Unacked<u64> {
        let mut u = Unacked::new();
        for &t in tags {
            u.insert(t, t * 10);
        }
        u
    }

    fn tags<T>(u: &Unacked<T>) -> Vec<u64> {
        u.iter().map(|(t, _)| t).collect()
    }

    #[test]
    fn one_tag_settles_one_delivery() {
        let mut u = held(&[1, 2, 3]);
        assert_eq!(u.take(2, false).unwrap().collect::<Vec<_>>(), [20]);
        assert_eq!(tags(&u), [1, 3]);
        assert_eq!(u.take(2, false).err(), Some(UnknownTag { tag: 2 }));
        assert_eq!(u.take(9, false).err(), Some(UnknownTag { tag: 9 }));
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn multiple_settles_up_to_an_unsettled_tag() {
        let mut u = held(&[1, 2, 3, 4]);
        assert_eq!(u.take(3, true).unwrap().collect::<Vec<_>>(), [10, 20, 30]);
        assert_eq!(tags(&u), [4]);
        // Tag 2 went with the multiple: naming it again is refused, even
        // with tag 4 still unsettled, and nothing is taken.
        assert_eq!(u.take(2, true).err(), Some(UnknownTag { tag: 2 }));
        assert_eq!(u.take(5, true).err(), Some(UnknownTag { tag: 5 }));
        assert_eq!(tags(&u), [4]);
    }

    #[test]
    fn an_empty_multiple_range_is_refused_as_rabbitmq_does() {
        let mut u = held(&[]);
        assert_eq!(u.take(5, true).err(), Some(UnknownTag { tag: 5 }));
        let err: Error = UnknownTag { tag: 5 }.on_queue("q");
        assert!(
            matches!(&err, Error::PreconditionFailed(m) if m == "unknown delivery tag 5 on queue 'q'"),
            "{err:?}"
        );
        assert!(!err.is_temporary());
        assert_eq!(err.subject(), Some(&crate::Subject::queue("q")));
    }

    #[test]
    fn tag_zero_with_multiple_settles_everything() {
        let mut u = held(&[]);
        assert_eq!(u.take(0, true).unwrap().count(), 0);
        let mut u = held(&[4, 7]);
        assert_eq!(u.take(0, true).unwrap().collect::<Vec<_>>(), [40, 70]);
        assert!(u.is_empty());
        assert_eq!(held(&[1]).take(0, false).err(), Some(UnknownTag { tag: 0 }));
    }

    #[test]
    fn peek_then_remove_settles_in_two_steps() {
        let mut u = held(&[1, 2, 3]);
        let seen: Vec<(u64, u64)> = u.peek(2, true).unwrap().map(|(t, v)| (t, *v)).collect();
        assert_eq!(seen, [(1, 10), (2, 20)]);
        assert_eq!(u.len(), 3, "peek takes nothing");
        assert!(u.peek(7, false).is_err());
        assert_eq!(u.peek(3, false).unwrap().count(), 1);
        assert_eq!(u.remove(1), Some(10));
        assert_eq!(u.remove(1), None);
        assert_eq!(u.drain().collect::<Vec<_>>(), [(2, 20), (3, 30)]);
    }

    #[test]
    fn late_tags_go_to_their_place() {
        let u = held(&[1, 4, 2, 3]);
        assert_eq!(tags(&u), [1, 2, 3, 4]);
    }
}
