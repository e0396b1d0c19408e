//! How often, and after how long, a transient failure is retried.

use std::time::Duration;

/// The retry policy of a worker: `immediate` in-process retries after an
/// exponential backoff, then one delayed retry through the broker per entry
/// of `delayed`, each round again with its in-process retries.
///
/// A message is thus tried at most `(1 + immediate) * (1 + delayed.len())`
/// times ([`RetryPolicy::max_attempts`]) before it is poisoned. The default
/// is 2 immediate retries (backoff from 100 ms, doubling, at most 2 s, with
/// jitter) and delayed retries after 1 s, 10 s and 60 s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    immediate: u32,
    backoff: Duration,
    max_backoff: Duration,
    jitter: bool,
    delayed: Vec<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            immediate: 2,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            jitter: true,
            delayed: vec![
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60),
            ],
        }
    }
}

impl RetryPolicy {
    /// No retries: the first transient failure poisons the message.
    #[must_use]
    pub fn none() -> Self {
        RetryPolicy {
            immediate: 0,
            delayed: Vec::new(),
            ..RetryPolicy::default()
        }
    }

    /// In-process retries per round (0: none).
    #[must_use]
    pub fn immediate(mut self, retries: u32) -> Self {
        self.immediate = retries;
        self
    }

    /// The backoff before the first in-process retry, doubled for each next
    /// one up to `max`.
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Whether each backoff is drawn at random between half and all of its
    /// value (on by default), so that workers failing together do not
    /// retry together. Off, the backoffs are exact.
    #[must_use]
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delays of the retries through the broker, in order (empty: none).
    /// Each distinct delay is one durable delay queue per worker queue,
    /// which the broker deletes once it has been idle for a while (see
    /// [the worker docs](super#delay-queues)).
    #[must_use]
    pub fn delayed(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.delayed = delays.into_iter().collect();
        self
    }

    /// The most times a message is tried before it is poisoned.
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        let rounds = u32::try_from(self.delayed.len()).unwrap_or(u32::MAX);
        (1 + self.immediate).saturating_mul(rounds.saturating_add(1))
    }

    pub(crate) fn attempts_per_round(&self) -> u32 {
        1 + self.immediate
    }

    /// The delay of the delayed retry after round `round` (0-based), if any.
    pub(crate) fn delay_after(&self, round: u32) -> Option<Duration> {
        self.delayed.get(usize::try_from(round).ok()?).copied()
    }

    /// The backoff before in-process retry `retry` (0-based) of a round.
    pub(crate) fn backoff_for(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        let full = self.backoff.saturating_mul(factor).min(self.max_backoff);
        if !self.jitter {
            return full;
        }
        // Between half and all of it; uuid's generator is the random source
        // already in the dependency tree.
        let unit = (uuid::Uuid::new_v4().as_u128() as u64 as f64) / (u64::MAX as f64);
        full / 2 + full.mul_f64(unit / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_jitter_stays_within_half() {
        let p = RetryPolicy::default()
            .backoff(Duration::from_millis(100), Duration::from_millis(350))
            .jitter(false);
        let exact: Vec<_> = (0..4).map(|r| p.backoff_for(r).as_millis()).collect();
        assert_eq!(exact, [100, 200, 350, 350]);
        let p = p.jitter(true);
        for r in 0..4 {
            let d = p.backoff_for(r);
            let full = Duration::from_millis(exact[r as usize] as u64);
            assert!(
                d >= full / 2 && d <= full,
                "{d:?} outside [{:?}, {full:?}]",
                full / 2
            );
        }
    }

    #[test]
    fn attempts_count_every_round() {
        assert_eq!(RetryPolicy::none().max_attempts(), 1);
        assert_eq!(RetryPolicy::default().max_attempts(), 12);
        let p = RetryPolicy::none()
            .immediate(1)
            .delayed([Duration::from_secs(1)]);
        assert_eq!(p.max_attempts(), 4);
        assert_eq!(p.delay_after(0), Some(Duration::from_secs(1)));
        assert_eq!(p.delay_after(1), None);
    }
}
