//! A full restart of the broker application (`rabbitmqctl stop_app` /
//! `start_app`) while publishing persistent messages to a durable queue with
//! confirms. Its own test binary: the restart would disturb any test
//! running beside it.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_amqp::{AmqpOptions, ReconnectPolicy, RecoveryEvent};
use bus_core::{
    Connection, ConnectionExt, ConsumeOptions, DeleteQueueOptions, Message, QueueOptions,
};
use futures::StreamExt;
use support::*;

/// At most this many messages; publishing stops earlier, once enough were
/// confirmed after the restart.
const MESSAGES: u32 = 100_000;
const IN_FLIGHT: usize = 16;

/// Starts the broker application again whatever happens to the test.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["await_startup", "--timeout", "60"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_while_publishing_loses_no_confirmed_message() {
    let name = fresh("restart");
    let conn = connect_with(
        AmqpOptions::default()
            .with_connection_name(&name)
            .with_reconnect(ReconnectPolicy {
                initial: Duration::from_millis(100),
                max: Duration::from_millis(500),
                max_attempts: Some(240),
            })
            // Publishes started while the broker is down fail after this
            // wait instead of hanging: they must be reported, not lost.
            .with_recovery_wait(Duration::from_secs(1)),
    )
    .await;
    let mut events = conn.events();
    let q = fresh("durable");
    conn.declare_queue(&q, QueueOptions::durable())
        .await
        .unwrap();

    // Counts confirms, so that the test waits on them rather than on time.
    let (confirmed_so_far, mut confirms) = tokio::sync::watch::channel(0u32);
    let confirmed_so_far = Arc::new(confirmed_so_far);
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = {
        let conn = conn.clone();
        let q = q.clone();
        let confirmed_so_far = confirmed_so_far.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            futures::stream::iter(0..MESSAGES)
                .take_while(move |_| futures::future::ready(!stop.load(Ordering::Relaxed)))
                .map(|i| {
                    let conn = conn.clone();
                    let q = q.clone();
                    let confirmed_so_far = confirmed_so_far.clone();
                    async move {
                        let r = conn
                            .send_to_queue(&q, Message::new(i.to_string()).persistent())
                            .await;
                        if r.is_ok() {
                            confirmed_so_far.send_modify(|n| *n += 1);
                        }
                        (i, r)
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .collect::<Vec<_>>()
                .await
        })
    };
    within(60, "300 confirms", confirms.wait_for(|n| *n >= 300))
        .await
        .unwrap();
    let guard = RestartGuard;
    let stopped = tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]));
    wait_event(&mut events, "Disconnected", |e| {
        matches!(e, RecoveryEvent::Disconnected { .. })
    })
    .await;
    within(120, "stop_app", stopped).await.unwrap();
    within(
        120,
        "start_app",
        tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"])),
    )
    .await
    .unwrap();
    drop(guard);
    wait_event(&mut events, "Reconnected", |e| {
        matches!(e, RecoveryEvent::Reconnected { .. })
    })
    .await;
    let after_restart = *confirms.borrow() + 300;
    within(
        60,
        "publishes after the restart",
        confirms.wait_for(|n| *n >= after_restart),
    )
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);

    let outcomes = within(180, "the publisher", publishing).await.unwrap();
    assert!(
        outcomes.len() < MESSAGES as usize,
        "publishing went on to the end"
    );
    let mut failed = 0;
    for (i, r) in &outcomes {
        if let Err(e) = r {
            failed += 1;
            assert!(
                e.is_temporary(),
                "message {i} failed with a permanent error: {e}"
            );
        }
    }
    let confirmed: Vec<u32> = outcomes
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| *i)
        .collect();
    assert!(failed > 0, "the restart should have failed some publishes");
    assert!(
        confirmed.len() > 600,
        "publishing goes on after the restart"
    );

    // Every confirmed message survived the restart and is consumed exactly
    // once; what was reported failed may or may not have arrived.
    let total = conn.inspect_queue(&q).await.unwrap().message_count;
    let mut consumer = conn
        .consume(&q, ConsumeOptions::prefetch(200))
        .await
        .unwrap();
    let mut got: BTreeMap<u32, u32> = BTreeMap::new();
    for _ in 0..total {
        let d = within(30, "a message", consumer.next())
            .await
            .unwrap()
            .unwrap();
        *got.entry(
            std::str::from_utf8(&d.message.body)
                .unwrap()
                .parse()
                .unwrap(),
        )
        .or_default() += 1;
        d.ack().await.unwrap();
    }
    for i in &confirmed {
        assert_eq!(
            got.get(i),
            Some(&1),
            "confirmed message {i} consumed {:?} times",
            got.get(i)
        );
    }
    assert!(got.values().all(|n| *n == 1), "a message was stored twice");
    drop(consumer);
    conn.delete_queue(&q, DeleteQueueOptions::default())
        .await
        .unwrap();
}
