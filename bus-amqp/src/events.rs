//! What recovery reports: [`RecoveryEvent`]s, also written as tracing
//! events. The type is `bus-core`'s, shared with the in-process broker's
//! simulated recovery.

pub use bus_core::RecoveryEvent;
