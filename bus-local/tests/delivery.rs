//! Delivery: order, competing consumers, prefetch, settling, consumer loss.

mod common;

use bus_core::{
    Connection, ConsumeOptions, DeleteQueueOptions, Error, FieldTable, FieldValue, Message,
    PublishOptions, QueueOptions, Requeue,
};
use common::*;

#[tokio::test(start_paused = true)]
async fn round_robin_among_consumers_with_capacity() {
    let (b, conn) = setup();
    queue(&conn, "q").await;
    let mut a = consume(&conn, "q", 1).await;
    let mut c = consume(&conn, "q", 1).await;
    for i in 1..=4 {
        send(&conn, "q", &i.to_string()).await;
    }
    // Each holds one; two wait in the queue (bounded by prefetch).
    assert_eq!(b.queue_depth("q"), Some(2));
    assert_eq!(b.unacked_count("q"), Some(2));
    let (d1, d2) = (next(&mut a).await, next(&mut c).await);
    assert_eq!((body(&d1).as_str(), body(&d2).as_str()), ("1", "2"));
    nothing(&mut a).await;
    // The consumer that frees capacity first gets the next message.
    d2.ack().await.unwrap();
    assert_eq!(body(&next(&mut c).await), "3");
    d1.ack().await.unwrap();
    assert_eq!(body(&next(&mut a).await), "4");
}

#[tokio::test(start_paused = true)]
async fn prefetch_zero_and_auto_ack_take_everything() {
    let (b, conn) = setup();
    queue(&conn, "q").await;
    for i in 0..10 {
        send(&conn, "q", &i.to_string()).await;
    }
    let mut c = consume(&conn, "q", 0).await;
    for i in 0..10 {
        assert_eq!(body(&next(&mut c).await), i.to_string());
    }
    assert_eq!(b.unacked_count("q"), Some(10));
    drop(c);
    assert_eq!(b.queue_depth("q"), Some(10));
    let mut c = conn.consume("q", ConsumeOptions::auto_ack()).await.unwrap();
    for i in 0..10 {
        let d = next(&mut c).await;
        assert!(d.redelivered);
        assert_eq!(body(&d), i.to_string());
        assert!(d.is_settled());
    }
    assert_eq!(
        (b.queue_depth("q"), b.unacked_count("q")),
        (Some(0), Some(0))
    );
}

#[tokio::test(start_paused = true)]
async fn requeue_restores_the_original_position() {
    let (b, conn) = setup();
    queue(&conn, "q").await;
    for i in 1..=5 {
        send(&conn, "q", &i.to_string()).await;
    }
    let mut c = consume(&conn, "q", 3).await;
    let d: Vec<_> = [next(&mut c).await, next(&mut c).await, next(&mut c).await].into();
    // Consumer loss requeues all three in place.
    drop(d);
    drop(c);
    assert_eq!(b.queue_depth("q"), Some(5));
    let mut c = consume(&conn, "q", 3).await;
    let d: Vec<_> = vec![next(&mut c).await, next(&mut c).await, next(&mut c).await];
    // Requeue out of order (with the consumer cancelled, so nothing is
    // redelivered in between): the queue still gives 1, 2, 3, 4, 5.
    c.cancel().await.unwrap();
    d[1].nack(Requeue::Yes).await.unwrap();
    d[0].nack(Requeue::Yes).await.unwrap();
    d[2].reject(Requeue::Yes).await.unwrap();
    let mut c = consume(&conn, "q", 3).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let x = next(&mut c).await;
        seen.push((body(&x), x.redelivered));
        x.ack().await.unwrap();
    }
    let expect: Vec<_> = [
        ("1", true),
        ("2", true),
        ("3", true),
        ("4", false),
        ("5", false),
    ]
    .iter()
    .map(|(b, r)| (b.to_string(), *r))
    .collect();
    assert_eq!(seen, expect);
}

#[tokio::test(start_paused = true)]
async fn multiple_settles_everything_up_to_the_tag() {
    let (b, conn) = setup();
    queue(&conn, "q").await;
    for i in 1..=4 {
        send(&conn, "q", &i.to_string()).await;
    }
    let mut c = consume(&conn, "q", 0).await;
    let d: Vec<_> = vec![
        next(&mut c).await,
        next(&mut c).await,
        next(&mut c).await,
        next(&mut c).await,
    ];
    d[2].ack_multiple().await.unwrap();
    assert_eq!(b.unacked_count("q"), Some(1));
    // Already settled by the multiple ack: unknown to the broker now.
    assert!(matches!(
        d[0].ack().await,
        Err(Error::PreconditionFailed(_))
    ));
    assert!(matches!(
        d[2].ack().await,
        Err(Error::PreconditionFailed(_))
    ));
    d[3].nack_multiple(Requeue::Yes).await.unwrap();
    assert_eq!(b.queue_depth("q"), Some(0), "redelivered at once");
    let again = next(&mut c).await;
    assert_eq!((body(&again).as_str(), again.redelivered), ("4", true));
}

#[tokio::test(start_paused = true)]
async fn reject_without_requeue_drops() {
    let (b, conn) = setup();
    queue(&conn, "q").await;
    send(&conn, "q", "x").await;
    let mut c = consume(&conn, "q", 1).await;
    next(&mut c).await.reject(Requeue::No).await.unwrap();
    assert_eq!(
        (b.queue_depth("q"), b.unacked_count("q")),
        (Some(0), Some(0))
    );
}

#[tokio::test(start_paused = true)]
async fn auto_ack_deliveries_cannot_be_nacked() {
    let (_b, conn) = setup();
    queue(&conn, "q").await;
    send(&conn, "q", "x").await;
    let mut c = conn.consume("q", ConsumeOptions::auto_ack()).await.unwrap();
    let d = next(&mut c).await;
    d.ack().await.unwrap();
    assert!(matches!(
        d.nack(Requeue::Yes).await,
        Err(Error::PreconditionFailed(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn cancel_stops_new_deliveries_and_keeps_settling() {
    let (b, conn) = setup();
    queue(&conn, "q").await;
    for i in 1..=3 {
        send(&conn, "q", &i.to_string()).await;
    }
    let mut c = consume(&conn, "q", 2).await;
    let first = next(&mut c).await;
    c.cancel().await.unwrap();
    // The second was handed over before the cancel: still readable.
    let second = next(&mut c).await;
    ended(&mut c).await;
    assert_eq!(conn.inspect_queue_count("q").await, (1, 0));
    first.ack().await.unwrap();
    second.nack(Requeue::Yes).await.unwrap();
    assert_eq!(b.queue_depth("q"), Some(2));
    // Dropping the cancelled consumer changes nothing more.
    drop(c);
    assert_eq!(
        (b.queue_depth("q"), b.unacked_count("q")),
        (Some(2), Some(0))
    );
}

trait CountExt {
    async fn inspect_queue_count(&self, q: &str) -> (u32, u32);
}

impl CountExt for bus_local::LocalConnection {
    async fn inspect_queue_count(&self, q: &str) -> (u32, u32) {
        let info = self
            .declare_queue(q, QueueOptions::passive())
            .await
            .unwrap();
        (info.message_count, info.consumer_count)
    }
}

#[tokio::test(start_paused = true)]
async fn consumer_loss_requeues_with_redelivered() {
    let (b, owner) = setup();
    let worker = b.connect();
    queue(&owner, "q").await;
    send(&owner, "q", "job").await;
    let mut c = consume(&worker, "q", 1).await;
    let d = next(&mut c).await;
    assert!(!d.redelivered);
    let mut other = consume(&owner, "q", 1).await;
    worker.close().await.unwrap();
    // The stream ends, the settle handle reports the loss.
    ended(&mut c).await;
    assert!(matches!(d.ack().await, Err(Error::Closed(_))));
    let again = next(&mut other).await;
    assert_eq!((body(&again).as_str(), again.redelivered), ("job", true));
    assert!(matches!(
        worker.consume("q", ConsumeOptions::default()).await,
        Err(Error::Closed(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn unread_deliveries_of_a_closed_connection_are_not_handed_out() {
    let (b, owner) = setup();
    let worker = b.connect();
    queue(&owner, "q").await;
    send(&owner, "q", "1").await;
    send(&owner, "q", "2").await;
    let mut c = consume(&worker, "q", 0).await;
    drop(worker);
    ended(&mut c).await;
    assert_eq!(b.queue_depth("q"), Some(2));
}

#[tokio::test(start_paused = true)]
async fn deleting_a_queue_ends_its_consumers() {
    let (_b, conn) = setup();
    queue(&conn, "q").await;
    send(&conn, "q", "1").await;
    let mut c = consume(&conn, "q", 1).await;
    let d = next(&mut c).await;
    conn.delete_queue("q", DeleteQueueOptions::default())
        .await
        .unwrap();
    ended(&mut c).await;
    // The message went with the queue; settling it is harmless.
    d.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn auto_delete_queue_goes_with_its_last_consumer() {
    let (b, conn) = setup();
    queue_with(&conn, "ad", QueueOptions::default().with_auto_delete(true)).await;
    // Never consumed: stays.
    send(&conn, "ad", "x").await;
    assert_eq!(b.queue_depth("ad"), Some(1));
    let c1 = consume(&conn, "ad", 1).await;
    let c2 = consume(&conn, "ad", 1).await;
    drop(c1);
    assert!(b.queue_depth("ad").is_some());
    c2.cancel().await.unwrap();
    assert_eq!(b.queue_depth("ad"), None);
}

#[tokio::test(start_paused = true)]
async fn exclusive_consumers_refuse_company() {
    let (_b, conn) = setup();
    queue(&conn, "q").await;
    let exclusive = ConsumeOptions::default().with_exclusive(true);
    let c = conn.consume("q", exclusive.clone()).await.unwrap();
    for options in [ConsumeOptions::default(), exclusive.clone()] {
        let e = conn.consume("q", options).await.unwrap_err();
        assert!(matches!(e, Error::AccessRefused(_)), "{e}");
    }
    drop(c);
    let _plain = conn.consume("q", ConsumeOptions::default()).await.unwrap();
    assert!(matches!(
        conn.consume("q", exclusive).await,
        Err(Error::AccessRefused(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn consumer_priorities_prefer_the_higher() {
    let (_b, conn) = setup();
    queue(&conn, "q").await;
    let with_priority = |p: i32| {
        ConsumeOptions::prefetch(1)
            .with_arguments([("x-priority".to_string(), FieldValue::I32(p))].into())
    };
    let mut low = conn.consume("q", with_priority(1)).await.unwrap();
    let mut high = conn.consume("q", with_priority(5)).await.unwrap();
    send(&conn, "q", "1").await;
    send(&conn, "q", "2").await;
    assert_eq!(body(&next(&mut high).await), "1");
    // The high one is full: the low one gets the next.
    assert_eq!(body(&next(&mut low).await), "2");
}

#[tokio::test(start_paused = true)]
async fn priority_queue_delivers_higher_first_fifo_within() {
    let (_b, conn) = setup();
    queue_with(&conn, "p", QueueOptions::default().max_priority(5)).await;
    for (body, p) in [
        ("a", None),
        ("b", Some(3)),
        ("c", Some(9)),
        ("d", Some(3)),
        ("e", Some(5)),
    ] {
        let mut m = Message::new(body);
        m.properties.priority = p;
        conn.publish("", "p", m, PublishOptions::default())
            .await
            .unwrap();
    }
    let mut c = consume(&conn, "p", 0).await;
    let mut got = String::new();
    for _ in 0..5 {
        got += &body(&next(&mut c).await);
    }
    // 9 counts as the maximum, 5: "c" and "e" share that level in publish
    // order.
    assert_eq!(got, "cebda");
}

#[tokio::test(start_paused = true)]
async fn single_active_consumer_hands_over_in_order() {
    let (_b, conn) = setup();
    queue_with(
        &conn,
        "sac",
        QueueOptions::default().single_active_consumer(true),
    )
    .await;
    let mut first = consume(&conn, "sac", 1).await;
    let mut second = consume(&conn, "sac", 1).await;
    let mut third = consume(&conn, "sac", 1).await;
    for i in 1..=3 {
        send(&conn, "sac", &i.to_string()).await;
    }
    let d = next(&mut first).await;
    nothing(&mut second).await;
    d.ack().await.unwrap();
    assert_eq!(body(&next(&mut first).await), "2");
    drop(first);
    // "2" was unacked: requeued, and the second consumer takes over.
    let d = next(&mut second).await;
    assert_eq!((body(&d).as_str(), d.redelivered), ("2", true));
    nothing(&mut third).await;
}

#[tokio::test(start_paused = true)]
async fn delivery_tags_count_per_consumer() {
    let (_b, conn) = setup();
    queue(&conn, "q").await;
    send(&conn, "q", "1").await;
    send(&conn, "q", "2").await;
    let mut a = consume(&conn, "q", 1).await;
    let mut b = consume(&conn, "q", 1).await;
    assert_eq!(next(&mut a).await.delivery_tag, 1);
    assert_eq!(next(&mut b).await.delivery_tag, 1);
}

#[tokio::test(start_paused = true)]
async fn deliveries_carry_exchange_and_key() {
    let (_b, conn) = setup();
    queue(&conn, "q").await;
    bind(&conn, "q", "amq.topic", "a.*").await;
    conn.publish(
        "amq.topic",
        "a.b",
        Message::new("m"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let mut c = consume(&conn, "q", 1).await;
    let d = next(&mut c).await;
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str()),
        ("amq.topic", "a.b")
    );
    assert!(!d.redelivered);
    let _ = FieldTable::new();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_and_consumers_lose_nothing() {
    use futures::StreamExt;
    use std::collections::BTreeSet;

    let (b, conn) = setup();
    for q in ["x", "y"] {
        queue(&conn, q).await;
        bind(&conn, q, "amq.fanout", "").await;
    }
    const PER_PUBLISHER: usize = 500;
    let mut consumers = Vec::new();
    for (q, prefetch) in [("x", 1), ("x", 7), ("x", 0), ("y", 3), ("y", 3)] {
        let conn = b.connect();
        let mut c = consume(&conn, q, prefetch).await;
        consumers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(Ok(d)) = c.next().await {
                seen.push((q, body(&d)));
                // Some requeues to stir the queues.
                if seen.len() % 11 == 0 && !d.redelivered {
                    d.nack(Requeue::Yes).await.unwrap();
                    seen.pop();
                } else {
                    d.ack().await.unwrap();
                }
            }
            drop(conn);
            seen
        }));
    }
    let mut publishers = Vec::new();
    for p in 0..4 {
        let conn = b.connect();
        publishers.push(tokio::spawn(async move {
            for i in 0..PER_PUBLISHER {
                conn.publish(
                    "amq.fanout",
                    "",
                    Message::new(format!("{p}-{i}")),
                    PublishOptions::default(),
                )
                .await
                .unwrap();
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    // Wait (bounded) until both queues are drained and settled.
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let busy = ["x", "y"]
                .iter()
                .any(|q| b.queue_depth(q) != Some(0) || b.unacked_count(q) != Some(0));
            if !busy {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("queues drain");
    for q in ["x", "y"] {
        conn.delete_queue(q, DeleteQueueOptions::default())
            .await
            .unwrap();
    }
    let mut all = Vec::new();
    for c in consumers {
        all.extend(c.await.unwrap());
    }
    for q in ["x", "y"] {
        let got: Vec<_> = all
            .iter()
            .filter(|(x, _)| *x == q)
            .map(|(_, b)| b)
            .collect();
        let unique: BTreeSet<_> = got.iter().collect();
        assert_eq!(got.len(), 4 * PER_PUBLISHER, "{q}: each message acked once");
        assert_eq!(unique.len(), 4 * PER_PUBLISHER, "{q}: no duplicates");
    }
}
