//! The topology side of a connection: the channel topology operations run
//! on, the journal of what the application declared (replayed by
//! recovery), the current names of queues a recovery renamed, and what is
//! known of the broker's exchanges and queues.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bus_core::sync::{Mutex, MutexGuard};
use bus_core::{is_reserved_name, Error, ExchangeKind, QueueOptions, Result};
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};

use super::Shared;
use crate::convert::{broker_close, is_connection_error, short};
use crate::journal::Journal;
use crate::link::unless_lost;
use crate::publish::LinkedChannel;

/// The topology's share of a connection.
pub(super) struct Topology {
    journal: Mutex<Journal>,
    /// The channel topology operations run on, one at a time, so that a
    /// request the broker refuses (and closes the channel for) fails alone.
    channel: tokio::sync::Mutex<LinkedChannel>,
    /// Exchanges seen to exist on the current link (by generation), so that
    /// a publish to a missing one is caught by a passive declare on the
    /// topology channel instead of closing the publisher channel under
    /// every other publish in flight.
    known_exchanges: Mutex<(u64, HashSet<String>)>,
    /// Whether a recovery ever gave a queue a new name: until then every
    /// queue's current name is the one the application holds, and names
    /// need no look-up.
    renamed: AtomicBool,
}

impl Topology {
    pub(super) fn new() -> Self {
        Topology {
            journal: Mutex::new(Journal::default()),
            channel: tokio::sync::Mutex::new(None),
            known_exchanges: Mutex::new((0, HashSet::new())),
            renamed: AtomicBool::new(false),
        }
    }
}

impl Shared {
    /// The journal of the topology this connection declared.
    pub(super) fn journal(&self) -> MutexGuard<'_, Journal> {
        self.topology.journal.lock()
    }

    /// Records the new names a recovery gave server-named queues
    /// (`(handle, new name)` pairs).
    pub(super) fn record_renames(&self, renames: &[(String, String)]) {
        if renames.is_empty() {
            return;
        }
        let mut journal = self.journal();
        self.topology.renamed.store(true, Ordering::Release);
        for (handle, new) in renames {
            journal.rename(handle, new);
        }
    }

    /// The journal, to resolve names with, once a recovery renamed a
    /// queue; `None` while every queue's current name is the one the
    /// application holds.
    pub(super) fn renames(&self) -> Option<MutexGuard<'_, Journal>> {
        self.topology
            .renamed
            .load(Ordering::Acquire)
            .then(|| self.journal())
    }

    pub(crate) fn resolve_queue(&self, name: &str) -> String {
        self.renames()
            .map_or_else(|| name.to_owned(), |journal| journal.resolve(name))
    }

    /// The current name of the queue the application names `name`, when a
    /// recovery renamed it.
    pub(crate) fn renamed_queue(&self, name: &str) -> Option<String> {
        let current = self.renames()?.resolve(name);
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

    /// Forgets a queue someone else deleted, so that recovery does not
    /// declare it again.
    pub(crate) fn forget_deleted_queue(&self, name: &str) {
        self.journal().forget_queue(name);
    }

    /// Whether the queue `name` (the application's name or its current
    /// one) was declared exclusive by this connection.
    pub(crate) fn queue_is_exclusive(&self, name: &str) -> bool {
        self.journal().is_exclusive(name)
    }

    fn exchange_known(&self, generation: u64, name: &str) -> bool {
        let known = self.topology.known_exchanges.lock();
        known.0 == generation && known.1.contains(name)
    }

    fn remember_exchange(&self, generation: u64, name: &str) {
        let mut known = self.topology.known_exchanges.lock();
        if known.0 != generation {
            *known = (generation, HashSet::new());
        }
        known.1.insert(name.to_owned());
    }

    pub(crate) fn forget_known_exchange(&self, name: &str) {
        self.topology.known_exchanges.lock().1.remove(name);
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
        let mut slot = match tokio::time::timeout_at(until, self.topology.channel.lock()).await {
            Ok(slot) => slot,
            Err(_) => return Err(self.not_sent_in_time(timeout)),
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
            // Sent: its outcome is unknown, whatever holds the broker back.
            return Err(Error::Timeout(timeout));
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

    /// The error of an operation whose `timeout` passed before it was sent:
    /// `Blocked` while the broker holds the connection back (nothing was
    /// sent), else `Timeout`.
    fn not_sent_in_time(&self, timeout: Duration) -> Error {
        match self.blocked_reason() {
            Some(reason) => Error::Blocked(format!(
                "the broker holds back this connection ({reason}); the operation was not sent within {timeout:?}"
            )),
            None => Error::Timeout(timeout),
        }
    }
}

pub(super) fn lapin_kind(kind: &ExchangeKind) -> lapin::ExchangeKind {
    match kind {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        ExchangeKind::Custom(name) => lapin::ExchangeKind::Custom(name.clone()),
    }
}

pub(super) fn queue_declare_options(o: &QueueOptions) -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: o.passive,
        durable: o.durable,
        exclusive: o.exclusive,
        auto_delete: o.auto_delete,
        nowait: false,
    }
}
