//! Migration in one picture: a legacy input folder bridged into a broker
//! queue, a worker on the queue, and its results bridged back out into a
//! legacy result folder, with the same stems (`IN/job42.wav` ->
//! `OUT/job42.json`).
//!
//! ```text
//! BUS_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!     cargo run --features amqp,file --example legacy_bridge -- IN OUT
//! BUS_URL=file:///tmp/bus-demo cargo run --features amqp,file --example legacy_bridge -- IN OUT
//! ```
//!
//! Inputs are acknowledged (moved to `IN/done/`) only once the broker
//! confirmed the message; results are acknowledged on the broker only once
//! their file is written. Runs until stopped.

use std::path::PathBuf;
use std::time::Duration;

use bus::bridge::Bridge;
use bus::{ConsumeOptions, Message, PublishOptions, QueueOptions};
use bus_file::legacy::{Inbox, Readiness, ResultWriter, FILE_HEADER};
use futures::StreamExt;

const REQUESTS: &str = "legacy-bridge.requests";
const RESULTS: &str = "legacy-bridge.results";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(input), Some(output)) = (args.next(), args.next()) else {
        eprintln!("usage: legacy_bridge IN OUT   (BUS_URL chooses the broker)");
        std::process::exit(2);
    };
    let url =
        std::env::var("BUS_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = bus::connect(&url).await?;
    conn.declare_queue(REQUESTS, QueueOptions::durable())
        .await?;
    conn.declare_queue(RESULTS, QueueOptions::durable()).await?;
    println!("bridging {input} -> {} -> {output}", bus::redact_url(&url));

    // Folder -> queue: each input is acked (moved to IN/done/) only after
    // the broker confirmed its message.
    let inbox = Inbox::new(PathBuf::from(&input))
        .with_readiness(Readiness::Stable(Duration::from_millis(500)));
    let inputs = inbox.consume(16).await?;
    let to_broker = Bridge::new(conn.clone(), "").with_routing_key(REQUESTS);
    let inbound = tokio::spawn(async move { to_broker.run(inputs).await });

    // The worker, now a service on the broker: it could run anywhere.
    let worker_conn = conn.clone();
    let worker = tokio::spawn(async move {
        let mut jobs = worker_conn
            .consume(REQUESTS, ConsumeOptions::prefetch(1))
            .await?;
        while let Some(job) = jobs.next().await {
            let job = job?;
            let name = job
                .message
                .properties
                .headers
                .get(FILE_HEADER)
                .and_then(|v| v.as_str())
                .unwrap_or("unnamed")
                .to_owned();
            let result = format!(
                "{{\"name\":{name:?},\"bytes\":{}}}\n",
                job.message.body.len()
            );
            let reply = Message::new(result)
                .with_content_type("application/json")
                .with_header(FILE_HEADER, name.as_str())
                .persistent();
            worker_conn
                .publish("", RESULTS, reply, PublishOptions::default())
                .await?;
            job.ack().await?;
            println!("processed {name}");
        }
        Ok::<_, bus::Error>(())
    });

    // Queue -> folder: results are acked on the broker once written.
    let results = conn.consume(RESULTS, ConsumeOptions::prefetch(16)).await?;
    let to_folder = Bridge::new(ResultWriter::new(&output, "json")?, "");
    let outbound = tokio::spawn(async move { to_folder.run(results).await });

    let (a, b, c) = tokio::join!(inbound, worker, outbound);
    a??;
    b??;
    c??;
    Ok(())
}
