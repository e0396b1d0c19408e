//! Delayed delivery from what every transport has: a queue with a uniform
//! message TTL that dead-letters back to the target exchange.
//!
//! For each (target exchange, delay) pair there is one fanout exchange and
//! one queue of the same name, `<prefix>.<delay in ms>ms` (plus
//! `.<exchange>` for a named target). A message published to that fanout
//! exchange, with the routing key it is meant to have, lands in the queue;
//! every message of the queue has the same TTL, so the one at the head is
//! always the first due and none waits behind a later one (no head-of-line
//! blocking, unlike per-message TTLs in one queue). When it expires, the
//! broker dead-letters it to the target exchange with its own routing key.
//! The queue and exchange are durable and the message keeps its delivery
//! mode, so a persistent message survives a broker restart while it waits.

use crate::sync::Mutex;
use std::time::Duration;

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::topology::{ExchangeKind, ExchangeOptions, QueueOptions, DEFAULT_EXCHANGE, MAX_TTL};
use crate::transport::{Connection, PublishOptions};

/// The name prefix of the delay queues [`publish_delayed`] declares.
pub const DELAY_PREFIX: &str = "bus.delay";

/// The name of the delay exchange and queue for `exchange` and `delay`
/// under `prefix`.
pub(crate) fn delay_name(prefix: &str, exchange: &str, delay: Duration) -> String {
    let ms = delay.as_millis();
    if exchange == DEFAULT_EXCHANGE {
        format!("{prefix}.{ms}ms")
    } else {
        format!("{prefix}.{ms}ms.{exchange}")
    }
}

/// Declares the delay exchange and queue for `exchange` and `delay` under
/// `prefix` (idempotent) and returns their name.
pub(crate) async fn declare_delay(
    conn: &dyn Connection,
    prefix: &str,
    exchange: &str,
    delay: Duration,
) -> Result<String> {
    if delay.is_zero() || delay > MAX_TTL {
        return Err(Error::InvalidArgument(format!(
            "a delay must be between 1 ms and {MAX_TTL:?}, got {delay:?}"
        )));
    }
    let name = delay_name(prefix, exchange, delay);
    conn.declare_exchange(&name, ExchangeKind::Fanout, ExchangeOptions::durable())
        .await?;
    let options = QueueOptions::durable()
        .message_ttl(delay)
        .dead_letter_to(exchange);
    conn.declare_queue(&name, options).await?;
    conn.bind_queue(&name, &name, "", Default::default())
        .await?;
    tracing::debug!(delay_queue = %name, "declared a delay queue");
    Ok(name)
}

/// Publishes `message` to `exchange` with `routing_key` after `delay`: it
/// waits in a broker-side delay queue (see the module docs), so it survives a
/// restart of the publisher, and a persistent one a restart of the broker.
/// The returned future resolves once the delay queue holds the message
/// (publisher confirm). A message whose own `expiration` is shorter than
/// `delay` arrives when it expires instead.
///
/// The delay is kept to the millisecond; every distinct delay declares its
/// own durable queue, so prefer a few fixed values.
///
/// With feature `otel`, the message carries the current span's trace
/// context unless it carries a `traceparent` already.
///
/// # Errors
/// [`Error::InvalidArgument`] for a zero delay or one over
/// [`MAX_TTL`]; whatever declaring or publishing reports.
pub async fn publish_delayed(
    conn: &dyn Connection,
    exchange: &str,
    routing_key: &str,
    message: Message,
    delay: Duration,
) -> Result<()> {
    let name = declare_delay(conn, DELAY_PREFIX, exchange, delay).await?;
    conn.publish(&name, routing_key, message, PublishOptions::default())
        .await
}

/// The delay queues one worker has declared, so that each is declared once.
#[derive(Debug)]
pub(crate) struct Delays {
    prefix: String,
    declared: Mutex<HashSet<Duration>>,
}

impl Delays {
    pub(crate) fn new(prefix: String) -> Self {
        Delays {
            prefix,
            declared: Mutex::new(HashSet::new()),
        }
    }

    /// Publishes `message` to the default exchange with `routing_key` (the
    /// worker's queue) after `delay`.
    pub(crate) async fn publish(
        &self,
        conn: &dyn Connection,
        routing_key: &str,
        message: Message,
        delay: Duration,
    ) -> Result<()> {
        let known = self.declared.lock().contains(&delay);
        let name = if known {
            delay_name(&self.prefix, DEFAULT_EXCHANGE, delay)
        } else {
            let name = declare_delay(conn, &self.prefix, DEFAULT_EXCHANGE, delay).await?;
            self.declared.lock().insert(delay);
            name
        };
        conn.publish(&name, routing_key, message, PublishOptions::default())
            .await
    }
}
