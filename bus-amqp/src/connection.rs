//! [`AmqpConnection`]: the bus transport contract on one RabbitMQ
//! connection, with its channels and its recovery.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{
    classic_reply_queue, is_reserved_name, validate_name, Capabilities, Connection, ConsumeOptions,
    Consumer, DeleteExchangeOptions, DeleteQueueOptions, Error, ExchangeKind, ExchangeOptions,
    FieldTable, Message, PublishOptions, QueueInfo, QueueOptions, ReplyQueue, Result,
};
use futures::stream::BoxStream;
use futures::StreamExt;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, ExchangeUnbindOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use tokio::sync::{broadcast, watch, Notify};

use crate::consume::{self, AckBatch, ConsumerSpec, DIRECT_REPLY_TO};
use crate::convert::{broker_close, is_connection_error, map_error, short, table_to_amqp};
use crate::events::RecoveryEvent;
use crate::journal::{BindingRecord, ExchangeBindingRecord, Journal};
use crate::link::{connect_any, unless_lost, Link, LinkState};
use crate::options::{AmqpOptions, ReplyMode};
use crate::publish::{publish_via, ChannelSource, LinkedChannel, OwnChannel, ReplyPublisher};
use crate::url::AmqpUrl;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What every handle of one connection shares: the link, the topology
/// journal, the topology and publisher channels, the events.
pub(crate) struct Shared {
    pub(crate) url: AmqpUrl,
    pub(crate) options: AmqpOptions,
    state: watch::Sender<LinkState>,
    events: broadcast::Sender<RecoveryEvent>,
    journal: Mutex<Journal>,
    /// The channel topology operations run on, one at a time, so that a
    /// request the broker refuses (and closes the channel for) fails alone.
    topology: tokio::sync::Mutex<LinkedChannel>,
    publisher: ChannelSource,
    /// Exchanges seen to exist on the current link (by generation), so that
    /// a publish to a missing one is caught by a passive declare on the
    /// topology channel instead of closing the publisher channel under
    /// every other publish in flight.
    known_exchanges: Mutex<(u64, HashSet<String>)>,
    /// Wakes the supervisor to check the link now.
    poke: Arc<Notify>,
    /// The largest body sent: the configured limit, or a lower one the
    /// broker revealed by refusing a message.
    max_message_size: AtomicU64,
    /// Consumers alive (each holds a channel), so that they never take
    /// the channels publishing and topology need.
    pub(crate) consumers: AtomicUsize,
    /// Queues (current names) this connection deleted, or is deleting:
    /// their consumers' cancellation by the broker is an ordinary end, not
    /// news. A name leaves the set when it is declared again.
    deleted_here: Mutex<HashSet<String>>,
    /// Why the broker holds back this connection's publishers
    /// (`connection.blocked`), while it does.
    blocked: watch::Sender<Option<String>>,
    /// Whether a recovery ever gave a queue a new name: until then every
    /// queue's current name is the one the application holds, and names
    /// need no look-up.
    renamed: AtomicBool,
    /// The coalesced acks of this connection's consumers, flushed on close.
    ack_batches: Mutex<Vec<Weak<AckBatch>>>,
}

impl Shared {
    /// The current link, waiting up to `recovery_wait` while one is being
    /// re-established.
    pub(crate) async fn link(&self) -> Result<Link> {
        self.link_after(0, self.recovery_deadline()).await
    }

    /// When an operation starting now stops waiting for a link.
    pub(crate) fn recovery_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.options.recovery_wait
    }

    /// A connected link newer than generation `stale` (0: any), waiting
    /// until `deadline` while one is being re-established.
    ///
    /// The link in the state can already be dead: the socket fails before
    /// the supervisor hears of it and marks the link down. Handing it out
    /// would fail the operation at once instead of letting it wait for the
    /// reconnection, so such a link is skipped: the supervisor is poked and
    /// the next generation waited for.
    pub(crate) async fn link_after(
        &self,
        stale: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Link> {
        let live = async {
            let mut generation = stale + 1;
            loop {
                let link = self.link_at_least(generation).await?;
                if link.conn.status().connected() {
                    return Ok(link);
                }
                self.poke();
                generation = link.generation + 1;
            }
        };
        match tokio::time::timeout_at(deadline, live).await {
            Ok(r) => r,
            Err(_) => {
                let reason = match &*self.state.borrow() {
                    LinkState::Down { reason } => reason.clone(),
                    LinkState::Up(_) => "the link is not usable".into(),
                    LinkState::Closed { .. } => return Err(self.closed_error()),
                };
                Err(Error::ConnectionLost(format!(
                    "the connection to {} was lost ({reason}) and is not back after {:?}",
                    self.url.redacted(),
                    self.options.recovery_wait
                )))
            }
        }
    }

    /// Whether what failed on `link` failed because the link itself is
    /// gone: then nothing of it can take effect, and it may be tried again
    /// on the next link. Only for requests that are safe to send twice
    /// (opening a channel, starting a consumer), never for a publish or a
    /// topology change that may have reached the broker.
    pub(crate) fn link_lost(link: &Link) -> bool {
        !link.conn.status().connected()
    }

    /// The error of a request given up on because its link died under it.
    pub(crate) fn lost_while(&self, what: &str) -> Error {
        self.poke();
        Error::ConnectionLost(format!("the connection was lost while {what}"))
    }

    /// The first link of at least this generation, however long it takes;
    /// an error once the connection is closed for good.
    pub(crate) async fn link_at_least(&self, generation: u64) -> Result<Link> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                LinkState::Up(link) if link.generation >= generation => return Ok(link.clone()),
                LinkState::Closed { .. } => return Err(self.closed_error()),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(Error::Closed("the connection is gone".into()));
            }
        }
    }

    /// Why the broker holds back this connection's publishers, while it
    /// does: from its `connection.blocked`, or lapin's flag for it (set
    /// before the event reaches the supervisor).
    pub(crate) fn blocked_reason(&self) -> Option<String> {
        if let Some(reason) = &*self.blocked.borrow() {
            return Some(reason.clone());
        }
        match &*self.state.borrow() {
            LinkState::Up(link) if link.conn.status().blocked() => {
                Some("connection.blocked".to_owned())
            }
            _ => None,
        }
    }

    /// Waits, until `deadline`, for the broker to lift its block, so that
    /// nothing is handed to the connection while it is blocked (lapin
    /// would hold it and send it once the block is lifted, however long
    /// after the caller gave up). `what` names the operation for the
    /// error.
    pub(crate) async fn wait_unblocked(
        &self,
        deadline: tokio::time::Instant,
        what: &str,
    ) -> Result<()> {
        let Some(mut reason) = self.blocked_reason() else {
            return Ok(());
        };
        let mut rx = self.blocked.subscribe();
        let since = tokio::time::Instant::now();
        let wait = async {
            loop {
                match self.blocked_reason() {
                    None => return,
                    Some(r) => reason = r,
                }
                // lapin's flag has no notification of its own: a short
                // poll covers it, only while blocked.
                tokio::select! {
                    _ = rx.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        };
        if tokio::time::timeout_at(deadline, wait).await.is_ok() {
            return Ok(());
        }
        Err(Error::Blocked(format!(
            "the broker has held back publishers on this connection ({reason}) for {:?}; {what} was not sent",
            since.elapsed()
        )))
    }

    fn set_blocked(&self, reason: Option<String>) {
        let was = self.blocked.send_replace(reason.clone());
        match (was, reason) {
            (None, Some(reason)) => self.emit(RecoveryEvent::Blocked { reason }),
            (Some(_), None) => self.emit(RecoveryEvent::Unblocked),
            _ => {}
        }
    }

    /// Follows the link state.
    pub(crate) fn subscribe_state(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }

    /// Keeps `batch` to be flushed when the connection closes.
    pub(crate) fn register_ack_batch(&self, batch: &Arc<AckBatch>) {
        let mut batches = self
            .ack_batches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        batches.retain(|b| b.strong_count() > 0);
        batches.push(Arc::downgrade(batch));
    }

    /// Sends every consumer's coalesced acks; the first failure.
    async fn flush_ack_batches(&self) -> Result<()> {
        let batches: Vec<Arc<AckBatch>> = self
            .ack_batches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut result = Ok(());
        for batch in batches {
            if let Err(e) = batch.flush().await {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }

    pub(crate) fn is_closed(&self) -> bool {
        matches!(&*self.state.borrow(), LinkState::Closed { .. })
    }

    pub(crate) fn closed_error(&self) -> Error {
        match &*self.state.borrow() {
            LinkState::Closed {
                by_user: false,
                reason,
            } => Error::ConnectionLost(format!("gave up reconnecting: {reason}")),
            _ => Error::Closed("the connection was closed by the application".into()),
        }
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(self.closed_error())
        } else {
            Ok(())
        }
    }

    /// Maps a lapin error, and has the supervisor look at the link when the
    /// error says the connection is gone.
    pub(crate) fn fail(&self, e: &lapin::Error) -> Error {
        if is_connection_error(e) {
            self.poke();
        }
        if self.is_closed() && !matches!(broker_close(e), Some(c) if !c.hard) {
            return self.closed_error();
        }
        map_error(e)
    }

    pub(crate) fn poke(&self) {
        self.poke.notify_one();
    }

    pub(crate) fn emit(&self, event: RecoveryEvent) {
        tracing::info!(?event, "amqp recovery");
        let _ = self.events.send(event);
    }

    pub(crate) fn resolve_queue(&self, name: &str) -> String {
        if !self.renamed.load(Ordering::Acquire) {
            return name.to_owned();
        }
        lock(&self.journal).resolve(name)
    }

    /// The current name of the queue the application names `name`, when a
    /// recovery renamed it.
    pub(crate) fn renamed_queue(&self, name: &str) -> Option<String> {
        if !self.renamed.load(Ordering::Acquire) {
            return None;
        }
        let current = lock(&self.journal).resolve(name);
        (current != name).then_some(current)
    }

    /// Whether the queue the application names `name` exists (a passive
    /// declare on the topology channel).
    pub(crate) async fn queue_exists(&self, name: &str) -> Result<bool> {
        let queue = short("queue name", &self.resolve_queue(name))?;
        let declare = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match self
            .topology_op(move |ch| async move {
                ch.queue_declare(queue, declare, lapin::types::FieldTable::default())
                    .await
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Refuses a body over the largest message size, before sending.
    pub(crate) fn check_size(&self, len: usize) -> Result<()> {
        let max = self.max_message_size.load(Ordering::Relaxed);
        if len as u64 > max {
            return Err(Error::PreconditionFailed(format!(
                "the message body is {len} bytes, more than the largest message size of {max} bytes \
                 (AmqpOptions::max_message_size, or the broker's max_message_size); it was not sent"
            ).into()));
        }
        Ok(())
    }

    /// Adopts the broker's message size limit from its refusal, "message
    /// size N is larger than configured max size M"; returns M.
    pub(crate) fn learn_size_limit(&self, text: &str) -> Option<u64> {
        let max: u64 = text
            .split("max size ")
            .nth(1)?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()?;
        self.max_message_size.fetch_min(max, Ordering::Relaxed);
        Some(max)
    }

    /// Counts a new consumer in, or refuses it when it would take one of
    /// the channels kept for publishing and topology operations. The check
    /// and the count are one atomic step, so consumers started at once
    /// cannot race past the limit; the caller gives the count back when
    /// the consumer ends or fails to start.
    pub(crate) fn reserve_consumer_channel(&self, link: &Link) -> Result<()> {
        let channel_max = match link.conn.configuration().channel_max() {
            0 => usize::from(u16::MAX),
            n => usize::from(n),
        };
        let room = channel_max.saturating_sub(RESERVED_CHANNELS);
        let reserved = self
            .consumers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < room).then_some(n + 1)
            });
        if let Err(consumers) = reserved {
            return Err(Error::backend(
                "amqp",
                true,
                format!(
                    "no channel left for another consumer: this connection has {consumers} consumers, each on its own channel, \
                     and the broker allows {channel_max} channels (channel_max), {RESERVED_CHANNELS} of which are kept for publishing \
                     and topology; drop a consumer, use another connection, or raise channel_max"
                ),
            ));
        }
        Ok(())
    }

    /// Whether this connection deleted (or is deleting) the queue the
    /// application names `name`.
    pub(crate) fn deleted_here(&self, name: &str) -> bool {
        lock(&self.deleted_here).contains(&self.resolve_queue(name))
    }

    /// Forgets a queue someone else deleted, so that recovery does not
    /// declare it again.
    pub(crate) fn forget_deleted_queue(&self, name: &str) {
        lock(&self.journal).forget_queue(name);
    }

    /// The generation of the link, when it is up.
    pub(crate) fn up_generation(&self) -> Option<u64> {
        match &*self.state.borrow() {
            LinkState::Up(link) => Some(link.generation),
            _ => None,
        }
    }

    pub(crate) fn queue_is_exclusive(&self, name: &str) -> bool {
        let journal = lock(&self.journal);
        journal
            .queues
            .get(name)
            .or_else(|| journal.queues.values().find(|q| q.current == name))
            .is_some_and(|q| q.options.exclusive)
    }

    fn exchange_known(&self, generation: u64, name: &str) -> bool {
        let known = lock(&self.known_exchanges);
        known.0 == generation && known.1.contains(name)
    }

    fn remember_exchange(&self, generation: u64, name: &str) {
        let mut known = lock(&self.known_exchanges);
        if known.0 != generation {
            *known = (generation, HashSet::new());
        }
        known.1.insert(name.to_owned());
    }

    pub(crate) fn forget_known_exchange(&self, name: &str) {
        lock(&self.known_exchanges).1.remove(name);
    }

    /// `NotFound` when a publish would go to an exchange that does not
    /// exist, found out without risking the publisher channel.
    pub(crate) async fn ensure_exchange_exists(&self, name: &str) -> Result<()> {
        if name.is_empty() || is_reserved_name(name) {
            return Ok(());
        }
        if self
            .up_generation()
            .is_some_and(|generation| self.exchange_known(generation, name))
        {
            return Ok(());
        }
        // Out of line: the passive declare would otherwise make every
        // publish's future several times larger.
        Box::pin(self.check_exchange(name)).await
    }

    async fn check_exchange(&self, name: &str) -> Result<()> {
        let link = self.link().await?;
        if self.exchange_known(link.generation, name) {
            return Ok(());
        }
        let exchange = short("exchange name", name)?;
        self.topology_op(move |ch| async move {
            ch.exchange_declare(
                exchange,
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
        })
        .await?;
        self.remember_exchange(link.generation, name);
        Ok(())
    }

    /// Runs one operation on the topology channel, opening it (again) when
    /// needed. Operations run one at a time, so the broker's refusal of
    /// one (which closes the channel) is that operation's error alone.
    pub(crate) async fn topology_op<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnOnce(lapin::Channel) -> Fut,
        Fut: Future<Output = lapin::Result<T>>,
    {
        self.check_open()?;
        let timeout = self.options.operation_timeout;
        let until = tokio::time::Instant::now() + timeout;
        let deadline = self.recovery_deadline().min(until);
        let mut link = self.link_after(0, deadline).await?;
        let mut slot = match tokio::time::timeout_at(until, self.topology.lock()).await {
            Ok(slot) => slot,
            Err(_) => return Err(self.operation_timed_out(timeout)),
        };
        self.wait_unblocked(until, "the operation").await?;
        let channel = match &*slot {
            Some((generation, ch)) if *generation == link.generation && ch.status().connected() => {
                ch.clone()
            }
            _ => {
                let ch = match unless_lost(&link, link.conn.create_channel()).await {
                    Some(Ok(ch)) => ch,
                    // The link died since it was handed out: the operation
                    // has not been sent, so it waits for the next link.
                    None | Some(Err(_)) if Self::link_lost(&link) => {
                        link = self.link_after(link.generation, deadline).await?;
                        match unless_lost(&link, link.conn.create_channel()).await {
                            Some(r) => r.map_err(|e| self.fail(&e))?,
                            None => return Err(self.lost_while("opening a channel")),
                        }
                    }
                    Some(Err(e)) => return Err(self.fail(&e)),
                    None => return Err(self.lost_while("opening a channel")),
                };
                *slot = Some((link.generation, ch.clone()));
                ch
            }
        };
        let Ok(result) = tokio::time::timeout_at(until, op(channel.clone())).await else {
            // Its answer may still come: the channel is not used again.
            *slot = None;
            tokio::spawn(async move {
                let _ = channel.close(200, "operation timed out".into()).await;
            });
            return Err(self.operation_timed_out(timeout));
        };
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                if broker_close(&e).is_some() || is_connection_error(&e) {
                    *slot = None;
                }
                Err(self.fail(&e))
            }
        }
    }

    /// The error of an operation that did not finish within `timeout`.
    fn operation_timed_out(&self, timeout: Duration) -> Error {
        match self.blocked_reason() {
            Some(reason) => Error::Blocked(format!(
                "the broker holds back this connection ({reason}); the operation was sent but not answered within {timeout:?}"
            )),
            None => Error::Timeout(timeout),
        }
    }

    /// Declares the journal's topology again on a new link. Server-named
    /// queues get new names, recorded in the journal. Fails only when the
    /// link itself fails.
    async fn recover_topology(&self, link: &Link) -> Result<()> {
        let journal = lock(&self.journal).clone();
        let mut channel: Option<lapin::Channel> = None;
        macro_rules! channel {
            () => {{
                match &channel {
                    Some(ch) if ch.status().connected() => ch.clone(),
                    _ => {
                        let ch = unless_lost(link, link.conn.create_channel())
                            .await
                            .ok_or_else(|| {
                                Error::ConnectionLost(
                                    "the connection was lost while declaring the topology again"
                                        .into(),
                                )
                            })?
                            .map_err(|e| map_error(&e))?;
                        channel = Some(ch.clone());
                        ch
                    }
                }
            }};
        }
        let report = |what: String, e: &lapin::Error| -> Result<()> {
            if is_connection_error(e) {
                return Err(map_error(e));
            }
            tracing::warn!(%what, error = %e, "could not declare again after reconnecting");
            self.emit(RecoveryEvent::TopologyRecoveryFailed {
                what,
                error: map_error(e).to_string(),
            });
            Ok(())
        };
        for (name, (kind, options)) in &journal.exchanges {
            let ch = channel!();
            let r = ch
                .exchange_declare(
                    short("exchange name", name)?,
                    lapin_kind(kind),
                    ExchangeDeclareOptions {
                        passive: false,
                        durable: options.durable,
                        auto_delete: options.auto_delete,
                        internal: options.internal,
                        nowait: false,
                    },
                    table_to_amqp(&options.arguments)?,
                )
                .await;
            if let Err(e) = r {
                report(format!("exchange {name:?}"), &e)?;
            }
        }
        let mut renames = Vec::new();
        for (handle, q) in &journal.queues {
            let ch = channel!();
            let requested = if q.server_named { "" } else { handle.as_str() };
            let r = ch
                .queue_declare(
                    short("queue name", requested)?,
                    queue_declare_options(&q.options),
                    table_to_amqp(&q.options.arguments.to_table())?,
                )
                .await;
            match r {
                Ok(declared) if q.server_named => {
                    renames.push((handle.clone(), declared.name().as_str().to_owned()));
                }
                Ok(_) => {}
                Err(e) => report(format!("queue {handle:?}"), &e)?,
            }
        }
        {
            let mut j = lock(&self.journal);
            if !renames.is_empty() {
                self.renamed.store(true, Ordering::Release);
            }
            for (handle, new) in &renames {
                j.rename(handle, new);
            }
        }
        for (old, new) in renames {
            self.emit(RecoveryEvent::QueueRenamed { old, new });
        }
        for b in &journal.bindings {
            let ch = channel!();
            let queue = self.resolve_queue(&b.queue);
            let r = ch
                .queue_bind(
                    short("queue name", &queue)?,
                    short("exchange name", &b.exchange)?,
                    short("routing key", &b.routing_key)?,
                    QueueBindOptions::default(),
                    table_to_amqp(&b.arguments)?,
                )
                .await;
            if let Err(e) = r {
                report(
                    format!(
                        "binding of queue {:?} to exchange {:?} with key {:?}",
                        b.queue, b.exchange, b.routing_key
                    ),
                    &e,
                )?;
            }
        }
        for b in &journal.exchange_bindings {
            let ch = channel!();
            let r = ch
                .exchange_bind(
                    short("exchange name", &b.destination)?,
                    short("exchange name", &b.source)?,
                    short("routing key", &b.routing_key)?,
                    ExchangeBindOptions::default(),
                    table_to_amqp(&b.arguments)?,
                )
                .await;
            if let Err(e) = r {
                report(
                    format!(
                        "binding of exchange {:?} to exchange {:?} with key {:?}",
                        b.destination, b.source, b.routing_key
                    ),
                    &e,
                )?;
            }
        }
        if let Some(ch) = channel {
            if ch.status().connected() {
                let _ = ch.close(200, "topology recovered".into()).await;
            }
        }
        Ok(())
    }
}

fn lapin_kind(kind: &ExchangeKind) -> lapin::ExchangeKind {
    match kind {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        ExchangeKind::Custom(name) => lapin::ExchangeKind::Custom(name.clone()),
    }
}

fn queue_declare_options(o: &QueueOptions) -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: o.passive,
        durable: o.durable,
        exclusive: o.exclusive,
        auto_delete: o.auto_delete,
        nowait: false,
    }
}

/// Channels a connection keeps from its consumers: channel 0, the
/// publisher channel, the topology channel, and one for replacing the
/// publisher channel or declaring the topology again.
const RESERVED_CHANNELS: usize = 4;

/// A small random fraction, for jitter, without a random-number crate.
fn jitter(d: Duration) -> Duration {
    let r = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
    d + d.mul_f64(f64::from(r) / 4000.0)
}

/// How long the supervisor waits, once it finds the link down, for lapin's
/// error event that says why. Lapin marks the connection failed just before
/// it sends that event, so it is normally there within microseconds.
const CAUSE_WAIT: Duration = Duration::from_millis(250);

/// The cause of a link found down, as lapin's error event gives it.
async fn cause_of_failure(events: &mut BoxStream<'static, lapin::Event>) -> String {
    let cause = async {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event {
                return Some(e.to_string());
            }
        }
        None
    };
    match tokio::time::timeout(CAUSE_WAIT, cause).await {
        Ok(Some(cause)) => cause,
        // Closed without an error (by the broker's close, say), or the
        // event stream is gone.
        Ok(None) | Err(_) => "the connection is no longer open".to_owned(),
    }
}

/// Watches the link and re-establishes it when it is lost.
async fn supervise(
    weak: Weak<Shared>,
    poke: Arc<Notify>,
    mut status: lapin::ConnectionStatus,
    mut events: BoxStream<'static, lapin::Event>,
    mut generation: u64,
) {
    loop {
        // Wait for the link to fail (or for the connection to go away).
        let reason = loop {
            // Events first: when the error event is there, it names the
            // cause, which a poke or the tick would not.
            tokio::select! {
                biased;
                event = events.next() => match event {
                    Some(lapin::Event::Error(e)) if !status.connected() => break e.to_string(),
                    Some(lapin::Event::ConnectionBlocked(reason)) => {
                        let Some(shared) = weak.upgrade() else { return };
                        tracing::warn!(%reason, "the broker blocked this connection's publishers");
                        shared.set_blocked(Some(reason));
                    }
                    Some(lapin::Event::ConnectionUnblocked) => {
                        let Some(shared) = weak.upgrade() else { return };
                        tracing::info!("the broker lifted its block on this connection");
                        shared.set_blocked(None);
                    }
                    Some(_) => {}
                    None => {
                        if !status.connected() {
                            break "the connection ended".to_owned();
                        }
                        // The event stream is gone: fall back to polling.
                        events = Box::pin(futures::stream::pending());
                    }
                },
                () = poke.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let Some(shared) = weak.upgrade() else { return };
            if shared.is_closed() {
                return;
            }
            if !status.connected() {
                drop(shared);
                break cause_of_failure(&mut events).await;
            }
        };
        let Some(shared) = weak.upgrade() else { return };
        if shared.is_closed() {
            return;
        }
        tracing::warn!(%reason, "connection to the broker lost; reconnecting");
        shared.state.send_replace(LinkState::Down {
            reason: reason.clone(),
        });
        shared.emit(RecoveryEvent::Disconnected {
            reason: reason.clone(),
        });
        let policy = shared.options.reconnect.clone();
        drop(shared);
        let mut attempt = 0u32;
        let mut last_error = reason;
        loop {
            if policy.max_attempts.is_some_and(|max| attempt >= max) {
                let Some(shared) = weak.upgrade() else { return };
                tracing::error!(reason = %last_error, "gave up reconnecting to the broker");
                shared.state.send_replace(LinkState::Closed {
                    by_user: false,
                    reason: last_error.clone(),
                });
                shared.emit(RecoveryEvent::GaveUp { reason: last_error });
                return;
            }
            let delay = jitter(policy.delay(attempt));
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let Some(shared) = weak.upgrade() else { return };
            if shared.is_closed() {
                return;
            }
            let attempt_result = async {
                let (link, new_events) =
                    connect_any(&shared.url, &shared.options, generation + 1).await?;
                shared.recover_topology(&link).await?;
                Ok::<_, Error>((link, new_events))
            }
            .await;
            match attempt_result {
                Ok((link, new_events)) => {
                    generation = link.generation;
                    status = link.conn.status().clone();
                    events = new_events;
                    let host = link.host.to_string();
                    if shared.is_closed() {
                        let _ = link
                            .conn
                            .close(200, "closed by the application".into())
                            .await;
                        return;
                    }
                    shared.state.send_replace(LinkState::Up(link));
                    // The block was the old connection's.
                    shared.set_blocked(None);
                    shared.emit(RecoveryEvent::Reconnected { host, generation });
                    break;
                }
                Err(e) => {
                    attempt += 1;
                    last_error = e.to_string();
                    let retry_in = policy.delay(attempt);
                    tracing::warn!(attempt, error = %e, ?retry_in, "reconnection failed");
                    shared.emit(RecoveryEvent::ReconnectFailed {
                        attempt,
                        error: last_error.clone(),
                        retry_in,
                    });
                }
            }
        }
    }
}

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
        let state = match &*self.shared.state.borrow() {
            LinkState::Up(link) => format!("connected to {} (link {})", link.host, link.generation),
            LinkState::Down { .. } => "reconnecting".to_owned(),
            LinkState::Closed { .. } => "closed".to_owned(),
        };
        f.debug_struct("AmqpConnection")
            .field("url", &self.shared.url.redacted())
            .field("name", &self.shared.options.connection_name)
            .field("state", &state)
            .finish()
    }
}

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
        let (state, _) = watch::channel(LinkState::Up(link));
        let (events_tx, _) = broadcast::channel(1024);
        let poke = Arc::new(Notify::new());
        let max_message_size = options.max_message_size;
        let shared = Arc::new(Shared {
            url,
            options,
            state,
            events: events_tx,
            journal: Mutex::new(Journal::default()),
            topology: tokio::sync::Mutex::new(None),
            publisher: ChannelSource::Own(OwnChannel::default()),
            renamed: AtomicBool::new(false),
            known_exchanges: Mutex::new((0, HashSet::new())),
            poke: poke.clone(),
            blocked: watch::channel(None).0,
            deleted_here: Mutex::new(HashSet::new()),
            max_message_size: AtomicU64::new(max_message_size),
            consumers: AtomicUsize::new(0),
            ack_batches: Mutex::new(Vec::new()),
        });
        tokio::spawn(supervise(Arc::downgrade(&shared), poke, status, events, 1));
        Ok(AmqpConnection { shared })
    }

    /// Recovery events from now on. A receiver that falls more than 1024
    /// events behind loses the oldest (see [`broadcast::Receiver`]).
    #[must_use]
    pub fn events(&self) -> broadcast::Receiver<RecoveryEvent> {
        self.shared.events.subscribe()
    }

    /// The node currently connected to (`host:port`), `None` while
    /// reconnecting or once closed.
    #[must_use]
    pub fn current_host(&self) -> Option<String> {
        match &*self.shared.state.borrow() {
            LinkState::Up(link) => Some(link.host.to_string()),
            _ => None,
        }
    }

    /// Counts links: 1 for the first connection, +1 for each recovery.
    #[must_use]
    pub fn generation(&self) -> u64 {
        match &*self.shared.state.borrow() {
            LinkState::Up(link) => link.generation,
            _ => 0,
        }
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
            lock(&self.shared.journal).record_exchange(name, kind, options);
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
        lock(&self.shared.journal).forget_exchange(name);
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
        lock(&self.shared.deleted_here).remove(&actual);
        if !options.passive {
            lock(&self.shared.journal).record_queue(name, &actual, options);
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
        let newly = lock(&self.shared.deleted_here).insert(current.clone());
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
            .await
            .inspect_err(|_| {
                if newly {
                    lock(&self.shared.deleted_here).remove(&current);
                }
            })?;
        lock(&self.shared.journal).forget_queue(name);
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
        validate_name("queue", queue)?;
        validate_name("exchange", exchange)?;
        let q = short("queue name", &self.shared.resolve_queue(queue))?;
        let x = short("exchange name", exchange)?;
        let k = short("routing key", routing_key)?;
        let args = table_to_amqp(&arguments)?;
        self.shared
            .topology_op(move |ch| async move {
                ch.queue_bind(q, x, k, QueueBindOptions::default(), args)
                    .await
            })
            .await?;
        lock(&self.shared.journal).record_binding(BindingRecord {
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
        validate_name("queue", queue)?;
        validate_name("exchange", exchange)?;
        let q = short("queue name", &self.shared.resolve_queue(queue))?;
        let x = short("exchange name", exchange)?;
        let k = short("routing key", routing_key)?;
        let args = table_to_amqp(&arguments)?;
        self.shared
            .topology_op(move |ch| async move { ch.queue_unbind(q, x, k, args).await })
            .await?;
        lock(&self.shared.journal).forget_binding(&BindingRecord {
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
        validate_name("exchange", destination)?;
        validate_name("exchange", source)?;
        let d = short("exchange name", destination)?;
        let x = short("exchange name", source)?;
        let k = short("routing key", routing_key)?;
        let args = table_to_amqp(&arguments)?;
        self.shared
            .topology_op(move |ch| async move {
                ch.exchange_bind(d, x, k, ExchangeBindOptions::default(), args)
                    .await
            })
            .await?;
        lock(&self.shared.journal).record_exchange_binding(ExchangeBindingRecord {
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
        validate_name("exchange", destination)?;
        validate_name("exchange", source)?;
        let d = short("exchange name", destination)?;
        let x = short("exchange name", source)?;
        let k = short("routing key", routing_key)?;
        let args = table_to_amqp(&arguments)?;
        self.shared
            .topology_op(move |ch| async move {
                ch.exchange_unbind(d, x, k, ExchangeUnbindOptions::default(), args)
                    .await
            })
            .await?;
        lock(&self.shared.journal).forget_exchange_binding(&ExchangeBindingRecord {
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
        let previous = self.shared.state.send_replace(LinkState::Closed {
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
