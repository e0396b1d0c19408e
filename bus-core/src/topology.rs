//! Exchanges, queues and their options.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::value::{FieldTable, FieldValue};

/// The longest exchange or queue name AMQP can carry (a short string).
pub const MAX_NAME_LEN: usize = 255;

/// The longest TTL or expiry RabbitMQ accepts, in `x-message-ttl`,
/// `x-expires` and a message's `expiration`: 10 years (315 360 000 000 ms).
/// Longer ones are refused with [`Error::PreconditionFailed`].
pub const MAX_TTL: Duration = Duration::from_millis(315_360_000_000);

/// The default exchange: routes to the queue named by the routing key.
pub const DEFAULT_EXCHANGE: &str = "";

/// The exchanges every broker declares up front, with their kinds.
pub const PREDECLARED_EXCHANGES: [(&str, ExchangeKind); 5] = [
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

/// How an exchange chooses the queues a message goes to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    Direct,
    /// Every bound queue.
    Fanout,
    /// Dot-separated words matched against patterns with `*` and `#`.
    Topic,
    /// Message headers matched against binding arguments.
    Headers,
    /// An exchange type a broker plugin provides, by its AMQP name:
    /// `x-delayed-message`, `x-consistent-hash`, ...
    ///
    /// Passed through to RabbitMQ. A type no enabled plugin provides is
    /// refused with a permanent [`Error::NotSupported`] naming it (RabbitMQ
    /// closes the whole connection over it, which then recovers). The
    /// transports that route by themselves (in-process,
    /// folder) refuse every custom type with [`Error::NotSupported`]. The
    /// name must not be empty, longer than [`MAX_NAME_LEN`] bytes, or one of
    /// the four built-in kinds: those have their own variant, so that a
    /// kind has one spelling (`Custom("topic")` is refused with
    /// [`Error::InvalidArgument`]).
    Custom(String),
}

/// The names of the built-in kinds, in variant order.
const BUILT_IN_KINDS: [(&str, ExchangeKind); 4] = [
    ("direct", ExchangeKind::Direct),
    ("fanout", ExchangeKind::Fanout),
    ("topic", ExchangeKind::Topic),
    ("headers", ExchangeKind::Headers),
];

impl ExchangeKind {
    /// The AMQP name: `direct`, `fanout`, `topic`, `headers`, or the custom
    /// type's name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
            ExchangeKind::Custom(name) => name,
        }
    }

    /// A plugin's exchange type, by name: [`ExchangeKind::Custom`].
    #[must_use]
    pub fn custom(name: impl Into<String>) -> Self {
        ExchangeKind::Custom(name.into())
    }

    /// Whether this is [`ExchangeKind::Custom`].
    #[must_use]
    pub fn is_custom(&self) -> bool {
        matches!(self, ExchangeKind::Custom(_))
    }

    /// Checks the kind of a declaration before anything changes: a custom
    /// name must be a non-empty AMQP short string that is not a built-in
    /// kind's name.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the problem.
    pub fn validate(&self) -> Result<()> {
        let ExchangeKind::Custom(name) = self else {
            return Ok(());
        };
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "exchange type: a custom type needs a name, e.g. \"x-delayed-message\"".into(),
            ));
        }
        if let Some((_, kind)) = BUILT_IN_KINDS.iter().find(|(n, _)| n == name) {
            return Err(Error::InvalidArgument(format!(
                "exchange type Custom({name:?}) is the built-in kind: use ExchangeKind::{kind:?}"
            )));
        }
        if name.len() > MAX_NAME_LEN {
            let start: String = name.chars().take(32).collect();
            return Err(Error::InvalidArgument(format!(
                "exchange type {start:?}... is {} bytes long; at most {MAX_NAME_LEN} are allowed",
                name.len()
            )));
        }
        Ok(())
    }

    /// For a transport that routes by itself and knows only the built-in
    /// kinds: [`ExchangeKind::validate`], then [`Error::NotSupported`] for a
    /// custom type, naming it and `transport` (`"local"`, `"file"`).
    ///
    /// # Errors
    /// As said.
    pub fn require_built_in(&self, transport: &str) -> Result<()> {
        self.validate()?;
        match self {
            ExchangeKind::Custom(name) => Err(Error::NotSupported(format!(
                "exchange type '{name}': the {transport} transport routes only the built-in \
                 types (direct, fanout, topic, headers); plugin types need RabbitMQ"
            ))),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses `direct`, `fanout`, `topic` and `headers` into their variants,
/// and a name starting with `x-` (the plugin convention:
/// `x-delayed-message`) into [`ExchangeKind::Custom`].
impl FromStr for ExchangeKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some((_, kind)) = BUILT_IN_KINDS.iter().find(|(n, _)| *n == s) {
            return Ok(kind.clone());
        }
        if s.starts_with("x-") {
            let kind = ExchangeKind::Custom(s.to_owned());
            kind.validate()?;
            return Ok(kind);
        }
        Err(Error::InvalidArgument(format!(
            "unknown exchange kind {s:?}: expected direct, fanout, topic, headers, \
             or a plugin's type starting with x- (x-delayed-message)"
        )))
    }
}

/// Options of an exchange declaration.
///
/// Built from a starting point and setters, which is how code outside this
/// crate makes one (the struct is `#[non_exhaustive]`): `with_<field>` sets
/// an option, a setter named after an argument (`alternate_exchange`) adds
/// that argument.
///
/// ```
/// use bus_core::ExchangeOptions;
/// let options = ExchangeOptions::durable().alternate_exchange("unrouted");
/// assert!(options.durable);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ExchangeOptions {
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted when its last binding goes away, once it has had one.
    pub auto_delete: bool,
    /// Cannot be published to directly, only through exchange bindings.
    pub internal: bool,
    /// Only check that the exchange exists; never create it.
    pub passive: bool,
    /// Extra arguments, e.g. `alternate-exchange`.
    pub arguments: FieldTable,
}

impl ExchangeOptions {
    /// Durable, not auto-deleted: what a long-lived service wants.
    #[must_use]
    pub fn durable() -> Self {
        ExchangeOptions {
            durable: true,
            ..Self::default()
        }
    }

    /// Passive: check existence only.
    #[must_use]
    pub fn passive() -> Self {
        ExchangeOptions {
            passive: true,
            ..Self::default()
        }
    }

    /// Sets [`ExchangeOptions::durable`].
    #[must_use]
    pub fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Sets [`ExchangeOptions::auto_delete`].
    #[must_use]
    pub fn with_auto_delete(mut self, auto_delete: bool) -> Self {
        self.auto_delete = auto_delete;
        self
    }

    /// Sets [`ExchangeOptions::internal`].
    #[must_use]
    pub fn with_internal(mut self, internal: bool) -> Self {
        self.internal = internal;
        self
    }

    /// Sets [`ExchangeOptions::passive`].
    #[must_use]
    pub fn with_passive(mut self, passive: bool) -> Self {
        self.passive = passive;
        self
    }

    /// Replaces [`ExchangeOptions::arguments`].
    #[must_use]
    pub fn with_arguments(mut self, arguments: FieldTable) -> Self {
        self.arguments = arguments;
        self
    }

    /// `alternate-exchange`: where messages the exchange cannot route go.
    #[must_use]
    pub fn alternate_exchange(self, exchange: impl Into<String>) -> Self {
        self.argument("alternate-exchange", exchange.into())
    }

    /// Adds (or replaces) the argument `name`.
    #[must_use]
    pub fn argument(mut self, name: impl Into<String>, value: impl Into<FieldValue>) -> Self {
        self.arguments.insert(name.into(), value.into());
        self
    }
}

/// What a full queue (`x-max-length` / `x-max-length-bytes`) does with a new
/// message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest message. The default.
    DropHead,
    /// Refuse the new message; a confirming publisher gets a nack.
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

impl Overflow {
    /// The `x-overflow` argument value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// The queue implementation RabbitMQ uses (`x-queue-type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueueType {
    /// The classic queue.
    Classic,
    /// A replicated Raft queue: durable, for high availability on a cluster.
    Quorum,
    /// An append-only stream.
    Stream,
}

impl QueueType {
    /// The `x-queue-type` argument value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

/// The queue arguments users set, typed, plus raw ones for the rest.
///
/// [`QueueArguments::to_table`] writes them as the `x-` arguments RabbitMQ
/// reads; [`QueueArguments::from_table`] reads them back and refuses values of
/// the wrong type the way RabbitMQ does (`PRECONDITION_FAILED`).
///
/// Built with setters named after the arguments, from
/// `QueueArguments::default()` (the struct is `#[non_exhaustive]`); the same
/// setters exist on [`QueueOptions`], which is where they usually go:
///
/// ```
/// use std::time::Duration;
/// use bus_core::{QueueArguments, QueueOptions};
/// let options = QueueOptions::durable()
///     .dead_letter_to("dlx")
///     .dead_letter_routing_key("failed")
///     .message_ttl(Duration::from_secs(60));
/// assert_eq!(options.arguments.dead_letter_exchange.as_deref(), Some("dlx"));
/// let arguments = QueueArguments::default().max_length(1000);
/// assert_eq!(arguments.max_length, Some(1000));
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct QueueArguments {
    /// `x-message-ttl`: messages older than this are expired. Whole
    /// milliseconds, at most [`MAX_TTL`].
    pub message_ttl: Option<Duration>,
    /// `x-expires`: the queue is deleted after being unused this long.
    /// Whole milliseconds, more than zero and at most [`MAX_TTL`].
    pub expires: Option<Duration>,
    /// `x-max-length`: most ready messages the queue holds.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: most body bytes of ready messages.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`: what happens past a maximum.
    pub overflow: Option<Overflow>,
    /// `x-dead-letter-exchange`: where rejected, expired and dropped
    /// messages go.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`: replaces the routing key when
    /// dead-lettering.
    pub dead_letter_routing_key: Option<String>,
    /// `x-max-priority`: enables priorities 0 to this value.
    pub max_priority: Option<u8>,
    /// `x-single-active-consumer`: one consumer at a time receives.
    pub single_active_consumer: bool,
    /// `x-queue-type`.
    pub queue_type: Option<QueueType>,
    /// `x-delivery-limit` (quorum queues): a message returned to the queue
    /// more than this many times (a requeueing nack, a lost consumer) is
    /// dead-lettered with reason `delivery_limit` (or dropped) instead of
    /// being requeued again, so it is delivered at most this many times
    /// plus one; this ends a poison message's redelivery loop (see
    /// [`engine::delivery_limit`](crate::engine::delivery_limit) for what
    /// counts as a delivery). RabbitMQ 4.x sets 20 by default; on 3.x there
    /// is none unless set. RabbitMQ 3.10 refuses it on a classic queue
    /// (`PreconditionFailed`, "invalid arg").
    /// An integer on the wire: a string value is refused by
    /// [`QueueArguments::from_table`] (RabbitMQ 3.x would ignore it).
    pub delivery_limit: Option<u32>,
    /// Any other arguments, passed through untouched. A typed field set above
    /// wins over a raw entry of the same name.
    pub raw: FieldTable,
}

/// `PreconditionFailed` about the queue argument `name`.
fn invalid_arg(name: &str, message: impl Into<String>) -> Error {
    Error::PreconditionFailed(crate::ErrorDetail::new(message).with_argument(name))
}

fn duration_ms(name: &str, v: &FieldValue) -> Result<Duration> {
    let ms = v
        .as_i64()
        .and_then(|ms| u64::try_from(ms).ok())
        .ok_or_else(|| {
            invalid_arg(
                name,
                format!(
                "invalid arg '{name}': expected a non-negative integer of milliseconds, got {} {v}",
                v.type_name()
            ),
            )
        })?;
    let d = Duration::from_millis(ms);
    if d > MAX_TTL {
        return Err(invalid_arg(
            name,
            format!(
                "invalid arg '{name}': {ms} ms is more than the {} ms (10 years) RabbitMQ allows",
                MAX_TTL.as_millis()
            ),
        ));
    }
    Ok(d)
}

fn non_negative(name: &str, v: &FieldValue) -> Result<u64> {
    v.as_i64()
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| {
            invalid_arg(
                name,
                format!(
                    "invalid arg '{name}': expected a non-negative integer, got {} {v}",
                    v.type_name()
                ),
            )
        })
}

fn string_arg<'a>(name: &str, v: &'a FieldValue) -> Result<&'a str> {
    v.as_str().ok_or_else(|| {
        invalid_arg(
            name,
            format!(
                "invalid arg '{name}': expected a string, got {} {v}",
                v.type_name()
            ),
        )
    })
}

impl QueueArguments {
    /// Writes the arguments as an AMQP table, with the types RabbitMQ expects.
    #[must_use]
    pub fn to_table(&self) -> FieldTable {
        let mut t = self.raw.clone();
        let ms = |d: &Duration| FieldValue::I64(d.as_millis().min(i64::MAX as u128) as i64);
        let int = |n: u64| FieldValue::I64(n.min(i64::MAX as u64) as i64);
        if let Some(d) = &self.message_ttl {
            t.insert("x-message-ttl".into(), ms(d));
        }
        if let Some(d) = &self.expires {
            t.insert("x-expires".into(), ms(d));
        }
        if let Some(n) = self.max_length {
            t.insert("x-max-length".into(), int(n));
        }
        if let Some(n) = self.max_length_bytes {
            t.insert("x-max-length-bytes".into(), int(n));
        }
        if let Some(o) = self.overflow {
            t.insert("x-overflow".into(), o.as_str().into());
        }
        if let Some(x) = &self.dead_letter_exchange {
            t.insert("x-dead-letter-exchange".into(), x.as_str().into());
        }
        if let Some(x) = &self.dead_letter_routing_key {
            t.insert("x-dead-letter-routing-key".into(), x.as_str().into());
        }
        if let Some(p) = self.max_priority {
            t.insert("x-max-priority".into(), FieldValue::U8(p));
        }
        if self.single_active_consumer {
            t.insert("x-single-active-consumer".into(), true.into());
        }
        if let Some(q) = self.queue_type {
            t.insert("x-queue-type".into(), q.as_str().into());
        }
        if let Some(n) = self.delivery_limit {
            t.insert("x-delivery-limit".into(), int(u64::from(n)));
        }
        t
    }

    /// Reads arguments from an AMQP table. Known `x-` arguments become typed
    /// fields; everything else is kept in [`QueueArguments::raw`].
    ///
    /// # Errors
    /// [`Error::PreconditionFailed`] when a known argument has the wrong type
    /// or an out-of-range value (a negative length, a TTL above [`MAX_TTL`],
    /// an `x-max-priority` above 255), naming the argument.
    pub fn from_table(table: &FieldTable) -> Result<Self> {
        let mut a = QueueArguments::default();
        for (k, v) in table {
            match k.as_str() {
                "x-message-ttl" => a.message_ttl = Some(duration_ms(k, v)?),
                "x-expires" => {
                    let d = duration_ms(k, v)?;
                    if d.is_zero() {
                        return Err(invalid_arg(
                            "x-expires",
                            "invalid arg 'x-expires': must be positive",
                        ));
                    }
                    a.expires = Some(d);
                }
                "x-max-length" => a.max_length = Some(non_negative(k, v)?),
                "x-delivery-limit" => {
                    let n = non_negative(k, v)?;
                    a.delivery_limit = Some(u32::try_from(n).map_err(|_| {
                        invalid_arg(
                            "x-delivery-limit",
                            format!("invalid arg 'x-delivery-limit': {n} is above {}", u32::MAX),
                        )
                    })?);
                }
                "x-max-length-bytes" => a.max_length_bytes = Some(non_negative(k, v)?),
                "x-overflow" => {
                    a.overflow = Some(match string_arg(k, v)? {
                        "drop-head" => Overflow::DropHead,
                        "reject-publish" => Overflow::RejectPublish,
                        "reject-publish-dlx" => Overflow::RejectPublishDlx,
                        other => {
                            return Err(invalid_arg(
                                "x-overflow",
                                format!("invalid arg 'x-overflow': unknown value {other:?}"),
                            ))
                        }
                    })
                }
                "x-dead-letter-exchange" => {
                    a.dead_letter_exchange = Some(string_arg(k, v)?.to_owned())
                }
                "x-dead-letter-routing-key" => {
                    a.dead_letter_routing_key = Some(string_arg(k, v)?.to_owned())
                }
                "x-max-priority" => {
                    let p = non_negative(k, v)?;
                    a.max_priority = Some(u8::try_from(p).map_err(|_| {
                        invalid_arg(
                            "x-max-priority",
                            format!("invalid arg 'x-max-priority': {p} is above 255"),
                        )
                    })?);
                }
                "x-single-active-consumer" => {
                    a.single_active_consumer = v.as_bool().ok_or_else(|| {
                        invalid_arg(
                            "x-single-active-consumer",
                            format!(
                                "invalid arg 'x-single-active-consumer': expected a bool, got {}",
                                v.type_name()
                            ),
                        )
                    })?
                }
                "x-queue-type" => {
                    a.queue_type = Some(match string_arg(k, v)? {
                        "classic" => QueueType::Classic,
                        "quorum" => QueueType::Quorum,
                        "stream" => QueueType::Stream,
                        other => {
                            return Err(invalid_arg(
                                "x-queue-type",
                                format!("invalid arg 'x-queue-type': unknown value {other:?}"),
                            ))
                        }
                    })
                }
                _ => {
                    a.raw.insert(k.clone(), v.clone());
                }
            }
        }
        if a.dead_letter_routing_key.is_some() && a.dead_letter_exchange.is_none() {
            return Err(invalid_arg(
                "x-dead-letter-routing-key",
                "invalid arg 'x-dead-letter-routing-key': set without x-dead-letter-exchange",
            ));
        }
        Ok(a)
    }

    /// The arguments with the raw ones folded into the typed fields: what a
    /// transport that interprets arguments itself should use.
    ///
    /// # Errors
    /// As [`QueueArguments::from_table`].
    pub fn normalized(&self) -> Result<Self> {
        Self::from_table(&self.to_table())
    }
}

/// The setters of the typed queue arguments, defined once for
/// [`QueueArguments`] and forwarded by [`QueueOptions`].
macro_rules! queue_argument_setters {
    ($($(#[$doc:meta])* fn $name:ident($arg:ident: $ty:ty) { $field:ident = $value:expr })*) => {
        impl QueueArguments {
            $(
                $(#[$doc])*
                #[must_use]
                pub fn $name(mut self, $arg: $ty) -> Self {
                    self.$field = $value;
                    self
                }
            )*
        }

        impl QueueOptions {
            $(
                $(#[$doc])*
                #[must_use]
                pub fn $name(mut self, $arg: $ty) -> Self {
                    self.arguments = self.arguments.$name($arg);
                    self
                }
            )*
        }
    };
}

queue_argument_setters! {
    /// `x-message-ttl`: messages older than `ttl` are expired.
    fn message_ttl(ttl: Duration) { message_ttl = Some(ttl) }
    /// `x-expires`: the queue is deleted after being unused for `after`.
    fn expires(after: Duration) { expires = Some(after) }
    /// `x-max-length`: at most `n` ready messages.
    fn max_length(n: u64) { max_length = Some(n) }
    /// `x-max-length-bytes`: at most `n` body bytes of ready messages.
    fn max_length_bytes(n: u64) { max_length_bytes = Some(n) }
    /// `x-overflow`: what a full queue does with a new message.
    fn overflow(overflow: Overflow) { overflow = Some(overflow) }
    /// `x-dead-letter-exchange`: rejected, expired and dropped messages go
    /// to `exchange` (`""` for the default exchange).
    fn dead_letter_to(exchange: impl Into<String>) { dead_letter_exchange = Some(exchange.into()) }
    /// `x-dead-letter-routing-key`: dead-lettered messages get this routing
    /// key instead of their own. Needs [`QueueArguments::dead_letter_to`].
    fn dead_letter_routing_key(key: impl Into<String>) { dead_letter_routing_key = Some(key.into()) }
    /// `x-max-priority`: priorities 0 to `max` are honoured.
    fn max_priority(max: u8) { max_priority = Some(max) }
    /// `x-single-active-consumer`: whether one consumer at a time receives.
    fn single_active_consumer(on: bool) { single_active_consumer = on }
    /// `x-queue-type`.
    fn queue_type(queue_type: QueueType) { queue_type = Some(queue_type) }
    /// `x-delivery-limit` (quorum queues): how many returns to the queue
    /// a message may have; the next one dead-letters or drops it instead of
    /// requeueing it (see [`QueueArguments::delivery_limit`]).
    fn delivery_limit(n: u32) { delivery_limit = Some(n) }
}

impl QueueArguments {
    /// Adds (or replaces) a raw argument, passed through untouched (a typed
    /// field of the same name wins, see [`QueueArguments::raw`]).
    #[must_use]
    pub fn argument(mut self, name: impl Into<String>, value: impl Into<FieldValue>) -> Self {
        self.raw.insert(name.into(), value.into());
        self
    }
}

/// Options of a queue declaration.
///
/// Built from a starting point ([`QueueOptions::durable`],
/// [`QueueOptions::exclusive`], [`QueueOptions::passive`] or `default()`)
/// and setters, which is how code outside this crate makes one (the struct
/// is `#[non_exhaustive]`): `with_<field>` sets an option, and the setters
/// of [`QueueArguments`] (named after the arguments) are here too.
///
/// ```
/// use bus_core::{Overflow, QueueOptions};
/// let work = QueueOptions::durable()
///     .max_length(10_000)
///     .overflow(Overflow::RejectPublish)
///     .dead_letter_to("dlx");
/// let private = QueueOptions::default().with_exclusive(true);
/// # let _ = (work, private);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct QueueOptions {
    /// Survives a broker restart.
    pub durable: bool,
    /// Usable only by the declaring connection; deleted when it closes.
    pub exclusive: bool,
    /// Deleted when its last consumer goes away, once it has had one.
    pub auto_delete: bool,
    /// Only check that the queue exists; never create it.
    pub passive: bool,
    /// `x-` arguments.
    pub arguments: QueueArguments,
}

impl QueueOptions {
    /// Durable: what a work queue that must survive restarts wants.
    #[must_use]
    pub fn durable() -> Self {
        QueueOptions {
            durable: true,
            ..Self::default()
        }
    }

    /// Exclusive and auto-delete: a private queue such as a reply queue.
    #[must_use]
    pub fn exclusive() -> Self {
        QueueOptions {
            exclusive: true,
            auto_delete: true,
            ..Self::default()
        }
    }

    /// Passive: check existence and read the counts only.
    #[must_use]
    pub fn passive() -> Self {
        QueueOptions {
            passive: true,
            ..Self::default()
        }
    }

    /// Sets [`QueueOptions::durable`].
    #[must_use]
    pub fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Sets [`QueueOptions::exclusive`].
    #[must_use]
    pub fn with_exclusive(mut self, exclusive: bool) -> Self {
        self.exclusive = exclusive;
        self
    }

    /// Sets [`QueueOptions::auto_delete`].
    #[must_use]
    pub fn with_auto_delete(mut self, auto_delete: bool) -> Self {
        self.auto_delete = auto_delete;
        self
    }

    /// Sets [`QueueOptions::passive`].
    #[must_use]
    pub fn with_passive(mut self, passive: bool) -> Self {
        self.passive = passive;
        self
    }

    /// Replaces [`QueueOptions::arguments`].
    #[must_use]
    pub fn with_arguments(mut self, arguments: QueueArguments) -> Self {
        self.arguments = arguments;
        self
    }

    /// Adds (or replaces) a raw argument, as [`QueueArguments::argument`].
    #[must_use]
    pub fn argument(mut self, name: impl Into<String>, value: impl Into<FieldValue>) -> Self {
        self.arguments = self.arguments.argument(name, value);
        self
    }
}

/// Options of a queue deletion.
///
/// `DeleteQueueOptions::default()` deletes unconditionally;
/// [`DeleteQueueOptions::if_unused`] and [`DeleteQueueOptions::if_empty`]
/// start from one condition, `with_<field>` sets either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeleteQueueOptions {
    /// Refuse (`PRECONDITION_FAILED`) if the queue has consumers.
    pub if_unused: bool,
    /// Refuse (`PRECONDITION_FAILED`) if the queue holds messages.
    pub if_empty: bool,
}

impl DeleteQueueOptions {
    /// Delete only when the queue has no consumers.
    #[must_use]
    pub fn if_unused() -> Self {
        DeleteQueueOptions {
            if_unused: true,
            if_empty: false,
        }
    }

    /// Delete only when the queue holds no ready messages.
    #[must_use]
    pub fn if_empty() -> Self {
        DeleteQueueOptions {
            if_unused: false,
            if_empty: true,
        }
    }

    /// Sets [`DeleteQueueOptions::if_unused`].
    #[must_use]
    pub fn with_if_unused(mut self, if_unused: bool) -> Self {
        self.if_unused = if_unused;
        self
    }

    /// Sets [`DeleteQueueOptions::if_empty`].
    #[must_use]
    pub fn with_if_empty(mut self, if_empty: bool) -> Self {
        self.if_empty = if_empty;
        self
    }
}

/// Options of an exchange deletion.
///
/// `DeleteExchangeOptions::default()` deletes unconditionally;
/// [`DeleteExchangeOptions::if_unused`] only when nothing is bound to it
/// (`with_if_unused` sets it from a value).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeleteExchangeOptions {
    /// Refuse (`PRECONDITION_FAILED`) if the exchange has bindings.
    pub if_unused: bool,
}

impl DeleteExchangeOptions {
    /// Delete only when nothing is bound to the exchange.
    #[must_use]
    pub fn if_unused() -> Self {
        DeleteExchangeOptions { if_unused: true }
    }

    /// Sets [`DeleteExchangeOptions::if_unused`].
    #[must_use]
    pub fn with_if_unused(mut self, if_unused: bool) -> Self {
        self.if_unused = if_unused;
        self
    }
}

/// What a queue declaration reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    /// The queue's name; the generated one when the declaration left it empty.
    pub name: String,
    /// Messages ready for delivery (not counting unacked ones).
    pub message_count: u32,
    /// Consumers attached.
    pub consumer_count: u32,
}

/// Checks an exchange or queue name before any change is made: at most
/// [`MAX_NAME_LEN`] bytes (the AMQP limit) and no NUL character.
///
/// `what` names the kind of entity (`"queue"`, `"exchange"`) in the error.
///
/// Refusing NUL is a deliberate difference from RabbitMQ, which accepts it:
/// a NUL cannot be part of a file name (the folder transport names files
/// after queues), and in a queue name it is surely a bug on the caller's
/// side. Every transport refuses it, so code tested on one is portable.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the entity and the problem.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.len() > MAX_NAME_LEN {
        let start: String = name.chars().take(32).collect();
        return Err(Error::InvalidArgument(format!(
            "{what} name {start:?}... is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{what} name {name:?} contains a NUL byte"
        )));
    }
    Ok(())
}

/// Whether a name is in the `amq.` namespace reserved for the broker.
#[must_use]
pub fn is_reserved_name(name: &str) -> bool {
    name.starts_with("amq.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_limit_is_an_integer_and_a_string_is_refused() {
        let a = QueueArguments {
            delivery_limit: Some(3),
            ..QueueArguments::default()
        };
        let t = a.to_table();
        assert_eq!(t.get("x-delivery-limit"), Some(&FieldValue::I64(3)));
        assert_eq!(QueueArguments::from_table(&t).unwrap(), a);
        let s: FieldTable = [("x-delivery-limit".to_string(), FieldValue::from("3"))].into();
        let e = QueueArguments::from_table(&s).unwrap_err();
        assert!(
            matches!(&e, Error::PreconditionFailed(m) if m.contains("x-delivery-limit") && m.contains("integer")),
            "{e:?}"
        );
    }

    #[test]
    fn arguments_round_trip_through_a_table() {
        let a = QueueArguments {
            message_ttl: Some(Duration::from_millis(1500)),
            expires: Some(Duration::from_secs(60)),
            max_length: Some(10),
            max_length_bytes: Some(1 << 20),
            overflow: Some(Overflow::RejectPublishDlx),
            dead_letter_exchange: Some("dlx".into()),
            dead_letter_routing_key: Some("dead".into()),
            max_priority: Some(9),
            single_active_consumer: true,
            queue_type: Some(QueueType::Quorum),
            delivery_limit: Some(5),
            raw: [("x-custom".to_string(), FieldValue::from("v"))].into(),
        };
        assert_eq!(QueueArguments::from_table(&a.to_table()).unwrap(), a);
    }

    #[test]
    fn wrong_argument_types_are_refused_by_name() {
        let t: FieldTable = [("x-message-ttl".to_string(), FieldValue::from("soon"))].into();
        let e = QueueArguments::from_table(&t).unwrap_err();
        assert!(matches!(&e, Error::PreconditionFailed(m) if m.contains("x-message-ttl")));
        assert_eq!(e.argument(), Some("x-message-ttl"));
        assert_eq!(
            e.subject(),
            None,
            "the arguments alone do not know their queue"
        );
        let t: FieldTable = [("x-overflow".to_string(), FieldValue::from("spill"))].into();
        assert!(QueueArguments::from_table(&t).is_err());
        let t: FieldTable = [("x-max-length".to_string(), FieldValue::I32(-1))].into();
        assert!(QueueArguments::from_table(&t).is_err());
    }

    #[test]
    fn ttls_are_limited_to_ten_years_as_in_rabbitmq() {
        let max = i64::try_from(MAX_TTL.as_millis()).unwrap();
        for arg in ["x-message-ttl", "x-expires"] {
            let t: FieldTable = [(arg.to_string(), FieldValue::I64(max))].into();
            assert!(QueueArguments::from_table(&t).is_ok(), "{arg}");
            for too_long in [max + 1, i64::MAX] {
                let t: FieldTable = [(arg.to_string(), FieldValue::I64(too_long))].into();
                let e = QueueArguments::from_table(&t).unwrap_err();
                assert!(
                    matches!(&e, Error::PreconditionFailed(m) if m.contains(arg) && m.contains("10 years")),
                    "{e}"
                );
            }
        }
        let too_long = QueueArguments {
            message_ttl: Some(Duration::MAX),
            ..QueueArguments::default()
        };
        assert!(too_long.normalized().is_err());
    }

    #[test]
    fn builders_set_the_fields_they_name() {
        let built = QueueOptions::durable()
            .with_auto_delete(true)
            .message_ttl(Duration::from_secs(1))
            .expires(Duration::from_secs(2))
            .max_length(3)
            .max_length_bytes(4)
            .overflow(Overflow::RejectPublishDlx)
            .dead_letter_to("dlx")
            .dead_letter_routing_key("dead")
            .max_priority(5)
            .single_active_consumer(true)
            .queue_type(QueueType::Quorum)
            .delivery_limit(6)
            .argument("x-custom", "v");
        let literal = QueueOptions {
            durable: true,
            exclusive: false,
            auto_delete: true,
            passive: false,
            arguments: QueueArguments {
                message_ttl: Some(Duration::from_secs(1)),
                expires: Some(Duration::from_secs(2)),
                max_length: Some(3),
                max_length_bytes: Some(4),
                overflow: Some(Overflow::RejectPublishDlx),
                dead_letter_exchange: Some("dlx".into()),
                dead_letter_routing_key: Some("dead".into()),
                max_priority: Some(5),
                single_active_consumer: true,
                queue_type: Some(QueueType::Quorum),
                delivery_limit: Some(6),
                raw: [("x-custom".to_string(), FieldValue::from("v"))].into(),
            },
        };
        assert_eq!(built, literal);
        assert_eq!(
            QueueOptions::default().with_arguments(literal.arguments.clone()),
            QueueOptions {
                durable: false,
                auto_delete: false,
                ..literal
            }
        );
        let x = ExchangeOptions::durable()
            .with_internal(true)
            .alternate_exchange("ae");
        assert!(x.durable && x.internal && !x.auto_delete && !x.passive);
        assert_eq!(x.arguments.get("alternate-exchange"), Some(&"ae".into()));
        let d = DeleteQueueOptions::if_unused().with_if_empty(true);
        assert!(d.if_unused && d.if_empty);
        assert!(
            DeleteExchangeOptions::default()
                .with_if_unused(true)
                .if_unused
        );
    }

    #[test]
    fn custom_kinds_have_one_spelling() {
        assert_eq!(
            "topic".parse::<ExchangeKind>().unwrap(),
            ExchangeKind::Topic
        );
        let delayed: ExchangeKind = "x-delayed-message".parse().unwrap();
        assert_eq!(delayed, ExchangeKind::custom("x-delayed-message"));
        assert_eq!(delayed.as_str(), "x-delayed-message");
        assert_eq!(delayed.to_string(), "x-delayed-message");
        assert!(delayed.validate().is_ok());
        assert!("topc".parse::<ExchangeKind>().is_err());
        for bad in ["", "topic", "headers", &"x".repeat(256)] {
            let e = ExchangeKind::custom(bad).validate().unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e:?}");
        }
        let e = ExchangeKind::custom("topic").validate().unwrap_err();
        assert!(e.to_string().contains("ExchangeKind::Topic"), "{e}");
        let e = delayed.require_built_in("local").unwrap_err();
        assert!(
            matches!(&e, Error::NotSupported(m) if m.contains("'x-delayed-message'") && m.contains("local")),
            "{e:?}"
        );
        assert!(ExchangeKind::Headers.require_built_in("local").is_ok());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("queue", &"q".repeat(255)).is_ok());
        assert!(validate_name("queue", &"q".repeat(256)).is_err());
        assert!(validate_name("queue", "a\0b").is_err());
        let e = validate_name("exchange", &"x".repeat(300)).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.starts_with("exchange name \"xxx") && m.contains("300")),
            "{e}"
        );
        assert!(is_reserved_name("amq.gen-1"));
        assert!(!is_reserved_name("amqx"));
    }
}
