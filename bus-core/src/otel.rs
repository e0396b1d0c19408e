//! W3C Trace Context in message headers (feature `otel`).
//!
//! A message carries its trace in the headers [`TRACEPARENT_HEADER`] and
//! [`TRACESTATE_HEADER`], as AMQP string values: the way the OpenTelemetry
//! instrumentations for pika and the Java client write them, so traces run
//! across Python, Java and Rust services.
//!
//! The current span is that of `tracing`, bridged to OpenTelemetry by
//! [`tracing_opentelemetry`]: install its layer in the application's
//! subscriber, or these headers carry nothing. Then:
//! - every publish carries the context of the span it is made from, unless
//!   the message carries a [`TRACEPARENT_HEADER`] already (the caller's
//!   context is never overwritten): each transport's
//!   [`Connection::publish`] writes it first
//!   ([`propagation::trace`](crate::propagation::trace)), so
//!   [`ConnectionExt::send_to_queue`], [`RpcClient`] requests (every
//!   `call` variant, and the blocking client, which runs the call in the
//!   caller's span) and the RPC server's replies, [`Job::publish`] and
//!   [`Job::publish_value`] inside a worker's handler, and
//!   [`publish_delayed`] all do;
//! - a worker's delayed retries and poisoned copies are the consumed
//!   message sent on: their context is replaced by that of the handling
//!   span, so a retry's handling is a child of the attempt before it;
//! - the `process` span a worker or an RPC server opens for each delivery
//!   has the context the message carries as its parent ([`set_parent`]). A
//!   message without one (legacy peers send none) or with a malformed one is
//!   handled as any other, in a trace of its own.
//!
//! [`RpcClient`]: crate::rpc::RpcClient
//! [`Job::publish`]: crate::worker::Job::publish
//! [`Job::publish_value`]: crate::worker::Job::publish_value
//! [`ConnectionExt::send_to_queue`]: crate::ConnectionExt::send_to_queue
//! [`publish_delayed`]: crate::worker::publish_delayed
//! [`Connection::publish`]: crate::Connection::publish

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::Message;
use crate::value::{FieldTable, FieldValue};

/// The header holding the W3C `traceparent` (version, trace id, parent
/// span id, flags).
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The header holding the W3C `tracestate` (vendor entries), when there is
/// one.
pub const TRACESTATE_HEADER: &str = "tracestate";

struct Headers<'a>(&'a mut FieldTable);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes a `tracestate` even when the trace has no
        // vendor entries; the OpenTelemetry instrumentations for pika and
        // the Java client leave the header out then, and so does this.
        if key == TRACESTATE_HEADER && value.is_empty() {
            return;
        }
        self.0.insert(key.to_owned(), FieldValue::String(value));
    }
}

struct ReadHeaders<'a>(&'a FieldTable);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.get(key)? {
            FieldValue::String(s) => Some(s),
            // Some clients send header strings as byte arrays.
            FieldValue::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes the trace context of `span` into `headers`, replacing any there;
/// leaves them as they are when `span` is in no trace.
pub fn inject_span(span: &tracing::Span, headers: &mut FieldTable) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        inject_context(&cx, headers);
    }
}

/// Writes the trace context `cx` (one in a trace) into `headers`,
/// replacing any there.
fn inject_context(cx: &Context, headers: &mut FieldTable) {
    headers.remove(TRACESTATE_HEADER);
    TraceContextPropagator::new().inject_context(cx, &mut Headers(headers));
}

/// Writes the trace context of the current span into `message`'s headers,
/// so that its consumer's handling joins the trace. A message that carries
/// a [`TRACEPARENT_HEADER`] already keeps it (and its `tracestate`): the
/// caller's context wins. Leaves the headers as they are outside any trace.
pub fn inject(message: &mut Message) {
    // Read first: writing through `properties` copies shared properties.
    if message.properties.headers.contains_key(TRACEPARENT_HEADER) {
        return;
    }
    inject_current(message);
}

/// Writes the trace context of the current span into `message`'s headers,
/// replacing any there; leaves them as they are outside any trace (checked
/// before writing, which would copy shared properties).
pub(crate) fn inject_current(message: &mut Message) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        inject_context(&cx, &mut message.properties.headers);
    }
}

/// The trace context `headers` carry, if they carry a well-formed one.
#[must_use]
pub fn extract(headers: &FieldTable) -> Option<Context> {
    let cx =
        TraceContextPropagator::new().extract_with_context(&Context::new(), &ReadHeaders(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes the trace context `headers` carry the parent of `span`, which must
/// not have been entered yet; does nothing when they carry none or a
/// malformed one.
pub fn set_parent(span: &tracing::Span, headers: &FieldTable) {
    if let Some(cx) = extract(headers) {
        if let Err(e) = span.set_parent(cx) {
            tracing::debug!(error = %e, "could not set a message's trace as a span's parent");
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    fn injected(trace_state: TraceState) -> FieldTable {
        let cx = Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            true,
            trace_state,
        ));
        let mut headers = FieldTable::new();
        TraceContextPropagator::new().inject_context(&cx, &mut Headers(&mut headers));
        headers
    }

    #[test]
    fn a_trace_without_vendor_entries_gets_no_tracestate_header() {
        let headers = injected(TraceState::default());
        assert_eq!(
            headers.keys().collect::<Vec<_>>(),
            [TRACEPARENT_HEADER],
            "{headers:?}"
        );
        let cx = extract(&headers).expect("the traceparent written is read back");
        assert_eq!(cx.span().span_context().trace_state().header(), "");
    }

    #[test]
    fn vendor_entries_go_in_the_tracestate_header_and_come_back() {
        let state =
            TraceState::from_key_value([("congo", "t61rcWkgMzE"), ("rojo", "00f0")]).unwrap();
        let headers = injected(state.clone());
        assert_eq!(
            headers.get(TRACESTATE_HEADER).and_then(FieldValue::as_str),
            Some("congo=t61rcWkgMzE,rojo=00f0")
        );
        let cx = extract(&headers).expect("the context written is read back");
        assert_eq!(cx.span().span_context().trace_state(), &state);
    }
}
