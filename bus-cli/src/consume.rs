//! `bus consume` and `bus get`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use bus::{ConnectionExt, ConsumeOptions, Delivery, Requeue};
use clap::{Args, ValueEnum};
use futures::StreamExt;

use crate::codec::{delivery_to_json, delivery_to_text, Decode};
use crate::fail::{CliResult, Fail};
use crate::signals::{rate, Progress, Stop};

/// What happens to each delivery once printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AckMode {
    /// Ack it (it leaves the queue).
    Ack,
    /// Nack it with requeue (it stays, marked redelivered).
    Requeue,
    /// Nack it without requeue (dead-lettered if the queue has a dead-letter exchange, else dropped).
    Reject,
    /// Consume with auto-ack (no acks at all; fastest, nothing comes back on a crash).
    NoAck,
}

/// How deliveries are printed.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// One JSON object per line: exchange, routing_key, redelivered,
    /// properties, headers, body, body_encoding.
    #[arg(long)]
    pub json: bool,
    /// How bodies are shown.
    #[arg(long, value_enum, default_value_t = Decode::Auto)]
    pub decode: Decode,
}

impl OutputArgs {
    fn print(&self, d: &Delivery) -> CliResult {
        let mut out = std::io::stdout().lock();
        let r = if self.json {
            writeln!(out, "{}", delivery_to_json(d, self.decode))
        } else {
            write!(out, "{}", delivery_to_text(d, self.decode))
        };
        r.and_then(|()| out.flush())
            .map_err(|e| Fail::error(format!("cannot write to standard output: {e}")))
    }
}

/// Print deliveries as they arrive, until --count or Ctrl-C.
///
/// By default each delivery is acked once printed (it leaves the queue);
/// --ack-mode requeue leaves it there, no-ack consumes with auto-ack.
/// On SIGINT/SIGTERM the delivery in hand is printed and settled, the
/// others go back to the queue.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus consume jobs                             # print and ack, until Ctrl-C
  bus consume jobs --count 10 --json           # ten, one JSON object per line
  bus consume asr --decode msgpack --json --ack-mode requeue
  bus consume jobs --json | jq -r .body")]
pub struct ConsumeArgs {
    /// The queue.
    pub queue: String,
    /// Stop after this many deliveries.
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// Unacked deliveries held at once.
    #[arg(long, default_value_t = 32)]
    pub prefetch: u16,
    /// What to do with each delivery once printed.
    #[arg(long, value_enum, default_value_t = AckMode::Ack)]
    pub ack_mode: AckMode,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Print messages from a queue and leave them there, unless --ack.
///
/// Takes up to --count messages (1 by default) that are ready now, prints
/// them, then puts them back in their place (nack with requeue: they are
/// marked redelivered) or, with --ack, removes them. An empty queue prints
/// nothing and exits 0; messages that do not arrive within --timeout exit 3.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus get jobs                                 # look at the first message
  bus get jobs --count 5 --json
  bus get jobs.error --json --decode msgpack   # why did it fail? (headers)
  bus get jobs --ack                           # take it off the queue")]
pub struct GetArgs {
    /// The queue.
    pub queue: String,
    /// At most this many messages.
    #[arg(long, short = 'n', default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub count: u16,
    /// Ack the messages (remove them) instead of requeueing them.
    #[arg(long)]
    pub ack: bool,
    /// Seconds to wait for the messages the queue reports ready.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Runs `bus consume`.
pub async fn run_consume(url: &str, a: ConsumeArgs) -> CliResult {
    let stop = Stop::install()?;
    let conn = crate::conn::open(url).await?;
    let options = if a.ack_mode == AckMode::NoAck {
        ConsumeOptions::auto_ack()
    } else {
        ConsumeOptions::prefetch(a.prefetch)
    };
    let mut consumer = conn.consume(&a.queue, options).await?;
    let mut progress = Progress::new(None);
    let mut seen = 0u64;
    let mut result = Ok(());
    while a.count.is_none_or(|n| seen < n) {
        let next = tokio::select! {
            biased;
            () = stop.wait() => break,
            next = consumer.next() => next,
        };
        let Some(delivery) = next else { break };
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                result = Err(e.into());
                break;
            }
        };
        if let Err(e) = a.output.print(&delivery) {
            let _ = delivery.nack(Requeue::Yes).await;
            result = Err(e);
            break;
        }
        settle(&delivery, a.ack_mode).await?;
        seen += 1;
        progress.tick(|t| format!("consumed {seen} ({:.0} msg/s)", rate(seen, t)));
    }
    drop(consumer);
    let _ = conn.close().await;
    result
}

async fn settle(d: &Delivery, mode: AckMode) -> CliResult {
    match mode {
        AckMode::Ack => d.ack().await?,
        AckMode::Requeue => d.nack(Requeue::Yes).await?,
        AckMode::Reject => d.nack(Requeue::No).await?,
        AckMode::NoAck => {}
    }
    Ok(())
}

/// Runs `bus get`.
pub async fn run_get(url: &str, a: GetArgs) -> CliResult {
    let conn = crate::conn::open(url).await?;
    let ready = conn.inspect_queue(&a.queue).await?.message_count;
    let want = u32::from(a.count).min(ready);
    if want == 0 {
        if std::io::stderr().is_terminal() {
            eprintln!("queue {:?} is empty", a.queue);
        }
        let _ = conn.close().await;
        return Ok(());
    }
    // Hold every message until all are printed, so that requeueing one
    // does not hand it back as the next.
    let mut consumer = conn
        .consume(&a.queue, ConsumeOptions::prefetch(want as u16))
        .await?;
    let deadline = Duration::from_secs_f64(a.timeout.max(0.0));
    let mut held = Vec::new();
    let collected = tokio::time::timeout(deadline, async {
        while held.len() < want as usize {
            match consumer.next().await {
                Some(Ok(d)) => held.push(d),
                Some(Err(e)) => return Err(Fail::from(e)),
                None => break,
            }
        }
        Ok(())
    })
    .await;
    let _ = consumer.cancel().await;
    let mut result = match collected {
        Ok(r) => r,
        Err(_) if !held.is_empty() => Ok(()),
        Err(_) => Err(Fail {
            code: crate::fail::TIMEOUT,
            message: format!(
                "queue {:?} reported {ready} ready messages but none arrived within {:?} \
                 (another consumer took them?)",
                a.queue, deadline
            ),
        }),
    };
    for d in &held {
        if result.is_ok() {
            result = a.output.print(d);
        }
    }
    for d in &held {
        let settled = if a.ack && result.is_ok() {
            d.ack().await
        } else {
            d.nack(Requeue::Yes).await
        };
        if let Err(e) = settled {
            result = result.and(Err(e.into()));
        }
    }
    drop(consumer);
    let _ = conn.close().await;
    result
}
