//! The test conveniences, named brokers, and determinism.

mod common;

use std::sync::{Arc, Mutex};

use bus_core::{
    Connection, ConsumeOptions, ExchangeKind, FieldValue, Message, PublishOptions, Requeue,
};
use bus_local::LocalBroker;
use common::*;
use futures::StreamExt;

#[tokio::test(start_paused = true)]
async fn named_brokers_are_shared_by_name() {
    let a = LocalBroker::named("conveniences-shared");
    let b = LocalBroker::named("conveniences-shared");
    let other = LocalBroker::named("conveniences-other");
    let conn = a.connect();
    queue(&conn, "q").await;
    send(&conn, "q", "x").await;
    assert_eq!(b.queue_depth("q"), Some(1));
    assert_eq!(other.queue_depth("q"), None);
    assert!(format!("{a:?}").contains("conveniences-shared"));
}

#[tokio::test(start_paused = true)]
async fn depth_and_unacked_counts() {
    let (b, conn) = setup();
    assert_eq!(b.queue_depth("q"), None);
    assert_eq!(b.unacked_count("q"), None);
    queue(&conn, "q").await;
    for i in 0..3 {
        send(&conn, "q", &i.to_string()).await;
    }
    assert_eq!(
        (b.queue_depth("q"), b.unacked_count("q")),
        (Some(3), Some(0))
    );
    let mut c = consume(&conn, "q", 2).await;
    assert_eq!(
        (b.queue_depth("q"), b.unacked_count("q")),
        (Some(1), Some(2))
    );
    next(&mut c).await.ack().await.unwrap();
    assert_eq!(
        (b.queue_depth("q"), b.unacked_count("q")),
        (Some(0), Some(2))
    );
}

#[tokio::test(start_paused = true)]
async fn published_records_what_reached_an_exchange() {
    let (b, conn) = setup();
    exchange(&conn, "events", ExchangeKind::Topic).await;
    exchange(&conn, "dlx", ExchangeKind::Fanout).await;
    conn.publish(
        "events",
        "before",
        Message::new("0"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    b.record_exchange("events");
    b.record_exchange("dlx");
    b.record_exchange("");
    queue(&conn, "orders").await;
    bind(&conn, "orders", "events", "order.*").await;
    conn.publish(
        "events",
        "order.created",
        Message::new("1"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    // Unrouted messages are recorded too.
    conn.publish(
        "events",
        "user.created",
        Message::new("2"),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let got: Vec<_> = b
        .published("events")
        .into_iter()
        .map(|(k, m)| (k, m.body))
        .collect();
    assert_eq!(
        got,
        vec![
            ("order.created".to_string(), bus_core::Bytes::from("1")),
            ("user.created".to_string(), bus_core::Bytes::from("2")),
        ]
    );
    assert!(b.published("nothing").is_empty());
    // Dead letters count as published to their exchange.
    queue_with(
        &conn,
        "dl-src",
        bus_core::QueueOptions::default().dead_letter_to("dlx"),
    )
    .await;
    send(&conn, "dl-src", "rejected").await;
    let mut c = consume(&conn, "dl-src", 1).await;
    next(&mut c).await.reject(Requeue::No).await.unwrap();
    let dead = b.published("dlx");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, "dl-src");
    assert!(dead[0].1.properties.headers.contains_key("x-death"));
    assert_eq!(b.published("").len(), 1);
}

#[tokio::test]
async fn wait_idle_lets_consumers_take_their_deliveries() {
    let (b, conn) = setup();
    queue(&conn, "in").await;
    queue(&conn, "out").await;
    // A service: reads "in", publishes to "out", acks.
    let mut c = consume(&conn, "in", 5).await;
    let service_conn = conn.clone();
    let service = tokio::spawn(async move {
        while let Some(Ok(d)) = c.next().await {
            let reply = format!("done {}", body(&d));
            service_conn
                .publish("", "out", Message::new(reply), PublishOptions::default())
                .await
                .unwrap();
            d.ack().await.unwrap();
        }
    });
    for i in 0..20 {
        send(&conn, "in", &i.to_string()).await;
    }
    b.wait_idle().await;
    assert_eq!(b.queue_depth("out"), Some(20));
    assert_eq!(
        (b.queue_depth("in"), b.unacked_count("in")),
        (Some(0), Some(0))
    );
    conn.close().await.unwrap();
    service.await.unwrap();
    // Nothing in flight: returns at once.
    b.wait_idle().await;
}

/// One full run of a scenario with competing consumers on several queues,
/// redeliveries and dead-lettering, on a fresh broker; returns the trace of
/// every delivery as each consumer saw it, in the order they happened.
async fn scenario() -> Vec<String> {
    let broker = LocalBroker::new();
    let admin = broker.connect();
    let trace = Arc::new(Mutex::new(Vec::new()));
    exchange(&admin, "jobs", ExchangeKind::Topic).await;
    exchange(&admin, "dlx", ExchangeKind::Fanout).await;
    queue(&admin, "failed").await;
    bind(&admin, "failed", "dlx", "").await;
    for (q, pattern) in [("images", "image.*"), ("texts", "text.#"), ("all", "#")] {
        queue_with(
            &admin,
            q,
            bus_core::QueueOptions::default().dead_letter_to("dlx"),
        )
        .await;
        bind(&admin, q, "jobs", pattern).await;
    }
    let mut workers = Vec::new();
    for (name, q, prefetch) in [
        ("img-a", "images", 1),
        ("img-b", "images", 2),
        ("img-c", "images", 1),
        ("txt-a", "texts", 3),
        ("txt-b", "texts", 0),
        ("all", "all", 4),
        ("failed", "failed", 0),
    ] {
        let conn = broker.connect();
        let mut consumer = conn
            .consume(q, ConsumeOptions::prefetch(prefetch))
            .await
            .unwrap();
        let trace = trace.clone();
        workers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while let Some(Ok(d)) = consumer.next().await {
                n += 1;
                trace.lock().unwrap().push(format!(
                    "{name} {} {} {}",
                    d.routing_key,
                    body(&d),
                    d.redelivered
                ));
                // Every third delivery is requeued once, every seventh is
                // rejected to the dead-letter queue; the rest are acked.
                if n % 3 == 0 && !d.redelivered {
                    d.nack(Requeue::Yes).await.unwrap();
                } else if n % 7 == 0 && name != "failed" {
                    d.reject(Requeue::No).await.unwrap();
                } else {
                    d.ack().await.unwrap();
                }
                tokio::task::yield_now().await;
            }
            drop(conn);
        }));
    }
    let keys = [
        "image.png",
        "text.plain",
        "image.jpg",
        "text.html.utf8",
        "audio.wav",
    ];
    for i in 0..60 {
        let key = keys[i % keys.len()];
        admin
            .publish(
                "jobs",
                key,
                Message::new(format!("job{i}")).with_header("n", FieldValue::I32(i as i32)),
                PublishOptions::default(),
            )
            .await
            .unwrap();
        if i % 10 == 0 {
            tokio::task::yield_now().await;
        }
    }
    broker.wait_idle().await;
    for q in ["images", "texts", "all", "failed"] {
        assert_eq!(broker.queue_depth(q), Some(0), "{q} drained");
        assert_eq!(broker.unacked_count(q), Some(0), "{q} settled");
    }
    for q in ["images", "texts", "all", "failed"] {
        admin.delete_queue(q, Default::default()).await.unwrap();
    }
    for w in workers {
        w.await.unwrap();
    }
    let trace = trace.lock().unwrap().clone();
    trace
}

#[tokio::test]
async fn the_same_scenario_delivers_the_same_way_every_run() {
    let first = scenario().await;
    // 24 images, 24 texts, 60 for "all", plus redeliveries and dead letters.
    assert!(first.len() > 108, "{} deliveries", first.len());
    assert!(
        first.iter().any(|l| l.ends_with(" true")),
        "some redeliveries"
    );
    assert!(
        first.iter().any(|l| l.starts_with("failed ")),
        "some dead letters"
    );
    for name in ["img-a", "img-b", "img-c", "txt-a", "txt-b"] {
        assert!(
            first.iter().any(|l| l.starts_with(name)),
            "{name} took part"
        );
    }
    for _ in 0..3 {
        assert_eq!(scenario().await, first);
    }
}

/// Uses any connection through the trait and its conveniences, on a task of
/// its own (so every future involved is `Send`).
async fn round_trip<C: Connection + Clone>(conn: C, queue: &str) -> Vec<u8> {
    use bus_core::{ConnectionExt, QueueOptions};
    conn.declare_queue(queue, QueueOptions::default())
        .await
        .unwrap();
    let task = {
        let conn = conn.clone();
        let queue = queue.to_owned();
        tokio::spawn(async move {
            conn.send_to_queue(&queue, Message::new(queue.clone()))
                .await
                .unwrap();
            assert!(conn.exchange_exists("").await.unwrap());
            assert!(!conn.exchange_exists("no-such-exchange").await.unwrap());
            conn.inspect_queue(&queue).await.unwrap().message_count
        })
    };
    assert_eq!(task.await.unwrap(), 1, "{queue}: one message waits");
    let mut c = conn
        .consume(queue, ConsumeOptions::auto_ack())
        .await
        .unwrap();
    let d = c.next().await.unwrap().unwrap();
    d.body().to_vec()
}

#[tokio::test(start_paused = true)]
async fn smart_pointers_to_connections_are_connections() {
    let broker = LocalBroker::new();
    let concrete = Arc::new(broker.connect());
    assert_eq!(round_trip(concrete.clone(), "arc").await, b"arc");
    let shared: Arc<dyn Connection> = concrete.clone();
    assert_eq!(round_trip(shared, "arc-dyn").await, b"arc-dyn");
    let boxed: Arc<Box<dyn Connection>> = Arc::new(Box::new(broker.connect()));
    assert_eq!(round_trip(boxed.clone(), "box-dyn").await, b"box-dyn");
    assert_eq!(boxed.capabilities().name, "local");
    boxed.close().await.unwrap();
    assert!(!boxed.is_open(), "close goes through the box");
    assert!(concrete.is_open(), "another connection stays open");
}

#[tokio::test(start_paused = true)]
async fn publish_now_publishes_at_once_or_hands_the_message_back() {
    use bus_core::{ConnectionExt, PublishNow};
    let broker = LocalBroker::new();
    let local = broker.connect();
    queue(&local, "q").await;
    let conn: Arc<dyn Connection> = Arc::new(local);
    // Through `Arc<dyn Connection>`: done before anything is awaited.
    let done = conn.publish_now("", "q", Message::new("a"), PublishOptions::default());
    assert!(matches!(done, PublishNow::Done(Ok(()))), "{done:?}");
    assert_eq!(broker.queue_depth("q"), Some(1));
    // Errors come back as `publish` gives them.
    let missing = conn.publish_now("nope", "q", Message::new("b"), PublishOptions::default());
    assert!(
        matches!(missing, PublishNow::Done(Err(bus_core::Error::NotFound(_)))),
        "{missing:?}"
    );

    // A broker with a fault plan waits: the message comes back untouched,
    // and nothing was published.
    let faulty = LocalBroker::with_faults(bus_local::FaultPlan::none());
    let slow = faulty.connect();
    queue(&slow, "q").await;
    match slow.publish_now("", "q", Message::new("c"), PublishOptions::default()) {
        PublishNow::Wait(m) => assert_eq!(&m.body[..], b"c"),
        other => panic!("expected the message back, got {other:?}"),
    }
    assert_eq!(faulty.queue_depth("q"), Some(0));
    // `send_to_queue` then takes the awaited path.
    slow.send_to_queue("q", Message::new("c")).await.unwrap();
    assert_eq!(faulty.queue_depth("q"), Some(1));

    // An ack settles at once (`Acknowledger::ack_now`); a second is refused.
    let mut c = conn
        .consume("q", ConsumeOptions::prefetch(1))
        .await
        .unwrap();
    let d = c.next().await.unwrap().unwrap();
    d.ack().await.unwrap();
    assert_eq!(broker.queue_depth("q"), Some(0));
    assert_eq!(broker.unacked_count("q"), Some(0));
    assert!(d.ack().await.is_err());
}
