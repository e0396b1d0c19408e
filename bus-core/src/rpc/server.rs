//! The RPC server: a handler serving one queue.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::codec::{error_reply, Format};
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::topology::QueueOptions;
use crate::transport::{Connection, ConnectionExt, ConsumeOptions};
use crate::worker::engine::{self, Processed, Stop};
use crate::Requeue;

/// What handling one request came to.
pub(crate) enum Outcome {
    /// Send this reply.
    Reply(Box<Message>),
    /// The request body could not be decoded.
    Undecodable(String),
    /// The handler failed or panicked.
    Failed(String),
    /// Nobody took the request: put it back in the queue.
    Requeue,
}

/// A request handler as the serving loop sees it.
pub(crate) type Handler = Arc<dyn Fn(Message) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// Starts an [`RpcServer`]: the queue it serves, how it declares it, how
/// many requests it handles at once, and finally the handler.
#[must_use = "a builder does nothing until one of its serve methods is called"]
pub struct RpcServerBuilder {
    conn: Arc<dyn Connection>,
    queue: String,
    queue_options: QueueOptions,
    concurrency: u16,
}

impl fmt::Debug for RpcServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcServerBuilder")
            .field("queue", &self.queue)
            .field("queue_options", &self.queue_options)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl RpcServerBuilder {
    /// How the queue is declared. The default is the legacy server's plain
    /// declaration: not durable, not exclusive, not auto-delete, no
    /// arguments. [`QueueOptions::passive`] only checks that it exists.
    ///
    /// When the options set a dead-letter exchange, a request whose body
    /// does not decode is rejected without requeue (so it is dead-lettered)
    /// instead of getting an error reply.
    pub fn queue_options(mut self, options: QueueOptions) -> Self {
        self.queue_options = options;
        self
    }

    /// How many requests are handled at once, which is also the consumer's
    /// prefetch; 1 unless set, as the legacy servers do. The handlers run
    /// concurrently on the server's own task, not in parallel: CPU-heavy
    /// handlers belong on the blocking pool ([`RpcServerBuilder::serve_blocking`]).
    pub fn concurrency(mut self, concurrency: u16) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Serves typed requests with an async handler.
    ///
    /// The request is decoded from msgpack, or JSON when its content type
    /// says so, and the reply encoded the same way (a msgpack reply carries
    /// no content type, as the legacy servers send it). A handler error or
    /// panic becomes an error reply.
    ///
    /// # Errors
    /// As [`RpcServerBuilder::serve_raw`].
    pub async fn serve<Req, Resp, E, F, Fut>(self, handler: F) -> Result<RpcServer>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        E: fmt::Display + Send + 'static,
        F: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Resp, E>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.start(Arc::new(move |request: Message| {
            let handler = handler.clone();
            async move {
                let (format, request) = match decode::<Req>(&request) {
                    Ok(decoded) => decoded,
                    Err(outcome) => return outcome,
                };
                let result = AssertUnwindSafe(async move { handler(request).await })
                    .catch_unwind()
                    .await;
                match result {
                    Ok(Ok(response)) => encode(format, &response),
                    Ok(Err(e)) => Outcome::Failed(e.to_string()),
                    Err(panic) => Outcome::Failed(panic_message(&*panic)),
                }
            }
            .boxed()
        }))
        .await
    }

    /// Serves requests as messages: the handler gets the request (body and
    /// properties) and returns the reply, whose properties are kept (its
    /// `correlation_id` is set to the request's). A handler error or panic
    /// becomes an error reply.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a concurrency of 0; whatever declaring
    /// or consuming the queue reports.
    pub async fn serve_raw<E, F, Fut>(self, handler: F) -> Result<RpcServer>
    where
        E: fmt::Display + Send + 'static,
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Message, E>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.start(Arc::new(move |request: Message| {
            let handler = handler.clone();
            AssertUnwindSafe(async move { handler(request).await })
                .catch_unwind()
                .map(|result| match result {
                    Ok(Ok(reply)) => Outcome::Reply(Box::new(reply)),
                    Ok(Err(e)) => Outcome::Failed(e.to_string()),
                    Err(panic) => Outcome::Failed(panic_message(&*panic)),
                })
                .boxed()
        }))
        .await
    }

    /// Serves typed requests with a blocking handler, run on tokio's
    /// blocking thread pool so that CPU-heavy work (inference) does not
    /// stall the runtime. Otherwise as [`RpcServerBuilder::serve`].
    ///
    /// # Errors
    /// As [`RpcServerBuilder::serve_raw`].
    pub async fn serve_blocking<Req, Resp, E, F>(self, handler: F) -> Result<RpcServer>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        E: fmt::Display + Send + 'static,
        F: Fn(Req) -> std::result::Result<Resp, E> + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        self.start(Arc::new(move |request: Message| {
            let handler = handler.clone();
            async move {
                let (format, request) = match decode::<Req>(&request) {
                    Ok(decoded) => decoded,
                    Err(outcome) => return outcome,
                };
                match tokio::task::spawn_blocking(move || handler(request)).await {
                    Ok(Ok(response)) => encode(format, &response),
                    Ok(Err(e)) => Outcome::Failed(e.to_string()),
                    Err(join) => Outcome::Failed(join_failure(join)),
                }
            }
            .boxed()
        }))
        .await
    }

    /// Serves requests as messages with a blocking handler on tokio's
    /// blocking thread pool. Otherwise as [`RpcServerBuilder::serve_raw`].
    ///
    /// # Errors
    /// As [`RpcServerBuilder::serve_raw`].
    pub async fn serve_raw_blocking<E, F>(self, handler: F) -> Result<RpcServer>
    where
        E: fmt::Display + Send + 'static,
        F: Fn(Message) -> std::result::Result<Message, E> + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        self.start(Arc::new(move |request: Message| {
            let handler = handler.clone();
            tokio::task::spawn_blocking(move || handler(request))
                .map(|result| match result {
                    Ok(Ok(reply)) => Outcome::Reply(Box::new(reply)),
                    Ok(Err(e)) => Outcome::Failed(e.to_string()),
                    Err(join) => Outcome::Failed(join_failure(join)),
                })
                .boxed()
        }))
        .await
    }

    pub(crate) async fn start(self, handler: Handler) -> Result<RpcServer> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::NotSupported(format!(
                "RPC server for queue '{}' must be started inside a tokio runtime",
                self.queue
            ))
        })?;
        if self.concurrency == 0 {
            return Err(Error::InvalidArgument(format!(
                "RPC server for queue '{}': concurrency must be at least 1, got 0",
                self.queue
            )));
        }
        let info = self
            .conn
            .declare_queue(&self.queue, self.queue_options.clone())
            .await?;
        let consumer = self
            .conn
            .consume(&info.name, ConsumeOptions::prefetch(self.concurrency))
            .await?;
        let dead_letters = self
            .queue_options
            .arguments
            .normalized()
            .is_ok_and(|a| a.dead_letter_exchange.is_some());
        let (stop, stopped) = watch::channel(Stop::default());
        let serving = Serving {
            system: engine::system(&*self.conn),
            queue: info.name.clone(),
            conn: self.conn,
            handler,
            dead_letters,
        };
        let concurrency = usize::from(self.concurrency);
        let task = runtime.spawn(async move {
            // The task owns what serving needs, and each delivery's future
            // borrows it: no reference count to touch per request.
            let serving = &serving;
            let process = |delivery: Delivery| {
                let span = engine::process_span(
                    serving.system,
                    &serving.queue,
                    &delivery,
                    &delivery.routing_key,
                    None,
                );
                serving.handle(delivery).instrument(span)
            };
            let (ended, _) =
                engine::run(consumer, concurrency, process, stopped, (), engine::SLICE).await;
            ended
        });
        Ok(RpcServer {
            queue: info.name,
            stop: Arc::new(stop),
            task: Some(task),
        })
    }
}

pub(crate) fn decode<Req: DeserializeOwned>(
    request: &Message,
) -> std::result::Result<(Format, Req), Outcome> {
    let format = Format::of(request).map_err(|e| Outcome::Undecodable(e.to_string()))?;
    let request = format
        .decode(&request.body)
        .map_err(|e| Outcome::Undecodable(e.to_string()))?;
    Ok((format, request))
}

pub(crate) fn encode<Resp: Serialize>(format: Format, response: &Resp) -> Outcome {
    match format.to_message(response) {
        Ok(reply) => Outcome::Reply(Box::new(reply)),
        Err(e) => Outcome::Failed(format!("the handler's response cannot be sent: {e}")),
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    format!("the handler panicked: {text}")
}

fn join_failure(join: tokio::task::JoinError) -> String {
    if join.is_panic() {
        panic_message(&*join.into_panic())
    } else {
        "the handler was cancelled".to_owned()
    }
}

/// A running RPC server: consumes its queue and answers each request.
///
/// Start one with [`RpcServer::builder`]. It runs as tokio tasks until
/// [`RpcServer::shutdown`], until its connection goes away, or until the
/// handle is dropped (which stops it gracefully in the background).
///
/// For each request it runs the handler, publishes the reply to the
/// request's `reply_to` on the default exchange with the request's
/// `correlation_id`, and acks the request only once the reply is published,
/// so that a request whose server dies is delivered again to another one.
/// A request without `reply_to` is handled and acked without a reply. A
/// handler failure is answered with an error reply (see
/// [`ERROR_HEADER`](super::ERROR_HEADER)) and acked, so a failing request is
/// not redelivered over and over.
#[derive(Debug)]
pub struct RpcServer {
    queue: String,
    stop: Arc<watch::Sender<Stop>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl RpcServer {
    /// Starts building a server of `queue` on `conn`. An empty name asks the
    /// transport for a generated one ([`RpcServer::queue`] tells it).
    pub fn builder(conn: Arc<dyn Connection>, queue: impl Into<String>) -> RpcServerBuilder {
        RpcServerBuilder {
            conn,
            queue: queue.into(),
            queue_options: QueueOptions::default(),
            concurrency: 1,
        }
    }

    /// The queue served.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Stops gracefully: takes no new requests (the consumer is cancelled
    /// and requests the transport had already sent are requeued), finishes
    /// those being handled, replies, acks them, and then returns.
    ///
    /// # Errors
    /// What stopped the server earlier if it stopped on its own (the
    /// connection was lost, the queue deleted).
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop.send_modify(|s| s.requested = true);
        self.join().await
    }

    /// Waits until the server stops on its own, because its connection was
    /// closed or lost or its queue deleted; requests being handled are
    /// finished first.
    ///
    /// # Errors
    /// What stopped it.
    pub async fn wait(mut self) -> Result<()> {
        self.join().await
    }

    /// Stops the server as [`RpcServer::shutdown`] does, from any thread,
    /// without waiting.
    pub(crate) fn stop_signal(&self) -> Arc<watch::Sender<Stop>> {
        self.stop.clone()
    }

    /// Asks the server to stop as [`RpcServer::shutdown`] does, giving the
    /// requests in hand `deadline` to finish (the others are requeued), and
    /// returns at once.
    pub(crate) fn stop_within(&self, deadline: std::time::Duration) {
        self.stop.send_modify(|s| {
            s.requested = true;
            s.deadline.get_or_insert(deadline);
        });
    }

    /// A handle that asks the server to stop gracefully from anywhere (a
    /// signal handler, another task), while this one waits on
    /// [`RpcServer::wait`].
    #[must_use]
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            stop: self.stop.clone(),
        }
    }

    /// Whether the server has stopped.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    async fn join(&mut self) -> Result<()> {
        match self.task.take() {
            None => Ok(()),
            Some(task) => task.await.unwrap_or_else(|e| {
                Err(Error::Closed(format!("the RPC server's task failed: {e}")))
            }),
        }
    }
}

/// Asks an [`RpcServer`] to stop: it takes no new requests, finishes and
/// answers those in hand, and then [`RpcServer::wait`] returns. Cheap to
/// clone; asking twice is harmless.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    stop: Arc<watch::Sender<Stop>>,
}

impl ShutdownHandle {
    /// Signals the server to stop; returns at once.
    pub fn shutdown(&self) {
        self.stop.send_modify(|s| s.requested = true);
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop.send_modify(|s| s.requested = true);
    }
}

/// What the shared engine runs for each request.
struct Serving {
    system: &'static str,
    queue: String,
    conn: Arc<dyn Connection>,
    handler: Handler,
    dead_letters: bool,
}

impl Serving {
    async fn handle(&self, mut delivery: Delivery) -> Processed {
        // The handler gets the message itself: settling the delivery needs
        // only its tag.
        let request = std::mem::take(&mut delivery.message);
        let properties = &request.properties;
        let reply_to = properties.reply_to.clone().filter(|r| !r.is_empty());
        let correlation_id = properties.correlation_id.clone();
        let format = Format::of(&request).unwrap_or_default();
        let mut reply = match (self.handler)(request).await {
            Outcome::Reply(reply) => *reply,
            Outcome::Failed(text) => error_reply(&text, format),
            Outcome::Undecodable(text) if self.dead_letters => {
                tracing::warn!(error = %text, "dead-lettering an undecodable request");
                if let Err(e) = delivery.nack(Requeue::No).await {
                    tracing::warn!(error = %e, "could not dead-letter an undecodable request");
                }
                return Processed::Settled;
            }
            Outcome::Undecodable(text) => {
                error_reply(&format!("the request cannot be decoded: {text}"), format)
            }
            Outcome::Requeue => {
                if let Err(e) = delivery.nack(Requeue::Yes).await {
                    tracing::warn!(error = %e, "could not requeue a request");
                }
                return Processed::Settled;
            }
        };
        if let Some(reply_to) = reply_to {
            reply.properties.correlation_id = correlation_id;
            // `send_to_queue`: published without a boxed future where the
            // transport does not wait (`Connection::publish_now`).
            if let Err(e) = self.conn.send_to_queue(&reply_to, reply).await {
                tracing::warn!(reply_to, error = %e, "could not publish an RPC reply");
                if matches!(e, Error::ConnectionLost(_) | Error::Closed(_)) {
                    // The request goes back to the queue: settled here, not
                    // dropped, so that no later `multiple` ack covers it
                    // (and, when only the publishing side is gone, it is
                    // requeued at once). Failing, the broker requeues it
                    // with the connection.
                    if let Err(e) = delivery.nack(Requeue::Yes).await {
                        tracing::debug!(error = %e, "could not requeue a request whose reply failed");
                    }
                    return Processed::Settled;
                }
            }
        }
        // The engine acks it, with the other requests answered in its turn.
        Processed::Ack(delivery)
    }
}
