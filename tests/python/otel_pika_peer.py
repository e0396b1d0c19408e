"""A Python service traced by the official OpenTelemetry instrumentation for
pika (opentelemetry-instrumentation-pika's PikaInstrumentor, unmodified),
with the OpenTelemetry SDK exporting its spans in memory: the peer of
tests/otel_pika.rs, which checks that traces run between it and the library
in both directions.

Usage:
  otel_pika_peer.py publish QUEUE
      Publishes two messages to QUEUE (on the default exchange, mandatory,
      with publisher confirms) through an instrumented channel, each inside
      a span of its own: "plain", in a new trace, and "tracestate", in a
      trace continued from a remote parent that carries a tracestate. For
      each, prints one JSON line: the span it was published in, the "send"
      spans the instrumentation made for the publish (one for the blocking
      channel, and a child for the channel under it, whose context is the
      one sent), and the trace headers the instrumentation wrote, as its
      publish hook saw them last, just before the message went out.
  otel_pika_peer.py consume QUEUE COUNT
      Consumes QUEUE with basic_consume on an instrumented channel, prints
      "ready" once the broker confirmed the consumer, acks COUNT messages,
      then prints one JSON line for each: its body, the trace headers it
      carried, and the "receive" span the instrumentation made for it (as
      the in-memory exporter got it), whose parent comes from the headers.

The broker's URL comes from AMQP_ADDR (default the local RabbitMQ). Exits
non-zero, with a traceback on stderr, on any failure: a missing package
fails the test that runs this script.
"""
import json
import os
import random
import sys

import pika
from opentelemetry import trace
from opentelemetry.instrumentation.pika import PikaInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    TraceState,
    format_span_id,
    format_trace_id,
)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
TRACE_HEADERS = ("traceparent", "tracestate")
# The vendor entry the "tracestate" message's remote parent carries.
PYTHON_TRACESTATE = [("pika", "py-1"), ("vendor", "x")]


def text(value):
    """A header value as text (pika decodes a non-UTF-8 long string as bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def trace_headers(properties):
    headers = properties.headers or {}
    return {name: text(headers[name]) for name in TRACE_HEADERS if name in headers}


def span_json(span):
    """What a test compares of a finished SDK span."""
    context = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": format_trace_id(context.trace_id),
        "span_id": format_span_id(context.span_id),
        "parent_span_id": format_span_id(parent.span_id) if parent else None,
        "parent_is_remote": parent.is_remote if parent else None,
        "tracestate": context.trace_state.to_header(),
    }


def setup(**hooks):
    """The SDK exporting to memory, and pika instrumented with `hooks`."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    PikaInstrumentor().instrument(tracer_provider=provider, **hooks)
    return exporter, provider.get_tracer("otel_pika_peer")


def connect():
    url = os.environ.get("AMQP_ADDR") or DEFAULT_URL
    return pika.BlockingConnection(pika.URLParameters(url))


def publish(queue):
    written = {}

    # The instrumentation calls its publish hook each time it has written
    # the headers (once for each instrumented channel layer), with the
    # properties that are sent: the last call sees what goes out.
    def on_publish(span, body, properties):
        written[body] = trace_headers(properties)

    exporter, tracer = setup(publish_hook=on_publish)
    connection = connect()
    channel = connection.channel()
    channel.confirm_delivery()

    remote_parent = SpanContext(
        trace_id=random.getrandbits(128),
        span_id=random.getrandbits(64),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState(PYTHON_TRACESTATE),
    )
    parents = {
        b"plain": None,
        b"tracestate": trace.set_span_in_context(NonRecordingSpan(remote_parent)),
    }
    for body, parent in parents.items():
        exporter.clear()
        with tracer.start_as_current_span("python-request", context=parent) as request:
            # No properties: the instrumentation makes them, headers included.
            channel.basic_publish(exchange="", routing_key=queue, body=body, mandatory=True)
        sends = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.PRODUCER]
        print(
            json.dumps(
                {
                    "body": body.decode(),
                    "request": span_json(request),
                    "sends": [span_json(s) for s in sends],
                    "headers": written[body],
                }
            ),
            flush=True,
        )
    connection.close()


def consume(queue, count):
    exporter, _tracer = setup()
    connection = connect()
    channel = connection.channel()
    received = []

    def on_message(ch, method, properties, body):
        span = trace.get_current_span()
        received.append((body, trace_headers(properties), span.get_span_context().span_id))
        ch.basic_ack(delivery_tag=method.delivery_tag)
        if len(received) >= count:
            ch.stop_consuming()

    # basic_consume waits for the broker's consume-ok: once "ready" is out,
    # messages published to the queue reach this consumer.
    channel.basic_consume(queue=queue, on_message_callback=on_message)
    print("ready", flush=True)
    channel.start_consuming()
    finished = {s.get_span_context().span_id: s for s in exporter.get_finished_spans()}
    for body, headers, span_id in received:
        span = finished.get(span_id)
        print(
            json.dumps(
                {
                    "body": body.decode("utf-8", "replace"),
                    "headers": headers,
                    # None: the handler ran in no span the SDK exported.
                    "receive": span_json(span) if span else None,
                }
            ),
            flush=True,
        )
    connection.close()


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "publish":
        publish(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "consume":
        consume(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: otel_pika_peer.py publish QUEUE | consume QUEUE COUNT")


if __name__ == "__main__":
    main()
