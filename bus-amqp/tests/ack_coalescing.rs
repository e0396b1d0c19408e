//! Coalesced acks (`AmqpOptions::ack_coalescing`) on the shared RabbitMQ
//! with fresh names: only handled messages leave the queue, whatever the
//! order of the acks, and waiting acks are flushed by the timer, on
//! cancel and on close.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bus_amqp::{AmqpConnection, AmqpOptions};
use bus_core::{
    Connection, ConnectionExt, ConsumeOptions, Consumer, Delivery, Message, QueueOptions, Requeue,
};
use support::*;

/// Never reached by a test: only the flushes under test send acks.
const NEVER: Duration = Duration::from_secs(3600);

async fn coalescing(
    name: &str,
    max_acks: u16,
    max_delay: Duration,
) -> std::sync::Arc<AmqpConnection> {
    connect_with(
        AmqpOptions::default()
            .with_connection_name(name)
            .with_ack_coalescing(max_acks, max_delay),
    )
    .await
}

/// A fresh durable queue holding the messages `1..=n`.
async fn filled(conn: &dyn Connection, prefix: &str, n: u32) -> String {
    let q = fresh(prefix);
    conn.declare_queue(&q, QueueOptions::durable())
        .await
        .unwrap();
    for i in 1..=n {
        conn.send_to_queue(&q, Message::new(i.to_string()))
            .await
            .unwrap();
    }
    q
}

/// Receives `n` deliveries, numbered as their bodies, in order.
async fn receive(consumer: &mut Consumer, n: u32) -> Vec<Delivery> {
    let mut out = Vec::new();
    for i in 1..=n {
        let d = next_delivery(consumer, 10, "a delivery").await;
        assert_eq!(number(&d.message), i);
        out.push(d);
    }
    out
}

/// Once the consuming connection is gone (the queue has no consumer left,
/// which RabbitMQ records in the same step as it requeues what the
/// consumer held unacked): the messages back in the queue, by number.
async fn requeued_after_close(other: &dyn Connection, q: &str) -> BTreeSet<u32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        let info = other.inspect_queue(q).await.unwrap();
        if info.consumer_count == 0 {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer of {q} never went away"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut consumer = other
        .consume(q, ConsumeOptions::prefetch(100))
        .await
        .unwrap();
    let mut back = BTreeSet::new();
    for _ in 0..info.message_count {
        let d = next_delivery(&mut consumer, 10, "a requeued message").await;
        assert!(d.redelivered, "a message back in the queue is a redelivery");
        back.insert(number(&d.message));
        d.ack().await.unwrap();
    }
    consumer.cancel().await.unwrap();
    back
}

/// The queue's unacked count, as `rabbitmqctl` reports it.
fn unacked(q: &str) -> u64 {
    let out = rabbitmqctl(&[
        "list_queues",
        "-p",
        &vhost(),
        "-q",
        "--no-table-headers",
        "name",
        "messages_unacknowledged",
    ]);
    out.lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(name, _)| *name == q)
        .map(|(_, n)| n.trim().parse().expect("a count"))
        .unwrap_or_else(|| panic!("queue {q} not listed: {out}"))
}

#[tokio::test]
async fn coalesced_acks_remove_exactly_the_handled_messages_and_flush_on_close() {
    let name = fresh("coalesce-exact");
    let conn = coalescing(&name, 100, NEVER).await;
    let other = connect().await;
    let q = filled(&*other, "coalesce-exact", 10).await;
    let _cleanup = QueueCleanup::new(&[&q]);
    let mut consumer = conn
        .consume(&q, ConsumeOptions::prefetch(20))
        .await
        .unwrap();
    let d = receive(&mut consumer, 10).await;
    // 1-4 acked, 5 unhandled, 6-8 acked out of order, 9 dead (nacked
    // without requeue, the queue has no dead-letter exchange), 10 unhandled.
    for i in [1, 2, 3, 4, 8, 6, 7] {
        d[i - 1].ack().await.unwrap();
    }
    d[8].nack(Requeue::No).await.unwrap();
    // Nothing reaches the broker before the close but the nack.
    conn.close().await.unwrap();
    assert_eq!(
        requeued_after_close(&*other, &q).await,
        BTreeSet::from([5, 10]),
        "exactly the unhandled messages are back"
    );
    delete_queue(&*other, &q).await;
}

#[tokio::test]
async fn out_of_order_acks_filling_batches_never_ack_an_unhandled_message() {
    let name = fresh("coalesce-order");
    // Batches of 2: every second ack flushes, over gaps.
    let conn = coalescing(&name, 2, NEVER).await;
    let other = connect().await;
    let q = filled(&*other, "coalesce-order", 8).await;
    let _cleanup = QueueCleanup::new(&[&q]);
    let mut consumer = conn
        .consume(&q, ConsumeOptions::prefetch(20))
        .await
        .unwrap();
    let d = receive(&mut consumer, 8).await;
    // 1 and 4 are never handled; 6 is nacked back into the queue between
    // acks, and comes back as a new delivery.
    for i in [3, 2, 5] {
        d[i - 1].ack().await.unwrap();
    }
    d[5].nack(Requeue::Yes).await.unwrap();
    let again = next_delivery(&mut consumer, 10, "the requeued 6").await;
    assert_eq!(number(&again.message), 6);
    assert!(again.redelivered);
    d[7].ack().await.unwrap();
    // Its own flush (2 waiting) sends it; 7 is still unhandled.
    d[6].ack().await.unwrap();
    drop(again);
    conn.close().await.unwrap();
    assert_eq!(
        requeued_after_close(&*other, &q).await,
        BTreeSet::from([1, 4, 6]),
        "exactly the unhandled messages are back"
    );
    delete_queue(&*other, &q).await;
}

#[tokio::test]
async fn waiting_acks_are_flushed_on_cancel() {
    let name = fresh("coalesce-cancel");
    let conn = coalescing(&name, 100, NEVER).await;
    let other = connect().await;
    let q = filled(&*other, "coalesce-cancel", 5).await;
    let _cleanup = QueueCleanup::new(&[&q]);
    let mut consumer = conn
        .consume(&q, ConsumeOptions::prefetch(20))
        .await
        .unwrap();
    let d = receive(&mut consumer, 5).await;
    for i in [1, 2, 4, 5] {
        d[i - 1].ack().await.unwrap();
    }
    assert_eq!(unacked(&q), 5, "the acks wait in the batch");
    consumer.cancel().await.unwrap();
    // The channel stays open (3 is still held): only the flush can bring
    // the broker's unacked count down to 1.
    let deadline = Instant::now() + Duration::from_secs(20);
    while unacked(&q) != 1 {
        assert!(
            Instant::now() < deadline,
            "the acks were not flushed on cancel"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // After the cancel an ack goes out at once.
    d[2].ack().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while unacked(&q) != 0 {
        assert!(
            Instant::now() < deadline,
            "an ack after the cancel was not sent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(consumer);
    conn.close().await.unwrap();
    assert_eq!(other.inspect_queue(&q).await.unwrap().message_count, 0);
    delete_queue(&*other, &q).await;
}

#[tokio::test]
async fn waiting_acks_are_flushed_by_the_timer() {
    let name = fresh("coalesce-timer");
    let conn = coalescing(&name, 100, Duration::from_millis(200)).await;
    let other = connect().await;
    let q = filled(&*other, "coalesce-timer", 6).await;
    let _cleanup = QueueCleanup::new(&[&q]);
    // A prefetch of 3: the 4th message comes only once the broker has the
    // acks of earlier ones, which nothing but the timer sends.
    let mut consumer = conn.consume(&q, ConsumeOptions::prefetch(3)).await.unwrap();
    let d = receive(&mut consumer, 3).await;
    for x in &d {
        x.ack().await.unwrap();
    }
    let started = Instant::now();
    let fourth = next_delivery(&mut consumer, 10, "a delivery after the timer's flush").await;
    assert_eq!(number(&fourth.message), 4);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "the acks went out before the delay: {:?}",
        started.elapsed()
    );
    drop(fourth);
    drop(consumer);
    conn.close().await.unwrap();
    // 4 was never acked; 5 and 6 were never delivered.
    assert_eq!(
        requeued_after_close(&*other, &q).await,
        BTreeSet::from([4, 5, 6])
    );
    delete_queue(&*other, &q).await;
}

#[tokio::test]
async fn acks_queued_before_a_drop_are_sent() {
    let name = fresh("coalesce-drop");
    let conn = coalescing(&name, 100, NEVER).await;
    let other = connect().await;
    let q = filled(&*other, "coalesce-drop", 4).await;
    let _cleanup = QueueCleanup::new(&[&q]);
    let mut consumer = conn
        .consume(&q, ConsumeOptions::prefetch(20))
        .await
        .unwrap();
    let d = receive(&mut consumer, 4).await;
    for i in [1, 2, 4] {
        d[i - 1].ack().await.unwrap();
    }
    drop(consumer);
    // The channel closes once the waiting acks are sent: 3 alone comes
    // back; the connection stays open.
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        let info = other.inspect_queue(&q).await.unwrap();
        if info.consumer_count == 0 && info.message_count > 0 {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped consumer's channel never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(info.message_count, 1, "only the unhandled message is back");
    assert!(
        d[2].ack().await.is_err(),
        "a dropped consumer's delivery cannot be settled"
    );
    conn.close().await.unwrap();
    assert_eq!(requeued_after_close(&*other, &q).await, BTreeSet::from([3]));
    delete_queue(&*other, &q).await;
}
