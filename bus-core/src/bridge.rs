//! Moving messages from one transport to another, at least once.
//!
//! A [`Bridge`] reads deliveries from a [`Consumer`] (a queue of any
//! transport, or a legacy inbox) and publishes each to an exchange through a
//! [`Publisher`] (a connection of any transport, or a legacy result
//! writer). The source delivery is acked only after the destination
//! confirmed the publish, so nothing is lost when either side fails: a
//! failed publish nacks the delivery with requeue, and a crash between the
//! confirm and the ack delivers the message again (at least once).
//!
//! ```no_run
//! # async fn demo(rabbit: std::sync::Arc<dyn bus_core::Connection>,
//! #               folder: std::sync::Arc<dyn bus_core::Connection>) -> bus_core::Result<()> {
//! use bus_core::{bridge::Bridge, ConsumeOptions};
//! let source = folder.consume("outbox", ConsumeOptions::prefetch(16)).await?;
//! let stats = Bridge::new(rabbit, "")
//!     .with_routing_key("jobs")
//!     .run(source)
//!     .await?;
//! # let _ = stats; Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::{Consumer, Delivery, PublishOptions, Publisher, Requeue, Result};

/// How a bridge picks the routing key of what it forwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoutingKey {
    /// The routing key the message arrived with.
    Keep,
    /// Always this key.
    Fixed(String),
}

/// What a bridge did before it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Messages the destination confirmed and the source acked.
    pub forwarded: u64,
    /// Publishes that failed and were nacked back to the source.
    pub requeued: u64,
}

/// Forwards deliveries from a source consumer to a destination exchange,
/// acking the source only after the destination confirmed.
pub struct Bridge {
    destination: Arc<dyn Publisher>,
    exchange: String,
    routing_key: RoutingKey,
    mandatory: bool,
    retry_delay: Duration,
}

impl fmt::Debug for Bridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bridge")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("mandatory", &self.mandatory)
            .field("retry_delay", &self.retry_delay)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// A bridge publishing to `exchange` through `destination`, keeping
    /// each message's routing key, mandatory (a message no queue takes is
    /// an error, not a silent drop), retrying temporary failures after 1 s.
    ///
    /// `destination` is any publisher: an `Arc` of a connection of any
    /// transport, or a transport's own publisher (a legacy result writer).
    pub fn new(destination: impl Publisher, exchange: impl Into<String>) -> Self {
        Bridge {
            destination: Arc::new(destination),
            exchange: exchange.into(),
            routing_key: RoutingKey::Keep,
            mandatory: true,
            retry_delay: Duration::from_secs(1),
        }
    }

    /// Publishes everything with this routing key.
    #[must_use]
    pub fn with_routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = RoutingKey::Fixed(key.into());
        self
    }

    /// Whether publishes are mandatory (default true).
    #[must_use]
    pub fn with_mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }

    /// How long to wait after a temporary destination failure before the
    /// next message (default 1 s).
    #[must_use]
    pub fn with_retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// Forwards one delivery: publish, then ack; on a failed publish, nack
    /// with requeue and return the publish error.
    ///
    /// # Errors
    /// The destination's error (the delivery was requeued), or the
    /// source's error when settling failed.
    pub async fn forward(&self, delivery: &Delivery) -> Result<()> {
        let key = match &self.routing_key {
            RoutingKey::Keep => delivery.routing_key.as_str(),
            RoutingKey::Fixed(k) => k.as_str(),
        };
        let options = PublishOptions::default().with_mandatory(self.mandatory);
        match self
            .destination
            .publish(&self.exchange, key, delivery.message.clone(), options)
            .await
        {
            Ok(()) => delivery.ack().await,
            Err(e) => {
                delivery.nack(Requeue::Yes).await?;
                Err(e)
            }
        }
    }

    /// Runs until the source ends (returns the counts) or fails in a way
    /// retrying cannot fix (returns the error; every delivery not forwarded
    /// was requeued). Temporary destination errors are retried after the
    /// retry delay.
    ///
    /// # Errors
    /// A permanent destination error (missing exchange, unroutable
    /// message), or the source's error.
    pub async fn run(&self, mut source: Consumer) -> Result<BridgeStats> {
        let mut stats = BridgeStats::default();
        while let Some(delivery) = source.next().await {
            let delivery = delivery?;
            match self.forward(&delivery).await {
                Ok(()) => stats.forwarded += 1,
                Err(e) if e.is_temporary() => {
                    stats.requeued += 1;
                    tracing::warn!(error = %e, "bridge: destination failed; message requeued");
                    tokio::time::sleep(self.retry_delay).await;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(stats)
    }
}
