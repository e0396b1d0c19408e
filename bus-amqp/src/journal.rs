//! The topology a connection declared, kept to declare it again after a
//! reconnection: `bus-core`'s journal, shared with the in-process broker's
//! simulated recovery.

pub(crate) use bus_core::recovery::{BindingRecord, ExchangeBindingRecord, Journal};
