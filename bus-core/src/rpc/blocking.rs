//! Blocking RPC, for code that is not async: a plain worker loop, or a
//! thread that owns a model.
//!
//! [`BlockingRpcClient`] and [`BlockingRpcServer`] run the async
//! [`RpcClient`] and [`RpcServer`] on a runtime of their own (one thread
//! each) and pass requests and replies to the caller's threads through
//! channels. Errors and timeouts are those of the async API.
//!
//! The connection is best opened on that runtime, by handing the
//! constructor a function that connects (`connect`): a transport that runs
//! tasks for its connection then runs them there, and they live as long as
//! the client or server. A connection opened elsewhere (`new`, `start`)
//! must stay usable as long as the blocking object: if its transport runs
//! tasks on another runtime, that runtime must outlive it.
//!
//! Do not call these blocking methods from async code: they block the
//! thread they run on.
//!
//! ```no_run
//! use std::sync::Arc;
//! use bus_core::rpc::blocking::{BlockingRpcClient, BlockingRpcServer};
//!
//! // Opens a connection, e.g. `bus::connect("amqp://127.0.0.1")`.
//! async fn open() -> bus_core::Result<Arc<dyn bus_core::Connection>> {
//!     # unimplemented!()
//! }
//!
//! # fn main() -> bus_core::Result<()> {
//! let server = BlockingRpcServer::builder("upper").connect(open)?;
//! std::thread::scope(|s| {
//!     // A worker thread, which could own a model: serves until shut down.
//!     s.spawn(|| server.serve(|text: String| Ok::<_, String>(text.to_uppercase())));
//!
//!     let client = BlockingRpcClient::connect(open)?;
//!     let reply: String = client.call("upper", "hello")?;
//!     assert_eq!(reply, "HELLO");
//!     server.shutdown()
//! })
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;

use crossbeam_channel::Receiver;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};

use super::client::{CallOptions, RpcClient, RpcClientOptions};
use super::codec::decode_message;
use super::server::{decode, encode, panic_message, Handler, Outcome, RpcServer};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::sync::Mutex;
use crate::topology::QueueOptions;
use crate::transport::Connection;

/// A tokio runtime on a thread of its own, stopped when dropped.
struct Background {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Background {
    fn start(name: &str) -> Result<Background> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Background {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs a future on the runtime and blocks until it is done.
    fn run<F>(&self, future: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = crossbeam_channel::bounded(1);
        // The call runs in the caller's span, on the runtime's thread: its
        // events, and the trace context its request carries, are the
        // caller's.
        let span = tracing::Span::current();
        self.handle.spawn(tracing::Instrument::instrument(
            async move {
                let _ = tx.send(future.await);
            },
            span,
        ));
        rx.recv()
            .map_err(|_| Error::Closed("the blocking RPC runtime has stopped".into()))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Joining from the runtime's own thread would wait for itself.
            if thread.thread().id() != thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// A blocking [`RpcClient`]: the same calls, errors and timeouts, from any
/// thread. `Sync`: share one between threads to multiplex their calls over
/// one reply queue.
pub struct BlockingRpcClient {
    client: RpcClient,
    background: Background,
}

impl fmt::Debug for BlockingRpcClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingRpcClient")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl BlockingRpcClient {
    /// Starts the client's runtime, runs `connect` on it and opens the reply
    /// queue, with default settings.
    ///
    /// # Errors
    /// What `connect` or opening the reply queue reports; [`Error::Io`] if
    /// the runtime's thread cannot start.
    pub fn connect<F, Fut>(connect: F) -> Result<BlockingRpcClient>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Arc<dyn Connection>>> + Send + 'static,
    {
        Self::connect_with_options(connect, RpcClientOptions::default())
    }

    /// As [`BlockingRpcClient::connect`], with these settings.
    ///
    /// # Errors
    /// As [`BlockingRpcClient::connect`].
    pub fn connect_with_options<F, Fut>(
        connect: F,
        options: RpcClientOptions,
    ) -> Result<BlockingRpcClient>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Arc<dyn Connection>>> + Send + 'static,
    {
        let background = Background::start("bus-rpc-client")?;
        let client = background.run(async move {
            let conn = connect().await?;
            RpcClient::with_options(conn, options).await
        })??;
        Ok(BlockingRpcClient { client, background })
    }

    /// A client over a connection opened elsewhere, which must stay usable
    /// as long as this client (see the [module docs](self)).
    ///
    /// # Errors
    /// As [`BlockingRpcClient::connect`].
    pub fn new(conn: Arc<dyn Connection>, options: RpcClientOptions) -> Result<BlockingRpcClient> {
        Self::connect_with_options(move || async move { Ok(conn) }, options)
    }

    /// As [`RpcClient::call`].
    ///
    /// # Errors
    /// As [`RpcClient::call`].
    pub fn call<Req, Resp>(&self, queue: &str, request: &Req) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.call_with(queue, request, CallOptions::new())
    }

    /// As [`RpcClient::call_with`].
    ///
    /// # Errors
    /// As [`RpcClient::call`].
    pub fn call_with<Req, Resp>(
        &self,
        queue: &str,
        request: &Req,
        options: CallOptions,
    ) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        // Encoding and decoding happen on the caller's thread, so the
        // request need not be 'static.
        let message = self.client.encode_request(request, &options)?;
        let reply = self.call_raw_with(queue, message, options)?;
        decode_message(&reply)
    }

    /// As [`RpcClient::call_raw`].
    ///
    /// # Errors
    /// As [`RpcClient::call`].
    pub fn call_raw(&self, queue: &str, request: Message) -> Result<Message> {
        self.call_raw_with(queue, request, CallOptions::new())
    }

    /// As [`RpcClient::call_raw_with`].
    ///
    /// # Errors
    /// As [`RpcClient::call`].
    pub fn call_raw_with(
        &self,
        queue: &str,
        request: Message,
        options: CallOptions,
    ) -> Result<Message> {
        let client = self.client.clone();
        let queue = queue.to_owned();
        self.background
            .run(async move { client.call_raw_with(&queue, request, options).await })?
    }

    /// As [`RpcClient::late_replies`].
    #[must_use]
    pub fn late_replies(&self) -> u64 {
        self.client.late_replies()
    }

    /// As [`RpcClient::in_flight`].
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.client.in_flight()
    }
}

/// Settings of a [`BlockingRpcServer`], as those of
/// [`RpcServerBuilder`](super::RpcServerBuilder).
#[derive(Debug)]
#[must_use = "a builder does nothing until it is started"]
pub struct BlockingRpcServerBuilder {
    queue: String,
    queue_options: QueueOptions,
    concurrency: u16,
}

impl BlockingRpcServerBuilder {
    /// As [`RpcServerBuilder::queue_options`](super::RpcServerBuilder::queue_options).
    pub fn queue_options(mut self, options: QueueOptions) -> Self {
        self.queue_options = options;
        self
    }

    /// How many requests are handed out at once (the consumer's prefetch);
    /// 1 unless set. Serve from as many threads to handle them in parallel.
    pub fn concurrency(mut self, concurrency: u16) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Starts the server's runtime, runs `connect` on it, declares the queue
    /// and starts consuming. Requests wait for a thread calling
    /// [`BlockingRpcServer::serve`].
    ///
    /// # Errors
    /// What `connect`, declaring or consuming report; [`Error::Io`] if the
    /// runtime's thread cannot start.
    pub fn connect<F, Fut>(self, connect: F) -> Result<BlockingRpcServer>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Arc<dyn Connection>>> + Send + 'static,
    {
        let background = Background::start("bus-rpc-server")?;
        let (requests_tx, requests) = crossbeam_channel::unbounded::<Request>();
        let handler: Handler = Arc::new(move |message: Message| {
            let requests = requests_tx.clone();
            async move {
                let (reply, replied) = oneshot::channel();
                if requests.send(Request { message, reply }).is_err() {
                    return Outcome::Requeue;
                }
                // A request dropped unanswered goes back to the queue.
                replied.await.unwrap_or(Outcome::Requeue)
            }
            .boxed()
        });
        let (finished_tx, finished) = crossbeam_channel::bounded::<()>(0);
        let result = Arc::new(Mutex::new(None));
        let result_slot = result.clone();
        let server = background.run(async move {
            let conn = connect().await?;
            let server = RpcServer::builder(conn, self.queue)
                .queue_options(self.queue_options)
                .concurrency(self.concurrency)
                .start(handler)
                .await?;
            let queue = server.queue().to_owned();
            let stop = server.stop_signal();
            tokio::spawn(async move {
                let outcome = server.wait().await;
                *result_slot.lock() = Some(outcome);
                // Dropping the sender tells every waiting thread it is over.
                drop(finished_tx);
            });
            Ok::<_, Error>((queue, stop))
        })??;
        let (queue, stop) = server;
        Ok(BlockingRpcServer {
            queue,
            requests,
            stop,
            finished,
            result,
            _runtime: background,
        })
    }

    /// Starts the server over a connection opened elsewhere, which must stay
    /// usable as long as the server (see the [module docs](self)).
    ///
    /// # Errors
    /// As [`BlockingRpcServerBuilder::connect`].
    pub fn start(self, conn: Arc<dyn Connection>) -> Result<BlockingRpcServer> {
        self.connect(move || async move { Ok(conn) })
    }
}

struct Request {
    message: Message,
    reply: oneshot::Sender<Outcome>,
}

/// A blocking RPC server: the queue is consumed on the server's own runtime
/// and each request is handled on a thread of the caller's that is in
/// [`BlockingRpcServer::serve`] (or `serve_raw`). Several threads may serve
/// at once, each with its own handler (and its own model).
///
/// Replies, acks, error replies and dead-lettering are those of
/// [`RpcServer`]. Dropping it without [`BlockingRpcServer::shutdown`] stops
/// its runtime at once: the requests not yet acked go back to the queue.
pub struct BlockingRpcServer {
    queue: String,
    requests: Receiver<Request>,
    stop: Arc<watch::Sender<crate::worker::engine::Stop>>,
    finished: Receiver<()>,
    result: Arc<Mutex<Option<Result<()>>>>,
    // Held for its drop: the runtime serving the queue lives as long as
    // this server.
    _runtime: Background,
}

impl fmt::Debug for BlockingRpcServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingRpcServer")
            .field("queue", &self.queue)
            .field("waiting_requests", &self.requests.len())
            .finish_non_exhaustive()
    }
}

impl BlockingRpcServer {
    /// Starts building a server of `queue`.
    pub fn builder(queue: impl Into<String>) -> BlockingRpcServerBuilder {
        BlockingRpcServerBuilder {
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

    /// Handles typed requests on this thread until the server stops. The
    /// request is decoded as the async server does; an error or panic of
    /// the handler becomes an error reply.
    ///
    /// # Errors
    /// [`Error::ConnectionLost`] or [`Error::Closed`] when the server stopped
    /// on its own (its connection went away) rather than by
    /// [`BlockingRpcServer::shutdown`].
    pub fn serve<Req, Resp, E, F>(&self, mut handler: F) -> Result<()>
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        E: fmt::Display,
        F: FnMut(Req) -> std::result::Result<Resp, E>,
    {
        self.serve_outcomes(|message| {
            let (format, request) = match decode::<Req>(&message) {
                Ok(decoded) => decoded,
                Err(outcome) => return outcome,
            };
            match catch_unwind(AssertUnwindSafe(|| handler(request))) {
                Ok(Ok(response)) => encode(format, &response),
                Ok(Err(e)) => Outcome::Failed(e.to_string()),
                Err(panic) => Outcome::Failed(panic_message(&*panic)),
            }
        })
    }

    /// Handles requests as messages on this thread until the server stops;
    /// as [`RpcServerBuilder::serve_raw`](super::RpcServerBuilder::serve_raw).
    ///
    /// # Errors
    /// As [`BlockingRpcServer::serve`].
    pub fn serve_raw<E, F>(&self, mut handler: F) -> Result<()>
    where
        E: fmt::Display,
        F: FnMut(Message) -> std::result::Result<Message, E>,
    {
        self.serve_outcomes(
            |message| match catch_unwind(AssertUnwindSafe(|| handler(message))) {
                Ok(Ok(reply)) => Outcome::Reply(Box::new(reply)),
                Ok(Err(e)) => Outcome::Failed(e.to_string()),
                Err(panic) => Outcome::Failed(panic_message(&*panic)),
            },
        )
    }

    fn serve_outcomes(&self, mut handle: impl FnMut(Message) -> Outcome) -> Result<()> {
        for request in self.requests.iter() {
            let outcome = handle(request.message);
            let _ = request.reply.send(outcome);
        }
        // The requests channel closes when the server task is done; its
        // result is in place once `finished` closes.
        let _ = self.finished.recv();
        match &*self.result.lock() {
            Some(Err(Error::ConnectionLost(m))) => Err(Error::ConnectionLost(m.clone())),
            Some(Err(e)) if !self.stop.borrow().requested => Err(Error::Closed(e.to_string())),
            _ => Ok(()),
        }
    }

    /// Stops gracefully, as [`RpcServer::shutdown`]: no new requests,
    /// requests being handled by serving threads are finished, replied and
    /// acked, requests no thread has taken yet go back to the queue. Returns
    /// once it is all done; the serving threads' `serve` calls return too.
    ///
    /// # Errors
    /// What stopped the server earlier if it stopped on its own.
    pub fn shutdown(&self) -> Result<()> {
        self.stop.send_modify(|s| s.requested = true);
        loop {
            crossbeam_channel::select! {
                recv(self.requests) -> request => match request {
                    Ok(request) => {
                        let _ = request.reply.send(Outcome::Requeue);
                    }
                    Err(_) => {
                        let _ = self.finished.recv();
                        break;
                    }
                },
                recv(self.finished) -> _ => break,
            }
        }
        self.result.lock().take().unwrap_or(Ok(()))
    }
}
