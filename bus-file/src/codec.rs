//! The primitive encoding of the on-disk format: little-endian integers,
//! length-prefixed strings and byte strings, typed field tables, CRC-32.
//!
//! The reader never trusts a length: every read is bounds-checked and
//! nesting is limited, so a corrupt or hostile file yields an error, never
//! a panic or an unbounded allocation.

use bus_core::{Bytes, FieldTable, FieldValue};

/// Deepest nesting of tables and arrays a reader accepts.
pub(crate) const MAX_DEPTH: usize = 64;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub(crate) String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) type DecodeResult<T> = Result<T, DecodeError>;

fn err<T>(msg: impl Into<String>) -> DecodeResult<T> {
    Err(DecodeError(msg.into()))
}

/// CRC-32 (IEEE 802.3, the one zlib and gzip use).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    c ^ 0xFFFF_FFFF
}

/// Appends encoded values to a buffer.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
    }
    pub(crate) fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    pub(crate) fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    pub(crate) fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    pub(crate) fn table(&mut self, t: &FieldTable) {
        self.u32(t.len() as u32);
        for (k, v) in t {
            self.str(k);
            self.value(v);
        }
    }
    pub(crate) fn value(&mut self, v: &FieldValue) {
        match v {
            FieldValue::Bool(b) => {
                self.u8(b't');
                self.bool(*b);
            }
            FieldValue::I8(x) => {
                self.u8(b'b');
                self.buf.extend_from_slice(&x.to_le_bytes());
            }
            FieldValue::U8(x) => {
                self.u8(b'B');
                self.u8(*x);
            }
            FieldValue::I16(x) => {
                self.u8(b's');
                self.buf.extend_from_slice(&x.to_le_bytes());
            }
            FieldValue::U16(x) => {
                self.u8(b'u');
                self.buf.extend_from_slice(&x.to_le_bytes());
            }
            FieldValue::I32(x) => {
                self.u8(b'I');
                self.buf.extend_from_slice(&x.to_le_bytes());
            }
            FieldValue::U32(x) => {
                self.u8(b'i');
                self.u32(*x);
            }
            FieldValue::I64(x) => {
                self.u8(b'l');
                self.i64(*x);
            }
            FieldValue::F32(x) => {
                self.u8(b'f');
                self.u32(x.to_bits());
            }
            FieldValue::F64(x) => {
                self.u8(b'd');
                self.u64(x.to_bits());
            }
            FieldValue::Decimal { scale, value } => {
                self.u8(b'D');
                self.u8(*scale);
                self.u32(*value);
            }
            FieldValue::String(s) => {
                self.u8(b'S');
                self.str(s);
            }
            FieldValue::Bytes(b) => {
                self.u8(b'x');
                self.bytes(b);
            }
            FieldValue::Timestamp(t) => {
                self.u8(b'T');
                self.u64(*t);
            }
            FieldValue::Table(t) => {
                self.u8(b'F');
                self.table(t);
            }
            FieldValue::Array(a) => {
                self.u8(b'A');
                self.u32(a.len() as u32);
                for v in a {
                    self.value(v);
                }
            }
            FieldValue::Void => self.u8(b'V'),
        }
    }
}

/// Reads encoded values from a slice, checking every bound.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> DecodeResult<&'a [u8]> {
        if n > self.remaining() {
            return err(format!(
                "truncated: {n} bytes needed at offset {}, {} left",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> DecodeResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> DecodeResult<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> DecodeResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> DecodeResult<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn i64(&mut self) -> DecodeResult<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub(crate) fn bool(&mut self) -> DecodeResult<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => err(format!("invalid boolean byte {b}")),
        }
    }
    pub(crate) fn bytes(&mut self) -> DecodeResult<&'a [u8]> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| DecodeError("length overflows".into()))?;
        self.take(n)
    }
    pub(crate) fn string(&mut self) -> DecodeResult<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError("string is not UTF-8".into()))
    }
    pub(crate) fn opt_string(&mut self) -> DecodeResult<Option<String>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            b => err(format!("invalid option tag {b}")),
        }
    }

    /// A count of items that each take at least `min_item` bytes: refused
    /// when the rest of the input could not hold them, so a lying count
    /// cannot make the reader allocate.
    fn count(&mut self, min_item: usize) -> DecodeResult<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.remaining() {
            return err(format!("count {n} exceeds the remaining input"));
        }
        Ok(n)
    }

    pub(crate) fn table(&mut self, depth: usize) -> DecodeResult<FieldTable> {
        if depth > MAX_DEPTH {
            return err("field tables nested too deeply");
        }
        let n = self.count(9)?;
        let mut t = FieldTable::new();
        for _ in 0..n {
            let k = self.string()?;
            let v = self.value(depth + 1)?;
            if t.insert(k, v).is_some() {
                return err("duplicate key in field table");
            }
        }
        Ok(t)
    }

    pub(crate) fn value(&mut self, depth: usize) -> DecodeResult<FieldValue> {
        if depth > MAX_DEPTH {
            return err("field values nested too deeply");
        }
        Ok(match self.u8()? {
            b't' => FieldValue::Bool(self.bool()?),
            b'b' => FieldValue::I8(i8::from_le_bytes(self.array()?)),
            b'B' => FieldValue::U8(self.u8()?),
            b's' => FieldValue::I16(i16::from_le_bytes(self.array()?)),
            b'u' => FieldValue::U16(u16::from_le_bytes(self.array()?)),
            b'I' => FieldValue::I32(i32::from_le_bytes(self.array()?)),
            b'i' => FieldValue::U32(self.u32()?),
            b'l' => FieldValue::I64(self.i64()?),
            b'f' => FieldValue::F32(f32::from_bits(self.u32()?)),
            b'd' => FieldValue::F64(f64::from_bits(self.u64()?)),
            b'D' => FieldValue::Decimal {
                scale: self.u8()?,
                value: self.u32()?,
            },
            b'S' => FieldValue::String(self.string()?),
            b'x' => FieldValue::Bytes(Bytes::copy_from_slice(self.bytes()?)),
            b'T' => FieldValue::Timestamp(self.u64()?),
            b'F' => FieldValue::Table(self.table(depth + 1)?),
            b'A' => {
                let n = self.count(1)?;
                let mut a = Vec::with_capacity(n);
                for _ in 0..n {
                    a.push(self.value(depth + 1)?);
                }
                FieldValue::Array(a)
            }
            b'V' => FieldValue::Void,
            t => return err(format!("unknown field type tag {t:#04x}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn lying_counts_are_refused_without_allocating() {
        let mut w = Writer::default();
        w.u32(u32::MAX);
        assert!(Reader::new(&w.buf).table(0).is_err());
        let mut w = Writer::default();
        w.u8(b'A');
        w.u32(u32::MAX);
        assert!(Reader::new(&w.buf).value(0).is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut v = FieldValue::Void;
        for _ in 0..(MAX_DEPTH + 2) {
            v = FieldValue::Array(vec![v]);
        }
        let mut w = Writer::default();
        w.value(&v);
        assert!(Reader::new(&w.buf).value(0).is_err());
    }
}
