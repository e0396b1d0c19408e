//! `bus bridge`: `bus::bridge::Bridge` from a queue or a legacy input
//! folder to an exchange, a queue or a legacy result folder.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bus::bridge::Bridge;
use bus::{ConsumeOptions, DeliveryMode, Message, PublishOptions, Publisher};
use bus_file::legacy::{Consumed, Inbox, Readiness, ResultWriter};
use clap::Args;

use crate::fail::{CliResult, Fail};
use crate::signals::{rate, Progress, Stop};

/// Move messages from a source to a destination, at least once, until
/// stopped.
///
/// The source is a queue (--from-queue, on --from-url or --url) or a legacy
/// input folder (--from-folder: plain files, taken once complete by the
/// --readiness rule, moved to DIR/done/ once forwarded). The destination is
/// an exchange or a queue (on --to-url or --url) or a legacy result folder
/// (--to-folder: one file per message, written atomically, named after the
/// input's stem). A source message is acked only after the destination
/// confirmed it; on SIGINT/SIGTERM the bridge finishes the message in hand,
/// hands back those not forwarded, prints its totals and exits 0: nothing
/// is lost. Totals go to stderr every second on a terminal (or every
/// --report-every seconds) and on exit.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus bridge --from-folder /srv/legacy/in --to-queue asr.requests --readiness stable:2s
  bus bridge --from-queue asr.results --to-folder /srv/legacy/out --extension json
  bus bridge --from-queue events --from-url amqp://old-host --to-exchange events --to-url amqp://new-host
  bus bridge --from-queue asr.requests --to-folder /srv/legacy/in --extension keep   # roll back

Readiness rules (--readiness): renamed (the writer renames finished files in),
done-marker (NAME.done appears when NAME is complete), stable:DURATION (size
and mtime unchanged that long, e.g. stable:2s, stable:500ms; the default).")]
pub struct BridgeArgs {
    /// Source: this queue.
    #[arg(long, group = "source", value_name = "QUEUE")]
    pub from_queue: Option<String>,
    /// Source: this legacy input folder.
    #[arg(long, group = "source", value_name = "DIR")]
    pub from_folder: Option<PathBuf>,
    /// The source queue's URL (default: --url).
    #[arg(long, value_name = "URL", hide_env_values = true)]
    pub from_url: Option<String>,
    /// When a file of the input folder is complete.
    #[arg(long, value_name = "RULE", value_parser = parse_readiness)]
    pub readiness: Option<Readiness>,
    /// Where forwarded input files go (default DIR/done/).
    #[arg(long, value_name = "DIR", conflicts_with = "delete_done")]
    pub done_dir: Option<PathBuf>,
    /// Delete forwarded input files instead of moving them.
    #[arg(long)]
    pub delete_done: bool,

    /// Destination: this exchange.
    #[arg(long, group = "destination", value_name = "EXCHANGE")]
    pub to_exchange: Option<String>,
    /// Destination: this queue (through the default exchange).
    #[arg(long, group = "destination", value_name = "QUEUE")]
    pub to_queue: Option<String>,
    /// Destination: this legacy result folder.
    #[arg(long, group = "destination", value_name = "DIR")]
    pub to_folder: Option<PathBuf>,
    /// The destination's URL (default: --url).
    #[arg(long, value_name = "URL", hide_env_values = true)]
    pub to_url: Option<String>,
    /// With --to-exchange: publish with this routing key (default: the message's own).
    #[arg(long, short = 'k')]
    pub routing_key: Option<String>,
    /// With --to-folder: the result files' extension, or `keep` for the
    /// input's own name (rolling back into a legacy input folder).
    #[arg(long, default_value = "json")]
    pub extension: String,
    /// Mark forwarded messages persistent (kept on disk by durable queues).
    #[arg(long)]
    pub persistent: bool,
    /// Do not fail on a message no queue takes (it is dropped).
    #[arg(long)]
    pub no_mandatory: bool,
    /// Messages taken from the source ahead of the one being forwarded.
    #[arg(long, default_value_t = 64)]
    pub prefetch: u16,
    /// Print totals every this many seconds, terminal or not.
    #[arg(long, value_name = "SECS")]
    pub report_every: Option<f64>,
}

fn parse_readiness(s: &str) -> Result<Readiness, String> {
    match s {
        "renamed" => Ok(Readiness::RenamedIn),
        "done-marker" => Ok(Readiness::DoneMarker),
        _ => match s.strip_prefix("stable:") {
            Some(d) => parse_duration(d).map(Readiness::Stable),
            None => Err(format!(
                "{s:?}: expected renamed, done-marker or stable:DURATION (e.g. stable:2s)"
            )),
        },
    }
}

/// `500ms`, `2s`, `1.5s`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: expected a duration such as 500ms, 2s or 1m");
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Counts what the destination confirmed; marks messages persistent when
/// asked. Wraps any publisher, so the bridge itself is the library's.
struct Counting {
    inner: Arc<dyn Publisher>,
    persistent: bool,
    confirmed: Arc<AtomicU64>,
}

#[async_trait]
impl Publisher for Counting {
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mut message: Message,
        options: PublishOptions,
    ) -> bus::Result<()> {
        if self.persistent {
            message.properties.delivery_mode = Some(DeliveryMode::Persistent);
        }
        self.inner
            .publish(exchange, routing_key, message, options)
            .await?;
        self.confirmed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Runs `bus bridge`.
pub async fn run(url: &str, a: BridgeArgs) -> CliResult {
    let stop = Stop::install()?;
    let report = match a.report_every {
        Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(Fail::usage(format!(
                "--report-every {s}: expected seconds > 0"
            )))
        }
        None => None,
    };

    // The destination.
    let mut connections = Vec::new();
    let (destination, exchange, key): (Arc<dyn Publisher>, String, Option<String>) =
        if let Some(dir) = &a.to_folder {
            let p: Arc<dyn Publisher> = Arc::new(if a.extension == "keep" {
                ResultWriter::keeping_names(dir)?
            } else {
                ResultWriter::new(dir, &a.extension)?
            });
            (p, String::new(), None)
        } else {
            let conn = crate::conn::open(a.to_url.as_deref().unwrap_or(url)).await?;
            connections.push(conn.clone());
            match (&a.to_exchange, &a.to_queue) {
                (Some(x), _) => (Arc::new(conn), x.clone(), a.routing_key.clone()),
                (None, Some(q)) => (Arc::new(conn), String::new(), Some(q.clone())),
                (None, None) => {
                    return Err(Fail::usage(
                        "no destination: give --to-exchange, --to-queue or --to-folder",
                    ))
                }
            }
        };

    // The source.
    let source = if let Some(dir) = &a.from_folder {
        let mut inbox = Inbox::new(dir.clone());
        if let Some(r) = a.readiness.clone() {
            inbox = inbox.with_readiness(r);
        }
        if a.delete_done {
            inbox = inbox.with_consumed(Consumed::Delete);
        } else if let Some(d) = &a.done_dir {
            inbox = inbox.with_consumed(Consumed::MoveTo(d.clone()));
        }
        inbox
            .consume(a.prefetch)
            .await
            .map_err(|e| Fail::from(e).context(format!("input folder {}", dir.display())))?
    } else if let Some(q) = &a.from_queue {
        let conn = crate::conn::open(a.from_url.as_deref().unwrap_or(url)).await?;
        connections.push(conn.clone());
        conn.consume(q, ConsumeOptions::prefetch(a.prefetch))
            .await?
    } else {
        return Err(Fail::usage("no source: give --from-queue or --from-folder"));
    };

    let confirmed = Arc::new(AtomicU64::new(0));
    let counting = Counting {
        inner: destination,
        persistent: a.persistent,
        confirmed: confirmed.clone(),
    };
    let mut bridge = Bridge::new(counting, exchange).with_mandatory(!a.no_mandatory);
    if let Some(k) = key {
        bridge = bridge.with_routing_key(k);
    }

    // On a signal the source is cancelled: the bridge forwards what it
    // was already sent, and `run` returns.
    let cancel = source.cancel();
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.wait().await;
            cancel.await
        })
    };
    let started = Instant::now();
    let reporter = {
        let confirmed = confirmed.clone();
        let mut progress = Progress::new(report);
        tokio::spawn(async move {
            let Some(every) = progress.interval() else {
                return;
            };
            loop {
                tokio::time::sleep(every).await;
                progress.tick(|t| {
                    let n = confirmed.load(Ordering::Relaxed);
                    format!("bridge: {n} forwarded ({:.0} msg/s)", rate(n, t))
                });
            }
        })
    };
    let result = bridge.run(source).await;
    reporter.abort();
    stopper.abort();
    for conn in connections {
        let _ = conn.close().await;
    }
    let elapsed = started.elapsed();
    match result {
        Ok(stats) => {
            eprintln!(
                "bridge: forwarded {}, requeued {} in {:.1} s",
                stats.forwarded,
                stats.requeued,
                elapsed.as_secs_f64()
            );
            if stop.requested() {
                Ok(())
            } else {
                Err(Fail::error(
                    "the source ended (its queue was deleted or its connection closed)",
                ))
            }
        }
        Err(e) => {
            eprintln!(
                "bridge: forwarded {} before the error",
                confirmed.load(Ordering::Relaxed)
            );
            Err(Fail::from(e)
                .context("bridge stopped; the message in hand went back to the source"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_readiness_rules_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("2h").is_err());
        assert_eq!(
            parse_readiness("stable:1.5s").unwrap(),
            Readiness::Stable(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_readiness("done-marker").unwrap(),
            Readiness::DoneMarker
        );
        assert!(parse_readiness("whenever").is_err());
    }
}
