//! Recovery: the supervisor that watches the link and re-establishes it
//! when it is lost, and the replay of the topology journal on each new
//! link.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bus_core::{Error, Result};
use futures::stream::BoxStream;
use futures::StreamExt;
use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions};
use tokio::sync::Notify;

use super::topology::{lapin_kind, queue_declare_options};
use super::Shared;
use crate::convert::{is_connection_error, map_error, short, table_to_amqp};
use crate::events::RecoveryEvent;
use crate::link::{connect_any, unless_lost, Link, LinkState};

impl Shared {
    /// Declares the journal's topology again on a new link. Server-named
    /// queues get new names, recorded in the journal. Fails only when the
    /// link itself fails.
    pub(super) async fn recover_topology(&self, link: &Link) -> Result<()> {
        let journal = self.journal().clone();
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
        self.record_renames(&renames);
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
pub(super) async fn supervise(
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
        shared.set_state(LinkState::Down {
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
                shared.set_state(LinkState::Closed {
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
                    shared.set_state(LinkState::Up(link));
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
