//! Dead-lettering, TTL, queue expiry and length limits.

mod common;

use std::time::Duration;

use bus_core::{
    Connection, Error, ExchangeKind, FieldValue, Message, Overflow, PublishOptions, QueueArguments,
    QueueOptions, QueueType, Requeue,
};
use common::*;

fn with_args(arguments: QueueArguments) -> QueueOptions {
    QueueOptions::default().with_arguments(arguments)
}

fn dlx_args(dlx: &str) -> QueueArguments {
    QueueArguments::default().dead_letter_to(dlx)
}

/// A fanout dead-letter exchange `dlx` feeding queue `dead`.
async fn dead_letter_sink(conn: &bus_local::LocalConnection) {
    exchange(conn, "dlx", ExchangeKind::Fanout).await;
    queue(conn, "dead").await;
    bind(conn, "dead", "dlx", "").await;
}

fn death(d: &bus_core::Delivery, i: usize) -> bus_core::FieldTable {
    d.message.properties.headers["x-death"].as_array().unwrap()[i]
        .as_table()
        .unwrap()
        .clone()
}

#[tokio::test(start_paused = true)]
async fn rejected_messages_carry_x_death() {
    let (_b, conn) = setup();
    dead_letter_sink(&conn).await;
    queue_with(&conn, "src", with_args(dlx_args("dlx"))).await;
    exchange(&conn, "in", ExchangeKind::Direct).await;
    bind(&conn, "src", "in", "k1").await;
    conn.publish(
        "in",
        "k1",
        Message::new("m")
            .with_expiration_ms(60_000)
            .with_header("CC", vec![FieldValue::from("k2")]),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let mut src = consume(&conn, "src", 1).await;
    next(&mut src).await.reject(Requeue::No).await.unwrap();
    let mut dead = consume(&conn, "dead", 1).await;
    let d = next(&mut dead).await;
    assert_eq!((d.exchange.as_str(), d.routing_key.as_str()), ("dlx", "k1"));
    assert!(!d.redelivered);
    assert_eq!(d.message.properties.expiration, None);
    let x = death(&d, 0);
    assert_eq!(x["count"], FieldValue::I64(1));
    assert_eq!(x["reason"], FieldValue::from("rejected"));
    assert_eq!(x["queue"], FieldValue::from("src"));
    assert_eq!(x["exchange"], FieldValue::from("in"));
    assert_eq!(
        x["routing-keys"],
        FieldValue::Array(vec!["k1".into(), "k2".into()])
    );
    assert_eq!(x["original-expiration"], FieldValue::from("60000"));
    assert!(matches!(x["time"], FieldValue::Timestamp(t) if t > 1_600_000_000));
    let h = &d.message.properties.headers;
    assert_eq!(h["x-first-death-reason"], FieldValue::from("rejected"));
    assert_eq!(h["x-first-death-queue"], FieldValue::from("src"));
    assert_eq!(h["x-first-death-exchange"], FieldValue::from("in"));
}

#[tokio::test(start_paused = true)]
async fn ping_pong_counts_deaths_per_queue_and_reason() {
    let (_b, conn) = setup();
    let to = |q: &str| {
        with_args(
            QueueArguments::default()
                .dead_letter_to(String::new())
                .dead_letter_routing_key(q),
        )
    };
    queue_with(&conn, "a", to("b")).await;
    queue_with(&conn, "b", to("a")).await;
    send(&conn, "a", "ball").await;
    let mut a = consume(&conn, "a", 1).await;
    let mut b = consume(&conn, "b", 1).await;
    for _ in 0..3 {
        next(&mut a).await.reject(Requeue::No).await.unwrap();
        next(&mut b).await.reject(Requeue::No).await.unwrap();
    }
    let d = next(&mut a).await;
    assert_eq!(d.routing_key, "a");
    let deaths = d.message.properties.headers["x-death"].as_array().unwrap();
    assert_eq!(deaths.len(), 2);
    assert_eq!(death(&d, 0)["queue"], FieldValue::from("b"));
    assert_eq!(death(&d, 0)["count"], FieldValue::I64(3));
    assert_eq!(death(&d, 1)["queue"], FieldValue::from("a"));
    assert_eq!(death(&d, 1)["count"], FieldValue::I64(3));
}

#[tokio::test(start_paused = true)]
async fn ttl_expires_and_dead_letters_on_the_clock() {
    let (b, conn) = setup();
    dead_letter_sink(&conn).await;
    queue_with(
        &conn,
        "ttl",
        with_args(dlx_args("dlx").message_ttl(Duration::from_millis(100))),
    )
    .await;
    send(&conn, "ttl", "old").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    send(&conn, "ttl", "young").await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(b.queue_depth("ttl"), Some(1));
    assert_eq!(b.queue_depth("dead"), Some(1));
    let mut c = consume(&conn, "ttl", 1).await;
    assert_eq!(body(&next(&mut c).await), "young");
    let mut dead = consume(&conn, "dead", 1).await;
    let d = next(&mut dead).await;
    assert_eq!(body(&d), "old");
    assert_eq!(death(&d, 0)["reason"], FieldValue::from("expired"));
    assert!(!death(&d, 0).contains_key("original-expiration"));
}

#[tokio::test(start_paused = true)]
async fn per_message_ttl_and_only_heads_expire() {
    let (b, conn) = setup();
    dead_letter_sink(&conn).await;
    queue_with(&conn, "q", with_args(dlx_args("dlx"))).await;
    for (body, ms) in [("long", 1000), ("short", 10)] {
        conn.publish(
            "",
            "q",
            Message::new(body).with_expiration_ms(ms),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    // "short" waits behind "long", as in RabbitMQ.
    assert_eq!(b.queue_depth("q"), Some(2));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(b.queue_depth("q"), Some(0));
    let mut dead = consume(&conn, "dead", 0).await;
    for expected in ["long", "short"] {
        let d = next(&mut dead).await;
        assert_eq!(body(&d), expected);
        assert!(death(&d, 0).contains_key("original-expiration"));
    }
}

#[tokio::test(start_paused = true)]
async fn ttl_zero_reaches_a_waiting_consumer_only() {
    let (b, conn) = setup();
    queue(&conn, "q").await;
    let zero = || Message::new("now").with_expiration_ms(0);
    conn.publish("", "q", zero(), PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(b.queue_depth("q"), Some(0));
    let mut c = consume(&conn, "q", 1).await;
    conn.publish("", "q", zero(), PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(body(&next(&mut c).await), "now");
}

#[tokio::test(start_paused = true)]
async fn expiry_deletes_an_unused_queue() {
    let (b, conn) = setup();
    queue_with(
        &conn,
        "temp",
        with_args(QueueArguments::default().expires(Duration::from_secs(10))),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    // A declaration counts as use.
    queue_with(
        &conn,
        "temp",
        with_args(QueueArguments::default().expires(Duration::from_secs(10))),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let c = consume(&conn, "temp", 1).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(b.queue_depth("temp").is_some(), "a consumer keeps it");
    drop(c);
    tokio::time::sleep(Duration::from_millis(9_999)).await;
    assert!(b.queue_depth("temp").is_some());
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(b.queue_depth("temp"), None);
}

#[tokio::test(start_paused = true)]
async fn drop_head_dead_letters_the_oldest() {
    let (b, conn) = setup();
    dead_letter_sink(&conn).await;
    queue_with(&conn, "q", with_args(dlx_args("dlx").max_length(2))).await;
    for i in 1..=4 {
        send(&conn, "q", &i.to_string()).await;
    }
    assert_eq!(b.queue_depth("q"), Some(2));
    let mut dead = consume(&conn, "dead", 0).await;
    for expected in ["1", "2"] {
        let d = next(&mut dead).await;
        assert_eq!(body(&d), expected);
        assert_eq!(death(&d, 0)["reason"], FieldValue::from("maxlen"));
    }
}

#[tokio::test(start_paused = true)]
async fn max_length_bytes_counts_bodies() {
    let (b, conn) = setup();
    queue_with(
        &conn,
        "drop",
        with_args(QueueArguments::default().max_length_bytes(10)),
    )
    .await;
    queue_with(
        &conn,
        "refuse",
        with_args(
            QueueArguments::default()
                .max_length_bytes(10)
                .overflow(Overflow::RejectPublish),
        ),
    )
    .await;
    for q in ["drop", "refuse"] {
        let mut results = Vec::new();
        for body in ["12345", "1234567", "1234", "1", ""] {
            results.push(
                conn.publish("", q, Message::new(body), PublishOptions::default())
                    .await
                    .is_ok(),
            );
        }
        // What RabbitMQ 3.10 does with the same publishes: drop-head keeps
        // at most 10 bytes; reject-publish refuses a message that would go
        // past them.
        let (accepted, kept): (&[bool], &[&str]) = if q == "drop" {
            (&[true; 5], &["1234", "1", ""])
        } else {
            (
                &[true, false, true, true, true],
                &["12345", "1234", "1", ""],
            )
        };
        assert_eq!(results, accepted, "{q}");
        assert_eq!(b.queue_depth(q), Some(kept.len()));
        let mut c = consume(&conn, q, 0).await;
        for expected in kept {
            assert_eq!(body(&next(&mut c).await), *expected, "{q}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn reject_publish_nacks_and_dlx_variant_dead_letters() {
    let (b, conn) = setup();
    dead_letter_sink(&conn).await;
    for (q, overflow) in [
        ("rp", Overflow::RejectPublish),
        ("rpd", Overflow::RejectPublishDlx),
    ] {
        queue_with(
            &conn,
            q,
            with_args(dlx_args("dlx").max_length(1).overflow(overflow)),
        )
        .await;
        send(&conn, q, "kept").await;
        let e = conn
            .publish("", q, Message::new("refused"), PublishOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Nacked(_)), "{e}");
        assert!(e.is_temporary());
        assert_eq!(b.queue_depth(q), Some(1));
    }
    assert_eq!(b.queue_depth("dead"), Some(1));
    let mut dead = consume(&conn, "dead", 1).await;
    let d = next(&mut dead).await;
    assert_eq!(body(&d), "refused");
    assert_eq!(death(&d, 0)["queue"], FieldValue::from("rpd"));
    assert_eq!(death(&d, 0)["reason"], FieldValue::from("maxlen"));
}

#[tokio::test(start_paused = true)]
async fn expiry_cycles_are_dropped() {
    let (b, conn) = setup();
    // Expired messages dead-letter back to their own queue: a cycle with no
    // rejection, which RabbitMQ drops after one round.
    queue_with(
        &conn,
        "loop",
        with_args(
            QueueArguments::default()
                .message_ttl(Duration::from_millis(10))
                .dead_letter_to(String::new()),
        ),
    )
    .await;
    send(&conn, "loop", "x").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.queue_depth("loop"), Some(0));
}

#[tokio::test(start_paused = true)]
async fn missing_dead_letter_exchange_drops() {
    let (b, conn) = setup();
    queue_with(&conn, "q", with_args(dlx_args("nowhere"))).await;
    send(&conn, "q", "x").await;
    let mut c = consume(&conn, "q", 1).await;
    next(&mut c).await.reject(Requeue::No).await.unwrap();
    assert_eq!(
        (b.queue_depth("q"), b.unacked_count("q")),
        (Some(0), Some(0))
    );
}

/// A quorum queue with `x-delivery-limit` 1 dead-lettering to `dlx`.
fn quorum_limit_one() -> QueueOptions {
    QueueOptions::durable()
        .queue_type(QueueType::Quorum)
        .delivery_limit(1)
        .dead_letter_to("dlx")
}

fn delivery_count(d: &bus_core::Delivery) -> Option<&FieldValue> {
    d.message.properties.headers.get("x-delivery-count")
}

#[tokio::test(start_paused = true)]
async fn a_multiple_nack_counts_one_return_for_each_message() {
    let (_b, conn) = setup();
    dead_letter_sink(&conn).await;
    queue_with(&conn, "q", quorum_limit_one()).await;
    send(&conn, "q", "a").await;
    send(&conn, "q", "b").await;
    let mut c = consume(&conn, "q", 2).await;
    for round in 0..2 {
        let a = next(&mut c).await;
        let b = next(&mut c).await;
        let want = (round > 0).then_some(FieldValue::I64(1));
        assert_eq!(
            [
                (body(&a), delivery_count(&a)),
                (body(&b), delivery_count(&b))
            ],
            [("a".into(), want.as_ref()), ("b".into(), want.as_ref())],
            "round {round}"
        );
        b.nack_multiple(Requeue::Yes).await.unwrap();
    }
    nothing(&mut c).await;
    let mut dead = consume(&conn, "dead", 2).await;
    for want in ["a", "b"] {
        let d = next(&mut dead).await;
        assert_eq!(body(&d), want);
        assert_eq!(death(&d, 0)["reason"], FieldValue::from("delivery_limit"));
        assert_eq!(delivery_count(&d), None);
    }
}

#[tokio::test(start_paused = true)]
async fn an_auto_ack_consumer_sees_the_count_of_a_returned_message() {
    let (_b, conn) = setup();
    queue_with(
        &conn,
        "q",
        QueueOptions::durable().queue_type(QueueType::Quorum),
    )
    .await;
    send(&conn, "q", "m").await;
    let mut c = consume(&conn, "q", 1).await;
    let d = next(&mut c).await;
    assert_eq!(delivery_count(&d), None, "a first delivery has no count");
    c.cancel().await.unwrap();
    d.nack(Requeue::Yes).await.unwrap();
    let mut auto = conn
        .consume("q", bus_core::ConsumeOptions::auto_ack())
        .await
        .unwrap();
    let d = next(&mut auto).await;
    assert!(d.redelivered);
    assert_eq!(
        delivery_count(&d),
        Some(&FieldValue::I64(1)),
        "counted without a limit"
    );
}
