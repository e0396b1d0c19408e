//! Messages: a body of bytes and the AMQP basic properties.

use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::rpc::{decode_message, Format};
use crate::topology::MAX_TTL;
use crate::value::{FieldTable, FieldValue};

/// Whether a message should survive a broker restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryMode {
    /// Kept in memory only (AMQP delivery mode 1).
    Transient,
    /// Written to disk when it lands in a durable queue (AMQP delivery mode 2).
    Persistent,
}

impl DeliveryMode {
    /// The AMQP wire value: 1 or 2.
    #[must_use]
    pub fn as_u8(self) -> u8 {
        match self {
            DeliveryMode::Transient => 1,
            DeliveryMode::Persistent => 2,
        }
    }

    /// Reads the AMQP wire value; anything but 2 is transient, as RabbitMQ
    /// treats it.
    #[must_use]
    pub fn from_u8(v: u8) -> Self {
        if v == 2 {
            DeliveryMode::Persistent
        } else {
            DeliveryMode::Transient
        }
    }
}

/// The AMQP 0-9-1 basic properties of a message. Every field is optional and
/// travels unchanged from publisher to consumer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Properties {
    /// MIME type of the body, e.g. `application/msgpack`.
    pub content_type: Option<String>,
    /// Encoding of the body, e.g. `gzip`.
    pub content_encoding: Option<String>,
    /// Application headers; also read by headers exchanges. Empty means none.
    pub headers: FieldTable,
    /// Transient or persistent.
    pub delivery_mode: Option<DeliveryMode>,
    /// Priority, 0 to 9 by convention; used by queues with `x-max-priority`.
    /// A priority above the queue's maximum counts as the maximum; in a
    /// queue without priorities it is carried but has no effect.
    pub priority: Option<u8>,
    /// Correlates a reply with its request.
    pub correlation_id: Option<String>,
    /// The queue replies should go to.
    pub reply_to: Option<String>,
    /// Per-message TTL: a string of milliseconds, as AMQP carries it, at
    /// most [`MAX_TTL`](crate::MAX_TTL). Publishing anything else fails with
    /// `PreconditionFailed`, as RabbitMQ refuses it. See [`Message::ttl`].
    pub expiration: Option<String>,
    /// Application message identifier.
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// Application message type (AMQP `type`).
    pub kind: Option<String>,
    /// Validated user id (RabbitMQ checks it against the connection's user).
    pub user_id: Option<String>,
    /// Application identifier.
    pub app_id: Option<String>,
}

/// A message: a body of bytes and its [`Properties`].
///
/// The body is [`Bytes`], so a message routed to many queues shares one body
/// instead of copying it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Message {
    /// The payload, any bytes, possibly empty.
    pub body: Bytes,
    /// The basic properties.
    pub properties: Properties,
}

impl Message {
    /// A message with this body and no properties.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Message {
            body: body.into(),
            properties: Properties::default(),
        }
    }

    /// Sets the content type.
    #[must_use]
    pub fn with_content_type(mut self, v: impl Into<String>) -> Self {
        self.properties.content_type = Some(v.into());
        self
    }

    /// Sets the content encoding.
    #[must_use]
    pub fn with_content_encoding(mut self, v: impl Into<String>) -> Self {
        self.properties.content_encoding = Some(v.into());
        self
    }

    /// Adds or replaces one header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<FieldValue>) -> Self {
        self.properties.headers.insert(name.into(), value.into());
        self
    }

    /// Replaces all headers.
    #[must_use]
    pub fn with_headers(mut self, headers: FieldTable) -> Self {
        self.properties.headers = headers;
        self
    }

    /// Marks the message persistent (delivery mode 2).
    #[must_use]
    pub fn persistent(mut self) -> Self {
        self.properties.delivery_mode = Some(DeliveryMode::Persistent);
        self
    }

    /// Sets the delivery mode.
    #[must_use]
    pub fn with_delivery_mode(mut self, v: DeliveryMode) -> Self {
        self.properties.delivery_mode = Some(v);
        self
    }

    /// Sets the priority.
    #[must_use]
    pub fn with_priority(mut self, v: u8) -> Self {
        self.properties.priority = Some(v);
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, v: impl Into<String>) -> Self {
        self.properties.correlation_id = Some(v.into());
        self
    }

    /// Sets the reply-to queue.
    #[must_use]
    pub fn with_reply_to(mut self, v: impl Into<String>) -> Self {
        self.properties.reply_to = Some(v.into());
        self
    }

    /// Sets the per-message TTL in milliseconds. A value above
    /// [`MAX_TTL`](crate::MAX_TTL) makes the publish fail.
    #[must_use]
    pub fn with_expiration_ms(mut self, ms: u64) -> Self {
        self.properties.expiration = Some(ms.to_string());
        self
    }

    /// Sets the per-message TTL, rounded down to whole milliseconds. A TTL
    /// above [`MAX_TTL`](crate::MAX_TTL) makes the publish fail.
    #[must_use]
    pub fn with_expiration(mut self, ttl: Duration) -> Self {
        self.properties.expiration = Some(ttl.as_millis().to_string());
        self
    }

    /// Sets the message id.
    #[must_use]
    pub fn with_message_id(mut self, v: impl Into<String>) -> Self {
        self.properties.message_id = Some(v.into());
        self
    }

    /// Sets the timestamp, seconds since the Unix epoch.
    #[must_use]
    pub fn with_timestamp(mut self, v: u64) -> Self {
        self.properties.timestamp = Some(v);
        self
    }

    /// Sets the application message type (AMQP `type`).
    #[must_use]
    pub fn with_kind(mut self, v: impl Into<String>) -> Self {
        self.properties.kind = Some(v.into());
        self
    }

    /// Sets the user id.
    #[must_use]
    pub fn with_user_id(mut self, v: impl Into<String>) -> Self {
        self.properties.user_id = Some(v.into());
        self
    }

    /// Sets the application id.
    #[must_use]
    pub fn with_app_id(mut self, v: impl Into<String>) -> Self {
        self.properties.app_id = Some(v.into());
        self
    }

    /// The header of that name, if the message has it.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&FieldValue> {
        self.properties.headers.get(name)
    }

    /// Whether the message is persistent.
    #[must_use]
    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode == Some(DeliveryMode::Persistent)
    }

    /// The per-message TTL, parsed from `expiration`.
    ///
    /// # Errors
    /// [`Error::PreconditionFailed`] when `expiration` is set but is not a
    /// non-negative integer of at most [`MAX_TTL`](crate::MAX_TTL)
    /// milliseconds, which is how RabbitMQ refuses it.
    pub fn ttl(&self) -> Result<Option<Duration>> {
        let Some(s) = &self.properties.expiration else {
            return Ok(None);
        };
        let invalid = |why: &str| {
            Error::PreconditionFailed(format!("invalid expiration {s:?}: {why}").into())
        };
        let too_large = || {
            invalid(&format!(
                "more than the {} ms (10 years) RabbitMQ allows",
                MAX_TTL.as_millis()
            ))
        };
        let ms: u64 = s
            .parse()
            .map_err(|e: std::num::ParseIntError| match e.kind() {
                std::num::IntErrorKind::PosOverflow => too_large(),
                _ => invalid("expected a string of milliseconds"),
            })?;
        let ttl = Duration::from_millis(ms);
        if ttl > MAX_TTL {
            return Err(too_large());
        }
        Ok(Some(ttl))
    }

    /// A message whose body is `value` in JSON, with content type
    /// `application/json`.
    ///
    /// # Errors
    /// [`Error::Codec`] when `value` cannot be written as JSON (a map with
    /// non-string keys, a failing `Serialize` impl).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        Format::Json.to_message(value)
    }

    /// A message whose body is `value` in msgpack, as the legacy peers
    /// write it: structs as maps with string keys, `serde_bytes` fields as
    /// the bin type, and no content type (which means msgpack to
    /// [`Message::decode`] and to the legacy peers).
    ///
    /// # Errors
    /// [`Error::Codec`] when `value` cannot be written as msgpack.
    pub fn msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        Format::MsgPack.to_message(value)
    }

    /// Decodes the body in the format the content type names: msgpack when
    /// there is none (or `application/msgpack`), JSON for
    /// `application/json`.
    ///
    /// # Errors
    /// [`Error::Codec`] for any other content type, or a body that does not
    /// decode as `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        decode_message(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Job {
        id: u32,
        #[serde(with = "serde_bytes")]
        audio: Vec<u8>,
    }

    #[test]
    fn json_and_msgpack_bodies_decode_back() {
        let job = Job {
            id: 7,
            audio: vec![0, 255],
        };
        let json = Message::json(&job).unwrap();
        assert_eq!(
            json.properties.content_type.as_deref(),
            Some("application/json")
        );
        assert_eq!(json.decode::<Job>().unwrap(), job);
        let packed = Message::msgpack(&job).unwrap();
        assert_eq!(packed.properties.content_type, None);
        assert_eq!(packed.decode::<Job>().unwrap(), job);
        let e = json
            .with_content_type("text/plain")
            .decode::<Job>()
            .unwrap_err();
        assert!(matches!(e, Error::Codec(m) if m.contains("text/plain")));
    }

    #[test]
    fn expiration_is_checked_as_rabbitmq_does() {
        let ttl = |m: Message| m.ttl();
        assert_eq!(ttl(Message::new("")).unwrap(), None);
        assert_eq!(
            ttl(Message::new("").with_expiration(Duration::from_micros(1500))).unwrap(),
            Some(Duration::from_millis(1))
        );
        assert_eq!(
            ttl(Message::new("").with_expiration(MAX_TTL)).unwrap(),
            Some(MAX_TTL)
        );
        for bad in [
            Message::new("").with_expiration(MAX_TTL + Duration::from_millis(1)),
            Message::new("").with_expiration(Duration::MAX),
            Message::new("").with_expiration_ms(u64::MAX),
            Message {
                body: Bytes::new(),
                properties: Properties {
                    expiration: Some("-1".into()),
                    ..Properties::default()
                },
            },
        ] {
            let e = ttl(bad).unwrap_err();
            assert!(
                matches!(&e, Error::PreconditionFailed(m) if m.contains("invalid expiration")),
                "{e}"
            );
        }
    }

    #[test]
    fn header_reads_one_header() {
        let m = Message::new("").with_header("attempt", 3i32);
        assert_eq!(m.header("attempt"), Some(&FieldValue::I32(3)));
        assert_eq!(m.header("missing"), None);
    }
}
