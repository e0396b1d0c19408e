//! Bad input is refused with an error that names the entity and what was
//! wrong, changes nothing, and never panics.

mod common;

use std::time::Duration;

use bus_core::{
    Connection, ConnectionExt, ConsumeOptions, Error, ExchangeKind, ExchangeOptions, FieldValue,
    Message, PublishOptions, QueueArguments, QueueOptions, Requeue, MAX_TTL,
};
use common::*;
use futures::StreamExt;

#[tokio::test(start_paused = true)]
async fn the_default_exchange_exists_without_a_passive_declaration() {
    let (_b, conn) = setup();
    assert!(conn.exchange_exists("").await.unwrap());
    // The passive declaration itself is refused, as RabbitMQ refuses it.
    let e = conn
        .declare_exchange("", ExchangeKind::Direct, ExchangeOptions::passive())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AccessRefused(_)), "{e}");
    assert!(!conn.exchange_exists("never-declared").await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn ttls_beyond_ten_years_are_refused_and_change_nothing() {
    let (broker, conn) = setup();
    for arguments in [
        QueueArguments::default().message_ttl(MAX_TTL + Duration::from_millis(1)),
        QueueArguments::default().expires(Duration::MAX),
    ] {
        let options = QueueOptions::default().with_arguments(arguments);
        let e = conn.declare_queue("long", options).await.unwrap_err();
        assert!(
            matches!(&e, Error::PreconditionFailed(m) if m.contains("queue 'long'") && m.contains("10 years")),
            "{e}"
        );
        assert_eq!(broker.queue_depth("long"), None);
    }

    queue(&conn, "q").await;
    for expiration in [
        MAX_TTL.as_millis().to_string(),
        u64::MAX.to_string(),
        "99999999999999999999".into(),
    ] {
        let mut message = Message::new("x");
        message.properties.expiration = Some(expiration.clone());
        let result = conn
            .publish("", "q", message, PublishOptions::default())
            .await;
        if expiration == MAX_TTL.as_millis().to_string() {
            result.unwrap();
        } else {
            let e = result.unwrap_err();
            assert!(
                matches!(&e, Error::PreconditionFailed(m) if m.contains(&expiration)),
                "{e}"
            );
        }
    }
    assert_eq!(
        broker.queue_depth("q"),
        Some(1),
        "only the valid one landed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_ttl_of_ten_years_waits_without_overflowing_the_clock() {
    let (broker, conn) = setup();
    queue_with(
        &conn,
        "slow",
        QueueOptions::default()
            .message_ttl(MAX_TTL)
            .expires(MAX_TTL),
    )
    .await;
    conn.send_to_queue("slow", Message::new("x").with_expiration(MAX_TTL))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(broker.queue_depth("slow"), Some(1));
}

#[tokio::test(start_paused = true)]
async fn refusals_name_the_queue_or_exchange() {
    let (_b, conn) = setup();
    queue(&conn, "jobs").await;

    let e = conn
        .bind_queue("jobs", "", "jobs", Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::AccessRefused(m) if m.contains("queue 'jobs'") && m.contains("default exchange")),
        "{e}"
    );

    let long_key = "k".repeat(256);
    let e = conn
        .publish(
            "amq.direct",
            &long_key,
            Message::new(""),
            PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("exchange 'amq.direct'") && m.contains("256")),
        "{e}"
    );

    let e = conn
        .consume(
            "jobs",
            ConsumeOptions::default()
                .with_arguments([("x-priority".to_string(), FieldValue::from("high"))].into()),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::PreconditionFailed(m) if m.contains("'x-priority'") && m.contains("queue 'jobs'")),
        "{e}"
    );

    let options = QueueOptions::default().argument("x-max-priority", FieldValue::I32(256));
    let e = conn.declare_queue("prio", options).await.unwrap_err();
    assert!(
        matches!(&e, Error::PreconditionFailed(m) if m.contains("queue 'prio'") && m.contains("x-max-priority")),
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn settling_twice_or_nacking_an_auto_ack_delivery_says_which_delivery() {
    let (_b, conn) = setup();
    queue(&conn, "q").await;
    conn.send_to_queue("q", Message::new("a")).await.unwrap();
    conn.send_to_queue("q", Message::new("b")).await.unwrap();

    let mut manual = conn
        .consume("q", ConsumeOptions::prefetch(1))
        .await
        .unwrap();
    let d = next(&mut manual).await;
    assert_eq!(d.body(), &b"a"[..]);
    d.ack().await.unwrap();
    let e = d.ack().await.unwrap_err();
    assert!(
        matches!(&e, Error::PreconditionFailed(m) if m.contains("delivery 1") && m.contains("routing key 'q'")),
        "{e}"
    );
    drop(manual);

    let mut auto = conn.consume("q", ConsumeOptions::auto_ack()).await.unwrap();
    let d = auto.next().await.unwrap().unwrap();
    assert_eq!(d.body(), &b"b"[..]);
    assert!(d.is_settled());
    d.ack().await.unwrap();
    let e = d.nack(Requeue::Yes).await.unwrap_err();
    assert!(
        matches!(&e, Error::PreconditionFailed(m) if m.contains("auto-ack")),
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn deliveries_decode_their_body_by_content_type() {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Job {
        id: u32,
    }
    let (_b, conn) = setup();
    queue(&conn, "q").await;
    conn.send_to_queue("q", Message::json(&Job { id: 1 }).unwrap())
        .await
        .unwrap();
    conn.send_to_queue("q", Message::msgpack(&Job { id: 2 }).unwrap())
        .await
        .unwrap();
    let mut c = conn.consume("q", ConsumeOptions::auto_ack()).await.unwrap();
    let first = next(&mut c).await;
    assert_eq!(
        first.properties().content_type.as_deref(),
        Some("application/json")
    );
    assert_eq!(first.decode::<Job>().unwrap(), Job { id: 1 });
    assert_eq!(next(&mut c).await.decode::<Job>().unwrap(), Job { id: 2 });
}

#[tokio::test(start_paused = true)]
async fn pathological_topic_patterns_route_quickly() {
    let (broker, conn) = setup();
    queue(&conn, "q").await;
    // Many `#` in a row and a key of many words: a naive backtracking
    // matcher takes exponential time on this; routing must not.
    let pattern = format!("{}.b", vec!["#"; 60].join("."));
    conn.bind_queue("q", "amq.topic", &pattern, Default::default())
        .await
        .unwrap();
    let miss = vec!["a"; 127].join(".");
    let hit = format!("{}.b", vec!["a"; 126].join("."));
    let started = std::time::Instant::now();
    for key in [&miss, &hit] {
        conn.publish(
            "amq.topic",
            key,
            Message::new(""),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        broker.queue_depth("q"),
        Some(1),
        "only the key ending in b matched"
    );
}
