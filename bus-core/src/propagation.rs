//! Where the library writes the current trace into the messages it sends
//! (feature `otel`; without it, these do nothing). One place, so that every
//! publish behaves the same:
//! - [`trace`] for a message the caller built: it keeps a `traceparent` the
//!   caller set, and otherwise writes the current span's. Every transport's
//!   [`Connection::publish`](crate::Connection::publish) calls it first, so
//!   every publish made inside a span carries that span's trace;
//! - `retrace` for a consumed message the runtime sends on again (a
//!   delayed retry, a poisoned copy): its old context is the publisher's,
//!   so it is replaced by that of the handling span.

use crate::message::Message;

/// Writes the current span's trace context into `message`, unless it
/// carries a `traceparent` already (feature `otel`; without it, nothing).
///
/// What a transport's [`Connection::publish`](crate::Connection::publish)
/// (and its fast path, [`Connection::publish_now`](crate::Connection::publish_now))
/// does first with the message it is given, so that the library's own
/// helpers need not.
pub fn trace(message: &mut Message) {
    #[cfg(feature = "otel")]
    crate::otel::inject(message);
    #[cfg(not(feature = "otel"))]
    let _ = message;
}

/// Writes the current span's trace context into `message`, replacing the
/// one it carries.
pub(crate) fn retrace(message: &mut Message) {
    #[cfg(feature = "otel")]
    crate::otel::inject_current(message);
    #[cfg(not(feature = "otel"))]
    let _ = message;
}
