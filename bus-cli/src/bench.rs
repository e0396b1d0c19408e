//! `bus bench publish|consume|rpc`: a quick rate and latency measurement.

use std::time::{Duration, Instant};

use bus::rpc::{RpcClient, RpcServer};
use bus::{
    Connection, ConsumeOptions, DeleteQueueOptions, Message, Overflow, PublishOptions, QueueOptions,
};
use clap::{Args, Subcommand};
use futures::StreamExt;

use crate::fail::{CliResult, Fail};
use crate::signals::rate;

/// Measure publish, consume or RPC rates and latencies against the URL.
///
/// Each run uses a fresh queue (deleted afterwards) and prints one line:
/// the rate and the latency percentiles. publish: confirmed publishes with
/// --in-flight outstanding (latency: publish to confirm). consume: the
/// queue is filled first (not timed), then consumed and acked one by one
/// (latency: the gap between deliveries). rpc: calls to an echo service
/// this command runs on its own connection, --in-flight at once (latency:
/// call to reply); with --queue, calls an existing service instead.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus bench publish --count 20000 --size 256
  bus bench consume --count 20000 --prefetch 256
  bus bench rpc --count 2000 --in-flight 64
  bus --url file:///tmp/bus bench publish --persistent")]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// What to measure.
#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Confirmed publishes.
    Publish(Common),
    /// Consume and ack.
    Consume(Common),
    /// Request/reply calls.
    Rpc(RpcBench),
}

/// Settings every benchmark takes.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Messages.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    pub count: u32,
    /// Body bytes.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Publishes waiting for their confirm at once.
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    /// Consumer prefetch.
    #[arg(long, default_value_t = 256)]
    pub prefetch: u16,
    /// Persistent messages to a durable queue.
    #[arg(long)]
    pub persistent: bool,
}

/// Settings of the RPC benchmark.
#[derive(Debug, Args)]
pub struct RpcBench {
    /// Calls.
    #[arg(long, short = 'n', default_value_t = 2_000)]
    pub count: u32,
    /// Request bytes.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Calls waiting for their reply at once.
    #[arg(long, default_value_t = 1)]
    pub in_flight: usize,
    /// Call this existing service instead of running an echo service.
    #[arg(long)]
    pub queue: Option<String>,
}

/// Latency percentiles of a sorted sample.
fn percentiles(mut sample: Vec<Duration>) -> String {
    if sample.is_empty() {
        return "no samples".into();
    }
    sample.sort_unstable();
    let at = |q: f64| {
        let i = ((sample.len() as f64 - 1.0) * q).round() as usize;
        sample[i].as_secs_f64() * 1e3
    };
    format!(
        "p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    )
}

async fn scratch_queue(conn: &dyn Connection, c: &Common) -> CliResult<String> {
    let name = format!("bus-bench-{}", uuid::Uuid::new_v4().simple());
    // The broker never fills up, and does the same work each run.
    let options = QueueOptions::default()
        .with_durable(c.persistent)
        .max_length(u64::from(c.count.max(10_000)))
        .overflow(Overflow::DropHead);
    conn.declare_queue(&name, options).await?;
    Ok(name)
}

async fn publish_all(
    conn: &std::sync::Arc<dyn Connection>,
    queue: &str,
    c: &Common,
) -> CliResult<Vec<Duration>> {
    let body = bus::Bytes::from(vec![b'x'; c.size]);
    let persistent = c.persistent;
    let mut latencies = Vec::with_capacity(c.count as usize);
    let mut results = futures::stream::iter(0..c.count)
        .map(|_| {
            let mut m = Message::new(body.clone());
            if persistent {
                m = m.persistent();
            }
            async move {
                let t = Instant::now();
                conn.publish("", queue, m, PublishOptions::mandatory())
                    .await
                    .map(|()| t.elapsed())
            }
        })
        .buffer_unordered(c.in_flight.max(1));
    while let Some(r) = results.next().await {
        latencies.push(r?);
    }
    Ok(latencies)
}

/// Runs `bus bench`.
pub async fn run(url: &str, a: BenchArgs) -> CliResult {
    let conn = crate::conn::open(url).await?;
    let r = match a.what {
        BenchWhat::Publish(c) => bench_publish(&conn, &c).await,
        BenchWhat::Consume(c) => bench_consume(&conn, &c).await,
        BenchWhat::Rpc(r) => bench_rpc(url, &conn, &r).await,
    };
    let _ = conn.close().await;
    r
}

async fn bench_publish(conn: &std::sync::Arc<dyn Connection>, c: &Common) -> CliResult {
    let queue = scratch_queue(&**conn, c).await?;
    let started = Instant::now();
    let r = publish_all(conn, &queue, c).await;
    let elapsed = started.elapsed();
    let _ = conn
        .delete_queue(&queue, DeleteQueueOptions::default())
        .await;
    let latencies = r?;
    println!(
        "publish: {} messages of {} bytes in {:.2} s: {:.0} msg/s; latency {}",
        latencies.len(),
        c.size,
        elapsed.as_secs_f64(),
        rate(latencies.len() as u64, elapsed),
        percentiles(latencies)
    );
    Ok(())
}

async fn bench_consume(conn: &std::sync::Arc<dyn Connection>, c: &Common) -> CliResult {
    let queue = scratch_queue(&**conn, c).await?;
    let r = async {
        publish_all(conn, &queue, c).await?;
        let started = Instant::now();
        let mut consumer = conn
            .consume(&queue, ConsumeOptions::prefetch(c.prefetch))
            .await?;
        let mut gaps = Vec::with_capacity(c.count as usize);
        let mut last = Instant::now();
        while gaps.len() < c.count as usize {
            let d = match consumer.next().await {
                Some(d) => d?,
                None => return Err(Fail::error("the consumer ended early")),
            };
            d.ack().await?;
            let now = Instant::now();
            gaps.push(now - last);
            last = now;
        }
        Ok((started.elapsed(), gaps))
    }
    .await;
    let _ = conn
        .delete_queue(&queue, DeleteQueueOptions::default())
        .await;
    let (elapsed, gaps) = r?;
    println!(
        "consume: {} messages of {} bytes in {:.2} s: {:.0} msg/s; gap between deliveries {}",
        gaps.len(),
        c.size,
        elapsed.as_secs_f64(),
        rate(gaps.len() as u64, elapsed),
        percentiles(gaps)
    );
    Ok(())
}

async fn bench_rpc(url: &str, conn: &std::sync::Arc<dyn Connection>, r: &RpcBench) -> CliResult {
    let (queue, server, server_conn) = match &r.queue {
        Some(q) => (q.clone(), None, None),
        None => {
            let server_conn = crate::conn::open(url).await?;
            let queue = format!("bus-bench-rpc-{}", uuid::Uuid::new_v4().simple());
            let server = RpcServer::builder(server_conn.clone(), queue.clone())
                .queue_options(QueueOptions::default().with_auto_delete(true))
                .concurrency(u16::try_from(r.in_flight.clamp(1, 1024)).unwrap_or(64))
                .serve_raw(|m: Message| async move { Ok::<_, String>(Message::new(m.body)) })
                .await?;
            (queue, Some(server), Some(server_conn))
        }
    };
    let client = RpcClient::new(conn.clone()).await?;
    let body = bus::Bytes::from(crate::codec::to_msgpack(&crate::codec::Json::Bytes(vec![
            7;
            r.size
        ])));
    let started = Instant::now();
    let mut calls = futures::stream::iter(0..r.count)
        .map(|_| {
            let m = Message::new(body.clone());
            let client = &client;
            let queue = &queue;
            async move {
                let t = Instant::now();
                client.call_raw(queue, m).await.map(|_| t.elapsed())
            }
        })
        .buffer_unordered(r.in_flight.max(1));
    let mut latencies = Vec::with_capacity(r.count as usize);
    let mut failure = None;
    while let Some(c) = calls.next().await {
        match c {
            Ok(l) => latencies.push(l),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(calls);
    let elapsed = started.elapsed();
    drop(client);
    if let Some(server) = server {
        let _ = server.shutdown().await;
    }
    if let Some(c) = server_conn {
        let _ = c.delete_queue(&queue, DeleteQueueOptions::default()).await;
        let _ = c.close().await;
    }
    if let Some(e) = failure {
        return Err(Fail::from(e).context("bench rpc"));
    }
    println!(
        "rpc: {} calls of {} bytes, {} in flight, in {:.2} s: {:.0} calls/s; latency {}",
        latencies.len(),
        r.size,
        r.in_flight,
        elapsed.as_secs_f64(),
        rate(latencies.len() as u64, elapsed),
        percentiles(latencies)
    );
    Ok(())
}
