//! The behaviour suite every transport must pass (`conformance` feature).
//!
//! Each case is a public async function taking a [`Harness`]; the
//! [`conformance_tests!`](crate::conformance_tests) macro expands the suite
//! into one `#[tokio::test]` per case for a transport.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{Capabilities, Connection};

/// How the suite opens connections to the transport under test.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// Opens a new connection to the one broker this harness stands for.
    /// Each call is a separate connection (for exclusivity and consumer-loss
    /// cases).
    async fn connect(&self) -> Arc<dyn Connection>;

    /// What the transport supports; cases it cannot pass are reported as not
    /// applicable by name.
    fn capabilities(&self) -> Capabilities;
}

/// A name no other test uses: `prefix` and a random suffix.
#[must_use]
pub fn fresh_name(prefix: &str) -> String {
    format!("bus-test.{prefix}.{}", uuid::Uuid::new_v4().simple())
}

/// Expands the request/reply cases of the suite; called by
/// [`conformance_tests!`](crate::conformance_tests) with the same arguments.
#[doc(hidden)]
#[macro_export]
macro_rules! __rpc_conformance_tests {
    ($harness:expr, $(#[$meta:meta])+) => {};
}
