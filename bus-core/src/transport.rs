//! The transport contract: what every backend (in-process, RabbitMQ, folder)
//! implements, and what services program against.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::Stream;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::topology::{DeleteQueueOptions, ExchangeKind, ExchangeOptions, QueueInfo, QueueOptions};
use crate::value::FieldTable;

/// What a transport supports. Callers and the conformance suite read it; a
/// behaviour marked unsupported is reported as not applicable, never skipped
/// silently.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// [`Connection::reply_queue`] needs no queue declaration (RabbitMQ's
    /// direct reply-to or an equivalent).
    pub direct_reply: bool,
    /// Exact consumer count and message count in [`QueueInfo`].
    pub exact_counts: bool,
}

/// Options of a publish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
}

/// Options of a consumer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConsumeOptions {
    /// The most unacked deliveries this consumer holds at once; 0 means
    /// unlimited.
    pub prefetch: u16,
    /// Deliveries count as acked when sent; [`Delivery::ack`] is then a no-op.
    pub auto_ack: bool,
    /// Be the queue's only consumer (`ACCESS_REFUSED` if it has others).
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
/// Use it as `Arc<dyn Connection>`; [`ConnectionExt`] adds conveniences.
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

    /// Deletes an exchange and its bindings.
    ///
    /// Deleting an exchange that does not exist succeeds, as in RabbitMQ.
    ///
    /// # Errors
    /// `PreconditionFailed` with `if_unused` when it has bindings;
    /// `AccessRefused` for the default or `amq.` exchanges.
    async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<()>;

    /// Declares a queue (an empty name asks for a generated one), or checks
    /// it when `options.passive`, and reports its name and counts.
    ///
    /// # Errors
    /// `PreconditionFailed` if it exists with other settings;
    /// `ResourceLocked` if it is exclusive to another connection; `NotFound`
    /// for a passive declare of a missing one; `AccessRefused` for `amq.`.
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
    async fn purge_queue(&self, name: &str) -> Result<u32>;

    /// Binds a queue to an exchange. Binding the same queue, exchange, key
    /// and arguments again is a no-op.
    ///
    /// # Errors
    /// `NotFound` if either is missing; `AccessRefused` for the default
    /// exchange.
    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()>;

    /// Removes a binding; routing through it stops at once.
    async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()>;

    /// Publishes a message. Resolves only once the transport has taken
    /// responsibility for it (the publisher confirm; for a persistent message
    /// in a durable queue, on disk).
    ///
    /// # Errors
    /// `NotFound` for a missing exchange; [`Error::Unroutable`] for a
    /// mandatory message no queue took; `Nacked` when the transport refused
    /// it; `ConnectionLost` when the outcome is unknown.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        options: PublishOptions,
    ) -> Result<()>;

    /// Starts a consumer on a queue.
    ///
    /// # Errors
    /// `NotFound` for a missing queue; `ResourceLocked` for an exclusive
    /// queue of another connection; `AccessRefused` when the queue has an
    /// exclusive consumer, or when an exclusive consumer is asked for and the
    /// queue has consumers (RabbitMQ: "in exclusive use", 403).
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

/// Conveniences over any [`Connection`].
#[async_trait]
pub trait ConnectionExt: Connection {
    /// Passive queue declaration: the queue's counts, `NotFound` if missing.
    async fn inspect_queue(&self, name: &str) -> Result<QueueInfo> {
        self.declare_queue(name, QueueOptions::passive()).await
    }

    /// Whether an exchange exists (a passive declaration).
    async fn exchange_exists(&self, name: &str) -> Result<bool> {
        match self
            .declare_exchange(name, ExchangeKind::Direct, ExchangeOptions::passive())
            .await
        {
            Ok(()) => Ok(true),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Publishes through the default exchange straight to a queue.
    async fn send_to_queue(&self, queue: &str, message: Message) -> Result<()> {
        self.publish("", queue, message, PublishOptions::default())
            .await
    }
}

impl<C: Connection + ?Sized> ConnectionExt for C {}

/// Settles deliveries for one transport. Implemented by transports; users
/// call the methods on [`Delivery`] instead.
#[async_trait]
pub trait Acknowledger: Send + Sync + 'static {
    /// Acks `tag`, and every earlier unsettled tag of the same consumer when
    /// `multiple`.
    async fn ack(&self, tag: u64, multiple: bool) -> Result<()>;
    /// Nacks `tag` (and earlier ones when `multiple`), requeueing or
    /// dead-lettering them.
    async fn nack(&self, tag: u64, multiple: bool, requeue: bool) -> Result<()>;
}

/// One message handed to a consumer, with what it needs to settle it.
pub struct Delivery {
    /// The message as published.
    pub message: Message,
    /// The exchange it was published to (`""` for the default one).
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Whether it was delivered before and not acked.
    pub redelivered: bool,
    /// Identifies the delivery within its consumer.
    pub delivery_tag: u64,
    settled: AtomicBool,
    acker: Option<Arc<dyn Acknowledger>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("redelivered", &self.redelivered)
            .field("delivery_tag", &self.delivery_tag)
            .field("body_len", &self.message.body.len())
            .field("properties", &self.message.properties)
            .finish()
    }
}

impl Delivery {
    /// Builds a delivery. `acker` is `None` for auto-ack consumers, whose
    /// deliveries are settled already.
    pub fn new(
        message: Message,
        exchange: String,
        routing_key: String,
        redelivered: bool,
        delivery_tag: u64,
        acker: Option<Arc<dyn Acknowledger>>,
    ) -> Self {
        Delivery {
            settled: AtomicBool::new(acker.is_none()),
            message,
            exchange,
            routing_key,
            redelivered,
            delivery_tag,
            acker,
        }
    }

    fn take(&self) -> Result<Option<&Arc<dyn Acknowledger>>> {
        match &self.acker {
            None => Ok(None),
            Some(a) => {
                if self.settled.swap(true, Ordering::AcqRel) {
                    Err(Error::PreconditionFailed(format!(
                        "delivery {} was already settled",
                        self.delivery_tag
                    )))
                } else {
                    Ok(Some(a))
                }
            }
        }
    }

    /// Acknowledges the delivery: the message is removed from its queue.
    /// A no-op for auto-ack deliveries.
    ///
    /// # Errors
    /// `PreconditionFailed` if this delivery was settled already; `Closed` or
    /// `ConnectionLost` if its consumer is gone (the message was requeued).
    pub async fn ack(&self) -> Result<()> {
        match self.take()? {
            Some(a) => a.ack(self.delivery_tag, false).await,
            None => Ok(()),
        }
    }

    /// Acknowledges this delivery and every earlier unsettled one of the same
    /// consumer.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    pub async fn ack_multiple(&self) -> Result<()> {
        match self.take()? {
            Some(a) => a.ack(self.delivery_tag, true).await,
            None => Ok(()),
        }
    }

    /// Negatively acknowledges the delivery: requeued at its original
    /// position with `redelivered` set when `requeue`, else dead-lettered (or
    /// dropped when the queue has no dead-letter exchange).
    ///
    /// # Errors
    /// As [`Delivery::ack`]; `PreconditionFailed` for auto-ack deliveries.
    pub async fn nack(&self, requeue: bool) -> Result<()> {
        match self.take()? {
            Some(a) => a.nack(self.delivery_tag, false, requeue).await,
            None => Err(Error::PreconditionFailed(
                "an auto-ack delivery cannot be nacked".into(),
            )),
        }
    }

    /// Nacks this delivery and every earlier unsettled one of the same
    /// consumer.
    ///
    /// # Errors
    /// As [`Delivery::nack`].
    pub async fn nack_multiple(&self, requeue: bool) -> Result<()> {
        match self.take()? {
            Some(a) => a.nack(self.delivery_tag, true, requeue).await,
            None => Err(Error::PreconditionFailed(
                "an auto-ack delivery cannot be nacked".into(),
            )),
        }
    }

    /// Rejects the delivery (AMQP `basic.reject`); the same as
    /// [`Delivery::nack`] for one message.
    ///
    /// # Errors
    /// As [`Delivery::nack`].
    pub async fn reject(&self, requeue: bool) -> Result<()> {
        self.nack(requeue).await
    }

    /// Whether the delivery has been settled (or needed no settling).
    #[must_use]
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }
}

/// Stops a consumer. Implemented by transports.
#[async_trait]
pub trait ConsumerControl: Send + Sync + 'static {
    /// Stops new deliveries. Deliveries already handed out can still be
    /// settled.
    async fn cancel(&self) -> Result<()>;
}

/// The boxed stream a transport hands to [`Consumer::new`].
pub type DeliveryStream = Pin<Box<dyn Stream<Item = Result<Delivery>> + Send + 'static>>;

/// A consumer: a [`Stream`] of deliveries from one queue.
///
/// The stream ends when the consumer is cancelled, its queue is deleted or
/// its connection is closed; a transport that lost its connection for good
/// yields the error first. Dropping the consumer cancels it and requeues the
/// deliveries it had not settled.
pub struct Consumer {
    tag: String,
    queue: String,
    stream: DeliveryStream,
    control: Arc<dyn ConsumerControl>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("tag", &self.tag)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Builds a consumer from a transport's stream and control.
    pub fn new(
        tag: String,
        queue: String,
        stream: DeliveryStream,
        control: Arc<dyn ConsumerControl>,
    ) -> Self {
        Consumer {
            tag,
            queue,
            stream,
            control,
        }
    }

    /// The consumer tag.
    #[must_use]
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The queue consumed from.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Stops new deliveries; the stream ends once those already sent are
    /// read. Deliveries already received can still be settled.
    ///
    /// # Errors
    /// `Closed` or `ConnectionLost` if the connection is gone.
    // Not an `async fn`: its future must not borrow the consumer, whose
    // stream is not `Sync`, so that a task cancelling it stays `Send`.
    pub fn cancel(&self) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let control = self.control.clone();
        async move { control.cancel().await }
    }
}

impl Stream for Consumer {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream.as_mut().poll_next(cx)
    }
}

/// Sends messages. Connections do; a [`ReplyQueue`] may carry its own.
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

#[async_trait]
impl<C: Connection + ?Sized> Publisher for Arc<C> {
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        options: PublishOptions,
    ) -> Result<()> {
        Connection::publish(&**self, exchange, routing_key, message, options).await
    }
}
