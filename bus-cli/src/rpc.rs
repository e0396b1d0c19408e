//! `bus call` and `bus serve --exec`: the legacy request/reply protocol
//! through `bus::rpc`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus::rpc::{CallOptions, Format, RpcClient, RpcClientOptions, RpcServer};
use bus::Message;
use clap::{Args, ValueEnum};

use crate::codec::{from_msgpack, parse_json, to_msgpack};
use crate::exec::{self, Origin};
use crate::fail::{CliResult, Fail};
use crate::publish::read_input;
use crate::signals::Stop;

/// The encoding of a request on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Wire {
    /// msgpack without a content type, as the legacy pika clients send it.
    Msgpack,
    /// JSON with content type application/json.
    Json,
}

/// Call a service once: JSON in, JSON out.
///
/// The request (argument, --file, or standard input) is JSON; it is sent as
/// the legacy Python clients send it (msgpack as msgpack.packb writes it,
/// no content type, reply_to, a UUID4 correlation id, the timeout as
/// expiration) and the reply is printed as one line of JSON. Binary data is
/// `{"$bytes": "<hex>"}` both ways. Exit 3 when no reply comes within
/// --timeout, 4 when no queue serves that name, 1 on an error reply.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus call asr '{\"audio\":{\"$bytes\":\"0001\"},\"language\":\"en\"}'
  bus call asr --file request.json --timeout 5
  echo '{\"echo\":1}' | bus call demo")]
pub struct CallArgs {
    /// The service's queue.
    pub queue: String,
    /// The request as JSON (else --file, else standard input).
    pub request: Option<String>,
    /// Read the request from this file (`-`: standard input).
    #[arg(long, short = 'f', conflicts_with = "request")]
    pub file: Option<PathBuf>,
    /// Seconds to wait for the reply.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// The request's encoding on the wire.
    #[arg(long, value_enum, default_value_t = Wire::Msgpack)]
    pub wire: Wire,
}

/// Runs `bus call`.
pub async fn run_call(url: &str, a: CallArgs) -> CliResult {
    let input = read_input(a.request.as_deref(), a.file.as_ref())?;
    let text =
        String::from_utf8(input).map_err(|_| Fail::usage("the request is not UTF-8 JSON"))?;
    let request = parse_json(&text)?;
    let timeout = secs(a.timeout)?;
    let message = match a.wire {
        Wire::Msgpack => Message::new(to_msgpack(&request)),
        Wire::Json => {
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Fail::usage(format!("not valid JSON: {e}")))?;
            Message::new(serde_json::to_vec(&value).unwrap_or_default())
                .with_content_type(bus::rpc::JSON_CONTENT_TYPE)
        }
    };
    let conn = crate::conn::open(url).await?;
    let client =
        RpcClient::with_options(conn.clone(), RpcClientOptions::default().timeout(timeout)).await?;
    let reply = client
        .call_raw_with(&a.queue, message, CallOptions::new().timeout(timeout))
        .await;
    drop(client);
    let _ = conn.close().await;
    let reply = reply.map_err(|e| match e {
        bus::Error::Timeout(t) => Fail {
            code: crate::fail::TIMEOUT,
            message: format!("no reply from {:?} within {t:?}", a.queue),
        },
        bus::Error::Unroutable { .. } => Fail {
            code: crate::fail::UNROUTABLE,
            message: format!(
                "no queue {:?}: is the service running? (`bus serve {} --exec CMD` serves one)",
                a.queue, a.queue
            ),
        },
        other => other.into(),
    })?;
    println!("{}", reply_json(&reply)?);
    Ok(())
}

fn secs(s: f64) -> CliResult<Duration> {
    if s.is_finite() && s > 0.0 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(Fail::usage(format!(
            "{s}: expected a positive number of seconds"
        )))
    }
}

/// A reply body as JSON, by its content type.
fn reply_json(reply: &Message) -> CliResult<serde_json::Value> {
    match Format::of(reply)? {
        Format::MsgPack => from_msgpack(&reply.body)
            .map_err(|e| Fail::error(format!("the reply is not msgpack: {e}"))),
        Format::Json => serde_json::from_slice(&reply.body)
            .map_err(|e| Fail::error(format!("the reply is not JSON: {e}"))),
    }
}

/// Serve a queue with a program: one process per request, its standard
/// output is the reply.
///
/// Each request starts the command (through `sh -c`) with the request body
/// on standard input and its properties in BUS_* environment variables
/// (see `bus help work`). Exit 0: standard output is the reply. Otherwise
/// the caller gets an error reply with the exit code and the end of
/// standard error. With --msgpack, the program reads the request as JSON
/// (decoded from msgpack, or JSON as sent) and prints JSON, which is sent
/// back msgpack-encoded as a legacy Python service would (JSON to a JSON
/// request). SIGINT/SIGTERM: stop taking requests, answer those in hand,
/// exit.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  bus serve demo --msgpack --exec 'python3 service.py'   # legacy Python clients call it
  bus serve upper --exec 'tr a-z A-Z' --concurrency 4")]
pub struct ServeArgs {
    /// The queue to serve (declared as the legacy services declare it).
    pub queue: String,
    /// The command to run for each request.
    #[arg(long)]
    pub exec: String,
    /// Requests handled at once (processes running at once).
    #[arg(long, short = 'c', default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// JSON on the program's side, msgpack on the wire (the legacy protocol).
    #[arg(long)]
    pub msgpack: bool,
}

/// Runs `bus serve`.
pub async fn run_serve(url: &str, a: ServeArgs) -> CliResult {
    let stop = Stop::install()?;
    let conn = crate::conn::open(url).await?;
    let command = Arc::new(a.exec.clone());
    let queue = a.queue.clone();
    let msgpack = a.msgpack;
    let served = Arc::new(AtomicU32::new(0));
    let counter = served.clone();
    let server = RpcServer::builder(conn.clone(), a.queue.clone())
        .concurrency(a.concurrency)
        .serve_raw(move |request: Message| {
            let command = command.clone();
            let queue = queue.clone();
            let counter = counter.clone();
            async move {
                let reply = handle(&command, &queue, request, msgpack).await;
                counter.fetch_add(1, Ordering::Relaxed);
                reply
            }
        })
        .await?;
    eprintln!("bus: serving {:?}", server.queue());
    let handle = server.shutdown_handle();
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.wait().await;
            handle.shutdown();
        })
    };
    let result = server.wait().await;
    stopper.abort();
    let _ = conn.close().await;
    eprintln!("bus: served {} requests", served.load(Ordering::Relaxed));
    match result {
        Ok(()) if stop.requested() => Ok(()),
        Ok(()) => Err(Fail::error(
            "the server stopped: its queue was deleted or the connection closed",
        )),
        Err(e) => Err(e.into()),
    }
}

async fn handle(
    command: &str,
    queue: &str,
    request: Message,
    msgpack: bool,
) -> Result<Message, String> {
    let format = Format::of(&request).map_err(|e| e.to_string())?;
    let mut input = request.clone();
    if msgpack {
        let json = match format {
            Format::MsgPack => from_msgpack(&request.body)?,
            Format::Json => serde_json::from_slice(&request.body)
                .map_err(|e| format!("the request is not JSON: {e}"))?,
        };
        input.body = json.to_string().into_bytes().into();
    }
    let origin = Origin {
        queue: queue.to_owned(),
        attempt: 1,
        redelivered: false,
        ..Origin::default()
    };
    let outcome = exec::run(command, &origin, &input)
        .await
        .map_err(|e| format!("cannot start the command: {e}"))?;
    if !outcome.success() {
        return Err(outcome.failure());
    }
    if !msgpack {
        return Ok(Message::new(outcome.stdout));
    }
    let text = String::from_utf8(outcome.stdout)
        .map_err(|_| "the command printed something that is not UTF-8 JSON".to_owned())?;
    let value = parse_json(text.trim()).map_err(|e| format!("the command's output: {e}"))?;
    Ok(match format {
        Format::MsgPack => Message::new(to_msgpack(&value)),
        Format::Json => Message::new(text.trim().as_bytes().to_vec())
            .with_content_type(bus::rpc::JSON_CONTENT_TYPE),
    })
}
