//! Publishing with publisher confirms on a shared channel in confirm mode.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bus_core::{Error, Message, PublishOptions, Publisher, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::Confirmation;
use tokio::sync::{watch, Mutex};

use crate::connection::Shared;
use crate::convert::{broker_close, error_from_code, properties_to_amqp, short};

/// A channel in confirm mode, tied to the link it was opened on.
pub(crate) type LinkedChannel = Option<(u64, lapin::Channel)>;

/// Where a publish gets its channel.
pub(crate) enum ChannelSource {
    /// The connection's own publisher channel, opened on demand and opened
    /// again when the broker closes it.
    Own(Mutex<LinkedChannel>),
    /// The channel of a direct reply-to consumer: requests must go through
    /// it. Its consumer task opens it (again) and publishes it here.
    Reply(watch::Receiver<LinkedChannel>),
}

impl ChannelSource {
    async fn get(&self, shared: &Shared) -> Result<(u64, lapin::Channel)> {
        match self {
            ChannelSource::Own(slot) => {
                let link = shared.link().await?;
                let mut slot = slot.lock().await;
                if let Some((generation, ch)) = &*slot {
                    if *generation == link.generation && ch.status().connected() {
                        return Ok((*generation, ch.clone()));
                    }
                }
                let ch = link
                    .conn
                    .create_channel()
                    .await
                    .map_err(|e| shared.fail(&e))?;
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| shared.fail(&e))?;
                *slot = Some((link.generation, ch.clone()));
                Ok((link.generation, ch))
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

    async fn forget(&self, generation: u64, channel: &lapin::Channel) {
        if let ChannelSource::Own(slot) = self {
            let mut slot = slot.lock().await;
            if matches!(&*slot, Some((g, c)) if *g == generation && c == channel) {
                *slot = None;
            }
        }
    }
}

/// Publishes one message on a channel from `source` and waits for its
/// confirm.
pub(crate) async fn publish_via(
    shared: &Shared,
    source: &ChannelSource,
    exchange: &str,
    routing_key: &str,
    message: Message,
    options: PublishOptions,
) -> Result<()> {
    shared.check_open()?;
    bus_core::validate_name("exchange", exchange)?;
    let exchange_name = short("exchange name", exchange)?;
    short("routing key", routing_key)?;
    // RabbitMQ closes the whole channel for these two; refusing them here
    // keeps the other messages in flight on that channel safe.
    message.ttl()?;
    if let Some(user) = &message.properties.user_id {
        if *user != shared.url.username {
            return Err(Error::PreconditionFailed(format!(
                "user_id property set to {user:?} but the connection is authenticated as another user"
            )));
        }
    }
    shared.ensure_exchange_exists(exchange).await?;
    let mut properties = message.properties.clone();
    let routing_key = if exchange.is_empty() {
        shared.resolve_queue(routing_key)
    } else {
        routing_key.to_owned()
    };
    if let Some(reply_to) = &properties.reply_to {
        properties.reply_to = Some(shared.resolve_queue(reply_to));
    }
    let amqp_properties = properties_to_amqp(&properties)?;
    let key = short("routing key", &routing_key)?;
    let publish_options = BasicPublishOptions {
        mandatory: options.mandatory,
        immediate: false,
    };
    // A channel found closed before anything was sent on it is replaced
    // and the publish tried again: nothing can have reached the broker.
    let mut attempts = 0;
    let (generation, channel, confirm) = loop {
        attempts += 1;
        let (generation, channel) = source.get(shared).await?;
        match channel
            .basic_publish(
                exchange_name.clone(),
                key.clone(),
                publish_options,
                &message.body,
                amqp_properties.clone(),
            )
            .await
        {
            Ok(confirm) => break (generation, channel, confirm),
            Err(e) if !channel.status().connected() && attempts < 3 => {
                tracing::debug!(error = %e, "publisher channel found closed; opening another");
                source.forget(generation, &channel).await;
            }
            Err(e) => return Err(shared.fail(&e)),
        }
    };
    match confirm.await {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) => {
            tracing::debug!(
                exchange,
                routing_key = %routing_key,
                reply_code = returned.reply_code,
                "mandatory message returned"
            );
            Err(Error::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.clone(),
                message: Box::new(message),
            })
        }
        Ok(Confirmation::Nack(_)) => Err(Error::Nacked(format!(
            "the broker refused the message published to exchange {exchange:?} with routing key {routing_key:?} (e.g. a full queue with x-overflow = reject-publish)"
        ))),
        Ok(Confirmation::NotRequested) => Err(Error::backend(
            "amqp",
            false,
            "the publisher channel is not in confirm mode",
        )),
        Err(e) => {
            source.forget(generation, &channel).await;
            Err(attribute_channel_error(shared, &e, exchange))
        }
    }
}

/// The error a publish gets when its channel failed before its confirm.
///
/// The broker closes a channel for one bad publish (a missing or internal
/// exchange) and every other publish in flight on it fails with the same
/// channel error. Only those that name the exchange the broker complained
/// about get its error; for the others the outcome is unknown, which is a
/// temporary `ConnectionLost`, never success.
fn attribute_channel_error(shared: &Shared, e: &lapin::Error, exchange: &str) -> Error {
    match broker_close(e) {
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
