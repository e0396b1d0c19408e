//! How an [`AmqpConnection`](crate::AmqpConnection) connects, replies and
//! recovers.

use std::fmt;
use std::time::Duration;

use crate::url::BrokerHost;

/// How [`reply_queue`](bus_core::Connection::reply_queue) receives replies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplyMode {
    /// RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`): no queue is
    /// declared, replies go straight to the requesting channel. The fast
    /// path, and what a legacy Python server answers without knowing.
    #[default]
    Direct,
    /// A server-named exclusive queue consumed with auto-ack, exactly as the
    /// legacy Python clients declare theirs.
    Classic,
}

/// Delays between reconnection attempts: exponential from `initial`, doubled
/// each time up to `max`, with up to 25 % of random jitter so that many
/// clients of one broker do not all come back at the same instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Delay before the second attempt (the first is immediate).
    pub initial: Duration,
    /// Longest delay between two attempts.
    pub max: Duration,
    /// Give up after this many failed attempts in a row; `None` never gives
    /// up. Once given up, the connection is closed and every operation fails
    /// with `ConnectionLost`.
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl ReconnectPolicy {
    /// Never reconnect: a lost connection is closed for good.
    #[must_use]
    pub fn disabled() -> Self {
        ReconnectPolicy {
            max_attempts: Some(0),
            ..Self::default()
        }
    }

    /// The delay before attempt `n` (0-based; attempt 0 has none), without
    /// jitter.
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Ack coalescing for manual-ack consumers ([`AmqpOptions::ack_coalescing`]):
/// instead of one `basic.ack` per [`Delivery::ack`](bus_core::Delivery::ack),
/// the consumer sends one `basic.ack` with `multiple` set once `max_acks`
/// acks are waiting or `max_delay` after the first of them, whichever comes
/// first, and whenever the consumer is cancelled, dropped or its connection
/// closed.
///
/// A coalesced ack only ever covers deliveries the application settled: it
/// goes up to the highest tag below which every delivery was acked (or
/// nacked, which is sent at once on its own). Acks above a delivery still
/// unsettled are sent one by one at the flush instead of being covered.
///
/// What changes for the application: [`Delivery::ack`](bus_core::Delivery::ack)
/// returns `Ok` once the ack is queued in the consumer's batch, not once its
/// frame is handed to the connection; until the flush, the message stays
/// unacked on the broker (it counts towards the prefetch, and a lost
/// channel requeues it). If a flush fails, the channel or connection is
/// gone and the broker has requeued every message whose ack had not been
/// sent: they are delivered again (with `redelivered` set), exactly as a
/// message whose uncoalesced ack frame was lost with the connection. The
/// failure is reported by the next `ack`/`nack` of that consumer's
/// deliveries (`Closed`), by [`Consumer::cancel`](bus_core::Consumer::cancel)
/// and by [`close`](bus_core::Connection::close) when they flush; a flush on
/// a timer or on drop has no caller and logs it (`tracing` warning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckCoalescing {
    /// Flush once this many acks are waiting (at least 1; 1 sends every
    /// ack at once, as without coalescing). Keep it below the consumer's
    /// prefetch: unflushed acks hold prefetch slots until `max_delay`.
    pub max_acks: u16,
    /// Flush at the latest this long after the first waiting ack.
    pub max_delay: Duration,
}

impl AckCoalescing {
    /// Flush every `max_acks` acks or after `max_delay`, whichever first.
    #[must_use]
    pub fn new(max_acks: u16, max_delay: Duration) -> Self {
        AckCoalescing {
            max_acks: max_acks.max(1),
            max_delay,
        }
    }
}

/// Options of an [`AmqpConnection`](crate::AmqpConnection), built from
/// [`Default`] with `#[must_use]` `with_*` methods.
///
/// ```
/// use std::time::Duration;
/// use bus_amqp::{AmqpOptions, ReconnectPolicy, ReplyMode};
///
/// let options = AmqpOptions::default()
///     .with_connection_name("billing-worker")
///     .with_reply_mode(ReplyMode::Classic)
///     .with_hosts([("rabbit-2", 5672), ("rabbit-3", 5672)])
///     .with_reconnect(ReconnectPolicy {
///         initial: Duration::from_millis(50),
///         max: Duration::from_secs(5),
///         max_attempts: None,
///     });
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpOptions {
    /// Shown by RabbitMQ (`rabbitmqctl list_connections name
    /// client_properties`, the management UI) as the connection's name.
    pub connection_name: Option<String>,
    /// How replies are received.
    pub reply_mode: ReplyMode,
    /// How a lost connection is re-established.
    pub reconnect: ReconnectPolicy,
    /// Cluster nodes tried after the URL's own hosts, in order.
    pub hosts: Vec<BrokerHost>,
    /// How long an operation started while the connection is being
    /// re-established waits for it before failing with `ConnectionLost`.
    pub recovery_wait: Duration,
    /// Heartbeat interval to ask for; the URL's `heartbeat=` wins. A dead
    /// peer behind a silent network is noticed after about two intervals.
    pub heartbeat: Duration,
    /// Time allowed to open one TCP connection and finish the AMQP
    /// handshake with one node before trying the next.
    pub connect_timeout: Duration,
    /// Extra certificate authorities, PEM, trusted for `amqps://` besides
    /// the bundled web roots (for a broker with a private CA).
    pub tls_ca_pem: Option<String>,
    /// A client certificate (PEM) and its private key (PKCS#8 PEM) for
    /// mutual TLS; the URL's `certfile` and `keyfile` win.
    pub tls_client_identity: Option<(String, String)>,
    /// The longest a publish may take, from the call to the broker's
    /// confirm, waiting for a reconnection or for the broker to lift a
    /// block included. Past it the publish fails with the temporary
    /// `Blocked` (the broker held publishers back the whole time and the
    /// message was not sent) or `Timeout` (sent, outcome unknown).
    pub publish_timeout: Duration,
    /// The longest a topology operation (declare, bind, delete, purge,
    /// inspect) may take, waiting for a reconnection or a lifted block
    /// included; past it, the temporary `Blocked` or `Timeout` as for
    /// [`AmqpOptions::publish_timeout`].
    pub operation_timeout: Duration,
    /// The largest message body this connection sends: a larger one is
    /// refused before sending with the permanent `PreconditionFailed`.
    /// RabbitMQ's own limit (`max_message_size`) is 128 MiB on 3.x and
    /// 16 MiB by default on 4.x; set this to the broker's. A lower limit
    /// the broker reveals by refusing a message is adopted by the
    /// connection from then on.
    pub max_message_size: u64,
    /// Coalesce the acks of this connection's manual-ack consumers
    /// ([`AckCoalescing`]); `None` (the default) sends each ack at once.
    pub ack_coalescing: Option<AckCoalescing>,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        AmqpOptions {
            connection_name: None,
            reply_mode: ReplyMode::Direct,
            reconnect: ReconnectPolicy::default(),
            hosts: Vec::new(),
            recovery_wait: Duration::from_secs(10),
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            tls_ca_pem: None,
            tls_client_identity: None,
            publish_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(30),
            max_message_size: 128 << 20,
            ack_coalescing: None,
        }
    }
}

impl fmt::Debug for AmqpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpOptions")
            .field("connection_name", &self.connection_name)
            .field("reply_mode", &self.reply_mode)
            .field("reconnect", &self.reconnect)
            .field("hosts", &self.hosts)
            .field("recovery_wait", &self.recovery_wait)
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "<pem>"))
            .field(
                "tls_client_identity",
                &self
                    .tls_client_identity
                    .as_ref()
                    .map(|_| "<certificate and key>"),
            )
            .field("publish_timeout", &self.publish_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("ack_coalescing", &self.ack_coalescing)
            .finish()
    }
}

impl AmqpOptions {
    /// Sets the connection name RabbitMQ shows.
    #[must_use]
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Sets how replies are received.
    #[must_use]
    pub fn with_reply_mode(mut self, mode: ReplyMode) -> Self {
        self.reply_mode = mode;
        self
    }

    /// Sets the reconnection policy.
    #[must_use]
    pub fn with_reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// Adds cluster nodes to try after the URL's hosts.
    #[must_use]
    pub fn with_hosts<H: Into<String>>(
        mut self,
        hosts: impl IntoIterator<Item = (H, u16)>,
    ) -> Self {
        self.hosts
            .extend(hosts.into_iter().map(|(h, p)| BrokerHost::new(h, p)));
        self
    }

    /// Sets how long operations wait for a reconnection.
    #[must_use]
    pub fn with_recovery_wait(mut self, wait: Duration) -> Self {
        self.recovery_wait = wait;
        self
    }

    /// Sets the heartbeat interval asked for (rounded to whole seconds;
    /// zero disables heartbeats).
    #[must_use]
    pub fn with_heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Sets the time allowed to connect to one node.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the longest a publish may take ([`AmqpOptions::publish_timeout`]).
    #[must_use]
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets the longest a topology operation may take
    /// ([`AmqpOptions::operation_timeout`]).
    #[must_use]
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets the largest message body sent ([`AmqpOptions::max_message_size`]).
    #[must_use]
    pub fn with_max_message_size(mut self, bytes: u64) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Coalesces consumers' acks: one `basic.ack` with `multiple` every
    /// `max_acks` acks or `max_delay`, whichever first ([`AckCoalescing`]).
    #[must_use]
    pub fn with_ack_coalescing(mut self, max_acks: u16, max_delay: Duration) -> Self {
        self.ack_coalescing = Some(AckCoalescing::new(max_acks, max_delay));
        self
    }

    /// Presents this client certificate (PEM) with its private key
    /// (PKCS#8 PEM) for mutual TLS.
    #[must_use]
    pub fn with_tls_client_identity(
        mut self,
        cert_pem: impl Into<String>,
        key_pem: impl Into<String>,
    ) -> Self {
        self.tls_client_identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Trusts these PEM certificate authorities for `amqps://`.
    #[must_use]
    pub fn with_tls_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let p = ReconnectPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_attempts: None,
        };
        let d: Vec<u128> = (0..7).map(|n| p.delay(n).as_millis()).collect();
        assert_eq!(d, vec![0, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(1));
    }
}
