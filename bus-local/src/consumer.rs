//! The consumer side: the buffer a queue pushes deliveries into, the stream
//! that reads it, and the handles that settle and cancel.

use bus_core::engine::delivery_limit::DeliveryCount;
use bus_core::sync::Mutex;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use bus_core::{
    AckOptions, Acknowledger, ConsumerControl, Delivery, Error, NackOptions, Requeue, Result,
};
use futures::Stream;
use tokio::sync::Notify;

use crate::broker::BrokerInner;
use crate::connection::ConnInner;
use crate::faults::{label, AckFault, FaultState, TraceEvent};
use crate::queue::{Envelope, Queue, Settle};

/// Broker-wide count of deliveries handed to consumers but not yet read
/// from their streams: what [`LocalBroker::wait_idle`](crate::LocalBroker::wait_idle)
/// waits on.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    buffered: AtomicUsize,
    /// Bumped on every hand-over, so an idle check can tell that something
    /// happened while it yielded.
    handed: AtomicU64,
    idle: Notify,
}

impl Activity {
    fn added(&self) {
        self.buffered.fetch_add(1, Ordering::AcqRel);
        self.handed.fetch_add(1, Ordering::AcqRel);
    }

    fn removed(&self, n: usize) {
        if n > 0 && self.buffered.fetch_sub(n, Ordering::AcqRel) == n {
            self.idle.notify_waiters();
        }
    }

    /// Resolves once every delivery handed over has been read, and nothing
    /// new was handed over while other tasks had a turn to run.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.buffered.load(Ordering::Acquire) == 0 {
                let handed = self.handed.load(Ordering::Acquire);
                tokio::task::yield_now().await;
                if self.buffered.load(Ordering::Acquire) == 0
                    && self.handed.load(Ordering::Acquire) == handed
                {
                    return;
                }
                continue;
            }
            notified.await;
        }
    }
}

/// A message handed to a consumer, not yet read from its stream: small, so
/// that the hand-over under the queue's lock moves a few words, and the
/// [`Delivery`] is built by the reader.
pub(crate) struct Handover {
    pub(crate) envelope: Arc<Envelope>,
    pub(crate) tag: u64,
    pub(crate) redelivered: bool,
    /// How many times a quorum queue had the message back before this
    /// delivery: the delivery's `x-delivery-count` when at least 1.
    pub(crate) returns: u32,
}

#[derive(Default)]
struct Inbox {
    buffer: VecDeque<Handover>,
    /// Deliveries a simulated delay holds back, in order; while some are
    /// held, later ones wait behind them (a channel never reorders).
    held: Option<VecDeque<Handover>>,
    ended: bool,
    waker: Option<Waker>,
}

/// What a consumer's stream, its settle handle and its queue share.
pub(crate) struct ConsumerShared {
    /// Broker-unique; orders consumers deterministically.
    pub(crate) id: u64,
    pub(crate) queue: Weak<Queue>,
    pub(crate) conn: Weak<ConnInner>,
    activity: Arc<Activity>,
    inbox: Mutex<Inbox>,
    /// The broker's fault plan, if it has one.
    faults: Option<Arc<FaultState>>,
    /// Its connection was dropped by the broker: its deliveries were
    /// requeued and can no longer be settled.
    pub(crate) lost: AtomicBool,
}

impl ConsumerShared {
    pub(crate) fn new(
        id: u64,
        queue: Weak<Queue>,
        conn: Weak<ConnInner>,
        activity: Arc<Activity>,
        faults: Option<Arc<FaultState>>,
    ) -> Self {
        ConsumerShared {
            id,
            queue,
            conn,
            activity,
            inbox: Mutex::new(Inbox::default()),
            faults,
            lost: AtomicBool::new(false),
        }
    }

    fn inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock()
    }

    /// Hands a delivery over. The queue only does so within the consumer's
    /// prefetch, so the buffer stays bounded by it.
    pub(crate) fn push(self: &Arc<Self>, handover: Handover) {
        if let Some(faults) = &self.faults {
            return self.push_faulty(faults, handover);
        }
        self.push_now(handover);
    }

    fn push_now(&self, handover: Handover) {
        let waker = {
            let mut inbox = self.inbox();
            inbox.buffer.push_back(handover);
            inbox.waker.take()
        };
        self.activity.added();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// A hand-over under a fault plan: traced, and perhaps held back.
    fn push_faulty(self: &Arc<Self>, faults: &FaultState, handover: Handover) {
        let delay = faults.on_delivery(TraceEvent::Delivery {
            queue: self.queue_name(),
            consumer: self.id,
            tag: handover.tag,
            redelivered: handover.redelivered,
            message: label(&handover.envelope.message),
        });
        let mut inbox = self.inbox();
        if let Some(held) = &mut inbox.held {
            held.push_back(handover);
            return;
        }
        let (Some(delay), Ok(runtime)) = (delay, tokio::runtime::Handle::try_current()) else {
            drop(inbox);
            return self.push_now(handover);
        };
        inbox.held = Some(VecDeque::from([handover]));
        drop(inbox);
        let me = Arc::downgrade(self);
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(me) = me.upgrade() else { return };
            let waker = {
                let mut inbox = me.inbox();
                let released = inbox.held.take().unwrap_or_default();
                // Deliveries of a consumer that ended meanwhile were requeued.
                if inbox.ended {
                    return;
                }
                for h in released {
                    inbox.buffer.push_back(h);
                    me.activity.added();
                }
                inbox.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        });
    }

    /// Ends the stream. With `discard`, deliveries not read yet are dropped
    /// (their messages were requeued); otherwise the stream yields them
    /// first.
    pub(crate) fn end(&self, discard: bool) {
        let (dropped, waker) = {
            let mut inbox = self.inbox();
            inbox.ended = true;
            inbox.held = None;
            let dropped = if discard {
                std::mem::take(&mut inbox.buffer)
            } else {
                VecDeque::new()
            };
            (dropped, inbox.waker.take())
        };
        self.activity.removed(dropped.len());
        drop(dropped);
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Handover>> {
        let mut inbox = self.inbox();
        if let Some(h) = inbox.buffer.pop_front() {
            drop(inbox);
            self.activity.removed(1);
            return Poll::Ready(Some(h));
        }
        if inbox.ended {
            return Poll::Ready(None);
        }
        match &inbox.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inbox.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The name of the queue consumed from, for error messages.
    pub(crate) fn queue_name(&self) -> String {
        self.queue
            .upgrade()
            .map_or_else(|| "(deleted)".to_owned(), |q| q.name.clone())
    }

    pub(crate) fn connection_open(&self) -> bool {
        self.conn.upgrade().is_some_and(|c| c.is_open())
    }
}

/// The stream half of a consumer. Dropping it removes the consumer and
/// requeues what it had not settled.
pub(crate) struct DeliveryStream {
    pub(crate) shared: Arc<ConsumerShared>,
    pub(crate) broker: Arc<BrokerInner>,
    /// `None` for an auto-ack consumer: its deliveries are settled already.
    pub(crate) acker: Option<Arc<dyn Acknowledger>>,
}

impl DeliveryStream {
    // Inlined so that the delivery is built where the stream returns it
    // instead of being copied there.
    #[inline]
    fn delivery(&self, handover: Handover) -> Delivery {
        let Handover {
            envelope,
            tag,
            redelivered,
            returns,
        } = handover;
        let Some(acker) = &self.acker else {
            // Nobody else holds an auto-acked message routed to one queue:
            // take it instead of copying it.
            let (mut message, exchange, routing_key) = match Arc::try_unwrap(envelope) {
                Ok(env) => (env.message, env.exchange, env.routing_key),
                Err(env) => (
                    env.message.clone(),
                    env.exchange.clone(),
                    env.routing_key.clone(),
                ),
            };
            DeliveryCount::stamp(returns, &mut message);
            return Delivery::new(message, exchange, routing_key, redelivered, tag, None);
        };
        let mut message = envelope.message.clone();
        DeliveryCount::stamp(returns, &mut message);
        Delivery::new(
            message,
            envelope.exchange.clone(),
            envelope.routing_key.clone(),
            redelivered,
            tag,
            Some(acker.clone()),
        )
    }
}

impl Stream for DeliveryStream {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.shared.poll_next(cx) {
            Poll::Ready(Some(h)) => Poll::Ready(Some(Ok(self.delivery(h)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for DeliveryStream {
    fn drop(&mut self) {
        self.broker.drop_consumer(&self.shared);
    }
}

/// Settles the deliveries of one consumer.
pub(crate) struct Settler {
    pub(crate) shared: Arc<ConsumerShared>,
    pub(crate) broker: Weak<BrokerInner>,
}

impl Settler {
    fn settle(&self, tag: u64, multiple: bool, how: Settle) -> Result<()> {
        if self.shared.lost.load(Ordering::Acquire) {
            return Err(self.lost_error(tag));
        }
        let broker = self.broker.upgrade().ok_or_else(|| {
            Error::Closed(format!(
                "cannot settle delivery {tag} of a consumer of queue '{}': the broker is gone",
                self.shared.queue_name()
            ))
        })?;
        if let Some(faults) = &broker.faults {
            if how == Settle::Ack {
                return self.ack_faulty(&broker, faults, tag, multiple);
            }
        }
        broker.settle(&self.shared, tag, multiple, how)
    }

    /// Settling a delivery of a lost link can never succeed (the broker
    /// requeued it and delivers it again): `Closed`, not temporary.
    fn lost_error(&self, tag: u64) -> Error {
        Error::Closed(format!(
            "cannot settle delivery {tag} of a consumer of queue '{}': its connection was lost \
             and the broker requeued its unsettled deliveries",
            self.shared.queue_name()
        ))
    }

    /// An ack under a fault plan.
    fn ack_faulty(
        &self,
        broker: &Arc<BrokerInner>,
        faults: &FaultState,
        tag: u64,
        multiple: bool,
    ) -> Result<()> {
        let conn = self.shared.conn.upgrade();
        let fault = faults.on_ack(conn.as_ref().map(|c| c.id()), || {
            format!("of tag {tag} on {:?}", self.shared.queue_name())
        });
        match fault {
            None => broker.settle(&self.shared, tag, multiple, Settle::Ack),
            Some(AckFault::Lose) => {
                if let Some(conn) = conn {
                    conn.lose_link("an ack was lost on the way to the broker");
                }
                Ok(())
            }
            Some(AckFault::CloseConnection) => {
                if let Some(conn) = conn {
                    conn.lose_link("the broker dropped the connection");
                }
                Err(self.lost_error(tag))
            }
            Some(AckFault::RestartBroker) => {
                broker.restart();
                Err(self.lost_error(tag))
            }
        }
    }
}

#[async_trait]
impl Acknowledger for Settler {
    async fn ack(&self, tag: u64, options: AckOptions) -> Result<()> {
        self.settle(tag, options.multiple, Settle::Ack)
    }

    async fn nack(&self, tag: u64, options: NackOptions) -> Result<()> {
        self.settle(tag, options.multiple, nack_settle(options))
    }

    // Settling never waits here: no future to allocate per ack.
    fn ack_now(&self, tag: u64, options: AckOptions) -> Option<Result<()>> {
        Some(self.settle(tag, options.multiple, Settle::Ack))
    }

    fn nack_now(&self, tag: u64, options: NackOptions) -> Option<Result<()>> {
        Some(self.settle(tag, options.multiple, nack_settle(options)))
    }
}

fn nack_settle(options: NackOptions) -> Settle {
    match options.requeue {
        Requeue::Yes => Settle::Requeue,
        Requeue::No => Settle::Reject,
    }
}

/// Cancels one consumer.
pub(crate) struct Control {
    pub(crate) shared: Arc<ConsumerShared>,
    pub(crate) broker: Weak<BrokerInner>,
}

#[async_trait]
impl ConsumerControl for Control {
    async fn cancel(&self) -> Result<()> {
        if !self.shared.connection_open() {
            return Err(Error::Closed(format!(
                "cannot cancel a consumer of queue '{}': its connection is closed",
                self.shared.queue_name()
            )));
        }
        if let Some(broker) = self.broker.upgrade() {
            broker.cancel_consumer(&self.shared);
        }
        Ok(())
    }
}
