//! Lifetimes: consumers and connections that go away with unacked
//! deliveries, closed connections, exclusive, auto-delete and expiring
//! queues.

use std::time::Duration;

use super::support::{
    body, cleanup, consume, expect_bodies, expect_err, not_applicable, publish_text, queue,
    queue_with, recv, until_queue_gone,
};
use super::{fresh_name, Harness};
use crate::{
    ConnectionExt, ConsumeOptions, Consumer, DeleteQueueOptions, Error, ExchangeKind,
    ExchangeOptions, FieldTable, Message, PublishOptions, QueueOptions,
};

/// Publishes `m1` .. `mN` to `queue` through the default exchange.
async fn publish_numbered(conn: &dyn crate::Connection, queue: &str, n: usize) {
    for i in 1..=n {
        publish_text(conn, "", queue, &format!("m{i}")).await;
    }
}

/// Receives `n` deliveries (auto-ack) and returns `(body, redelivered)`,
/// sorted by body, for checks where the requeue may race fresh messages.
async fn recv_flags(c: &mut Consumer, n: usize, what: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let d = recv(c, what).await;
        out.push((body(&d), d.redelivered));
    }
    out.sort();
    out
}

fn flags(v: &[(&str, bool)]) -> Vec<(String, bool)> {
    v.iter().map(|(b, r)| ((*b).to_owned(), *r)).collect()
}

/// A dropped consumer's unacked deliveries are requeued, marked
/// redelivered, and go to another consumer.
pub async fn dropped_consumer_requeues_unacked(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "dropped-consumer").await;
    publish_numbered(&*conn, &q, 5).await;
    let mut a = consume(&*conn, &q, ConsumeOptions::prefetch(3)).await;
    let held = [
        recv(&mut a, "m1").await,
        recv(&mut a, "m2").await,
        recv(&mut a, "m3").await,
    ];
    drop(held);
    drop(a);
    let mut b = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let got = recv_flags(&mut b, 5, "after the first consumer was dropped").await;
    assert_eq!(
        got,
        flags(&[
            ("m1", true),
            ("m2", true),
            ("m3", true),
            ("m4", false),
            ("m5", false)
        ])
    );
    drop(b);
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// Closing a connection requeues its consumers' unacked deliveries at their
/// original positions, marked redelivered, before `close` returns.
pub async fn closed_connection_requeues_unacked(h: &dyn Harness) {
    let conn = h.connect().await;
    let doomed = h.connect().await;
    let q = queue(&*conn, "closed-connection").await;
    publish_numbered(&*conn, &q, 5).await;
    let mut a = consume(&*doomed, &q, ConsumeOptions::prefetch(3)).await;
    let held = [
        recv(&mut a, "m1").await,
        recv(&mut a, "m2").await,
        recv(&mut a, "m3").await,
    ];
    doomed.close().await.expect("close");
    assert!(!doomed.is_open(), "a closed connection is not open");
    expect_err!(
        "ack on a closed connection",
        held[0].ack().await,
        Error::Closed(_) | Error::ConnectionLost(_)
    );
    let mut b = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let d = recv(&mut b, "after the connection closed").await;
        got.push((body(&d), d.redelivered));
    }
    assert_eq!(
        got,
        flags(&[
            ("m1", true),
            ("m2", true),
            ("m3", true),
            ("m4", false),
            ("m5", false)
        ]),
        "requeued at their original positions"
    );
    drop((a, b));
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// Dropping a connection (with its consumers and deliveries) requeues the
/// unacked deliveries, marked redelivered, to a consumer elsewhere.
pub async fn dropped_connection_requeues_unacked(h: &dyn Harness) {
    let conn = h.connect().await;
    let doomed = h.connect().await;
    let q = queue(&*conn, "dropped-connection").await;
    publish_numbered(&*conn, &q, 3).await;
    let mut a = consume(&*doomed, &q, ConsumeOptions::prefetch(2)).await;
    let held = [recv(&mut a, "m1").await, recv(&mut a, "m2").await];
    let mut b = consume(&*conn, &q, ConsumeOptions::auto_ack()).await;
    let d = recv(&mut b, "the message the first consumer had no room for").await;
    assert_eq!((body(&d), d.redelivered), ("m3".to_owned(), false));
    drop((held, a, doomed));
    let got = recv_flags(&mut b, 2, "after the connection was dropped").await;
    assert_eq!(got, flags(&[("m1", true), ("m2", true)]));
    drop(b);
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// A closed connection refuses further work with `Closed` (or
/// `ConnectionLost`), and the streams of its consumers end.
pub async fn closed_connection_refuses_work(h: &dyn Harness) {
    let conn = h.connect().await;
    let q = queue(&*conn, "closed-refuses").await;
    let closing = h.connect().await;
    let mut c = consume(&*closing, &q, ConsumeOptions::prefetch(1)).await;
    assert!(closing.is_open());
    closing.close().await.expect("close");
    assert!(!closing.is_open());
    let ended = tokio::time::timeout(super::WAIT, futures::StreamExt::next(&mut c))
        .await
        .unwrap_or_else(|_| panic!("the consumer of a closed connection did not end"));
    assert!(
        ended.is_none(),
        "a consumer of a closed connection yields nothing more: {ended:?}"
    );
    expect_err!(
        "publish on a closed connection",
        closing
            .publish("", &q, Message::new("late"), PublishOptions::default())
            .await,
        Error::Closed(_) | Error::ConnectionLost(_)
    );
    expect_err!(
        "declare on a closed connection",
        closing
            .declare_exchange(
                &fresh_name("late"),
                ExchangeKind::Direct,
                ExchangeOptions::default()
            )
            .await,
        Error::Closed(_) | Error::ConnectionLost(_)
    );
    expect_err!(
        "consume on a closed connection",
        closing.consume(&q, ConsumeOptions::auto_ack()).await,
        Error::Closed(_) | Error::ConnectionLost(_)
    );
    expect_bodies(&*conn, &q, &[]).await;
    cleanup(&*conn, &[&q], &[]).await;
}

/// An exclusive queue is usable only by its connection: any other
/// connection's declare (passive or not), consume, bind, purge or delete is
/// `ResourceLocked`. Publishing to it from anywhere works.
pub async fn exclusive_queue_is_locked_to_its_connection(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().exclusive_queues,
        "exclusive_queue_is_locked_to_its_connection",
        "no exclusive queues",
    ) {
        return;
    }
    let owner = h.connect().await;
    let other = h.connect().await;
    let exclusive = QueueOptions::default().with_exclusive(true);
    let q = queue_with(&*owner, "exclusive", exclusive.clone()).await;
    expect_err!(
        "passive declare from another connection",
        other.inspect_queue(&q).await,
        Error::ResourceLocked(_)
    );
    expect_err!(
        "exclusive declare from another connection",
        other.declare_queue(&q, exclusive.clone()).await,
        Error::ResourceLocked(_)
    );
    expect_err!(
        "plain declare from another connection",
        other.declare_queue(&q, QueueOptions::default()).await,
        Error::ResourceLocked(_)
    );
    expect_err!(
        "consume from another connection",
        other.consume(&q, ConsumeOptions::auto_ack()).await,
        Error::ResourceLocked(_)
    );
    expect_err!(
        "bind from another connection",
        other
            .bind_queue(&q, "amq.direct", &fresh_name("k"), FieldTable::new())
            .await,
        Error::ResourceLocked(_)
    );
    expect_err!(
        "purge from another connection",
        other.purge_queue(&q).await,
        Error::ResourceLocked(_)
    );
    expect_err!(
        "delete from another connection",
        other.delete_queue(&q, DeleteQueueOptions::default()).await,
        Error::ResourceLocked(_)
    );
    publish_text(&*other, "", &q, "from another connection").await;
    owner
        .declare_queue(&q, exclusive)
        .await
        .expect("the owner redeclares its queue");
    expect_bodies(&*owner, &q, &["from another connection"]).await;
    cleanup(&*owner, &[&q], &[]).await;
}

/// An exclusive queue is deleted when its connection closes or is dropped.
pub async fn exclusive_queue_dies_with_its_connection(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().exclusive_queues,
        "exclusive_queue_dies_with_its_connection",
        "no exclusive queues",
    ) {
        return;
    }
    let observer = h.connect().await;
    let exclusive = QueueOptions::default().with_exclusive(true);
    let closed = h.connect().await;
    let q1 = queue_with(&*closed, "exclusive-closed", exclusive.clone()).await;
    publish_text(&*closed, "", &q1, "lost with the queue").await;
    let dropped = h.connect().await;
    let q2 = queue_with(&*dropped, "exclusive-dropped", exclusive).await;
    closed.close().await.expect("close");
    until_queue_gone(
        &*observer,
        &q1,
        Duration::from_millis(10),
        "exclusive queue of a closed connection",
    )
    .await;
    drop(dropped);
    until_queue_gone(
        &*observer,
        &q2,
        Duration::from_millis(10),
        "exclusive queue of a dropped connection",
    )
    .await;
}

/// An auto-delete queue exists until it has had a consumer; it survives
/// while any consumer remains and is deleted when the last one goes away.
pub async fn auto_delete_queue_dies_with_its_last_consumer(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().auto_delete_queues,
        "auto_delete_queue_dies_with_its_last_consumer",
        "no auto-delete queues",
    ) {
        return;
    }
    let conn = h.connect().await;
    let auto_delete = QueueOptions::default().with_auto_delete(true);
    let q = queue_with(&*conn, "auto-delete", auto_delete).await;
    conn.inspect_queue(&q)
        .await
        .expect("an auto-delete queue that never had a consumer exists");
    let first = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    let second = consume(&*conn, &q, ConsumeOptions::prefetch(1)).await;
    first.cancel().await.expect("cancel");
    drop(first);
    let info = conn
        .inspect_queue(&q)
        .await
        .expect("the queue survives while a consumer remains");
    if h.capabilities().exact_counts {
        assert_eq!(info.consumer_count, 1);
    }
    second.cancel().await.expect("cancel the last consumer");
    drop(second);
    until_queue_gone(
        &*conn,
        &q,
        Duration::from_millis(10),
        "auto-delete queue after its last consumer",
    )
    .await;
}

/// A queue with `x-expires` is deleted once unused for that long; a queue
/// with a consumer is in use and stays.
pub async fn queue_expires_when_unused(h: &dyn Harness) {
    if not_applicable(
        h,
        h.capabilities().queue_expiry,
        "queue_expires_when_unused",
        "no queue expiry",
    ) {
        return;
    }
    let conn = h.connect().await;
    let expiring = |ms| {
        let mut o = QueueOptions::default();
        o.arguments.expires = Some(Duration::from_millis(ms));
        o
    };
    let used = queue_with(&*conn, "expires-used", expiring(100)).await;
    let consumer = consume(&*conn, &used, ConsumeOptions::prefetch(1)).await;
    let unused = queue_with(&*conn, "expires-unused", expiring(100)).await;
    // A check renews the lease (RabbitMQ counts a declaration as use), so
    // checks are spaced beyond the expiry.
    until_queue_gone(
        &*conn,
        &unused,
        Duration::from_millis(300),
        "queue unused past x-expires",
    )
    .await;
    conn.inspect_queue(&used)
        .await
        .expect("a queue with a consumer does not expire");
    drop(consumer);
    cleanup(&*conn, &[&used], &[]).await;
}
