//! The consumer side of the transport contract: a [`Consumer`] is a stream
//! of [`Delivery`]s, each settled by its own `ack` / `nack` / `reject`.
//! Transports implement [`Acknowledger`] and [`ConsumerControl`] behind them.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::Stream;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::message::{Message, Properties, SharedStr};

/// What a nack or reject does with the messages it settles.
///
/// Spelled out at the call site: `delivery.nack(Requeue::Yes)` reads where
/// `nack(true)` did not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Requeue {
    /// Back to the queue at their original position, with `redelivered` set.
    /// A quorum queue also counts the return (RabbitMQ's puts the message
    /// at the back), and past its `x-delivery-limit` dead-letters or drops
    /// it instead (see [`engine::delivery_limit`](crate::engine::delivery_limit)).
    Yes,
    /// Not back to the queue: dead-lettered when the queue has a
    /// dead-letter exchange, dropped otherwise.
    No,
}

impl Requeue {
    /// Whether the messages go back to their queue (AMQP's `requeue` bit).
    #[must_use]
    pub fn is_yes(self) -> bool {
        self == Requeue::Yes
    }
}

/// How an [`Acknowledger`] acks: the fields of AMQP's `basic.ack`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct AckOptions {
    /// Also every earlier unsettled tag of the same consumer.
    pub multiple: bool,
}

impl AckOptions {
    /// One delivery.
    #[must_use]
    pub fn single() -> Self {
        AckOptions { multiple: false }
    }

    /// This delivery and every earlier unsettled one of its consumer.
    #[must_use]
    pub fn multiple() -> Self {
        AckOptions { multiple: true }
    }
}

/// How an [`Acknowledger`] nacks: the fields of AMQP's `basic.nack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct NackOptions {
    /// Also every earlier unsettled tag of the same consumer.
    pub multiple: bool,
    /// Whether the messages go back to their queue.
    pub requeue: Requeue,
}

impl NackOptions {
    /// One delivery, with `requeue`.
    #[must_use]
    pub fn single(requeue: Requeue) -> Self {
        NackOptions {
            multiple: false,
            requeue,
        }
    }

    /// This delivery and every earlier unsettled one of its consumer, with
    /// `requeue`.
    #[must_use]
    pub fn multiple(requeue: Requeue) -> Self {
        NackOptions {
            multiple: true,
            requeue,
        }
    }
}

/// Settles deliveries for one transport. Implemented by transports; users
/// call the methods on [`Delivery`] instead.
#[async_trait]
pub trait Acknowledger: Send + Sync + 'static {
    /// Acks `tag`, and every earlier unsettled tag of the same consumer when
    /// `options.multiple`.
    async fn ack(&self, tag: u64, options: AckOptions) -> Result<()>;
    /// Nacks `tag` (and earlier ones when `options.multiple`), requeueing or
    /// dead-lettering them as `options.requeue` says.
    async fn nack(&self, tag: u64, options: NackOptions) -> Result<()>;

    /// Acks at once, without a future, for a transport that settles
    /// without waiting (the in-process broker): `Some` with what
    /// [`Acknowledger::ack`] would have returned, the ack done; `None` when
    /// the transport has to wait, nothing done (the caller then awaits
    /// [`Acknowledger::ack`]). The default is `None`.
    fn ack_now(&self, tag: u64, options: AckOptions) -> Option<Result<()>> {
        let _ = (tag, options);
        None
    }

    /// Nacks at once, as [`Acknowledger::ack_now`] acks: `Some` with what
    /// [`Acknowledger::nack`] would have returned, `None` (the default) when
    /// the caller has to await [`Acknowledger::nack`]. A [`Delivery`]
    /// dropped unsettled calls it from its `Drop`: it must not block, nor
    /// take a lock under which the transport could drop a delivery.
    fn nack_now(&self, tag: u64, options: NackOptions) -> Option<Result<()>> {
        let _ = (tag, options);
        None
    }
}

/// One message handed to a consumer, with what it needs to settle it.
///
/// A delivery dropped without being settled (a handler that returned early,
/// a task that was aborted or panicked) is nacked with requeue: the message
/// goes back to its queue with `redelivered` set (as [`Requeue::Yes`]),
/// and the prefetch slot it held is freed, so a forgotten delivery never stalls its consumer. The
/// nack is made at once where the transport settles without waiting (the
/// in-process broker), and otherwise sent from a task on the current tokio
/// runtime; a delivery of such a transport dropped outside any runtime is
/// requeued only when its consumer or connection goes away. Deliveries of
/// a [`Consumer`] covered by a later [`Delivery::ack_multiple`] or
/// [`Delivery::nack_multiple`] count as settled: dropping them afterwards
/// sends nothing.
pub struct Delivery {
    /// The message as published.
    pub message: Message,
    /// The exchange it was published to (`""` for the default one),
    /// shared with the transport's copy.
    pub exchange: SharedStr,
    /// The routing key it was published with, shared with the transport's
    /// copy.
    pub routing_key: SharedStr,
    /// Whether it was delivered before and not acked.
    pub redelivered: bool,
    /// Identifies the delivery within its consumer.
    pub delivery_tag: u64,
    settled: AtomicBool,
    acker: Option<Arc<dyn Acknowledger>>,
    /// The highest tag of this delivery's consumer settled by a `multiple`
    /// settle (0: none), shared by the consumer's deliveries.
    multiple: Option<Arc<AtomicU64>>,
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
    #[inline]
    pub fn new(
        message: Message,
        exchange: impl Into<SharedStr>,
        routing_key: impl Into<SharedStr>,
        redelivered: bool,
        delivery_tag: u64,
        acker: Option<Arc<dyn Acknowledger>>,
    ) -> Self {
        Delivery {
            settled: AtomicBool::new(acker.is_none()),
            message,
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            redelivered,
            delivery_tag,
            acker,
            multiple: None,
        }
    }

    /// Whether a `multiple` settle of a later delivery covered this one.
    fn covered(&self) -> bool {
        self.multiple
            .as_ref()
            .is_some_and(|m| m.load(Ordering::Acquire) >= self.delivery_tag)
    }

    /// Claims the right to settle: `None` for an auto-ack delivery (settled
    /// on arrival), an error when it was settled already.
    fn claim(&self) -> Result<Option<&Arc<dyn Acknowledger>>> {
        let Some(acker) = &self.acker else {
            return Ok(None);
        };
        if self.settled.swap(true, Ordering::AcqRel) || self.covered() {
            return Err(Error::PreconditionFailed(
                format!("{} was already settled", self.describe()).into(),
            ));
        }
        Ok(Some(acker))
    }

    fn describe(&self) -> String {
        format!(
            "delivery {} (exchange '{}', routing key '{}')",
            self.delivery_tag, self.exchange, self.routing_key
        )
    }

    /// Records a `multiple` settle up to this delivery for its consumer's
    /// other deliveries.
    fn mark_multiple(&self, multiple: bool) {
        if let (true, Some(m)) = (multiple, &self.multiple) {
            m.fetch_max(self.delivery_tag, Ordering::AcqRel);
        }
    }

    /// Starts an ack: claims the delivery, records a `multiple` one for
    /// the consumer's other deliveries, and acks at once when the
    /// transport can. `Ok(None)` when the ack is done (or needed none);
    /// `Ok(Some(..))` with what to await it on otherwise.
    fn begin_ack(&self, multiple: bool) -> Result<Option<(&Arc<dyn Acknowledger>, AckOptions)>> {
        let claimed = self.claim()?;
        self.mark_multiple(multiple);
        tracing::debug!(delivery_tag = self.delivery_tag, multiple, "ack");
        let Some(acker) = claimed else {
            return Ok(None);
        };
        let options = if multiple {
            AckOptions::multiple()
        } else {
            AckOptions::single()
        };
        match acker.ack_now(self.delivery_tag, options) {
            Some(done) => done.map(|()| None),
            None => Ok(Some((acker, options))),
        }
    }

    async fn settle_ack(&self, multiple: bool) -> Result<()> {
        match self.begin_ack(multiple)? {
            None => Ok(()),
            Some((acker, options)) => acker.ack(self.delivery_tag, options).await,
        }
    }

    /// What settles this delivery, as an address: deliveries with the same
    /// one (one consumer on one channel) can be covered by one `multiple`
    /// settle. `None` for an auto-ack delivery.
    pub(crate) fn settled_by(&self) -> Option<*const ()> {
        self.acker.as_ref().map(|a| Arc::as_ptr(a).cast::<()>())
    }

    /// Acks as [`Delivery::ack`] (or [`Delivery::ack_multiple`]) does, and
    /// without a future when the transport settles at once: `Ok(None)`
    /// once acked, `Ok(Some(ack))` with the ack to await otherwise. The
    /// delivery counts as settled (and a `multiple` ack covers the earlier
    /// ones) as soon as this returns.
    pub(crate) fn ack_eagerly(
        self,
        multiple: bool,
    ) -> Result<Option<futures::future::BoxFuture<'static, Result<()>>>> {
        let Some((acker, options)) = self.begin_ack(multiple)? else {
            return Ok(None);
        };
        let (acker, tag) = (acker.clone(), self.delivery_tag);
        Ok(Some(Box::pin(async move { acker.ack(tag, options).await })))
    }

    async fn settle_nack(&self, options: NackOptions) -> Result<()> {
        match self.claim()? {
            Some(acker) => {
                self.mark_multiple(options.multiple);
                tracing::debug!(
                    delivery_tag = self.delivery_tag,
                    multiple = options.multiple,
                    requeue = options.requeue.is_yes(),
                    "nack"
                );
                match acker.nack_now(self.delivery_tag, options) {
                    Some(done) => done,
                    None => acker.nack(self.delivery_tag, options).await,
                }
            }
            None => Err(Error::PreconditionFailed(
                format!(
                    "{} came from an auto-ack consumer: it counts as acked and cannot be nacked",
                    self.describe()
                )
                .into(),
            )),
        }
    }

    /// Acknowledges the delivery: the message is removed from its queue.
    /// A no-op for auto-ack deliveries.
    ///
    /// # Errors
    /// `PreconditionFailed` if this delivery was settled already; `Closed` if
    /// its consumer, channel or connection is gone (the broker requeued the
    /// message and delivers it again, so settling this delivery can never
    /// succeed: not temporary).
    pub async fn ack(&self) -> Result<()> {
        self.settle_ack(false).await
    }

    /// Acknowledges this delivery and every earlier unsettled one of the same
    /// consumer. The earlier deliveries' own handles are not told: settling
    /// one of them afterwards fails with `PreconditionFailed`.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    pub async fn ack_multiple(&self) -> Result<()> {
        self.settle_ack(true).await
    }

    /// Negatively acknowledges the delivery: with [`Requeue::Yes`] it goes
    /// back to its queue at its original position with `redelivered` set
    /// (a quorum queue's counts and limit apply, see [`Requeue::Yes`]);
    /// with [`Requeue::No`] it is dead-lettered (or dropped when the queue
    /// has no dead-letter exchange).
    ///
    /// ```no_run
    /// # async fn f(delivery: bus_core::Delivery) -> bus_core::Result<()> {
    /// use bus_core::Requeue;
    /// delivery.nack(Requeue::Yes).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Delivery::ack`]; `PreconditionFailed` for auto-ack deliveries.
    pub async fn nack(&self, requeue: Requeue) -> Result<()> {
        self.settle_nack(NackOptions::single(requeue)).await
    }

    /// Nacks this delivery and every earlier unsettled one of the same
    /// consumer, as [`Delivery::ack_multiple`] acks them.
    ///
    /// # Errors
    /// As [`Delivery::nack`].
    pub async fn nack_multiple(&self, requeue: Requeue) -> Result<()> {
        self.settle_nack(NackOptions::multiple(requeue)).await
    }

    /// Rejects the delivery (AMQP `basic.reject`); the same as
    /// [`Delivery::nack`] for one message.
    ///
    /// # Errors
    /// As [`Delivery::nack`].
    pub async fn reject(&self, requeue: Requeue) -> Result<()> {
        self.nack(requeue).await
    }

    /// The message body.
    #[must_use]
    pub fn body(&self) -> &Bytes {
        &self.message.body
    }

    /// The message's basic properties.
    #[must_use]
    pub fn properties(&self) -> &Properties {
        &self.message.properties
    }

    /// Decodes the body in the format its content type names, as
    /// [`Message::decode`] does.
    ///
    /// # Errors
    /// [`Error::Codec`] for an unknown content type or a body that does not
    /// decode as `T`. The delivery is not settled either way.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        self.message.decode()
    }

    /// Whether the delivery has been settled (or needed no settling).
    #[must_use]
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.settled.load(Ordering::Acquire) || self.covered() {
            return;
        }
        let Some(acker) = self.acker.take() else {
            return;
        };
        let tag = self.delivery_tag;
        let requeue = NackOptions::single(Requeue::Yes);
        if let Some(done) = acker.nack_now(tag, requeue) {
            tracing::debug!(delivery_tag = tag, "requeued a delivery dropped unsettled");
            if let Err(e) = done {
                tracing::debug!(delivery_tag = tag, error = %e, "could not requeue a delivery dropped unsettled");
            }
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::debug!(delivery_tag = tag, "requeueing a delivery dropped unsettled");
                runtime.spawn(async move {
                    if let Err(e) = acker.nack(tag, requeue).await {
                        tracing::debug!(delivery_tag = tag, error = %e, "could not requeue a delivery dropped unsettled");
                    }
                });
            }
            Err(_) => tracing::warn!(
                delivery_tag = tag,
                "a delivery was dropped unsettled outside a tokio runtime: it stays unacked until its consumer goes away"
            ),
        }
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
    multiple: Arc<AtomicU64>,
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
            multiple: Arc::new(AtomicU64::new(0)),
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
        let mut next = self.stream.as_mut().poll_next(cx);
        // In place: a delivery is a few hundred bytes, not worth moving.
        if let Poll::Ready(Some(Ok(delivery))) = &mut next {
            if delivery.acker.is_some() {
                delivery.multiple = Some(self.multiple.clone());
            }
        }
        next
    }
}
