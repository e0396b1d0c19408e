//! Messages: a body of bytes and the AMQP basic properties.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
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

impl Properties {
    /// No property set: what [`Properties::default`] returns, as a constant.
    const NONE: Properties = Properties {
        content_type: None,
        content_encoding: None,
        headers: FieldTable::new(),
        delivery_mode: None,
        priority: None,
        correlation_id: None,
        reply_to: None,
        expiration: None,
        message_id: None,
        timestamp: None,
        kind: None,
        user_id: None,
        app_id: None,
    };

    /// Whether no property is set (no field, no header).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Properties::NONE
    }
}

/// The empty set every [`SharedProperties`] without properties reads.
static NO_PROPERTIES: Properties = Properties::NONE;

/// A message's [`Properties`], shared by the copies of the message.
///
/// It dereferences to [`Properties`], so fields read and write as on the
/// plain struct (`message.properties.content_type`,
/// `message.properties.headers.insert(..)`). Cloning it counts a reference
/// instead of copying ten strings and a table: a message routed to several
/// queues, a delivery and the copy its broker keeps until the ack, or a
/// worker's job and the delivery it came from, share one set. The first
/// write through a shared set copies it for the writer alone (copy on
/// write), so a change is never seen by another copy. The default, no
/// properties, allocates nothing.
///
/// ```
/// use bus_core::{Message, Properties};
///
/// let mut a = Message::new(&b"x"[..]).with_correlation_id("42");
/// let b = a.clone(); // shares a's properties
/// a.properties.correlation_id = Some("43".into()); // a's own copy now
/// assert_eq!(b.properties.correlation_id.as_deref(), Some("42"));
/// assert_eq!(a.properties.correlation_id.as_deref(), Some("43"));
///
/// let p = Properties { app_id: Some("asr".into()), ..Properties::default() };
/// let c = Message::new(&b"y"[..]).with_properties(p.clone());
/// assert_eq!(c.properties, p);
/// ```
#[derive(Clone, Default)]
pub struct SharedProperties(Option<Arc<Properties>>);

impl SharedProperties {
    /// The properties, owned: without a copy when no other message shares
    /// them.
    #[must_use]
    pub fn into_inner(self) -> Properties {
        self.0.map(Arc::unwrap_or_clone).unwrap_or_default()
    }
}

impl Deref for SharedProperties {
    type Target = Properties;

    #[inline]
    fn deref(&self) -> &Properties {
        self.0.as_deref().unwrap_or(&NO_PROPERTIES)
    }
}

impl DerefMut for SharedProperties {
    /// The properties for writing: copied first when another message
    /// shares them.
    #[inline]
    fn deref_mut(&mut self) -> &mut Properties {
        Arc::make_mut(self.0.get_or_insert_with(Default::default))
    }
}

impl From<Properties> for SharedProperties {
    fn from(properties: Properties) -> Self {
        if properties.is_empty() {
            SharedProperties(None)
        } else {
            SharedProperties(Some(Arc::new(properties)))
        }
    }
}

impl From<SharedProperties> for Properties {
    fn from(shared: SharedProperties) -> Self {
        shared.into_inner()
    }
}

impl fmt::Debug for SharedProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Properties::fmt(self, f)
    }
}

/// Compares the properties, as [`Properties`] does (a `NaN` header is
/// unequal even to itself).
impl PartialEq for SharedProperties {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl PartialEq<Properties> for SharedProperties {
    fn eq(&self, other: &Properties) -> bool {
        **self == *other
    }
}

impl PartialEq<SharedProperties> for Properties {
    fn eq(&self, other: &SharedProperties) -> bool {
        *self == **other
    }
}

/// An immutable string shared by reference count: what a [`Delivery`]
/// (and a worker's [`Job`]) carries its exchange and routing key as, so
/// that handing one out costs a count instead of a copy.
///
/// It reads as a `str` (it dereferences to one) and compares with `str`,
/// `&str` and `String`:
///
/// ```
/// use bus_core::SharedStr;
///
/// let key = SharedStr::from("audio.uploaded");
/// assert_eq!(key, "audio.uploaded");
/// assert!(key.starts_with("audio."));
/// assert_eq!(key.as_str(), String::from("audio.uploaded"));
/// ```
///
/// [`Delivery`]: crate::Delivery
/// [`Job`]: crate::worker::Job
#[derive(Clone, Default)]
pub struct SharedStr(
    /// `None` for the empty string (the default exchange's name): no
    /// allocation, and no count shared by every thread.
    Option<Arc<str>>,
);

impl SharedStr {
    /// The string.
    #[must_use]
    #[inline]
    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }
}

impl Deref for SharedStr {
    type Target = str;

    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// As `str` compares, so that [`Borrow<str>`](std::borrow::Borrow) holds.
impl PartialEq for SharedStr {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for SharedStr {}

impl PartialOrd for SharedStr {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SharedStr {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

/// As `str` hashes, so that [`Borrow<str>`](std::borrow::Borrow) holds.
impl std::hash::Hash for SharedStr {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        SharedStr((!s.is_empty()).then(|| s.into()))
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> Self {
        SharedStr::from(s.as_str())
    }
}

impl From<&String> for SharedStr {
    fn from(s: &String) -> Self {
        SharedStr::from(s.as_str())
    }
}

impl From<Arc<str>> for SharedStr {
    fn from(s: Arc<str>) -> Self {
        SharedStr((!s.is_empty()).then_some(s))
    }
}

impl From<SharedStr> for String {
    fn from(s: SharedStr) -> Self {
        s.as_str().to_owned()
    }
}

impl Serialize for SharedStr {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for SharedStr {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        String::deserialize(deserializer).map(SharedStr::from)
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for SharedStr {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<SharedStr> for str {
    fn eq(&self, other: &SharedStr) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<SharedStr> for &str {
    fn eq(&self, other: &SharedStr) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<SharedStr> for String {
    fn eq(&self, other: &SharedStr) -> bool {
        self.as_str() == other.as_str()
    }
}

/// A message: a body of bytes and its [`Properties`].
///
/// The body is [`Bytes`] and the properties [`SharedProperties`], so a
/// message routed to many queues, or cloned, shares one body and one set of
/// properties instead of copying them; a `Message` is a few words, cheap to
/// move.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Message {
    /// The payload, any bytes, possibly empty.
    pub body: Bytes,
    /// The basic properties; reads and writes go through to [`Properties`].
    pub properties: SharedProperties,
}

impl Message {
    /// A message with this body and no properties.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Message {
            body: body.into(),
            properties: SharedProperties::default(),
        }
    }

    /// Replaces all properties, headers included.
    #[must_use]
    pub fn with_properties(mut self, properties: impl Into<SharedProperties>) -> Self {
        self.properties = properties.into();
        self
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
                }
                .into(),
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
