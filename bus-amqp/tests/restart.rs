//! A full restart of the broker application (`rabbitmqctl stop_app` /
//! `start_app`) while publishing persistent messages to a durable queue with
//! confirms. Its own test binary: the restart would disturb any test
//! running beside it.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bus_amqp::{AmqpOptions, ReconnectPolicy};
use bus_core::{Connection, ConnectionExt, ConsumeOptions, QueueOptions};
use support::*;

/// At most this many messages; publishing stops earlier, once enough were
/// confirmed after the restart.
const MESSAGES: u32 = 100_000;
const IN_FLIGHT: usize = 16;

/// Starts the broker application again whatever happens to the test.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        rabbitmqctl_quiet(&["start_app"]);
        rabbitmqctl_quiet(&["await_startup", "--timeout", "60"]);
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

    let CountingPublisher {
        outcomes: publishing,
        mut confirms,
        stop,
    } = publish_counting_confirms(conn.clone(), q.clone(), MESSAGES, IN_FLIGHT);
    within(60, "300 confirms", confirms.wait_for(|n| *n >= 300))
        .await
        .unwrap();
    let guard = RestartGuard;
    let stopped = tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]));
    wait_disconnected(&mut events).await;
    within(120, "stop_app", stopped).await.unwrap();
    within(
        120,
        "start_app",
        tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"])),
    )
    .await
    .unwrap();
    drop(guard);
    wait_reconnected(&mut events).await;
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
    let confirmed = confirmed(&outcomes);
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
    let got = consume_counting(&mut consumer, total, 30).await;
    assert_each_confirmed_consumed_once(&confirmed, &got);
    assert!(got.values().all(|n| *n == 1), "a message was stored twice");
    drop(consumer);
    delete_queue(&*conn, &q).await;
}
