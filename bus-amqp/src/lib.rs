//! RabbitMQ transport for the `bus` message library, through
//! [lapin](https://docs.rs/lapin) 4.
//!
//! [`AmqpConnection`] implements [`bus_core::Connection`] on one AMQP 0-9-1
//! connection: the whole transport contract (topology, publisher confirms,
//! consumers with prefetch and manual acknowledgements, direct reply-to),
//! plus recovery from lost connections. With the `amqp` feature of `bus`,
//! `bus::connect("amqp://...")` returns one.
//!
//! ```no_run
//! use bus_amqp::{AmqpConnection, AmqpOptions};
//! use bus_core::{ConnectionExt, Message, QueueOptions, Connection};
//!
//! # async fn run() -> bus_core::Result<()> {
//! let conn = AmqpConnection::connect_with(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     AmqpOptions::default().with_connection_name("billing"),
//! )
//! .await?;
//! conn.declare_queue("invoices", QueueOptions::durable()).await?;
//! conn.send_to_queue("invoices", Message::new("hello").persistent()).await?;
//! # Ok(()) }
//! ```
//!
//! # URLs
//!
//! `amqp[s]://[user[:password]@]host[:port][,host[:port]...][/vhost][?query]`
//! ([`AmqpUrl`]):
//!
//! * `amqp://guest:guest@127.0.0.1:5672/%2f`: the default virtual host `/`
//!   (written `%2f`); `amqp://host` also means `/`, `amqp://host/` the empty
//!   virtual host, `amqp://host/prod` the virtual host `prod`.
//! * `amqps://user:pw@rabbit.example.com/%2f`: TLS through rustls (ring),
//!   port 5671 by default, the bundled web roots plus a private CA from
//!   the URL's `cacertfile` or [`AmqpOptions::tls_ca_pem`], and a client
//!   certificate from `certfile`/`keyfile` or
//!   [`AmqpOptions::tls_client_identity`].
//! * `amqp://u:p@rabbit-1:5672,rabbit-2:5672,rabbit-3/%2f`: the nodes of a
//!   cluster, tried in order; the connection goes to the first that
//!   answers, and so does every reconnection. [`AmqpOptions::hosts`] adds
//!   nodes after the URL's.
//! * Query: `heartbeat` (seconds), `connection_timeout` (ms), `frame_max`,
//!   `channel_max`; for `amqps://`, the names of RabbitMQ's URI spec and
//!   Erlang client: `cacertfile` (PEM CA file trusted besides the web
//!   roots), `certfile` and `keyfile` (client certificate and PKCS#8 key,
//!   for mutual TLS), e.g.
//!   `amqps://u:p@rabbit/%2f?cacertfile=/etc/ca.pem&certfile=/etc/me.pem&keyfile=/etc/me.key`.
//!   The broker's certificate is always verified (`verify` is refused),
//!   against the node's host, or against `server_name_indication`, which
//!   is also the name sent in the handshake (SNI): for a node reached by
//!   IP address or through a tunnel whose certificate names its DNS name,
//!   `amqps://u:p@10.0.0.5/%2f?server_name_indication=rabbit.internal`.
//!   A client without a certificate where the broker requires one is
//!   refused permanently under TLS 1.2 and 1.3 alike (under 1.3 the
//!   broker's refusal can arrive as a bare reset after the handshake; the
//!   connection knows the broker asked for a certificate, and says so).
//!   A CA or
//!   certificate file that cannot be read, or holds no PEM certificate,
//!   is `InvalidArgument` naming it; a TLS handshake failure (untrusted
//!   certificate, client certificate refused) is permanent, not
//!   `is_temporary`.
//!
//! User and password are percent-decoded. They never appear in `Debug`
//! output, log lines or error messages: URLs are shown as
//! `amqp://***@host:port/vhost` ([`redact_url`]), and the credentials are
//! handed to the broker through a SASL PLAIN provider rather than through
//! the URL lapin logs at trace level.
//!
//! # Options
//!
//! [`AmqpOptions`]: the connection name RabbitMQ shows (`rabbitmqctl
//! list_connections name client_properties`), [`ReplyMode`] (direct
//! reply-to or a classic exclusive reply queue), the [`ReconnectPolicy`]
//! (exponential backoff with jitter, optionally bounded), extra cluster
//! nodes, how long operations wait for a reconnection
//! ([`AmqpOptions::recovery_wait`]), the heartbeat and the connect timeout.
//!
//! # Channels
//!
//! One connection multiplexes several channels, each used for one purpose
//! so that one user's trouble never reaches another:
//!
//! * **Topology** (declare, delete, bind, purge, passive checks) runs on one
//!   dedicated channel, one operation at a time. When the broker refuses an
//!   operation it closes that channel (`PRECONDITION_FAILED` 406,
//!   `NOT_FOUND` 404, `RESOURCE_LOCKED` 405, `ACCESS_REFUSED` 403); the
//!   operation fails with the matching [`bus_core::Error`] variant, with the
//!   queue or exchange and the argument the reply text names as its
//!   [`subject`](bus_core::Error::subject) and
//!   [`argument`](bus_core::Error::argument), and the next one opens a new
//!   channel. Publishers and consumers are untouched. An exchange type no
//!   enabled plugin provides ([`ExchangeKind::Custom`](bus_core::ExchangeKind::Custom))
//!   is the exception: RabbitMQ closes the whole connection over it
//!   (`COMMAND_INVALID` 503), the declaration fails with a permanent
//!   `NotSupported` naming the type, and the connection recovers.
//! * **Publishing** uses one channel in confirm mode shared by every
//!   publish: many are in flight at once and each call resolves on its own
//!   confirm. A mandatory message no queue takes is
//!   [`Error::Unroutable`](bus_core::Error::Unroutable) with the message
//!   handed back; a negative confirm (e.g. `x-overflow = reject-publish`)
//!   is `Nacked`, and the next publish goes out on a new channel (a
//!   channel that joined a quorum queue during its leader election can
//!   refuse everything while a new one publishes at once). A publish to
//!   an exchange not yet seen on this connection is preceded by a
//!   passive check on the topology channel, so a missing
//!   exchange is `NotFound` without closing the publisher channel. Should
//!   the broker close it anyway (an exchange deleted meanwhile), the
//!   publishes to that exchange get its error, every other publish in
//!   flight on it fails with the temporary `ConnectionLost` (never
//!   success), and the next publish opens a new channel. An `expiration`
//!   that is not a number and a `user_id` other than the connection's user,
//!   which RabbitMQ would also close the channel for, are refused before
//!   sending.
//! * **Each consumer** has its own channel with `basic.qos(prefetch)`, so
//!   consumers never hold up publishers and a slow consumer never holds up
//!   another. Dropping the [`Consumer`](bus_core::Consumer) closes its
//!   channel: the broker requeues what it had not settled, and settling one
//!   of its deliveries afterwards fails with `Closed`. After
//!   [`cancel`](bus_core::Consumer::cancel) the channel stays open until the
//!   consumer is dropped, so deliveries already received can be settled.
//!   Delivery tags keep growing across the channels a consumer goes through
//!   after recoveries. When the broker cancels a consumer itself
//!   (`basic.cancel`), because another client deleted its queue or for
//!   another reason, the stream yields one error saying why (`Closed`
//!   for a deleted queue, a temporary backend error when the queue is
//!   still there) and ends, with a [`RecoveryEvent::ConsumerCancelled`];
//!   a deleted queue is forgotten, so recovery never declares it again,
//!   and settling one of its deliveries fails with `Closed`. A queue this
//!   connection deleted itself just ends its consumers' streams.
//! * **Direct reply-to**: [`reply_queue`](bus_core::Connection::reply_queue)
//!   consumes `amq.rabbitmq.reply-to` with auto-ack on a channel of its
//!   own in confirm mode, and returns a publisher on that same channel
//!   (RabbitMQ requires requests to leave on the channel that consumes the
//!   replies). In [`ReplyMode::Classic`] it declares a server-named
//!   exclusive queue instead, as the legacy Python clients do.
//!
//! Field values and properties map losslessly both ways: every AMQP field
//! type has its own [`FieldValue`](bus_core::FieldValue) variant (both AMQP
//! string kinds read as `String`; a long string that is not UTF-8 reads as
//! `Bytes`), and every basic property round-trips.
//!
//! # Recovery
//!
//! When the connection is lost (a broker restart, `rabbitmqctl
//! close_connection`, a network cut noticed by the heartbeat), a
//! supervisor task:
//!
//! 1. reports [`RecoveryEvent::Disconnected`] (and a tracing event, as for
//!    every step below) on the broadcast of [`AmqpConnection::events`];
//! 2. reconnects with the [`ReconnectPolicy`] backoff, trying the nodes in
//!    order ([`RecoveryEvent::ReconnectFailed`] for each failed attempt,
//!    [`RecoveryEvent::GaveUp`] if the policy gives up: the connection is
//!    then closed and everything fails with `ConnectionLost`);
//! 3. declares again, in order, the exchanges, queues and bindings this
//!    connection declared and did not delete. A server-named queue gets a
//!    new name ([`RecoveryEvent::QueueRenamed`]); the connection keeps a map
//!    from the name the application holds (the first one) to the current
//!    one and applies it to every operation that names a queue, to the
//!    routing key of publishes through the default exchange and to
//!    `reply_to`, so the application keeps using the old name
//!    ([`AmqpConnection::current_queue_name`] tells the new one). Bindings
//!    follow their queue. A declaration the broker refuses is reported
//!    ([`RecoveryEvent::TopologyRecoveryFailed`]) and skipped;
//! 4. reports [`RecoveryEvent::Reconnected`], after which each consumer
//!    starts again on a new channel with the same tag and options
//!    ([`RecoveryEvent::ConsumerResumed`]). The application's
//!    [`Consumer`](bus_core::Consumer) stream goes on: what the broker
//!    requeued comes again with `redelivered` set; deliveries that were
//!    still buffered from the dead channel are dropped (they can no longer
//!    be settled, and come again). A consumer whose queue is gone ends its
//!    stream with the error ([`RecoveryEvent::ConsumerLost`]).
//!
//! What is in flight when the link drops never reports success:
//!
//! * a publish not yet confirmed fails with `ConnectionLost` (temporary: its
//!   outcome is unknown, a retry may duplicate it);
//! * an operation started while the link is down waits up to
//!   [`AmqpOptions::recovery_wait`] for it, then fails with
//!   `ConnectionLost`. This includes an operation started in the moments
//!   after the socket died but before the transport noticed: it is not
//!   failed on the dead link but waits for the next one. A publish whose
//!   message lapin had not finished writing when the link died is sent
//!   again on the next link (the broker cannot have it); one whose message
//!   was written is never sent again, its outcome being unknown;
//! * settling a delivery of the dead channel fails with the permanent
//!   `Closed` (the broker has requeued it);
//! * the direct reply-to consumer, and consumers of exclusive queues (which
//!   die with the connection, messages and all), yield one
//!   `Err(ConnectionLost)` item before going on, so an RPC client fails its
//!   calls in flight at once instead of waiting for their time-outs.
//!
//! # Limits
//!
//! * A message body over [`AmqpOptions::max_message_size`] (128 MiB by
//!   default, RabbitMQ 3.x's limit; 4.x defaults to 16 MiB) is refused
//!   before sending with the permanent `PreconditionFailed`. Should the
//!   broker's limit be lower, the broker closes the publisher channel
//!   (406): the oversized message fails with `PreconditionFailed`, the
//!   others in flight with the temporary `ConnectionLost` (retrying them
//!   succeeds), and the broker's limit is adopted for what follows.
//! * Each consumer holds a channel; a new consumer that would take one of
//!   the four channels kept for publishing and topology (of the
//!   negotiated `channel_max`) is refused with a temporary error naming
//!   `channel_max`, so publishing never starves.
//!
//! # RabbitMQ 4.x rules
//!
//! * Poison messages: [`QueueArguments::delivery_limit`](bus_core::QueueArguments::delivery_limit)
//!   writes an integer `x-delivery-limit` (quorum queues); a string value
//!   in the raw arguments, which RabbitMQ 3.x would silently ignore, is
//!   refused with `PreconditionFailed`, as are other known arguments of
//!   the wrong type.
//! * Settling one message with requeue (`nack`, `reject`) sends
//!   `basic.reject`, which 4.x quorum queues count towards the delivery
//!   limit; several at once (`nack_multiple`) send `basic.nack`.
//! * Prefetch is per consumer (`basic.qos` with `global = false`), never
//!   global QoS, which 4.x quorum queues refuse.
//! * [`ConsumeOptions::consumer_timeout`](bus_core::ConsumeOptions::consumer_timeout)
//!   asks for a per-consumer `x-consumer-timeout` where the broker has it;
//!   when the broker's consumer timeout closes the channel, the consumer
//!   starts again on a new channel of the same stream, with a
//!   [`RecoveryEvent::ConsumerResumed`]: the message comes again with
//!   `redelivered` set, and its ack on the closed channel fails with
//!   `Closed` naming the broker's 406 and its reason.
//!
//! # Flow control
//!
//! When RabbitMQ runs low on memory or disk it blocks the connections
//! that publish (`connection.blocked`) until the alarm clears. The
//! connection reports it ([`RecoveryEvent::Blocked`], then
//! [`RecoveryEvent::Unblocked`]), and while it lasts a publish or a
//! topology operation waits without sending anything, up to
//! [`AmqpOptions::publish_timeout`] or [`AmqpOptions::operation_timeout`]
//! (30 s by default), then fails with the temporary
//! [`Error::Blocked`](bus_core::Error::Blocked): nothing was sent, and a
//! publish the application gives up on (drops) is not sent later either.
//! The publish that meets the block (RabbitMQ blocks a connection when it
//! next publishes) has already been handed over: past its deadline it
//! fails with the temporary `Timeout`, its outcome unknown, and reaches
//! the queue once the alarm clears. Every publish and topology call ends
//! by its deadline, whatever the broker does.
//!
//! Recovery replays only what this connection declared. Durable queues and
//! persistent messages survive a broker restart by themselves; transient
//! queues come back empty.
//!
//! # A RabbitMQ cluster and quorum queues
//!
//! For high availability, run RabbitMQ as a cluster of three (or five)
//! nodes, list every node in the URL (`amqp://u:p@r1,r2,r3/%2f`) and
//! declare the queues that must survive the loss of a node as quorum
//! queues: durable, with `x-queue-type = quorum`
//! ([`QueueType::Quorum`](bus_core::QueueType::Quorum) in
//! [`QueueArguments`](bus_core::QueueArguments)). A quorum queue is
//! replicated with Raft on a majority of nodes; publish persistent messages
//! and treat a publish as done only once it returns (the confirm comes when
//! a majority has the message). When the node a client is connected to
//! goes down, the client reconnects to the next node that answers, declares
//! its topology again (a no-op for the quorum queues, which are still
//! there) and resumes its consumers. Quorum queues must be durable and
//! cannot be exclusive, and RabbitMQ 3.10 refuses `x-max-priority` on them
//! (all with `PreconditionFailed`). Exclusive and server-named queues live
//! on the node of their connection only.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod connection;
mod consume;
mod convert;
mod events;
mod journal;
mod link;
mod options;
mod publish;
mod tls;
mod url;

pub use bus_core::redact_url;
pub use connection::AmqpConnection;
pub use events::RecoveryEvent;
pub use options::{AckCoalescing, AmqpOptions, ReconnectPolicy, ReplyMode};
pub use url::{AmqpUrl, BrokerHost};

/// What every [`AmqpConnection`] offers: everything RabbitMQ does, with
/// `direct_reply` only in [`ReplyMode::Direct`]. The same value
/// [`Connection::capabilities`](bus_core::Connection::capabilities) returns
/// for a connection made with that reply mode.
#[must_use]
pub fn capabilities(reply_mode: ReplyMode) -> bus_core::Capabilities {
    let mut caps = bus_core::Capabilities::all("amqp");
    caps.direct_reply = reply_mode == ReplyMode::Direct;
    caps
}
