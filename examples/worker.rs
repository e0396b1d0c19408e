//! The legacy speech worker, written with the worker runtime.
//!
//! A backend drops speech jobs on the `speech.jobs` queue; this worker
//! transcribes them four at a time (prefetch and concurrency 4) and
//! announces each result on a `speech.events.<run>` topic exchange. It shows
//! every path a job can take, and checks that each one was taken:
//!
//! - an ordinary job is handled and acked (`job.done` event);
//! - a job whose model is still loading fails transiently, is retried in
//!   process, then through the broker after a delay, and succeeds;
//! - a job in an unsupported language fails permanently: straight to the
//!   poison queue `speech.jobs.error`;
//! - a job that keeps failing uses up its attempts: poison queue;
//! - a body that is not a job at all: poison queue, the handler never runs.
//!
//! Then it stops gracefully (as it would on Ctrl-C or SIGTERM) and prints
//! what the shutdown did. It exits 0 only if every path went as described.
//!
//! ```text
//! cargo run --example worker
//! BUS_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example worker
//! ```

use std::time::Duration;

use bus::worker::{FailureReport, HandlerError, Job, PoisonReason, RetryPolicy, Worker};
use bus::{
    Connection, ConnectionExt, ConsumeOptions, DeleteExchangeOptions, DeleteQueueOptions, Error,
    ExchangeKind, ExchangeOptions, Message, QueueOptions, Result,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// A job as the backend sends it (msgpack, audio as bin).
#[derive(Serialize, Deserialize)]
struct SpeechJob {
    job: u32,
    #[serde(with = "serde_bytes")]
    audio: Vec<u8>,
    language: String,
}

/// The event announcing a result, on the run's `speech.events.<run>` topic
/// exchange.
#[derive(Serialize, Deserialize, Debug)]
struct Transcribed {
    job: u32,
    text: String,
    attempt: u32,
}

async fn transcribe(events: &str, job: Job<SpeechJob>) -> std::result::Result<(), HandlerError> {
    let SpeechJob {
        job: id,
        audio,
        language,
    } = &job.body;
    match language.as_str() {
        "en" | "fr" => {}
        // The model loads slowly: the first three attempts (one round of
        // in-process retries) fail, the delayed retry succeeds.
        "loading" if job.attempt <= 3 => {
            return Err(HandlerError::transient("the model is still loading"))
        }
        "loading" => {}
        "broken" => return Err(HandlerError::transient("the GPU is out of memory")),
        other => {
            return Err(HandlerError::permanent(format!(
                "unsupported language {other:?}"
            )))
        }
    }
    let event = Transcribed {
        job: *id,
        text: format!("{} bytes of {language} speech", audio.len()),
        attempt: job.attempt,
    };
    // `?` turns a failed publish into a transient or permanent failure.
    job.publish_value(events, &format!("job.done.{language}"), &event)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let url = std::env::var("BUS_URL").unwrap_or_else(|_| "memory://speech".to_owned());
    let conn = bus::connect(&url).await?;
    // Fresh names, so that runs on a shared broker do not meet.
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let jobs = format!("speech.jobs.{run}");
    let events_x = format!("speech.events.{run}");
    conn.declare_exchange(&events_x, ExchangeKind::Topic, ExchangeOptions::default())
        .await?;
    let events_q = format!("speech.events.{run}.all");
    conn.declare_queue(&events_q, QueueOptions::exclusive())
        .await?;
    conn.bind_queue(&events_q, &events_x, "job.#", Default::default())
        .await?;
    let mut events = conn.consume(&events_q, ConsumeOptions::auto_ack()).await?;

    let delay = Duration::from_millis(200);
    let worker = Worker::builder(conn.clone(), &jobs)
        .concurrency(4)
        .prefetch(4)
        .retry(
            RetryPolicy::default()
                .immediate(2)
                .backoff(Duration::from_millis(10), Duration::from_millis(100))
                .delayed([delay]),
        )
        .handle({
            let events_x = events_x.clone();
            move |job| {
                let events_x = events_x.clone();
                async move { transcribe(&events_x, job).await }
            }
        })
        .await?;
    println!(
        "worker serving {} (concurrency 4, up to {} attempts)",
        worker.queue(),
        6
    );

    let submit = |id: u32, language: &str| {
        let job = SpeechJob {
            job: id,
            audio: vec![0; 3200],
            language: language.into(),
        };
        bus::rpc::Format::MsgPack
            .to_message(&job)
            .map(Message::persistent)
    };
    for (id, language) in [
        (1, "en"),
        (2, "fr"),
        (3, "loading"),
        (4, "xx"),
        (5, "broken"),
    ] {
        conn.send_to_queue(&jobs, submit(id, language)?).await?;
    }
    conn.send_to_queue(&jobs, Message::new(&b"not a job"[..]))
        .await?;

    // Wait for every job to reach its end, or for Ctrl-C / SIGTERM.
    let settled = worker.wait_until(|s| s.handled == 3 && s.poisoned == 3);
    tokio::select! {
        stats = tokio::time::timeout(Duration::from_secs(30), settled) => {
            let stats = stats.map_err(|_| Error::Timeout(Duration::from_secs(30)))??;
            println!("all jobs settled: {stats:?}");
        }
        signal = bus::worker::shutdown_signal() => {
            signal?;
            println!("interrupted: stopping");
        }
    }

    let mut done = Vec::new();
    while done.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .map_err(|_| Error::Timeout(Duration::from_secs(10)))?
            .ok_or_else(|| Error::Closed("the event stream ended".into()))??;
        let e: Transcribed = event.decode()?;
        println!(
            "event {}: job {} on attempt {}: {}",
            event.routing_key, e.job, e.attempt, e.text
        );
        done.push((e.job, e.attempt));
    }
    done.sort_unstable();
    check(
        done == [(1, 1), (2, 1), (3, 4)],
        format!("handled jobs and attempts: {done:?}"),
    )?;

    let mut poisoned = Vec::new();
    let mut errors = conn
        .consume(&format!("{jobs}.error"), ConsumeOptions::prefetch(3))
        .await?;
    while poisoned.len() < 3 {
        let d = tokio::time::timeout(Duration::from_secs(10), errors.next())
            .await
            .map_err(|_| Error::Timeout(Duration::from_secs(10)))?
            .ok_or_else(|| Error::Closed("the poison queue's consumer ended".into()))??;
        let report = FailureReport::of(&d.message);
        println!(
            "poisoned ({:?}) after {} attempt(s): {}",
            report.reason.expect("a poisoned message says why"),
            report.attempts.unwrap_or(0),
            report.error.as_deref().unwrap_or("")
        );
        poisoned.push((report.reason, report.attempts));
        d.ack().await?;
    }
    poisoned.sort_by_key(|(r, _)| r.map(PoisonReason::as_str));
    check(
        poisoned
            == [
                (Some(PoisonReason::Exhausted), Some(6)),
                (Some(PoisonReason::Permanent), Some(1)),
                (Some(PoisonReason::Undecodable), Some(1)),
            ],
        format!("poisoned jobs: {poisoned:?}"),
    )?;
    drop(errors);

    let report = worker.shutdown(Duration::from_secs(10)).await?;
    println!("stopped: {report:?}");
    check(
        report.stats.handled == 3 && report.stats.delayed == 2 && report.abandoned == 0,
        format!("shutdown report: {report:?}"),
    )?;
    cleanup(&*conn, &jobs, delay).await?;
    drop(events);
    conn.delete_queue(&events_q, DeleteQueueOptions::default())
        .await?;
    conn.delete_exchange(&events_x, DeleteExchangeOptions::default())
        .await?;
    conn.close().await?;
    println!("every path checked");
    Ok(())
}

fn check(ok: bool, what: String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::PreconditionFailed(
            format!("unexpected outcome: {what}").into(),
        ))
    }
}

async fn cleanup(conn: &dyn Connection, jobs: &str, delay: Duration) -> Result<()> {
    let delay_name = format!("{jobs}.delay.{}ms", delay.as_millis());
    for q in [jobs, &format!("{jobs}.error"), &delay_name] {
        conn.delete_queue(q, DeleteQueueOptions::default()).await?;
    }
    conn.delete_exchange(&delay_name, DeleteExchangeOptions::default())
        .await?;
    Ok(())
}
