//! The crate's one lock-poisoning policy.
//!
//! A panic while a lock is held must not turn every later use of the
//! connection into a panic too: as tokio's own mutex does, a poisoned lock
//! is taken over as it is. Every state these locks guard is left
//! consistent between statements (sets of names, channels, handles), so
//! the data a panicking thread left behind is still usable.

use std::sync::PoisonError;

/// A mutual-exclusion lock whose [`Mutex::lock`] never fails.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(std::sync::Mutex<T>);

/// The guard of a locked [`Mutex`].
pub(crate) type MutexGuard<'a, T> = std::sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    /// A new unlocked mutex holding `value`.
    pub(crate) const fn new(value: T) -> Self {
        Mutex(std::sync::Mutex::new(value))
    }

    /// Locks it, waiting for other holders; a lock poisoned by a panic
    /// elsewhere is recovered, not reported.
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
