//! Calls a service the way the legacy Python callers do, from the command
//! line: the request is written in JSON, sent as msgpack, and the reply
//! printed as JSON.
//!
//! ```text
//! cargo run --features amqp --example rpc_client -- QUEUE '{"x": 12, "echo": "hi"}'
//! ```
//!
//! The transport comes from `BUS_URL` (`amqp://guest:guest@127.0.0.1:5672/%2f`
//! unless set), the timeout in seconds from `RPC_TIMEOUT_SECS` (10 unless
//! set). JSON `-` reads the request from standard input. Binary data (msgpack
//! bin) is written `{"$bytes": "<hex>"}`, in the request and in the reply.
//!
//! Prints the reply on one line and exits 0; on failure prints why on
//! standard error and exits 2 when no reply came in time, 1 otherwise
//! (the service failed, no such queue, bad arguments, no transport).

use std::fmt;
use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use bus::rpc::{CallOptions, RpcClient};
use bus::Error;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DEFAULT_TIMEOUT_SECS: u64 = 10;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(queue), Some(json), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: rpc_client QUEUE JSON   (JSON `-` reads standard input; transport from BUS_URL, default {DEFAULT_URL}; timeout from RPC_TIMEOUT_SECS, default {DEFAULT_TIMEOUT_SECS})");
        return ExitCode::from(1);
    };
    match call(&queue, &json).await {
        Ok(reply) => {
            println!("{reply}");
            ExitCode::SUCCESS
        }
        Err(Failure::Timeout(timeout)) => {
            eprintln!(
                "rpc_client: no reply from {queue:?} within {} s (is a server running? RPC_TIMEOUT_SECS sets the timeout)",
                timeout.as_secs_f64()
            );
            ExitCode::from(2)
        }
        Err(Failure::Other(message)) => {
            eprintln!("rpc_client: {message}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Timeout(Duration),
    Other(String),
}

async fn call(queue: &str, json: &str) -> Result<Json, Failure> {
    let timeout = match std::env::var("RPC_TIMEOUT_SECS") {
        Ok(secs) => secs
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Failure::Other(format!(
                    "RPC_TIMEOUT_SECS={secs:?} is not a positive number of seconds"
                ))
            })?,
        Err(_) => Duration::from_secs(DEFAULT_TIMEOUT_SECS),
    };
    let text = if json == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|e| {
            Failure::Other(format!("cannot read the request from standard input: {e}"))
        })?;
        text
    } else {
        json.to_owned()
    };
    let request: Json = serde_json::from_str(&text)
        .map_err(|e| Failure::Other(format!("the request is not JSON: {e}")))?;

    let url = std::env::var("BUS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let conn = bus::connect(&url).await.map_err(failure)?;
    let client = RpcClient::new(conn.clone()).await.map_err(failure)?;
    let reply = client
        .call_with::<_, JsonReply>(
            queue,
            &Request(&request),
            CallOptions::new().timeout(timeout),
        )
        .await
        .map_err(failure);
    // The reply is in hand or the call failed either way: closing is
    // courtesy to the broker, and its error would hide the call's outcome.
    let _ = conn.close().await;
    Ok(reply?.0)
}

fn failure(error: Error) -> Failure {
    match error {
        Error::Timeout(timeout) => Failure::Timeout(timeout),
        Error::Remote { message } => Failure::Other(format!("the service failed: {message}")),
        Error::Unroutable { routing_key, .. } => Failure::Other(format!(
            "no queue {routing_key:?} to take the request: is its server running?"
        )),
        other => Failure::Other(other.to_string()),
    }
}

/// A JSON request written as msgpack: `{"$bytes": "<hex>"}` as bin,
/// integers as integers, objects as maps with string keys.
struct Request<'a>(&'a Json);

impl Serialize for Request<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Json::Null => serializer.serialize_unit(),
            Json::Bool(b) => serializer.serialize_bool(*b),
            Json::Number(n) => n.serialize(serializer),
            Json::String(s) => serializer.serialize_str(s),
            Json::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Request(item))?;
                }
                seq.end()
            }
            Json::Object(entries) => {
                if let Some(bytes) = as_bytes(self.0) {
                    let bytes = from_hex(bytes).map_err(serde::ser::Error::custom)?;
                    return serializer.serialize_bytes(&bytes);
                }
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, &Request(v))?;
                }
                map.end()
            }
        }
    }
}

/// The hex text of a `{"$bytes": "<hex>"}` object.
fn as_bytes(value: &Json) -> Option<&str> {
    match value.as_object()? {
        entries if entries.len() == 1 => entries.get("$bytes")?.as_str(),
        _ => None,
    }
}

fn from_hex(hex: &str) -> Result<Vec<u8>, String> {
    let digits = hex.as_bytes();
    if digits.len() % 2 != 0 {
        return Err(format!(
            "{{\"$bytes\": ...}} needs an even number of hex digits, got {}",
            digits.len()
        ));
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("{{\"$bytes\": ...}} holds a non-hex digit in {hex:?}"))
        })
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A msgpack reply read as JSON: bin as `{"$bytes": "<hex>"}`, a map key
/// that is not a string as its JSON text, a float JSON cannot hold (NaN,
/// infinities) as null.
struct JsonReply(Json);

impl<'de> Deserialize<'de> for JsonReply {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor).map(JsonReply)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a msgpack value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Json, E> {
        Ok(b.into())
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Json, E> {
        Ok(n.into())
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Json, E> {
        Ok(n.into())
    }
    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Json, E> {
        Ok(serde_json::Number::from_f64(x).map_or(Json::Null, Json::Number))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Json, E> {
        Ok(s.into())
    }
    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Json, E> {
        let mut object = serde_json::Map::new();
        object.insert("$bytes".into(), to_hex(b).into());
        Ok(object.into())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(JsonReply(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some((JsonReply(key), JsonReply(value))) = map.next_entry()? {
            let key = match key {
                Json::String(s) => s,
                other => other.to_string(),
            };
            object.insert(key, value);
        }
        Ok(object.into())
    }
}
