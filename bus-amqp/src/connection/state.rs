//! What every handle of one connection shares ([`Shared`]), and the link
//! itself: its state, the broker's block on it, the recovery events and
//! the largest message it takes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::{Error, Result};
use tokio::sync::{broadcast, watch, Notify};

use super::consumers::Consumers;
use super::topology::Topology;
use crate::convert::{broker_close, is_connection_error, map_error};
use crate::events::RecoveryEvent;
use crate::link::{Link, LinkState};
use crate::options::AmqpOptions;
use crate::publish::{ChannelSource, OwnChannel};
use crate::url::AmqpUrl;

/// What every handle of one connection shares. Each concern keeps its own
/// state: the link's is here, the topology's in [`Topology`], the
/// consumers' in [`Consumers`], the publisher channel in its
/// [`ChannelSource`].
pub(crate) struct Shared {
    pub(crate) url: AmqpUrl,
    pub(crate) options: AmqpOptions,
    state: watch::Sender<LinkState>,
    events: broadcast::Sender<RecoveryEvent>,
    /// Wakes the supervisor to check the link now.
    poke: Arc<Notify>,
    /// Why the broker holds back this connection's publishers
    /// (`connection.blocked`), while it does.
    blocked: watch::Sender<Option<String>>,
    /// The largest body sent: the configured limit, or a lower one the
    /// broker revealed by refusing a message.
    max_message_size: AtomicU64,
    /// The topology journal, the topology channel and what is known of
    /// the broker's exchanges and queues.
    pub(super) topology: Topology,
    /// The consumers alive and their coalesced acks.
    pub(super) consumers: Consumers,
    /// The channel publishes go out on.
    pub(super) publisher: ChannelSource,
}

impl Shared {
    /// The shared state of a connection whose first link is `link`.
    pub(super) fn new(url: AmqpUrl, options: AmqpOptions, link: Link) -> Self {
        let max_message_size = options.max_message_size;
        Shared {
            url,
            options,
            state: watch::channel(LinkState::Up(link)).0,
            events: broadcast::channel(1024).0,
            poke: Arc::new(Notify::new()),
            blocked: watch::channel(None).0,
            max_message_size: AtomicU64::new(max_message_size),
            topology: Topology::new(),
            consumers: Consumers::new(),
            publisher: ChannelSource::Own(OwnChannel::default()),
        }
    }

    /// What wakes the supervisor, for it to wait on without holding the
    /// connection alive.
    pub(super) fn poke_handle(&self) -> Arc<Notify> {
        self.poke.clone()
    }

    /// Replaces the link state; the state before.
    pub(super) fn set_state(&self, state: LinkState) -> LinkState {
        self.state.send_replace(state)
    }

    /// Recovery events from now on.
    pub(super) fn subscribe_events(&self) -> broadcast::Receiver<RecoveryEvent> {
        self.events.subscribe()
    }

    /// The node of the link (`host:port`), while it is up.
    pub(super) fn current_host(&self) -> Option<String> {
        match &*self.state.borrow() {
            LinkState::Up(link) => Some(link.host.to_string()),
            _ => None,
        }
    }

    /// The link state in words, for `Debug`.
    pub(super) fn describe_state(&self) -> String {
        match &*self.state.borrow() {
            LinkState::Up(link) => format!("connected to {} (link {})", link.host, link.generation),
            LinkState::Down { .. } => "reconnecting".to_owned(),
            LinkState::Closed { .. } => "closed".to_owned(),
        }
    }

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

    pub(super) fn set_blocked(&self, reason: Option<String>) {
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

    /// The generation of the link, when it is up.
    pub(crate) fn up_generation(&self) -> Option<u64> {
        match &*self.state.borrow() {
            LinkState::Up(link) => Some(link.generation),
            _ => None,
        }
    }
}
