//! The legacy speech platform, rebuilt on a message bus.
//!
//! A backend submits speech jobs (audio bytes and parameters) by RPC to two
//! algorithm services, `asr` (transcription) and `speaker-id`, each run by
//! several worker instances on connections of their own, as separate hosts
//! would be. Worker `asr-1` takes a job and then dies (its connection
//! drops): the broker delivers the job again to another `asr` worker, and
//! the backend never notices.
//!
//! ```text
//! cargo run --example quickstart
//! BUS_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --features amqp --example quickstart
//! ```

use std::sync::Arc;
use std::time::Duration;

use bus::rpc::{RpcClient, RpcClientOptions, RpcServer};
use bus::{Connection, Error, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const SAMPLE_RATE: u32 = 16_000;

/// What the backend sends: audio (msgpack bin) and parameters.
#[derive(Serialize, Deserialize)]
struct SpeechJob {
    job: u32,
    #[serde(with = "serde_bytes")]
    audio: Vec<u8>,
    sample_rate: u32,
    language: String,
}

#[derive(Serialize, Deserialize)]
struct Transcript {
    job: u32,
    text: String,
    worker: String,
}

#[derive(Serialize, Deserialize)]
struct Speaker {
    job: u32,
    speaker: String,
    score: f64,
    worker: String,
}

/// 16-bit mono PCM standing for a recording of `seconds`.
fn recording(job: u32, seconds: u32) -> Vec<u8> {
    (0..seconds * SAMPLE_RATE * 2)
        .map(|i| (i.wrapping_mul(31).wrapping_add(job * 7) % 251) as u8)
        .collect()
}

fn seconds(job: &SpeechJob) -> f64 {
    job.audio.len() as f64 / f64::from(job.sample_rate * 2)
}

async fn transcribe(job: SpeechJob, worker: &str) -> Transcript {
    // Inference takes a while, so the jobs spread over the workers.
    tokio::time::sleep(Duration::from_millis(40)).await;
    Transcript {
        job: job.job,
        text: format!("{:.1} s of {} speech", seconds(&job), job.language),
        worker: worker.to_owned(),
    }
}

/// CPU-bound work, run on a blocking thread by `serve_blocking`.
fn identify(job: SpeechJob, worker: &str) -> Speaker {
    let energy: u64 = job.audio.iter().map(|&b| u64::from(b)).sum();
    Speaker {
        job: job.job,
        speaker: format!("speaker-{}", energy % 3 + 1),
        score: (energy % 1000) as f64 / 1000.0,
        worker: worker.to_owned(),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let url = std::env::var("BUS_URL").unwrap_or_else(|_| "memory://quickstart".to_owned());
    println!("bus: {}", bus::redact_url(&url));

    // asr-1 takes a job, says so, and then its host dies mid-inference.
    let (took, mut took_rx) = mpsc::unbounded_channel();
    let doomed_conn = bus::connect(&url).await?;
    let doomed = RpcServer::builder(doomed_conn.clone(), "asr")
        .serve(move |job: SpeechJob| {
            let took = took.clone();
            async move {
                let _ = took.send(job.job);
                std::future::pending::<()>().await;
                Ok::<_, Error>(transcribe(job, "asr-1").await)
            }
        })
        .await?;

    let mut workers = Vec::new();
    for name in ["asr-2", "asr-3"] {
        workers.push(
            RpcServer::builder(bus::connect(&url).await?, "asr")
                .serve(move |job: SpeechJob| async move { Ok::<_, Error>(transcribe(job, name).await) })
                .await?,
        );
    }
    for name in ["speaker-id-1", "speaker-id-2"] {
        workers.push(
            RpcServer::builder(bus::connect(&url).await?, "speaker-id")
                .serve_blocking(move |job: SpeechJob| Ok::<_, Error>(identify(job, name)))
                .await?,
        );
    }

    let backend = RpcClient::with_options(
        bus::connect(&url).await?,
        RpcClientOptions::default().timeout(Duration::from_secs(30)),
    )
    .await?;
    let jobs: Vec<u32> = (1..=6).collect();
    let job = |n: u32, language: &str| SpeechJob {
        job: n,
        audio: recording(n, 1 + n % 3),
        sample_rate: SAMPLE_RATE,
        language: language.to_owned(),
    };
    let transcripts = futures::future::join_all(jobs.iter().map(|&n| {
        let request = job(n, if n % 2 == 0 { "en" } else { "fr" });
        let backend = &backend;
        async move { backend.call::<_, Transcript>("asr", &request).await }
    }));
    let speakers = futures::future::join_all(jobs.iter().map(|&n| {
        let request = job(100 + n, "en");
        let backend = &backend;
        async move { backend.call::<_, Speaker>("speaker-id", &request).await }
    }));
    let failure = kill_when_busy(&mut took_rx, doomed_conn, doomed);
    let (transcripts, speakers, held) = tokio::join!(transcripts, speakers, failure);
    let held = held?;

    let mut served_elsewhere = None;
    let mut results = 0;
    for t in transcripts {
        let t = t?;
        results += 1;
        let note = if t.job == held {
            served_elsewhere = Some(t.worker.clone());
            "  <- asr-1 died holding it; redelivered"
        } else {
            ""
        };
        println!(
            "asr        job {:>3}: {:<22} by {}{note}",
            t.job, t.text, t.worker
        );
    }
    for s in speakers {
        let s = s?;
        results += 1;
        println!(
            "speaker-id job {:>3}: {} (score {:.3}) by {}",
            s.job, s.speaker, s.score, s.worker
        );
    }
    let served_elsewhere = served_elsewhere.ok_or_else(|| {
        Error::Closed(format!(
            "job {held}, held by the dead worker, got no result"
        ))
    })?;
    for worker in workers {
        worker.shutdown().await?;
    }
    println!(
        "summary: {} jobs, {} results, 0 lost; asr-1 died holding job {held}, {served_elsewhere} served it",
        jobs.len() * 2,
        results,
    );
    Ok(())
}

/// Waits until the doomed worker holds a job, then drops its connection as
/// a dying host would; returns the job it held.
async fn kill_when_busy(
    took: &mut mpsc::UnboundedReceiver<u32>,
    conn: Arc<dyn Connection>,
    server: RpcServer,
) -> Result<u32> {
    let held = tokio::time::timeout(Duration::from_secs(30), took.recv())
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Error::Closed("asr-1 took no job".into()))?;
    println!("asr-1 took job {held:>3} and its host dies: connection dropped");
    conn.close().await?;
    // Its handler never finishes; the broker already gave the job back.
    drop(server);
    Ok(held)
}
