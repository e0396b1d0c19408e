//! The broker's consumer timeout, on an extra node started by this test
//! (port 5697, `bus-ct1@localhost`), never on the shared default node.
//!
//! RabbitMQ 3.10 ignores the per-consumer `x-consumer-timeout` argument
//! and applies its node-wide `consumer_timeout`, checked on every channel
//! tick: the node runs with a 1 s timeout and a 500 ms tick. A manual-ack
//! consumer that holds a delivery past it has its channel closed by the
//! broker (406 PRECONDITION_FAILED); the consumer starts again on a new
//! channel of the same stream, the message comes again marked
//! redelivered, and only the stale delivery's ack fails.

mod support;

use std::time::Duration;

use bus_amqp::{AmqpConnection, AmqpOptions, RecoveryEvent};
use bus_core::{Connection, ConnectionExt, ConsumeOptions, Error, Message, QueueOptions};
use support::cluster::Cluster;
use support::*;

/// The node's `consumer_timeout`, in milliseconds.
const TIMEOUT_MS: u64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_closed_by_the_brokers_consumer_timeout_resumes_and_gets_the_message_again() {
    let cluster = tokio::task::spawn_blocking(|| {
        let cluster =
            Cluster::start_with("ct", 5697, 1, &format!("consumer_timeout = {TIMEOUT_MS}"));
        // `channel_tick_interval` has no `rabbitmq.conf` key; channels
        // read it when they open, so it is set before the client connects.
        cluster.ctl(
            0,
            &[
                "eval",
                "application:set_env(rabbit, channel_tick_interval, 500).",
            ],
        );
        let timeout = cluster.ctl(
            0,
            &["eval", "application:get_env(rabbit, consumer_timeout)."],
        );
        assert!(
            timeout.contains(&TIMEOUT_MS.to_string()),
            "the node's consumer_timeout is {timeout:?}"
        );
        cluster
    })
    .await
    .expect("start the node");

    let conn = AmqpConnection::connect_with(&cluster.node_url(0), AmqpOptions::default())
        .await
        .expect("connect to the extra node");
    let mut events = conn.events();
    let q = fresh("timeout");
    conn.declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    conn.send_to_queue(&q, Message::new("long job"))
        .await
        .unwrap();
    // Prefetch 1: the broker delivers the next message only once the
    // previous one is settled, so a later delivery proves an ack arrived.
    let options = ConsumeOptions::prefetch(1).consumer_timeout(Duration::from_millis(TIMEOUT_MS));
    let mut consumer = conn.consume(&q, options).await.unwrap();

    let stale = next_delivery(&mut consumer, 10, "the first delivery").await;
    assert_eq!(&stale.message.body[..], b"long job");
    assert!(!stale.redelivered, "a first delivery marked redelivered");

    // Held unacked: the broker closes the channel after the timeout (at
    // the next tick) and requeues the message; the same stream delivers it
    // again from the consumer's new channel.
    let again = next_delivery(&mut consumer, 30, "the redelivery after the timeout").await;
    assert_eq!(&again.message.body[..], b"long job");
    assert!(
        again.redelivered,
        "the message requeued by the consumer timeout is not marked redelivered"
    );
    assert!(
        again.delivery_tag > stale.delivery_tag,
        "delivery tags went backwards across channels: {} then {}",
        stale.delivery_tag,
        again.delivery_tag
    );
    match wait_event(&mut events, "ConsumerResumed", |e| {
        matches!(e, RecoveryEvent::ConsumerResumed { .. })
    })
    .await
    {
        RecoveryEvent::ConsumerResumed {
            consumer_tag,
            queue,
        } => {
            assert_eq!(consumer_tag, consumer.tag());
            assert_eq!(queue, q);
        }
        _ => unreachable!(),
    }

    // The stale delivery's channel is gone: its ack is an error, not a
    // silent success.
    let e = within(10, "the stale ack", stale.ack()).await.unwrap_err();
    assert!(
        matches!(&e, Error::Closed(m) if m.contains("406") && m.contains("timed out")),
        "acking the delivery of the timed-out channel gave {e:?}"
    );
    println!("the stale ack: {e}");

    // The redelivery settles normally on the new channel: with prefetch 1
    // the next message comes only once the broker has that ack.
    within(10, "the ack of the redelivery", again.ack())
        .await
        .expect("ack the redelivery");
    conn.send_to_queue(&q, Message::new("next job"))
        .await
        .unwrap();
    let next = next_delivery(&mut consumer, 10, "the next message").await;
    assert_eq!(&next.message.body[..], b"next job");
    assert!(!next.redelivered);
    within(10, "the ack of the next message", next.ack())
        .await
        .expect("ack the next message");

    drop(consumer);
    let _ = conn.delete_queue(&q, Default::default()).await;
    let _ = conn.close().await;
    tokio::task::block_in_place(|| drop(cluster));
}
