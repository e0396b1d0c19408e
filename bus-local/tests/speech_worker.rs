//! A speech worker of consume-handle-ack shape, run under a thousand seeds
//! of random faults: every job's effect must happen exactly once. With a
//! handler that deduplicates by message id it does; with one that does not,
//! the explorer finds a seed that duplicates an effect, and replaying that
//! seed reproduces the duplicate and the same trace. The worker is written
//! out here (a consume loop), and also run on the worker runtime
//! (`bus_core::worker`).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::{Connection, ConnectionExt, ConsumeOptions, Delivery, Message, QueueOptions};
use bus_local::sim::Explorer;
use bus_local::{FaultRates, LocalBroker, LocalConnection};
use futures::StreamExt;

const JOBS: usize = 6;
const QUEUE: &str = "asr.jobs";

/// What the handler writes: a stand-in for the database a real worker
/// updates, which survives the worker's connection.
#[derive(Default)]
struct Store {
    /// Times each job's transcript was written.
    effects: BTreeMap<String, u32>,
    /// Message ids already handled (the idempotent handler's dedup table).
    seen: HashSet<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Handler {
    Idempotent,
    NonIdempotent,
    /// Idempotent, on `bus_core::worker::Worker` instead of the loop.
    IdempotentOnRuntime,
}

/// Retries an operation while it fails with a temporary error, with a
/// small backoff on tokio's clock.
async fn retry<T, F, Fut>(what: &str, mut op: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bus_core::Result<T>>,
{
    for _ in 0..1000 {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_temporary() => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
    Err(format!("{what}: still failing after 1000 attempts"))
}

fn handle(store: &Mutex<Store>, handler: Handler, d: &Delivery) {
    record(store, handler, d.message.properties.message_id.clone());
}

fn record(store: &Mutex<Store>, handler: Handler, id: Option<String>) {
    let id = id.unwrap_or_default();
    let mut store = store.lock().unwrap();
    if handler != Handler::NonIdempotent && !store.seen.insert(id.clone()) {
        return;
    }
    *store.effects.entry(id).or_default() += 1;
}

/// The worker: consume with prefetch 2, transcribe (10 ms of tokio time),
/// write the effect, ack. A stream that ends is consumed again.
async fn worker(conn: LocalConnection, store: Arc<Mutex<Store>>, handler: Handler) {
    loop {
        let Ok(mut jobs) = retry("consume", || {
            conn.consume(QUEUE, ConsumeOptions::prefetch(2))
        })
        .await
        else {
            return;
        };
        while let Some(item) = jobs.next().await {
            let Ok(job) = item else { continue };
            tokio::time::sleep(Duration::from_millis(10)).await;
            handle(&store, handler, &job);
            // A failed ack means the broker requeued the job: it comes again.
            let _ = job.ack().await;
        }
    }
}

async fn scenario(broker: LocalBroker, handler: Handler) -> Result<(), String> {
    let backend = broker.connect();
    let worker_conn = broker.connect();
    retry("declare", || {
        backend.declare_queue(QUEUE, QueueOptions::durable())
    })
    .await?;
    let store = Arc::new(Mutex::new(Store::default()));
    let running = match handler {
        Handler::IdempotentOnRuntime => {
            let conn: Arc<dyn Connection> = Arc::new(worker_conn.clone());
            let store = store.clone();
            tokio::spawn(async move {
                let mut built = None;
                for _ in 0..1000 {
                    let store = store.clone();
                    let attempt = bus_core::worker::Worker::builder(conn.clone(), QUEUE)
                        .queue_options(QueueOptions::durable())
                        .concurrency(2)
                        .handle_raw(move |job: bus_core::worker::Job| {
                            let store = store.clone();
                            async move {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                record(&store, handler, job.properties.message_id.clone());
                                Ok::<_, bus_core::Error>(())
                            }
                        })
                        .await;
                    match attempt {
                        Ok(w) => {
                            built = Some(w);
                            break;
                        }
                        Err(e) if e.is_temporary() => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(e) => panic!("worker: {e}"),
                    }
                }
                // Keep the worker alive until the scenario aborts this task.
                let _worker = built.expect("the worker started");
                std::future::pending::<()>().await;
            })
        }
        _ => tokio::spawn(worker(worker_conn.clone(), store.clone(), handler)),
    };
    for i in 0..JOBS {
        let id = format!("job-{i}");
        retry("publish", || {
            backend.send_to_queue(
                QUEUE,
                Message::new(format!("audio {i}"))
                    .with_message_id(id.clone())
                    .persistent(),
            )
        })
        .await?;
    }
    // Wait, on the paused clock, until every job took effect and nothing is
    // left in the queue or in a consumer's hands (late duplicates included).
    loop {
        let done = store.lock().unwrap().effects.len() == JOBS;
        let idle = broker.queue_depth(QUEUE) == Some(0) && broker.unacked_count(QUEUE) == Some(0);
        if done && idle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.abort();
    let store = store.lock().unwrap();
    for i in 0..JOBS {
        let id = format!("job-{i}");
        match store.effects.get(&id).copied().unwrap_or(0) {
            1 => {}
            n => return Err(format!("{id} took effect {n} times")),
        }
    }
    Ok(())
}

fn explorer() -> Explorer {
    Explorer::new(FaultRates {
        max_delay: Duration::from_millis(30),
        ..FaultRates::mixed()
    })
    .max_faults(8)
}

#[test]
fn idempotent_worker_has_every_effect_exactly_once_under_1000_seeds() {
    let explored = explorer()
        .seeds(0..1000)
        .run(|broker| scenario(broker, Handler::Idempotent))
        .unwrap_or_else(|failure| panic!("{failure}"));
    println!("{explored:?}");
    assert_eq!(explored.runs, 1000);
    // The seeds did inject faults: several per run on average.
    assert!(
        explored.faults > 2000,
        "only {} faults over 1000 runs",
        explored.faults
    );
}

#[test]
fn idempotent_handler_on_the_worker_runtime_has_every_effect_exactly_once_under_1000_seeds() {
    let explored = explorer()
        .seeds(0..1000)
        .run(|broker| scenario(broker, Handler::IdempotentOnRuntime))
        .unwrap_or_else(|failure| panic!("{failure}"));
    println!("{explored:?}");
    assert_eq!(explored.runs, 1000);
    assert!(explored.faults > 2000, "only {} faults", explored.faults);
}

#[test]
fn non_idempotent_worker_duplicates_an_effect_and_the_seed_replays_it() {
    let explorer = explorer().seeds(0..1000);
    let failure = explorer
        .run(|broker| scenario(broker, Handler::NonIdempotent))
        .expect_err("some seed must duplicate a non-idempotent effect");
    println!("{failure}");
    assert!(
        failure.message.contains("took effect 2 times") || failure.message.contains("times"),
        "{}",
        failure.message
    );
    assert!(failure
        .replay
        .contains(&format!("BUS_SIM_SEED={}", failure.seed)));
    // The trace names the faults that made the duplicate.
    assert!(failure.trace.faults().count() > 0, "{}", failure.trace);
    // Replaying the seed fails the same way, with the same trace.
    let again = explorer
        .replay(failure.seed, |broker| {
            scenario(broker, Handler::NonIdempotent)
        })
        .expect_err("the replay must fail too");
    assert_eq!(again.message, failure.message);
    assert_eq!(again.trace, failure.trace);
    assert_eq!(again.to_string(), failure.to_string());
    // The idempotent handler passes that very seed.
    explorer
        .replay(failure.seed, |broker| scenario(broker, Handler::Idempotent))
        .unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let explorer = explorer();
    for seed in [3, 17, 512] {
        let a = explorer
            .replay(seed, |broker| scenario(broker, Handler::Idempotent))
            .unwrap_or_else(|f| panic!("{f}"));
        let b = explorer
            .replay(seed, |broker| scenario(broker, Handler::Idempotent))
            .unwrap_or_else(|f| panic!("{f}"));
        assert!(!a.entries.is_empty());
        assert_eq!(a, b, "seed {seed} ran differently twice");
        assert_eq!(a.to_string(), b.to_string());
    }
}

#[test]
fn a_hung_scenario_is_reported_with_its_seed() {
    let failure = Explorer::new(FaultRates::default())
        .seeds(5..6)
        .time_limit(Duration::from_secs(60))
        .run(|broker| async move {
            let conn = broker.connect();
            conn.declare_queue("empty", QueueOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            let mut c = conn
                .consume("empty", ConsumeOptions::prefetch(1))
                .await
                .map_err(|e| e.to_string())?;
            // Nothing is ever published: this waits forever.
            c.next().await;
            Ok(())
        })
        .expect_err("a scenario that never finishes must fail");
    assert_eq!(failure.seed, 5);
    assert!(
        failure.message.contains("did not finish"),
        "{}",
        failure.message
    );
}
