//! Lossless mapping between the bus model and lapin's: field values and
//! tables, message properties, names, and errors.

use bus_core::{
    DeliveryMode, Error, ErrorDetail, FieldTable, FieldValue, Message, Properties, Result, Subject,
};
use bytes::Bytes;
use lapin::protocol::AMQPErrorKind;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable as AmqpTable, LongString,
    ShortString,
};
use lapin::BasicProperties;

/// A short string (names, routing keys, property values): at most 255 bytes.
pub(crate) fn short(what: &str, s: &str) -> Result<ShortString> {
    ShortString::try_new(s).map_err(|_| {
        Error::InvalidArgument(format!(
            "{what} is {} bytes long; AMQP allows at most 255",
            s.len()
        ))
    })
}

/// Refuses what [`short`] would refuse, without making the short string.
pub(crate) fn check_short(what: &str, s: &str) -> Result<()> {
    if s.len() > 255 {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes long; AMQP allows at most 255",
            s.len()
        )));
    }
    Ok(())
}

/// A bus field value as lapin's, type for type.
pub(crate) fn value_to_amqp(v: &FieldValue) -> Result<AMQPValue> {
    Ok(match v {
        FieldValue::Bool(b) => AMQPValue::Boolean(*b),
        FieldValue::I8(n) => AMQPValue::ShortShortInt(*n),
        FieldValue::U8(n) => AMQPValue::ShortShortUInt(*n),
        FieldValue::I16(n) => AMQPValue::ShortInt(*n),
        FieldValue::U16(n) => AMQPValue::ShortUInt(*n),
        FieldValue::I32(n) => AMQPValue::LongInt(*n),
        FieldValue::U32(n) => AMQPValue::LongUInt(*n),
        FieldValue::I64(n) => AMQPValue::LongLongInt(*n),
        FieldValue::F32(n) => AMQPValue::Float(*n),
        FieldValue::F64(n) => AMQPValue::Double(*n),
        FieldValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        FieldValue::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        FieldValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.as_ref())),
        FieldValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        FieldValue::Table(t) => AMQPValue::FieldTable(table_to_amqp(t)?),
        FieldValue::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter().map(value_to_amqp).collect::<Result<Vec<_>>>()?,
        )),
        FieldValue::Void => AMQPValue::Void,
    })
}

/// A lapin field value as the bus's. Both AMQP string kinds become
/// [`FieldValue::String`]; a long string that is not UTF-8 (RabbitMQ lets
/// any bytes through) becomes [`FieldValue::Bytes`] rather than being
/// altered.
pub(crate) fn value_from_amqp(v: &AMQPValue) -> FieldValue {
    match v {
        AMQPValue::Boolean(b) => FieldValue::Bool(*b),
        AMQPValue::ShortShortInt(n) => FieldValue::I8(*n),
        AMQPValue::ShortShortUInt(n) => FieldValue::U8(*n),
        AMQPValue::ShortInt(n) => FieldValue::I16(*n),
        AMQPValue::ShortUInt(n) => FieldValue::U16(*n),
        AMQPValue::LongInt(n) => FieldValue::I32(*n),
        AMQPValue::LongUInt(n) => FieldValue::U32(*n),
        AMQPValue::LongLongInt(n) => FieldValue::I64(*n),
        AMQPValue::Float(n) => FieldValue::F32(*n),
        AMQPValue::Double(n) => FieldValue::F64(*n),
        AMQPValue::DecimalValue(d) => FieldValue::Decimal {
            scale: d.scale,
            value: d.value,
        },
        AMQPValue::ShortString(s) => FieldValue::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => FieldValue::String(text.to_owned()),
            Err(_) => FieldValue::Bytes(Bytes::copy_from_slice(s.as_bytes())),
        },
        AMQPValue::FieldArray(a) => {
            FieldValue::Array(a.as_slice().iter().map(value_from_amqp).collect())
        }
        AMQPValue::Timestamp(t) => FieldValue::Timestamp(*t),
        AMQPValue::FieldTable(t) => FieldValue::Table(table_from_amqp(t)),
        AMQPValue::ByteArray(b) => FieldValue::Bytes(Bytes::copy_from_slice(b.as_slice())),
        AMQPValue::Void => FieldValue::Void,
    }
}

/// A bus table as lapin's.
///
/// # Errors
/// `InvalidArgument` for a key longer than 255 bytes.
pub(crate) fn table_to_amqp(t: &FieldTable) -> Result<AmqpTable> {
    let mut out = AmqpTable::default();
    for (k, v) in t {
        out.insert(short("a field table key", k)?, value_to_amqp(v)?);
    }
    Ok(out)
}

/// A lapin table as the bus's.
pub(crate) fn table_from_amqp(t: &AmqpTable) -> FieldTable {
    t.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), value_from_amqp(v)))
        .collect()
}

/// Message properties as lapin's.
///
/// # Errors
/// `InvalidArgument` for a string property or header key over 255 bytes.
pub(crate) fn properties_to_amqp(p: &Properties) -> Result<BasicProperties> {
    let mut b = BasicProperties::default();
    if let Some(v) = &p.content_type {
        b = b.with_content_type(short("content_type", v)?);
    }
    if let Some(v) = &p.content_encoding {
        b = b.with_content_encoding(short("content_encoding", v)?);
    }
    if !p.headers.is_empty() {
        b = b.with_headers(table_to_amqp(&p.headers)?);
    }
    if let Some(v) = p.delivery_mode {
        b = b.with_delivery_mode(v.as_u8());
    }
    if let Some(v) = p.priority {
        b = b.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        b = b.with_correlation_id(short("correlation_id", v)?);
    }
    if let Some(v) = &p.reply_to {
        b = b.with_reply_to(short("reply_to", v)?);
    }
    if let Some(v) = &p.expiration {
        b = b.with_expiration(short("expiration", v)?);
    }
    if let Some(v) = &p.message_id {
        b = b.with_message_id(short("message_id", v)?);
    }
    if let Some(v) = p.timestamp {
        b = b.with_timestamp(v);
    }
    if let Some(v) = &p.kind {
        b = b.with_type(short("type", v)?);
    }
    if let Some(v) = &p.user_id {
        b = b.with_user_id(short("user_id", v)?);
    }
    if let Some(v) = &p.app_id {
        b = b.with_app_id(short("app_id", v)?);
    }
    Ok(b)
}

fn string(v: &Option<ShortString>) -> Option<String> {
    v.as_ref().map(|s| s.as_str().to_owned())
}

/// Lapin's properties as the bus's.
pub(crate) fn properties_from_amqp(b: &BasicProperties) -> Properties {
    Properties {
        content_type: string(b.content_type()),
        content_encoding: string(b.content_encoding()),
        headers: b
            .headers()
            .as_ref()
            .map(table_from_amqp)
            .unwrap_or_default(),
        delivery_mode: b.delivery_mode().map(DeliveryMode::from_u8),
        priority: *b.priority(),
        correlation_id: string(b.correlation_id()),
        reply_to: string(b.reply_to()),
        expiration: string(b.expiration()),
        message_id: string(b.message_id()),
        timestamp: *b.timestamp(),
        kind: string(b.kind()),
        user_id: string(b.user_id()),
        app_id: string(b.app_id()),
    }
}

/// A received body and properties as a bus message.
pub(crate) fn message_from_amqp(data: Vec<u8>, props: &BasicProperties) -> Message {
    Message {
        body: Bytes::from(data),
        properties: properties_from_amqp(props).into(),
    }
}

/// What the broker said when it closed a channel or the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BrokerClose {
    pub(crate) code: u16,
    pub(crate) text: String,
    /// Connection-level (hard) rather than channel-level (soft).
    pub(crate) hard: bool,
}

/// The broker's reply code and text, when the error is one the broker sent.
pub(crate) fn broker_close(e: &lapin::Error) -> Option<BrokerClose> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(BrokerClose {
            code: p.get_id(),
            text: p.get_message().as_str().to_owned(),
            hard: matches!(p.kind(), AMQPErrorKind::Hard(_)),
        }),
        _ => None,
    }
}

/// The quoted name after `marker` in a RabbitMQ reply text, which quotes
/// names in single quotes and follows a queue's or an exchange's with
/// ` in vhost '...'` (such a name may itself contain quotes); an argument's
/// name ends at the next quote.
fn quoted_after<'t>(text: &'t str, marker: &str) -> Option<(usize, &'t str)> {
    let at = text.find(marker)?;
    let rest = &text[at + marker.len()..];
    let end = if marker == "arg '" {
        rest.find('\'')?
    } else {
        rest.find("' in vhost '").or_else(|| rest.find('\''))?
    };
    Some((at, &rest[..end]))
}

/// A RabbitMQ reply text with what it names as fields: the queue or
/// exchange (whichever it names first: "no queue 'q' in vhost '/'",
/// "inequivalent arg 'durable' for exchange 'x' in vhost '/'"), and the
/// argument ("inequivalent arg 'x-message-ttl'", "invalid arg
/// 'x-max-priority'"). A reply about the default exchange names it `""`.
pub(crate) fn reply_detail(text: String) -> ErrorDetail {
    let queue = quoted_after(&text, "queue '");
    let exchange = quoted_after(&text, "exchange '");
    let subject = match (queue, exchange) {
        (Some((q_at, q)), Some((x_at, _))) if q_at < x_at => Some(Subject::queue(q)),
        (_, Some((_, x))) => Some(Subject::exchange(x)),
        (Some((_, q)), None) => Some(Subject::queue(q)),
        (None, None) if text.contains("the default exchange") => Some(Subject::exchange("")),
        (None, None) => None,
    };
    let argument = quoted_after(&text, "arg '").map(|(_, a)| a.to_owned());
    let mut detail = ErrorDetail::new(text);
    if let Some(subject) = subject {
        detail = detail.with_subject(subject);
    }
    if let Some(argument) = argument {
        detail = detail.with_argument(argument);
    }
    detail
}

/// Maps a broker reply code to the bus error of the same meaning.
pub(crate) fn error_from_code(code: u16, text: String) -> Error {
    match code {
        404 => Error::NotFound(reply_detail(text)),
        406 => Error::PreconditionFailed(reply_detail(text)),
        405 => Error::ResourceLocked(reply_detail(text)),
        403 => Error::AccessRefused(reply_detail(text)),
        // CONNECTION_FORCED: an operator or a node shutting down closed us.
        320 => Error::ConnectionLost(text),
        540 => Error::NotSupported(text),
        // COMMAND_INVALID for an `exchange.declare` of a type no enabled
        // plugin provides ("unknown exchange type 'x-delayed-message'"); the
        // broker closes the connection, which then recovers.
        503 if text.contains("exchange type") => Error::NotSupported(format!(
            "{text}: the broker has no such exchange type; enable the plugin that provides it"
        )),
        // RESOURCE_ERROR: the broker lacks resources right now.
        506 => Error::backend("amqp", true, format!("{code} {text}")),
        _ => Error::backend("amqp", false, format!("{code} {text}")),
    }
}

/// Whether the error means the whole connection is gone (as opposed to one
/// channel, or one request).
pub(crate) fn is_connection_error(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::IOError(_)
        | lapin::ErrorKind::RuntimeShutdownError(_)
        | lapin::ErrorKind::MissingHeartbeatError
        | lapin::ErrorKind::InvalidConnectionState(_)
        | lapin::ErrorKind::ParsingError(_)
        | lapin::ErrorKind::SerialisationError(_) => true,
        lapin::ErrorKind::ProtocolError(p) => matches!(p.kind(), AMQPErrorKind::Hard(_)),
        _ => false,
    }
}

/// Maps a lapin error to the bus error with the same meaning.
pub(crate) fn map_error(e: &lapin::Error) -> Error {
    if let Some(close) = broker_close(e) {
        return error_from_code(close.code, close.text);
    }
    match e.kind() {
        lapin::ErrorKind::IOError(io) => Error::ConnectionLost(format!("I/O error: {io}")),
        lapin::ErrorKind::MissingHeartbeatError => {
            Error::ConnectionLost("the broker missed its heartbeats".into())
        }
        lapin::ErrorKind::InvalidConnectionState(_) | lapin::ErrorKind::RuntimeShutdownError(_) => {
            Error::ConnectionLost(format!("the connection is not usable: {e}"))
        }
        lapin::ErrorKind::InvalidChannelState(..) | lapin::ErrorKind::InvalidChannel(_) => {
            Error::ConnectionLost(format!("the channel was closed: {e}"))
        }
        lapin::ErrorKind::ChannelsLimitReached => Error::backend("amqp", true, e.clone()),
        lapin::ErrorKind::AuthProviderError(_) => Error::AccessRefused(e.to_string().into()),
        _ => Error::backend("amqp", false, e.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_value() -> FieldTable {
        let nested: FieldTable = [
            (
                "deep".to_string(),
                FieldValue::Array(vec![FieldValue::Void, 1u8.into()]),
            ),
            ("s".to_string(), "x".into()),
        ]
        .into();
        [
            ("bool", FieldValue::Bool(true)),
            ("i8", FieldValue::I8(-8)),
            ("u8", FieldValue::U8(200)),
            ("i16", FieldValue::I16(-16_000)),
            ("u16", FieldValue::U16(60_000)),
            ("i32", FieldValue::I32(-2_000_000_000)),
            ("u32", FieldValue::U32(4_000_000_000)),
            ("i64", FieldValue::I64(i64::MIN)),
            ("f32", FieldValue::F32(1.5)),
            ("f64", FieldValue::F64(-2.25)),
            (
                "dec",
                FieldValue::Decimal {
                    scale: 2,
                    value: 12345,
                },
            ),
            ("str", "héllo ✓".into()),
            ("bytes", FieldValue::Bytes(Bytes::from_static(b"\x00\xff"))),
            ("ts", FieldValue::Timestamp(1_700_000_000)),
            ("table", FieldValue::Table(nested)),
            (
                "array",
                FieldValue::Array(vec!["a".into(), FieldValue::I64(2)]),
            ),
            ("void", FieldValue::Void),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn reply_texts_name_their_subject_and_argument() {
        let d = reply_detail("NOT_FOUND - no queue 'jobs' in vhost '/'".into());
        assert_eq!((d.queue(), d.argument()), (Some("jobs"), None));
        let d = reply_detail(
            "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'it's' in vhost '/': \
             received the value '200' of type 'signedint' but current is none"
                .into(),
        );
        assert_eq!(
            (d.queue(), d.argument()),
            (Some("it's"), Some("x-message-ttl"))
        );
        let d = reply_detail(
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost '/': \
             received 'direct' but current is 'topic'"
                .into(),
        );
        assert_eq!((d.exchange(), d.argument()), (Some("x"), Some("type")));
        let d =
            reply_detail("ACCESS_REFUSED - operation not permitted on the default exchange".into());
        assert_eq!(d.exchange(), Some(""));
        let d = reply_detail("PRECONDITION_FAILED - unknown delivery tag 9".into());
        assert_eq!((d.subject(), d.argument()), (None, None));
    }

    #[test]
    fn every_value_type_maps_both_ways() {
        let t = every_value();
        assert_eq!(table_from_amqp(&table_to_amqp(&t).unwrap()), t);
    }

    #[test]
    fn short_strings_become_strings_and_bad_utf8_stays_bytes() {
        assert_eq!(
            value_from_amqp(&AMQPValue::ShortString("s".into())),
            FieldValue::String("s".into())
        );
        assert_eq!(
            value_from_amqp(&AMQPValue::LongString(LongString::from(vec![0xff, 0x00]))),
            FieldValue::Bytes(Bytes::from_static(b"\xff\x00"))
        );
    }

    #[test]
    fn every_property_maps_both_ways() {
        let p = Properties {
            content_type: Some("application/msgpack".into()),
            content_encoding: Some("gzip".into()),
            headers: every_value(),
            delivery_mode: Some(DeliveryMode::Persistent),
            priority: Some(7),
            correlation_id: Some("c".into()),
            reply_to: Some("r".into()),
            expiration: Some("60000".into()),
            message_id: Some("m".into()),
            timestamp: Some(1_700_000_000),
            kind: Some("t".into()),
            user_id: Some("guest".into()),
            app_id: Some("a".into()),
        };
        assert_eq!(properties_from_amqp(&properties_to_amqp(&p).unwrap()), p);
        assert_eq!(
            properties_from_amqp(&properties_to_amqp(&Properties::default()).unwrap()),
            Properties::default()
        );
    }

    #[test]
    fn long_names_are_refused_not_panicked_on() {
        let p = Properties {
            correlation_id: Some("c".repeat(256)),
            ..Properties::default()
        };
        assert!(matches!(
            properties_to_amqp(&p),
            Err(Error::InvalidArgument(_))
        ));
        let t: FieldTable = [("k".repeat(300), FieldValue::Void)].into();
        assert!(matches!(table_to_amqp(&t), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn reply_codes_map_to_bus_errors() {
        assert!(matches!(
            error_from_code(404, "x".into()),
            Error::NotFound(_)
        ));
        assert!(matches!(
            error_from_code(406, "x".into()),
            Error::PreconditionFailed(_)
        ));
        assert!(matches!(
            error_from_code(405, "x".into()),
            Error::ResourceLocked(_)
        ));
        assert!(matches!(
            error_from_code(403, "x".into()),
            Error::AccessRefused(_)
        ));
        assert!(matches!(
            error_from_code(320, "x".into()),
            Error::ConnectionLost(_)
        ));
        assert!(!error_from_code(541, "x".into()).is_temporary());
    }
}
