//! A connection to the in-process broker.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bus_core::{
    classic_reply_queue, Capabilities, Connection, ConsumeOptions, Consumer, DeleteQueueOptions,
    Error, ExchangeKind, ExchangeOptions, FieldTable, Message, PublishOptions, QueueInfo,
    QueueOptions, ReplyQueue, Result,
};

use crate::broker::BrokerInner;
use crate::consumer::ConsumerShared;
use crate::queue::{Envelope, Queue};

/// What every clone of a [`LocalConnection`] shares. Dropping the last one
/// closes the connection.
pub(crate) struct ConnInner {
    pub(crate) id: u64,
    broker: Arc<BrokerInner>,
    open: AtomicBool,
    /// Live consumers by id, so closing ends them in a fixed order.
    consumers: Mutex<BTreeMap<u64, Arc<ConsumerShared>>>,
    /// Exclusive queues this connection declared.
    exclusive: Mutex<Vec<Arc<Queue>>>,
}

impl ConnInner {
    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    pub(crate) fn register_consumer(&self, consumer: Arc<ConsumerShared>) {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(consumer.id, consumer);
    }

    pub(crate) fn unregister_consumer(&self, id: u64) {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn close(&self) {
        if !self.open.swap(false, Ordering::AcqRel) {
            return;
        }
        let consumers =
            std::mem::take(&mut *self.consumers.lock().unwrap_or_else(|p| p.into_inner()));
        for consumer in consumers.values() {
            self.broker.drop_consumer(consumer);
        }
        let exclusive =
            std::mem::take(&mut *self.exclusive.lock().unwrap_or_else(|p| p.into_inner()));
        for queue in &exclusive {
            self.broker.remove_queue(queue);
        }
    }
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.close();
    }
}

/// A connection to a [`LocalBroker`](crate::LocalBroker), implementing
/// [`Connection`].
///
/// Clones share the connection. It closes on [`Connection::close`] or when
/// its last clone is dropped: its consumers' streams end, the deliveries they
/// had not settled are requeued with `redelivered` set, and the exclusive
/// queues it declared are deleted. Every call on a closed connection fails
/// with [`Error::Closed`].
#[derive(Clone)]
pub struct LocalConnection {
    inner: Arc<ConnInner>,
}

impl fmt::Debug for LocalConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalConnection")
            .field("id", &self.inner.id)
            .field("broker", &self.inner.broker.name)
            .field("open", &self.inner.is_open())
            .finish()
    }
}

impl LocalConnection {
    pub(crate) fn new(broker: Arc<BrokerInner>) -> Self {
        LocalConnection {
            inner: Arc::new(ConnInner {
                id: broker.next_id(),
                broker,
                open: AtomicBool::new(true),
                consumers: Mutex::new(BTreeMap::new()),
                exclusive: Mutex::new(Vec::new()),
            }),
        }
    }

    fn broker(&self) -> Result<&Arc<BrokerInner>> {
        if self.inner.is_open() {
            Ok(&self.inner.broker)
        } else {
            Err(Error::Closed(format!(
                "local connection {} is closed; open a new one with LocalBroker::connect",
                self.inner.id
            )))
        }
    }

    /// The capabilities of the in-process broker (also
    /// [`Connection::capabilities`]).
    #[must_use]
    pub fn local_capabilities() -> Capabilities {
        Capabilities {
            durability: false,
            cross_process: false,
            quorum_queues: false,
            direct_reply: false,
            ..Capabilities::all("local")
        }
    }
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
        self.broker()?.declare_exchange(name, kind, &options)
    }

    async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<()> {
        self.broker()?.delete_exchange(name, if_unused)
    }

    async fn declare_queue(&self, name: &str, options: QueueOptions) -> Result<QueueInfo> {
        tracing::debug!(queue = name, durable = options.durable, "declare queue");
        let (info, created) = self
            .broker()?
            .declare_queue(self.inner.id, name, &options)?;
        if let Some(queue) = created {
            let mut exclusive = self
                .inner
                .exclusive
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            exclusive.retain(|q| !q.lock().deleted);
            exclusive.push(queue);
        }
        Ok(info)
    }

    async fn delete_queue(&self, name: &str, options: DeleteQueueOptions) -> Result<u32> {
        self.broker()?.delete_queue(self.inner.id, name, options)
    }

    async fn purge_queue(&self, name: &str) -> Result<u32> {
        self.broker()?.purge_queue(self.inner.id, name)
    }

    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        self.broker()?
            .bind(self.inner.id, queue, exchange, routing_key, arguments)
    }

    async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        self.broker()?
            .unbind(queue, exchange, routing_key, arguments)
    }

    // Written out rather than through `async_trait`: the message moves into
    // its shared envelope here, once, instead of into the boxed future and
    // out of it again. Nothing is published until the future is polled.
    fn publish<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        exchange: &'life1 str,
        routing_key: &'life2 str,
        message: Message,
        options: PublishOptions,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        tracing::debug!(exchange, routing_key, "publish");
        let envelope = Arc::new(Envelope::published(exchange, routing_key, message));
        Box::pin(async move { self.broker()?.publish(envelope, options.mandatory) })
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Consumer> {
        self.broker()?.consume(&self.inner, queue, options)
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
