//! Recovery of a connection the broker dropped, as bus-amqp does it on
//! RabbitMQ: the journal of what the connection declared (bus-core's
//! [`Journal`]), replayed on the new link; server-named queues renamed;
//! consumers resumed on the same stream, their tags going on growing.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use bus_core::recovery::Journal;
use bus_core::sync::{Mutex, MutexGuard};
use bus_core::{ConsumeOptions, Consumer, ConsumerControl, Delivery, Error, RecoveryEvent, Result};
use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, Notify};

use crate::connection::ConnInner;

/// What a recovering connection keeps.
pub(crate) struct RecoveryState {
    journal: Mutex<Journal>,
    /// Whether a recovery ever renamed a queue: until then names need no
    /// look-up.
    renamed: AtomicBool,
    pub(crate) events: broadcast::Sender<RecoveryEvent>,
    generation: AtomicU64,
    /// Woken when the link leaves the down state.
    pub(crate) up: Notify,
    resumers: Mutex<Vec<Weak<Resumer>>>,
}

impl RecoveryState {
    pub(crate) fn new() -> Self {
        RecoveryState {
            journal: Mutex::new(Journal::default()),
            renamed: AtomicBool::new(false),
            events: broadcast::channel(1024).0,
            generation: AtomicU64::new(1),
            up: Notify::new(),
            resumers: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn resolve(&self, name: &str) -> String {
        if !self.renamed.load(Ordering::Acquire) {
            return name.to_owned();
        }
        self.journal().resolve(name)
    }

    pub(crate) fn emit(&self, event: RecoveryEvent) {
        tracing::info!(?event, "local recovery");
        let _ = self.events.send(event);
    }

    fn resumers(&self) -> Vec<Arc<Resumer>> {
        let mut list = self.resumers.lock();
        list.retain(|r| r.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    }

    fn is_exclusive(&self, handle: &str) -> bool {
        self.journal().is_exclusive(handle)
    }

    /// The link is gone: consumers wait for the next one. Those of an
    /// exclusive queue (which died with the link) hear of it.
    pub(crate) fn link_lost(&self, reason: &str) {
        for r in self.resumers() {
            let exclusive = self.is_exclusive(&r.queue);
            let mut st = r.state.lock();
            if st.finished || st.cancelled {
                continue;
            }
            st.waiting = true;
            if exclusive {
                st.notice = Some(Error::ConnectionLost(format!(
                    "consumer {} lost its connection ({reason}); its exclusive queue died with it \
                     and is declared again",
                    r.tag()
                )));
            }
        }
    }

    /// The application closed the connection: every consumer ends.
    pub(crate) fn closed(&self) {
        for r in self.resumers() {
            let waker = {
                let mut st = r.state.lock();
                st.finished = true;
                st.waiting = false;
                st.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
        self.up.notify_waiters();
    }

    /// Declares the journal again on the new link `id`; returns the new
    /// generation.
    pub(crate) fn replay_topology(&self, conn: &ConnInner, id: u64) -> u64 {
        let journal = self.journal().clone();
        let broker = &conn.broker;
        let failed = |what: String, e: Error| {
            tracing::warn!(%what, error = %e, "could not declare again after reconnecting");
            self.emit(RecoveryEvent::TopologyRecoveryFailed {
                what,
                error: e.to_string(),
            });
        };
        for (name, (kind, options)) in &journal.exchanges {
            if let Err(e) = broker.declare_exchange(name, kind, options) {
                failed(format!("exchange {name:?}"), e);
            }
        }
        for (handle, record) in &journal.queues {
            let requested = if record.server_named { "" } else { handle };
            match broker.declare_queue(id, requested, &record.options) {
                Ok((info, created)) => {
                    if let Some(queue) = created {
                        conn.track_exclusive(queue);
                    }
                    if info.name != record.current {
                        self.journal().rename(handle, &info.name);
                        self.renamed.store(true, Ordering::Release);
                        self.emit(RecoveryEvent::QueueRenamed {
                            old: handle.clone(),
                            new: info.name,
                        });
                    }
                }
                Err(e) => failed(format!("queue {handle:?}"), e),
            }
        }
        for b in &journal.bindings {
            let queue = self.resolve(&b.queue);
            if let Err(e) =
                broker.bind(id, &queue, &b.exchange, &b.routing_key, b.arguments.clone())
            {
                failed(
                    format!(
                        "binding of queue {:?} to exchange {:?} with key {:?}",
                        b.queue, b.exchange, b.routing_key
                    ),
                    e,
                );
            }
        }
        for b in &journal.exchange_bindings {
            if let Err(e) = broker.bind_exchange(
                &b.destination,
                &b.source,
                &b.routing_key,
                b.arguments.clone(),
            ) {
                failed(
                    format!(
                        "binding of exchange {:?} to exchange {:?} with key {:?}",
                        b.destination, b.source, b.routing_key
                    ),
                    e,
                );
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Starts every waiting consumer again, in the order they started.
    pub(crate) fn resume_consumers(&self, conn: &Arc<ConnInner>) {
        for r in self.resumers() {
            let first_tag = {
                let st = r.state.lock();
                if !st.waiting || st.finished || st.cancelled {
                    continue;
                }
                st.highest + 1
            };
            let queue = self.resolve(&r.queue);
            let started = conn
                .broker
                .consume(conn, &queue, r.options.clone(), first_tag);
            let (waker, event) = {
                let mut st = r.state.lock();
                match started {
                    Ok(consumer) => {
                        st.current = Some(consumer);
                        st.waiting = false;
                        (
                            st.waker.take(),
                            RecoveryEvent::ConsumerResumed {
                                consumer_tag: r.tag().to_owned(),
                                queue: r.queue.clone(),
                            },
                        )
                    }
                    Err(e) => {
                        let error = e.to_string();
                        st.notice = Some(e);
                        st.finished = true;
                        st.waiting = false;
                        (
                            st.waker.take(),
                            RecoveryEvent::ConsumerLost {
                                consumer_tag: r.tag().to_owned(),
                                queue: r.queue.clone(),
                                error,
                            },
                        )
                    }
                }
            };
            self.emit(event);
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    /// Starts a consumer that resumes after each recovery.
    pub(crate) async fn consume(
        &self,
        conn: &Arc<ConnInner>,
        queue: &str,
        mut options: ConsumeOptions,
    ) -> Result<Consumer> {
        let current = self.resolve(queue);
        let first = conn.broker.consume(conn, &current, options.clone(), 1)?;
        let tag = first.tag().to_owned();
        options.consumer_tag = Some(tag.clone());
        let resumer = Arc::new(Resumer {
            queue: queue.to_owned(),
            options,
            state: Mutex::new(ResumeState {
                current: Some(first),
                ..ResumeState::default()
            }),
        });
        self.resumers.lock().push(Arc::downgrade(&resumer));
        Ok(Consumer::new(
            tag,
            queue.to_owned(),
            Box::pin(ResumingStream {
                resumer: resumer.clone(),
            }),
            Arc::new(ResumeControl { resumer }),
        ))
    }
}

#[derive(Default)]
struct ResumeState {
    /// The consumer on the current link.
    current: Option<Consumer>,
    /// The link is down; a recovery will start the consumer again.
    waiting: bool,
    /// An error to yield before going on.
    notice: Option<Error>,
    /// The stream ends once `current` is drained.
    finished: bool,
    cancelled: bool,
    waker: Option<Waker>,
    /// The highest tag handed out, so the next link's tags start above it.
    highest: u64,
}

/// One application consumer across links.
pub(crate) struct Resumer {
    /// The queue as the application names it.
    queue: String,
    /// With the consumer tag fixed.
    options: ConsumeOptions,
    state: Mutex<ResumeState>,
}

impl Resumer {
    fn tag(&self) -> &str {
        self.options.consumer_tag.as_deref().unwrap_or_default()
    }
}

struct ResumingStream {
    resumer: Arc<Resumer>,
}

impl Stream for ResumingStream {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut st = self.resumer.state.lock();
        loop {
            // The loss notice comes first: what the old link had handed
            // over was requeued, and a resumed link may already be in place.
            if let Some(e) = st.notice.take() {
                return Poll::Ready(Some(Err(e)));
            }
            if let Some(current) = st.current.as_mut() {
                match current.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(d))) => {
                        st.highest = st.highest.max(d.delivery_tag);
                        return Poll::Ready(Some(Ok(d)));
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                    Poll::Ready(None) => {
                        st.current = None;
                        if !st.waiting {
                            st.finished = true;
                        }
                        continue;
                    }
                    Poll::Pending => {
                        st.waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                }
            }
            if st.finished || !st.waiting {
                return Poll::Ready(None);
            }
            st.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }
}

impl Drop for ResumingStream {
    fn drop(&mut self) {
        let current = {
            let mut st = self.resumer.state.lock();
            st.finished = true;
            st.waiting = false;
            st.current.take()
        };
        // Dropping the consumer of the current link requeues what it holds.
        drop(current);
    }
}

struct ResumeControl {
    resumer: Arc<Resumer>,
}

#[async_trait]
impl ConsumerControl for ResumeControl {
    async fn cancel(&self) -> Result<()> {
        let (cancel, waker) = {
            let mut st = self.resumer.state.lock();
            st.cancelled = true;
            match &st.current {
                Some(c) => (Some(c.cancel()), None),
                None => {
                    st.finished = true;
                    st.waiting = false;
                    (None, st.waker.take())
                }
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
        match cancel {
            Some(f) => f.await,
            None => Ok(()),
        }
    }
}
