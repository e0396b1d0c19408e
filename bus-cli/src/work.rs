//! `bus work --exec`: a program behind a queue, one process per message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bus::{
    Connection, ConsumeOptions, Delivery, FieldValue, Message, PublishOptions, QueueOptions,
};
use bus_file::legacy::FILE_HEADER;
use clap::Args;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::exec::{self, Origin};
use crate::fail::{CliResult, Fail};
use crate::signals::{rate, Progress, Stop};

/// Put a program behind a queue: one process per message.
///
/// Each message starts the command (through `sh -c`) with the body on
/// standard input, the body also in a file ({file} in the command, and
/// BUS_BODY_FILE), and the properties in environment variables: BUS_QUEUE,
/// BUS_EXCHANGE, BUS_ROUTING_KEY, BUS_REDELIVERED, BUS_ATTEMPT,
/// BUS_CONTENT_TYPE, BUS_CORRELATION_ID, BUS_REPLY_TO, BUS_MESSAGE_ID,
/// BUS_TIMESTAMP, BUS_TYPE, BUS_APP_ID, BUS_USER_ID, BUS_PRIORITY,
/// BUS_EXPIRATION, BUS_DELIVERY_MODE (when set), BUS_HEADERS (all headers
/// as JSON) and BUS_HEADER_<NAME> for each header.
///
/// Exit 0: the message is acked (after its output, with --output-queue, is
/// confirmed). Any other exit: the message goes to the poison queue
/// (QUEUE.error, or --error-queue) with its body and properties and headers
/// saying why (x-error, x-exit-code, x-original-exchange,
/// x-original-routing-key, x-failed-at, x-worker), then is acked: never
/// dropped, never redelivered in a loop. SIGINT/SIGTERM: take no new
/// messages, let the running processes finish, exit 0.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus work asr.requests --exec 'python3 legacy_asr.py {file}' --output-queue asr.results
  bus work jobs --exec './handle.sh' --concurrency 4
  bus get jobs.error --json            # what failed, and why")]
pub struct WorkArgs {
    /// The queue to consume.
    pub queue: String,
    /// The command to run for each message.
    #[arg(long)]
    pub exec: String,
    /// Processes running at once.
    #[arg(long, short = 'c', default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Publish each successful run's standard output to this queue (persistent,
    /// with the input's x-legacy-file and correlation_id), before acking.
    #[arg(long, value_name = "QUEUE")]
    pub output_queue: Option<String>,
    /// The poison queue (default QUEUE.error), declared durable.
    #[arg(long, value_name = "QUEUE")]
    pub error_queue: Option<String>,
    /// Stop after this many messages.
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
}

struct Shared {
    conn: Arc<dyn Connection>,
    command: String,
    queue: String,
    error_queue: String,
    output_queue: Option<String>,
    worker: String,
    done: AtomicU64,
    failed: AtomicU64,
}

/// Runs `bus work`.
pub async fn run(url: &str, a: WorkArgs) -> CliResult {
    let stop = Stop::install()?;
    let conn = crate::conn::open(url).await?;
    let error_queue = a
        .error_queue
        .clone()
        .unwrap_or_else(|| format!("{}.error", a.queue));
    conn.declare_queue(&error_queue, QueueOptions::durable())
        .await
        .map_err(|e| Fail::from(e).context(format!("declaring the poison queue {error_queue:?}")))?;
    let shared = Arc::new(Shared {
        conn: conn.clone(),
        command: a.exec.clone(),
        queue: a.queue.clone(),
        error_queue,
        output_queue: a.output_queue.clone(),
        worker: format!(
            "bus work@{}:{}",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
            std::process::id()
        ),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let mut consumer = conn
        .consume(&a.queue, ConsumeOptions::prefetch(a.concurrency))
        .await?;
    let permits = Arc::new(Semaphore::new(usize::from(a.concurrency)));
    let mut running = JoinSet::new();
    let mut progress = Progress::new(None);
    let started = Instant::now();
    let mut taken = 0u64;
    let mut outcome = Ok(());
    while a.count.is_none_or(|n| taken < n) {
        while running.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            () = stop.wait() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let next = tokio::select! {
            biased;
            () = stop.wait() => break,
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                outcome = Err(e.into());
                break;
            }
            None => {
                if !stop.requested() {
                    outcome = Err(Fail::error(format!(
                        "the consumer of {:?} ended (queue deleted or connection closed)",
                        a.queue
                    )));
                }
                break;
            }
        };
        taken += 1;
        let worker = shared.clone();
        running.spawn(async move {
            handle(&worker, delivery).await;
            drop(permit);
        });
        progress.tick(|t| {
            let n = shared.done.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
            format!("work: {n} handled ({:.0} msg/s)", rate(n, t))
        });
    }
    // Finish what is running; deliveries not started go back with the consumer.
    while running.join_next().await.is_some() {}
    drop(consumer);
    let _ = conn.close().await;
    eprintln!(
        "work: {} succeeded, {} to the poison queue {:?} in {:.1} s",
        shared.done.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed),
        shared.error_queue,
        started.elapsed().as_secs_f64()
    );
    outcome
}

async fn handle(s: &Shared, d: Delivery) {
    let origin = Origin {
        queue: s.queue.clone(),
        exchange: d.exchange.clone(),
        routing_key: d.routing_key.clone(),
        redelivered: d.redelivered,
        attempt: 1,
    };
    let failure = match exec::run(&s.command, &origin, &d.message).await {
        Ok(out) if out.success() => match publish_output(s, &d, out.stdout).await {
            Ok(()) => None,
            Err(e) => {
                // The output could not be delivered: try again later.
                eprintln!("work: cannot publish the output ({e}); message requeued");
                let _ = d.nack(true).await;
                return;
            }
        },
        Ok(out) => Some((out.failure(), out.code)),
        Err(e) => Some((format!("cannot start the command: {e}"), None)),
    };
    match failure {
        None => {
            if d.ack().await.is_ok() {
                s.done.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some((why, code)) => match poison(s, &d, &why, code).await {
            Ok(()) => {
                if d.ack().await.is_ok() {
                    s.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                eprintln!("work: cannot publish to the poison queue ({e}); message requeued");
                let _ = d.nack(true).await;
            }
        },
    }
}

async fn publish_output(s: &Shared, d: &Delivery, stdout: Vec<u8>) -> bus::Result<()> {
    let Some(q) = &s.output_queue else {
        return Ok(());
    };
    let mut m = Message::new(stdout).persistent();
    let p = &d.message.properties;
    if let Some(name) = p.headers.get(FILE_HEADER) {
        m = m.with_header(FILE_HEADER, name.clone());
    }
    m.properties.correlation_id = p.correlation_id.clone();
    m.properties.message_id = p.message_id.clone();
    s.conn
        .publish("", q, m, PublishOptions::mandatory())
        .await
}

async fn poison(s: &Shared, d: &Delivery, why: &str, code: Option<i32>) -> bus::Result<()> {
    let mut m = d.message.clone();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.as_secs());
    let h = &mut m.properties.headers;
    h.insert("x-error".into(), FieldValue::String(why.to_owned()));
    if let Some(c) = code {
        h.insert("x-exit-code".into(), FieldValue::I64(i64::from(c)));
    }
    h.insert(
        "x-original-exchange".into(),
        FieldValue::String(d.exchange.clone()),
    );
    h.insert(
        "x-original-routing-key".into(),
        FieldValue::String(d.routing_key.clone()),
    );
    h.insert("x-failed-at".into(), FieldValue::Timestamp(now));
    h.insert("x-worker".into(), FieldValue::String(s.worker.clone()));
    // The expiration came with the original; the poison copy is kept.
    m.properties.expiration = None;
    s.conn
        .publish("", &s.error_queue, m, PublishOptions::mandatory())
        .await
}
