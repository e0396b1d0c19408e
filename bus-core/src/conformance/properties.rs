//! Messages travel unchanged: every property, every header value type,
//! empty and large bodies.

use super::support::{bind, cleanup, consume, exchange, publish, queue, queue_with, recv};
use super::Harness;
use crate::{
    Bytes, ConsumeOptions, DeliveryMode, ExchangeKind, FieldTable, FieldValue, Message, Properties,
    QueueOptions,
};

/// Publishes `sent` to `queue` through `exchange` with `key`, consumes it
/// and asserts it arrives identical, field by field first so a failure
/// names the field.
async fn round_trip(
    conn: &dyn crate::Connection,
    exchange: &str,
    key: &str,
    queue: &str,
    sent: &Message,
    what: &str,
) {
    publish(conn, exchange, key, sent.clone()).await;
    let mut c = consume(conn, queue, ConsumeOptions::prefetch(1)).await;
    let d = recv(&mut c, what).await;
    let got = &d.message;
    assert_eq!(got.body.len(), sent.body.len(), "{what}: body length");
    assert!(got.body == sent.body, "{what}: body bytes differ");
    let (p, s) = (&got.properties, &sent.properties);
    for (name, sent_value) in &s.headers {
        assert_eq!(
            p.headers.get(name),
            Some(sent_value),
            "{what}: header {name:?}"
        );
    }
    assert_eq!(p.headers, s.headers, "{what}: headers (no extra ones)");
    assert_eq!(*p, *s, "{what}: properties");
    d.ack().await.expect("ack");
    c.cancel().await.expect("cancel");
}

/// Every basic property round-trips exactly: content type and encoding,
/// headers, delivery mode, priority, correlation id, reply-to, expiration,
/// message id, timestamp, type, user id and app id; a message with no
/// properties arrives with none.
pub async fn every_property_round_trips(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "properties", ExchangeKind::Topic).await;
    let q = queue(&*conn, "properties").await;
    bind(&*conn, &q, &x, "props.#").await;
    let full = Message {
        body: Bytes::from_static(b"{\"k\":1}"),
        properties: Properties {
            content_type: Some("application/json".into()),
            content_encoding: Some("identity".into()),
            headers: [("h".to_owned(), FieldValue::from("v"))].into(),
            delivery_mode: Some(DeliveryMode::Persistent),
            priority: Some(3),
            correlation_id: Some("corr-42".into()),
            reply_to: Some("replies.here".into()),
            // Long enough never to expire during the case.
            expiration: Some("3600000".into()),
            message_id: Some("msg-7".into()),
            timestamp: Some(1_700_000_000),
            kind: Some("order.created".into()),
            user_id: Some(h.user_id()),
            app_id: Some("bus-conformance".into()),
        }
        .into(),
    };
    round_trip(&*conn, &x, "props.full", &q, &full, "every property").await;
    round_trip(
        &*conn,
        "",
        &q,
        &q,
        &full,
        "every property, default exchange",
    )
    .await;
    let transient = Message::new("transient").with_delivery_mode(DeliveryMode::Transient);
    round_trip(
        &*conn,
        &x,
        "props.t",
        &q,
        &transient,
        "transient delivery mode",
    )
    .await;
    let bare = Message::new("bare");
    round_trip(&*conn, &x, "props.bare", &q, &bare, "no properties").await;
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// One value of every [`FieldValue`] variant.
fn every_value() -> Vec<(&'static str, FieldValue)> {
    vec![
        ("bool-true", FieldValue::Bool(true)),
        ("bool-false", FieldValue::Bool(false)),
        ("i8", FieldValue::I8(-8)),
        ("u8", FieldValue::U8(200)),
        ("i16", FieldValue::I16(-300)),
        ("u16", FieldValue::U16(60_000)),
        ("i32", FieldValue::I32(-70_000)),
        ("u32", FieldValue::U32(4_000_000_000)),
        ("i64", FieldValue::I64(-5_000_000_000)),
        ("i64-max", FieldValue::I64(i64::MAX)),
        ("f32", FieldValue::F32(1.25)),
        ("f64", FieldValue::F64(-2.5e100)),
        (
            "decimal",
            FieldValue::Decimal {
                scale: 2,
                value: 12_345,
            },
        ),
        ("string", FieldValue::from("héllo ✓")),
        ("string-empty", FieldValue::from("")),
        (
            "bytes",
            FieldValue::Bytes(Bytes::from_static(&[0, 255, 1, 0])),
        ),
        ("timestamp", FieldValue::Timestamp(1_700_000_000)),
        ("void", FieldValue::Void),
        ("table-empty", FieldValue::Table(FieldTable::new())),
        ("array-empty", FieldValue::Array(Vec::new())),
    ]
}

/// Every header value type round-trips with its type and value: booleans,
/// signed and unsigned integers of each width, floats, decimals, strings,
/// bytes, timestamps, void, and tables and arrays nesting all of them.
pub async fn every_header_type_round_trips(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "header-types").await;
    let values = every_value();
    let mut headers: FieldTable = values
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let nested: FieldTable = headers.clone();
    let array: Vec<FieldValue> = values.iter().map(|(_, v)| v.clone()).collect();
    headers.insert("table".into(), FieldValue::Table(nested.clone()));
    headers.insert("array".into(), FieldValue::Array(array.clone()));
    headers.insert(
        "deep".into(),
        FieldValue::Table(
            [
                ("table".to_owned(), FieldValue::Table(nested.clone())),
                (
                    "arrays".to_owned(),
                    FieldValue::Array(vec![
                        FieldValue::Array(array.clone()),
                        FieldValue::Table(nested),
                        FieldValue::Array(vec![FieldValue::Array(vec![FieldValue::I8(1)])]),
                    ]),
                ),
            ]
            .into(),
        ),
    );
    let sent = Message::new("typed").with_headers(headers);
    round_trip(&*conn, "", &q, &q, &sent, "every header type").await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// A message with an empty body round-trips, with and without properties.
pub async fn empty_body_round_trips(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "empty-body").await;
    round_trip(
        &*conn,
        "",
        &q,
        &q,
        &Message::new(Bytes::new()),
        "empty body",
    )
    .await;
    let with_props = Message::new(Bytes::new())
        .with_content_type("application/octet-stream")
        .with_header("n", FieldValue::I32(0));
    round_trip(
        &*conn,
        "",
        &q,
        &q,
        &with_props,
        "empty body with properties",
    )
    .await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// A 16 MiB body round-trips byte for byte, and keeps its place in the
/// queue's order.
pub async fn large_body_round_trips(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "large-body").await;
    // A pattern with no period of a power of two, so misplaced chunks show.
    let body: Vec<u8> = (0..16 * 1024 * 1024)
        .map(|i: u32| (i % 251) as u8)
        .collect();
    let big = Message::new(body).with_header("size", FieldValue::U32(16 * 1024 * 1024));
    round_trip(&*conn, "", &q, &q, &big, "16 MiB body").await;
    publish(&*conn, "", &q, big.clone()).await;
    publish(&*conn, "", &q, Message::new("small after")).await;
    let mut c = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let d = recv(&mut c, "the large message first").await;
    assert!(d.message.body == big.body, "large body intact");
    let d = recv(&mut c, "the small message after").await;
    assert_eq!(&d.message.body[..], b"small after");
    drop(c);
    cleanup(&*conn, &[&q], &[]).await;
}

/// A persistent message in a durable queue is delivered as persistent.
pub async fn persistent_message_in_durable_queue(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue_with(&*conn, "durable", QueueOptions::durable()).await;
    let sent = Message::new("kept").persistent().with_message_id("p-1");
    round_trip(&*conn, "", &q, &q, &sent, "persistent message").await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// A publish whose `expiration` is not a string of non-negative integer
/// milliseconds is `PreconditionFailed` and delivers nothing.
pub async fn invalid_expiration_is_refused(h: &dyn Harness) {
    if super::support::not_applicable(
        h,
        h.capabilities().message_ttl,
        "invalid_expiration_is_refused",
        "no message TTL",
    ) {
        return;
    }
    let conn = h.connect().await;
    let q = queue(&*conn, "bad-expiration").await;
    for bad in ["soon", "-5", "1.5", ""] {
        let mut m = Message::new(format!("expiration {bad:?}"));
        m.properties.expiration = Some(bad.to_owned());
        super::support::expect_err!(
            format!("publish with expiration {bad:?}"),
            conn.publish("", &q, m, crate::PublishOptions::default())
                .await,
            crate::Error::PreconditionFailed(_)
        );
    }
    super::support::expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}
