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
//!
//! # Why a delay queue never expires under a message
//! What expires and when, and how to upgrade from delay queues that did
//! not, is in [the worker docs](super#delay-queues). How it is kept safe:
//!
//! The broker counts only consumers, `basic.get` and declarations as use
//! of a queue, not publishes, and deleting an expired queue drops its
//! messages (they are not dead-lettered). So nothing is published to a
//! delay queue without a declaration of it shortly before:
//! - a declaration restarts the queue's expiry timer, and `x-expires` is
//!   more than zero, so the queue cannot expire between that declaration
//!   and the publish that follows it (whoever else declares or stops using
//!   it meanwhile: another declaration only restarts the timer again);
//! - a message published at most `linger / 2` after the declaration is due
//!   at most `delay + linger / 2` after it, while the queue lives at least
//!   `delay + linger` after it: the other half of the linger is the margin
//!   for the broker's lag in dead-lettering a due message (and for the
//!   publish's own round trip). [`publish_delayed`] declares before every
//!   publish; a worker declares once and trusts that declaration for
//!   `linger / 2` of its own clock, measured from before the declaration
//!   was sent, then declares again;
//! - the queue is declared before its exchange and binding: once the queue
//!   is declared it cannot expire, so neither can the binding nor the
//!   auto-delete exchange, and if the queue had expired before (taking the
//!   exchange with it), both are created afresh and bound. A new exchange
//!   that never had a binding is not auto-deleted;
//! - every publish to the delay exchange is mandatory: should the queue be
//!   gone all the same (deleted by an operator), the message comes back
//!   instead of being dropped. A worker then declares again and publishes
//!   once more; what is still unroutable is reported as
//!   [`Error::Unroutable`], never lost silently.

use crate::sync::Mutex;
use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::topology::{ExchangeKind, ExchangeOptions, QueueOptions, DEFAULT_EXCHANGE, MAX_TTL};
use crate::transport::{Connection, PublishOptions};

/// The name prefix of the delay queues [`publish_delayed`] declares.
pub const DELAY_PREFIX: &str = "bus.delay";

/// The shortest default linger of a delay queue: an idle delay queue stays
/// `delay + max(delay, DEFAULT_DELAY_LINGER)` after its last declaration
/// unless [`DelayOptions::linger`] says otherwise (see the module docs).
pub const DEFAULT_DELAY_LINGER: Duration = Duration::from_secs(5 * 60);

/// The shortest linger [`DelayOptions::linger`] accepts.
pub const MIN_DELAY_LINGER: Duration = Duration::from_millis(100);

/// How delay queues are declared: [`publish_delayed_with`],
/// [`WorkerBuilder::delay_options`](super::WorkerBuilder::delay_options).
/// `#[non_exhaustive]`, so that options can be added; build it with
/// `DelayOptions::default()` and its setters.
///
/// Every publisher of one delay queue must use the same options: the broker
/// refuses a declaration with another `x-expires` as inequivalent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DelayOptions {
    /// How long an idle delay queue outlives the due time of a message
    /// published right after its last declaration: the queue expires once
    /// unused for `delay + linger`. `None` (the default) is the longer of
    /// the delay and [`DEFAULT_DELAY_LINGER`]. At least
    /// [`MIN_DELAY_LINGER`]; half of it is the margin for the broker's lag
    /// in dead-lettering a due message, so short values are for tests on a
    /// lightly loaded broker. Ignored by transports without queue expiry.
    pub linger: Option<Duration>,
}

impl DelayOptions {
    /// Sets [`DelayOptions::linger`].
    #[must_use]
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = Some(linger);
        self
    }

    /// Refuses a linger out of range, before any delay is asked for.
    pub(crate) fn check(&self) -> Result<()> {
        self.linger_for(MIN_DELAY_LINGER).map(drop)
    }

    /// The linger for `delay`, checked.
    fn linger_for(&self, delay: Duration) -> Result<Duration> {
        match self.linger {
            None => Ok(delay.max(DEFAULT_DELAY_LINGER)),
            Some(l) if (MIN_DELAY_LINGER..=MAX_TTL).contains(&l) => Ok(l),
            Some(l) => Err(Error::InvalidArgument(format!(
                "a delay queue's linger must be between {MIN_DELAY_LINGER:?} and {MAX_TTL:?}, \
                 got {l:?}"
            ))),
        }
    }
}

/// A delay, checked and cut to whole milliseconds (as its queue's name and
/// TTL are).
fn check_delay(delay: Duration) -> Result<Duration> {
    if delay.is_zero() || delay > MAX_TTL {
        return Err(Error::InvalidArgument(format!(
            "a delay must be between 1 ms and {MAX_TTL:?}, got {delay:?}"
        )));
    }
    Ok(Duration::from_millis(
        u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
    ))
}

/// The `x-expires` of the delay queue for `delay` with `linger`, in whole
/// milliseconds; `None` (the queue never expires) when it would pass
/// [`MAX_TTL`], which only delays of years reach.
fn expiry(delay: Duration, linger: Duration) -> Option<Duration> {
    let linger = Duration::from_millis(u64::try_from(linger.as_millis()).unwrap_or(u64::MAX));
    delay.checked_add(linger).filter(|e| *e <= MAX_TTL)
}

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

/// Declares the delay queue, exchange and binding for `exchange` and
/// `delay` under `prefix` (idempotent; the queue first, see the module
/// docs) and returns their name.
async fn declare_delay(
    conn: &dyn Connection,
    prefix: &str,
    exchange: &str,
    delay: Duration,
    linger: Duration,
) -> Result<String> {
    let name = delay_name(prefix, exchange, delay);
    let mut queue = QueueOptions::durable()
        .message_ttl(delay)
        .dead_letter_to(exchange);
    let mut fanout = ExchangeOptions::durable();
    if conn.capabilities().queue_expiry {
        if let Some(expires) = expiry(delay, linger) {
            queue = queue.expires(expires);
            fanout = fanout.with_auto_delete(true);
        }
    }
    // The queue first: from here on it cannot expire before the publish
    // that follows (module docs), so neither can its binding or exchange.
    conn.declare_queue(&name, queue).await?;
    conn.declare_exchange(&name, ExchangeKind::Fanout, fanout)
        .await?;
    conn.bind_queue(&name, &name, "", Default::default())
        .await?;
    tracing::debug!(delay_queue = %name, "declared a delay queue");
    Ok(name)
}

/// Publishes `message` to `exchange` with `routing_key` after `delay`: it
/// waits in a broker-side delay queue (see [the worker docs on delay
/// queues](super#delay-queues)), so it survives a restart of the publisher,
/// and a persistent one a restart of the broker.
/// The returned future resolves once the delay queue holds the message
/// (publisher confirm). A message whose own `expiration` is shorter than
/// `delay` arrives when it expires instead.
///
/// Each call declares the delay queue (and its exchange and binding) before
/// publishing. Where the transport offers queue expiry, that queue expires
/// once unused for `delay + max(delay, DEFAULT_DELAY_LINGER)`, its exchange
/// with it, and a later call declares them again; a message is never
/// published to a queue that could expire before it is due. The delay is
/// kept to the millisecond. [`publish_delayed_with`] takes other
/// [`DelayOptions`].
///
/// With feature `otel`, the message carries the current span's trace
/// context unless it carries a `traceparent` already.
///
/// # Errors
/// [`Error::InvalidArgument`] for a zero delay or one over
/// [`MAX_TTL`]; [`Error::PreconditionFailed`] when a queue or exchange of
/// the delay queue's name exists with other settings (one declared by an
/// older version of this library: see [the worker docs on
/// upgrading](super#delay-queues));
/// whatever declaring or publishing reports, [`Error::Unroutable`] if the
/// delay queue was deleted between its declaration and the publish.
pub async fn publish_delayed(
    conn: &dyn Connection,
    exchange: &str,
    routing_key: &str,
    message: Message,
    delay: Duration,
) -> Result<()> {
    publish_delayed_with(
        conn,
        exchange,
        routing_key,
        message,
        delay,
        &DelayOptions::default(),
    )
    .await
}

/// [`publish_delayed`] with `options` for the delay queue.
///
/// # Errors
/// Those of [`publish_delayed`]; [`Error::InvalidArgument`] for a linger
/// out of range (see [`DelayOptions::linger`]).
pub async fn publish_delayed_with(
    conn: &dyn Connection,
    exchange: &str,
    routing_key: &str,
    message: Message,
    delay: Duration,
    options: &DelayOptions,
) -> Result<()> {
    let delay = check_delay(delay)?;
    let linger = options.linger_for(delay)?;
    let name = declare_delay(conn, DELAY_PREFIX, exchange, delay, linger).await?;
    conn.publish(&name, routing_key, message, PublishOptions::mandatory())
        .await
}

/// The delay queues one worker has declared, with when each declaration
/// was sent, so that a queue is declared again only once that declaration
/// may no longer be trusted (see the module docs).
#[derive(Debug)]
pub(crate) struct Delays {
    prefix: String,
    options: DelayOptions,
    declared: Mutex<HashMap<Duration, Instant>>,
}

impl Delays {
    pub(crate) fn new(prefix: String, options: DelayOptions) -> Self {
        Delays {
            prefix,
            options,
            declared: Mutex::new(HashMap::new()),
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
        let delay = check_delay(delay)?;
        let linger = self.options.linger_for(delay)?;
        // A declaration sent at `at` keeps the queue for at least
        // `delay + linger` after `at`; a message published before
        // `at + linger / 2` is due with half the linger to spare.
        let trusted = self
            .declared
            .lock()
            .get(&delay)
            .is_some_and(|at| at.elapsed() < linger / 2);
        let message = if trusted {
            let name = delay_name(&self.prefix, DEFAULT_EXCHANGE, delay);
            let copy = message.clone();
            match conn
                .publish(&name, routing_key, message, PublishOptions::mandatory())
                .await
            {
                // The queue or its exchange is gone all the same (deleted
                // by hand): declare them again and publish once more.
                Err(Error::Unroutable { message, .. }) => *message,
                Err(Error::NotFound(_)) => copy,
                done => return done,
            }
        } else {
            message
        };
        self.declared.lock().remove(&delay);
        let at = Instant::now();
        let name = declare_delay(conn, &self.prefix, DEFAULT_EXCHANGE, delay, linger).await?;
        self.declared.lock().insert(delay, at);
        conn.publish(&name, routing_key, message, PublishOptions::mandatory())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_linger_is_the_longer_of_the_delay_and_five_minutes() {
        let o = DelayOptions::default();
        let s = Duration::from_secs;
        assert_eq!(o.linger_for(s(1)).unwrap(), DEFAULT_DELAY_LINGER);
        assert_eq!(o.linger_for(s(3600)).unwrap(), s(3600));
        assert_eq!(expiry(s(1), DEFAULT_DELAY_LINGER), Some(s(301)));
        assert_eq!(expiry(s(3600), s(3600)), Some(s(7200)));
    }

    #[test]
    fn a_linger_out_of_range_is_refused() {
        for l in [Duration::ZERO, Duration::from_millis(99), MAX_TTL * 2] {
            let e = DelayOptions::default()
                .linger(l)
                .linger_for(Duration::from_secs(1));
            assert!(matches!(e, Err(Error::InvalidArgument(_))), "{l:?}: {e:?}");
        }
        let ok = DelayOptions::default().linger(MIN_DELAY_LINGER);
        assert_eq!(
            ok.linger_for(Duration::from_secs(1)).unwrap(),
            MIN_DELAY_LINGER
        );
    }

    #[test]
    fn expiry_is_whole_milliseconds_and_capped() {
        let d = check_delay(Duration::from_micros(1_500)).unwrap();
        assert_eq!(d, Duration::from_millis(1));
        assert_eq!(
            expiry(d, Duration::from_micros(100_700)),
            Some(Duration::from_millis(101))
        );
        assert_eq!(expiry(MAX_TTL, Duration::from_secs(1)), None);
        assert!(matches!(
            check_delay(Duration::ZERO),
            Err(Error::InvalidArgument(_))
        ));
    }
}
