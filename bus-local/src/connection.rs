//! A connection to the in-process broker.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bus_core::recovery::{BindingRecord, ExchangeBindingRecord};
use bus_core::sync::Mutex;
use bus_core::{
    classic_reply_queue, Capabilities, Connection, ConsumeOptions, Consumer, DeleteExchangeOptions,
    DeleteQueueOptions, Error, ExchangeKind, ExchangeOptions, FieldTable, Message, PublishNow,
    PublishOptions, QueueInfo, QueueOptions, RecoveryEvent, ReplyQueue, Result,
};
use tokio::sync::broadcast;

use crate::broker::BrokerInner;
use crate::consumer::ConsumerShared;
use crate::faults::{Fault, PublishFault, TraceEvent};
use crate::queue::{Envelope, Queue};
use crate::recovery::RecoveryState;

/// The link is up.
const OPEN: u8 = 0;
/// The broker dropped the link; a recovery will bring it back.
const DOWN: u8 = 1;
/// The application closed the connection.
const CLOSED: u8 = 2;
/// The broker dropped the link and the connection does not recover.
const LOST: u8 = 3;

/// What every clone of a [`LocalConnection`] shares. Dropping the last one
/// closes the connection.
pub(crate) struct ConnInner {
    /// The id of the current link: a recovery gives a new one, as a new
    /// connection to RabbitMQ is a new connection to the broker.
    id: AtomicU64,
    pub(crate) broker: Arc<BrokerInner>,
    state: AtomicU8,
    /// Why the broker dropped it, for the errors of a lost connection.
    lost_reason: Mutex<String>,
    /// Live consumers by id, so closing ends them in a fixed order.
    consumers: Mutex<BTreeMap<u64, Arc<ConsumerShared>>>,
    /// Exclusive queues this connection declared.
    exclusive: Mutex<Vec<Arc<Queue>>>,
    /// Present when the connection recovers from being dropped.
    pub(crate) recovery: Option<RecoveryState>,
    /// A fault plan or recovery is in force: operations take the slow path.
    slow: bool,
}

impl ConnInner {
    pub(crate) fn id(&self) -> u64 {
        self.id.load(Ordering::Acquire)
    }

    pub(crate) fn is_open(&self) -> bool {
        matches!(self.state.load(Ordering::Acquire), OPEN | DOWN)
    }

    pub(crate) fn register_consumer(&self, consumer: Arc<ConsumerShared>) {
        self.consumers.lock().insert(consumer.id, consumer);
    }

    pub(crate) fn unregister_consumer(&self, id: u64) {
        self.consumers.lock().remove(&id);
    }

    /// Ends the consumers (requeueing what they hold) and deletes the
    /// exclusive queues, as the broker does when a connection goes.
    fn teardown(&self, lost: bool) {
        let consumers = std::mem::take(&mut *self.consumers.lock());
        for consumer in consumers.values() {
            if lost {
                consumer.lost.store(true, Ordering::Release);
            }
            self.broker.drop_consumer(consumer);
        }
        let exclusive = std::mem::take(&mut *self.exclusive.lock());
        for queue in &exclusive {
            self.broker.remove_queue(queue);
        }
    }

    fn close(&self) {
        let previous = self.state.swap(CLOSED, Ordering::AcqRel);
        if previous == CLOSED || previous == LOST {
            self.state.store(previous, Ordering::Release);
            return;
        }
        if let Some(recovery) = &self.recovery {
            recovery.closed();
        }
        self.teardown(false);
    }

    /// The broker drops the link (a simulated fault, or
    /// [`LocalBroker::close_connection`](crate::LocalBroker::close_connection)):
    /// consumers end and their unacked deliveries are requeued with
    /// `redelivered`, exclusive queues go. A recovering connection comes
    /// back after the plan's reconnection delay; another stays lost.
    pub(crate) fn lose_link(self: &Arc<Self>, reason: &str) {
        if self.drop_link(reason) {
            self.schedule_recovery();
        }
    }

    /// [`ConnInner::lose_link`] without scheduling the recovery; returns
    /// whether one must be scheduled.
    pub(crate) fn drop_link(self: &Arc<Self>, reason: &str) -> bool {
        let next = if self.recovery.is_some() { DOWN } else { LOST };
        if self
            .state
            .compare_exchange(OPEN, next, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        *self.lost_reason.lock() = reason.to_owned();
        if let Some(recovery) = &self.recovery {
            recovery.link_lost(reason);
        }
        self.teardown(true);
        if let Some(recovery) = &self.recovery {
            recovery.emit(RecoveryEvent::Disconnected {
                reason: reason.to_owned(),
            });
        }
        self.recovery.is_some()
    }

    /// Reconnects after the plan's delay, on tokio's clock.
    pub(crate) fn schedule_recovery(self: &Arc<Self>) {
        let delay = self
            .broker
            .faults
            .as_ref()
            .map_or(std::time::Duration::from_millis(50), |f| {
                f.reconnect_delay()
            });
        let weak = Arc::downgrade(self);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Some(conn) = weak.upgrade() {
                        conn.recover();
                    }
                });
            }
            Err(_) => self.recover(),
        }
    }

    /// The link comes back: a new id, the journal declared again, the
    /// consumers resumed.
    fn recover(self: &Arc<Self>) {
        let Some(recovery) = &self.recovery else {
            return;
        };
        if self.state.load(Ordering::Acquire) != DOWN {
            return;
        }
        let old = self.id();
        let id = self.broker.next_id();
        self.id.store(id, Ordering::Release);
        let generation = recovery.replay_topology(self, id);
        self.state.store(OPEN, Ordering::Release);
        if let Some(faults) = &self.broker.faults {
            faults.note(TraceEvent::Reconnected {
                connection: old,
                now: id,
                generation,
            });
        }
        recovery.emit(RecoveryEvent::Reconnected {
            host: self.host(),
            generation,
        });
        recovery.up.notify_waiters();
        recovery.resume_consumers(self);
    }

    pub(crate) fn host(&self) -> String {
        match &self.broker.name {
            Some(name) => format!("memory://{name}"),
            None => "memory://".to_owned(),
        }
    }

    pub(crate) fn track_exclusive(&self, queue: Arc<Queue>) {
        let mut exclusive = self.exclusive.lock();
        exclusive.retain(|q| !q.lock().deleted);
        exclusive.push(queue);
    }

    fn closed_error(&self, state: u8) -> Error {
        if state == LOST {
            let reason = self.lost_reason.lock().clone();
            Error::ConnectionLost(format!(
                "local connection {} was dropped by the broker ({reason}) and does not recover",
                self.id()
            ))
        } else {
            Error::Closed(format!(
                "local connection {} is closed; open a new one with LocalBroker::connect",
                self.id()
            ))
        }
    }

    /// The broker, once the link is up: at once when it is, after the
    /// recovery when it is down.
    pub(crate) async fn ready(&self) -> Result<&Arc<BrokerInner>> {
        loop {
            let state = self.state.load(Ordering::Acquire);
            match (state, &self.recovery) {
                (OPEN, _) => return Ok(&self.broker),
                (DOWN, Some(recovery)) => {
                    let up = recovery.up.notified();
                    tokio::pin!(up);
                    up.as_mut().enable();
                    if self.state.load(Ordering::Acquire) == DOWN {
                        up.await;
                    }
                }
                _ => return Err(self.closed_error(state)),
            }
        }
    }

    /// Refuses a declaration when the fault plan says so.
    fn check_declare(&self, what: impl FnOnce() -> String) -> Result<()> {
        let Some(faults) = &self.broker.faults else {
            return Ok(());
        };
        let mut detail = None;
        if faults.on_declare(self.id(), || {
            let d = what();
            detail = Some(d.clone());
            d
        }) {
            return Err(Error::ResourceLocked(
                format!(
                    "{} refused by the broker (simulated fault); retrying can succeed",
                    detail.unwrap_or_default()
                )
                .into(),
            ));
        }
        Ok(())
    }

    /// The current name of the queue the application names `name` (the
    /// same, borrowed, unless a recovery renamed it).
    fn resolve<'a>(&self, name: &'a str) -> Cow<'a, str> {
        match &self.recovery {
            Some(r) => Cow::Owned(r.resolve(name)),
            None => Cow::Borrowed(name),
        }
    }

    fn journal(&self, f: impl FnOnce(&mut bus_core::recovery::Journal)) {
        if let Some(r) = &self.recovery {
            f(&mut r.journal());
        }
    }
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.close();
    }
}

/// How a connection meets the broker dropping it (see
/// [`LocalBroker::connect_with`](crate::LocalBroker::connect_with)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// It reconnects, declares its topology again, renames its server-named
    /// queues and resumes its consumers, as bus-amqp does on RabbitMQ,
    /// reporting each step on [`LocalConnection::events`].
    Enabled,
    /// It stays lost, as a process that died: every call fails with
    /// `ConnectionLost`.
    Disabled,
}

/// A connection to a [`LocalBroker`](crate::LocalBroker), implementing
/// [`Connection`].
///
/// Clones share the connection. It closes on [`Connection::close`] or when
/// its last clone is dropped: its consumers' streams end, the deliveries they
/// had not settled are requeued with `redelivered` set, and the exclusive
/// queues it declared are deleted. Every call on a closed connection fails
/// with [`Error::Closed`].
///
/// The broker can also drop it (a simulated fault). Without recovery, every
/// call then fails with [`Error::ConnectionLost`]. With recovery (the
/// default on a broker with a fault plan), calls made while it is down wait
/// for the reconnection; see the crate documentation.
#[derive(Clone)]
pub struct LocalConnection {
    pub(crate) inner: Arc<ConnInner>,
}

impl fmt::Debug for LocalConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalConnection")
            .field("id", &self.inner.id())
            .field("broker", &self.inner.broker.name)
            .field("open", &self.inner.is_open())
            .finish()
    }
}

impl LocalConnection {
    pub(crate) fn new(broker: Arc<BrokerInner>, recovery: Recovery) -> Self {
        let recovery = (recovery == Recovery::Enabled).then(RecoveryState::new);
        let slow = recovery.is_some() || broker.faults.is_some();
        let inner = Arc::new(ConnInner {
            id: AtomicU64::new(broker.next_id()),
            broker,
            state: AtomicU8::new(OPEN),
            lost_reason: Mutex::new(String::new()),
            consumers: Mutex::new(BTreeMap::new()),
            exclusive: Mutex::new(Vec::new()),
            recovery,
            slow,
        });
        inner.broker.register_connection(&inner);
        LocalConnection { inner }
    }

    fn broker(&self) -> Result<&Arc<BrokerInner>> {
        let state = self.inner.state.load(Ordering::Acquire);
        if state == OPEN {
            Ok(&self.inner.broker)
        } else {
            Err(self.inner.closed_error(state))
        }
    }

    /// The capabilities of the in-process broker (also
    /// [`Connection::capabilities`]).
    #[must_use]
    pub fn local_capabilities() -> Capabilities {
        let mut caps = Capabilities::all("local");
        caps.durability = false;
        caps.cross_process = false;
        caps.plugin_exchange_kinds = false;
        caps.quorum_queues = false;
        caps.direct_reply = false;
        caps
    }

    /// The id of the connection's current link, as the broker's
    /// [`Trace`](crate::Trace) names it; a recovery gives a new one.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.inner.id()
    }

    /// Whether the connection recovers when the broker drops it.
    #[must_use]
    pub fn recovers(&self) -> bool {
        self.inner.recovery.is_some()
    }

    /// Recovery events from now on (the same [`RecoveryEvent`]s bus-amqp
    /// reports). A connection that does not recover never sends any. A
    /// receiver that falls more than 1024 events behind loses the oldest.
    #[must_use]
    pub fn events(&self) -> broadcast::Receiver<RecoveryEvent> {
        match &self.inner.recovery {
            Some(r) => r.events.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Counts links: 1 for the first, +1 for each recovery.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.inner
            .recovery
            .as_ref()
            .map_or(1, RecoveryState::generation)
    }

    /// The current name of a queue the application knows as `name`: the
    /// same name, except for a server-named queue this connection declared
    /// that a recovery declared again under a new name.
    #[must_use]
    pub fn current_queue_name(&self, name: &str) -> String {
        self.inner.resolve(name).into_owned()
    }

    /// A publish under a fault plan or with recovery.
    async fn publish_slow(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        options: PublishOptions,
    ) -> Result<()> {
        let broker = self.inner.ready().await?.clone();
        let routing_key = if exchange.is_empty() {
            self.inner.resolve(routing_key)
        } else {
            Cow::Borrowed(routing_key)
        };
        let fault = broker.faults.as_ref().and_then(|f| {
            f.on_publish(self.inner.id(), || {
                format!(
                    "of {:?} to {exchange:?} with key {routing_key:?}",
                    crate::faults::label(&message)
                )
            })
        });
        let envelope = Envelope::published(exchange, &routing_key, message);
        let lost = |what: &str| {
            Error::ConnectionLost(format!(
                "the connection was lost before the broker confirmed the publish ({what})"
            ))
        };
        match fault {
            None => broker.publish(envelope, options.mandatory),
            Some(PublishFault::CloseConnection) => {
                self.inner.lose_link("the broker dropped the connection");
                Err(lost("the message was not taken"))
            }
            Some(PublishFault::LoseConfirm) => {
                let taken = broker.publish(envelope, options.mandatory);
                self.inner
                    .lose_link("the connection dropped before a confirm");
                taken?;
                Err(lost("the broker may hold the message"))
            }
            Some(PublishFault::Nack) => Err(Error::Nacked(
                "the broker nacked the publish (simulated fault); retrying can succeed".into(),
            )),
            Some(PublishFault::RestartBroker) => {
                broker.restart();
                Err(lost("the broker restarted"))
            }
        }
    }

    async fn consume_slow(&self, queue: &str, options: ConsumeOptions) -> Result<Consumer> {
        let broker = self.inner.ready().await?;
        match &self.inner.recovery {
            Some(recovery) => recovery.consume(&self.inner, queue, options).await,
            None => broker.consume(&self.inner, queue, options, 1),
        }
    }
}

/// What every publish does first, on the fast path and the slow one alike:
/// its debug event, and the current span's trace in the message.
fn stamp(exchange: &str, routing_key: &str, message: &mut Message) {
    tracing::debug!(exchange, routing_key, "publish");
    bus_core::propagation::trace(message);
}

#[async_trait]
impl Connection for LocalConnection {
    fn capabilities(&self) -> Capabilities {
        Self::local_capabilities()
    }

    async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
    ) -> Result<()> {
        tracing::debug!(exchange = name, ?kind, "declare exchange");
        if !self.inner.slow {
            return self.broker()?.declare_exchange(name, &kind, &options);
        }
        let broker = self.inner.ready().await?;
        self.inner
            .check_declare(|| format!("of exchange {name:?}"))?;
        broker.declare_exchange(name, &kind, &options)?;
        if !options.passive {
            self.inner
                .journal(|j| j.record_exchange(name, kind, options));
        }
        Ok(())
    }

    async fn delete_exchange(&self, name: &str, options: DeleteExchangeOptions) -> Result<()> {
        tracing::debug!(
            exchange = name,
            if_unused = options.if_unused,
            "delete exchange"
        );
        let broker = self.inner.ready().await?;
        broker.delete_exchange(name, options.if_unused)?;
        self.inner.journal(|j| j.forget_exchange(name));
        Ok(())
    }

    async fn declare_queue(&self, name: &str, options: QueueOptions) -> Result<QueueInfo> {
        tracing::debug!(queue = name, durable = options.durable, "declare queue");
        let broker = if self.inner.slow {
            let broker = self.inner.ready().await?;
            self.inner.check_declare(|| format!("of queue {name:?}"))?;
            broker
        } else {
            self.broker()?
        };
        let current = self.inner.resolve(name);
        let (mut info, created) = broker.declare_queue(self.inner.id(), &current, &options)?;
        if let Some(queue) = created {
            self.inner.track_exclusive(queue);
        }
        if !options.passive {
            let actual = info.name.clone();
            self.inner
                .journal(|j| j.record_queue(name, &actual, options));
        }
        if !name.is_empty() {
            name.clone_into(&mut info.name);
        }
        Ok(info)
    }

    async fn delete_queue(&self, name: &str, options: DeleteQueueOptions) -> Result<u32> {
        tracing::debug!(queue = name, "delete queue");
        let broker = self.inner.ready().await?;
        let n = broker.delete_queue(self.inner.id(), &self.inner.resolve(name), options)?;
        self.inner.journal(|j| j.forget_queue(name));
        Ok(n)
    }

    async fn purge_queue(&self, name: &str) -> Result<u32> {
        let broker = self.inner.ready().await?;
        broker.purge_queue(self.inner.id(), &self.inner.resolve(name))
    }

    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        tracing::debug!(queue, exchange, routing_key, "bind queue");
        let broker = self.inner.ready().await?;
        if self.inner.slow {
            self.inner
                .check_declare(|| format!("binding {queue:?} to {exchange:?}"))?;
        }
        broker.bind(
            self.inner.id(),
            &self.inner.resolve(queue),
            exchange,
            routing_key,
            arguments.clone(),
        )?;
        self.inner.journal(|j| {
            j.record_binding(BindingRecord {
                queue: queue.to_owned(),
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                arguments,
            });
        });
        Ok(())
    }

    async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        tracing::debug!(queue, exchange, routing_key, "unbind queue");
        let broker = self.inner.ready().await?;
        broker.unbind(
            &self.inner.resolve(queue),
            exchange,
            routing_key,
            arguments.clone(),
        )?;
        self.inner.journal(|j| {
            j.forget_binding(&BindingRecord {
                queue: queue.to_owned(),
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                arguments,
            });
        });
        Ok(())
    }

    async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        tracing::debug!(destination, source, routing_key, "bind exchange");
        let broker = self.inner.ready().await?;
        if self.inner.slow {
            self.inner
                .check_declare(|| format!("binding {destination:?} to {source:?}"))?;
        }
        broker.bind_exchange(destination, source, routing_key, arguments.clone())?;
        self.inner.journal(|j| {
            j.record_exchange_binding(ExchangeBindingRecord {
                destination: destination.to_owned(),
                source: source.to_owned(),
                routing_key: routing_key.to_owned(),
                arguments,
            });
        });
        Ok(())
    }

    async fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        tracing::debug!(destination, source, routing_key, "unbind exchange");
        let broker = self.inner.ready().await?;
        broker.unbind_exchange(destination, source, routing_key, arguments.clone())?;
        self.inner.journal(|j| {
            j.forget_exchange_binding(&ExchangeBindingRecord {
                destination: destination.to_owned(),
                source: source.to_owned(),
                routing_key: routing_key.to_owned(),
                arguments,
            });
        });
        Ok(())
    }

    // Written out rather than through `async_trait`: the message moves into
    // its shared envelope here, once, instead of into the boxed future and
    // out of it again. Nothing is published until the future is polled.
    fn publish<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        exchange: &'life1 str,
        routing_key: &'life2 str,
        mut message: Message,
        options: PublishOptions,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        stamp(exchange, routing_key, &mut message);
        if self.inner.slow {
            return Box::pin(self.publish_slow(exchange, routing_key, message, options));
        }
        let envelope = Envelope::published(exchange, routing_key, message);
        Box::pin(async move { self.broker()?.publish(envelope, options.mandatory) })
    }

    // Without simulated faults or recovery a publish never waits: it is
    // done here, with no future to allocate.
    fn publish_now(
        &self,
        exchange: &str,
        routing_key: &str,
        mut message: Message,
        options: PublishOptions,
    ) -> PublishNow {
        if self.inner.slow {
            // `publish` takes it from here (and logs it).
            return PublishNow::Wait(message);
        }
        stamp(exchange, routing_key, &mut message);
        let broker = match self.broker() {
            Ok(broker) => broker,
            Err(e) => return PublishNow::Done(Err(e)),
        };
        let envelope = Envelope::published(exchange, routing_key, message);
        PublishNow::Done(broker.publish(envelope, options.mandatory))
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Consumer> {
        if self.inner.slow {
            return self.consume_slow(queue, options).await;
        }
        self.broker()?.consume(&self.inner, queue, options, 1)
    }

    async fn reply_queue(&self) -> Result<ReplyQueue> {
        classic_reply_queue(self).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close();
        Ok(())
    }

    fn is_open(&self) -> bool {
        self.inner.is_open()
    }
}

/// Lets the broker drop a connection given by the application.
pub(crate) fn drop_from_broker(conn: &LocalConnection, reason: &str) {
    if let Some(faults) = &conn.inner.broker.faults {
        faults.on_commanded(
            Some(conn.inner.id()),
            Fault::CloseConnection,
            reason.to_owned(),
        );
    }
    conn.inner.lose_link(reason);
}
