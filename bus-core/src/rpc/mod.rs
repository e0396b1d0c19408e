//! Request/reply over any transport, wire-compatible with the legacy Python
//! (pika + msgpack) peers.
//!
//! A service is a handler from request to response serving one queue
//! ([`RpcServer`]); callers send requests to that queue and wait for the
//! reply ([`RpcClient`]). Bodies are msgpack by default, written as the
//! legacy peers write them (structs as maps with string keys, byte fields
//! as the bin type when marked `#[serde(with = "serde_bytes")]`), or JSON when
//! the content type says so. [`blocking`] offers the same for code that is
//! not async.
//!
//! ```no_run
//! use bus_core::rpc::{RpcClient, RpcServer};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Transcribe {
//!     #[serde(with = "serde_bytes")]
//!     audio: Vec<u8>,
//!     language: String,
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Transcript {
//!     text: String,
//! }
//!
//! # async fn example(conn: std::sync::Arc<dyn bus_core::Connection>) -> bus_core::Result<()> {
//! // The service: declares the queue "asr" and answers each request.
//! let server = RpcServer::builder(conn.clone(), "asr")
//!     .serve(|job: Transcribe| async move {
//!         let text = format!("{} bytes of {} speech", job.audio.len(), job.language);
//!         Ok::<_, String>(Transcript { text })
//!     })
//!     .await?;
//!
//! // A caller: one client carries any number of concurrent calls.
//! let client = RpcClient::new(conn).await?;
//! let job = Transcribe { audio: vec![0; 16_000], language: "en".into() };
//! let reply: Transcript = client.call("asr", &job).await?;
//! println!("{}", reply.text);
//!
//! server.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # The protocol
//! The request goes to the service's queue through the default exchange
//! with `reply_to` (the client's reply queue), `correlation_id` (a new UUID4
//! string) and `expiration` (the call's timeout in milliseconds). The server
//! publishes the reply to `reply_to` on the default exchange with the same
//! `correlation_id`, then acks the request. A failed handler's reply carries
//! the [`ERROR_HEADER`] with the error text, and the body `{"error": text}`,
//! so that a legacy client still reads a map.

pub mod blocking;
mod client;
mod codec;
mod server;

pub use client::{CallOptions, RpcClient, RpcClientOptions, DEFAULT_TIMEOUT};
pub use codec::{
    decode_message, error_reply, remote_error, Format, ERROR_HEADER, JSON_CONTENT_TYPE,
    MSGPACK_CONTENT_TYPE,
};
pub(crate) use server::panic_message;
pub use server::{RpcServer, RpcServerBuilder, ShutdownHandle};
