//! Where the library writes the current trace into the messages it sends
//! (feature `otel`; without it, these do nothing). One place, so that every
//! publish path the library owns behaves the same:
//! - [`trace`] for a message the caller built: it keeps a `traceparent` the
//!   caller set, and otherwise writes the current span's;
//! - [`retrace`] for a consumed message the runtime sends on again (a
//!   delayed retry, a poisoned copy): its old context is the publisher's,
//!   so it is replaced by that of the handling span.

use crate::message::Message;

/// Writes the current span's trace context into `message`, unless it
/// carries a `traceparent` already.
pub(crate) fn trace(message: &mut Message) {
    #[cfg(feature = "otel")]
    crate::otel::inject(message);
    #[cfg(not(feature = "otel"))]
    let _ = message;
}

/// Writes the current span's trace context into `message`, replacing the
/// one it carries.
pub(crate) fn retrace(message: &mut Message) {
    #[cfg(feature = "otel")]
    crate::otel::inject_span(&tracing::Span::current(), &mut message.properties.headers);
    #[cfg(not(feature = "otel"))]
    let _ = message;
}
