//! `bus work --exec`: a program behind a queue, one process per message,
//! on the library's worker runtime (`bus::worker`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::worker::{HandlerError, Job, RetryPolicy, Worker};
use bus::{Message, PublishOptions, QueueOptions};
use bus_file::legacy::FILE_HEADER;
use clap::Args;

use crate::bridge::parse_duration;
use crate::exec::{self, Origin};
use crate::fail::{CliResult, Fail};
use crate::signals::Stop;

/// Put a program behind a queue: one process per message.
///
/// Each message starts the command (through `sh -c`) with the body on
/// standard input, the body also in a file ({file} in the command, and
/// BUS_BODY_FILE, named after the x-legacy-file header when there is one),
/// and the properties in environment variables: BUS_QUEUE, BUS_EXCHANGE,
/// BUS_ROUTING_KEY, BUS_REDELIVERED, BUS_ATTEMPT (1 the first time),
/// BUS_CONTENT_TYPE, BUS_CORRELATION_ID, BUS_REPLY_TO, BUS_MESSAGE_ID,
/// BUS_TIMESTAMP, BUS_TYPE, BUS_APP_ID, BUS_USER_ID, BUS_PRIORITY,
/// BUS_EXPIRATION, BUS_DELIVERY_MODE (when set), BUS_HEADERS (all headers as
/// JSON) and BUS_HEADER_NAME for each header NAME (upper-cased, other characters as _).
///
/// Outcomes follow the worker runtime's policy (see the `bus::worker` docs):
/// exit 0 acks the message (after its output, with --output-queue, is
/// confirmed). Another exit code is a transient failure: retried in process
/// (--retries, with exponential backoff and jitter), then through the broker
/// after each of --delays (a restart loses no retry), then the message goes
/// to the poison queue (QUEUE.error, or --error-queue) with its body and
/// properties and x-bus-* headers saying why (x-bus-error, x-bus-reason,
/// x-bus-attempts, x-bus-original-exchange, x-bus-original-routing-key,
/// x-bus-failed-at, x-bus-worker). An exit code listed in --permanent-exit
/// poisons it at once. SIGINT/SIGTERM: take no new messages, let running
/// processes finish within --grace, requeue the rest, exit 0.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus work asr.requests --exec 'python3 legacy_asr.py {file}' --output-queue asr.results
  bus work jobs --exec './handle.sh' --concurrency 4 --retries 2 --delays 5s,1m
  bus work jobs --exec './strict.sh' --no-retry --permanent-exit 65
  bus get jobs.error --json            # what failed, and why")]
pub struct WorkArgs {
    /// The queue to consume (declared durable if missing).
    pub queue: String,
    /// The command to run for each message.
    #[arg(long)]
    pub exec: String,
    /// Processes running at once.
    #[arg(long, short = 'c', default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Publish each successful run's standard output to this queue (persistent,
    /// with the input's x-legacy-file, message_id and correlation_id) before acking.
    #[arg(long, value_name = "QUEUE")]
    pub output_queue: Option<String>,
    /// The poison queue (default QUEUE.error), declared durable.
    #[arg(long, value_name = "QUEUE")]
    pub error_queue: Option<String>,
    /// In-process retries of a failed run per round (default: the runtime's, 2).
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,
    /// Delayed retries through the broker, comma-separated (default: the
    /// runtime's, 1s,10s,60s; `none` for none).
    #[arg(long, value_name = "LIST")]
    pub delays: Option<String>,
    /// No retries at all: the first failure poisons the message.
    #[arg(long, conflicts_with_all = ["retries", "delays"])]
    pub no_retry: bool,
    /// An exit code meaning "this message can never succeed": poisoned at
    /// once, without retries (repeatable).
    #[arg(long, value_name = "CODE")]
    pub permanent_exit: Vec<i32>,
    /// Seconds the running processes get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 60.0)]
    pub grace: f64,
}

fn policy(a: &WorkArgs) -> CliResult<RetryPolicy> {
    if a.no_retry {
        return Ok(RetryPolicy::none());
    }
    let mut p = RetryPolicy::default();
    if let Some(n) = a.retries {
        p = p.immediate(n);
    }
    if let Some(list) = &a.delays {
        let delays = if list == "none" {
            Vec::new()
        } else {
            list.split(',')
                .map(|d| parse_duration(d.trim()).map_err(Fail::usage))
                .collect::<CliResult<Vec<Duration>>>()?
        };
        p = p.delayed(delays);
    }
    Ok(p)
}

struct Handler {
    command: String,
    queue: String,
    output_queue: Option<String>,
    permanent: Vec<i32>,
}

impl Handler {
    async fn handle(&self, job: Job) -> Result<(), HandlerError> {
        let origin = Origin {
            queue: self.queue.clone(),
            exchange: job.exchange.to_string(),
            routing_key: job.routing_key.to_string(),
            redelivered: job.redelivered,
            attempt: job.attempt,
        };
        let mut message = Message::new(job.body.clone());
        message.properties = job.properties.clone();
        let out = exec::run(&self.command, &origin, &message)
            .await
            .map_err(|e| HandlerError::transient(format!("cannot start the command: {e}")))?;
        if !out.success() {
            let why = out.failure();
            return Err(match out.code {
                Some(c) if self.permanent.contains(&c) => HandlerError::permanent(why),
                _ => HandlerError::transient(why),
            });
        }
        let Some(q) = &self.output_queue else {
            return Ok(());
        };
        let p = &job.properties;
        let mut m = Message::new(out.stdout).persistent();
        if let Some(name) = p.headers.get(FILE_HEADER) {
            m = m.with_header(FILE_HEADER, name.clone());
        }
        m.properties.correlation_id = p.correlation_id.clone();
        m.properties.message_id = p.message_id.clone();
        // An output that cannot be delivered is a transient failure: the
        // message is retried as the policy says.
        job.connection()
            .publish("", q, m, PublishOptions::mandatory())
            .await
            .map_err(|e| HandlerError::transient(format!("cannot publish the output: {e}")))
    }
}

/// Runs `bus work`.
pub async fn run(url: &str, a: WorkArgs) -> CliResult {
    let stop = Stop::install()?;
    let policy = policy(&a)?;
    let grace = if a.grace.is_finite() && a.grace >= 0.0 {
        Duration::from_secs_f64(a.grace)
    } else {
        return Err(Fail::usage(format!(
            "--grace {}: expected seconds >= 0",
            a.grace
        )));
    };
    let conn = crate::conn::open(url).await?;
    let handler = Arc::new(Handler {
        command: a.exec.clone(),
        queue: a.queue.clone(),
        output_queue: a.output_queue.clone(),
        permanent: a.permanent_exit.clone(),
    });
    let mut builder = Worker::builder(conn.clone(), a.queue.clone())
        .queue_options(QueueOptions::durable())
        .concurrency(usize::from(a.concurrency))
        .retry(policy);
    if let Some(q) = &a.error_queue {
        builder = builder.error_queue(q.clone());
    }
    let worker = builder
        .handle_raw(move |job: Job| {
            let handler = handler.clone();
            async move { handler.handle(job).await }
        })
        .await?;
    let started = Instant::now();
    let stopper = worker.stopper();
    let on_signal = {
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.wait().await;
            stopper.stop(grace);
        })
    };
    let report = worker.wait().await;
    on_signal.abort();
    let _ = conn.close().await;
    let report = report?;
    let s = report.stats;
    eprintln!(
        "work: {} handled, {} retried in process, {} delayed, {} poisoned, {} requeued at stop, in {:.1} s",
        s.handled,
        s.retried,
        s.delayed,
        s.poisoned,
        report.requeued,
        started.elapsed().as_secs_f64()
    );
    if stop.requested() {
        Ok(())
    } else {
        Err(Fail::error(format!(
            "the worker of {:?} stopped: its queue was deleted or the connection closed",
            a.queue
        )))
    }
}
