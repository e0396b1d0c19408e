//! Recovery after the broker drops a connection: what RabbitMQ does to a
//! connection `rabbitmqctl close_connection` closes, and what a recovering
//! connection does about it (reconnect, declare its topology again, rename
//! server-named queues, resume consumers, report each step as a
//! [`RecoveryEvent`]). The harness drops connections through
//! [`Harness::connect_droppable`]: for real on RabbitMQ, simulated on the
//! in-process broker, so both meet the same failure shapes.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use tokio::sync::broadcast;

use super::support::{
    bind, body, cleanup, consume, exchange, expect_bodies, expect_err, not_applicable, queue,
    queue_with, recv,
};
use super::{DroppableConnection, Harness, WAIT};
use crate::{
    ConnectionExt, ConsumeOptions, DeleteExchangeOptions, Error, ExchangeKind, FieldTable, Message,
    PublishOptions, QueueOptions, RecoveryEvent,
};

/// A droppable connection, or `None` after printing why the case does not
/// apply.
async fn droppable(h: &dyn Harness, recover: bool, case: &str) -> Option<DroppableConnection> {
    if not_applicable(
        h,
        h.capabilities().recovery,
        case,
        "the transport does not recover lost connections",
    ) {
        return None;
    }
    let conn = h.connect_droppable(recover).await;
    if conn.is_none() {
        not_applicable(
            h,
            false,
            case,
            "the harness cannot make the broker drop a connection",
        );
    }
    conn
}

/// The first event `pred` accepts, within [`WAIT`].
async fn wait_event(
    rx: &mut broadcast::Receiver<RecoveryEvent>,
    what: &str,
    pred: impl Fn(&RecoveryEvent) -> bool,
) -> RecoveryEvent {
    let found = tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    panic!("the events ended while waiting for {what}")
                }
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no {what} event within {WAIT:?}"))
}

fn number(d: &crate::Delivery) -> u32 {
    body(d)
        .parse()
        .unwrap_or_else(|_| panic!("a numbered message, got {:?}", body(d)))
}

/// The broker drops a connection in mid-stream: its unacked deliveries are
/// requeued and come again marked redelivered; settling them on the dead
/// link fails with `ConnectionLost`; the connection comes back (generation
/// 2) with its exchange, its server-named exclusive queue under a new name
/// and that queue's binding; its consumers resume on the same streams (the
/// exclusive queue's consumer hears of the loss first) and nothing is lost.
pub async fn lost_connection_requeues_and_resumes(h: &dyn Harness) {
    let case = "lost_connection_requeues_and_resumes";
    let Some(dropped) = droppable(h, true, case).await else {
        return;
    };
    let conn = dropped.connection.clone();
    let mut events = dropped.events.resubscribe();
    let q = queue(&*conn, "recovery-stream").await;
    let x = exchange(&*conn, "recovery-x", ExchangeKind::Direct).await;
    let private_q = conn
        .declare_queue("", QueueOptions::exclusive())
        .await
        .expect("declare a server-named exclusive queue")
        .name;
    bind(&*conn, &private_q, &x, "k").await;
    let mut private_consumer = consume(&*conn, &private_q, ConsumeOptions::auto_ack()).await;
    const COUNT: u32 = 40;
    for i in 0..COUNT / 2 {
        conn.send_to_queue(&q, Message::new(i.to_string()))
            .await
            .expect("publish");
    }
    let mut consumer = consume(&*conn, &q, ConsumeOptions::prefetch(10)).await;
    let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
    let take = |d: &crate::Delivery, seen: &mut BTreeMap<u32, u32>| {
        let n = number(d);
        let times = seen.entry(n).or_default();
        *times += 1;
        assert!(
            *times == 1 || d.redelivered,
            "message {n} delivered twice without redelivered"
        );
    };
    for _ in 0..COUNT / 4 {
        let d = recv(&mut consumer, "a delivery before the loss").await;
        take(&d, &mut seen);
        d.ack().await.expect("ack before the loss");
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        let d = recv(&mut consumer, "a delivery held across the loss").await;
        take(&d, &mut seen);
        held.push(d);
    }

    dropped.drop_from_broker().await;
    wait_event(&mut events, "Disconnected", |e| {
        matches!(e, RecoveryEvent::Disconnected { .. })
    })
    .await;
    let renamed = wait_event(&mut events, "QueueRenamed", |e| {
        matches!(e, RecoveryEvent::QueueRenamed { .. })
    })
    .await;
    let RecoveryEvent::QueueRenamed { old, new } = renamed else {
        unreachable!("the predicate accepts only QueueRenamed")
    };
    assert_eq!(old, private_q, "the renamed queue is the exclusive one");
    assert_ne!(new, private_q, "a server-named queue gets a new name");
    wait_event(&mut events, "Reconnected (generation 2)", |e| {
        matches!(e, RecoveryEvent::Reconnected { generation: 2, .. })
    })
    .await;

    for d in &held {
        expect_err!(
            "settling a delivery of the dropped link (it can never succeed)",
            d.ack().await,
            Error::Closed(_)
        );
    }
    for i in COUNT / 2..COUNT {
        conn.send_to_queue(&q, Message::new(i.to_string()))
            .await
            .expect("publish after the recovery");
    }
    while seen.len() < COUNT as usize {
        let d = recv(&mut consumer, "the rest of the stream").await;
        take(&d, &mut seen);
        match d.ack().await {
            // Handed out just before the link died: it comes again.
            Ok(()) | Err(Error::Closed(_)) => {}
            Err(e) => panic!("ack after the recovery failed: {e:?}"),
        }
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..COUNT).collect::<Vec<_>>(),
        "every message arrived"
    );
    for d in &held {
        assert_eq!(
            seen[&number(d)],
            2,
            "held message {} came back once",
            body(d)
        );
    }

    let lost = tokio::time::timeout(WAIT, private_consumer.next())
        .await
        .expect("the exclusive queue's consumer hears of the loss")
        .expect("its stream goes on");
    assert!(
        matches!(lost, Err(Error::ConnectionLost(_))),
        "the loss notice is ConnectionLost, got {lost:?}"
    );
    conn.publish(&x, "k", Message::new("after"), PublishOptions::mandatory())
        .await
        .expect("the binding of the renamed queue was declared again");
    let d = recv(
        &mut private_consumer,
        "a message routed to the renamed queue",
    )
    .await;
    assert_eq!(body(&d), "after");
    assert_eq!(d.routing_key, "k");

    drop((consumer, private_consumer));
    cleanup(&*conn, &[&q], &[&x]).await;
    conn.close().await.expect("close");
}

/// Recovery declares exchange-to-exchange bindings again: another client
/// deletes the destination exchange (and with it the binding from the
/// source and the destination's queue binding), the broker drops the
/// recovering connection, and once it is back its journal has declared
/// the exchange, the queue binding and the exchange binding again, so a
/// mandatory publish to the source routes to the queue.
pub async fn lost_connection_declares_exchange_bindings_again(h: &dyn Harness) {
    let case = "lost_connection_declares_exchange_bindings_again";
    let Some(dropped) = droppable(h, true, case).await else {
        return;
    };
    let conn = dropped.connection.clone();
    let mut events = dropped.events.resubscribe();
    let source = exchange(&*conn, "recovery-e2e-src", ExchangeKind::Fanout).await;
    let dest = exchange(&*conn, "recovery-e2e-dst", ExchangeKind::Topic).await;
    let q = queue(&*conn, "recovery-e2e").await;
    bind(&*conn, &q, &dest, "a.*").await;
    conn.bind_exchange(&dest, &source, "", FieldTable::new())
        .await
        .expect("bind the destination to the source");
    let other = h.connect().await;
    other
        .delete_exchange(&dest, DeleteExchangeOptions::default())
        .await
        .expect("another client deletes the destination");
    expect_err!(
        "mandatory publish once the destination is gone",
        conn.publish(
            &source,
            "a.b",
            Message::new("lost"),
            PublishOptions::mandatory()
        )
        .await,
        Error::Unroutable { .. }
    );

    dropped.drop_from_broker().await;
    wait_event(&mut events, "Reconnected (generation 2)", |e| {
        assert!(
            !matches!(e, RecoveryEvent::TopologyRecoveryFailed { .. }),
            "nothing fails to be declared again: {e:?}"
        );
        matches!(e, RecoveryEvent::Reconnected { generation: 2, .. })
    })
    .await;
    conn.publish(
        &source,
        "a.b",
        Message::new("through"),
        PublishOptions::mandatory(),
    )
    .await
    .expect("the exchange binding was declared again");
    expect_bodies(&*conn, &q, &["through"]).await;
    cleanup(&*conn, &[&q], &[&source, &dest]).await;
    conn.close().await.expect("close");
}

/// A connection that does not recover (a worker process that died) is
/// dropped holding a message: the message goes to another consumer marked
/// redelivered, the dead consumer's stream ends, and the connection refuses
/// work with `ConnectionLost`.
pub async fn lost_connection_without_recovery_hands_its_messages_over(h: &dyn Harness) {
    let case = "lost_connection_without_recovery_hands_its_messages_over";
    let Some(doomed) = droppable(h, false, case).await else {
        return;
    };
    let survivor = h.connect().await;
    let q = queue(&*survivor, "recovery-killed-worker").await;
    survivor
        .send_to_queue(&q, Message::new("job"))
        .await
        .expect("publish");
    let mut doomed_consumer = consume(&*doomed.connection, &q, ConsumeOptions::prefetch(1)).await;
    let first = recv(&mut doomed_consumer, "the job").await;
    assert!(!first.redelivered);
    let mut other = consume(&*survivor, &q, ConsumeOptions::prefetch(1)).await;

    doomed.drop_from_broker().await;
    let again = recv(&mut other, "the job, redelivered").await;
    assert_eq!(body(&again), "job");
    assert!(
        again.redelivered,
        "a requeued message is marked redelivered"
    );
    again.ack().await.expect("ack");
    let end = tokio::time::timeout(WAIT, doomed_consumer.next())
        .await
        .expect("the dead consumer's stream ends");
    assert!(
        end.is_none(),
        "the dead consumer's stream ends, got {end:?}"
    );
    assert!(
        !doomed.connection.is_open(),
        "a lost connection is not open"
    );
    expect_err!(
        "publish on a lost connection",
        doomed.connection.send_to_queue(&q, Message::new("x")).await,
        Error::ConnectionLost(_)
    );
    drop((doomed_consumer, other));
    cleanup(&*survivor, &[&q], &[]).await;
}

/// Publishes in flight when the broker drops the connection never report
/// success falsely: each fails with a temporary error or is in the queue,
/// and every confirmed message is consumed exactly once.
pub async fn lost_connection_never_falsely_confirms_publishes_in_flight(h: &dyn Harness) {
    let case = "lost_connection_never_falsely_confirms_publishes_in_flight";
    let Some(dropped) = droppable(h, true, case).await else {
        return;
    };
    let conn = dropped.connection.clone();
    let mut events = dropped.events.resubscribe();
    let q = queue_with(&*conn, "recovery-confirms", QueueOptions::durable()).await;
    const COUNT: u32 = 400;
    let publishing = {
        let conn = conn.clone();
        let q = q.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..COUNT {
                let r = conn
                    .send_to_queue(&q, Message::new(i.to_string()).persistent())
                    .await;
                outcomes.push((i, r));
                if i % 20 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            outcomes
        })
    };
    tokio::time::timeout(WAIT, async {
        while conn
            .inspect_queue(&q)
            .await
            .map(|i| i.message_count)
            .unwrap_or(0)
            < 50
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the publisher got going");
    dropped.drop_from_broker().await;
    wait_event(&mut events, "Reconnected", |e| {
        matches!(e, RecoveryEvent::Reconnected { .. })
    })
    .await;
    let outcomes = tokio::time::timeout(WAIT * 6, publishing)
        .await
        .expect("the publisher finishes")
        .expect("the publisher did not panic");
    let mut confirmed = BTreeSet::new();
    for (i, r) in &outcomes {
        match r {
            Ok(()) => {
                confirmed.insert(*i);
            }
            Err(e) => assert!(e.is_temporary(), "message {i} failed for good: {e:?}"),
        }
    }
    let total = conn.inspect_queue(&q).await.expect("inspect").message_count;
    let mut consumer = consume(&*conn, &q, ConsumeOptions::prefetch(100)).await;
    let mut got: BTreeMap<u32, u32> = BTreeMap::new();
    for _ in 0..total {
        let d = recv(&mut consumer, "a published message").await;
        *got.entry(number(&d)).or_default() += 1;
        d.ack().await.expect("ack");
    }
    for i in &confirmed {
        assert_eq!(
            got.get(i).copied(),
            Some(1),
            "confirmed message {i} is in the queue exactly once"
        );
    }
    assert!(
        got.values().all(|n| *n == 1),
        "no message is in the queue twice"
    );
    drop(consumer);
    cleanup(&*conn, &[&q], &[]).await;
    conn.close().await.expect("close");
}
