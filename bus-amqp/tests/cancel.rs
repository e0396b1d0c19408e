//! Consumers the broker cancels (`basic.cancel` from the server), on the
//! shared RabbitMQ with fresh names: a queue deleted under its consumer by
//! another client.

mod support;

use bus_amqp::{AmqpOptions, RecoveryEvent};
use bus_core::{Connection, ConnectionExt, ConsumeOptions, Error, Message, QueueOptions};
use futures::StreamExt;
use support::*;

#[tokio::test]
async fn a_queue_deleted_under_its_consumer_ends_the_stream_with_why_and_is_not_recreated() {
    let name = fresh("cancelled");
    let conn = connect_with(AmqpOptions::default().with_connection_name(&name)).await;
    let other = connect().await;
    let mut events = conn.events();
    let q = fresh("deleted");
    let _cleanup = QueueCleanup::new(&[&q]);
    conn.declare_queue(&q, QueueOptions::durable())
        .await
        .unwrap();
    conn.send_to_queue(&q, Message::new("1")).await.unwrap();
    let mut consumer = conn
        .consume(&q, ConsumeOptions::prefetch(10))
        .await
        .unwrap();
    let held = next_delivery(&mut consumer, 10, "the message").await;

    // Someone else deletes the queue.
    delete_queue(&*other, &q).await;

    let item = within(10, "the stream's error", consumer.next())
        .await
        .expect("an error item before the end");
    match item {
        Err(Error::Closed(m)) => assert!(m.contains("deleted"), "{m}"),
        other => panic!("the cancelled consumer yielded {other:?}"),
    }
    assert!(
        within(10, "the end of the stream", consumer.next())
            .await
            .is_none(),
        "the stream ends after the error"
    );
    let event = wait_event(&mut events, "ConsumerCancelled", |e| {
        matches!(e, RecoveryEvent::ConsumerCancelled { .. })
    })
    .await;
    match event {
        RecoveryEvent::ConsumerCancelled {
            queue,
            reason,
            consumer_tag,
        } => {
            assert_eq!(queue, q);
            assert_eq!(consumer_tag, consumer.tag());
            assert!(reason.contains("deleted"), "{reason}");
        }
        _ => unreachable!(),
    }
    // Its delivery can no longer be settled, and says so.
    let e = held.ack().await.unwrap_err();
    assert!(
        matches!(&e, Error::Closed(m) if m.contains("deleted")),
        "ack after the queue was deleted gave {e:?}"
    );

    // A recovery does not declare the deleted queue again.
    close_connection(&name);
    wait_reconnected(&mut events).await;
    let e = other.inspect_queue(&q).await.unwrap_err();
    assert!(
        matches!(e, Error::NotFound(_)),
        "the deleted queue came back: {e:?}"
    );
    drop(consumer);
    conn.close().await.unwrap();
}

/// Queues this connection deletes under their consumers, one after another
/// (per-request queues, say), end their consumers' streams quietly, with
/// no `ConsumerCancelled`; a queue declared again after such a deletion and
/// then deleted by another client is news again.
#[tokio::test]
async fn queues_deleted_here_end_their_consumers_quietly_and_a_later_deletion_by_another_is_news() {
    let conn = connect().await;
    let other = connect().await;
    let mut events = conn.events();
    for _ in 0..20 {
        let q = fresh("deleted-here");
        let _cleanup = QueueCleanup::new(&[&q]);
        conn.declare_queue(&q, QueueOptions::default())
            .await
            .unwrap();
        let mut consumer = conn.consume(&q, ConsumeOptions::auto_ack()).await.unwrap();
        delete_queue(&*conn, &q).await;
        assert!(
            within(10, "the end of the stream", consumer.next())
                .await
                .is_none(),
            "the consumer of a queue deleted here just ends"
        );
    }

    let q = fresh("redeclared");
    let _cleanup = QueueCleanup::new(&[&q]);
    conn.declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    let mut first = conn.consume(&q, ConsumeOptions::auto_ack()).await.unwrap();
    delete_queue(&*conn, &q).await;
    assert!(
        within(10, "the end of the first stream", first.next())
            .await
            .is_none(),
        "the consumer of a queue deleted here just ends"
    );
    conn.declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    let mut second = conn.consume(&q, ConsumeOptions::auto_ack()).await.unwrap();
    delete_queue(&*other, &q).await;
    match within(10, "the second stream's error", second.next()).await {
        Some(Err(Error::Closed(m))) => assert!(m.contains("deleted"), "{m}"),
        other => panic!("the consumer of a queue deleted by another yielded {other:?}"),
    }
    // The first cancellation reported is the one another client caused.
    match wait_event(&mut events, "ConsumerCancelled", |e| {
        matches!(e, RecoveryEvent::ConsumerCancelled { .. })
    })
    .await
    {
        RecoveryEvent::ConsumerCancelled { queue, .. } => assert_eq!(queue, q),
        _ => unreachable!(),
    }
    drop((first, second));
    conn.close().await.unwrap();
}
