//! The transport contract: what every backend (in-process, RabbitMQ, folder)
//! implements, and what services program against.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::delivery::Consumer;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::topology::{
    DeleteExchangeOptions, DeleteQueueOptions, ExchangeKind, ExchangeOptions, QueueInfo,
    QueueOptions, DEFAULT_EXCHANGE,
};
use crate::value::FieldTable;

/// What a transport supports. Callers and the conformance suite read it; a
/// behaviour marked unsupported is reported as not applicable, never skipped
/// silently.
///
/// `#[non_exhaustive]`, so that a capability can be added: a transport
/// starts from [`Capabilities::all`] and turns off what it lacks, field by
/// field (`caps.durability = false`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The transport's name (`"local"`, `"amqp"`, `"file"`).
    pub name: &'static str,
    /// Exclusive queues, owned by one connection.
    pub exclusive_queues: bool,
    /// Auto-delete queues, removed when their last consumer leaves.
    pub auto_delete_queues: bool,
    /// Server-named queues (declare with an empty name).
    pub server_named_queues: bool,
    /// Headers exchanges.
    pub headers_exchange: bool,
    /// [`ExchangeKind::Custom`] declarations are passed to a broker, which
    /// accepts the types its plugins provide (`x-delayed-message`, ...).
    /// Without it every custom type is refused with
    /// [`Error::NotSupported`].
    pub plugin_exchange_kinds: bool,
    /// Per-queue and per-message TTL.
    pub message_ttl: bool,
    /// Queue expiry (`x-expires`).
    pub queue_expiry: bool,
    /// `x-max-length` and `x-max-length-bytes` with every overflow mode.
    pub max_length: bool,
    /// Dead-letter exchanges and `x-death`.
    pub dead_lettering: bool,
    /// Priority queues.
    pub priorities: bool,
    /// Single active consumer.
    pub single_active_consumer: bool,
    /// Mandatory publishes come back as [`Error::Unroutable`].
    pub mandatory: bool,
    /// Messages in durable queues survive a restart of the transport.
    pub durability: bool,
    /// Several processes can share one broker.
    pub cross_process: bool,
    /// Quorum queues (`x-queue-type: quorum`).
    pub quorum_queues: bool,
    /// A quorum queue's delivery count and limit, as RabbitMQ's: each
    /// return of a message to its queue counts, a redelivery carries
    /// `x-delivery-count`, and a message returned more times than the
    /// queue's `x-delivery-limit` is dead-lettered (reason
    /// `delivery_limit`) or dropped. A transport without it refuses
    /// `x-delivery-limit` rather than ignore it.
    pub delivery_limit: bool,
    /// [`Connection::reply_queue`] needs no queue declaration (RabbitMQ's
    /// direct reply-to or an equivalent).
    pub direct_reply: bool,
    /// Exact consumer count and message count in [`QueueInfo`].
    pub exact_counts: bool,
    /// A connection the broker drops comes back by itself: it reconnects,
    /// declares its topology again and resumes its consumers, reporting
    /// each step as a [`RecoveryEvent`](crate::RecoveryEvent).
    pub recovery: bool,
}

impl Capabilities {
    /// Every capability on, under the transport's `name`: the starting point
    /// for a transport that then turns off what it lacks, so that each one
    /// states only its differences.
    #[must_use]
    pub fn all(name: &'static str) -> Self {
        Capabilities {
            name,
            exclusive_queues: true,
            auto_delete_queues: true,
            server_named_queues: true,
            headers_exchange: true,
            plugin_exchange_kinds: true,
            message_ttl: true,
            queue_expiry: true,
            max_length: true,
            dead_lettering: true,
            priorities: true,
            single_active_consumer: true,
            mandatory: true,
            durability: true,
            cross_process: true,
            quorum_queues: true,
            delivery_limit: true,
            direct_reply: true,
            exact_counts: true,
            recovery: true,
        }
    }
}

/// Options of a publish: `PublishOptions::default()` or
/// [`PublishOptions::mandatory`] (`#[non_exhaustive]`, so that options can be
/// added).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishOptions {
    /// Fail with [`Error::Unroutable`] (handing the message back) when no
    /// queue receives the message, instead of dropping it.
    pub mandatory: bool,
}

impl PublishOptions {
    /// Mandatory: an unroutable message is an error.
    #[must_use]
    pub fn mandatory() -> Self {
        PublishOptions { mandatory: true }
    }

    /// Sets [`PublishOptions::mandatory`].
    #[must_use]
    pub fn with_mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }
}

/// Options of a consumer.
///
/// Built from [`ConsumeOptions::prefetch`], [`ConsumeOptions::auto_ack`] or
/// `default()` and setters, which is how code outside this crate makes one
/// (the struct is `#[non_exhaustive]`): `with_<field>` sets an option, a
/// setter named after a consumer argument (`consumer_timeout`, `priority`)
/// adds that argument.
///
/// ```
/// use bus_core::ConsumeOptions;
/// let options = ConsumeOptions::prefetch(10).with_tag("billing-1").priority(5);
/// assert_eq!(options.consumer_tag.as_deref(), Some("billing-1"));
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ConsumeOptions {
    /// The most unacked deliveries this consumer holds at once; 0 means
    /// unlimited. Ignored by auto-ack consumers, as in RabbitMQ.
    pub prefetch: u16,
    /// Deliveries count as acked when sent; [`Delivery::ack`](crate::Delivery::ack) is
    /// then a no-op and [`Delivery::nack`](crate::Delivery::nack) an error.
    pub auto_ack: bool,
    /// Be the queue's only consumer. Refused with
    /// [`Error::AccessRefused`] when the queue has consumers already, and
    /// while it lasts every other consumer is refused the same way
    /// (RabbitMQ: "queue ... in exclusive use", 403). Not to be confused
    /// with an exclusive *queue*, whose other connections get
    /// [`Error::ResourceLocked`].
    pub exclusive: bool,
    /// A tag to identify the consumer; generated when `None`.
    pub consumer_tag: Option<String>,
    /// Consumer arguments (e.g. `x-priority`).
    pub arguments: FieldTable,
}

impl ConsumeOptions {
    /// Manual acks with this prefetch.
    #[must_use]
    pub fn prefetch(n: u16) -> Self {
        ConsumeOptions {
            prefetch: n,
            ..Self::default()
        }
    }

    /// Asks the broker to give this consumer `timeout` to settle each
    /// delivery (the `x-consumer-timeout` consumer argument, in whole
    /// milliseconds), e.g. longer than the 30-minute default for long GPU
    /// jobs. Honoured where the broker supports a per-consumer timeout
    /// (RabbitMQ 4.x quorum queues); RabbitMQ 3.10 ignores the argument
    /// and applies its node-wide `consumer_timeout`. When the timeout
    /// passes, RabbitMQ closes the consumer's channel and requeues what it
    /// held; the RabbitMQ transport then starts the consumer again on a
    /// new channel of the same stream, where the message comes again
    /// (`redelivered`), and settling the stale delivery returns an error.
    #[must_use]
    pub fn consumer_timeout(self, timeout: std::time::Duration) -> Self {
        let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        self.argument("x-consumer-timeout", crate::FieldValue::I64(ms))
    }

    /// Auto-ack, unlimited prefetch.
    #[must_use]
    pub fn auto_ack() -> Self {
        ConsumeOptions {
            auto_ack: true,
            ..Self::default()
        }
    }

    /// Sets the consumer tag.
    #[must_use]
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.consumer_tag = Some(tag.into());
        self
    }

    /// Sets [`ConsumeOptions::prefetch`].
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets [`ConsumeOptions::auto_ack`].
    #[must_use]
    pub fn with_auto_ack(mut self, auto_ack: bool) -> Self {
        self.auto_ack = auto_ack;
        self
    }

    /// Sets [`ConsumeOptions::exclusive`].
    #[must_use]
    pub fn with_exclusive(mut self, exclusive: bool) -> Self {
        self.exclusive = exclusive;
        self
    }

    /// Replaces [`ConsumeOptions::arguments`].
    #[must_use]
    pub fn with_arguments(mut self, arguments: FieldTable) -> Self {
        self.arguments = arguments;
        self
    }

    /// `x-priority`: among a queue's consumers with room, those of the
    /// highest priority receive first (RabbitMQ's consumer priorities).
    #[must_use]
    pub fn priority(self, priority: i32) -> Self {
        self.argument("x-priority", priority)
    }

    /// Adds (or replaces) the consumer argument `name`.
    #[must_use]
    pub fn argument(
        mut self,
        name: impl Into<String>,
        value: impl Into<crate::FieldValue>,
    ) -> Self {
        self.arguments.insert(name.into(), value.into());
        self
    }
}

/// A handle to a transport: the AMQP connection of this library.
///
/// Exclusive queues belong to the connection that declared them. Closing or
/// dropping the connection (or the process dying) removes them and requeues
/// every delivery its consumers had not settled, with `redelivered` set.
///
/// Every method checks its input first: a name that is too long, a reserved
/// `amq.` name, arguments of the wrong type, or a different redeclaration
/// fails with an error and changes nothing.
///
/// Use it as `Arc<dyn Connection>`, or any `Arc<C>` or `Box<C>` of a
/// connection `C`, which are connections too; [`ConnectionExt`] adds
/// conveniences.
///
/// # The methods as `async fn`
///
/// The trait is written with `#[async_trait]`, so each `async fn` below
/// appears in these docs with the boxed future it returns
/// (`Pin<Box<dyn Future<Output = ...> + Send + 'async_trait>>`). An
/// implementation, here a wrapper that forwards to another connection,
/// writes them as `async fn`:
///
/// ```
/// use std::sync::Arc;
/// use bus_core::{
///     Capabilities, Connection, ConsumeOptions, Consumer, DeleteExchangeOptions,
///     DeleteQueueOptions, ExchangeKind, ExchangeOptions, FieldTable, Message, PublishOptions,
///     QueueInfo, QueueOptions, ReplyQueue, Result,
/// };
///
/// #[derive(Debug)]
/// struct Forward(Arc<dyn Connection>);
///
/// #[async_trait::async_trait]
/// impl Connection for Forward {
///     fn capabilities(&self) -> Capabilities {
/// #       self.0.capabilities()
///     }
///     async fn declare_exchange(
///         &self, name: &str, kind: ExchangeKind, options: ExchangeOptions,
///     ) -> Result<()> {
/// #       self.0.declare_exchange(name, kind, options).await
///     }
///     async fn delete_exchange(&self, name: &str, options: DeleteExchangeOptions) -> Result<()> {
/// #       self.0.delete_exchange(name, options).await
///     }
///     async fn declare_queue(&self, name: &str, options: QueueOptions) -> Result<QueueInfo> {
/// #       self.0.declare_queue(name, options).await
///     }
///     async fn delete_queue(&self, name: &str, options: DeleteQueueOptions) -> Result<u32> {
/// #       self.0.delete_queue(name, options).await
///     }
///     async fn purge_queue(&self, name: &str) -> Result<u32> {
/// #       self.0.purge_queue(name).await
///     }
///     async fn bind_queue(
///         &self, queue: &str, exchange: &str, routing_key: &str, arguments: FieldTable,
///     ) -> Result<()> {
/// #       self.0.bind_queue(queue, exchange, routing_key, arguments).await
///     }
///     async fn unbind_queue(
///         &self, queue: &str, exchange: &str, routing_key: &str, arguments: FieldTable,
///     ) -> Result<()> {
/// #       self.0.unbind_queue(queue, exchange, routing_key, arguments).await
///     }
///     async fn bind_exchange(
///         &self, destination: &str, source: &str, routing_key: &str, arguments: FieldTable,
///     ) -> Result<()> {
/// #       self.0.bind_exchange(destination, source, routing_key, arguments).await
///     }
///     async fn unbind_exchange(
///         &self, destination: &str, source: &str, routing_key: &str, arguments: FieldTable,
///     ) -> Result<()> {
/// #       self.0.unbind_exchange(destination, source, routing_key, arguments).await
///     }
///     async fn publish(
///         &self, exchange: &str, routing_key: &str, message: Message, options: PublishOptions,
///     ) -> Result<()> {
/// #       self.0.publish(exchange, routing_key, message, options).await
///     }
///     async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Consumer> {
/// #       self.0.consume(queue, options).await
///     }
///     async fn reply_queue(&self) -> Result<ReplyQueue> {
/// #       self.0.reply_queue().await
///     }
///     async fn close(&self) -> Result<()> {
/// #       self.0.close().await
///     }
///     fn is_open(&self) -> bool {
/// #       self.0.is_open()
///     }
/// }
/// ```
#[async_trait]
pub trait Connection: fmt::Debug + Send + Sync + 'static {
    /// What this transport supports.
    fn capabilities(&self) -> Capabilities;

    /// Declares an exchange, or checks it when `options.passive`.
    ///
    /// # Errors
    /// `PreconditionFailed` if it exists with another kind or options;
    /// `NotFound` for a passive declare of a missing one; `AccessRefused` for
    /// a new `amq.` name or the default exchange.
    async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
    ) -> Result<()>;

    /// Deletes an exchange and its bindings: those it is the source of and
    /// those it is the destination of (exchange-to-exchange bindings). An
    /// auto-delete exchange left without bindings by that is deleted too.
    ///
    /// Deleting an exchange that does not exist succeeds, as in RabbitMQ.
    ///
    /// # Errors
    /// `PreconditionFailed` with [`DeleteExchangeOptions::if_unused`] when
    /// it has bindings; `AccessRefused` for the default or `amq.` exchanges.
    async fn delete_exchange(&self, name: &str, options: DeleteExchangeOptions) -> Result<()>;

    /// Declares a queue (an empty name asks for a generated one), or checks
    /// it when `options.passive`, and reports its name and counts.
    ///
    /// # Errors
    /// `PreconditionFailed` if it exists with other settings (durable,
    /// auto-delete, arguments) or an argument has the wrong type or value;
    /// `ResourceLocked` if it is exclusive to another connection, or its
    /// exclusive flag differs from this declaration; `NotFound` for a
    /// passive declare of a missing one; `AccessRefused` for a new `amq.`
    /// name.
    async fn declare_queue(&self, name: &str, options: QueueOptions) -> Result<QueueInfo>;

    /// Deletes a queue; its messages are gone, its consumers are cancelled
    /// (their streams end). Returns the number of ready messages it held.
    /// Deleting a queue that does not exist succeeds with 0, as in RabbitMQ.
    ///
    /// # Errors
    /// `PreconditionFailed` when `if_unused` or `if_empty` does not hold;
    /// `ResourceLocked` for an exclusive queue of another connection.
    async fn delete_queue(&self, name: &str, options: DeleteQueueOptions) -> Result<u32>;

    /// Removes the ready messages of a queue (not the unacked ones) and
    /// returns how many there were.
    ///
    /// # Errors
    /// `NotFound` for a missing queue (unlike deletion, as in RabbitMQ);
    /// `ResourceLocked` for an exclusive queue of another connection.
    async fn purge_queue(&self, name: &str) -> Result<u32>;

    /// Binds a queue to an exchange. Binding the same queue, exchange, key
    /// and arguments again is a no-op.
    ///
    /// # Errors
    /// `NotFound` if either is missing; `AccessRefused` for the default
    /// exchange; `ResourceLocked` for an exclusive queue of another
    /// connection; `PreconditionFailed` for binding arguments the exchange
    /// refuses (an unknown `x-match`).
    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()>;

    /// Removes a binding; routing through it stops at once.
    ///
    /// Removing a binding, queue or exchange that does not exist succeeds,
    /// as in RabbitMQ.
    ///
    /// # Errors
    /// `AccessRefused` for the default exchange.
    async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()>;

    /// Binds exchange `destination` to exchange `source` (RabbitMQ's
    /// `exchange.bind` extension): messages `source` routes through this
    /// binding go on to be routed by `destination`, as a queue binding with
    /// the same key and arguments would take them. Binding the same
    /// destination, source, key and arguments again is a no-op.
    ///
    /// Routing follows such bindings through any number of exchanges, each
    /// exchange routing a message at most once (so loops of bindings end),
    /// and a queue reached along several paths receives one copy.
    ///
    /// # Errors
    /// `NotFound` if either exchange is missing; `AccessRefused` when either
    /// is the default exchange; `PreconditionFailed` for binding arguments
    /// the source refuses (an unknown `x-match` on a headers exchange).
    async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()>;

    /// Removes an exchange-to-exchange binding; routing through it stops at
    /// once. An auto-delete source left without bindings is deleted.
    ///
    /// Removing a binding or exchange that does not exist succeeds, as in
    /// RabbitMQ.
    ///
    /// # Errors
    /// `AccessRefused` when either exchange is the default exchange.
    async fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()>;

    /// Publishes a message. Resolves only once the transport has taken
    /// responsibility for it (the publisher confirm; for a persistent message
    /// in a durable queue, on disk).
    ///
    /// With feature `otel`, the message first gets the current span's W3C
    /// trace context in its headers, unless it carries a `traceparent`
    /// already ([`propagation::trace`](crate::propagation::trace), which
    /// every transport calls first).
    ///
    /// # Errors
    /// `NotFound` for a missing exchange; `AccessRefused` for an internal
    /// one; `PreconditionFailed` for an `expiration` that is not a number of
    /// milliseconds up to [`MAX_TTL`](crate::MAX_TTL); [`Error::Unroutable`]
    /// for a mandatory message no queue took; `Nacked` when the transport
    /// refused it; `ConnectionLost` when the outcome is unknown.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        options: PublishOptions,
    ) -> Result<()>;

    /// Publishes at once, without a future, for a transport that confirms
    /// without waiting (the in-process broker): [`PublishNow::Done`] with
    /// what [`Connection::publish`] would have returned, the publish done;
    /// [`PublishNow::Wait`] with the message untouched when the transport
    /// has to wait (the caller then awaits [`Connection::publish`]). The
    /// default hands every message back, so a wrapper that does not
    /// override it keeps its own `publish` in the path.
    fn publish_now(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        options: PublishOptions,
    ) -> PublishNow {
        let _ = (exchange, routing_key, options);
        PublishNow::Wait(message)
    }

    /// Starts a consumer on a queue.
    ///
    /// # Errors
    /// `NotFound` for a missing queue; `ResourceLocked` for an exclusive
    /// queue of another connection; `AccessRefused` when the queue has an
    /// exclusive consumer, or when an exclusive consumer is asked for and the
    /// queue has consumers (RabbitMQ: "in exclusive use", 403);
    /// `PreconditionFailed` for a consumer argument of the wrong type (an
    /// `x-priority` that is not an integer).
    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Consumer>;

    /// Opens a private queue for replies, consumed with auto-ack.
    ///
    /// Transports with a native reply path (RabbitMQ's direct reply-to) use
    /// it and return a publisher that requests must go through; the others
    /// call [`classic_reply_queue`].
    async fn reply_queue(&self) -> Result<ReplyQueue>;

    /// Closes the connection: consumers end, unacked deliveries are requeued,
    /// exclusive queues are deleted. Later calls fail with `Closed`.
    async fn close(&self) -> Result<()>;

    /// Whether the connection is open (or recovering) and usable.
    fn is_open(&self) -> bool;
}

/// What [`Connection::publish_now`] did with a message.
#[derive(Debug)]
// The message is handed back as it came: boxing it would allocate on the
// path this exists to keep free of allocations.
#[allow(clippy::large_enum_variant)]
pub enum PublishNow {
    /// Published: the outcome [`Connection::publish`] would have returned.
    Done(Result<()>),
    /// Not published: the transport has to wait; here is the message back.
    Wait(Message),
}

/// Conveniences over any [`Connection`], implemented for every one
/// (`Arc<dyn Connection>` included).
///
/// Each method returns a plain `impl Future + Send` that holds the
/// connection's own future: nothing is boxed beyond the connection's call.
pub trait ConnectionExt: Connection {
    /// Passive queue declaration: the queue's counts.
    ///
    /// # Errors
    /// `NotFound` if the queue is missing; `ResourceLocked` if it is
    /// exclusive to another connection.
    fn inspect_queue(&self, name: &str) -> impl Future<Output = Result<QueueInfo>> + Send {
        async move { self.declare_queue(name, QueueOptions::passive()).await }
    }

    /// Whether an exchange exists (a passive declaration).
    ///
    /// The default exchange `""` always exists: this answers `true` for it
    /// without asking the transport, where RabbitMQ would refuse the passive
    /// declaration (`ACCESS_REFUSED`).
    ///
    /// # Errors
    /// Whatever the passive declaration reports other than `NotFound`
    /// (`Closed`, `ConnectionLost`, an invalid name).
    fn exchange_exists(&self, name: &str) -> impl Future<Output = Result<bool>> + Send {
        async move {
            if name == DEFAULT_EXCHANGE {
                return Ok(true);
            }
            match self
                .declare_exchange(name, ExchangeKind::Direct, ExchangeOptions::passive())
                .await
            {
                Ok(()) => Ok(true),
                Err(Error::NotFound(_)) => Ok(false),
                Err(e) => Err(e),
            }
        }
    }

    /// Publishes through the default exchange straight to a queue (not
    /// mandatory: a message for a missing queue is dropped, as in AMQP).
    /// With feature `otel`, the message carries the current span's trace
    /// context unless it carries a `traceparent` already.
    ///
    /// # Errors
    /// As [`Connection::publish`].
    fn send_to_queue(
        &self,
        queue: &str,
        message: Message,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            match self.publish_now(DEFAULT_EXCHANGE, queue, message, PublishOptions::default()) {
                PublishNow::Done(done) => done,
                PublishNow::Wait(message) => {
                    let options = PublishOptions::default();
                    Connection::publish(self, DEFAULT_EXCHANGE, queue, message, options).await
                }
            }
        }
    }
}

impl<C: Connection + ?Sized> ConnectionExt for C {}

/// Sends messages. Every [`Connection`] is one (`Arc<dyn Connection>`
/// included, so `Arc::new(conn) as Arc<dyn Publisher>` works); a
/// [`ReplyQueue`] may carry its own.
///
/// With both traits in scope, `conn.publish(..)` on a connection is
/// ambiguous (the two methods are the same); write
/// `Connection::publish(&conn, ..)`, or import only one of them.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// As [`Connection::publish`].
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        options: PublishOptions,
    ) -> Result<()>;
}

/// A private queue for replies: the address to put in `reply_to`, the
/// consumer that receives the replies (auto-ack), and, where the transport
/// requires it, the publisher requests must be sent through.
pub struct ReplyQueue {
    /// The value for the `reply_to` property.
    pub address: String,
    /// Receives the replies.
    pub consumer: Consumer,
    /// When set, requests expecting replies here must be published through
    /// it (RabbitMQ's direct reply-to needs the same channel).
    pub publisher: Option<Arc<dyn Publisher>>,
}

impl fmt::Debug for ReplyQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyQueue")
            .field("address", &self.address)
            .field("consumer", &self.consumer)
            .field("own_publisher", &self.publisher.is_some())
            .finish()
    }
}

/// The portable reply queue: a server-named exclusive queue consumed with
/// auto-ack, as the legacy RPC clients declare it.
///
/// # Errors
/// Whatever declaring or consuming the queue reports.
pub async fn classic_reply_queue<C: Connection + ?Sized>(conn: &C) -> Result<ReplyQueue> {
    let info = conn
        .declare_queue(
            "",
            QueueOptions {
                exclusive: true,
                ..QueueOptions::default()
            },
        )
        .await?;
    let consumer = conn.consume(&info.name, ConsumeOptions::auto_ack()).await?;
    Ok(ReplyQueue {
        address: info.name,
        consumer,
        publisher: None,
    })
}

/// Every connection publishes as [`Connection::publish`], handing back the
/// connection's own future (written out rather than with `#[async_trait]`,
/// which would box it a second time).
impl<C: Connection + ?Sized> Publisher for C {
    fn publish<'a, 'b, 'c, 'r>(
        &'a self,
        exchange: &'b str,
        routing_key: &'c str,
        message: Message,
        options: PublishOptions,
    ) -> BoxFuture<'r, Result<()>>
    where
        'a: 'r,
        'b: 'r,
        'c: 'r,
        Self: 'r,
    {
        Connection::publish(self, exchange, routing_key, message, options)
    }
}

/// `Connection` for the smart pointers connections live in, forwarding every
/// method to the connection inside and handing back its own future (written
/// out rather than with `#[async_trait]`, which would box it a second time).
macro_rules! forward_connection {
    ($($pointer:ident),*) => {$(
        impl<C: Connection + ?Sized> Connection for $pointer<C> {
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }

            fn declare_exchange<'a, 'b, 'r>(
                &'a self,
                name: &'b str,
                kind: ExchangeKind,
                options: ExchangeOptions,
            ) -> BoxFuture<'r, Result<()>>
            where
                'a: 'r,
                'b: 'r,
                Self: 'r,
            {
                (**self).declare_exchange(name, kind, options)
            }

            fn delete_exchange<'a, 'b, 'r>(
                &'a self,
                name: &'b str,
                options: DeleteExchangeOptions,
            ) -> BoxFuture<'r, Result<()>>
            where
                'a: 'r,
                'b: 'r,
                Self: 'r,
            {
                (**self).delete_exchange(name, options)
            }

            fn declare_queue<'a, 'b, 'r>(
                &'a self,
                name: &'b str,
                options: QueueOptions,
            ) -> BoxFuture<'r, Result<QueueInfo>>
            where
                'a: 'r,
                'b: 'r,
                Self: 'r,
            {
                (**self).declare_queue(name, options)
            }

            fn delete_queue<'a, 'b, 'r>(
                &'a self,
                name: &'b str,
                options: DeleteQueueOptions,
            ) -> BoxFuture<'r, Result<u32>>
            where
                'a: 'r,
                'b: 'r,
                Self: 'r,
            {
                (**self).delete_queue(name, options)
            }

            fn purge_queue<'a, 'b, 'r>(&'a self, name: &'b str) -> BoxFuture<'r, Result<u32>>
            where
                'a: 'r,
                'b: 'r,
                Self: 'r,
            {
                (**self).purge_queue(name)
            }

            fn bind_queue<'a, 'b, 'c, 'd, 'r>(
                &'a self,
                queue: &'b str,
                exchange: &'c str,
                routing_key: &'d str,
                arguments: FieldTable,
            ) -> BoxFuture<'r, Result<()>>
            where
                'a: 'r,
                'b: 'r,
                'c: 'r,
                'd: 'r,
                Self: 'r,
            {
                (**self).bind_queue(queue, exchange, routing_key, arguments)
            }

            fn unbind_queue<'a, 'b, 'c, 'd, 'r>(
                &'a self,
                queue: &'b str,
                exchange: &'c str,
                routing_key: &'d str,
                arguments: FieldTable,
            ) -> BoxFuture<'r, Result<()>>
            where
                'a: 'r,
                'b: 'r,
                'c: 'r,
                'd: 'r,
                Self: 'r,
            {
                (**self).unbind_queue(queue, exchange, routing_key, arguments)
            }

            fn bind_exchange<'a, 'b, 'c, 'd, 'r>(
                &'a self,
                destination: &'b str,
                source: &'c str,
                routing_key: &'d str,
                arguments: FieldTable,
            ) -> BoxFuture<'r, Result<()>>
            where
                'a: 'r,
                'b: 'r,
                'c: 'r,
                'd: 'r,
                Self: 'r,
            {
                (**self).bind_exchange(destination, source, routing_key, arguments)
            }

            fn unbind_exchange<'a, 'b, 'c, 'd, 'r>(
                &'a self,
                destination: &'b str,
                source: &'c str,
                routing_key: &'d str,
                arguments: FieldTable,
            ) -> BoxFuture<'r, Result<()>>
            where
                'a: 'r,
                'b: 'r,
                'c: 'r,
                'd: 'r,
                Self: 'r,
            {
                (**self).unbind_exchange(destination, source, routing_key, arguments)
            }

            fn publish<'a, 'b, 'c, 'r>(
                &'a self,
                exchange: &'b str,
                routing_key: &'c str,
                message: Message,
                options: PublishOptions,
            ) -> BoxFuture<'r, Result<()>>
            where
                'a: 'r,
                'b: 'r,
                'c: 'r,
                Self: 'r,
            {
                Connection::publish(&**self, exchange, routing_key, message, options)
            }

            fn publish_now(
                &self,
                exchange: &str,
                routing_key: &str,
                message: Message,
                options: PublishOptions,
            ) -> PublishNow {
                Connection::publish_now(&**self, exchange, routing_key, message, options)
            }

            fn consume<'a, 'b, 'r>(
                &'a self,
                queue: &'b str,
                options: ConsumeOptions,
            ) -> BoxFuture<'r, Result<Consumer>>
            where
                'a: 'r,
                'b: 'r,
                Self: 'r,
            {
                (**self).consume(queue, options)
            }

            fn reply_queue<'a, 'r>(&'a self) -> BoxFuture<'r, Result<ReplyQueue>>
            where
                'a: 'r,
                Self: 'r,
            {
                (**self).reply_queue()
            }

            fn close<'a, 'r>(&'a self) -> BoxFuture<'r, Result<()>>
            where
                'a: 'r,
                Self: 'r,
            {
                (**self).close()
            }

            fn is_open(&self) -> bool {
                (**self).is_open()
            }
        }
    )*};
}

forward_connection!(Arc, Box);
