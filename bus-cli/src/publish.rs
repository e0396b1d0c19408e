//! `bus publish`.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Instant;

use bus::{DeliveryMode, FieldTable, Message, PublishOptions};
use clap::Args;
use futures::StreamExt;

use crate::codec::{parse_assignment, parse_json, to_msgpack};
use crate::fail::{CliResult, Fail};
use crate::signals::rate;

/// Publish messages and wait for the broker's confirm.
///
/// The body comes from the BODY argument, from --file (`-` is standard
/// input), or from standard input when it is not a terminal. With --lines,
/// every line is one message. Publishes are mandatory unless
/// --no-mandatory: a message no queue takes fails with exit code 4.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus publish --queue jobs 'hello'                       # to a queue (default exchange)
  bus publish -e speech -k asr.en --persistent --header lang=en --file job.wav
  bus publish --queue asr --msgpack '{\"audio\":{\"$bytes\":\"00ff\"},\"language\":\"en\"}'
  seq 1000 | bus publish --queue jobs --lines           # one message per line
  bus publish -e events -k x --no-mandatory 'dropped if unbound'")]
pub struct PublishArgs {
    /// The body (else --file, else standard input).
    pub body: Option<String>,
    /// Read the body from this file (`-`: standard input).
    #[arg(long, short = 'f', conflicts_with = "body")]
    pub file: Option<PathBuf>,
    /// One message per line of the input (the newline is not part of the body).
    #[arg(long)]
    pub lines: bool,
    /// The exchange ("" is the default exchange).
    #[arg(long, short = 'e', default_value = "")]
    pub exchange: String,
    /// The routing key.
    #[arg(long, short = 'k', default_value = "", conflicts_with = "queue")]
    pub routing_key: String,
    /// Publish straight to this queue (the default exchange, routing key QUEUE).
    #[arg(long, short = 'q', conflicts_with = "exchange")]
    pub queue: Option<String>,
    /// The body is JSON, sent as msgpack exactly as Python's msgpack.packb
    /// writes it (`{"$bytes": "<hex>"}` stands for binary data).
    #[arg(long)]
    pub msgpack: bool,
    /// Do not fail when no queue takes the message (it is then dropped).
    #[arg(long)]
    pub no_mandatory: bool,
    /// Publishes waiting for their confirm at once, with --lines.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub in_flight: u16,
    #[command(flatten)]
    pub props: PropsArgs,
}

/// Message properties as flags.
#[derive(Debug, Args, Default)]
pub struct PropsArgs {
    /// A header: NAME=TEXT, or NAME:=JSON for a typed value (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Delivery mode 2: kept on disk by durable queues.
    #[arg(long)]
    pub persistent: bool,
    /// content_type.
    #[arg(long)]
    pub content_type: Option<String>,
    /// content_encoding.
    #[arg(long)]
    pub content_encoding: Option<String>,
    /// Message TTL in milliseconds (expiration).
    #[arg(long, value_name = "MS")]
    pub expiration: Option<u64>,
    /// priority (0-255).
    #[arg(long)]
    pub priority: Option<u8>,
    /// correlation_id.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// reply_to.
    #[arg(long)]
    pub reply_to: Option<String>,
    /// message_id.
    #[arg(long)]
    pub message_id: Option<String>,
    /// timestamp, seconds since the epoch.
    #[arg(long)]
    pub timestamp: Option<u64>,
    /// type.
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// user_id (RabbitMQ checks it against the connection's user).
    #[arg(long)]
    pub user_id: Option<String>,
    /// app_id.
    #[arg(long)]
    pub app_id: Option<String>,
}

impl PropsArgs {
    /// A message with this body and these properties.
    pub fn message(&self, body: Vec<u8>) -> CliResult<Message> {
        let mut headers = FieldTable::new();
        for h in &self.headers {
            let (k, v) = parse_assignment(h)?;
            headers.insert(k, v);
        }
        let mut m = Message::new(body).with_headers(headers);
        if self.persistent {
            m = m.with_delivery_mode(DeliveryMode::Persistent);
        }
        let p = &mut m.properties;
        p.content_type = self.content_type.clone();
        p.content_encoding = self.content_encoding.clone();
        p.expiration = self.expiration.map(|ms| ms.to_string());
        p.priority = self.priority;
        p.correlation_id = self.correlation_id.clone();
        p.reply_to = self.reply_to.clone();
        p.message_id = self.message_id.clone();
        p.timestamp = self.timestamp;
        p.kind = self.kind.clone();
        p.user_id = self.user_id.clone();
        p.app_id = self.app_id.clone();
        Ok(m)
    }
}

/// Reads the input a verb was given: the argument, a file, or stdin.
pub fn read_input(arg: Option<&str>, file: Option<&PathBuf>) -> CliResult<Vec<u8>> {
    if let Some(s) = arg {
        return Ok(s.as_bytes().to_vec());
    }
    match file {
        Some(p) if p.as_os_str() == "-" => read_stdin(),
        Some(p) => {
            std::fs::read(p).map_err(|e| Fail::error(format!("cannot read {}: {e}", p.display())))
        }
        None if std::io::stdin().is_terminal() => Err(Fail::usage(
            "no body: give it as an argument, with --file PATH, or on standard input",
        )),
        None => read_stdin(),
    }
}

fn read_stdin() -> CliResult<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| Fail::error(format!("cannot read standard input: {e}")))?;
    Ok(buf)
}

/// Runs `bus publish`.
pub async fn run(url: &str, a: PublishArgs) -> CliResult {
    let input = read_input(a.body.as_deref(), a.file.as_ref())?;
    let bodies: Vec<Vec<u8>> = if a.lines {
        input
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
            .filter(|l| !l.is_empty())
            .collect()
    } else {
        vec![input]
    };
    let bodies = if a.msgpack {
        bodies
            .into_iter()
            .map(|b| {
                let text = String::from_utf8(b)
                    .map_err(|_| Fail::usage("--msgpack: the body is not UTF-8 JSON"))?;
                Ok(to_msgpack(&parse_json(&text)?))
            })
            .collect::<CliResult<Vec<_>>>()?
    } else {
        bodies
    };
    let messages = bodies
        .into_iter()
        .map(|b| a.props.message(b))
        .collect::<CliResult<Vec<_>>>()?;
    let (exchange, key) = match &a.queue {
        Some(q) => (String::new(), q.clone()),
        None => (a.exchange.clone(), a.routing_key.clone()),
    };
    let options = PublishOptions::default().with_mandatory(!a.no_mandatory);
    let conn = crate::conn::open(url).await?;
    let started = Instant::now();
    let total = messages.len() as u64;
    let mut results = futures::stream::iter(messages.into_iter().map(|m| {
        let conn = conn.clone();
        let (exchange, key, options) = (exchange.clone(), key.clone(), options.clone());
        async move { conn.publish(&exchange, &key, m, options).await }
    }))
    .buffered(usize::from(a.in_flight));
    let mut done = 0u64;
    let mut first_error = None;
    while let Some(r) = results.next().await {
        match r {
            Ok(()) => done += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    drop(results);
    let _ = conn.close().await;
    if let Some(e) = first_error {
        let fail = Fail::from(e);
        return Err(if total > 1 {
            fail.context(format!("{done} of {total} messages confirmed"))
        } else {
            fail
        });
    }
    if std::io::stderr().is_terminal() && total > 1 {
        eprintln!(
            "published {done} messages ({:.0} msg/s)",
            rate(done, started.elapsed())
        );
    }
    Ok(())
}
