//! Consumers: each on its own channel. The application's stream reads the
//! lapin consumer itself (no task hop per delivery); a task per consumer
//! starts it again after a loss and hands the new one to the stream.

use bus_core::sync::{Mutex, MutexGuard};
use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use async_trait::async_trait;
use bus_core::{
    AckOptions, Acknowledger, ConsumeOptions, Consumer, ConsumerControl, Delivery, Error,
    NackOptions, Result, SharedStr,
};
use futures::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::connection::Shared;
use crate::convert::{is_connection_error, message_from_amqp, short, table_to_amqp};
use crate::events::RecoveryEvent;
use crate::link::{unless_lost, Link, LinkState};
use crate::options::AckCoalescing;
use crate::publish::ReplySlot;

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
    pub(crate) reply_slot: Option<watch::Sender<ReplySlot>>,
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
    /// The coalesced acks of the current channel, when acks are coalesced.
    batch: Mutex<Option<Arc<AckBatch>>>,
}

impl Control {
    fn batch(&self) -> Option<Arc<AckBatch>> {
        self.batch.lock().clone()
    }
}

#[async_trait]
impl ConsumerControl for Control {
    async fn cancel(&self) -> Result<()> {
        self.cancelled.send_replace(true);
        let channel = self.current.lock().clone();
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
        if let Some(batch) = self.batch() {
            batch.flush_for_good().await?;
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
    /// Set when the broker cancelled the consumer because its queue was
    /// deleted: its deliveries can no longer be settled.
    gone: Arc<OnceLock<String>>,
    /// Where acks wait when they are coalesced.
    batch: Option<Arc<AckBatch>>,
    /// Why the broker closed the channel, once the consumer has read it
    /// (e.g. its consumer timeout): settle errors name it.
    closed_by: Arc<Mutex<Option<String>>>,
}

impl ChannelAcker {
    fn broker_tag(&self, tag: u64) -> Result<u64> {
        if let Some(why) = self.gone.get() {
            return Err(Error::Closed(format!(
                "delivery {tag} of consumer {} cannot be settled: {why}",
                self.tag
            )));
        }
        if self.dropped.load(Ordering::Acquire) {
            return Err(Error::Closed(format!(
                "consumer {} was dropped; its unsettled deliveries were requeued",
                self.tag
            )));
        }
        match tag.checked_sub(self.offset) {
            Some(t) if t > 0 => Ok(t),
            _ => Err(Error::PreconditionFailed(
                format!("unknown delivery tag {tag} for consumer {}", self.tag).into(),
            )),
        }
    }

    fn settle_error(&self, e: &lapin::Error) -> Error {
        if self.dropped.load(Ordering::Acquire) {
            return Error::Closed(format!(
                "consumer {} was dropped; its unsettled deliveries were requeued",
                self.tag
            ));
        }
        if let Some(why) = &*self.closed_by.lock() {
            return Error::Closed(format!(
                "the broker closed the channel of consumer {} ({why}); it requeued its unsettled deliveries, which will be delivered again",
                self.tag
            ));
        }
        Error::Closed(format!(
            "the channel of consumer {} was lost ({e}); the broker requeued its unsettled deliveries",
            self.tag
        ))
    }
}

#[async_trait]
impl Acknowledger for ChannelAcker {
    async fn ack(&self, tag: u64, options: AckOptions) -> Result<()> {
        let multiple = options.multiple;
        let t = self.broker_tag(tag)?;
        if let Some(batch) = &self.batch {
            return if multiple {
                batch
                    .settle_alone(t, true, || {
                        self.channel
                            .basic_ack(t, BasicAckOptions { multiple: true })
                    })
                    .await
            } else {
                batch.ack(t).await
            };
        }
        self.channel
            .basic_ack(t, BasicAckOptions { multiple })
            .await
            .map_err(|e| self.settle_error(&e))
    }

    async fn nack(&self, tag: u64, options: NackOptions) -> Result<()> {
        let (multiple, requeue) = (options.multiple, options.requeue.is_yes());
        let t = self.broker_tag(tag)?;
        if let Some(batch) = &self.batch {
            return batch
                .settle_alone(t, multiple, || self.settle_nack(t, multiple, requeue))
                .await;
        }
        self.settle_nack(t, multiple, requeue)
            .await
            .map_err(|e| self.settle_error(&e))
    }
}

impl ChannelAcker {
    async fn settle_nack(&self, t: u64, multiple: bool, requeue: bool) -> lapin::Result<()> {
        if multiple {
            self.channel
                .basic_nack(t, BasicNackOptions { multiple, requeue })
                .await
        } else {
            // One message: `basic.reject`, which RabbitMQ 4.x quorum
            // queues count as a delivery attempt (towards
            // `x-delivery-limit`), as they do not for a requeueing nack.
            self.channel
                .basic_reject(t, BasicRejectOptions { requeue })
                .await
        }
    }
}

/// Coalesced acks of one consumer on one channel ([`AckCoalescing`]), in
/// broker tags.
pub(crate) struct AckBatch {
    channel: lapin::Channel,
    config: AckCoalescing,
    tag: String,
    state: Mutex<BatchState>,
    /// Held while frames are computed and sent, so that they reach the
    /// broker in the order they were planned: a multiple ack after a
    /// later one would name a tag already acked, which closes the channel.
    sending: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct BatchState {
    /// Every tag up to here is settled on the broker (or its frame sent).
    floor: u64,
    /// Acked by the application, above `floor`, not sent yet.
    pending: BTreeSet<u64>,
    /// Above `floor` and settled on their own (nacks, single acks).
    settled: BTreeSet<u64>,
    timer_armed: bool,
    /// After a cancel: every ack is sent at once.
    immediate: bool,
    /// Why the last flush failed; later settles report it.
    failed: Option<String>,
}

impl AckBatch {
    fn lock(&self) -> MutexGuard<'_, BatchState> {
        self.state.lock()
    }

    fn failed(&self) -> Result<()> {
        match &self.lock().failed {
            Some(why) => Err(Error::Closed(why.clone())),
            None => Ok(()),
        }
    }

    /// Queues the ack of broker tag `t`; flushes when the batch is full
    /// (or after a cancel), else makes sure a timer will.
    async fn ack(self: &Arc<Self>, t: u64) -> Result<()> {
        let flush_now = {
            let mut s = self.lock();
            if let Some(why) = &s.failed {
                return Err(Error::Closed(why.clone()));
            }
            s.pending.insert(t);
            let full = s.immediate || s.pending.len() >= usize::from(self.config.max_acks);
            if !full && !s.timer_armed {
                s.timer_armed = true;
                let weak = Arc::downgrade(self);
                let delay = self.config.max_delay;
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Some(batch) = weak.upgrade() {
                        batch.flush_logged("timer").await;
                    }
                });
            }
            full
        };
        if flush_now {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends every waiting ack: one `multiple` ack up to the highest tag
    /// below which everything is settled, then single acks for those above
    /// a delivery still unsettled.
    pub(crate) async fn flush(&self) -> Result<()> {
        let _sending = self.sending.lock().await;
        self.flush_sending().await
    }

    /// [`AckBatch::flush`], with `sending` held by the caller.
    async fn flush_sending(&self) -> Result<()> {
        let (multiple, singles) = {
            let mut s = self.lock();
            s.timer_armed = false;
            if let Some(why) = &s.failed {
                if s.pending.is_empty() {
                    return Ok(());
                }
                return Err(Error::Closed(why.clone()));
            }
            let mut multiple = None;
            loop {
                let next = s.floor + 1;
                if s.pending.remove(&next) {
                    multiple = Some(next);
                } else if !s.settled.remove(&next) {
                    break;
                }
                s.floor = next;
            }
            let singles = std::mem::take(&mut s.pending);
            s.settled.extend(singles.iter().copied());
            (multiple, singles)
        };
        let mut result = Ok(());
        if let Some(t) = multiple {
            result = self
                .channel
                .basic_ack(t, BasicAckOptions { multiple: true })
                .await;
        }
        for &t in &singles {
            if result.is_err() {
                break;
            }
            result = self.channel.basic_ack(t, BasicAckOptions::default()).await;
        }
        result.map_err(|e| {
            let why = format!(
                "coalesced acks of consumer {} could not be sent ({e}); the broker requeued their messages, which will be delivered again",
                self.tag
            );
            self.lock().failed = Some(why.clone());
            Error::Closed(why)
        })
    }

    /// Flushes where no caller can hear of a failure: logs it.
    pub(crate) async fn flush_logged(&self, when: &str) {
        if let Err(e) = self.flush().await {
            tracing::warn!(consumer_tag = %self.tag, error = %e, "flushing coalesced acks on {when}");
        }
    }

    /// Flushes, and sends every later ack at once (the consumer was
    /// cancelled: no more deliveries will fill a batch).
    pub(crate) async fn flush_for_good(&self) -> Result<()> {
        self.lock().immediate = true;
        self.flush().await
    }

    /// Settles `t` (and, when `multiple`, every earlier tag) other than by
    /// a coalesced ack, after sending the acks it would otherwise cover or
    /// overtake. `multiple` covers earlier tags: acks of them waiting are
    /// sent first, so that a nack never reaches a message the application
    /// acked.
    async fn settle_alone<F, Fut>(&self, t: u64, multiple: bool, send: F) -> Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = lapin::Result<()>>,
    {
        let _sending = self.sending.lock().await;
        if multiple {
            self.flush_sending().await?;
        } else {
            self.failed()?;
        }
        if let Err(e) = send().await {
            let why = format!(
                "the channel of consumer {} was lost ({e}); the broker requeued its unsettled deliveries",
                self.tag
            );
            self.lock().failed = Some(why.clone());
            return Err(Error::Closed(why));
        }
        let mut s = self.lock();
        if multiple {
            if t > s.floor {
                s.floor = t;
            }
            let floor = s.floor;
            s.pending.retain(|&p| p > floor);
            s.settled.retain(|&p| p > floor);
        } else if t > s.floor {
            s.settled.insert(t);
        }
        Ok(())
    }
}

/// What the task hands to the application's end.
enum Item {
    /// The consumer was started again on a new channel.
    Resumed(Box<Resumption>),
    Error(Error),
}

/// A consumer started again: its epoch, channel and lapin consumer.
struct Resumption {
    epoch: u64,
    channel: lapin::Channel,
    consumer: lapin::Consumer,
}

/// How one lapin consumer (one epoch of the application's consumer) ended,
/// as the application's end saw it.
struct EpochEnded {
    epoch: u64,
    ended: Ended,
}

/// The lapin consumer the application's end reads from directly, so that
/// a delivery goes from lapin to the application without a task hop.
struct Active {
    epoch: u64,
    channel: lapin::Channel,
    consumer: lapin::Consumer,
    acker: Option<Arc<dyn Acknowledger>>,
    offset: u64,
    /// The lapin error the consumer ended with, if any.
    failure: Option<lapin::Error>,
    /// Shared with the acknowledger: why the broker closed the channel.
    closed_by: Arc<Mutex<Option<String>>>,
}

/// The application's end: deliveries in order; dropping it stops the task.
///
/// It polls the current lapin consumer itself. The task starts the consumer
/// again after a loss (noticed here, or by the task from the link state
/// while the application is not reading) and hands the new one over.
struct DeliveryReceiver {
    control: Arc<Control>,
    spec_tag: String,
    auto_ack: bool,
    active: Option<Active>,
    /// An item taken from the task while the current consumer was still
    /// being drained.
    stashed: Option<Item>,
    rx: mpsc::UnboundedReceiver<Item>,
    /// Tells the task how each epoch ended.
    reports: mpsc::UnboundedSender<EpochEnded>,
    /// The highest tag handed out so far: the next channel's tags start
    /// above it.
    highest: u64,
    finished: bool,
    _dropped: oneshot::Sender<()>,
    /// Set at once on drop, so that settling a delivery of a dropped
    /// consumer fails even before its task has closed the channel.
    owner_dropped: Arc<AtomicBool>,
    /// Why the consumer's deliveries can no longer be settled, once its
    /// queue was deleted under it.
    gone: Arc<OnceLock<String>>,
    /// The exchange and routing key of the last delivery, handed out again
    /// while they repeat: a consumer sees few of them, and a name shared
    /// by count costs no allocation per delivery.
    last_names: (SharedStr, SharedStr),
}

/// `name` as a [`SharedStr`]: `last` when it holds the same name, else a
/// new one, kept in `last` for the next delivery.
fn reuse(last: &mut SharedStr, name: &str) -> SharedStr {
    if last.as_str() != name {
        *last = SharedStr::from(name);
    }
    last.clone()
}

impl Drop for DeliveryReceiver {
    fn drop(&mut self) {
        self.owner_dropped.store(true, Ordering::Release);
    }
}

impl DeliveryReceiver {
    fn adopt(&mut self, epoch: u64, channel: lapin::Channel, consumer: lapin::Consumer) {
        let offset = self.highest;
        let closed_by: Arc<Mutex<Option<String>>> = Arc::default();
        let acker: Option<Arc<dyn Acknowledger>> = if self.auto_ack {
            None
        } else {
            let shared = &self.control.shared;
            let batch = shared.options.ack_coalescing.map(|config| {
                let batch = Arc::new(AckBatch {
                    channel: channel.clone(),
                    config,
                    tag: self.spec_tag.clone(),
                    state: Mutex::default(),
                    sending: tokio::sync::Mutex::new(()),
                });
                shared.register_ack_batch(&batch);
                batch
            });
            *self.control.batch.lock() = batch.clone();
            Some(Arc::new(ChannelAcker {
                channel: channel.clone(),
                offset,
                tag: self.spec_tag.clone(),
                dropped: self.owner_dropped.clone(),
                gone: self.gone.clone(),
                batch,
                closed_by: closed_by.clone(),
            }))
        };
        self.active = Some(Active {
            epoch,
            channel,
            consumer,
            acker,
            offset,
            failure: None,
            closed_by,
        });
    }

    /// The current lapin consumer ended: say how to the task.
    fn end_active(&mut self) -> Ended {
        let Some(active) = self.active.take() else {
            return Ended::Finished;
        };
        let shared = &self.control.shared;
        let lost = active.failure.is_some() || !active.channel.status().connected();
        let ended = if *self.control.cancelled.borrow() || shared.is_closed() {
            Ended::Finished
        } else if !lost {
            // Neither the application nor a failure ended it: the broker
            // cancelled the consumer. The task finds out why.
            Ended::CancelledByBroker
        } else {
            let connection = active.failure.as_ref().is_none_or(is_connection_error);
            let reason = active
                .failure
                .map_or_else(|| "channel closed".to_owned(), |e| e.to_string());
            if connection {
                shared.poke();
            }
            Ended::Lost { reason, connection }
        };
        let _ = self.reports.send(EpochEnded {
            epoch: active.epoch,
            ended: ended.clone(),
        });
        ended
    }

    fn delivery(&mut self, d: lapin::message::Delivery) -> Option<Delivery> {
        let active = self.active.as_ref()?;
        let tag = active.offset + d.delivery_tag;
        self.highest = self.highest.max(tag);
        // A delivery of a channel that died can no longer be settled, and
        // the broker has requeued it: the application would only process
        // it twice.
        if active.acker.is_some() && !active.channel.status().connected() {
            return None;
        }
        let message = message_from_amqp(d.data, &d.properties);
        let exchange = reuse(&mut self.last_names.0, d.exchange.as_str());
        let routing_key = reuse(&mut self.last_names.1, d.routing_key.as_str());
        Some(Delivery::new(
            message,
            exchange,
            routing_key,
            d.redelivered,
            tag,
            active.acker.clone(),
        ))
    }
}

impl Stream for DeliveryReceiver {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            if let Some(active) = &mut this.active {
                match active.consumer.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(d))) => {
                        if let Some(delivery) = this.delivery(d) {
                            return Poll::Ready(Some(Ok(delivery)));
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        // A channel the broker closed (a 406 of its
                        // consumer timeout, say): the consumer starts
                        // again on a new channel, and settling the old
                        // deliveries says why they cannot be.
                        if let Some(close) = crate::convert::broker_close(&e) {
                            *active.closed_by.lock() =
                                Some(format!("{} {}", close.code, close.text));
                        }
                        active.failure = Some(e);
                        continue;
                    }
                    Poll::Ready(None) => {
                        // After a cancel by the broker, the task's error
                        // comes through `rx`, then the end.
                        if matches!(this.end_active(), Ended::Finished) {
                            this.finished = true;
                            return Poll::Ready(None);
                        }
                        continue;
                    }
                    Poll::Pending => {
                        if this.stashed.is_none() {
                            match this.rx.poll_recv(cx) {
                                Poll::Ready(Some(item)) => this.stashed = Some(item),
                                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                            }
                        }
                        // The task has moved on (the link is gone): once the
                        // dead channel has nothing more buffered, leave it.
                        if active.channel.status().connected() {
                            return Poll::Pending;
                        }
                        this.end_active();
                        continue;
                    }
                }
            }
            let item = match this.stashed.take() {
                Some(item) => item,
                None => match this.rx.poll_recv(cx) {
                    Poll::Ready(Some(item)) => item,
                    Poll::Ready(None) => {
                        this.finished = true;
                        return Poll::Ready(None);
                    }
                    Poll::Pending => return Poll::Pending,
                },
            };
            match item {
                Item::Resumed(resumed) => {
                    let Resumption {
                        epoch,
                        channel,
                        consumer,
                    } = *resumed;
                    this.adopt(epoch, channel, consumer);
                }
                Item::Error(e) => return Poll::Ready(Some(Err(e))),
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
    unless_lost(link, open_on(shared, link, spec))
        .await
        .unwrap_or_else(|| Err(shared.lost_while("starting a consumer")))
}

async fn open_on(
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
            Err(start_error(shared, &e))
        }
    }
}

/// The error of a consumer that could not be started.
///
/// The broker's `INTERNAL_ERROR` (541) closing the channel is a crash of
/// the broker's channel or queue process, typically while a queue is
/// moving (a quorum queue electing a leader after a node died): trying
/// again can succeed, so it is temporary, and recovery keeps trying.
fn start_error(shared: &Shared, e: &lapin::Error) -> Error {
    match crate::convert::broker_close(e) {
        Some(close) if !close.hard && close.code == 541 => Error::backend(
            "amqp",
            true,
            format!(
                "the broker failed while starting the consumer ({} {}); trying again may succeed",
                close.code, close.text
            ),
        ),
        _ => shared.fail(e),
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
    let deadline = shared.recovery_deadline();
    let mut link = shared.link_after(0, deadline).await?;
    let id = shared.reserve_consumer_channel(&link, &spec.queue)?;
    // Gives the reservation back if the start fails; the task keeps it.
    let counted = Counted {
        shared: shared.clone(),
        id,
    };
    let (channel, consumer) = match open(&shared, &link, &spec).await {
        Ok(started) => started,
        // The link died after it was handed out: the consumer died with it
        // if it started at all, so it is started on the next link (once).
        Err(Error::ConnectionLost(_)) if Shared::link_lost(&link) => {
            link = shared.link_after(link.generation, deadline).await?;
            open(&shared, &link, &spec).await?
        }
        Err(e) => return Err(e),
    };
    if let Some(slot) = &spec.reply_slot {
        slot.send_replace(Some((link.generation, Arc::new(channel.clone()))));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let (cancelled, _) = watch::channel(false);
    let control = Arc::new(Control {
        shared: shared.clone(),
        tag: spec.tag.clone(),
        cancelled,
        current: Mutex::new(Some(channel.clone())),
        batch: Mutex::new(None),
    });
    let tag = spec.tag.clone();
    let queue = spec.queue.clone();
    let auto_ack = spec.options.auto_ack;
    let owner_dropped = Arc::new(AtomicBool::new(false));
    let gone: Arc<OnceLock<String>> = Arc::default();
    let mut receiver = DeliveryReceiver {
        control: control.clone(),
        spec_tag: spec.tag.clone(),
        auto_ack,
        active: None,
        stashed: None,
        rx,
        reports: reports_tx,
        highest: 0,
        finished: false,
        _dropped: dropped_tx,
        owner_dropped: owner_dropped.clone(),
        gone: gone.clone(),
        last_names: Default::default(),
    };
    receiver.adopt(0, channel.clone(), consumer);
    let task = ConsumerTask {
        counted,
        shared,
        spec,
        control: control.clone(),
        tx: Some(tx),
        reports: reports_rx,
        dropped: dropped_rx,
        owner_dropped,
        gone,
    };
    tokio::spawn(task.run(link, channel));
    Ok(Consumer::new(tag, queue, Box::pin(receiver), control))
}

/// Counts one live consumer of the connection while it exists.
struct Counted {
    shared: Arc<Shared>,
    /// The consumer's id among the connection's live consumers.
    id: u64,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.shared.release_consumer_channel(self.id);
    }
}

struct ConsumerTask {
    counted: Counted,
    shared: Arc<Shared>,
    spec: ConsumerSpec,
    control: Arc<Control>,
    tx: Option<mpsc::UnboundedSender<Item>>,
    /// How each epoch ended, as the application's end saw it.
    reports: mpsc::UnboundedReceiver<EpochEnded>,
    dropped: oneshot::Receiver<()>,
    /// Set when the application dropped the consumer: settling fails with
    /// `Closed` from then on.
    owner_dropped: Arc<AtomicBool>,
    /// Shared with the acknowledgers: set when the queue was deleted.
    gone: Arc<OnceLock<String>>,
}

#[derive(Clone)]
enum Ended {
    /// The application dropped the consumer.
    Dropped,
    /// The consumer is over (cancelled, queue deleted, connection closed);
    /// the stream ends.
    Finished,
    /// The channel or connection went away; start again.
    Lost { reason: String, connection: bool },
    /// The broker cancelled the consumer (`basic.cancel`); the stream
    /// ends with an error saying why.
    CancelledByBroker,
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
        *self.control.current.lock() = channel;
    }

    async fn run(mut self, mut link: Link, mut channel: lapin::Channel) {
        let mut epoch = 0u64;
        loop {
            let ended = self.wait_end(epoch, &link).await;
            let (reason, connection) = match ended {
                Ended::Dropped => {
                    self.owner_dropped.store(true, Ordering::Release);
                    self.set_current(None);
                    self.flush_on_drop().await;
                    close_channel(&channel).await;
                    return;
                }
                Ended::Finished => return self.finish(channel).await,
                // The stream may end just before its channel or link is
                // marked closed: only a consumer whose channel is still
                // open was cancelled by the broker.
                Ended::CancelledByBroker
                    if channel.status().connected() && !Shared::link_lost(&link) =>
                {
                    self.cancelled_by_broker().await;
                    return self.finish(channel).await;
                }
                Ended::CancelledByBroker => {
                    let connection = Shared::link_lost(&link);
                    if connection {
                        self.shared.poke();
                    }
                    ("the channel closed".to_owned(), connection)
                }
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
            let mut failures = 0u32;
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
                        epoch += 1;
                        self.set_current(Some(channel.clone()));
                        if let Some(slot) = &self.spec.reply_slot {
                            slot.send_replace(Some((link.generation, Arc::new(channel.clone()))));
                        }
                        if let Some(tx) = &self.tx {
                            let _ = tx.send(Item::Resumed(Box::new(Resumption {
                                epoch,
                                channel: channel.clone(),
                                consumer: c,
                            })));
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
                    Err(Error::ConnectionLost(_)) if Shared::link_lost(&next) => {
                        min_generation = next.generation + 1;
                    }
                    // The link is up but the broker could not start the
                    // consumer yet (its channel closed under the request,
                    // or the queue's process failed while the queue moves
                    // to another node): try again after a pause.
                    Err(e) if e.is_temporary() => {
                        failures += 1;
                        let delay = self.shared.options.reconnect.delay(failures.min(8));
                        tracing::warn!(
                            consumer_tag = %self.spec.tag,
                            queue = %self.spec.queue,
                            error = %e,
                            retry_in = ?delay,
                            "consumer could not be started again yet"
                        );
                        tokio::select! {
                            biased;
                            _ = &mut self.dropped => {
                                self.owner_dropped.store(true, Ordering::Release);
                                return;
                            }
                            () = tokio::time::sleep(delay) => {}
                        }
                        min_generation = next.generation;
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

    /// Waits for the end of the consumer of `epoch`, started on `link`:
    /// reported by the application's end when it reads the end, or seen
    /// here from the link state, so that recovery goes on while the
    /// application is not reading.
    async fn wait_end(&mut self, epoch: u64, link: &Link) -> Ended {
        let mut state = self.shared.subscribe_state();
        loop {
            let link_ended = match &*state.borrow_and_update() {
                LinkState::Up(l) if l.generation == link.generation => None,
                LinkState::Up(_) => Some(Ended::Lost {
                    reason: "the connection was re-established".to_owned(),
                    connection: true,
                }),
                LinkState::Down { reason } => Some(Ended::Lost {
                    reason: reason.clone(),
                    connection: true,
                }),
                LinkState::Closed { .. } => Some(Ended::Finished),
            };
            if let Some(ended) = link_ended {
                return ended;
            }
            tokio::select! {
                biased;
                _ = &mut self.dropped => return Ended::Dropped,
                report = self.reports.recv() => match report {
                    Some(r) if r.epoch == epoch => return r.ended,
                    Some(_) => {}
                    // The application's end is gone.
                    None => return Ended::Dropped,
                },
                changed = state.changed() => {
                    if changed.is_err() {
                        return Ended::Finished;
                    }
                }
            }
        }
    }

    /// The broker cancelled the consumer: find out whether its queue is
    /// gone (then forget it, so that recovery does not declare it again,
    /// and refuse to settle its deliveries), report it, and hand the
    /// stream its error; unless this connection deleted the queue itself,
    /// when the stream just ends.
    async fn cancelled_by_broker(&mut self) {
        let queue = &self.spec.queue;
        let tag = &self.spec.tag;
        if !self.spec.is_direct_reply() && self.shared.deleted_here(self.counted.id, queue) {
            // The application deleted it through this connection: the
            // stream just ends, as after a cancel.
            let _ = self.gone.set(format!("its queue {queue:?} was deleted"));
            return;
        }
        let exists = if self.spec.is_direct_reply() {
            Ok(true)
        } else {
            self.shared.queue_exists(queue).await
        };
        let (reason, error) = match exists {
            Ok(false) => {
                let reason = format!("queue {queue:?} was deleted");
                self.shared.forget_deleted_queue(queue);
                let _ = self.gone.set(format!("its queue {queue:?} was deleted"));
                (
                    reason.clone(),
                    Error::Closed(format!(
                        "the broker cancelled consumer {tag}: {reason}; unsettled deliveries are lost with it"
                    )),
                )
            }
            Ok(true) => {
                let reason = format!(
                    "queue {queue:?} still exists (RabbitMQ cancels consumers when, e.g., a queue moves to another node)"
                );
                (
                    reason.clone(),
                    Error::backend(
                        "amqp",
                        true,
                        format!(
                            "the broker cancelled consumer {tag}: {reason}; consuming again can succeed"
                        ),
                    ),
                )
            }
            Err(e) => {
                let reason = format!("could not tell why: checking queue {queue:?} failed ({e})");
                (
                    reason.clone(),
                    Error::backend(
                        "amqp",
                        e.is_temporary(),
                        format!("the broker cancelled consumer {tag}; {reason}"),
                    ),
                )
            }
        };
        tracing::warn!(consumer_tag = %tag, %queue, %reason, "the broker cancelled the consumer");
        self.shared.emit(RecoveryEvent::ConsumerCancelled {
            consumer_tag: tag.clone(),
            queue: queue.clone(),
            reason,
        });
        self.send_error(error);
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
        self.flush_on_drop().await;
        close_channel(&channel).await;
    }

    /// Sends the acks the application queued before it dropped the
    /// consumer, before the channel closes and the broker requeues the rest.
    async fn flush_on_drop(&self) {
        if let Some(batch) = self.control.batch() {
            batch.flush_logged("drop").await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_name_is_shared_not_copied() {
        let mut last = SharedStr::default();
        let first = reuse(&mut last, "jobs.en");
        let again = reuse(&mut last, "jobs.en");
        assert_eq!(again, "jobs.en");
        assert!(std::ptr::eq(first.as_str(), again.as_str()), "shared");
        let other = reuse(&mut last, "jobs.de");
        assert_eq!(other, "jobs.de");
        assert_eq!(first, "jobs.en", "what was handed out stays");
        assert_eq!(reuse(&mut last, ""), "");
    }
}
