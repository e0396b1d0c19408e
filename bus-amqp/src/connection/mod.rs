//! [`AmqpConnection`]: the bus transport contract on one RabbitMQ
//! connection, with its channels and its recovery.
//!
//! By concern: [`state`] holds what every handle shares and the link,
//! [`topology`] the topology channel, journal and names, [`consumers`] the
//! consumers alive (their channel budget, and whether this connection
//! deleted their queue) and their coalesced acks, [`recovery`] the
//! supervisor and the journal's replay; this module the public type and
//! the trait impl.

mod consumers;
mod recovery;
mod state;
mod topology;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bus_core::{
    classic_reply_queue, validate_name, Capabilities, Connection, ConsumeOptions, Consumer,
    DeleteExchangeOptions, DeleteQueueOptions, ExchangeKind, ExchangeOptions, FieldTable, Message,
    PublishOptions, QueueInfo, QueueOptions, ReplyQueue, Result,
};
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, ExchangeUnbindOptions,
    QueueBindOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use tokio::sync::{broadcast, watch};

use self::recovery::supervise;
pub(crate) use self::state::Shared;
use self::topology::{lapin_kind, queue_declare_options};
use crate::consume::{self, ConsumerSpec, DIRECT_REPLY_TO};
use crate::convert::{short, table_to_amqp};
use crate::events::RecoveryEvent;
use crate::journal::{BindingRecord, ExchangeBindingRecord};
use crate::link::{connect_any, LinkState};
use crate::options::{AmqpOptions, ReplyMode};
use crate::publish::{publish_via, ChannelSource, ReplyPublisher};
use crate::url::AmqpUrl;

/// A connection to RabbitMQ (or any AMQP 0-9-1 broker) implementing the bus
/// transport contract. See the crate documentation for the channel model
/// and what recovery does.
///
/// Cheap to share as `Arc<AmqpConnection>` or `Arc<dyn Connection>`.
pub struct AmqpConnection {
    shared: Arc<Shared>,
}

impl fmt::Debug for AmqpConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.describe_state();
        f.debug_struct("AmqpConnection")
            .field("url", &self.shared.url.redacted())
            .field("name", &self.shared.options.connection_name)
            .field("state", &state)
            .finish()
    }
}

/// A binding on the wire: destination, source, routing key, arguments.
type WireBinding = (
    lapin::types::ShortString,
    lapin::types::ShortString,
    lapin::types::ShortString,
    lapin::types::FieldTable,
);

impl AmqpConnection {
    /// Connects with default [`AmqpOptions`].
    ///
    /// # Errors
    /// `InvalidArgument` for a malformed URL; `AccessRefused` for refused
    /// credentials; `NotFound` for a missing virtual host; `ConnectionLost`
    /// when no node answers. Messages never show the credentials.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, AmqpOptions::default()).await
    }

    /// Connects with these options; `options.hosts` are tried after the
    /// URL's own hosts.
    ///
    /// # Errors
    /// As [`AmqpConnection::connect`].
    pub async fn connect_with(url: &str, options: AmqpOptions) -> Result<Self> {
        let url = AmqpUrl::parse(url)?;
        Self::connect_url(url, options).await
    }

    /// Connects to a parsed URL.
    ///
    /// # Errors
    /// As [`AmqpConnection::connect`].
    pub async fn connect_url(mut url: AmqpUrl, options: AmqpOptions) -> Result<Self> {
        for h in &options.hosts {
            if !url.hosts.contains(h) {
                url.hosts.push(h.clone());
            }
        }
        let (link, events) = connect_any(&url, &options, 1).await?;
        let status = link.conn.status().clone();
        let shared = Arc::new(Shared::new(url, options, link));
        let poke = shared.poke_handle();
        tokio::spawn(supervise(Arc::downgrade(&shared), poke, status, events, 1));
        Ok(AmqpConnection { shared })
    }

    /// Recovery events from now on. A receiver that falls more than 1024
    /// events behind loses the oldest (see [`broadcast::Receiver`]).
    #[must_use]
    pub fn events(&self) -> broadcast::Receiver<RecoveryEvent> {
        self.shared.subscribe_events()
    }

    /// The node currently connected to (`host:port`), `None` while
    /// reconnecting or once closed.
    #[must_use]
    pub fn current_host(&self) -> Option<String> {
        self.shared.current_host()
    }

    /// Counts links: 1 for the first connection, +1 for each recovery.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.shared.up_generation().unwrap_or(0)
    }

    /// The URL connected to, credentials hidden.
    #[must_use]
    pub fn redacted_url(&self) -> String {
        self.shared.url.redacted()
    }

    /// The options in force.
    #[must_use]
    pub fn options(&self) -> &AmqpOptions {
        &self.shared.options
    }

    /// The current name of a queue the application knows as `name`: the
    /// same name, except for a server-named queue declared by this
    /// connection and declared again (with a new name) by a recovery.
    #[must_use]
    pub fn current_queue_name(&self, name: &str) -> String {
        self.shared.resolve_queue(name)
    }

    /// A binding's names and arguments checked and made ready for the
    /// wire: the bound `destination` (a queue, under its current name, or
    /// an exchange, as `kind` says), the `source` exchange, the key.
    fn wire_binding(
        &self,
        kind: &'static str,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<WireBinding> {
        validate_name(kind, destination)?;
        validate_name("exchange", source)?;
        let destination = if kind == "queue" {
            short("queue name", &self.shared.resolve_queue(destination))?
        } else {
            short("exchange name", destination)?
        };
        Ok((
            destination,
            short("exchange name", source)?,
            short("routing key", routing_key)?,
            table_to_amqp(arguments)?,
        ))
    }
}

#[async_trait]
impl Connection for AmqpConnection {
    fn capabilities(&self) -> Capabilities {
        crate::capabilities(self.shared.options.reply_mode)
    }

    async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
    ) -> Result<()> {
        tracing::debug!(exchange = name, ?kind, "declare exchange");
        validate_name("exchange", name)?;
        if !options.passive {
            kind.validate()?;
        }
        let exchange = short("exchange name", name)?;
        let arguments = table_to_amqp(&options.arguments)?;
        let declare = ExchangeDeclareOptions {
            passive: options.passive,
            durable: options.durable,
            auto_delete: options.auto_delete,
            internal: options.internal,
            nowait: false,
        };
        let lapin_kind = lapin_kind(&kind);
        self.shared
            .topology_op(move |ch| async move {
                ch.exchange_declare(exchange, lapin_kind, declare, arguments)
                    .await
            })
            .await?;
        if !options.passive {
            self.shared.journal().record_exchange(name, kind, options);
        }
        Ok(())
    }

    async fn delete_exchange(&self, name: &str, options: DeleteExchangeOptions) -> Result<()> {
        tracing::debug!(
            exchange = name,
            if_unused = options.if_unused,
            "delete exchange"
        );
        validate_name("exchange", name)?;
        let if_unused = options.if_unused;
        let exchange = short("exchange name", name)?;
        self.shared
            .topology_op(move |ch| async move {
                ch.exchange_delete(
                    exchange,
                    ExchangeDeleteOptions {
                        if_unused,
                        nowait: false,
                    },
                )
                .await
            })
            .await?;
        self.shared.journal().forget_exchange(name);
        self.shared.forget_known_exchange(name);
        Ok(())
    }

    async fn declare_queue(&self, name: &str, options: QueueOptions) -> Result<QueueInfo> {
        tracing::debug!(queue = name, durable = options.durable, "declare queue");
        validate_name("queue", name)?;
        let current = self.shared.resolve_queue(name);
        let queue = short("queue name", &current)?;
        let table = options.arguments.to_table();
        // Known arguments of the wrong type (a string `x-delivery-limit`,
        // which RabbitMQ 3.x would silently ignore) are refused here.
        bus_core::QueueArguments::from_table(&table)?;
        let arguments = table_to_amqp(&table)?;
        let declare = queue_declare_options(&options);
        let declared = self
            .shared
            .topology_op(move |ch| async move { ch.queue_declare(queue, declare, arguments).await })
            .await?;
        let actual = declared.name().as_str().to_owned();
        if !options.passive {
            self.shared.journal().record_queue(name, &actual, options);
        }
        Ok(QueueInfo {
            name: if name.is_empty() {
                actual
            } else {
                name.to_owned()
            },
            message_count: declared.message_count(),
            consumer_count: declared.consumer_count(),
        })
    }

    async fn delete_queue(&self, name: &str, options: DeleteQueueOptions) -> Result<u32> {
        tracing::debug!(queue = name, "delete queue");
        validate_name("queue", name)?;
        let current = self.shared.resolve_queue(name);
        let queue = short("queue name", &current)?;
        // Before sending: the broker may cancel the queue's consumers
        // before it answers.
        let deletion = self.shared.deleting_queue(&current);
        let count = self
            .shared
            .topology_op(move |ch| async move {
                ch.queue_delete(
                    queue,
                    QueueDeleteOptions {
                        if_unused: options.if_unused,
                        if_empty: options.if_empty,
                        nowait: false,
                    },
                )
                .await
            })
            .await;
        let count = match count {
            Ok(count) => count,
            // The broker answered no: nothing was deleted. A temporary
            // error leaves the outcome unknown, and the deletion marks the
            // consumers as it goes.
            Err(e) if !e.is_temporary() || matches!(e, bus_core::Error::ResourceLocked(_)) => {
                deletion.refused();
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        // Before the journal forgets the queue: its consumers are found by
        // the names it resolves.
        deletion.succeeded();
        self.shared.journal().forget_queue(name);
        Ok(count)
    }

    async fn purge_queue(&self, name: &str) -> Result<u32> {
        validate_name("queue", name)?;
        let queue = short("queue name", &self.shared.resolve_queue(name))?;
        self.shared
            .topology_op(move |ch| async move {
                ch.queue_purge(queue, QueuePurgeOptions::default()).await
            })
            .await
    }

    async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        tracing::debug!(queue, exchange, routing_key, "bind queue");
        let (q, x, k, args) =
            self.wire_binding("queue", queue, exchange, routing_key, &arguments)?;
        self.shared
            .topology_op(move |ch| async move {
                ch.queue_bind(q, x, k, QueueBindOptions::default(), args)
                    .await
            })
            .await?;
        self.shared.journal().record_binding(BindingRecord {
            queue: queue.to_owned(),
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments,
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
        let (q, x, k, args) =
            self.wire_binding("queue", queue, exchange, routing_key, &arguments)?;
        self.shared
            .topology_op(move |ch| async move { ch.queue_unbind(q, x, k, args).await })
            .await?;
        self.shared.journal().forget_binding(&BindingRecord {
            queue: queue.to_owned(),
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments,
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
        let (d, x, k, args) =
            self.wire_binding("exchange", destination, source, routing_key, &arguments)?;
        self.shared
            .topology_op(move |ch| async move {
                ch.exchange_bind(d, x, k, ExchangeBindOptions::default(), args)
                    .await
            })
            .await?;
        self.shared
            .journal()
            .record_exchange_binding(ExchangeBindingRecord {
                destination: destination.to_owned(),
                source: source.to_owned(),
                routing_key: routing_key.to_owned(),
                arguments,
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
        let (d, x, k, args) =
            self.wire_binding("exchange", destination, source, routing_key, &arguments)?;
        self.shared
            .topology_op(move |ch| async move {
                ch.exchange_unbind(d, x, k, ExchangeUnbindOptions::default(), args)
                    .await
            })
            .await?;
        self.shared
            .journal()
            .forget_exchange_binding(&ExchangeBindingRecord {
                destination: destination.to_owned(),
                source: source.to_owned(),
                routing_key: routing_key.to_owned(),
                arguments,
            });
        Ok(())
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        options: PublishOptions,
    ) -> Result<()> {
        publish_via(
            &self.shared,
            &self.shared.publisher,
            exchange,
            routing_key,
            message,
            options,
        )
        .await
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Consumer> {
        self.shared.check_open()?;
        validate_name("queue", queue)?;
        let tag = options
            .consumer_tag
            .clone()
            .unwrap_or_else(|| format!("bus-amqp.{}", uuid::Uuid::new_v4().simple()));
        consume::start(
            self.shared.clone(),
            ConsumerSpec {
                queue: queue.to_owned(),
                tag,
                options,
                reply_slot: None,
            },
        )
        .await
    }

    async fn reply_queue(&self) -> Result<ReplyQueue> {
        self.shared.check_open()?;
        if self.shared.options.reply_mode == ReplyMode::Classic {
            return classic_reply_queue(self).await;
        }
        let (slot_tx, slot_rx) = watch::channel(None);
        let consumer = consume::start(
            self.shared.clone(),
            ConsumerSpec {
                queue: DIRECT_REPLY_TO.to_owned(),
                tag: format!("bus-amqp.reply.{}", uuid::Uuid::new_v4().simple()),
                options: ConsumeOptions::auto_ack(),
                reply_slot: Some(slot_tx),
            },
        )
        .await?;
        Ok(ReplyQueue {
            address: DIRECT_REPLY_TO.to_owned(),
            consumer,
            publisher: Some(Arc::new(ReplyPublisher {
                shared: self.shared.clone(),
                source: ChannelSource::Reply(slot_rx),
            })),
        })
    }

    async fn close(&self) -> Result<()> {
        // Acks the application queued go out before the connection does.
        let flushed = if self.shared.is_closed() {
            Ok(())
        } else {
            self.shared.flush_ack_batches().await
        };
        let previous = self.shared.set_state(LinkState::Closed {
            by_user: true,
            reason: "closed by the application".into(),
        });
        self.shared.poke();
        if let LinkState::Up(link) = previous {
            if let Err(e) = link
                .conn
                .close(200, "closed by the application".into())
                .await
            {
                tracing::debug!(error = %e, "closing the connection");
            }
        }
        flushed
    }

    fn is_open(&self) -> bool {
        !self.shared.is_closed()
    }
}
