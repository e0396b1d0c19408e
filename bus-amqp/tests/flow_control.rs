//! Flow control on a real RabbitMQ: a memory alarm raised with
//! `rabbitmqctl set_vm_memory_high_watermark` on an extra node started by
//! this test (port 5691, `bus-f1@localhost`), never on the shared default
//! node. Publishes and topology calls end within their deadlines with a
//! clear temporary error, the block and its end are events, and a publish
//! the application gave up on while blocked is never sent.

mod support;

use std::time::Duration;

use bus_amqp::{AmqpConnection, AmqpOptions, RecoveryEvent};
use bus_core::{Connection, ConnectionExt, ConsumeOptions, Error, Message, QueueOptions};
use support::cluster::Cluster;
use support::*;

const DEADLINE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocks_publishers_with_events_and_deadlines() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start("f", 5691, 1))
        .await
        .expect("start the node");
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
    tokio::task::block_in_place(|| drop(cluster));
}
