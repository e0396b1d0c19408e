//! Failover on a real 3-node RabbitMQ cluster of extra nodes started by
//! this test (ports 5681-5683, node names `bus-c1@localhost`...), never
//! the shared default node: a publisher with confirms and a manual-ack
//! consumer on a quorum queue, connected through a multi-host URL, while
//! the node they are connected to is killed with SIGKILL and started
//! again, several times.
//!
//! It asserts that every confirmed message is consumed, that publishing
//! and consuming resume within a bound after each kill, and that the
//! consumer's stream never ends; it prints the duplicates and the times
//! from each node's death to the first confirmed publish and to the
//! consumer's next delivery (the figures in docs/BENCHMARKS.md).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_amqp::{AmqpConnection, AmqpOptions, ReconnectPolicy};
use bus_core::{Connection, ConnectionExt, ConsumeOptions, Message, QueueOptions, QueueType};
use futures::StreamExt;
use support::cluster::Cluster;
use support::*;

/// How many times the connected node is killed.
const KILLS: usize = 3;
/// Publishes in flight at once.
const IN_FLIGHT: usize = 20;
/// The bound on resuming after a kill: publishing and consuming must be
/// back within this (the README promises "a few seconds").
const RESUME_BOUND: Duration = Duration::from_secs(10);

/// What the publisher recorded of one message.
#[derive(Debug, Default)]
struct Published {
    /// Confirmed publishes: (number, when the confirmed attempt started,
    /// when it was confirmed).
    confirmed: Vec<(u32, Instant, Instant)>,
    /// Attempts that failed, by error kind.
    failures: BTreeMap<String, u32>,
}

fn kind(e: &bus_core::Error) -> String {
    let s = format!("{e:?}");
    s.split(['(', ' ', '{']).next().unwrap_or("?").to_owned()
}

async fn connect_cluster(url: &str, name: &str) -> Arc<AmqpConnection> {
    let options = AmqpOptions::default()
        .with_connection_name(name)
        .with_reconnect(ReconnectPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
            max_attempts: None,
        })
        .with_connect_timeout(Duration::from_secs(3))
        .with_recovery_wait(Duration::from_secs(30));
    Arc::new(
        AmqpConnection::connect_with(url, options)
            .await
            .expect("connect to the test cluster"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_connected_node_loses_no_confirmed_message_and_resumes() {
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start("c", 5681, 3))
        .await
        .expect("start the cluster");
    let url = cluster.url();
    let publisher = connect_cluster(&url, &fresh("publisher")).await;
    let subscriber = connect_cluster(&url, &fresh("consumer")).await;

    let q = fresh("failover");
    let quorum = QueueOptions::durable().queue_type(QueueType::Quorum);
    publisher.declare_queue(&q, quorum).await.unwrap();

    // The consumer: acks everything, counts each number, notes when each
    // delivery came and on which link.
    let deliveries: Arc<Mutex<Vec<(u32, Instant, u64)>>> = Arc::default();
    let stream_ended = Arc::new(AtomicBool::new(false));
    let stream_errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut consumer = subscriber
        .consume(&q, ConsumeOptions::prefetch(100))
        .await
        .unwrap();
    let consuming = {
        let deliveries = deliveries.clone();
        let stream_ended = stream_ended.clone();
        let stream_errors = stream_errors.clone();
        let subscriber = subscriber.clone();
        tokio::spawn(async move {
            loop {
                match consumer.next().await {
                    Some(Ok(d)) => {
                        let n = number(&d.message);
                        deliveries.lock().unwrap().push((
                            n,
                            Instant::now(),
                            subscriber.generation(),
                        ));
                        // A delivery of a channel that died is requeued by
                        // the broker and comes again: an error here loses
                        // nothing.
                        if let Err(e) = d.ack().await {
                            stream_errors.lock().unwrap().push(format!("ack: {e}"));
                        }
                    }
                    Some(Err(e)) => stream_errors.lock().unwrap().push(e.to_string()),
                    None => {
                        stream_ended.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        })
    };

    // The publisher: numbers in order, each retried until confirmed, as an
    // application that must not drop a message does.
    let published: Arc<Mutex<Published>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let confirmed_count = Arc::new(AtomicU64::new(0));
    let publishing = {
        let published = published.clone();
        let stop = stop.clone();
        let confirmed_count = confirmed_count.clone();
        let publisher = publisher.clone();
        let q = q.clone();
        tokio::spawn(async move {
            futures::stream::iter(0u32..)
                .take_while(move |_| futures::future::ready(!stop.load(Ordering::SeqCst)))
                .for_each_concurrent(IN_FLIGHT, |n| {
                    let published = published.clone();
                    let publisher = publisher.clone();
                    let confirmed_count = confirmed_count.clone();
                    let q = q.clone();
                    async move {
                        loop {
                            let started = Instant::now();
                            match publisher
                                .send_to_queue(&q, Message::new(n.to_string()).persistent())
                                .await
                            {
                                Ok(()) => {
                                    published.lock().unwrap().confirmed.push((
                                        n,
                                        started,
                                        Instant::now(),
                                    ));
                                    confirmed_count.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                                Err(e) => {
                                    assert!(
                                        e.is_temporary(),
                                        "publish {n} failed with a permanent error: {e}"
                                    );
                                    *published
                                        .lock()
                                        .unwrap()
                                        .failures
                                        .entry(kind(&e))
                                        .or_default() += 1;
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                            }
                        }
                    }
                })
                .await;
        })
    };

    let wait_confirms = |at_least: u64, what: &'static str| {
        let confirmed_count = confirmed_count.clone();
        within(60, what, async move {
            while confirmed_count.load(Ordering::SeqCst) < at_least {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    wait_confirms(1000, "the first confirms").await;

    let mut report = Vec::new();
    for round in 1..=KILLS {
        let host = publisher
            .current_host()
            .expect("the publisher is connected");
        let victim = cluster.index_of(&host).expect("a node of the cluster");
        assert_eq!(
            subscriber.current_host().as_deref(),
            Some(host.as_str()),
            "both clients are on the first node of the URL that answers"
        );
        let consumer_generation = subscriber.generation();
        let killed_at = Instant::now();
        cluster.kill(victim);

        // Publishing resumes: a publish started after the kill is confirmed.
        let first_confirm = within(30, "a confirmed publish after the kill", async {
            loop {
                let found = published
                    .lock()
                    .unwrap()
                    .confirmed
                    .iter()
                    .filter(|(_, started, _)| *started > killed_at)
                    .map(|(_, _, at)| *at)
                    .min();
                if let Some(at) = found {
                    return at;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        // Consuming resumes: a delivery on the new link.
        let first_delivery = within(30, "a delivery after the kill", async {
            loop {
                let found = deliveries
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, _, generation)| *generation > consumer_generation)
                    .map(|(_, at, _)| *at)
                    .min();
                if let Some(at) = found {
                    return at;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let to_publish = first_confirm - killed_at;
        let to_deliver = first_delivery - killed_at;
        let line = format!(
            "kill {round} of node {}: first confirmed publish after {} ms, next delivery after {} ms (now on {})",
            cluster.nodes[victim].name,
            to_publish.as_millis(),
            to_deliver.as_millis(),
            publisher.current_host().unwrap_or_default(),
        );
        println!("{line}");
        report.push((to_publish, to_deliver));
        assert!(
            to_publish < RESUME_BOUND,
            "publishing resumed only after {to_publish:?}"
        );
        assert!(
            to_deliver < RESUME_BOUND,
            "consuming resumed only after {to_deliver:?}"
        );
        assert!(
            !stream_ended.load(Ordering::SeqCst),
            "the consumer's stream ended"
        );

        // The node comes back (and rejoins) before the next round.
        tokio::task::block_in_place(|| cluster.restart(victim));
        let now = confirmed_count.load(Ordering::SeqCst);
        wait_confirms(now + 500, "confirms after the restart").await;
    }

    stop.store(true, Ordering::SeqCst);
    within(60, "the publisher to finish", publishing)
        .await
        .unwrap();
    let published = std::mem::take(&mut *published.lock().unwrap());
    let confirmed: std::collections::BTreeSet<u32> =
        published.confirmed.iter().map(|(n, _, _)| *n).collect();
    // Every confirmed message comes.
    within(90, "every confirmed message to be consumed", async {
        loop {
            let missing = {
                let got = deliveries.lock().unwrap();
                let seen: std::collections::BTreeSet<u32> =
                    got.iter().map(|(n, _, _)| *n).collect();
                confirmed.difference(&seen).count()
            };
            if missing == 0 {
                return;
            }
            assert!(
                !stream_ended.load(Ordering::SeqCst),
                "the consumer's stream ended with {missing} confirmed messages not consumed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        !stream_ended.load(Ordering::SeqCst),
        "the consumer's stream ended"
    );
    let mut times: BTreeMap<u32, u32> = BTreeMap::new();
    for (n, _, _) in deliveries.lock().unwrap().iter() {
        *times.entry(*n).or_default() += 1;
    }
    let duplicates: u32 = times.values().map(|t| t - 1).sum();
    let unconfirmed_delivered = times.keys().filter(|n| !confirmed.contains(n)).count();
    println!(
        "{} confirmed, {} deliveries, {duplicates} duplicate deliveries, {unconfirmed_delivered} delivered but never confirmed (retried), failed attempts {:?}, consumer stream errors {:?}",
        confirmed.len(),
        times.values().sum::<u32>(),
        published.failures,
        stream_errors.lock().unwrap()
    );
    let worst_publish = report.iter().map(|r| r.0).max().unwrap();
    let worst_deliver = report.iter().map(|r| r.1).max().unwrap();
    println!("worst: publish {worst_publish:?}, delivery {worst_deliver:?}");

    consuming.abort();
    let _ = publisher.delete_queue(&q, Default::default()).await;
    let _ = publisher.close().await;
    let _ = subscriber.close().await;
    tokio::task::block_in_place(|| drop(cluster));
}
