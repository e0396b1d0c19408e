//! Each simulated fault, scripted, on tokio's paused clock: what the
//! application sees and what the broker keeps.

use std::time::Duration;

use bus_core::{
    Connection, ConnectionExt, ConsumeOptions, Error, ExchangeKind, ExchangeOptions, FieldTable,
    Message, QueueOptions, RecoveryEvent,
};
use bus_local::{AckFault, Fault, FaultPlan, LocalBroker, PublishFault, Recovery, TraceEvent};
use futures::StreamExt;

async fn next(c: &mut bus_core::Consumer) -> bus_core::Delivery {
    tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the stream goes on")
        .expect("a delivery, not an error")
}

fn body(d: &bus_core::Delivery) -> String {
    String::from_utf8_lossy(&d.message.body).into_owned()
}

#[tokio::test(start_paused = true)]
async fn lost_confirm_queues_the_message_and_fails_the_publish() {
    let broker =
        LocalBroker::with_faults(FaultPlan::none().on_publish(1, PublishFault::LoseConfirm));
    let conn = broker.connect();
    conn.declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    let e = conn
        .send_to_queue("q", Message::new("m"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ConnectionLost(_)), "{e}");
    assert!(e.is_temporary());
    assert_eq!(broker.queue_depth("q"), Some(1));
    // The retry waits for the reconnection, then makes the duplicate.
    conn.send_to_queue("q", Message::new("m")).await.unwrap();
    assert_eq!(broker.queue_depth("q"), Some(2));
    assert_eq!(conn.generation(), 2);
    assert_eq!(
        broker.trace().faults().collect::<Vec<_>>(),
        vec![Fault::LoseConfirm]
    );
}

#[tokio::test(start_paused = true)]
async fn closed_or_nacked_publish_is_not_taken() {
    let broker = LocalBroker::with_faults(
        FaultPlan::none()
            .on_publish(1, PublishFault::CloseConnection)
            .on_publish(2, PublishFault::Nack),
    );
    let conn = broker.connect();
    conn.declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    let e = conn
        .send_to_queue("q", Message::new("a"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::ConnectionLost(_)) && e.is_temporary(),
        "{e}"
    );
    let e = conn
        .send_to_queue("q", Message::new("b"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Nacked(_)) && e.is_temporary(), "{e}");
    assert_eq!(broker.queue_depth("q"), Some(0));
    conn.send_to_queue("q", Message::new("c")).await.unwrap();
    assert_eq!(broker.queue_depth("q"), Some(1));
}

#[tokio::test(start_paused = true)]
async fn lost_ack_succeeds_and_the_message_comes_again() {
    let broker = LocalBroker::with_faults(FaultPlan::none().on_ack(1, AckFault::Lose));
    let conn = broker.connect();
    let mut events = conn.events();
    conn.declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    conn.send_to_queue("q", Message::new("job")).await.unwrap();
    let mut c = conn
        .consume("q", ConsumeOptions::prefetch(1))
        .await
        .unwrap();
    let d = next(&mut c).await;
    assert!(!d.redelivered);
    d.ack().await.expect("a lost ack succeeds for the caller");
    let again = next(&mut c).await;
    assert_eq!(body(&again), "job");
    assert!(again.redelivered);
    assert!(again.delivery_tag > d.delivery_tag, "tags go on growing");
    again.ack().await.unwrap();
    assert_eq!(broker.queue_depth("q"), Some(0));
    assert_eq!(broker.unacked_count("q"), Some(0));
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert!(
        matches!(seen[0], RecoveryEvent::Disconnected { .. }),
        "{seen:?}"
    );
    assert!(
        matches!(seen[1], RecoveryEvent::Reconnected { generation: 2, .. }),
        "{seen:?}"
    );
    assert!(
        matches!(seen[2], RecoveryEvent::ConsumerResumed { .. }),
        "{seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn ack_on_a_dropped_connection_fails_and_the_message_comes_again() {
    let broker = LocalBroker::with_faults(FaultPlan::none().on_ack(1, AckFault::CloseConnection));
    let conn = broker.connect();
    conn.declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    conn.send_to_queue("q", Message::new("job")).await.unwrap();
    let mut c = conn
        .consume("q", ConsumeOptions::prefetch(1))
        .await
        .unwrap();
    let d = next(&mut c).await;
    let e = d.ack().await.unwrap_err();
    assert!(matches!(e, Error::Closed(_)) && !e.is_temporary(), "{e}");
    let again = next(&mut c).await;
    assert!(again.redelivered);
    again.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn restart_keeps_durable_queues_and_persistent_messages_only() {
    let broker = LocalBroker::with_faults(FaultPlan::none());
    let conn = broker.connect();
    let other = broker.connect_with(Recovery::Disabled);
    conn.declare_exchange(
        "durable-x",
        ExchangeKind::Direct,
        ExchangeOptions::durable(),
    )
    .await
    .unwrap();
    other
        .declare_exchange(
            "transient-x",
            ExchangeKind::Direct,
            ExchangeOptions::default(),
        )
        .await
        .unwrap();
    other
        .declare_queue("durable", QueueOptions::durable())
        .await
        .unwrap();
    other
        .declare_queue("transient", QueueOptions::default())
        .await
        .unwrap();
    other
        .declare_queue("auto", QueueOptions::durable().with_auto_delete(true))
        .await
        .unwrap();
    other
        .bind_queue("durable", "durable-x", "k", FieldTable::new())
        .await
        .unwrap();
    for m in [
        Message::new("p1").persistent(),
        Message::new("t1"),
        Message::new("p2").persistent(),
    ] {
        other.send_to_queue("durable", m).await.unwrap();
    }
    other
        .send_to_queue("transient", Message::new("p").persistent())
        .await
        .unwrap();
    // An unacked persistent message comes back, redelivered.
    let mut c = other
        .consume("durable", ConsumeOptions::prefetch(1))
        .await
        .unwrap();
    assert_eq!(body(&next(&mut c).await), "p1");

    broker.restart();
    assert!(
        !other.is_open(),
        "a connection that does not recover stays lost"
    );
    assert!(c.next().await.is_none(), "its consumer ends");
    assert_eq!(broker.queue_depth("durable"), Some(2));
    assert_eq!(broker.queue_depth("transient"), None);
    assert_eq!(broker.queue_depth("auto"), None);
    conn.declare_exchange(
        "transient-x",
        ExchangeKind::Direct,
        ExchangeOptions::passive(),
    )
    .await
    .expect_err("a non-durable exchange is gone");
    // The binding between durable entities survived.
    conn.publish(
        "durable-x",
        "k",
        Message::new("routed"),
        bus_core::PublishOptions::mandatory(),
    )
    .await
    .unwrap();
    let mut c = conn
        .consume("durable", ConsumeOptions::auto_ack())
        .await
        .unwrap();
    let got: Vec<(String, bool)> = [next(&mut c).await, next(&mut c).await, next(&mut c).await]
        .iter()
        .map(|d| (body(d), d.redelivered))
        .collect();
    assert_eq!(
        got,
        vec![
            ("p1".to_owned(), true),
            ("p2".to_owned(), false),
            ("routed".to_owned(), false)
        ]
    );
    let e = other
        .send_to_queue("durable", Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ConnectionLost(_)), "{e}");
}

/// Recovery declares exchange-to-exchange bindings again: after a restart
/// drops the transient exchanges, a recovering connection's fanout to
/// topic binding routes again once it is back.
#[tokio::test(start_paused = true)]
async fn recovery_replays_exchange_bindings() {
    let broker = LocalBroker::with_faults(FaultPlan::none());
    let conn = broker.connect();
    let mut events = conn.events();
    conn.declare_exchange("in", ExchangeKind::Fanout, ExchangeOptions::default())
        .await
        .unwrap();
    conn.declare_exchange("by-topic", ExchangeKind::Topic, ExchangeOptions::default())
        .await
        .unwrap();
    conn.bind_exchange("by-topic", "in", "", FieldTable::new())
        .await
        .unwrap();
    conn.declare_queue("q", QueueOptions::durable())
        .await
        .unwrap();
    conn.bind_queue("q", "by-topic", "a.*", FieldTable::new())
        .await
        .unwrap();
    broker.restart();
    loop {
        match events.recv().await.expect("recovery events") {
            RecoveryEvent::Reconnected { .. } => break,
            RecoveryEvent::TopologyRecoveryFailed { what, error } => {
                panic!("{what} was not declared again: {error}")
            }
            _ => {}
        }
    }
    conn.publish(
        "in",
        "a.b",
        Message::new("through both"),
        bus_core::PublishOptions::mandatory(),
    )
    .await
    .expect("routed through the replayed exchange binding");
    let mut c = conn.consume("q", ConsumeOptions::auto_ack()).await.unwrap();
    assert_eq!(body(&next(&mut c).await), "through both");
}

#[tokio::test(start_paused = true)]
async fn delayed_delivery_arrives_later_and_in_order() {
    let broker =
        LocalBroker::with_faults(FaultPlan::none().on_delivery(1, Duration::from_millis(300)));
    let conn = broker.connect();
    conn.declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    let mut c = conn
        .consume("q", ConsumeOptions::prefetch(10))
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    conn.send_to_queue("q", Message::new("1")).await.unwrap();
    conn.send_to_queue("q", Message::new("2")).await.unwrap();
    assert_eq!(body(&next(&mut c).await), "1");
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    assert_eq!(body(&next(&mut c).await), "2");
    assert!(broker
        .trace()
        .faults()
        .any(|f| f == Fault::DelayDelivery(Duration::from_millis(300))));
}

#[tokio::test(start_paused = true)]
async fn refused_declaration_is_temporary_and_changes_nothing() {
    let broker = LocalBroker::with_faults(FaultPlan::none().on_declare(1));
    let conn = broker.connect();
    let e = conn
        .declare_queue("q", QueueOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::ResourceLocked(_)) && e.is_temporary(),
        "{e}"
    );
    assert_eq!(broker.queue_depth("q"), None);
    conn.declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    assert_eq!(broker.queue_depth("q"), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_plain_broker_can_drop_a_connection_too() {
    let broker = LocalBroker::new();
    let plain = broker.connect();
    assert!(!plain.recovers());
    let recovering = broker.connect_with(Recovery::Enabled);
    plain
        .declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    broker.close_connection(&plain);
    broker.close_connection(&recovering);
    let e = plain
        .send_to_queue("q", Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ConnectionLost(_)), "{e}");
    // Waits for the reconnection (50 ms by default), then succeeds.
    recovering
        .send_to_queue("q", Message::new("y"))
        .await
        .unwrap();
    assert_eq!(recovering.generation(), 2);
    // No plan: no trace.
    assert!(broker.trace().entries.is_empty());
}

#[tokio::test(start_paused = true)]
async fn closing_during_recovery_ends_the_consumers() {
    let broker = LocalBroker::with_faults(FaultPlan::none());
    let conn = broker.connect();
    conn.declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    let mut c = conn
        .consume("q", ConsumeOptions::prefetch(1))
        .await
        .unwrap();
    broker.close_connection(&conn);
    conn.close().await.unwrap();
    assert!(c.next().await.is_none());
    let e = conn
        .send_to_queue("q", Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Closed(_)), "{e}");
    // The trace records the commanded fault.
    assert!(matches!(
        broker.trace().entries[0].event,
        TraceEvent::Fault {
            fault: Fault::CloseConnection,
            ..
        }
    ));
}

/// A quorum queue keeps every message across a restart, persistent or
/// not (RabbitMQ writes all of a quorum queue's messages to disk); a
/// classic durable queue keeps its persistent ones only.
#[tokio::test(start_paused = true)]
async fn restart_keeps_every_message_of_a_quorum_queue() {
    let broker = LocalBroker::with_faults(FaultPlan::none());
    let conn = broker.connect_with(Recovery::Disabled);
    conn.declare_queue(
        "quorum",
        QueueOptions::durable().queue_type(bus_core::QueueType::Quorum),
    )
    .await
    .unwrap();
    conn.declare_queue("classic", QueueOptions::durable())
        .await
        .unwrap();
    for q in ["quorum", "classic"] {
        conn.send_to_queue(q, Message::new("transient"))
            .await
            .unwrap();
        conn.send_to_queue(q, Message::new("persistent").persistent())
            .await
            .unwrap();
    }
    broker.restart();
    assert_eq!(broker.queue_depth("quorum"), Some(2));
    assert_eq!(broker.queue_depth("classic"), Some(1));
}
