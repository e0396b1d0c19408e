//! Consumers: each on its own channel, fed into the application's stream
//! by a task that starts the consumer again after a reconnection.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use async_trait::async_trait;
use bus_core::{Acknowledger, ConsumeOptions, Consumer, ConsumerControl, Delivery, Error, Result};
use futures::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::connection::Shared;
use crate::convert::{is_connection_error, message_from_amqp, short, table_to_amqp};
use crate::events::RecoveryEvent;
use crate::link::Link;
use crate::publish::LinkedChannel;

/// The queue name that makes RabbitMQ's direct reply-to consumer.
pub(crate) const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// What a consumer is, kept to start it again.
pub(crate) struct ConsumerSpec {
    /// The queue as the application names it.
    pub(crate) queue: String,
    pub(crate) tag: String,
    pub(crate) options: ConsumeOptions,
    /// For a direct reply-to consumer: where its channel (in confirm mode)
    /// is published for the requests.
    pub(crate) reply_slot: Option<watch::Sender<LinkedChannel>>,
}

impl ConsumerSpec {
    fn is_direct_reply(&self) -> bool {
        self.reply_slot.is_some()
    }
}

/// Stops a consumer; shared by the application's [`Consumer`] and the task.
struct Control {
    shared: Arc<Shared>,
    tag: String,
    cancelled: watch::Sender<bool>,
    current: Mutex<Option<lapin::Channel>>,
}

#[async_trait]
impl ConsumerControl for Control {
    async fn cancel(&self) -> Result<()> {
        self.cancelled.send_replace(true);
        let channel = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(channel) = channel {
            let tag = short("consumer tag", &self.tag)?;
            if let Err(e) = channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await
            {
                // A channel that is gone has no consumer left to stop.
                tracing::debug!(consumer_tag = %self.tag, error = %e, "cancel on a closed channel");
            }
        }
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        Ok(())
    }
}

/// Settles deliveries of one consumer on one channel. Tags the application
/// sees are the broker's plus `offset`, so they keep growing across the
/// channels a consumer goes through.
struct ChannelAcker {
    channel: lapin::Channel,
    offset: u64,
    tag: String,
    dropped: Arc<AtomicBool>,
}

impl ChannelAcker {
    fn broker_tag(&self, tag: u64) -> Result<u64> {
        if self.dropped.load(Ordering::Acquire) {
            return Err(Error::Closed(format!(
                "consumer {} was dropped; its unsettled deliveries were requeued",
                self.tag
            )));
        }
        match tag.checked_sub(self.offset) {
            Some(t) if t > 0 => Ok(t),
            _ => Err(Error::PreconditionFailed(format!(
                "unknown delivery tag {tag} for consumer {}",
                self.tag
            ))),
        }
    }

    fn settle_error(&self, e: &lapin::Error) -> Error {
        if self.dropped.load(Ordering::Acquire) {
            return Error::Closed(format!(
                "consumer {} was dropped; its unsettled deliveries were requeued",
                self.tag
            ));
        }
        Error::ConnectionLost(format!(
            "the channel of consumer {} was lost ({e}); the broker requeued its unsettled deliveries",
            self.tag
        ))
    }
}

#[async_trait]
impl Acknowledger for ChannelAcker {
    async fn ack(&self, tag: u64, multiple: bool) -> Result<()> {
        let t = self.broker_tag(tag)?;
        self.channel
            .basic_ack(t, BasicAckOptions { multiple })
            .await
            .map_err(|e| self.settle_error(&e))
    }

    async fn nack(&self, tag: u64, multiple: bool, requeue: bool) -> Result<()> {
        let t = self.broker_tag(tag)?;
        self.channel
            .basic_nack(t, BasicNackOptions { multiple, requeue })
            .await
            .map_err(|e| self.settle_error(&e))
    }
}

/// What the task hands to the application's end: a delivery with the
/// channel it must be settled on (none for auto-ack), or an error.
enum Item {
    Delivery(Box<Delivery>, Option<lapin::Channel>),
    Error(Error),
}

/// The application's end: deliveries in order; dropping it stops the task.
struct DeliveryReceiver {
    rx: mpsc::UnboundedReceiver<Item>,
    _dropped: oneshot::Sender<()>,
    /// Set at once on drop, so that settling a delivery of a dropped
    /// consumer fails even before its task has closed the channel.
    owner_dropped: Arc<AtomicBool>,
}

impl Drop for DeliveryReceiver {
    fn drop(&mut self) {
        self.owner_dropped.store(true, Ordering::Release);
    }
}

impl Stream for DeliveryReceiver {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match self.rx.poll_recv(cx) {
                // A delivery still waiting here when its channel died can no
                // longer be settled, and the broker has requeued it: the
                // application would only process it twice.
                Poll::Ready(Some(Item::Delivery(_, Some(channel))))
                    if !channel.status().connected() => {}
                Poll::Ready(Some(Item::Delivery(d, _))) => return Poll::Ready(Some(Ok(*d))),
                Poll::Ready(Some(Item::Error(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Opens a channel on `link` and starts the consumer on it.
async fn open(
    shared: &Shared,
    link: &Link,
    spec: &ConsumerSpec,
) -> Result<(lapin::Channel, lapin::Consumer)> {
    let arguments = table_to_amqp(&spec.options.arguments)?;
    let queue = if spec.is_direct_reply() {
        DIRECT_REPLY_TO.to_owned()
    } else {
        shared.resolve_queue(&spec.queue)
    };
    let queue = short("queue name", &queue)?;
    let channel = link
        .conn
        .create_channel()
        .await
        .map_err(|e| shared.fail(&e))?;
    let started = async {
        if spec.is_direct_reply() {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        } else if spec.options.prefetch > 0 && !spec.options.auto_ack {
            channel
                .basic_qos(spec.options.prefetch, BasicQosOptions { global: false })
                .await?;
        }
        channel
            .basic_consume(
                queue,
                spec.tag.as_str().into(),
                BasicConsumeOptions {
                    no_local: false,
                    no_ack: spec.options.auto_ack,
                    exclusive: spec.options.exclusive,
                    nowait: false,
                },
                arguments,
            )
            .await
    };
    match started.await {
        Ok(consumer) => Ok((channel, consumer)),
        Err(e) => {
            if channel.status().connected() {
                let _ = channel.close(200, "consumer not started".into()).await;
            }
            Err(shared.fail(&e))
        }
    }
}

async fn close_channel(channel: &lapin::Channel) {
    if channel.status().connected() {
        if let Err(e) = channel.close(200, "consumer dropped".into()).await {
            tracing::debug!(error = %e, "closing a consumer channel");
        }
    }
}

/// Starts a consumer: errors of the first start are the caller's.
pub(crate) async fn start(shared: Arc<Shared>, spec: ConsumerSpec) -> Result<Consumer> {
    short("consumer tag", &spec.tag)?;
    table_to_amqp(&spec.options.arguments)?;
    let link = shared.link().await?;
    let (channel, consumer) = open(&shared, &link, &spec).await?;
    if let Some(slot) = &spec.reply_slot {
        slot.send_replace(Some((link.generation, channel.clone())));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let (cancelled, _) = watch::channel(false);
    let control = Arc::new(Control {
        shared: shared.clone(),
        tag: spec.tag.clone(),
        cancelled,
        current: Mutex::new(Some(channel.clone())),
    });
    let tag = spec.tag.clone();
    let queue = spec.queue.clone();
    let owner_dropped = Arc::new(AtomicBool::new(false));
    let task = ConsumerTask {
        shared,
        spec,
        control: control.clone(),
        tx: Some(tx),
        dropped: dropped_rx,
        owner_dropped: owner_dropped.clone(),
    };
    tokio::spawn(task.run(link, channel, consumer));
    Ok(Consumer::new(
        tag,
        queue,
        Box::pin(DeliveryReceiver {
            rx,
            _dropped: dropped_tx,
            owner_dropped,
        }),
        control,
    ))
}

struct ConsumerTask {
    shared: Arc<Shared>,
    spec: ConsumerSpec,
    control: Arc<Control>,
    tx: Option<mpsc::UnboundedSender<Item>>,
    dropped: oneshot::Receiver<()>,
    /// Set when the application dropped the consumer: settling fails with
    /// `Closed` from then on.
    owner_dropped: Arc<AtomicBool>,
}

enum Ended {
    /// The application dropped the consumer.
    Dropped,
    /// The consumer is over (cancelled, queue deleted, connection closed);
    /// the stream ends.
    Finished,
    /// The channel or connection went away; start again.
    Lost { reason: String, connection: bool },
}

impl ConsumerTask {
    fn send_error(&self, e: Error) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Item::Error(e));
        }
    }

    fn is_cancelled(&self) -> bool {
        *self.control.cancelled.borrow()
    }

    fn set_current(&self, channel: Option<lapin::Channel>) {
        *self
            .control
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = channel;
    }

    async fn run(
        mut self,
        mut link: Link,
        mut channel: lapin::Channel,
        mut consumer: lapin::Consumer,
    ) {
        let mut offset = 0u64;
        let mut highest = 0u64;
        loop {
            let acker: Option<Arc<dyn Acknowledger>> = if self.spec.options.auto_ack {
                None
            } else {
                Some(Arc::new(ChannelAcker {
                    channel: channel.clone(),
                    offset,
                    tag: self.spec.tag.clone(),
                    dropped: self.owner_dropped.clone(),
                }))
            };
            let ended = self
                .pump(&channel, &mut consumer, offset, &mut highest, acker)
                .await;
            let (reason, connection) = match ended {
                Ended::Dropped => {
                    self.owner_dropped.store(true, Ordering::Release);
                    self.set_current(None);
                    close_channel(&channel).await;
                    return;
                }
                Ended::Finished => return self.finish(channel).await,
                Ended::Lost { reason, connection } => (reason, connection),
            };
            self.set_current(None);
            tracing::warn!(
                consumer_tag = %self.spec.tag,
                queue = %self.spec.queue,
                %reason,
                "consumer interrupted; starting it again"
            );
            // Replies to a direct reply-to channel, and messages of an
            // exclusive queue, died with the old channel or connection:
            // the application must hear of it.
            if self.spec.is_direct_reply()
                || (connection && self.shared.queue_is_exclusive(&self.spec.queue))
            {
                self.send_error(Error::ConnectionLost(format!(
                    "consumer {} lost its {}: {reason}",
                    self.spec.tag,
                    if connection { "connection" } else { "channel" }
                )));
            }
            if let Some(slot) = &self.spec.reply_slot {
                slot.send_replace(None);
            }
            offset = highest;
            let mut min_generation = if connection {
                link.generation + 1
            } else {
                link.generation
            };
            loop {
                let next = tokio::select! {
                    biased;
                    _ = &mut self.dropped => {
                        self.owner_dropped.store(true, Ordering::Release);
                        return;
                    }
                    l = self.shared.link_at_least(min_generation) => l,
                };
                if self.is_cancelled() {
                    self.tx = None;
                    let _ = (&mut self.dropped).await;
                    return;
                }
                let next = match next {
                    Ok(l) => l,
                    Err(_) => {
                        // Closed for good: the stream ends.
                        self.tx = None;
                        let _ = (&mut self.dropped).await;
                        return;
                    }
                };
                match open(&self.shared, &next, &self.spec).await {
                    Ok((ch, c)) => {
                        link = next;
                        channel = ch;
                        consumer = c;
                        self.set_current(Some(channel.clone()));
                        if let Some(slot) = &self.spec.reply_slot {
                            slot.send_replace(Some((link.generation, channel.clone())));
                        }
                        tracing::info!(
                            consumer_tag = %self.spec.tag,
                            queue = %self.spec.queue,
                            "consumer resumed"
                        );
                        self.shared.emit(RecoveryEvent::ConsumerResumed {
                            consumer_tag: self.spec.tag.clone(),
                            queue: self.spec.queue.clone(),
                        });
                        break;
                    }
                    Err(Error::ConnectionLost(_)) => {
                        min_generation = next.generation + 1;
                    }
                    Err(e) => {
                        tracing::error!(
                            consumer_tag = %self.spec.tag,
                            queue = %self.spec.queue,
                            error = %e,
                            "consumer could not be started again"
                        );
                        self.shared.emit(RecoveryEvent::ConsumerLost {
                            consumer_tag: self.spec.tag.clone(),
                            queue: self.spec.queue.clone(),
                            error: e.to_string(),
                        });
                        self.send_error(e);
                        self.tx = None;
                        let _ = (&mut self.dropped).await;
                        return;
                    }
                }
            }
        }
    }

    /// Forwards deliveries until the lapin consumer ends or the application
    /// drops its end.
    async fn pump(
        &mut self,
        channel: &lapin::Channel,
        consumer: &mut lapin::Consumer,
        offset: u64,
        highest: &mut u64,
        acker: Option<Arc<dyn Acknowledger>>,
    ) -> Ended {
        let mut failure: Option<lapin::Error> = None;
        loop {
            tokio::select! {
                biased;
                _ = &mut self.dropped => return Ended::Dropped,
                item = consumer.next() => match item {
                    Some(Ok(d)) => {
                        let tag = offset + d.delivery_tag;
                        *highest = (*highest).max(tag);
                        let message = message_from_amqp(d.data, &d.properties);
                        let delivery = Delivery::new(
                            message,
                            d.exchange.as_str().to_owned(),
                            d.routing_key.as_str().to_owned(),
                            d.redelivered,
                            tag,
                            acker.clone(),
                        );
                        let settle_on = acker.is_some().then(|| channel.clone());
                        if let Some(tx) = &self.tx {
                            let _ = tx.send(Item::Delivery(Box::new(delivery), settle_on));
                        }
                    }
                    Some(Err(e)) => failure = Some(e),
                    None => break,
                }
            }
        }
        let lost = failure.is_some() || !channel.status().connected();
        if self.is_cancelled() || self.shared.is_closed() || !lost {
            return Ended::Finished;
        }
        let connection = failure.as_ref().is_none_or(is_connection_error);
        let reason = failure.map_or_else(|| "channel closed".to_owned(), |e| e.to_string());
        if connection {
            self.shared.poke();
        }
        Ended::Lost { reason, connection }
    }

    /// The consumer is over: end the stream, keep the channel open so that
    /// deliveries already handed out can still be settled, and close it
    /// once the application drops the consumer.
    async fn finish(mut self, channel: lapin::Channel) {
        self.tx = None;
        if let Some(slot) = &self.spec.reply_slot {
            slot.send_replace(None);
        }
        let _ = (&mut self.dropped).await;
        self.owner_dropped.store(true, Ordering::Release);
        self.set_current(None);
        close_channel(&channel).await;
    }
}
