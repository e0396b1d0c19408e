//! Plugin exchange types (`ExchangeKind::Custom`), on an extra node started
//! by this test (port 5689, `bus-px1@localhost`, with
//! `rabbitmq_consistent_hash_exchange` enabled and no delayed-message
//! plugin), never on the shared default node.
//!
//! A custom type the node provides is passed through and routes as the
//! plugin does, also after a recovery declares it again; a type it lacks
//! is refused with a permanent `NotSupported` naming it. RabbitMQ closes
//! the whole connection over an unknown type: the connection recovers and
//! its consumers resume.

mod support;

use std::collections::BTreeSet;

use bus_amqp::{AmqpConnection, AmqpOptions};
use bus_core::{
    Connection, ConnectionExt, ConsumeOptions, Consumer, Error, ExchangeKind, ExchangeOptions,
    FieldTable, Message, PublishOptions, QueueOptions,
};
use support::cluster::Cluster;
use support::*;

/// How many messages go through the consistent-hash exchange each round.
const MESSAGES: usize = 40;

/// Publishes `MESSAGES` messages with distinct routing keys through `x`,
/// then a marker straight to each queue, and returns how many of the
/// messages each queue received, checking that each came exactly once.
async fn route_round(
    conn: &AmqpConnection,
    x: &str,
    queues: &[String],
    consumers: &mut [Consumer],
    round: &str,
) -> Vec<usize> {
    for i in 0..MESSAGES {
        conn.publish(
            x,
            &format!("{round}-key-{i}"),
            Message::new(format!("{round}-{i}")),
            PublishOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{round}: publish {i}: {e:?}"));
    }
    // Behind the routed messages on each queue: once it arrives, no other
    // copy is on its way.
    for q in queues {
        conn.send_to_queue(q, Message::new("marker")).await.unwrap();
    }
    let mut seen = BTreeSet::new();
    let mut per_queue = Vec::new();
    for c in consumers.iter_mut() {
        let mut n = 0;
        loop {
            let d = next_delivery(c, 20, round).await;
            let body = String::from_utf8(d.message.body.to_vec()).unwrap();
            if body == "marker" {
                break;
            }
            assert!(seen.insert(body.clone()), "{round}: {body} came twice");
            n += 1;
        }
        per_queue.push(n);
    }
    assert_eq!(seen.len(), MESSAGES, "{round}: every message arrives once");
    per_queue
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_exchange_type_is_passed_through_and_an_unknown_one_is_refused_for_good() {
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start_with_plugins("px", 5689, 1, "", &["rabbitmq_consistent_hash_exchange"])
    })
    .await
    .expect("start the node");
    let conn = AmqpConnection::connect_with(&cluster.node_url(0), AmqpOptions::default())
        .await
        .expect("connect to the extra node");
    let mut events = conn.events();

    // The consistent-hash exchange puts each message in exactly one of its
    // queues (binding keys are weights).
    let x = fresh("hash");
    let hash = ExchangeKind::custom("x-consistent-hash");
    conn.declare_exchange(&x, hash.clone(), ExchangeOptions::default())
        .await
        .expect("declare an x-consistent-hash exchange");
    conn.declare_exchange(&x, hash.clone(), ExchangeOptions::default())
        .await
        .expect("redeclaring it with the same type is a no-op");
    let e = conn
        .declare_exchange(&x, ExchangeKind::Direct, ExchangeOptions::default())
        .await
        .expect_err("redeclare the x-consistent-hash exchange as direct");
    assert!(
        matches!(&e, Error::PreconditionFailed(m) if m.contains("x-consistent-hash")),
        "{e:?}"
    );
    let queues = [fresh("hash-a"), fresh("hash-b")];
    let mut consumers = Vec::new();
    for q in &queues {
        conn.declare_queue(q, QueueOptions::default())
            .await
            .unwrap();
        conn.bind_queue(q, &x, "1", FieldTable::new())
            .await
            .unwrap();
        consumers.push(conn.consume(q, ConsumeOptions::auto_ack()).await.unwrap());
    }
    let first = route_round(&conn, &x, &queues, &mut consumers, "before").await;
    assert!(
        first.iter().all(|&n| n > 0),
        "the hash spreads {MESSAGES} keys over both queues: {first:?}"
    );

    // Deleted behind the connection's back, with its bindings: only the
    // recovery below can bring them back.
    let other = AmqpConnection::connect_with(&cluster.node_url(0), AmqpOptions::default())
        .await
        .expect("a second connection");
    other
        .delete_exchange(&x, Default::default())
        .await
        .expect("delete the exchange out of band");
    assert!(!other.exchange_exists(&x).await.unwrap());

    // A type the node lacks: refused for good, naming it, and nothing is
    // created. The broker closed the connection over it; it recovers.
    let delayed = fresh("delayed");
    let e = conn
        .declare_exchange(
            &delayed,
            ExchangeKind::custom("x-delayed-message"),
            ExchangeOptions::default(),
        )
        .await
        .expect_err("declare an x-delayed-message exchange without its plugin");
    assert!(
        matches!(&e, Error::NotSupported(m) if m.contains("x-delayed-message") && m.contains("plugin")),
        "{e:?}"
    );
    assert!(!e.is_temporary(), "{e:?}");
    wait_disconnected(&mut events).await;
    wait_reconnected(&mut events).await;
    wait_consumer_resumed(&mut events).await;
    wait_consumer_resumed(&mut events).await;
    assert!(
        !conn.exchange_exists(&delayed).await.unwrap(),
        "the refused declaration created the exchange"
    );

    // The recovery declared the consistent-hash exchange, its bindings and
    // consumers again: it routes as before.
    assert!(
        other.exchange_exists(&x).await.unwrap(),
        "the recovery declared the exchange again"
    );
    let second = route_round(&conn, &x, &queues, &mut consumers, "after").await;
    assert!(
        second.iter().all(|&n| n > 0),
        "after recovery the hash still spreads over both queues: {second:?}"
    );
    for q in &queues {
        conn.delete_queue(q, Default::default()).await.unwrap();
    }
    conn.close().await.unwrap();
    other.close().await.unwrap();
    drop(cluster);
}
