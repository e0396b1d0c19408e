//! Limits the connection enforces itself, on the shared RabbitMQ with
//! fresh names: the largest message size, checked before sending, and
//! the channels kept for publishing when consumers take the rest.

mod support;

use bus_amqp::{AmqpConnection, AmqpOptions};
use bus_core::{Connection, ConnectionExt, ConsumeOptions, Error, Message, QueueOptions, Requeue};
use support::*;

#[tokio::test]
async fn a_message_over_the_configured_size_is_refused_before_sending() {
    let conn = connect_with(AmqpOptions::default().with_max_message_size(64 << 10)).await;
    let q = fresh("size");
    let _cleanup = QueueCleanup::new(&[&q]);
    conn.declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    let e = conn
        .send_to_queue(&q, Message::new(vec![0u8; (64 << 10) + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::PreconditionFailed(m) if m.contains("65537") && m.contains("not sent")),
        "{e:?}"
    );
    assert!(!e.is_temporary());
    conn.send_to_queue(&q, Message::new(vec![0u8; 64 << 10]))
        .await
        .unwrap();
    assert_eq!(conn.inspect_queue(&q).await.unwrap().message_count, 1);
    delete_queue(&*conn, &q).await;
    conn.close().await.unwrap();
}

#[tokio::test]
async fn consumers_never_take_the_channels_publishing_needs() {
    // Ten channels: channel 0, publishing, topology and a spare are kept.
    let url = format!("{}?channel_max=10", amqp_addr());
    let conn = AmqpConnection::connect(&url).await.expect("connect");
    let q = fresh("channels");
    let _cleanup = QueueCleanup::new(&[&q]);
    conn.declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    let mut consumers = Vec::new();
    let refused = loop {
        match conn.consume(&q, ConsumeOptions::prefetch(1)).await {
            Ok(c) => consumers.push(c),
            Err(e) => break e,
        }
        assert!(consumers.len() <= 10, "more consumers than channels");
    };
    assert_eq!(consumers.len(), 6, "all channels but the kept ones");
    assert!(
        refused.to_string().contains("channel_max"),
        "the refusal says why: {refused}"
    );
    // Publishing and topology still work, on their kept channels.
    for i in 0..10 {
        conn.send_to_queue(&q, Message::new(i.to_string()))
            .await
            .unwrap();
    }
    conn.inspect_queue(&q).await.unwrap();
    // A dropped consumer frees its channel for another.
    consumers.pop();
    within(10, "a consumer after one was dropped", async {
        loop {
            match conn.consume(&q, ConsumeOptions::prefetch(1)).await {
                Ok(c) => return consumers.push(c),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    drop(consumers);
    conn.close().await.unwrap();

    // Consumers started all at once on a fresh connection get exactly the
    // six channels: the room check and the count are one step, so none
    // races past it.
    let conn = AmqpConnection::connect(&url).await.expect("connect");
    let all =
        futures::future::join_all((0..20).map(|_| conn.consume(&q, ConsumeOptions::prefetch(1))))
            .await;
    let mut consumers = Vec::new();
    for r in all {
        match r {
            Ok(c) => consumers.push(c),
            Err(e) => assert!(e.to_string().contains("channel_max"), "{e}"),
        }
    }
    assert_eq!(consumers.len(), 6, "concurrent consumers given channels");
    for i in 0..3 {
        conn.send_to_queue(&q, Message::new(i.to_string()))
            .await
            .unwrap();
    }
    drop(consumers);
    delete_queue(&conn, &q).await;
    conn.close().await.unwrap();
}

#[tokio::test]
async fn the_delivery_limit_ends_a_poison_loop_and_a_string_limit_is_refused() {
    use bus_core::QueueType;
    let conn = connect().await;
    let q = fresh("poison");
    let dlq = fresh("poison-dlq");
    let _cleanup = QueueCleanup::new(&[&q, &dlq]);
    // A string limit would mean nothing to RabbitMQ 3.x: refused.
    let e = conn
        .declare_queue(
            &q,
            QueueOptions::durable()
                .queue_type(QueueType::Quorum)
                .argument("x-delivery-limit", "3"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::PreconditionFailed(m) if m.contains("x-delivery-limit")),
        "{e:?}"
    );

    conn.declare_queue(&dlq, QueueOptions::durable())
        .await
        .unwrap();
    conn.declare_queue(
        &q,
        QueueOptions::durable()
            .queue_type(QueueType::Quorum)
            .delivery_limit(2)
            .dead_letter_to(String::new())
            .dead_letter_routing_key(dlq.clone()),
    )
    .await
    .unwrap();
    conn.send_to_queue(&q, Message::new("poison").persistent())
        .await
        .unwrap();
    let mut consumer = conn.consume(&q, ConsumeOptions::prefetch(1)).await.unwrap();
    // Rejected with requeue (one message: basic.reject) every time: after
    // the limit the broker dead-letters it instead.
    let mut deliveries = 0;
    let mut dead = conn
        .consume(&dlq, ConsumeOptions::prefetch(1))
        .await
        .unwrap();
    let dead_letter = loop {
        tokio::select! {
            d = next_delivery(&mut consumer, 10, "the poison message") => {
                deliveries += 1;
                assert!(deliveries <= 3, "delivered {deliveries} times despite the limit of 2");
                d.nack(Requeue::Yes).await.unwrap();
            }
            d = next_delivery(&mut dead, 10, "the dead letter") => break d,
        }
    };
    assert_eq!(&dead_letter.message.body[..], b"poison");
    dead_letter.ack().await.unwrap();
    assert_eq!(deliveries, 3, "the first delivery and two redeliveries");
    drop(consumer);
    drop(dead);
    delete_queue(&*conn, &q).await;
    delete_queue(&*conn, &dlq).await;
    conn.close().await.unwrap();
}
