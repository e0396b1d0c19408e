//! The legacy demo service, served by this library: a drop-in replacement
//! for the Python worker of the legacy platform (pika + msgpack), which its
//! Python callers reach unchanged.
//!
//! ```text
//! cargo run --features amqp --example rpc_server -- QUEUE
//! ```
//!
//! Serves QUEUE (declared as the legacy workers declare it: not durable,
//! not exclusive, no arguments, so Python workers can serve it too) on the
//! transport `BUS_URL` names, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! unless set. Each request, whatever msgpack value it is, gets the map
//! `{"msg": "hello from service"}`, plus the request's `"echo"` value under
//! `"echo"` when the request is a map that has one. Prints one line when it
//! serves and one per request; Ctrl-C (or SIGTERM) stops it gracefully:
//! requests in hand are answered, the others stay in the queue.

use std::fmt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bus::rpc::RpcServer;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(queue), None) = (args.next(), args.next()) else {
        eprintln!("usage: rpc_server QUEUE   (transport from BUS_URL, default {DEFAULT_URL})");
        return ExitCode::from(2);
    };
    match serve(&queue).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rpc_server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(queue: &str) -> bus::Result<()> {
    let url = std::env::var("BUS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let conn = bus::connect(&url).await?;
    let served = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    let server = RpcServer::builder(conn.clone(), queue)
        .serve(move |request: DemoRequest| {
            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
            async move {
                let reply = DemoReply {
                    msg: "hello from service",
                    echo: request.echo,
                };
                println!("request {n}: {}", reply.summary());
                Ok::<_, std::convert::Infallible>(reply)
            }
        })
        .await?;
    println!(
        "serving {queue:?} on {}; Ctrl-C stops",
        bus::redact_url(&url)
    );

    // Stop on Ctrl-C or SIGTERM, and notice too if the server ends on its
    // own (its queue deleted, its connection given up).
    let stop = server.shutdown_handle();
    let asked = Arc::new(AtomicBool::new(false));
    let signal = tokio::spawn({
        let asked = asked.clone();
        async move {
            let outcome = stop_requested().await;
            println!("stopping: finishing the requests in hand");
            asked.store(true, Ordering::SeqCst);
            stop.shutdown();
            outcome
        }
    });
    server.wait().await?;
    if !asked.load(Ordering::SeqCst) {
        signal.abort();
        return Err(bus::Error::Closed("the server stopped on its own".into()));
    }
    signal
        .await
        .map_err(|e| bus::Error::Closed(format!("the signal watcher failed: {e}")))??;
    conn.close().await?;
    println!(
        "stopped after serving {} requests",
        served.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Waits for Ctrl-C, or SIGTERM (how service managers and containers ask a
/// process to stop).
async fn stop_requested() -> bus::Result<()> {
    let signal_error =
        |e: std::io::Error| bus::Error::NotSupported(format!("cannot watch for Ctrl-C: {e}"));
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.map_err(signal_error),
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map_err(signal_error)
    }
}

/// What the demo service reads of a request: any msgpack value, of which
/// only a map's `"echo"` entry matters.
struct DemoRequest {
    /// `None` when the request is not a map or has no `"echo"` key;
    /// `Some(Value::Nil)` when it has one whose value is nil.
    echo: Option<Value>,
}

/// The demo service's reply, as the legacy worker builds it.
struct DemoReply {
    msg: &'static str,
    echo: Option<Value>,
}

impl DemoReply {
    fn summary(&self) -> String {
        match &self.echo {
            Some(echo) => format!("{:?} with echo {echo}", self.msg),
            None => format!("{:?}", self.msg),
        }
    }
}

impl Serialize for DemoReply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1 + usize::from(self.echo.is_some())))?;
        map.serialize_entry("msg", self.msg)?;
        if let Some(echo) = &self.echo {
            map.serialize_entry("echo", echo)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for DemoRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RequestVisitor;

        impl<'de> Visitor<'de> for RequestVisitor {
            type Value = DemoRequest;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any msgpack value")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DemoRequest, A::Error> {
                let mut echo = None;
                while let Some(key) = map.next_key::<Value>()? {
                    if matches!(&key, Value::Str(k) if k == "echo") {
                        echo = Some(map.next_value::<Value>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(DemoRequest { echo })
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DemoRequest, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(DemoRequest { echo: None })
            }

            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<DemoRequest, D::Error> {
                d.deserialize_any(self)
            }

            fn visit_newtype_struct<D: Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<DemoRequest, D::Error> {
                // A msgpack ext value.
                IgnoredAny::deserialize(d)?;
                Ok(DemoRequest { echo: None })
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<DemoRequest, E> {
                Ok(DemoRequest { echo: None })
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<DemoRequest, E> {
                Ok(DemoRequest { echo: None })
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<DemoRequest, E> {
                Ok(DemoRequest { echo: None })
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<DemoRequest, E> {
                Ok(DemoRequest { echo: None })
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<DemoRequest, E> {
                Ok(DemoRequest { echo: None })
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<DemoRequest, E> {
                Ok(DemoRequest { echo: None })
            }
            fn visit_unit<E: de::Error>(self) -> Result<DemoRequest, E> {
                Ok(DemoRequest { echo: None })
            }
            fn visit_none<E: de::Error>(self) -> Result<DemoRequest, E> {
                Ok(DemoRequest { echo: None })
            }
        }

        deserializer.deserialize_any(RequestVisitor)
    }
}

/// Any msgpack value, kept as it came so that the echo goes back as it was
/// sent: a bin stays a bin, a str a str, a float32 a float32.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    F32(f32),
    F64(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

impl fmt::Display for Value {
    /// A short, JSON-like rendering for the log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Nil => f.write_str("nil"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(n) => write!(f, "{n}"),
            Value::UInt(n) => write!(f, "{n}"),
            Value::F32(x) => write!(f, "{x}"),
            Value::F64(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Bin(b) => write!(f, "<{} bytes>", b.len()),
            Value::Array(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Value::Map(entries) => {
                f.write_str("{")?;
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Nil => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(n) => serializer.serialize_i64(*n),
            Value::UInt(n) => serializer.serialize_u64(*n),
            Value::F32(x) => serializer.serialize_f32(*x),
            Value::F64(x) => serializer.serialize_f64(*x),
            Value::Str(s) => serializer.serialize_str(s),
            Value::Bin(b) => serializer.serialize_bytes(b),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;

        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = Value;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a msgpack value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Nil)
            }
            fn visit_none<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Nil)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
                Value::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
                Ok(Value::Bool(b))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value, E> {
                Ok(if n >= 0 {
                    Value::UInt(n.unsigned_abs())
                } else {
                    Value::Int(n)
                })
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value, E> {
                Ok(Value::UInt(n))
            }
            fn visit_f32<E: de::Error>(self, x: f32) -> Result<Value, E> {
                Ok(Value::F32(x))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> Result<Value, E> {
                Ok(Value::F64(x))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
                Ok(Value::Str(s.to_owned()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
                Ok(Value::Str(s))
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Value, E> {
                Ok(Value::Bin(b.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, b: Vec<u8>) -> Result<Value, E> {
                Ok(Value::Bin(b))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Value::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Value::Map(entries))
            }
        }

        deserializer.deserialize_any(ValueVisitor)
    }
}
