//! The worker's `metrics` counters and handling-time histogram (bus-core's
//! `metrics` feature), read through a recorder installed by this test
//! binary alone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::worker::{HandlerError, Job, RetryPolicy, Worker};
use bus_core::{Connection, Message, PublishOptions};
use bus_local::LocalBroker;
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

#[derive(Default)]
struct Recorded {
    counters: Mutex<BTreeMap<String, Arc<Count>>>,
    histograms: Mutex<BTreeMap<String, Arc<Count>>>,
}

#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

impl HistogramFn for Count {
    fn record(&self, _value: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn name(key: &Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

struct Shared(Arc<Recorded>);

impl Recorder for Shared {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let c = self
            .0
            .counters
            .lock()
            .unwrap()
            .entry(name(key))
            .or_default()
            .clone();
        Counter::from_arc(c)
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let h = self
            .0
            .histograms
            .lock()
            .unwrap()
            .entry(name(key))
            .or_default()
            .clone();
        Histogram::from_arc(h)
    }
}

#[tokio::test(start_paused = true)]
async fn worker_counts_outcomes_and_times_handling() {
    let recorded = Arc::new(Recorded::default());
    metrics::set_global_recorder(Shared(recorded.clone())).expect("the only recorder");
    let broker = LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let worker = Worker::builder(conn.clone(), "counted")
        .retry(RetryPolicy::none().immediate(1).jitter(false))
        .handle_raw(|job: Job| async move {
            match &job.body[..] {
                b"ok" => Ok(()),
                _ => Err(HandlerError::transient("no")),
            }
        })
        .await
        .unwrap();
    for body in [&b"ok"[..], b"bad"] {
        conn.publish("", "counted", Message::new(body), PublishOptions::default())
            .await
            .unwrap();
    }
    worker
        .wait_until(|s| s.handled == 1 && s.poisoned == 1)
        .await
        .unwrap();
    worker.shutdown(Duration::from_secs(1)).await.unwrap();
    let get = |map: &Mutex<BTreeMap<String, Arc<Count>>>, n: &str| {
        map.lock()
            .unwrap()
            .get(&format!("{n}{{queue=counted}}"))
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    };
    assert_eq!(get(&recorded.counters, "bus_worker_handled_total"), 1);
    assert_eq!(get(&recorded.counters, "bus_worker_failures_total"), 2);
    assert_eq!(get(&recorded.counters, "bus_worker_retried_total"), 1);
    assert_eq!(get(&recorded.counters, "bus_worker_poisoned_total"), 1);
    assert_eq!(
        get(&recorded.histograms, "bus_worker_handling_seconds"),
        3,
        "one sample per handler run"
    );
}
