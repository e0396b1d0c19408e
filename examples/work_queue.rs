//! A work queue, the way the legacy platform's jobs should flow: one producer,
//! three workers competing for jobs with prefetch 1 and manual acks. One
//! worker nacks a job it cannot handle and leaves; the job is redelivered to
//! another worker, marked `redelivered`.
//!
//! ```text
//! cargo run --example work_queue                         # in-memory broker
//! BUS_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --features amqp --example work_queue
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use bus::{Connection, ConnectionExt, ConsumeOptions, Message, QueueOptions, Requeue};
use futures::StreamExt;
use tokio::sync::mpsc;

const JOBS: usize = 9;

/// What a worker reports to the main task.
enum Event {
    Done {
        worker: &'static str,
        job: String,
        redelivered: bool,
    },
    GaveUp {
        worker: &'static str,
        job: String,
    },
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("BUS_URL").unwrap_or_else(|_| "memory://work-queue".into());
    let queue = format!("jobs-{}", std::process::id());

    let producer = bus::connect(&url).await?;
    producer
        .declare_queue(&queue, QueueOptions::default())
        .await?;

    let (events, mut rx) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for name in ["w1", "w2", "w3"] {
        let conn = bus::connect(&url).await?;
        // Subscribe before any job is published: a worker that subscribed
        // late might never see a job, and the nack path would not be shown.
        let jobs = conn.consume(&queue, ConsumeOptions::prefetch(1)).await?;
        workers.push(tokio::spawn(worker(name, conn, jobs, events.clone())));
    }
    drop(events);

    for i in 1..=JOBS {
        let job = format!("job-{i}");
        producer
            .send_to_queue(&queue, Message::new(job.clone().into_bytes()).persistent())
            .await?;
        println!("producer: published {job}");
    }

    let mut done: BTreeMap<String, &'static str> = BTreeMap::new();
    let mut redelivered = 0;
    while done.len() < JOBS {
        match rx.recv().await {
            Some(Event::Done {
                worker,
                job,
                redelivered: again,
            }) => {
                if again {
                    redelivered += 1;
                    println!("{worker}: finished {job} (redelivered after a nack)");
                } else {
                    println!("{worker}: finished {job}");
                }
                if let Some(first) = done.insert(job.clone(), worker) {
                    return Err(format!("{job} was finished twice ({first}, {worker})").into());
                }
            }
            Some(Event::GaveUp { worker, job }) => {
                println!("{worker}: cannot handle {job}: nack with requeue, and leave");
            }
            None => return Err("the workers stopped before every job was done".into()),
        }
    }

    let mut per_worker: BTreeMap<&str, usize> = BTreeMap::new();
    for w in done.values() {
        *per_worker.entry(w).or_default() += 1;
    }
    println!(
        "all {JOBS} jobs done exactly once; {redelivered} redelivered; per worker: {per_worker:?}"
    );
    for w in workers {
        w.abort();
    }
    producer
        .delete_queue(&queue, bus::DeleteQueueOptions::default())
        .await?;
    if redelivered == 0 {
        return Err("expected the nacked job to be redelivered".into());
    }
    Ok(())
}

/// Takes one job at a time from its subscription; holds its connection open
/// while it works. `w2` nacks the first job it gets and leaves, the
/// way a worker missing a model would.
async fn worker(
    name: &'static str,
    _conn: Arc<dyn Connection>,
    mut jobs: bus::Consumer,
    events: mpsc::UnboundedSender<Event>,
) -> bus::Result<()> {
    while let Some(delivery) = jobs.next().await {
        let delivery = delivery?;
        let job = String::from_utf8_lossy(&delivery.message.body).into_owned();
        if name == "w2" {
            delivery.nack(Requeue::Yes).await?;
            let _ = events.send(Event::GaveUp { worker: name, job });
            jobs.cancel().await?;
            return Ok(());
        }
        delivery.ack().await?;
        let _ = events.send(Event::Done {
            worker: name,
            job,
            redelivered: delivery.redelivered,
        });
    }
    Ok(())
}
