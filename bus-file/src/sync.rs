//! The crate's locks: [`bus_core::sync`]'s, whose `lock()` takes over a
//! lock poisoned by a panic (the policy every transport shares).

pub(crate) use bus_core::sync::{Mutex, MutexGuard};
