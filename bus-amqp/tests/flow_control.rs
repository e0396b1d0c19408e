//! The broker's limits, on an extra node started by this test (port 5691,
//! `bus-f1@localhost`, `max_message_size` 1 MiB), never on the shared
//! default node:
//!
//! * flow control: a memory alarm raised with `rabbitmqctl
//!   set_vm_memory_high_watermark`. Publishes and topology calls end
//!   within their deadlines with a clear temporary error, the block and
//!   its end are events, and a publish the application gave up on while
//!   blocked is never sent;
//! * the broker's message size limit: the message over it fails for good,
//!   the others in flight do not, and the limit is adopted.

mod support;

use std::time::Duration;

use bus_amqp::{AmqpConnection, AmqpOptions, RecoveryEvent};
use bus_core::{Connection, ConnectionExt, ConsumeOptions, Error, Message, QueueOptions};
use support::cluster::Cluster;
use support::*;

const DEADLINE: Duration = Duration::from_secs(2);

/// The node's `max_message_size`.
const BROKER_MAX: usize = 1 << 20;

/// One node for both scenarios: starting one costs seconds of CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_limits_are_reported_clearly_and_harm_no_other_message() {
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start_with("f", 5691, 1, &format!("max_message_size = {BROKER_MAX}"))
    })
    .await
    .expect("start the node");
    let cluster = a_memory_alarm_blocks_publishers_with_events_and_deadlines(cluster).await;
    an_oversized_message_fails_alone_and_the_limit_is_adopted(&cluster).await;
    tokio::task::block_in_place(|| drop(cluster));
}

async fn an_oversized_message_fails_alone_and_the_limit_is_adopted(cluster: &Cluster) {
    let conn = AmqpConnection::connect_with(&cluster.node_url(0), AmqpOptions::default())
        .await
        .expect("connect to the extra node");
    let q = fresh("size");
    conn.declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    // Small messages in flight with one over the broker's limit, which
    // closes the publisher channel under all of them.
    let small = (0..20).map(|i| conn.send_to_queue(&q, Message::new(format!("small {i}"))));
    let big = conn.send_to_queue(&q, Message::new(vec![7u8; BROKER_MAX + 1]));
    let (big, small) = within(
        30,
        "the publishes",
        futures::future::join(big, futures::future::join_all(small)),
    )
    .await;
    let e = big.unwrap_err();
    assert!(
        matches!(&e, Error::PreconditionFailed(m) if m.contains("max size")),
        "the oversized message gave {e:?}"
    );
    assert!(
        !e.is_temporary(),
        "an oversized message must not be retried"
    );
    // The others are confirmed, or failed with a temporary error (outcome
    // unknown): retried, they succeed.
    let mut retried = 0;
    for (i, r) in small.into_iter().enumerate() {
        match r {
            Ok(()) => {}
            Err(e) => {
                assert!(e.is_temporary(), "small message {i} failed for good: {e:?}");
                retried += 1;
                conn.send_to_queue(&q, Message::new(format!("small {i}")))
                    .await
                    .unwrap();
            }
        }
    }
    println!("{retried} of 20 small publishes in flight had to be retried");
    // The limit is known now: the next oversized message is refused
    // before sending, and publishing goes on.
    let e = conn
        .send_to_queue(&q, Message::new(vec![7u8; BROKER_MAX + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::PreconditionFailed(m) if m.contains("not sent")),
        "the second oversized message gave {e:?}"
    );
    conn.send_to_queue(&q, Message::new(vec![1u8; BROKER_MAX]))
        .await
        .expect("a message at the limit");
    let info = conn.inspect_queue(&q).await.unwrap();
    assert!(info.message_count >= 21, "{info:?}");
    let _ = conn.delete_queue(&q, Default::default()).await;
    let _ = conn.close().await;
}

async fn a_memory_alarm_blocks_publishers_with_events_and_deadlines(cluster: Cluster) -> Cluster {
    let options = AmqpOptions::default()
        .with_connection_name(fresh("blocked"))
        .with_publish_timeout(DEADLINE)
        .with_operation_timeout(DEADLINE);
    let conn = AmqpConnection::connect_with(&cluster.node_url(0), options)
        .await
        .expect("connect to the extra node");
    let mut events = conn.events();
    let q = fresh("blocked");
    conn.declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    conn.send_to_queue(&q, Message::new("before"))
        .await
        .unwrap();

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.ctl(0, &["set_vm_memory_high_watermark", "0.0000001"]);
        cluster
    })
    .await
    .unwrap();

    // RabbitMQ blocks a connection when it next publishes: this first
    // publish meets the block, and fails within its deadline (it was
    // handed over before the block was known: outcome unknown).
    let probe = within(10, "the first publish under the alarm", async {
        conn.send_to_queue(&q, Message::new("probe")).await
    })
    .await;
    match &probe {
        Err(Error::Timeout(d)) => assert_eq!(*d, DEADLINE),
        Err(Error::Blocked(_)) => {}
        other => panic!("a publish under a memory alarm gave {other:?}"),
    }
    assert!(probe.unwrap_err().is_temporary());
    let reason = match wait_event(&mut events, "Blocked", |e| {
        matches!(e, RecoveryEvent::Blocked { .. })
    })
    .await
    {
        RecoveryEvent::Blocked { reason } => reason,
        _ => unreachable!(),
    };
    assert!(reason.contains("memory"), "blocked because {reason:?}");

    // Blocked now: a publish waits unsent and fails with `Blocked` at its
    // deadline.
    let started = std::time::Instant::now();
    let e = within(10, "a publish while blocked", async {
        conn.send_to_queue(&q, Message::new("given-up")).await
    })
    .await
    .unwrap_err();
    assert!(
        matches!(&e, Error::Blocked(m) if m.contains("not sent")),
        "a publish while blocked gave {e:?}"
    );
    assert!(e.is_temporary());
    assert!(started.elapsed() >= DEADLINE);
    // One the application gives up on itself (drops) is not sent either.
    let dropped = tokio::time::timeout(Duration::from_millis(300), async {
        conn.send_to_queue(&q, Message::new("dropped")).await
    })
    .await;
    assert!(
        dropped.is_err(),
        "a publish while blocked finished: {dropped:?}"
    );
    // Topology calls are bounded the same way.
    let e = within(10, "inspect while blocked", conn.inspect_queue(&q))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Blocked(_)),
        "inspect while blocked gave {e:?}"
    );

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.ctl(0, &["set_vm_memory_high_watermark", "0.4"]);
        cluster
    })
    .await
    .unwrap();
    wait_event(&mut events, "Unblocked", |e| {
        matches!(e, RecoveryEvent::Unblocked)
    })
    .await;
    conn.send_to_queue(&q, Message::new("after")).await.unwrap();

    // Everything this connection sent before "after" is in the queue
    // before it: "given-up" and "dropped" must not be there.
    let mut consumer = conn
        .consume(&q, ConsumeOptions::prefetch(10))
        .await
        .unwrap();
    let mut bodies = Vec::new();
    loop {
        let d = next_delivery(&mut consumer, 10, "the messages").await;
        let body = String::from_utf8(d.message.body.to_vec()).unwrap();
        d.ack().await.unwrap();
        let last = body == "after";
        bodies.push(body);
        if last {
            break;
        }
    }
    assert_eq!(bodies.first().map(String::as_str), Some("before"));
    assert!(
        !bodies.iter().any(|b| b == "given-up" || b == "dropped"),
        "a publish given up on while blocked was sent: {bodies:?}"
    );
    println!("delivered after the alarm: {bodies:?}");
    drop(consumer);
    let _ = conn.delete_queue(&q, Default::default()).await;
    let _ = conn.close().await;
    cluster
}
