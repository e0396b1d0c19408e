//! Body encodings of requests and replies, as the legacy peers write them.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::value::FieldValue;

/// The content type of a msgpack body. The legacy peers set no content type
/// at all, which means msgpack too.
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";

/// The content type of a JSON body.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The header an error reply carries, holding the error text. A Rust client
/// turns such a reply into [`Error::Remote`].
pub const ERROR_HEADER: &str = "x-rpc-error";

/// How a request or reply body is encoded.
///
/// msgpack is written as the legacy Python peers (`msgpack.packb`) write it:
/// structs as maps with string keys, `serde_bytes` fields as the bin type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Format {
    /// msgpack, the legacy encoding; sent without a content type.
    #[default]
    MsgPack,
    /// JSON, sent with content type `application/json`.
    Json,
}

impl Format {
    /// The format a content type names: none, `application/msgpack` or
    /// `application/x-msgpack` is msgpack; `application/json` (parameters
    /// such as `; charset=utf-8` allowed) is JSON.
    ///
    /// # Errors
    /// [`Error::Codec`] for any other content type.
    pub fn from_content_type(content_type: Option<&str>) -> Result<Format> {
        let Some(ct) = content_type else {
            return Ok(Format::MsgPack);
        };
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case(JSON_CONTENT_TYPE) {
            Ok(Format::Json)
        } else if essence.eq_ignore_ascii_case(MSGPACK_CONTENT_TYPE)
            || essence.eq_ignore_ascii_case("application/x-msgpack")
        {
            Ok(Format::MsgPack)
        } else {
            Err(Error::Codec(format!(
                "unsupported content type {ct:?}: expected none or application/msgpack (msgpack), or application/json"
            )))
        }
    }

    /// The format of a message's body, from its content type.
    ///
    /// # Errors
    /// As [`Format::from_content_type`].
    pub fn of(message: &Message) -> Result<Format> {
        Format::from_content_type(message.properties.content_type.as_deref())
    }

    /// The content type to send with a body of this format: none for
    /// msgpack, as the legacy peers send it.
    #[must_use]
    pub fn content_type(self) -> Option<&'static str> {
        match self {
            Format::MsgPack => None,
            Format::Json => Some(JSON_CONTENT_TYPE),
        }
    }

    /// Encodes a value: msgpack with structs as maps with string keys, or
    /// JSON.
    ///
    /// # Errors
    /// [`Error::Codec`] when the value cannot be written in this format.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>> {
        match self {
            Format::MsgPack => rmp_serde::to_vec_named(value)
                .map_err(|e| Error::Codec(format!("cannot encode msgpack: {e}"))),
            Format::Json => serde_json::to_vec(value)
                .map_err(|e| Error::Codec(format!("cannot encode JSON: {e}"))),
        }
    }

    /// Decodes a value. The bytes must hold exactly one value: trailing
    /// bytes after it are an error (JSON allows trailing whitespace).
    ///
    /// # Errors
    /// [`Error::Codec`] when the bytes are not a valid encoding of `T`, or
    /// hold more than one value.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T> {
        match self {
            Format::MsgPack => {
                let mut input = std::io::Cursor::new(bytes);
                let value = T::deserialize(&mut rmp_serde::Deserializer::new(&mut input))
                    .map_err(|e| Error::Codec(format!("cannot decode msgpack body: {e}")))?;
                let used = usize::try_from(input.position()).unwrap_or(usize::MAX);
                if used < bytes.len() {
                    return Err(Error::Codec(format!(
                        "cannot decode msgpack body: {} trailing bytes after the value",
                        bytes.len() - used
                    )));
                }
                Ok(value)
            }
            Format::Json => serde_json::from_slice(bytes)
                .map_err(|e| Error::Codec(format!("cannot decode JSON body: {e}"))),
        }
    }

    /// A message whose body is `value` in this format, with the matching
    /// content type (none for msgpack).
    ///
    /// # Errors
    /// As [`Format::encode`].
    pub fn to_message<T: Serialize + ?Sized>(self, value: &T) -> Result<Message> {
        let mut message = Message::new(self.encode(value)?);
        message.properties.content_type = self.content_type().map(str::to_owned);
        Ok(message)
    }
}

/// Decodes a message's body in the format its content type names (msgpack
/// when it has none).
///
/// # Errors
/// [`Error::Codec`] for an unknown content type or a body that does not
/// decode as `T`.
pub fn decode_message<T: DeserializeOwned>(message: &Message) -> Result<T> {
    Format::of(message)?.decode(&message.body)
}

/// The error text of an error reply (its [`ERROR_HEADER`]), if it is one.
#[must_use]
pub fn remote_error(message: &Message) -> Option<String> {
    match message.properties.headers.get(ERROR_HEADER)? {
        FieldValue::String(s) => Some(s.clone()),
        FieldValue::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        other => Some(other.to_string()),
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

/// An error reply: the [`ERROR_HEADER`] carrying `text`, and a body that a
/// legacy client can read, the map `{"error": text}` in `format`.
#[must_use]
pub fn error_reply(text: &str, format: Format) -> Message {
    let body = ErrorBody { error: text };
    // A map of one string always encodes; the fallback keeps this infallible.
    let mut message = format
        .to_message(&body)
        .unwrap_or_else(|_| Message::new(Vec::new()));
    message
        .properties
        .headers
        .insert(ERROR_HEADER.to_owned(), FieldValue::String(text.to_owned()));
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Job {
        id: u32,
        #[serde(with = "serde_bytes")]
        audio: Vec<u8>,
    }

    #[test]
    fn content_types_name_formats() {
        assert_eq!(Format::from_content_type(None).unwrap(), Format::MsgPack);
        assert_eq!(
            Format::from_content_type(Some("application/json; charset=utf-8")).unwrap(),
            Format::Json
        );
        assert_eq!(
            Format::from_content_type(Some("application/x-msgpack")).unwrap(),
            Format::MsgPack
        );
        assert!(matches!(
            Format::from_content_type(Some("text/plain")),
            Err(Error::Codec(m)) if m.contains("text/plain")
        ));
    }

    #[test]
    fn both_formats_round_trip() {
        let job = Job {
            id: 7,
            audio: vec![0, 1, 255],
        };
        for format in [Format::MsgPack, Format::Json] {
            let m = format.to_message(&job).unwrap();
            assert_eq!(m.properties.content_type.as_deref(), format.content_type());
            assert_eq!(decode_message::<Job>(&m).unwrap(), job);
        }
    }

    #[test]
    fn bad_bodies_are_codec_errors() {
        let m = Message::new(vec![0xc1]);
        assert!(matches!(decode_message::<Job>(&m), Err(Error::Codec(_))));
        let m = Message::new(b"{".to_vec()).with_content_type(JSON_CONTENT_TYPE);
        assert!(matches!(decode_message::<Job>(&m), Err(Error::Codec(_))));
    }

    #[test]
    fn trailing_bytes_after_a_value_are_refused() {
        // "30" is the positive fixint 0x33 ('3') followed by '0'.
        let err = Format::MsgPack.decode::<u64>(b"30").unwrap_err();
        assert!(
            matches!(&err, Error::Codec(m) if m.contains("1 trailing byte")),
            "{err:?}"
        );
        assert_eq!(Format::MsgPack.decode::<u64>(b"3").unwrap(), 51);
        let mut job = Format::MsgPack
            .encode(&Job {
                id: 1,
                audio: vec![2],
            })
            .unwrap();
        job.push(0xc0);
        assert!(matches!(
            Format::MsgPack.decode::<Job>(&job),
            Err(Error::Codec(_))
        ));
        assert!(matches!(
            Format::Json.decode::<u64>(b"30 1"),
            Err(Error::Codec(_))
        ));
        assert_eq!(Format::Json.decode::<u64>(b"30\n").unwrap(), 30);
    }

    #[test]
    fn error_replies_carry_the_header_and_a_readable_map() {
        let m = error_reply("model exploded", Format::MsgPack);
        assert_eq!(remote_error(&m).as_deref(), Some("model exploded"));
        assert_eq!(m.properties.content_type, None);
        let body: std::collections::BTreeMap<String, String> = decode_message(&m).unwrap();
        assert_eq!(body["error"], "model exploded");
        assert_eq!(remote_error(&Message::new(vec![])), None);
    }
}
