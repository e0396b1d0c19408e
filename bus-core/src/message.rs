//! Messages: a body of bytes and the AMQP basic properties.

use bytes::Bytes;

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
    pub priority: Option<u8>,
    /// Correlates a reply with its request.
    pub correlation_id: Option<String>,
    /// The queue replies should go to.
    pub reply_to: Option<String>,
    /// Per-message TTL: a string of milliseconds, as AMQP carries it.
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

    /// Sets the per-message TTL in milliseconds.
    #[must_use]
    pub fn with_expiration_ms(mut self, ms: u64) -> Self {
        self.properties.expiration = Some(ms.to_string());
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

    /// Whether the message is persistent.
    #[must_use]
    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode == Some(DeliveryMode::Persistent)
    }

    /// The per-message TTL, parsed from `expiration`.
    ///
    /// # Errors
    /// [`Error::PreconditionFailed`](crate::Error::PreconditionFailed) when
    /// `expiration` is set but is not a non-negative integer, which is how
    /// RabbitMQ refuses it.
    pub fn ttl(&self) -> crate::Result<Option<std::time::Duration>> {
        match &self.properties.expiration {
            None => Ok(None),
            Some(s) => s
                .parse::<u64>()
                .map(|ms| Some(std::time::Duration::from_millis(ms)))
                .map_err(|_| {
                    crate::Error::PreconditionFailed(format!(
                        "invalid expiration {s:?}: expected a string of milliseconds"
                    ))
                }),
        }
    }
}
