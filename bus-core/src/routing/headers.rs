//! Headers routing, as RabbitMQ's headers exchange does it.

use crate::value::FieldTable;

/// Whether a message with `headers` matches a headers-exchange binding with
/// `arguments`.
///
/// `x-match` is `all` (the default), `any`, `all-with-x` or `any-with-x`.
/// Under `all` and `any`, binding arguments whose names start with `x-` take
/// no part; under the `-with-x` forms they do. A binding argument of type
/// void matches the presence of the header, whatever its value; any other
/// value must be equal in type and value. `all` with no arguments to match
/// matches every message; `any` with none matches none.
#[must_use]
pub fn headers_match(arguments: &FieldTable, headers: &FieldTable) -> bool {
    let mode = arguments
        .get("x-match")
        .and_then(|v| v.as_str())
        .unwrap_or("all");
    let (any, with_x) = match mode {
        "any" => (true, false),
        "all-with-x" => (false, true),
        "any-with-x" => (true, true),
        _ => (false, false),
    };
    let mut relevant = arguments
        .iter()
        .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.starts_with("x-")));
    let hit = |(k, v): (&String, &crate::value::FieldValue)| match headers.get(k) {
        None => false,
        Some(h) => matches!(v, crate::value::FieldValue::Void) || h == v,
    };
    if any {
        relevant.any(hit)
    } else {
        relevant.all(hit)
    }
}
