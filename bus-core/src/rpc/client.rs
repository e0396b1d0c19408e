//! The RPC client: many calls in flight over one reply queue.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use super::codec::{decode_message, remote_error, Format};
use crate::delivery::Consumer;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::sync::Mutex;
use crate::topology::DeleteQueueOptions;
use crate::topology::MAX_TTL;
use crate::transport::{classic_reply_queue, Connection, PublishOptions, Publisher};
use crate::DEFAULT_EXCHANGE;

/// How long a call waits for its reply unless told otherwise: 180 s, the
/// legacy clients' default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

/// Settings of an [`RpcClient`].
///
/// ```
/// # use std::time::Duration;
/// # use bus_core::rpc::{Format, RpcClientOptions};
/// let options = RpcClientOptions::default()
///     .timeout(Duration::from_secs(30))
///     .format(Format::Json);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcClientOptions {
    timeout: Duration,
    classic_reply_queue: bool,
    format: Format,
}

impl Default for RpcClientOptions {
    fn default() -> Self {
        RpcClientOptions {
            timeout: DEFAULT_TIMEOUT,
            classic_reply_queue: false,
            format: Format::MsgPack,
        }
    }
}

impl RpcClientOptions {
    /// The timeout of calls that do not set their own; [`DEFAULT_TIMEOUT`]
    /// unless set.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Use a server-named exclusive queue for replies, as the legacy clients
    /// do, even when the transport offers a faster reply path (RabbitMQ's
    /// direct reply-to).
    #[must_use]
    pub fn classic_reply_queue(mut self, classic: bool) -> Self {
        self.classic_reply_queue = classic;
        self
    }

    /// The encoding of typed requests; msgpack unless set.
    #[must_use]
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }
}

/// Settings of one call, overriding the client's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallOptions {
    timeout: Option<Duration>,
    format: Option<Format>,
}

impl CallOptions {
    /// The client's settings unchanged.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How long this call waits for its reply.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The encoding of this typed request.
    #[must_use]
    pub fn format(mut self, format: Format) -> Self {
        self.format = Some(format);
        self
    }
}

/// Calls services over any [`Connection`]: sends a request to a queue and
/// waits for the reply.
///
/// One client keeps one reply queue and multiplexes any number of concurrent
/// calls over it, matching each reply to its call by correlation id (a new
/// UUID4 string per call, as the legacy peers use). Cloning is cheap and
/// shares the reply queue.
///
/// Requests are published mandatory where the transport supports it, carry
/// `reply_to`, `correlation_id` and an `expiration` equal to the call's
/// timeout (at most [`MAX_TTL`](crate::MAX_TTL)), so that work nobody waits
/// for any more can be dropped. With feature `otel`, a request also carries
/// the caller's trace context (`traceparent`, `tracestate`) unless it
/// carries a `traceparent` already, so the server's handling joins the
/// caller's trace (see `otel`).
///
/// Errors a call reports:
/// - [`Error::Timeout`] when no reply came in time; the call's slot is freed
///   at once, and a reply arriving later is dropped and counted in
///   [`RpcClient::late_replies`], never handed to another call;
/// - [`Error::Unroutable`] when no queue took the request (the transport
///   supports mandatory publishes and nobody declared the service's queue);
/// - [`Error::Remote`] when the service's handler failed, with its message;
/// - [`Error::Codec`] when the request cannot be encoded or the reply decoded;
/// - [`Error::ConnectionLost`] for every call in flight when the reply
///   consumer ends (the connection was lost or closed): they fail at once
///   instead of waiting out their timeouts. The next call opens a new reply
///   queue, or fails with the connection's error.
///
/// The client needs a tokio runtime; its reply reader runs as a task on the
/// runtime it was created on. Dropping a call's future cancels the call and
/// frees its slot.
#[derive(Clone)]
pub struct RpcClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    conn: Arc<dyn Connection>,
    options: RpcClientOptions,
    mandatory: bool,
    runtime: Handle,
    current: Mutex<Option<Arc<ReplyLink>>>,
    // Serialises opening a reply queue so concurrent calls open one, not many.
    opening: tokio::sync::Mutex<()>,
    late_replies: Arc<AtomicU64>,
}

impl fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.inner.current.lock();
        f.debug_struct("RpcClient")
            .field("options", &self.inner.options)
            .field("reply_to", &current.as_ref().map(|l| l.address.as_str()))
            .field("in_flight", &current.as_ref().map_or(0, |l| l.routes.len()))
            .field(
                "late_replies",
                &self.inner.late_replies.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl RpcClient {
    /// A client with default settings; opens its reply queue at once.
    ///
    /// # Errors
    /// Whatever opening the reply queue reports; [`Error::NotSupported`]
    /// outside a tokio runtime.
    pub async fn new(conn: Arc<dyn Connection>) -> Result<RpcClient> {
        Self::with_options(conn, RpcClientOptions::default()).await
    }

    /// A client with these settings; opens its reply queue at once.
    ///
    /// # Errors
    /// As [`RpcClient::new`].
    pub async fn with_options(
        conn: Arc<dyn Connection>,
        options: RpcClientOptions,
    ) -> Result<RpcClient> {
        let runtime = Handle::try_current().map_err(|_| {
            Error::NotSupported("an RpcClient must be created inside a tokio runtime".into())
        })?;
        let client = RpcClient {
            inner: Arc::new(ClientInner {
                mandatory: conn.capabilities().mandatory,
                conn,
                options,
                runtime,
                current: Mutex::new(None),
                opening: tokio::sync::Mutex::new(()),
                late_replies: Arc::new(AtomicU64::new(0)),
            }),
        };
        client.link().await?;
        Ok(client)
    }

    /// The client's settings.
    #[must_use]
    pub fn options(&self) -> &RpcClientOptions {
        &self.inner.options
    }

    /// Calls the service on `queue` with a typed request and decodes its
    /// reply, with the client's timeout and format.
    ///
    /// # Errors
    /// See [`RpcClient`].
    pub async fn call<Req, Resp>(&self, queue: &str, request: &Req) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.call_with(queue, request, CallOptions::new()).await
    }

    /// As [`RpcClient::call`], with settings for this call.
    ///
    /// # Errors
    /// See [`RpcClient`].
    pub async fn call_with<Req, Resp>(
        &self,
        queue: &str,
        request: &Req,
        options: CallOptions,
    ) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let message = self.encode_request(request, &options)?;
        let reply = self.call_raw_with(queue, message, options).await?;
        decode_message(&reply)
    }

    /// Calls the service on `queue` with a message as it is (body and
    /// properties; `correlation_id`, `reply_to` and `expiration` are set by
    /// the call) and returns the reply message undecoded.
    ///
    /// # Errors
    /// See [`RpcClient`]; an error reply is [`Error::Remote`] here too.
    pub async fn call_raw(&self, queue: &str, request: Message) -> Result<Message> {
        self.call_raw_with(queue, request, CallOptions::new()).await
    }

    /// As [`RpcClient::call_raw`], with settings for this call (its format
    /// is not used: the message is sent as it is).
    ///
    /// # Errors
    /// See [`RpcClient`].
    pub async fn call_raw_with(
        &self,
        queue: &str,
        request: Message,
        options: CallOptions,
    ) -> Result<Message> {
        let timeout = options.timeout.unwrap_or(self.inner.options.timeout);
        // The timeout covers publishing as well as waiting: the caller gets
        // an answer by then whatever holds the call up.
        match tokio::time::timeout(timeout, self.exchange(queue, request, timeout)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Replies that arrived for no call in flight (timed out, cancelled, or
    /// never made by this client) and were dropped.
    #[must_use]
    pub fn late_replies(&self) -> u64 {
        self.inner.late_replies.load(Ordering::Relaxed)
    }

    /// Calls waiting for their reply right now.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.inner
            .current
            .lock()
            .as_ref()
            .map_or(0, |l| l.routes.len())
    }

    pub(crate) fn encode_request<Req: Serialize + ?Sized>(
        &self,
        request: &Req,
        options: &CallOptions,
    ) -> Result<Message> {
        options
            .format
            .unwrap_or(self.inner.options.format)
            .to_message(request)
    }

    async fn exchange(
        &self,
        queue: &str,
        mut request: Message,
        timeout: Duration,
    ) -> Result<Message> {
        let link = self.link().await?;
        let id = uuid::Uuid::new_v4().to_string();
        let reply = link.routes.register(&id)?;
        // Frees the slot whatever ends the call: a reply, an error, the
        // timeout or the caller dropping the future.
        let _slot = Slot {
            routes: &link.routes,
            id: &id,
        };
        let props = &mut request.properties;
        props.correlation_id = Some(id.clone());
        props.reply_to = Some(link.address.clone());
        // A longer timeout than a broker accepts as an expiration still
        // waits that long; the request just lives for the longest TTL.
        props.expiration = Some(timeout.min(MAX_TTL).as_millis().to_string());
        let options = PublishOptions::default().with_mandatory(self.inner.mandatory);
        link.publisher
            .publish(DEFAULT_EXCHANGE, queue, request, options)
            .await?;
        let reply = reply.await.map_err(|_| {
            Error::ConnectionLost("the reply reader stopped before the reply came".into())
        })??;
        match remote_error(&reply) {
            Some(message) => Err(Error::Remote { message }),
            None => Ok(reply),
        }
    }

    /// The open reply queue, opening a new one when there is none or the
    /// last one's consumer ended.
    async fn link(&self) -> Result<Arc<ReplyLink>> {
        if let Some(link) = self.open_link() {
            return Ok(link);
        }
        let _opening = self.inner.opening.lock().await;
        if let Some(link) = self.open_link() {
            return Ok(link);
        }
        let link = Arc::new(ReplyLink::open(&self.inner).await?);
        *self.inner.current.lock() = Some(link.clone());
        Ok(link)
    }

    fn open_link(&self) -> Option<Arc<ReplyLink>> {
        self.inner
            .current
            .lock()
            .as_ref()
            .filter(|l| l.routes.is_open())
            .cloned()
    }
}

type Waiters = HashMap<String, oneshot::Sender<Result<Message>>>;

/// The calls waiting on one reply queue, by correlation id. `None` once the
/// queue's consumer ended: no call can wait on it any more.
struct Routes {
    waiting: Mutex<Option<Waiters>>,
}

impl Routes {
    fn register(&self, id: &str) -> Result<oneshot::Receiver<Result<Message>>> {
        let (tx, rx) = oneshot::channel();
        match self.waiting.lock().as_mut() {
            Some(waiting) => {
                waiting.insert(id.to_owned(), tx);
                Ok(rx)
            }
            None => Err(Error::ConnectionLost(
                "the reply queue's consumer ended".into(),
            )),
        }
    }

    /// The call waiting for the reply with this id, taken off the map.
    fn take(&self, id: &str) -> Option<oneshot::Sender<Result<Message>>> {
        self.waiting.lock().as_mut().and_then(|w| w.remove(id))
    }

    /// Hands a reply to its call; `false` when no call waits for it.
    #[cfg(test)]
    fn complete(&self, id: &str, reply: Message) -> bool {
        self.take(id).is_some_and(|tx| tx.send(Ok(reply)).is_ok())
    }

    fn remove(&self, id: &str) {
        if let Some(waiting) = self.waiting.lock().as_mut() {
            waiting.remove(id);
        }
    }

    fn fail_all(&self, reason: &str) {
        let waiting = self.waiting.lock().take();
        for (_, tx) in waiting.into_iter().flatten() {
            let _ = tx.send(Err(Error::ConnectionLost(reason.to_owned())));
        }
    }

    fn is_open(&self) -> bool {
        self.waiting.lock().is_some()
    }

    fn len(&self) -> usize {
        self.waiting.lock().as_ref().map_or(0, HashMap::len)
    }
}

struct Slot<'a> {
    routes: &'a Routes,
    id: &'a str,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.routes.remove(self.id);
    }
}

/// One reply queue, the task reading it, and where requests go.
struct ReplyLink {
    address: String,
    publisher: Arc<dyn Publisher>,
    routes: Arc<Routes>,
    reader: AbortHandle,
    /// Set when the reply queue is a real queue this client declared: it is
    /// deleted when the link goes, instead of lingering until the connection
    /// closes.
    cleanup: Option<(Arc<dyn Connection>, Handle)>,
}

impl ReplyLink {
    async fn open(client: &ClientInner) -> Result<ReplyLink> {
        let conn = &client.conn;
        let classic = client.options.classic_reply_queue;
        let queue = if classic {
            classic_reply_queue(&**conn).await?
        } else {
            conn.reply_queue().await?
        };
        // RabbitMQ's direct reply-to is a pseudo-queue, nothing to delete.
        let declared = (classic || !conn.capabilities().direct_reply)
            && !queue.address.starts_with("amq.rabbitmq.reply-to");
        let publisher = queue
            .publisher
            .unwrap_or_else(|| Arc::new(conn.clone()) as Arc<dyn Publisher>);
        let routes = Arc::new(Routes {
            waiting: Mutex::new(Some(HashMap::new())),
        });
        let reader = client
            .runtime
            .spawn(read_replies(
                queue.consumer,
                routes.clone(),
                client.late_replies.clone(),
            ))
            .abort_handle();
        Ok(ReplyLink {
            address: queue.address,
            publisher,
            routes,
            reader,
            cleanup: declared.then(|| (conn.clone(), client.runtime.clone())),
        })
    }
}

impl Drop for ReplyLink {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some((conn, runtime)) = self.cleanup.take() {
            let queue = std::mem::take(&mut self.address);
            runtime.spawn(async move {
                if conn.is_open() {
                    if let Err(e) = conn
                        .delete_queue(&queue, DeleteQueueOptions::default())
                        .await
                    {
                        tracing::debug!(queue, error = %e, "could not delete a reply queue");
                    }
                }
            });
        }
    }
}

async fn read_replies(mut consumer: Consumer, routes: Arc<Routes>, late: Arc<AtomicU64>) {
    let reason = loop {
        match consumer.next().await {
            Some(Ok(mut delivery)) => {
                let message = std::mem::take(&mut delivery.message);
                let waiter = message
                    .properties
                    .correlation_id
                    .as_deref()
                    .and_then(|id| routes.take(id));
                // A waiter whose receiver is gone was cancelled between its
                // timeout and the removal of its slot: the reply is late all
                // the same.
                let matched = waiter.is_some_and(|tx| tx.send(Ok(message)).is_ok());
                if !matched {
                    late.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        queue = consumer.queue(),
                        "dropped a reply no call waits for"
                    );
                }
            }
            Some(Err(e)) => break format!("the reply consumer failed: {e}"),
            None => {
                break "the reply consumer ended (connection closed or lost, or reply queue deleted)"
                    .to_owned()
            }
        }
    };
    routes.fail_all(&reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Routes {
        Routes {
            waiting: Mutex::new(Some(HashMap::new())),
        }
    }

    #[test]
    fn defaults_are_the_legacy_ones() {
        let options = RpcClientOptions::default();
        assert_eq!(options.timeout, Duration::from_secs(180));
        assert_eq!(options.format, Format::MsgPack);
        assert!(!options.classic_reply_queue);
    }

    #[test]
    fn a_reply_goes_to_its_call_only() {
        let routes = routes();
        let mut first = routes.register("first").unwrap();
        let mut second = routes.register("second").unwrap();
        assert!(routes.complete("second", Message::new("for second")));
        assert!(first.try_recv().is_err(), "the first call got nothing");
        let reply = second.try_recv().unwrap().unwrap();
        assert_eq!(&reply.body[..], b"for second");
        assert!(
            !routes.complete("second", Message::new("again")),
            "a second reply to one call is late"
        );
        assert!(!routes.complete("unknown", Message::new("stray")));
        assert_eq!(routes.len(), 1);
    }

    #[test]
    fn a_slot_is_freed_when_its_call_ends() {
        let routes = routes();
        let _reply = routes.register("call").unwrap();
        {
            let _slot = Slot {
                routes: &routes,
                id: "call",
            };
            assert_eq!(routes.len(), 1);
        }
        assert_eq!(routes.len(), 0);
        assert!(!routes.complete("call", Message::new("late")));
    }

    #[test]
    fn a_reply_for_a_cancelled_call_is_late() {
        let routes = routes();
        drop(routes.register("cancelled").unwrap());
        assert!(!routes.complete("cancelled", Message::new("late")));
    }

    #[test]
    fn an_ended_consumer_fails_every_call_in_flight() {
        let routes = routes();
        let mut a = routes.register("a").unwrap();
        let mut b = routes.register("b").unwrap();
        routes.fail_all("connection reset");
        for rx in [&mut a, &mut b] {
            assert!(matches!(
                rx.try_recv().unwrap(),
                Err(Error::ConnectionLost(m)) if m == "connection reset"
            ));
        }
        assert!(!routes.is_open());
        assert!(matches!(
            routes.register("c"),
            Err(Error::ConnectionLost(_))
        ));
    }
}
