//! The lock-poisoning policy every transport shares: a lock poisoned by a
//! panic is taken over as it is, never reported.
//!
//! A panic while a lock is held must not turn every later use of the
//! connection into a panic too. As tokio's own mutex does, [`Mutex::lock`]
//! and [`RwLock::read`]/[`RwLock::write`] return the guard whether or not
//! an earlier holder panicked. The transports keep every state these locks
//! guard consistent between statements (sets of names, channels, handles,
//! queue contents), so what a panicking thread left behind is still usable.
//!
//! These are thin wrappers over [`std::sync::Mutex`] and
//! [`std::sync::RwLock`], with their guards; nothing else changes.

use std::sync::PoisonError;

/// A mutual-exclusion lock whose [`Mutex::lock`] never fails: a lock
/// poisoned by a panic elsewhere is recovered (see the [module](self)).
#[derive(Debug, Default)]
pub struct Mutex<T: ?Sized>(std::sync::Mutex<T>);

/// The guard of a locked [`Mutex`]: [`std::sync::MutexGuard`].
pub type MutexGuard<'a, T> = std::sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    /// A new unlocked mutex holding `value`.
    pub const fn new(value: T) -> Self {
        Mutex(std::sync::Mutex::new(value))
    }

    /// The value, the mutex consumed; a poisoned one's value as it is.
    pub fn into_inner(self) -> T {
        self.0.into_inner().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: ?Sized> Mutex<T> {
    /// Locks it, waiting for other holders; a lock poisoned by a panic
    /// elsewhere is recovered, not reported.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value, through exclusive access (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A reader-writer lock whose [`RwLock::read`] and [`RwLock::write`] never
/// fail: a lock poisoned by a panic elsewhere is recovered (see the
/// [module](self)).
#[derive(Debug, Default)]
pub struct RwLock<T: ?Sized>(std::sync::RwLock<T>);

/// The guard of a [`RwLock`] locked for reading:
/// [`std::sync::RwLockReadGuard`].
pub type RwLockReadGuard<'a, T> = std::sync::RwLockReadGuard<'a, T>;

/// The guard of a [`RwLock`] locked for writing:
/// [`std::sync::RwLockWriteGuard`].
pub type RwLockWriteGuard<'a, T> = std::sync::RwLockWriteGuard<'a, T>;

impl<T> RwLock<T> {
    /// A new unlocked lock holding `value`.
    pub const fn new(value: T) -> Self {
        RwLock(std::sync::RwLock::new(value))
    }
}

impl<T: ?Sized> RwLock<T> {
    /// Locks it for reading, waiting for a writer; a lock poisoned by a
    /// panic elsewhere is recovered, not reported.
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks it for writing, waiting for every other holder; a lock
    /// poisoned by a panic elsewhere is recovered, not reported.
    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_is_taken_over_with_its_value() {
        let m = std::sync::Arc::new(Mutex::new(vec![1]));
        let held = m.clone();
        let panicked = std::thread::spawn(move || {
            let mut g = held.lock();
            g.push(2);
            panic!("while holding the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.0.is_poisoned());
        assert_eq!(*m.lock(), vec![1, 2]);
    }

    #[test]
    fn a_poisoned_rwlock_is_taken_over_for_reading_and_writing() {
        let l = std::sync::Arc::new(RwLock::new(0));
        let held = l.clone();
        let panicked = std::thread::spawn(move || {
            let mut g = held.write();
            *g = 7;
            panic!("while holding the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(l.0.is_poisoned());
        assert_eq!(*l.read(), 7);
        *l.write() += 1;
        assert_eq!(*l.read(), 8);
    }
}
