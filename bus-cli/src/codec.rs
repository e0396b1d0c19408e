//! JSON in and out: msgpack written as Python's `msgpack.packb` writes it,
//! msgpack read back as JSON, header values, and deliveries as JSON lines.
//!
//! Binary data has no JSON form; on both sides an object with the single
//! key `"$bytes"` and a hex string stands for it (msgpack `bin`, Python
//! `bytes`), the convention of the legacy test client.

use std::fmt;

use base64::Engine;
use bus::{Delivery, FieldTable, FieldValue, Properties};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Map, Value};

use crate::fail::{CliResult, Fail};

/// A JSON document with its object keys in the order written, as Python's
/// `json.loads` keeps them (so that msgpack maps come out in that order).
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A negative integer.
    Int(i64),
    /// A non-negative integer.
    UInt(u64),
    /// A number with a fraction or exponent.
    Float(f64),
    /// A string.
    Str(String),
    /// `{"$bytes": "<hex>"}`: binary data.
    Bytes(Vec<u8>),
    /// An array.
    Array(Vec<Json>),
    /// An object, keys in document order.
    Object(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(if v >= 0 {
                    Json::UInt(v as u64)
                } else {
                    Json::Int(v)
                })
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::UInt(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
                Ok(Json::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Json, E> {
                Ok(Json::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut entries: Vec<(String, Json)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Json>()? {
                    // Python keeps the last value of a repeated key, in the
                    // position of the first.
                    if let Some(slot) = entries.iter_mut().find(|(key, _)| *key == k) {
                        slot.1 = v;
                    } else {
                        entries.push((k, v));
                    }
                }
                if let [(k, Json::Str(hex))] = entries.as_slice() {
                    if k == "$bytes" {
                        return hex_decode(hex).map(Json::Bytes).ok_or_else(|| {
                            de::Error::custom(format!("\"$bytes\": {hex:?} is not a hex string"))
                        });
                    }
                }
                Ok(Json::Object(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses JSON text, keeping key order.
pub fn parse_json(text: &str) -> CliResult<Json> {
    serde_json::from_str(text).map_err(|e| Fail::usage(format!("not valid JSON: {e}")))
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Encodes a JSON value as msgpack, byte for byte as Python's
/// `msgpack.packb(json.loads(text))` does: the smallest integer encodings
/// (unsigned families for non-negative values), floats as float 64, strings
/// as str (str8 included), `$bytes` objects as bin, maps in key order.
pub fn to_msgpack(value: &Json) -> Vec<u8> {
    let mut out = Vec::new();
    write_msgpack(&mut out, value);
    out
}

fn write_msgpack(out: &mut Vec<u8>, value: &Json) {
    use rmp::encode;
    // Writing into a Vec cannot fail.
    match value {
        Json::Null => encode::write_nil(out).expect("vec write"),
        Json::Bool(b) => encode::write_bool(out, *b).expect("vec write"),
        Json::Int(i) => {
            encode::write_sint(out, *i).expect("vec write");
        }
        Json::UInt(u) => {
            encode::write_uint(out, *u).expect("vec write");
        }
        Json::Float(f) => encode::write_f64(out, *f).expect("vec write"),
        Json::Str(s) => encode::write_str(out, s).expect("vec write"),
        Json::Bytes(b) => encode::write_bin(out, b).expect("vec write"),
        Json::Array(items) => {
            encode::write_array_len(out, items.len() as u32).expect("vec write");
            for item in items {
                write_msgpack(out, item);
            }
        }
        Json::Object(entries) => {
            encode::write_map_len(out, entries.len() as u32).expect("vec write");
            for (k, v) in entries {
                encode::write_str(out, k).expect("vec write");
                write_msgpack(out, v);
            }
        }
    }
}

/// Decodes one msgpack value (the whole body: trailing bytes are an error)
/// into JSON: bin as `{"$bytes": hex}`, non-string map keys as their JSON
/// text, extension types as `{"$ext": [type, hex]}`.
pub fn from_msgpack(bytes: &[u8]) -> Result<Value, String> {
    let mut cursor = bytes;
    let value = rmpv::decode::read_value(&mut cursor).map_err(|e| format!("not msgpack: {e}"))?;
    if !cursor.is_empty() {
        return Err(format!(
            "not one msgpack value: {} trailing bytes after it",
            cursor.len()
        ));
    }
    Ok(msgpack_to_json(&value))
}

fn msgpack_to_json(v: &rmpv::Value) -> Value {
    use rmpv::Value as M;
    match v {
        M::Nil => Value::Null,
        M::Boolean(b) => Value::Bool(*b),
        M::Integer(i) => i
            .as_u64()
            .map(Value::from)
            .or_else(|| i.as_i64().map(Value::from))
            .unwrap_or(Value::Null),
        M::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        M::F64(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        M::String(s) => match s.as_str() {
            Some(s) => Value::String(s.to_owned()),
            None => json!({ "$bytes": hex_encode(s.as_bytes()) }),
        },
        M::Binary(b) => json!({ "$bytes": hex_encode(b) }),
        M::Array(items) => Value::Array(items.iter().map(msgpack_to_json).collect()),
        M::Map(entries) => {
            let mut map = Map::new();
            for (k, v) in entries {
                let key = match k {
                    M::String(s) if s.as_str().is_some() => s.as_str().unwrap_or("").to_owned(),
                    other => msgpack_to_json(other).to_string(),
                };
                map.insert(key, msgpack_to_json(v));
            }
            Value::Object(map)
        }
        M::Ext(t, data) => json!({ "$ext": [t, hex_encode(data)] }),
    }
}

/// A header or argument value as JSON: numbers, strings, booleans, tables
/// and arrays as themselves, bytes as `{"$bytes": hex}`, void as `null`.
pub fn field_to_json(v: &FieldValue) -> Value {
    match v {
        FieldValue::Bool(b) => Value::Bool(*b),
        FieldValue::F32(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        FieldValue::F64(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        FieldValue::Decimal { scale, value } => {
            let f = f64::from(*value) / 10f64.powi(i32::from(*scale));
            serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
        }
        FieldValue::String(s) => Value::String(s.clone()),
        FieldValue::Bytes(b) => json!({ "$bytes": hex_encode(b) }),
        FieldValue::Timestamp(t) => Value::from(*t),
        FieldValue::Table(t) => table_to_json(t),
        FieldValue::Array(items) => Value::Array(items.iter().map(field_to_json).collect()),
        FieldValue::Void => Value::Null,
        other => other.as_i64().map_or(Value::Null, Value::from),
    }
}

/// A field table as a JSON object.
pub fn table_to_json(t: &FieldTable) -> Value {
    Value::Object(
        t.iter()
            .map(|(k, v)| (k.clone(), field_to_json(v)))
            .collect(),
    )
}

/// A JSON value as a header or argument value: integers as 64-bit signed,
/// other numbers as 64-bit floats, objects as tables, `$bytes` as bytes,
/// `null` as void.
pub fn json_to_field(v: &Json) -> CliResult<FieldValue> {
    Ok(match v {
        Json::Null => FieldValue::Void,
        Json::Bool(b) => FieldValue::Bool(*b),
        Json::Int(i) => FieldValue::I64(*i),
        Json::UInt(u) => FieldValue::I64(
            i64::try_from(*u).map_err(|_| Fail::usage(format!("{u} does not fit a header")))?,
        ),
        Json::Float(f) => FieldValue::F64(*f),
        Json::Str(s) => FieldValue::String(s.clone()),
        Json::Bytes(b) => FieldValue::Bytes(b.clone().into()),
        Json::Array(items) => {
            FieldValue::Array(items.iter().map(json_to_field).collect::<CliResult<_>>()?)
        }
        Json::Object(entries) => FieldValue::Table(
            entries
                .iter()
                .map(|(k, v)| Ok((k.clone(), json_to_field(v)?)))
                .collect::<CliResult<_>>()?,
        ),
    })
}

/// Parses `NAME=TEXT` (a string value) or `NAME:=JSON` (a typed value).
pub fn parse_assignment(s: &str) -> CliResult<(String, FieldValue)> {
    if let Some((k, v)) = s.split_once(":=") {
        if !k.contains('=') {
            let value = json_to_field(&parse_json(v).map_err(|e| e.context(s))?)?;
            return Ok((k.to_owned(), value));
        }
    }
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), FieldValue::String(v.to_owned()))),
        _ => Err(Fail::usage(format!(
            "{s:?}: expected NAME=TEXT or NAME:=JSON (e.g. lang=en, retries:=3)"
        ))),
    }
}

/// How `consume` and `get` show bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Decode {
    /// Text when the body is UTF-8, else base64.
    Auto,
    /// Text, invalid UTF-8 replaced by U+FFFD.
    Text,
    /// Always base64.
    Base64,
    /// msgpack decoded to JSON (base64 with a `decode_error` when it is not msgpack).
    Msgpack,
    /// JSON decoded (base64 with a `decode_error` when it is not JSON).
    Json,
}

/// The body as a JSON value and the name of its encoding in the output.
pub fn body_to_json(body: &[u8], decode: Decode) -> (Value, &'static str, Option<String>) {
    let b64 = || Value::String(base64::engine::general_purpose::STANDARD.encode(body));
    match decode {
        Decode::Auto => match std::str::from_utf8(body) {
            Ok(s) => (Value::String(s.to_owned()), "text", None),
            Err(_) => (b64(), "base64", None),
        },
        Decode::Text => (
            Value::String(String::from_utf8_lossy(body).into_owned()),
            "text",
            None,
        ),
        Decode::Base64 => (b64(), "base64", None),
        Decode::Msgpack => match from_msgpack(body) {
            Ok(v) => (v, "msgpack", None),
            Err(e) => (b64(), "base64", Some(e)),
        },
        Decode::Json => match serde_json::from_slice::<Value>(body) {
            Ok(v) => (v, "json", None),
            Err(e) => (b64(), "base64", Some(format!("not JSON: {e}"))),
        },
    }
}

/// The properties that are set, as a JSON object (headers apart).
pub fn properties_to_json(p: &Properties) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), v);
        }
    };
    put("content_type", p.content_type.clone().map(Value::from));
    put(
        "content_encoding",
        p.content_encoding.clone().map(Value::from),
    );
    put(
        "delivery_mode",
        p.delivery_mode.map(|d| Value::from(d.as_u8())),
    );
    put("priority", p.priority.map(Value::from));
    put("correlation_id", p.correlation_id.clone().map(Value::from));
    put("reply_to", p.reply_to.clone().map(Value::from));
    put("expiration", p.expiration.clone().map(Value::from));
    put("message_id", p.message_id.clone().map(Value::from));
    put("timestamp", p.timestamp.map(Value::from));
    put("type", p.kind.clone().map(Value::from));
    put("user_id", p.user_id.clone().map(Value::from));
    put("app_id", p.app_id.clone().map(Value::from));
    Value::Object(m)
}

/// A delivery as one JSON object: `exchange`, `routing_key`,
/// `redelivered`, `properties`, `headers`, `body`, `body_encoding`, and
/// `decode_error` when the asked decoding failed.
pub fn delivery_to_json(d: &Delivery, decode: Decode) -> Value {
    let (body, encoding, error) = body_to_json(&d.message.body, decode);
    let mut v = json!({
        "exchange": d.exchange,
        "routing_key": d.routing_key,
        "redelivered": d.redelivered,
        "properties": properties_to_json(&d.message.properties),
        "headers": table_to_json(&d.message.properties.headers),
        "body": body,
        "body_encoding": encoding,
    });
    if let Some(e) = error {
        v["decode_error"] = Value::String(e);
    }
    v
}

/// A delivery as text for a person at a terminal.
pub fn delivery_to_text(d: &Delivery, decode: Decode) -> String {
    let mut out = format!(
        "--- exchange={:?} routing_key={:?} redelivered={}\n",
        d.exchange, d.routing_key, d.redelivered
    );
    if let Value::Object(props) = properties_to_json(&d.message.properties) {
        for (k, v) in props {
            out.push_str(&format!("{k}: {v}\n"));
        }
    }
    for (k, v) in &d.message.properties.headers {
        out.push_str(&format!("header {k}: {}\n", field_to_json(v)));
    }
    let (body, _encoding, error) = body_to_json(&d.message.body, decode);
    if let Some(e) = error {
        out.push_str(&format!("({e})\n"));
    }
    match body {
        Value::String(s) => out.push_str(&s),
        other => out.push_str(&serde_json::to_string_pretty(&other).unwrap_or_default()),
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packb(text: &str) -> Vec<u8> {
        to_msgpack(&parse_json(text).unwrap())
    }

    #[test]
    fn msgpack_matches_python_packb() {
        // Expected bytes from Python 3.11, msgpack 1.2: msgpack.packb(json.loads(text)).
        assert_eq!(packb("1"), [0x01]);
        assert_eq!(packb("-1"), [0xff]);
        assert_eq!(packb("200"), [0xcc, 200]);
        assert_eq!(packb("-200"), [0xd1, 0xff, 0x38]);
        assert_eq!(packb("70000"), [0xce, 0x00, 0x01, 0x11, 0x70]);
        assert_eq!(packb("1.5"), [0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]);
        assert_eq!(packb("null"), [0xc0]);
        assert_eq!(packb("[true,false]"), [0x92, 0xc3, 0xc2]);
        assert_eq!(
            packb(r#"{"b":1,"a":2}"#),
            [0x82, 0xa1, b'b', 1, 0xa1, b'a', 2]
        );
        let long = "x".repeat(40);
        let mut want = vec![0xd9, 40];
        want.extend(long.as_bytes());
        assert_eq!(packb(&format!("{long:?}")), want);
        assert_eq!(packb(r#"{"$bytes":"0aff"}"#), [0xc4, 2, 0x0a, 0xff]);
    }

    #[test]
    fn msgpack_round_trips_to_json() {
        let text = r#"{"msg":"hé","n":[1,-2,3.5],"raw":{"$bytes":"00ff"},"none":null}"#;
        let back = from_msgpack(&packb(text)).unwrap();
        let want: Value = serde_json::from_str(text).unwrap();
        assert_eq!(back, want);
    }

    #[test]
    fn trailing_bytes_are_refused() {
        assert!(from_msgpack(b"30").is_err());
        assert!(from_msgpack(&[0x01]).is_ok());
    }

    #[test]
    fn assignments_are_strings_or_typed_json() {
        assert_eq!(
            parse_assignment("lang=en").unwrap(),
            ("lang".into(), FieldValue::String("en".into()))
        );
        assert_eq!(
            parse_assignment("n:=3").unwrap(),
            ("n".into(), FieldValue::I64(3))
        );
        assert_eq!(
            parse_assignment("url=a:=b").unwrap(),
            ("url".into(), FieldValue::String("a:=b".into()))
        );
        assert!(parse_assignment("novalue").is_err());
    }
}
