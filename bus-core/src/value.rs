//! Typed AMQP field values: the content of message headers and of the
//! arguments of queues, exchanges, bindings and consumers.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;

/// A table of named field values (AMQP `field-table`).
///
/// Keys are kept sorted, so two tables with the same entries compare equal and
/// iterate in the same order on every run.
pub type FieldTable = BTreeMap<String, FieldValue>;

/// One AMQP 0-9-1 field value, as RabbitMQ understands the types.
///
/// Every type the protocol can carry has its own variant, so a value read from
/// the wire and written back is the same bytes: an `I16` does not come back as
/// an `I32`, a byte array does not come back as a string.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue {
    /// `t`: a boolean.
    Bool(bool),
    /// `b`: a signed 8-bit integer.
    I8(i8),
    /// `B`: an unsigned 8-bit integer.
    U8(u8),
    /// `s`: a signed 16-bit integer.
    I16(i16),
    /// `u`: an unsigned 16-bit integer.
    U16(u16),
    /// `I`: a signed 32-bit integer.
    I32(i32),
    /// `i`: an unsigned 32-bit integer.
    U32(u32),
    /// `l`: a signed 64-bit integer.
    I64(i64),
    /// `f`: a 32-bit float.
    F32(f32),
    /// `d`: a 64-bit float.
    F64(f64),
    /// `D`: a decimal, `value / 10^scale`.
    Decimal {
        /// Number of decimal digits after the point.
        scale: u8,
        /// The unscaled value.
        value: u32,
    },
    /// `S`: a UTF-8 string.
    String(String),
    /// `x`: raw bytes.
    Bytes(Bytes),
    /// `T`: a timestamp, seconds since the Unix epoch.
    Timestamp(u64),
    /// `F`: a nested table.
    Table(FieldTable),
    /// `A`: an array of values of any types.
    Array(Vec<FieldValue>),
    /// `V`: no value.
    Void,
}

impl FieldValue {
    /// The string inside a [`FieldValue::String`], else `None`.
    #[must_use]
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an `i64` when it is any integer type (or a timestamp)
    /// that fits.
    #[must_use]
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            FieldValue::I8(v) => v.into(),
            FieldValue::U8(v) => v.into(),
            FieldValue::I16(v) => v.into(),
            FieldValue::U16(v) => v.into(),
            FieldValue::I32(v) => v.into(),
            FieldValue::U32(v) => v.into(),
            FieldValue::I64(v) => v,
            FieldValue::Timestamp(v) => return i64::try_from(v).ok(),
            _ => return None,
        })
    }

    /// The bytes inside a [`FieldValue::Bytes`], else `None`.
    #[must_use]
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            FieldValue::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an `f64` when it is a float of either width.
    #[must_use]
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            FieldValue::F32(v) => Some(v.into()),
            FieldValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The boolean inside a [`FieldValue::Bool`], else `None`.
    #[must_use]
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            FieldValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The nested table inside a [`FieldValue::Table`], else `None`.
    #[must_use]
    pub fn as_table(&self) -> Option<&FieldTable> {
        match self {
            FieldValue::Table(t) => Some(t),
            _ => None,
        }
    }

    /// The array inside a [`FieldValue::Array`], else `None`.
    #[must_use]
    pub fn as_array(&self) -> Option<&[FieldValue]> {
        match self {
            FieldValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short name of the value's type, for error messages.
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            FieldValue::Bool(_) => "bool",
            FieldValue::I8(_) => "i8",
            FieldValue::U8(_) => "u8",
            FieldValue::I16(_) => "i16",
            FieldValue::U16(_) => "u16",
            FieldValue::I32(_) => "i32",
            FieldValue::U32(_) => "u32",
            FieldValue::I64(_) => "i64",
            FieldValue::F32(_) => "f32",
            FieldValue::F64(_) => "f64",
            FieldValue::Decimal { .. } => "decimal",
            FieldValue::String(_) => "string",
            FieldValue::Bytes(_) => "bytes",
            FieldValue::Timestamp(_) => "timestamp",
            FieldValue::Table(_) => "table",
            FieldValue::Array(_) => "array",
            FieldValue::Void => "void",
        }
    }
}

impl fmt::Display for FieldValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldValue::String(s) => write!(f, "{s:?}"),
            FieldValue::Bool(v) => write!(f, "{v}"),
            other => match other.as_i64() {
                Some(v) if !matches!(other, FieldValue::Timestamp(_)) => write!(f, "{v}"),
                _ => write!(f, "{other:?}"),
            },
        }
    }
}

macro_rules! from_impls {
    ($($t:ty => $v:ident),* $(,)?) => {
        $(impl From<$t> for FieldValue {
            fn from(v: $t) -> Self {
                FieldValue::$v(v.into())
            }
        })*
    };
}

from_impls! {
    bool => Bool, i8 => I8, u8 => U8, i16 => I16, u16 => U16, i32 => I32, u32 => U32,
    i64 => I64, f32 => F32, f64 => F64, String => String, &str => String,
    Bytes => Bytes, FieldTable => Table, Vec<FieldValue> => Array,
}

impl From<Vec<u8>> for FieldValue {
    fn from(v: Vec<u8>) -> Self {
        FieldValue::Bytes(Bytes::from(v))
    }
}

impl From<&[u8]> for FieldValue {
    fn from(v: &[u8]) -> Self {
        FieldValue::Bytes(Bytes::copy_from_slice(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_read_only_their_own_type() {
        assert_eq!(
            FieldValue::from(&b"ab"[..]).as_bytes().map(|b| &b[..]),
            Some(&b"ab"[..])
        );
        assert_eq!(FieldValue::from("ab").as_bytes(), None);
        assert_eq!(FieldValue::F32(1.5).as_f64(), Some(1.5));
        assert_eq!(FieldValue::F64(-2.0).as_f64(), Some(-2.0));
        assert_eq!(FieldValue::I32(1).as_f64(), None);
        assert_eq!(FieldValue::U32(7).as_i64(), Some(7));
        assert_eq!(FieldValue::Timestamp(u64::MAX).as_i64(), None);
    }
}
