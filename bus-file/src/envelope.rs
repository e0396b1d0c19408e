//! The on-disk envelope of one message (format version 1).
//!
//! ```text
//! offset  size       field
//! 0       4          magic "BUSM"
//! 4       1          envelope version (1)
//! 5       1          flags (0; readers refuse others)
//! 6       4          meta length M (u32 LE)
//! 10      8          body length B (u64 LE)
//! 18      M          meta: exchange, routing key, publish time, properties
//! 18+M    B          body
//! 18+M+B  4          CRC-32 (IEEE) of every byte before it
//! ```
//!
//! Strings are a u64 LE length and UTF-8 bytes; optional fields a presence
//! byte (0/1) and the value; headers a typed field table (one tag byte per
//! value, AMQP's letters: `t b B s u I i l f d D S x T F A V`). A file whose
//! length, magic, version, lengths or checksum do not hold is refused as a
//! whole, so a torn or foreign file is never taken for a message.

use bus_core::{Bytes, DeliveryMode, Error, Message, Properties, Result};

use crate::codec::{crc32, DecodeError, Reader, Writer};

/// The envelope format version this crate writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;

const MAGIC: &[u8; 4] = b"BUSM";
const HEADER_LEN: usize = 18;

/// What a message file may hold besides its body (envelope header,
/// exchange, routing key, properties and headers): AMQP puts all of it in
/// one frame, which RabbitMQ caps at 128 KiB by default; this leaves room.
/// The reader quarantines a file longer than its body plus this, so the
/// publisher refuses such a message up front ([`check_overhead`]).
pub(crate) const MAX_ENVELOPE_OVERHEAD: u64 = 1 << 20;

/// The longest file a reader accepts for a message whose name claims a
/// `body_len`-byte body.
pub(crate) fn max_file_len(body_len: u64) -> u64 {
    body_len.saturating_add(MAX_ENVELOPE_OVERHEAD)
}

/// Refuses a message whose envelope (everything in its file but the body)
/// would be longer than [`MAX_ENVELOPE_OVERHEAD`], since no reader would
/// accept its file.
///
/// # Errors
/// [`Error::PreconditionFailed`] (permanent) saying how long it is.
pub(crate) fn check_overhead(
    exchange: &str,
    routing_key: &str,
    properties: &Properties,
) -> Result<()> {
    let mut meta = Writer::default();
    meta.str(exchange);
    meta.str(routing_key);
    meta.i64(0);
    write_properties(&mut meta, properties);
    let overhead = (HEADER_LEN + meta.buf.len() + 4) as u64;
    if overhead > MAX_ENVELOPE_OVERHEAD {
        return Err(Error::PreconditionFailed(
            format!(
            "the message's exchange, routing key, properties and headers take {overhead} bytes \
             on disk, over the folder transport's limit of {MAX_ENVELOPE_OVERHEAD}"
        )
            .into(),
        ));
    }
    Ok(())
}

/// One message as stored in a queue folder: the message with all its
/// properties, where it was published, and when.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// The exchange it was published to (`""` for the default exchange).
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// When it entered the queue, milliseconds since the Unix epoch (on the
    /// transport's clock); per-queue and per-message TTL count from here.
    pub published_at_ms: i64,
    /// Properties and body, exactly as published.
    pub message: Message,
}

impl Envelope {
    /// Encodes the envelope into its file content.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut meta = Writer::default();
        meta.str(&self.exchange);
        meta.str(&self.routing_key);
        meta.i64(self.published_at_ms);
        write_properties(&mut meta, &self.message.properties);

        let body = &self.message.body;
        let mut out = Vec::with_capacity(HEADER_LEN + meta.buf.len() + body.len() + 4);
        out.extend_from_slice(MAGIC);
        out.push(ENVELOPE_VERSION);
        out.push(0);
        out.extend_from_slice(&(meta.buf.len() as u32).to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&meta.buf);
        out.extend_from_slice(body);
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a file's content.
    ///
    /// # Errors
    /// [`Error::Codec`] saying what is wrong (truncated, bad magic, unknown
    /// version, checksum mismatch, malformed field). Never panics, whatever
    /// the input.
    pub fn decode(bytes: &[u8]) -> Result<Envelope> {
        decode(bytes).map_err(|e| Error::Codec(format!("invalid message envelope: {e}")))
    }
}

fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    if bytes.len() < HEADER_LEN + 4 {
        return Err(DecodeError(format!(
            "{} bytes is shorter than the smallest envelope",
            bytes.len()
        )));
    }
    if &bytes[..4] != MAGIC {
        return Err(DecodeError("not a message envelope (bad magic)".into()));
    }
    if bytes[4] != ENVELOPE_VERSION {
        return Err(DecodeError(format!(
            "envelope version {} is not supported (this reader knows {ENVELOPE_VERSION})",
            bytes[4]
        )));
    }
    if bytes[5] != 0 {
        return Err(DecodeError(format!(
            "unknown envelope flags {:#04x}",
            bytes[5]
        )));
    }
    let (content, crc_bytes) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes"));
    let meta_len = u32::from_le_bytes(bytes[6..10].try_into().expect("4 bytes")) as u64;
    let body_len = u64::from_le_bytes(bytes[10..18].try_into().expect("8 bytes"));
    let expected = (HEADER_LEN as u64)
        .checked_add(meta_len)
        .and_then(|n| n.checked_add(body_len))
        .ok_or_else(|| DecodeError("lengths overflow".into()))?;
    if expected != content.len() as u64 {
        return Err(DecodeError(format!(
            "lengths say {expected} bytes before the checksum, the file has {} (torn write?)",
            content.len()
        )));
    }
    if crc32(content) != stored {
        return Err(DecodeError("checksum mismatch".into()));
    }
    let meta_end = HEADER_LEN + meta_len as usize;
    let mut r = Reader::new(&content[HEADER_LEN..meta_end]);
    let exchange = r.string()?;
    let routing_key = r.string()?;
    let published_at_ms = r.i64()?;
    let properties = read_properties(&mut r)?;
    if r.remaining() != 0 {
        return Err(DecodeError("trailing bytes in the meta section".into()));
    }
    Ok(Envelope {
        exchange,
        routing_key,
        published_at_ms,
        message: Message {
            body: Bytes::copy_from_slice(&content[meta_end..]),
            properties: properties.into(),
        },
    })
}

fn write_properties(w: &mut Writer, p: &Properties) {
    w.opt_str(p.content_type.as_deref());
    w.opt_str(p.content_encoding.as_deref());
    w.table(&p.headers);
    w.u8(p.delivery_mode.map_or(0, DeliveryMode::as_u8));
    match p.priority {
        None => w.u8(0),
        Some(v) => {
            w.u8(1);
            w.u8(v);
        }
    }
    w.opt_str(p.correlation_id.as_deref());
    w.opt_str(p.reply_to.as_deref());
    w.opt_str(p.expiration.as_deref());
    w.opt_str(p.message_id.as_deref());
    match p.timestamp {
        None => w.u8(0),
        Some(v) => {
            w.u8(1);
            w.u64(v);
        }
    }
    w.opt_str(p.kind.as_deref());
    w.opt_str(p.user_id.as_deref());
    w.opt_str(p.app_id.as_deref());
}

fn read_properties(r: &mut Reader<'_>) -> Result<Properties, DecodeError> {
    Ok(Properties {
        content_type: r.opt_string()?,
        content_encoding: r.opt_string()?,
        headers: r.table(0)?,
        delivery_mode: match r.u8()? {
            0 => None,
            1 => Some(DeliveryMode::Transient),
            2 => Some(DeliveryMode::Persistent),
            b => return Err(DecodeError(format!("invalid delivery mode {b}"))),
        },
        priority: match r.u8()? {
            0 => None,
            1 => Some(r.u8()?),
            b => return Err(DecodeError(format!("invalid option tag {b}"))),
        },
        correlation_id: r.opt_string()?,
        reply_to: r.opt_string()?,
        expiration: r.opt_string()?,
        message_id: r.opt_string()?,
        timestamp: match r.u8()? {
            0 => None,
            1 => Some(r.u64()?),
            b => return Err(DecodeError(format!("invalid option tag {b}"))),
        },
        kind: r.opt_string()?,
        user_id: r.opt_string()?,
        app_id: r.opt_string()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            exchange: "ex".into(),
            routing_key: "a.b".into(),
            published_at_ms: 1_700_000_000_000,
            message: Message::new(&b"hello"[..])
                .with_header("n", 5i32)
                .persistent()
                .with_priority(3),
        }
    }

    #[test]
    fn round_trips() {
        let e = sample();
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn every_truncation_and_every_single_bit_flip_is_refused() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(
                Envelope::decode(&bytes[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(Envelope::decode(&b).is_err(), "flip at {i}:{bit}");
            }
        }
    }
}
