//! Faults on a real RabbitMQ: the broker closing a connection mid-stream,
//! a worker's connection killed mid-message. Each asserts that nothing is
//! lost, is bounded in time and count, and leaves the broker as found.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use bus_amqp::{AmqpOptions, ReconnectPolicy, RecoveryEvent};
use bus_core::{
    Connection, ConnectionExt, ConsumeOptions, DeleteExchangeOptions, Error, ExchangeKind,
    ExchangeOptions, FieldTable, Message, PublishOptions, QueueOptions,
};
use futures::StreamExt;
use support::*;

const COUNT: u32 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closing_the_connection_mid_stream_loses_nothing() {
    let name = fresh("conn");
    let conn = connect_with(AmqpOptions::default().with_connection_name(&name)).await;
    let mut events = conn.events();
    let q = fresh("stream");
    conn.declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    // A server-named exclusive queue bound to an exchange of this
    // connection: it dies with the connection and must come back, renamed,
    // with its binding.
    let x = fresh("x");
    conn.declare_exchange(&x, ExchangeKind::Direct, ExchangeOptions::default())
        .await
        .unwrap();
    let private = QueueOptions::default().with_exclusive(true);
    let private_q = conn.declare_queue("", private).await.unwrap().name;
    conn.bind_queue(&private_q, &x, "k", FieldTable::new())
        .await
        .unwrap();
    let mut private_consumer = conn
        .consume(&private_q, ConsumeOptions::auto_ack())
        .await
        .unwrap();

    for i in 0..COUNT / 2 {
        conn.send_to_queue(&q, Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let mut consumer = conn
        .consume(&q, ConsumeOptions::prefetch(10))
        .await
        .unwrap();
    let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
    let take = |d: &bus_core::Delivery, seen: &mut BTreeMap<u32, u32>| {
        let n: u32 = std::str::from_utf8(&d.message.body)
            .unwrap()
            .parse()
            .unwrap();
        let times = seen.entry(n).or_default();
        *times += 1;
        // A message seen twice was delivered again after the loss, and says so.
        assert!(
            *times == 1 || d.redelivered,
            "message {n} delivered twice without redelivered"
        );
    };
    for _ in 0..COUNT / 4 {
        let d = next_delivery(&mut consumer, 10, "a delivery").await;
        take(&d, &mut seen);
        d.ack().await.unwrap();
    }
    // Hold a few unacked deliveries across the loss: they must come back.
    let mut held = Vec::new();
    for _ in 0..5 {
        let d = next_delivery(&mut consumer, 10, "a delivery").await;
        take(&d, &mut seen);
        held.push(d);
    }

    close_connection(&name);
    wait_disconnected(&mut events).await;
    let renamed = wait_event(&mut events, "QueueRenamed", |e| {
        matches!(e, RecoveryEvent::QueueRenamed { .. })
    })
    .await;
    let RecoveryEvent::QueueRenamed { old, new } = renamed else {
        unreachable!()
    };
    assert_eq!(old, private_q);
    assert_ne!(new, private_q);
    wait_event(&mut events, "Reconnected", |e| {
        matches!(e, RecoveryEvent::Reconnected { generation: 2, .. })
    })
    .await;
    assert_eq!(conn.generation(), 2);
    assert_eq!(conn.current_queue_name(&private_q), new);

    // Settling a delivery of the dead channel fails: the broker requeued it.
    for d in &held {
        let e = d.ack().await.unwrap_err();
        assert!(matches!(e, Error::Closed(_)) && !e.is_temporary(), "{e}");
    }
    // The same connection publishes and declares again.
    for i in COUNT / 2..COUNT {
        conn.send_to_queue(&q, Message::new(i.to_string()))
            .await
            .unwrap();
    }
    while seen.len() < COUNT as usize {
        let d = next_delivery(&mut consumer, 20, "the rest of the stream").await;
        take(&d, &mut seen);
        match d.ack().await {
            Ok(()) => {}
            // Handed out just before the old channel died: the broker
            // requeued it and delivers it again, marked redelivered.
            Err(Error::Closed(_)) => {}
            Err(e) => panic!("ack failed: {e}"),
        }
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..COUNT).collect::<Vec<_>>()
    );
    for d in &held {
        let n: u32 = std::str::from_utf8(&d.message.body)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(seen[&n], 2, "held message {n} came back once");
    }
    assert_eq!(conn.inspect_queue(&q).await.unwrap().message_count, 0);

    // The exclusive queue's consumer heard of the loss, then goes on with
    // the renamed queue, which still gets what the exchange routes.
    let lost = within(10, "the loss notice", private_consumer.next())
        .await
        .unwrap();
    assert!(matches!(lost, Err(Error::ConnectionLost(_))), "{lost:?}");
    conn.publish(&x, "k", Message::new("after"), PublishOptions::mandatory())
        .await
        .unwrap();
    let d = next_delivery(&mut private_consumer, 10, "a routed message").await;
    assert_eq!(d.message.body, "after");
    assert_eq!(d.routing_key, "k");

    drop(consumer);
    delete_queue(&*conn, &q).await;
    conn.delete_exchange(&x, DeleteExchangeOptions::default())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_message_goes_to_another_worker() {
    let name = fresh("worker");
    // A worker whose process dies: it does not come back.
    let doomed = connect_with(
        AmqpOptions::default()
            .with_connection_name(&name)
            .with_reconnect(ReconnectPolicy::disabled()),
    )
    .await;
    let survivor = connect().await;
    let q = fresh("work");
    survivor
        .declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    survivor
        .send_to_queue(&q, Message::new("job"))
        .await
        .unwrap();
    let mut doomed_consumer = doomed
        .consume(&q, ConsumeOptions::prefetch(1))
        .await
        .unwrap();
    let d = next_delivery(&mut doomed_consumer, 10, "the job").await;
    assert!(!d.redelivered);
    let mut other = survivor
        .consume(&q, ConsumeOptions::prefetch(1))
        .await
        .unwrap();

    close_connection(&name);
    let again = next_delivery(&mut other, 20, "the job, redelivered").await;
    assert_eq!(again.message.body, "job");
    assert!(again.redelivered);
    again.ack().await.unwrap();
    // The dead worker's stream ends and its connection stays closed.
    assert!(
        within(20, "the end of the dead consumer", doomed_consumer.next())
            .await
            .is_none()
    );
    assert!(!doomed.is_open());
    let e = doomed
        .send_to_queue(&q, Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ConnectionLost(_)), "{e}");
    assert_eq!(survivor.inspect_queue(&q).await.unwrap().message_count, 0);
    drop(other);
    delete_queue(&*survivor, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_calls_in_flight_fail_fast_when_the_connection_is_lost() {
    let name = fresh("rpc-client");
    let client = connect_with(AmqpOptions::default().with_connection_name(&name)).await;
    let mut events = client.events();
    let q = fresh("rpc-silent");
    client
        .declare_queue(&q, QueueOptions::default())
        .await
        .unwrap();
    let replies = client.reply_queue().await.unwrap();
    let publisher = replies.publisher.clone().unwrap();
    let mut reply_consumer = replies.consumer;
    publisher
        .publish(
            "",
            &q,
            Message::new("unanswered")
                .with_reply_to(&replies.address)
                .with_correlation_id("c"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    close_connection(&name);
    // The reply stream reports the loss at once, then goes on.
    let item = within(20, "the loss notice", reply_consumer.next())
        .await
        .unwrap();
    assert!(matches!(item, Err(Error::ConnectionLost(_))), "{item:?}");
    wait_consumer_resumed(&mut events).await;
    // The reply publisher works again on the new channel.
    let server = connect().await;
    let mut requests = server
        .consume(&q, ConsumeOptions::auto_ack())
        .await
        .unwrap();
    let first = next_delivery(&mut requests, 10, "the first request").await;
    assert_eq!(first.message.body, "unanswered");
    publisher
        .publish(
            "",
            &q,
            Message::new("second")
                .with_reply_to(&replies.address)
                .with_correlation_id("c2"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    let req = next_delivery(&mut requests, 10, "the second request").await;
    let reply_to = req.message.properties.reply_to.clone().unwrap();
    server
        .publish(
            "",
            &reply_to,
            Message::new("answer").with_correlation_id("c2"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    let reply = next_delivery(&mut reply_consumer, 10, "the reply").await;
    assert_eq!(reply.message.body, "answer");
    drop(requests);
    delete_queue(&*server, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_in_flight_when_the_connection_drops_never_report_success_falsely() {
    let name = fresh("publisher");
    let conn = connect_with(AmqpOptions::default().with_connection_name(&name)).await;
    let mut events = conn.events();
    let q = fresh("confirms");
    conn.declare_queue(&q, QueueOptions::durable())
        .await
        .unwrap();
    let publishing = {
        let conn = conn.clone();
        let q = q.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..2000u32 {
                let r = conn
                    .send_to_queue(&q, Message::new(i.to_string()).persistent())
                    .await;
                outcomes.push((i, r));
                if outcomes.len() == 300 {
                    tokio::task::yield_now().await;
                }
            }
            outcomes
        })
    };
    // Close the connection while the publisher is busy.
    while conn
        .inspect_queue(&q)
        .await
        .map(|i| i.message_count)
        .unwrap_or(0)
        < 100
    {
        tokio::task::yield_now().await;
    }
    close_connection(&name);
    wait_reconnected(&mut events).await;
    let outcomes = within(60, "the publisher", publishing).await.unwrap();
    let confirmed = confirmed(&outcomes);
    for (i, r) in &outcomes {
        if let Err(e) = r {
            assert!(e.is_temporary(), "message {i}: {e}");
        }
    }
    // Every confirmed message is in the queue exactly once.
    let total = conn.inspect_queue(&q).await.unwrap().message_count;
    let mut consumer = conn
        .consume(&q, ConsumeOptions::prefetch(100))
        .await
        .unwrap();
    let got = consume_counting(&mut consumer, total, 20).await;
    assert_each_confirmed_consumed_once(&confirmed, &got);
    drop(consumer);
    delete_queue(&*conn, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connection_fails_everything_with_closed() {
    let conn: Arc<dyn Connection> = connect().await;
    let q = conn
        .declare_queue("", QueueOptions::default().with_exclusive(true))
        .await
        .unwrap()
        .name;
    let mut c = conn.consume(&q, ConsumeOptions::auto_ack()).await.unwrap();
    conn.close().await.unwrap();
    assert!(!conn.is_open());
    assert!(within(10, "the end of the stream", c.next())
        .await
        .is_none());
    let e = conn.send_to_queue(&q, Message::new("x")).await.unwrap_err();
    assert!(matches!(e, Error::Closed(_)), "{e}");
    let e = conn
        .declare_queue("", QueueOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Closed(_)), "{e}");
}
