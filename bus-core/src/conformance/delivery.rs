//! Delivery: order, competing consumers, prefetch, acks and nacks,
//! requeue position, cancel, auto-ack, exclusive consumers, priorities and
//! single active consumer.

use futures::StreamExt;

use super::support::{
    bind, body, cleanup, consume, exchange, expect_bodies, expect_depth, expect_err,
    not_applicable, publish, publish_text, queue, queue_with, recv, recv_bodies, WAIT,
};
use super::Harness;
use crate::{ConnectionExt, ConsumeOptions, Error, ExchangeKind, Message, QueueOptions, Requeue};

/// Publishes `m1` .. `mN` to `queue` through the default exchange.
async fn publish_numbered(conn: &dyn crate::Connection, queue: &str, n: usize) {
    for i in 1..=n {
        publish_text(conn, "", queue, &format!("m{i}")).await;
    }
}

/// One consumer receives messages in publish order, whether they were
/// queued before it started or arrive while it runs.
pub async fn one_consumer_sees_publish_order(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "fifo").await;
    publish_numbered(&*conn, &q, 50).await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(10)).await;
    for i in 51..=100 {
        publish_text(&*conn, "", &q, &format!("m{i}")).await;
    }
    for i in 1..=100 {
        let d = recv(&mut c, "in-order delivery").await;
        assert_eq!(body(&d), format!("m{i}"), "delivery {i} is message {i}");
        d.ack().await.expect("ack");
    }
    c.cancel().await.expect("cancel");
    drop(c);
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// A delivery carries the exchange and routing key it was published with
/// and `redelivered = false`; after a requeue, the same exchange and key
/// with `redelivered = true`.
pub async fn delivery_reports_exchange_key_and_redelivery(h: &dyn Harness) {
    let conn = h.connect().await;
    let x = exchange(&*conn, "envelope", ExchangeKind::Topic).await;
    let q = queue(&*conn, "envelope").await;
    bind(&*conn, &q, &x, "a.*").await;
    publish_text(&*conn, &x, "a.b", "through topic").await;
    publish_text(&*conn, "", &q, "through default").await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let d = recv(&mut c, "first delivery").await;
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str(), d.redelivered),
        (x.as_str(), "a.b", false)
    );
    d.nack(Requeue::Yes).await.expect("nack with requeue");
    let d = recv(&mut c, "redelivery").await;
    assert_eq!(body(&d), "through topic");
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str(), d.redelivered),
        (x.as_str(), "a.b", true)
    );
    d.ack().await.expect("ack");
    let d = recv(&mut c, "second message").await;
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str(), d.redelivered),
        ("", q.as_str(), false)
    );
    d.ack().await.expect("ack");
    drop(c);
    cleanup(&*conn, &[&q], &[&x]).await;
}

/// Consumers of one queue compete: each message goes to one of them, and a
/// message goes to a consumer with free prefetch capacity.
pub async fn competing_consumers_share_a_queue(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "competing").await;
    let mut a = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let mut b = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    publish_numbered(&*conn, &q, 4).await;
    let da = recv(&mut a, "consumer a's first message").await;
    let db = recv(&mut b, "consumer b's first message").await;
    let mut first = [body(&da), body(&db)];
    first.sort();
    assert_eq!(
        first,
        ["m1", "m2"],
        "each consumer gets one of the first two"
    );
    if h.capabilities().exact_counts {
        expect_depth(&*conn, &q, 2, "two of four delivered").await;
    }
    // Only `a` has capacity after its ack, so the next message is its.
    da.ack().await.expect("ack");
    let da = recv(&mut a, "consumer a after its ack").await;
    assert_eq!(body(&da), "m3");
    db.ack().await.expect("ack");
    let db = recv(&mut b, "consumer b after its ack").await;
    assert_eq!(body(&db), "m4");
    da.ack().await.expect("ack");
    db.ack().await.expect("ack");
    drop((a, b));
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// A consumer never holds more unacked deliveries than its prefetch; the
/// rest stay in the queue for others, and an ack frees one slot.
pub async fn prefetch_limits_unacked_deliveries(h: &dyn Harness) {
    let exact = h.capabilities().exact_counts;
    let conn = h.connect().await;
    let q = queue(&*conn, "prefetch").await;
    publish_numbered(&*conn, &q, 5).await;
    let mut a = consume(&*conn, &q, ConsumeOptions::prefetch(2)).await;
    let d1 = recv(&mut a, "prefetch 2, first").await;
    let d2 = recv(&mut a, "prefetch 2, second").await;
    assert_eq!([body(&d1), body(&d2)], ["m1", "m2"]);
    if exact {
        expect_depth(&*conn, &q, 3, "a consumer with prefetch 2 holds two").await;
    }
    // Another consumer gets everything `a` could not take.
    let mut b = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let rest = recv_bodies(&mut b, 3, "what prefetch left in the queue").await;
    assert_eq!(rest, ["m3", "m4", "m5"]);
    b.cancel().await.expect("cancel");
    drop(b);
    // `a` is full: m6 waits in the queue until `a` acks.
    publish_text(&*conn, "", &q, "m6").await;
    if exact {
        expect_depth(&*conn, &q, 1, "a full consumer takes nothing").await;
    }
    d1.ack().await.expect("ack");
    let d6 = recv(&mut a, "the slot freed by an ack").await;
    assert_eq!(body(&d6), "m6");
    d2.ack().await.expect("ack");
    d6.ack().await.expect("ack");
    drop(a);
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// Prefetch 0 means unlimited: a consumer receives every queued message
/// without acking any.
pub async fn prefetch_zero_is_unlimited(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "prefetch-zero").await;
    publish_numbered(&*conn, &q, 50).await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(0)).await;
    // Kept until the multiple ack: a delivery dropped unsettled is requeued.
    let mut held = Vec::new();
    for i in 1..=50 {
        let d = recv(&mut c, "unlimited prefetch").await;
        assert_eq!(body(&d), format!("m{i}"));
        held.push(d);
    }
    if h.capabilities().exact_counts {
        expect_depth(&*conn, &q, 0, "all delivered, none acked").await;
    }
    held.last()
        .expect("fifty deliveries")
        .ack_multiple()
        .await
        .expect("ack all");
    drop(c);
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// An acked message is gone: neither redelivered when its consumer leaves
/// nor seen by another consumer.
pub async fn ack_removes_the_message(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "ack").await;
    publish_numbered(&*conn, &q, 2).await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let d = recv(&mut c, "first").await;
    d.ack().await.expect("ack");
    assert!(d.is_settled());
    c.cancel().await.expect("cancel");
    drop(c);
    expect_bodies(&*conn, &q, &["m2"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// `ack_multiple` acks the delivery and every earlier unsettled one of its
/// consumer, and no later one.
pub async fn ack_multiple_settles_earlier_deliveries(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "ack-multiple").await;
    publish_numbered(&*conn, &q, 3).await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(3)).await;
    let d1 = recv(&mut c, "m1").await;
    let d2 = recv(&mut c, "m2").await;
    let d3 = recv(&mut c, "m3").await;
    assert_eq!([body(&d1), body(&d2), body(&d3)], ["m1", "m2", "m3"]);
    d2.ack_multiple().await.expect("ack m1 and m2");
    // m1 and m2 are settled; requeueing m3 is what is left to do.
    c.cancel().await.expect("cancel");
    d3.nack(Requeue::Yes).await.expect("requeue m3");
    drop((c, d1));
    expect_bodies(&*conn, &q, &["m3"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// A delivery is settled once: a second ack or nack is `PreconditionFailed`,
/// and an auto-ack delivery cannot be nacked.
pub async fn settling_twice_is_refused(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "settle-twice").await;
    publish_numbered(&*conn, &q, 2).await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let d = recv(&mut c, "first").await;
    d.ack().await.expect("first ack");
    expect_err!("a second ack", d.ack().await, Error::PreconditionFailed(_));
    expect_err!(
        "a nack after an ack",
        d.nack(Requeue::Yes).await,
        Error::PreconditionFailed(_)
    );
    let d = recv(&mut c, "second").await;
    d.ack().await.expect("ack");
    drop(c);
    publish_text(&*conn, "", &q, "auto").await;
    let mut auto = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let d = recv(&mut auto, "auto-ack delivery").await;
    assert!(d.is_settled(), "an auto-ack delivery is settled on arrival");
    d.ack()
        .await
        .expect("acking an auto-ack delivery is a no-op");
    expect_err!(
        "nack of an auto-ack delivery",
        d.nack(Requeue::Yes).await,
        Error::PreconditionFailed(_)
    );
    drop(auto);
    cleanup(&*conn, &[&q], &[]).await;
}

/// A nacked (or rejected) message with requeue goes back to its original
/// position, ahead of messages published after it, with
/// `redelivered = true`, whatever order the nacks come in.
pub async fn nack_requeue_returns_to_original_position(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "requeue-position").await;
    publish_numbered(&*conn, &q, 5).await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(3)).await;
    let d1 = recv(&mut c, "m1").await;
    let d2 = recv(&mut c, "m2").await;
    let d3 = recv(&mut c, "m3").await;
    // Requeued to a consumer with capacity: it comes back before m4.
    d2.reject(Requeue::Yes).await.expect("reject with requeue");
    let again = recv(&mut c, "the requeued message").await;
    assert_eq!((body(&again), again.redelivered), ("m2".to_owned(), true));
    // Cancel, then requeue in reverse order: the queue keeps publish order.
    c.cancel().await.expect("cancel");
    d3.nack(Requeue::Yes).await.expect("requeue m3");
    again.nack(Requeue::Yes).await.expect("requeue m2");
    d1.nack(Requeue::Yes).await.expect("requeue m1");
    drop(c);
    let mut next = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let d = recv(&mut next, "after requeue").await;
        seen.push((body(&d), d.redelivered));
    }
    let want: Vec<(String, bool)> = [
        ("m1", true),
        ("m2", true),
        ("m3", true),
        ("m4", false),
        ("m5", false),
    ]
    .iter()
    .map(|(b, r)| ((*b).to_owned(), *r))
    .collect();
    assert_eq!(seen, want, "requeued messages return to their positions");
    drop(next);
    cleanup(&*conn, &[&q], &[]).await;
}

/// `nack_multiple` with requeue returns the delivery and every earlier
/// unsettled one, in their original order, marked redelivered.
pub async fn nack_multiple_requeue_keeps_order(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "nack-multiple").await;
    publish_numbered(&*conn, &q, 4).await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(3)).await;
    let held = [
        recv(&mut c, "m1").await,
        recv(&mut c, "m2").await,
        recv(&mut c, "m3").await,
    ];
    held[2]
        .nack_multiple(Requeue::Yes)
        .await
        .expect("nack all three");
    for want in ["m1", "m2", "m3"] {
        let d = recv(&mut c, "redelivery after nack_multiple").await;
        assert_eq!((body(&d), d.redelivered), (want.to_owned(), true));
        d.ack().await.expect("ack");
    }
    let d = recv(&mut c, "m4").await;
    assert_eq!((body(&d), d.redelivered), ("m4".to_owned(), false));
    d.ack().await.expect("ack");
    drop((c, held));
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// A nack or reject without requeue on a queue without a dead-letter
/// exchange drops the message.
pub async fn reject_without_requeue_drops(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "reject-drop").await;
    publish_numbered(&*conn, &q, 3).await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    recv(&mut c, "m1")
        .await
        .reject(Requeue::No)
        .await
        .expect("reject");
    recv(&mut c, "m2")
        .await
        .nack(Requeue::No)
        .await
        .expect("nack");
    let d = recv(&mut c, "m3").await;
    assert_eq!((body(&d), d.redelivered), ("m3".to_owned(), false));
    d.ack().await.expect("ack");
    drop(c);
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// Cancelling a consumer ends its stream and stops deliveries to it; the
/// deliveries it holds can still be settled, and the rest stay queued.
pub async fn cancel_stops_deliveries_and_keeps_settling(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "cancel").await;
    publish_numbered(&*conn, &q, 3).await;
    let mut c = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let d = recv(&mut c, "m1").await;
    c.cancel().await.expect("cancel");
    match tokio::time::timeout(WAIT, c.next()).await {
        Ok(None) => {}
        Ok(Some(other)) => panic!("a cancelled consumer yielded {other:?}"),
        Err(_) => panic!("the stream of a cancelled consumer did not end"),
    }
    d.ack().await.expect("ack after cancel");
    drop(c);
    expect_bodies(&*conn, &q, &["m2", "m3"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// An auto-ack delivery counts as acked when sent: nothing comes back when
/// its consumer leaves.
pub async fn auto_ack_counts_as_acked(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "auto-ack").await;
    publish_numbered(&*conn, &q, 3).await;
    let mut c = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let got = recv_bodies(&mut c, 3, "auto-ack").await;
    assert_eq!(got, ["m1", "m2", "m3"]);
    if h.capabilities().exact_counts {
        let info = conn.inspect_queue(&q).await.expect("inspect");
        assert_eq!(info.message_count, 0, "nothing left to deliver");
    }
    drop(c);
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// An exclusive consumer is the queue's only one: another consumer, or an
/// exclusive consumer on a queue that has consumers, is refused with
/// `AccessRefused` (RabbitMQ's "in exclusive use"); once it is cancelled
/// others may consume.
pub async fn exclusive_consumer_locks_the_queue(h: &dyn Harness) {
    let conn = h.connect().await;
    let other = h.connect().await;
    let q = queue(&*conn, "exclusive-consumer").await;
    let exclusive = ConsumeOptions::prefetch(1).with_exclusive(true);
    let a = consume(&*conn, &q, exclusive.clone()).await;
    expect_err!(
        "a second consumer on the same connection",
        conn.consume(&q, ConsumeOptions::prefetch(1)).await,
        Error::AccessRefused(_)
    );
    expect_err!(
        "a second consumer on another connection",
        other.consume(&q, ConsumeOptions::prefetch(1)).await,
        Error::AccessRefused(_)
    );
    a.cancel().await.expect("cancel");
    drop(a);
    let mut b = consume(&*other, &q, ConsumeOptions::prefetch(1)).await;
    expect_err!(
        "an exclusive consumer on a queue with a consumer",
        conn.consume(&q, exclusive).await,
        Error::AccessRefused(_)
    );
    publish_text(&*conn, "", &q, "to b").await;
    let d = recv(&mut b, "the consumer after the exclusive one").await;
    d.ack().await.expect("ack");
    drop(b);
    cleanup(&*conn, &[&q], &[]).await;
}

/// With `x-max-priority`, higher priorities are delivered first, FIFO within
/// one priority; no priority counts as 0 and priorities above the maximum
/// count as the maximum.
pub async fn priority_queue_orders_by_priority(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().priorities,
        "priority_queue_orders_by_priority",
        "no priority queues",
    ) {
        return;
    }
    let conn = h.connect().await;
    let mut options = QueueOptions::default();
    options.arguments.max_priority = Some(5);
    let q = queue_with(&*conn, "priority", options).await;
    for (text, priority) in [
        ("p1", Some(1)),
        ("p5a", Some(5)),
        ("none", None),
        ("p0", Some(0)),
        ("p5b", Some(5)),
        ("p9", Some(9)),
        ("p3", Some(3)),
    ] {
        let mut m = Message::new(text);
        m.properties.priority = priority;
        publish(&*conn, "", &q, m).await;
    }
    expect_bodies(&*conn, &q, &["p5a", "p5b", "p9", "p3", "p1", "none", "p0"]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// With `x-single-active-consumer`, only one consumer receives at a time;
/// when it leaves (cancelled, its delivery requeued), the next one takes
/// over the rest of the queue, the requeued message included.
pub async fn single_active_consumer_hands_over(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().single_active_consumer,
        "single_active_consumer_hands_over",
        "no single active consumer",
    ) {
        return;
    }
    let conn = h.connect().await;
    let mut options = QueueOptions::default();
    options.arguments.single_active_consumer = true;
    let q = queue_with(&*conn, "single-active", options).await;
    let mut a = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let mut b = consume(&*conn, &q, ConsumeOptions::prefetch(10)).await;
    publish_numbered(&*conn, &q, 4).await;
    let d = recv(&mut a, "the active consumer").await;
    assert_eq!(body(&d), "m1");
    if h.capabilities().exact_counts {
        let info = conn.inspect_queue(&q).await.expect("inspect");
        assert_eq!(
            (info.message_count, info.consumer_count),
            (3, 2),
            "the waiting consumer takes nothing, but counts"
        );
    }
    // Were `b` active too, it would hold m2..m4 by now.
    d.ack().await.expect("ack");
    let d = recv(&mut a, "the active consumer again").await;
    assert_eq!(body(&d), "m2");
    // Leaving: cancel, and give back the delivery it held. (RabbitMQ hands
    // the queue over at once, but only pushes the waiting messages to the
    // new active consumer on the next queue event, here the requeue, so the
    // order of what `b` receives is not pinned.)
    a.cancel().await.expect("cancel");
    d.nack(Requeue::Yes).await.expect("requeue after cancel");
    let mut rest = Vec::new();
    for _ in 0..3 {
        let d = recv(&mut b, "the consumer that took over").await;
        rest.push((body(&d), d.redelivered));
        d.ack().await.expect("ack");
    }
    rest.sort();
    assert_eq!(
        rest,
        [
            ("m2".to_owned(), true),
            ("m3".to_owned(), false),
            ("m4".to_owned(), false)
        ]
    );
    drop((a, b));
    cleanup(&*conn, &[&q], &[]).await;
}
