//! Headers routing, as RabbitMQ's headers exchange does it.
//!
//! RabbitMQ compares a binding argument with a header using Erlang's `==`,
//! so at the top level numbers compare by value whatever their width or
//! signedness (an `I32` 1 matches an `I64` 1, a timestamp 5 matches a
//! `F64` 5.0), a string matches bytes with the same content, and an empty
//! array matches an empty table. Inside arrays and tables every element keeps
//! its type tag, so there types must be equal too.

use crate::value::{FieldTable, FieldValue};
use crate::{Error, Result};

/// How a binding combines its arguments, from its `x-match` argument.
#[derive(Clone, Copy)]
struct XMatch {
    /// `any` rather than `all`.
    any: bool,
    /// Arguments named `x-...` (other than `x-match`) take part too.
    with_x: bool,
}

impl XMatch {
    fn parse(value: Option<&FieldValue>) -> std::result::Result<Self, String> {
        let Some(value) = value else {
            return Ok(XMatch::ALL);
        };
        let Some(text) = value.as_str() else {
            return Err(format!(
                "invalid x-match field type {} (value {value}); expected string",
                value.type_name()
            ));
        };
        Ok(match text {
            "all" => XMatch::ALL,
            "any" => XMatch {
                any: true,
                with_x: false,
            },
            "all-with-x" => XMatch {
                any: false,
                with_x: true,
            },
            "any-with-x" => XMatch {
                any: true,
                with_x: true,
            },
            other => {
                return Err(format!(
                    "invalid x-match field value {other:?}; expected all, any, all-with-x or any-with-x"
                ))
            }
        })
    }

    const ALL: XMatch = XMatch {
        any: false,
        with_x: false,
    };
}

/// Checks the arguments of a headers-exchange binding as RabbitMQ does when
/// the binding is made: `x-match`, if present, must be the string `all`,
/// `any`, `all-with-x` or `any-with-x` (case matters).
///
/// # Errors
/// [`Error::PreconditionFailed`] naming the offending value, as RabbitMQ
/// refuses such a `queue.bind` with `PRECONDITION_FAILED`.
pub fn validate_headers_binding(arguments: &FieldTable) -> Result<()> {
    XMatch::parse(arguments.get("x-match"))
        .map(|_| ())
        .map_err(|m| Error::PreconditionFailed(crate::ErrorDetail::new(m).with_argument("x-match")))
}

/// Whether a message with `headers` matches a headers-exchange binding with
/// `arguments`, exactly as RabbitMQ 3.10 decides it.
///
/// `x-match` is `all` (the default), `any`, `all-with-x` or `any-with-x`.
/// `x-match` itself never takes part. Under `all` and `any`, the other
/// binding arguments whose names start with `x-` take no part either; under
/// the `-with-x` forms they do. A binding argument of type void matches the
/// presence of the header, whatever its value. Any other argument matches a
/// header of the same name whose value is equal the way RabbitMQ compares
/// (Erlang's `==`): numbers by value whatever their types (an `I32` 1
/// matches an `I64` 1 and an `F64` 1.0, a timestamp compares as its
/// seconds), a string and bytes by content, an empty array and an empty
/// table as equal; inside arrays and tables every element keeps its type,
/// so there types must match too. Booleans, decimals and void equal only
/// their own type. `all`
/// with no arguments to match matches every message; `any` with none
/// matches none.
///
/// An `x-match` value [`validate_headers_binding`] refuses is read as
/// `all`, as RabbitMQ did before it validated bindings.
#[must_use]
pub fn headers_match(arguments: &FieldTable, headers: &FieldTable) -> bool {
    let mode = XMatch::parse(arguments.get("x-match")).unwrap_or(XMatch::ALL);
    let mut relevant = arguments
        .iter()
        .filter(|(name, _)| name.as_str() != "x-match" && (mode.with_x || !name.starts_with("x-")));
    let hit = |(name, wanted): (&String, &FieldValue)| match headers.get(name) {
        None => false,
        Some(_) if matches!(wanted, FieldValue::Void) => true,
        Some(found) => binding_value_matches(wanted, found),
    };
    if mode.any {
        relevant.any(hit)
    } else {
        relevant.all(hit)
    }
}

/// A number as Erlang holds it once parsed: an integer of any size, or a
/// double.
#[derive(Clone, Copy)]
enum Number {
    Integer(i128),
    Float(f64),
}

fn as_number(v: &FieldValue) -> Option<Number> {
    Some(match *v {
        FieldValue::I8(n) => Number::Integer(n.into()),
        FieldValue::U8(n) => Number::Integer(n.into()),
        FieldValue::I16(n) => Number::Integer(n.into()),
        FieldValue::U16(n) => Number::Integer(n.into()),
        FieldValue::I32(n) => Number::Integer(n.into()),
        FieldValue::U32(n) => Number::Integer(n.into()),
        FieldValue::I64(n) => Number::Integer(n.into()),
        FieldValue::Timestamp(n) => Number::Integer(n.into()),
        FieldValue::F32(x) => Number::Float(x.into()),
        FieldValue::F64(x) => Number::Float(x),
        _ => return None,
    })
}

/// Erlang's `==` between numbers: exact, so an integer equals a float only
/// when the float is that very integer (2^53 + 1 does not equal 2^53 as a
/// double).
fn numbers_equal(a: Number, b: Number) -> bool {
    match (a, b) {
        (Number::Integer(a), Number::Integer(b)) => a == b,
        (Number::Float(a), Number::Float(b)) => a == b,
        (Number::Integer(i), Number::Float(f)) | (Number::Float(f), Number::Integer(i)) => {
            // `as` saturates, and every integer here is far inside i128, so
            // a float beyond it can never compare equal by accident.
            #[allow(clippy::cast_possible_truncation)]
            let whole = f as i128;
            f.fract() == 0.0 && whole == i
        }
    }
}

/// Whether a header value equals a (non-void) binding argument value.
fn binding_value_matches(wanted: &FieldValue, found: &FieldValue) -> bool {
    if let (Some(a), Some(b)) = (as_number(wanted), as_number(found)) {
        return numbers_equal(a, b);
    }
    match (wanted, found) {
        // Both are Erlang binaries once parsed.
        (FieldValue::String(s), FieldValue::Bytes(b))
        | (FieldValue::Bytes(b), FieldValue::String(s)) => s.as_bytes() == &b[..],
        // Both are the empty list once parsed.
        (FieldValue::Table(t), FieldValue::Array(a))
        | (FieldValue::Array(a), FieldValue::Table(t)) => t.is_empty() && a.is_empty(),
        // Same type: the derived equality is RabbitMQ's, nested values
        // included (they carry their type tags, so types must match there).
        _ => wanted == found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn table<const N: usize>(entries: [(&str, FieldValue); N]) -> FieldTable {
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    fn s(v: &str) -> FieldValue {
        FieldValue::String(v.to_owned())
    }

    fn x(v: &str) -> FieldValue {
        FieldValue::Bytes(Bytes::copy_from_slice(v.as_bytes()))
    }

    fn dec(scale: u8, value: u32) -> FieldValue {
        FieldValue::Decimal { scale, value }
    }

    fn arr<const N: usize>(items: [FieldValue; N]) -> FieldValue {
        FieldValue::Array(items.into())
    }

    fn tbl<const N: usize>(entries: [(&str, FieldValue); N]) -> FieldValue {
        FieldValue::Table(table(entries))
    }

    use FieldValue::{Bool, Timestamp, Void, F32, F64, I16, I32, I64, I8, U16, U32, U8};

    /// What RabbitMQ 3.10.8 routed: for each case a fresh headers exchange,
    /// one queue bound with the arguments, one message published with the
    /// headers (each value sent with the exact AMQP type tag shown), and
    /// whether it reached the queue.
    fn probe_table() -> Vec<(&'static str, FieldTable, FieldTable, bool)> {
        vec![
            (
                "same i64",
                table([("a", I64(1))]),
                table([("a", I64(1))]),
                true,
            ),
            (
                "i32 vs i64",
                table([("a", I32(1))]),
                table([("a", I64(1))]),
                true,
            ),
            (
                "i64 vs i32",
                table([("a", I64(1))]),
                table([("a", I32(1))]),
                true,
            ),
            (
                "i8 vs u8",
                table([("a", I8(1))]),
                table([("a", U8(1))]),
                true,
            ),
            (
                "i16 vs u16",
                table([("a", I16(1))]),
                table([("a", U16(1))]),
                true,
            ),
            (
                "u32 vs i32",
                table([("a", U32(1))]),
                table([("a", I32(1))]),
                true,
            ),
            (
                "u8 255 vs i8 -1",
                table([("a", U8(255))]),
                table([("a", I8(-1))]),
                false,
            ),
            (
                "i64 1 vs f64 1.0",
                table([("a", I64(1))]),
                table([("a", F64(1.0))]),
                true,
            ),
            (
                "i32 1 vs f32 1.0",
                table([("a", I32(1))]),
                table([("a", F32(1.0))]),
                true,
            ),
            (
                "f32 1.5 vs f64 1.5",
                table([("a", F32(1.5))]),
                table([("a", F64(1.5))]),
                true,
            ),
            (
                "f32 0.1 vs f64 0.1",
                table([("a", F32(0.1))]),
                table([("a", F64(0.1))]),
                false,
            ),
            (
                "f64 0 vs -0",
                table([("a", F64(0.0))]),
                table([("a", F64(-0.0))]),
                true,
            ),
            (
                "i64 2^53+1 vs f64 2^53",
                table([("a", I64((1 << 53) + 1))]),
                table([("a", F64(9_007_199_254_740_992.0))]),
                false,
            ),
            (
                "i64 2^53 vs f64 2^53",
                table([("a", I64(1 << 53))]),
                table([("a", F64(9_007_199_254_740_992.0))]),
                true,
            ),
            (
                "ts 5 vs i64 5",
                table([("a", Timestamp(5))]),
                table([("a", I64(5))]),
                true,
            ),
            (
                "ts 5 vs f64 5",
                table([("a", Timestamp(5))]),
                table([("a", F64(5.0))]),
                true,
            ),
            (
                "ts 2^63 vs i64 min",
                table([("a", Timestamp(1 << 63))]),
                table([("a", I64(i64::MIN))]),
                false,
            ),
            (
                "string vs bytes",
                table([("a", s("x"))]),
                table([("a", x("x"))]),
                true,
            ),
            (
                "bytes vs string",
                table([("a", x("x"))]),
                table([("a", s("x"))]),
                true,
            ),
            (
                "bool vs i64 1",
                table([("a", Bool(true))]),
                table([("a", I64(1))]),
                false,
            ),
            (
                "bool vs bool",
                table([("a", Bool(true))]),
                table([("a", Bool(true))]),
                true,
            ),
            (
                "decimal vs i64",
                table([("a", dec(0, 1))]),
                table([("a", I64(1))]),
                false,
            ),
            (
                "decimal scales",
                table([("a", dec(1, 10))]),
                table([("a", dec(0, 1))]),
                false,
            ),
            (
                "decimal same",
                table([("a", dec(1, 10))]),
                table([("a", dec(1, 10))]),
                true,
            ),
            (
                "void vs string",
                table([("a", Void)]),
                table([("a", s("anything"))]),
                true,
            ),
            ("void vs absent", table([("a", Void)]), table([]), false),
            (
                "void vs void",
                table([("a", Void)]),
                table([("a", Void)]),
                true,
            ),
            (
                "empty string vs void",
                table([("a", s(""))]),
                table([("a", Void)]),
                false,
            ),
            (
                "i64 vs void",
                table([("a", I64(0))]),
                table([("a", Void)]),
                false,
            ),
            (
                "array i32 vs i64",
                table([("a", arr([I32(1)]))]),
                table([("a", arr([I64(1)]))]),
                false,
            ),
            (
                "array same",
                table([("a", arr([I32(1)]))]),
                table([("a", arr([I32(1)]))]),
                true,
            ),
            (
                "array i8 vs u8",
                table([("a", arr([I8(1)]))]),
                table([("a", arr([U8(1)]))]),
                false,
            ),
            (
                "array i16 vs u16",
                table([("a", arr([I16(1)]))]),
                table([("a", arr([U16(1)]))]),
                false,
            ),
            (
                "array i32 vs u32",
                table([("a", arr([I32(1)]))]),
                table([("a", arr([U32(1)]))]),
                false,
            ),
            (
                "array ts vs i64",
                table([("a", arr([Timestamp(1)]))]),
                table([("a", arr([I64(1)]))]),
                false,
            ),
            (
                "array string vs bytes",
                table([("a", arr([s("x")]))]),
                table([("a", arr([x("x")]))]),
                false,
            ),
            (
                "array f32 vs f64",
                table([("a", arr([F32(1.5)]))]),
                table([("a", arr([F64(1.5)]))]),
                false,
            ),
            (
                "array f64 0 vs -0",
                table([("a", arr([F64(0.0)]))]),
                table([("a", arr([F64(-0.0)]))]),
                true,
            ),
            (
                "table i32 vs i64",
                table([("a", tbl([("b", I32(1))]))]),
                table([("a", tbl([("b", I64(1))]))]),
                false,
            ),
            (
                "table same",
                table([("a", tbl([("b", I32(1))]))]),
                table([("a", tbl([("b", I32(1))]))]),
                true,
            ),
            (
                "table string vs bytes",
                table([("a", tbl([("b", s("x"))]))]),
                table([("a", tbl([("b", x("x"))]))]),
                false,
            ),
            (
                "table nested array",
                table([("a", tbl([("b", arr([I32(7)]))]))]),
                table([("a", tbl([("b", arr([I32(7)]))]))]),
                true,
            ),
            (
                "empty array vs empty table",
                table([("a", arr([]))]),
                table([("a", tbl([]))]),
                true,
            ),
            (
                "empty string vs empty array",
                table([("a", s(""))]),
                table([("a", arr([]))]),
                false,
            ),
            (
                "all, both present",
                table([("a", I64(1)), ("b", I64(2))]),
                table([("a", I64(1)), ("b", I64(2)), ("c", I64(3))]),
                true,
            ),
            (
                "all, one missing",
                table([("a", I64(1)), ("b", I64(2))]),
                table([("a", I64(1))]),
                false,
            ),
            (
                "all, one wrong",
                table([("a", I64(1)), ("b", I64(2))]),
                table([("a", I64(1)), ("b", I64(3))]),
                false,
            ),
            (
                "any, one present",
                table([("x-match", s("any")), ("a", I64(1)), ("b", I64(2))]),
                table([("a", I64(1))]),
                true,
            ),
            (
                "any, one wrong",
                table([("x-match", s("any")), ("a", I64(1)), ("b", I64(2))]),
                table([("b", I64(3))]),
                false,
            ),
            (
                "any, no headers",
                table([("x-match", s("any")), ("a", I64(1)), ("b", I64(2))]),
                table([]),
                false,
            ),
            (
                "any with nothing to match",
                table([("x-match", s("any"))]),
                table([("a", I64(1))]),
                false,
            ),
            (
                "any with nothing, no headers",
                table([("x-match", s("any"))]),
                table([]),
                false,
            ),
            ("all with nothing, no headers", table([]), table([]), true),
            (
                "all with nothing",
                table([("x-match", s("all"))]),
                table([("a", I64(1))]),
                true,
            ),
            (
                "all ignores x- argument",
                table([("x-foo", I64(1))]),
                table([]),
                true,
            ),
            (
                "all ignores x- value",
                table([("x-foo", I64(1))]),
                table([("x-foo", I64(2))]),
                true,
            ),
            (
                "all, a and x-",
                table([("a", I64(1)), ("x-foo", I64(1))]),
                table([("a", I64(1))]),
                true,
            ),
            (
                "any with only x- arguments",
                table([("x-match", s("any")), ("x-foo", I64(1))]),
                table([("x-foo", I64(1))]),
                false,
            ),
            (
                "all-with-x, x- present",
                table([("x-match", s("all-with-x")), ("x-foo", I64(1))]),
                table([("x-foo", I64(1))]),
                true,
            ),
            (
                "all-with-x, x- wrong",
                table([("x-match", s("all-with-x")), ("x-foo", I64(1))]),
                table([("x-foo", I64(2))]),
                false,
            ),
            (
                "all-with-x, x-match in headers too",
                table([("x-match", s("all-with-x")), ("x-foo", I64(1))]),
                table([("x-foo", I64(1)), ("x-match", s("all-with-x"))]),
                true,
            ),
            (
                "all-with-x skips x-match itself",
                table([("x-match", s("all-with-x"))]),
                table([]),
                true,
            ),
            (
                "all-with-x, plain argument",
                table([("x-match", s("all-with-x")), ("a", I64(1))]),
                table([("a", I64(1))]),
                true,
            ),
            (
                "any-with-x, x- present",
                table([("x-match", s("any-with-x")), ("x-foo", I64(1))]),
                table([("x-foo", I64(1))]),
                true,
            ),
            (
                "any-with-x, no headers",
                table([("x-match", s("any-with-x")), ("x-foo", I64(1))]),
                table([]),
                false,
            ),
            (
                "any-with-x skips x-match itself",
                table([("x-match", s("any-with-x"))]),
                table([("x-match", s("any-with-x"))]),
                false,
            ),
            (
                "any-with-x with nothing",
                table([("x-match", s("any-with-x"))]),
                table([]),
                false,
            ),
            (
                "x-match header ignored under all",
                table([("x-match", s("all")), ("a", I64(1))]),
                table([("a", I64(1)), ("x-match", s("zzz"))]),
                true,
            ),
            (
                "any, void present",
                table([("x-match", s("any")), ("a", Void), ("b", I64(2))]),
                table([("a", s("q"))]),
                true,
            ),
            (
                "names are case-sensitive",
                table([("A", I64(1))]),
                table([("a", I64(1))]),
                false,
            ),
        ]
    }

    #[test]
    fn headers_match_agrees_with_rabbitmq() {
        for (case, arguments, headers, expected) in probe_table() {
            assert_eq!(headers_match(&arguments, &headers), expected, "{case}");
        }
    }

    #[test]
    fn bindings_rabbitmq_refuses_are_refused() {
        for bad in [s("bogus"), s("ALL"), I64(1), Void, x("any")] {
            let err = validate_headers_binding(&table([("x-match", bad.clone())])).unwrap_err();
            assert!(
                matches!(&err, Error::PreconditionFailed(m) if m.contains("x-match")),
                "{bad:?}: {err}"
            );
        }
        for good in ["all", "any", "all-with-x", "any-with-x"] {
            validate_headers_binding(&table([("x-match", s(good)), ("a", I64(1))])).unwrap();
        }
        validate_headers_binding(&table([])).unwrap();
    }

    #[test]
    fn unknown_x_match_reads_as_all() {
        let arguments = table([("x-match", s("bogus")), ("a", I64(1)), ("b", I64(2))]);
        assert!(!headers_match(&arguments, &table([("a", I64(1))])));
        assert!(headers_match(
            &arguments,
            &table([("a", I64(1)), ("b", I64(2))])
        ));
    }

    #[test]
    fn floats_that_are_not_integers_never_equal_integers() {
        let binding = table([("a", I64(i64::MAX))]);
        // i64::MAX rounds to 2^63 as a double, one more than itself.
        for f in [f64::NAN, f64::INFINITY, 2f64.powi(63), 0.5] {
            assert!(!headers_match(&binding, &table([("a", F64(f))])), "{f}");
        }
        assert!(!headers_match(
            &table([("a", F64(f64::NAN))]),
            &table([("a", F64(f64::NAN))])
        ));
    }
}
