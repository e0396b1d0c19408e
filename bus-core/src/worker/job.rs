//! What a handler receives, and how it fails.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::message::{Message, SharedProperties, SharedStr};
use crate::rpc::Format;
use crate::transport::{Connection, PublishOptions};
use crate::value::FieldTable;

/// One message handed to a worker's handler: its body (raw [`Bytes`], or
/// decoded as `T`), properties, where it came from, and the connection to
/// publish follow-up messages through.
pub struct Job<T = Bytes> {
    /// The body: raw bytes, or the value it decoded to.
    pub body: T,
    /// The message's properties, headers included, shared with the
    /// delivery the job came from (see [`SharedProperties`]).
    pub properties: SharedProperties,
    /// The exchange the message was published to (`""` for the default
    /// one).
    pub exchange: SharedStr,
    /// The routing key it was published with.
    pub routing_key: SharedStr,
    /// Whether the broker delivered it before (a consumer died or dropped
    /// it unsettled).
    pub redelivered: bool,
    /// Which attempt this is: 1 the first time, counting in-process retries
    /// and delayed retries through the broker.
    pub attempt: u32,
    pub(crate) conn: Arc<dyn Connection>,
}

impl<T: fmt::Debug> fmt::Debug for Job<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("body", &self.body)
            .field("properties", &self.properties)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("redelivered", &self.redelivered)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl<T> Job<T> {
    /// The message's headers.
    #[must_use]
    pub fn headers(&self) -> &FieldTable {
        &self.properties.headers
    }

    /// The connection the worker consumes on, to publish events or next
    /// steps.
    #[must_use]
    pub fn connection(&self) -> &Arc<dyn Connection> {
        &self.conn
    }

    /// The body's format, from its content type (msgpack when it has none).
    ///
    /// # Errors
    /// [`Error::Codec`] for a content type that is neither.
    pub fn format(&self) -> Result<Format> {
        Format::from_content_type(self.properties.content_type.as_deref())
    }

    /// Publishes `message` through the worker's connection and waits for
    /// its confirm. With feature `otel`, the message carries the trace
    /// context of the current span (the job's `process` span inside a
    /// handler), unless it carries a `traceparent` already.
    ///
    /// # Errors
    /// Whatever [`Connection::publish`] reports.
    pub async fn publish(&self, exchange: &str, routing_key: &str, message: Message) -> Result<()> {
        self.conn
            .publish(exchange, routing_key, message, PublishOptions::default())
            .await
    }

    /// Publishes `value` encoded in the job's own format (msgpack unless
    /// the job came as JSON), with the job's `correlation_id`, and waits for
    /// the confirm.
    ///
    /// # Errors
    /// [`Error::Codec`] if it cannot be encoded; as [`Job::publish`].
    pub async fn publish_value<V: Serialize + ?Sized>(
        &self,
        exchange: &str,
        routing_key: &str,
        value: &V,
    ) -> Result<()> {
        let mut message = self.format().unwrap_or_default().to_message(value)?;
        message.properties.correlation_id = self.properties.correlation_id.clone();
        self.publish(exchange, routing_key, message).await
    }

    /// The same job with another body.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Job<U> {
        Job {
            body: f(self.body),
            properties: self.properties,
            exchange: self.exchange,
            routing_key: self.routing_key,
            redelivered: self.redelivered,
            attempt: self.attempt,
            conn: self.conn,
        }
    }
}

impl Job<Bytes> {
    /// Decodes the body as `T` in the format its content type names
    /// (msgpack by default, JSON for `application/json`); trailing bytes
    /// after the value are an error.
    ///
    /// # Errors
    /// An undecodable [`HandlerError`], which poisons the message at once.
    pub fn decode<T: DeserializeOwned>(self) -> std::result::Result<Job<T>, HandlerError> {
        let value = self
            .format()
            .and_then(|format| format.decode::<T>(&self.body))
            .map_err(|e| HandlerError {
                kind: Kind::Undecodable,
                message: e.to_string(),
            })?;
        Ok(self.map(|_| value))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Transient,
    Permanent,
    Undecodable,
}

/// How a handler failed: transiently (retry) or permanently (poison at
/// once).
///
/// `?` converts a library [`Error`] (transient when
/// [`Error::is_temporary`], else permanent) and a `String` or `&str`
/// (transient).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerError {
    pub(crate) kind: Kind,
    pub(crate) message: String,
}

impl HandlerError {
    /// A failure that may go away: the message is retried.
    pub fn transient(error: impl fmt::Display) -> Self {
        HandlerError {
            kind: Kind::Transient,
            message: error.to_string(),
        }
    }

    /// A failure that retrying cannot fix: the message goes to the poison
    /// queue at once.
    pub fn permanent(error: impl fmt::Display) -> Self {
        HandlerError {
            kind: Kind::Permanent,
            message: error.to_string(),
        }
    }

    /// Whether the message is poisoned at once rather than retried (a
    /// permanent failure or an undecodable body).
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        self.kind != Kind::Transient
    }

    /// The error text.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Classifies a service's error: a `HandlerError` or a library
    /// [`Error`] inside keeps its kind, anything else (tower's timeout,
    /// load shedding) is transient.
    #[must_use]
    pub fn classify(error: Box<dyn std::error::Error + Send + Sync>) -> Self {
        match error.downcast::<HandlerError>() {
            Ok(e) => *e,
            Err(error) => match error.downcast::<Error>() {
                Ok(e) => HandlerError::from(*e),
                Err(other) => HandlerError::transient(other),
            },
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        if e.is_temporary() {
            HandlerError::transient(e)
        } else {
            HandlerError::permanent(e)
        }
    }
}

impl From<String> for HandlerError {
    fn from(message: String) -> Self {
        HandlerError::transient(message)
    }
}

impl From<&str> for HandlerError {
    fn from(message: &str) -> Self {
        HandlerError::transient(message)
    }
}
