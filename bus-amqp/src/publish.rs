//! Publishing with publisher confirms on a shared channel in confirm mode.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bus_core::{Error, Message, PublishOptions, Publisher, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use tokio::sync::{watch, Mutex};

use crate::connection::Shared;
use crate::convert::{
    broker_close, check_short, error_from_code, is_connection_error, properties_to_amqp, short,
};
use crate::link::{unless_lost, Link};

/// A channel in confirm mode, tied to the link it was opened on.
pub(crate) type LinkedChannel = Option<(u64, lapin::Channel)>;

/// A publisher channel as publishes share it, tied to the link it was
/// opened on: behind an `Arc`, because a lapin channel is a dozen
/// reference counts to clone.
pub(crate) type SharedChannel = (u64, Arc<lapin::Channel>);

/// Where a direct reply-to consumer publishes its channel (in confirm
/// mode) for the requests; `None` while it is being opened again.
pub(crate) type ReplySlot = Option<SharedChannel>;

/// Where a publish gets its channel.
pub(crate) enum ChannelSource {
    /// The connection's own publisher channel, opened on demand and opened
    /// again when the broker closes it.
    Own(OwnChannel),
    /// The channel of a direct reply-to consumer: requests must go through
    /// it. Its consumer task opens it (again) and publishes it here.
    Reply(watch::Receiver<ReplySlot>),
}

/// The connection's own publisher channel.
#[derive(Default)]
pub(crate) struct OwnChannel {
    /// The channel publishes use, read without waiting.
    current: bus_core::sync::Mutex<Option<SharedChannel>>,
    /// Held while a channel is opened, so that concurrent publishes open
    /// one, not many.
    opening: Mutex<()>,
}

impl OwnChannel {
    fn usable(&self, generation: u64) -> Option<SharedChannel> {
        let current = self.current.lock();
        match &*current {
            Some((g, ch)) if *g == generation && ch.status().connected() => Some((*g, ch.clone())),
            _ => None,
        }
    }
}

impl ChannelSource {
    /// A usable channel, if there is one right now.
    fn ready(&self, shared: &Shared) -> Option<SharedChannel> {
        match self {
            ChannelSource::Own(own) => shared.up_generation().and_then(|g| own.usable(g)),
            ChannelSource::Reply(rx) => match &*rx.borrow() {
                Some((generation, ch)) if ch.status().connected() => {
                    Some((*generation, ch.clone()))
                }
                _ => None,
            },
        }
    }

    /// A usable channel: at once when there is one, else opened (or waited
    /// for).
    async fn get(&self, shared: &Shared) -> Result<SharedChannel> {
        if let Some(found) = self.ready(shared) {
            return Ok(found);
        }
        // Out of line: what opening or waiting for a channel holds would
        // otherwise make every publish's future several times larger.
        Box::pin(self.open(shared)).await
    }

    async fn open(&self, shared: &Shared) -> Result<SharedChannel> {
        match self {
            ChannelSource::Own(own) => {
                let deadline = shared.recovery_deadline();
                let mut link = shared.link_after(0, deadline).await?;
                let _opening = own.opening.lock().await;
                let mut retried = false;
                loop {
                    if let Some(found) = own.usable(link.generation) {
                        return Ok(found);
                    }
                    match open_confirmed(&link).await {
                        Some(Ok(ch)) => {
                            let ch = Arc::new(ch);
                            *own.current.lock() = Some((link.generation, ch.clone()));
                            return Ok((link.generation, ch));
                        }
                        // The link died after it was handed out; nothing
                        // was published yet, so the publish waits for the
                        // next link (once).
                        None | Some(Err(_)) if !retried && Shared::link_lost(&link) => {
                            retried = true;
                            link = shared.link_after(link.generation, deadline).await?;
                        }
                        Some(Err(e)) => return Err(shared.fail(&e)),
                        None => return Err(shared.lost_while("opening the publisher channel")),
                    }
                }
            }
            ChannelSource::Reply(rx) => {
                let mut rx = rx.clone();
                let wait = async {
                    loop {
                        if let Some((generation, ch)) = &*rx.borrow_and_update() {
                            if ch.status().connected() {
                                return Ok((*generation, ch.clone()));
                            }
                        }
                        if shared.is_closed() {
                            return Err(shared.closed_error());
                        }
                        if rx.changed().await.is_err() {
                            return Err(Error::Closed("the reply queue's consumer is gone".into()));
                        }
                    }
                };
                tokio::time::timeout(shared.options.recovery_wait, wait)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::ConnectionLost(format!(
                            "the reply channel was not re-established within {:?}",
                            shared.options.recovery_wait
                        )))
                    })
            }
        }
    }

    /// Stops handing out `channel` for new publishes after the broker
    /// refused (nacked) a message on it, and closes it once the publishes
    /// still in flight on it have their confirms.
    ///
    /// A channel that attached to a queue while that queue could not take
    /// messages (a quorum queue electing a new leader after a node died)
    /// can keep refusing every publish long after the queue is back, while
    /// a new channel publishes at once. A nack is rare otherwise (a full
    /// queue with `x-overflow = reject-publish`), so the next publish
    /// always gets a fresh channel. The channel of a direct reply-to
    /// consumer is never replaced: requests must leave on it.
    fn retire(&self, generation: u64, channel: &Arc<lapin::Channel>) {
        let ChannelSource::Own(own) = self else {
            return;
        };
        let retired = {
            let mut current = own.current.lock();
            match &*current {
                Some((g, c)) if *g == generation && Arc::ptr_eq(c, channel) => current.take(),
                _ => None,
            }
        };
        if let Some((_, channel)) = retired {
            tracing::debug!(
                channel = channel.id(),
                "the broker refused a publish: replacing the publisher channel"
            );
            tokio::spawn(async move {
                // The publishes in flight on it get their own confirms
                // first; a channel that never answers is closed anyway.
                let _ =
                    tokio::time::timeout(RETIRED_CONFIRM_WAIT, channel.wait_for_confirms()).await;
                if channel.status().connected() {
                    let _ = channel
                        .close(200, "publisher channel replaced".into())
                        .await;
                }
            });
        }
    }

    fn forget(&self, generation: u64, channel: &lapin::Channel) {
        if let ChannelSource::Own(own) = self {
            let mut current = own.current.lock();
            if matches!(&*current, Some((g, c)) if *g == generation && **c == *channel) {
                *current = None;
            }
        }
    }
}

/// How long a publisher channel replaced after a nack stays open for the
/// confirms of the publishes still in flight on it.
const RETIRED_CONFIRM_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A new channel on `link`, in confirm mode; `None` when the link died
/// first.
async fn open_confirmed(link: &Link) -> Option<lapin::Result<lapin::Channel>> {
    unless_lost(link, async {
        let ch = link.conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(ch)
    })
    .await
}

/// Publishes one message on a channel from `source` and waits for its
/// confirm.
pub(crate) async fn publish_via(
    shared: &Shared,
    source: &ChannelSource,
    exchange: &str,
    routing_key: &str,
    mut message: Message,
    options: PublishOptions,
) -> Result<()> {
    tracing::debug!(exchange, routing_key, "publish");
    // Both paths, the connection's publish and a direct reply-to
    // publisher, carry the current trace.
    bus_core::propagation::trace(&mut message);
    shared.check_open()?;
    bus_core::validate_name("exchange", exchange)?;
    let exchange_name = short("exchange name", exchange)?;
    check_short("routing key", routing_key)?;
    // RabbitMQ closes the whole channel for these two; refusing them here
    // keeps the other messages in flight on that channel safe.
    message.ttl()?;
    shared.check_size(message.body.len())?;
    if let Some(user) = &message.properties.user_id {
        if *user != shared.url.username {
            return Err(Error::PreconditionFailed(format!(
                "user_id property set to {user:?} but the connection is authenticated as another user"
            ).into()));
        }
    }
    let timeout = shared.options.publish_timeout;
    let until = tokio::time::Instant::now() + timeout;
    // Nothing sent yet: a deadline passing here is `Blocked` while the
    // broker holds publishers back, else `Timeout`.
    let not_sent = || {
        match shared.blocked_reason() {
        Some(reason) => Error::Blocked(format!(
            "the broker holds back publishers on this connection ({reason}); the message was not sent within {timeout:?}"
        )),
        None => Error::Timeout(timeout),
    }
    };
    tokio::time::timeout_at(until, shared.ensure_exchange_exists(exchange))
        .await
        .map_err(|_| not_sent())??;
    // What goes on the wire, built again only for a retry: lapin takes
    // it by value, and most publishes go out on the first attempt.
    let wire = || -> Result<(ShortString, BasicProperties)> {
        let key = if exchange.is_empty() {
            match shared.renamed_queue(routing_key) {
                Some(current) => short("routing key", &current)?,
                None => short("routing key", routing_key)?,
            }
        } else {
            short("routing key", routing_key)?
        };
        let mut properties = properties_to_amqp(&message.properties)?;
        if let Some(reply_to) = &message.properties.reply_to {
            if let Some(current) = shared.renamed_queue(reply_to) {
                properties = properties.with_reply_to(short("reply_to", &current)?);
            }
        }
        Ok((key, properties))
    };
    let publish_options = BasicPublishOptions {
        mandatory: options.mandatory,
        immediate: false,
    };
    // A failed `basic_publish` means lapin did not finish writing the
    // message to the socket (it resolves that future once the last frame
    // is written), so the broker cannot have it. When the channel or the
    // link died under it, the publish is tried again on a new channel
    // (on the next link, waited for within `recovery_wait`). A publish
    // whose frames were written is never sent again: its confirm decides.
    let mut attempts = 0;
    let (generation, channel, confirm) = loop {
        attempts += 1;
        let (key, properties) = wire()?;
        let (generation, channel) = tokio::time::timeout_at(until, source.get(shared))
            .await
            .map_err(|_| not_sent())??;
        // While the broker blocks the connection, lapin holds what it is
        // given and sends it once the block is lifted, even if the caller
        // gave up long before: the message waits here instead, unsent.
        if shared.blocked_reason().is_some() {
            shared.wait_unblocked(until, "the message").await?;
        }
        let written = channel.basic_publish(
            exchange_name.clone(),
            key,
            publish_options,
            &message.body,
            properties,
        );
        let Ok(written) = tokio::time::timeout_at(until, written).await else {
            // Handed to the connection just as the broker blocked it (or
            // the socket stalled): it may still go out.
            return Err(unknown_outcome(shared, timeout));
        };
        match written {
            Ok(confirm) => break (generation, channel, confirm),
            Err(e)
                if attempts < 3 && (!channel.status().connected() || is_connection_error(&e)) =>
            {
                tracing::debug!(error = %e, "publisher channel found closed; opening another");
                if is_connection_error(&e) {
                    shared.poke();
                }
                source.forget(generation, &channel);
            }
            Err(e) => return Err(shared.fail(&e)),
        }
    };
    let Ok(confirmed) = tokio::time::timeout_at(until, confirm).await else {
        return Err(unknown_outcome(shared, timeout));
    };
    match confirmed {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) => {
            let routing_key = resolved_key(shared, exchange, routing_key);
            tracing::debug!(
                exchange,
                routing_key = %routing_key,
                reply_code = returned.reply_code,
                "mandatory message returned"
            );
            Err(Error::Unroutable {
                exchange: exchange.to_owned(),
                routing_key,
                message: Box::new(message),
            })
        }
        Ok(Confirmation::Nack(_)) => {
            source.retire(generation, &channel);
            let routing_key = resolved_key(shared, exchange, routing_key);
            Err(Error::Nacked(format!(
                "the broker refused (nacked) the message published to exchange {exchange:?} with routing key {routing_key:?}: \
                 a queue it routes to did not take it (a full queue with x-overflow = reject-publish, \
                 or a queue that is not available, such as a quorum queue without a leader); \
                 the next publish goes out on a new channel and may succeed"
            )))
        }
        Ok(Confirmation::NotRequested) => Err(Error::backend(
            "amqp",
            false,
            "the publisher channel is not in confirm mode",
        )),
        Err(e) => {
            source.forget(generation, &channel);
            Err(attribute_channel_error(
                shared,
                &e,
                exchange,
                message.body.len(),
            ))
        }
    }
}

/// The error of a publish handed to the connection but not confirmed
/// within `timeout`: its outcome is unknown, as for a lost connection.
fn unknown_outcome(shared: &Shared, timeout: std::time::Duration) -> Error {
    match shared.blocked_reason() {
        Some(reason) => {
            tracing::debug!(%reason, "publish not confirmed while the broker blocks the connection");
        }
        None => tracing::debug!(?timeout, "publish not confirmed in time"),
    }
    Error::Timeout(timeout)
}

/// The routing key a publish went out with: through the default exchange,
/// the queue's current name.
fn resolved_key(shared: &Shared, exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        shared.resolve_queue(routing_key)
    } else {
        routing_key.to_owned()
    }
}

/// The error a publish gets when its channel failed before its confirm.
///
/// The broker closes a channel for one bad publish (a missing or internal
/// exchange) and every other publish in flight on it fails with the same
/// channel error. Only those that name the exchange the broker complained
/// about get its error; for the others the outcome is unknown, which is a
/// temporary `ConnectionLost`, never success.
fn attribute_channel_error(shared: &Shared, e: &lapin::Error, exchange: &str, len: usize) -> Error {
    match broker_close(e) {
        // "message size N is larger than configured max size M": the
        // message over M caused it; the limit is kept, so that the next
        // oversized message is refused before it closes a channel.
        Some(close) if !close.hard && close.code == 406 && close.text.contains("max size") => {
            match shared.learn_size_limit(&close.text) {
                Some(max) if len as u64 > max => Error::PreconditionFailed(format!(
                    "the broker refused the message: {} (its body is {len} bytes)",
                    close.text
                ).into()),
                _ => Error::ConnectionLost(format!(
                    "the publisher channel was closed by the broker for another message ({} {}) before this one was confirmed; its outcome is unknown",
                    close.code, close.text
                )),
            }
        }
        Some(close) if !close.hard => {
            if close.text.contains(&format!("exchange '{exchange}'")) {
                if close.code == 404 {
                    shared.forget_known_exchange(exchange);
                }
                error_from_code(close.code, close.text)
            } else {
                Error::ConnectionLost(format!(
                    "the publisher channel was closed by the broker ({} {}) before this message was confirmed; its outcome is unknown",
                    close.code, close.text
                ))
            }
        }
        _ => {
            let mapped = shared.fail(e);
            match mapped {
                Error::ConnectionLost(m) => Error::ConnectionLost(format!(
                    "{m}; the message was not confirmed and its outcome is unknown"
                )),
                other => other,
            }
        }
    }
}

/// The publisher of a direct reply-to queue: requests published through it
/// leave on the channel that consumes the replies.
pub(crate) struct ReplyPublisher {
    pub(crate) shared: Arc<Shared>,
    pub(crate) source: ChannelSource,
}

impl fmt::Debug for ReplyPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyPublisher").finish_non_exhaustive()
    }
}

#[async_trait]
impl Publisher for ReplyPublisher {
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        options: PublishOptions,
    ) -> Result<()> {
        publish_via(
            &self.shared,
            &self.source,
            exchange,
            routing_key,
            message,
            options,
        )
        .await
    }
}
