//! The transport against a real RabbitMQ: mapping, confirms, channel
//! isolation, consuming, replies, connecting.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bus_amqp::{AmqpConnection, AmqpOptions, ReplyMode};
use bus_core::{
    Bytes, Connection, ConnectionExt, ConsumeOptions, DeleteExchangeOptions, DeliveryMode, Error,
    ExchangeKind, ExchangeOptions, FieldTable, FieldValue, Message, Overflow, Properties,
    PublishOptions, QueueOptions, QueueType, Requeue,
};
use futures::StreamExt;
use support::*;

fn every_header_type() -> FieldTable {
    let nested: FieldTable = [
        (
            "list".to_string(),
            FieldValue::Array(vec![FieldValue::Void, FieldValue::U8(1), "s".into()]),
        ),
        (
            "deeper".to_string(),
            FieldValue::Table([("x".to_string(), FieldValue::I16(-3))].into()),
        ),
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
            "decimal",
            FieldValue::Decimal {
                scale: 2,
                value: 12_345,
            },
        ),
        ("string", "héllo ✓ 世界".into()),
        ("empty", "".into()),
        (
            "bytes",
            FieldValue::Bytes(Bytes::from_static(b"\x00\xff\x10")),
        ),
        ("timestamp", FieldValue::Timestamp(1_700_000_000)),
        ("table", FieldValue::Table(nested)),
        (
            "array",
            FieldValue::Array(vec![
                "a".into(),
                FieldValue::I64(2),
                FieldValue::Bool(false),
            ]),
        ),
        ("void", FieldValue::Void),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[tokio::test]
async fn every_property_and_header_type_round_trips_through_the_broker() {
    let conn = connect().await;
    let q = exclusive_queue(&*conn).await;
    let props = Properties {
        content_type: Some("application/msgpack".into()),
        content_encoding: Some("identity".into()),
        headers: every_header_type(),
        delivery_mode: Some(DeliveryMode::Persistent),
        priority: Some(7),
        correlation_id: Some("3f1c6a3e-1b2c-4d5e-8f90-123456789abc".into()),
        reply_to: Some("somewhere".into()),
        expiration: Some("600000".into()),
        message_id: Some("m-1".into()),
        timestamp: Some(1_700_000_123),
        kind: Some("greeting".into()),
        user_id: Some("guest".into()),
        app_id: Some("bus-amqp-tests".into()),
    };
    let big = Bytes::from(
        (0..5 * 1024 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let sent = [
        Message {
            body: Bytes::from_static(b"hello"),
            properties: props.clone().into(),
        },
        Message::new(Bytes::new()),
        Message {
            body: big,
            properties: Default::default(),
        },
    ];
    for m in &sent {
        conn.send_to_queue(&q, m.clone()).await.unwrap();
    }
    let mut consumer = conn.consume(&q, ConsumeOptions::auto_ack()).await.unwrap();
    for m in &sent {
        let d = next_delivery(&mut consumer, 10, "a delivery").await;
        assert_eq!(d.message.properties, m.properties);
        assert_eq!(d.message.body, m.body);
        assert_eq!(d.exchange, "");
        assert_eq!(d.routing_key, q);
        assert!(!d.redelivered);
    }
}

#[tokio::test]
async fn many_publishes_in_flight_each_resolve_on_their_own_confirm() {
    let conn = connect().await;
    let q = exclusive_queue(&*conn).await;
    let publishes = (0..500u32).map(|i| {
        let conn = conn.clone();
        let q = q.clone();
        async move {
            conn.send_to_queue(&q, Message::new(i.to_be_bytes().to_vec()))
                .await
        }
    });
    let results = within(30, "500 confirms", futures::future::join_all(publishes)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let info = conn.inspect_queue(&q).await.unwrap();
    assert_eq!(info.message_count, 500);
}

#[tokio::test]
async fn a_refused_declaration_does_not_break_the_connection_for_others() {
    let conn = connect().await;
    let q = fresh("isolation");
    conn.declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    let mut consumer = conn
        .consume(&q, ConsumeOptions::prefetch(10))
        .await
        .unwrap();
    // Redeclaring with other settings: the broker closes the channel with 406.
    let e = conn
        .declare_queue(&q, QueueOptions::durable())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PreconditionFailed(_)), "{e}");
    // Passive declaration of a missing queue: 404.
    let e = conn.inspect_queue(&fresh("missing")).await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    // Reserved names: 403.
    let e = conn
        .declare_queue("amq.mine", QueueOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AccessRefused(_)), "{e}");
    // Publishing to a missing exchange: 404, and nothing else is disturbed.
    let e = conn
        .publish(
            &fresh("no-exchange"),
            "k",
            Message::new("x"),
            PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    // The consumer, the publisher and topology all still work.
    conn.send_to_queue(&q, Message::new("still here"))
        .await
        .unwrap();
    let d = next_delivery(&mut consumer, 10, "a delivery").await;
    assert_eq!(d.message.body, "still here");
    d.ack().await.unwrap();
    assert_eq!(conn.inspect_queue(&q).await.unwrap().consumer_count, 1);
    drop(consumer);
    delete_queue(&*conn, &q).await;
}

#[tokio::test]
async fn exclusive_queues_of_another_connection_are_locked() {
    let owner = connect().await;
    let other = connect().await;
    let q = exclusive_queue(&*owner).await;
    let e = other.inspect_queue(&q).await.unwrap_err();
    assert!(matches!(e, Error::ResourceLocked(_)), "{e}");
    let e = other
        .consume(&q, ConsumeOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ResourceLocked(_)), "{e}");
    // The other connection is still usable.
    assert!(other.exchange_exists("amq.direct").await.unwrap());
}

#[tokio::test]
async fn unroutable_mandatory_messages_come_back_and_full_queues_nack() {
    let conn = connect().await;
    let x = fresh("x");
    conn.declare_exchange(&x, ExchangeKind::Direct, ExchangeOptions::default())
        .await
        .unwrap();
    let m = Message::new("lost").with_message_id("id-1");
    let e = conn
        .publish(&x, "nobody", m.clone(), PublishOptions::mandatory())
        .await
        .unwrap_err();
    match e {
        Error::Unroutable {
            exchange,
            routing_key,
            message,
        } => {
            assert_eq!(
                (exchange.as_str(), routing_key.as_str()),
                (x.as_str(), "nobody")
            );
            assert_eq!(*message, m);
        }
        other => panic!("expected Unroutable, got {other}"),
    }
    // Not mandatory: dropped, and that is success.
    conn.publish(&x, "nobody", m, PublishOptions::default())
        .await
        .unwrap();

    let q = fresh("full");
    let options = QueueOptions::default()
        .max_length(1)
        .overflow(Overflow::RejectPublish);
    conn.declare_queue(&q, options).await.unwrap();
    conn.send_to_queue(&q, Message::new("1")).await.unwrap();
    let e = conn.send_to_queue(&q, Message::new("2")).await.unwrap_err();
    assert!(matches!(e, Error::Nacked(_)), "{e}");
    assert!(e.is_temporary());
    delete_queue(&*conn, &q).await;
    conn.delete_exchange(&x, DeleteExchangeOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn invalid_expiration_and_foreign_user_id_are_refused_without_harm() {
    let conn = connect().await;
    let q = exclusive_queue(&*conn).await;
    let mut bad = Message::new("x");
    bad.properties.expiration = Some("soon".into());
    assert!(matches!(
        conn.send_to_queue(&q, bad).await,
        Err(Error::PreconditionFailed(_))
    ));
    let e = conn
        .send_to_queue(&q, Message::new("x").with_user_id("mallory"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PreconditionFailed(_)), "{e}");
    conn.send_to_queue(&q, Message::new("ok")).await.unwrap();
    assert_eq!(conn.inspect_queue(&q).await.unwrap().message_count, 1);
}

#[tokio::test]
async fn manual_acks_nacks_and_prefetch() {
    let conn = connect().await;
    let q = exclusive_queue(&*conn).await;
    for i in 0..4 {
        conn.send_to_queue(&q, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let mut c = conn
        .consume(&q, ConsumeOptions::prefetch(2).with_tag("tagged"))
        .await
        .unwrap();
    assert_eq!(c.tag(), "tagged");
    let d0 = next_delivery(&mut c, 10, "m0").await;
    let d1 = next_delivery(&mut c, 10, "m1").await;
    assert_eq!(
        (&d0.message.body[..], &d1.message.body[..]),
        (&b"m0"[..], &b"m1"[..])
    );
    // Prefetch 2: nothing more until one is settled.
    assert!(tokio::time::timeout(Duration::from_millis(300), c.next())
        .await
        .is_err());
    d1.ack_multiple().await.unwrap();
    // Two free slots: m2 and m3 are both in flight now.
    let d2 = next_delivery(&mut c, 10, "m2").await;
    assert_eq!(d2.message.body, "m2");
    d2.nack(Requeue::Yes).await.unwrap();
    let d3 = next_delivery(&mut c, 10, "m3").await;
    assert_eq!(d3.message.body, "m3");
    let again = next_delivery(&mut c, 10, "m2 again").await;
    assert_eq!(again.message.body, "m2");
    assert!(again.redelivered);
    assert!(again.delivery_tag > d3.delivery_tag);
    again.reject(Requeue::No).await.unwrap();
    d3.ack().await.unwrap();
    assert_eq!(conn.inspect_queue(&q).await.unwrap().message_count, 0);
}

#[tokio::test]
async fn direct_reply_to_round_trip() {
    let server = connect().await;
    let client = connect().await;
    let q = fresh("rpc");
    server
        .declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    let mut requests = server
        .consume(&q, ConsumeOptions::prefetch(1))
        .await
        .unwrap();
    let replies = client.reply_queue().await.unwrap();
    assert_eq!(replies.address, "amq.rabbitmq.reply-to");
    assert!(client.capabilities().direct_reply);
    let publisher = replies
        .publisher
        .clone()
        .expect("direct reply-to needs its publisher");
    let mut reply_consumer = replies.consumer;
    publisher
        .publish(
            "",
            &q,
            Message::new("ping")
                .with_reply_to(&replies.address)
                .with_correlation_id("c1"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    let req = next_delivery(&mut requests, 10, "the request").await;
    let reply_to = req.message.properties.reply_to.clone().unwrap();
    assert!(reply_to.starts_with("amq.rabbitmq.reply-to."), "{reply_to}");
    server
        .publish(
            "",
            &reply_to,
            Message::new("pong").with_correlation_id("c1"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    req.ack().await.unwrap();
    let reply = next_delivery(&mut reply_consumer, 10, "the reply").await;
    assert_eq!(reply.message.body, "pong");
    assert_eq!(
        reply.message.properties.correlation_id.as_deref(),
        Some("c1")
    );
    delete_queue(&*server, &q).await;
}

#[tokio::test]
async fn classic_reply_mode_uses_an_exclusive_server_named_queue() {
    let conn = connect_with(AmqpOptions::default().with_reply_mode(ReplyMode::Classic)).await;
    assert!(!conn.capabilities().direct_reply);
    let replies = conn.reply_queue().await.unwrap();
    assert!(
        replies.address.starts_with("amq.gen-"),
        "{}",
        replies.address
    );
    assert!(replies.publisher.is_none());
    let other = connect().await;
    let e = other.inspect_queue(&replies.address).await.unwrap_err();
    assert!(matches!(e, Error::ResourceLocked(_)), "{e}");
}

#[tokio::test]
async fn quorum_queues_work() {
    let conn = connect().await;
    let q = fresh("quorum");
    let options = QueueOptions::durable().queue_type(QueueType::Quorum);
    conn.declare_queue(&q, options.clone()).await.unwrap();
    // Redeclaring the same is a no-op; a non-durable quorum queue is refused.
    conn.declare_queue(&q, options).await.unwrap();
    let e = conn
        .declare_queue(
            &fresh("quorum-transient"),
            QueueOptions::default().queue_type(QueueType::Quorum),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PreconditionFailed(_)), "{e}");
    conn.send_to_queue(&q, Message::new("replicated").persistent())
        .await
        .unwrap();
    let mut c = conn.consume(&q, ConsumeOptions::prefetch(1)).await.unwrap();
    let d = next_delivery(&mut c, 10, "a delivery").await;
    assert_eq!(d.message.body, "replicated");
    d.ack().await.unwrap();
    drop(c);
    delete_queue(&*conn, &q).await;
}

#[tokio::test]
async fn connects_to_the_first_host_that_answers() {
    // A closed port first: refused at once, so the second host is used.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("amqp://guest:guest@127.0.0.1:{closed_port},127.0.0.1:5672/%2f");
    let conn = within(20, "connecting", AmqpConnection::connect(&url))
        .await
        .unwrap();
    assert_eq!(conn.current_host().as_deref(), Some("127.0.0.1:5672"));
    assert!(conn.exchange_exists("amq.topic").await.unwrap());
    // Hosts in the options come after the URL's.
    let url = format!("amqp://guest:guest@127.0.0.1:{closed_port}/%2f");
    let conn = AmqpConnection::connect_with(
        &url,
        AmqpOptions::default().with_hosts([("127.0.0.1", 5672)]),
    )
    .await
    .unwrap();
    assert_eq!(conn.current_host().as_deref(), Some("127.0.0.1:5672"));
}

#[tokio::test]
async fn credentials_never_show_in_errors_or_debug() {
    let e = AmqpConnection::connect("amqp://guest:not-the-password-xyz@127.0.0.1:5672/%2f")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AccessRefused(_)), "{e}");
    assert!(
        !format!("{e} {e:?}").contains("not-the-password-xyz"),
        "{e:?}"
    );
    let e = AmqpConnection::connect("amqp://guest:secret-xyz@127.0.0.1:1/%2f")
        .await
        .unwrap_err();
    assert!(e.is_temporary(), "{e}");
    assert!(!format!("{e} {e:?}").contains("secret-xyz"), "{e:?}");
    let conn = connect().await;
    let shown = format!("{conn:?}");
    assert!(!shown.contains("guest"), "{shown}");
    let e = AmqpConnection::connect(&format!(
        "amqp://guest:guest@127.0.0.1:5672/{}",
        fresh("vhost")
    ))
    .await
    .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
}

#[tokio::test]
async fn dropping_a_consumer_requeues_what_it_had_not_settled() {
    let conn = connect().await;
    let private = QueueOptions::default().with_exclusive(true);
    let q = conn.declare_queue("", private).await.unwrap().name;
    conn.send_to_queue(&q, Message::new("once")).await.unwrap();
    let mut c = conn.consume(&q, ConsumeOptions::prefetch(1)).await.unwrap();
    let d = next_delivery(&mut c, 10, "the delivery").await;
    drop(c);
    let e = d.ack().await.unwrap_err();
    assert!(matches!(e, Error::Closed(_)), "{e}");
    let mut c = conn.consume(&q, ConsumeOptions::prefetch(1)).await.unwrap();
    let d = next_delivery(&mut c, 10, "the redelivery").await;
    assert!(d.redelivered);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_consumer_ends_but_its_deliveries_can_be_settled() {
    let conn: Arc<dyn Connection> = connect().await;
    let private = QueueOptions::default().with_exclusive(true);
    let q = conn.declare_queue("", private).await.unwrap().name;
    conn.send_to_queue(&q, Message::new("a")).await.unwrap();
    let mut c = conn.consume(&q, ConsumeOptions::prefetch(1)).await.unwrap();
    let d = next_delivery(&mut c, 10, "a delivery").await;
    c.cancel().await.unwrap();
    assert!(within(10, "the end of the stream", c.next())
        .await
        .is_none());
    d.ack().await.unwrap();
    assert_eq!(conn.inspect_queue(&q).await.unwrap().message_count, 0);
    // Deleting a queue ends its consumers' streams.
    let mut c = conn.consume(&q, ConsumeOptions::auto_ack()).await.unwrap();
    delete_queue(&*conn, &q).await;
    assert!(within(10, "the end of the stream", c.next())
        .await
        .is_none());
}

#[tokio::test]
async fn amqps_speaks_tls_and_fails_cleanly_against_a_plain_port() {
    // The plain AMQP port does not answer a TLS handshake: a clear error,
    // no panic (a crypto provider is built in), no credentials shown.
    let e = within(
        30,
        "the TLS attempt",
        AmqpConnection::connect_with(
            "amqps://guest:tls-secret-xyz@127.0.0.1:5672/%2f",
            AmqpOptions::default().with_connect_timeout(Duration::from_secs(5)),
        ),
    )
    .await
    .unwrap_err();
    assert!(!format!("{e} {e:?}").contains("tls-secret-xyz"), "{e:?}");
    // A port that does not speak TLS does not start to on a retry.
    assert!(!e.is_temporary(), "{e}");
    assert!(e.to_string().contains("TLS"), "{e}");
}
