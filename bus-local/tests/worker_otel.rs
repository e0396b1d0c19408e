//! W3C Trace Context through the worker runtime and RPC (feature `otel`),
//! with the OpenTelemetry SDK's in-memory exporter behind
//! tracing-opentelemetry: one trace across publish, handle, publish, handle
//! (and a delayed retry); one trace across an RPC call, its handling and
//! its reply; a caller's own `traceparent` is kept; messages without a
//! trace, or with a malformed one, are handled as any other.
//!
//! Its own test binary: it installs a tracing subscriber for its thread.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::otel::{self, TRACEPARENT_HEADER};
use bus_core::rpc::{RpcClient, RpcServer};
use bus_core::worker::{HandlerError, Job, RetryPolicy, Worker};
use bus_core::{Connection, ConnectionExt, ConsumeOptions, FieldValue, Message, PublishOptions};
use bus_local::LocalBroker;
use futures::StreamExt;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;

fn process_spans(spans: &[SpanData], queue: &str) -> Vec<SpanData> {
    spans
        .iter()
        .filter(|s| {
            s.name == "process"
                && s.attributes.iter().any(|kv| {
                    kv.key.as_str() == "messaging.destination.name" && kv.value.as_str() == queue
                })
        })
        .cloned()
        .collect()
}

/// Spans go to `exporter` while the guard lives; the tests run on one
/// thread (current-thread runtime), workers and servers included.
fn export_to(exporter: &InMemorySpanExporter) -> tracing::subscriber::DefaultGuard {
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("worker_otel")));
    tracing::subscriber::set_default(subscriber)
}

fn traceparent(message: &Message) -> Option<String> {
    message
        .properties
        .headers
        .get(TRACEPARENT_HEADER)
        .and_then(FieldValue::as_str)
        .map(str::to_owned)
}

#[tokio::test(start_paused = true)]
async fn one_trace_across_publish_handle_publish_handle() {
    let exporter = InMemorySpanExporter::default();
    let _guard = export_to(&exporter);

    let broker = LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    // First hop: handles a step and publishes the next one.
    let first = Worker::builder(conn.clone(), "otel.first")
        .handle_raw(|job: Job| async move {
            job.publish_value("", "otel.second", &"next step").await?;
            Ok::<(), HandlerError>(())
        })
        .await
        .expect("start the first worker");
    // Second hop: fails once (a delayed retry through the broker), then
    // succeeds; records the traceparent each attempt received.
    let second = Worker::builder(conn.clone(), "otel.second")
        .retry(RetryPolicy::none().delayed([Duration::from_secs(1)]))
        .handle_raw(move |job: Job| {
            let header = job
                .headers()
                .get(TRACEPARENT_HEADER)
                .and_then(FieldValue::as_str)
                .map(str::to_owned);
            log.lock().unwrap().push((job.attempt, header));
            let attempt = job.attempt;
            async move {
                if attempt == 1 {
                    Err(HandlerError::transient("once"))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .expect("start the second worker");

    let root = tracing::info_span!("request");
    let root_trace = {
        let _entered = root.enter();
        let mut message = Message::new(&b"step"[..]);
        otel::inject(&mut message);
        let traceparent = message.properties.headers[TRACEPARENT_HEADER]
            .as_str()
            .expect("a string header")
            .to_owned();
        conn.publish("", "otel.first", message, PublishOptions::default())
            .await
            .expect("publish");
        traceparent
    };
    drop(root);
    second.wait_until(|s| s.handled == 1).await.unwrap();
    first.shutdown(Duration::from_secs(1)).await.unwrap();
    let stats = second.shutdown(Duration::from_secs(1)).await.unwrap().stats;
    assert_eq!((stats.failures, stats.delayed, stats.poisoned), (1, 1, 0));

    let spans = exporter.get_finished_spans().unwrap();
    let request = spans
        .iter()
        .find(|s| s.name == "request")
        .expect("the request span");
    let trace_id = request.span_context.trace_id();
    assert_ne!(trace_id, TraceId::INVALID);
    assert_eq!(
        root_trace,
        format!("00-{}-{}-01", trace_id, request.span_context.span_id()),
        "the traceparent written is the W3C one of the current span"
    );
    let first_spans = process_spans(&spans, "otel.first");
    let second_spans = process_spans(&spans, "otel.second");
    assert_eq!(first_spans.len(), 1);
    assert_eq!(second_spans.len(), 2, "the attempt and its delayed retry");
    let first_span = &first_spans[0];
    assert_eq!(first_span.span_context.trace_id(), trace_id);
    assert_eq!(first_span.parent_span_id, request.span_context.span_id());
    assert!(first_span.parent_span_is_remote);
    for span in &second_spans {
        assert_eq!(span.span_context.trace_id(), trace_id, "one trace id");
    }
    // The first attempt's parent is the first hop's handling, which
    // published the step; the retry's parent is the failed attempt, which
    // published it to the delay queue.
    let attempt = |n: i64| {
        second_spans
            .iter()
            .find(|s| {
                s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "attempt" && kv.value == n.into())
            })
            .unwrap_or_else(|| panic!("a span for attempt {n}"))
    };
    assert_eq!(attempt(1).parent_span_id, first_span.span_context.span_id());
    assert_eq!(attempt(2).parent_span_id, attempt(1).span_context.span_id());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].1.as_deref(),
        Some(format!("00-{trace_id}-{}-01", first_span.span_context.span_id()).as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn messages_without_a_trace_or_with_a_malformed_one_are_handled() {
    let exporter = InMemorySpanExporter::default();
    let _guard = export_to(&exporter);

    let broker = LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let worker = Worker::builder(conn.clone(), "otel.legacy")
        .handle_raw(|_job: Job| async { Ok::<(), HandlerError>(()) })
        .await
        .expect("start the worker");
    // A legacy peer sends no trace headers at all.
    conn.publish(
        "",
        "otel.legacy",
        Message::new(&b"legacy"[..]),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    // A broken one: ignored, not an error.
    let mut malformed = Message::new(&b"malformed"[..]);
    malformed.properties.headers.insert(
        TRACEPARENT_HEADER.into(),
        FieldValue::String("00-not-a-trace-01".into()),
    );
    assert!(otel::extract(&malformed.properties.headers).is_none());
    conn.publish("", "otel.legacy", malformed, PublishOptions::default())
        .await
        .unwrap();
    let stats = worker.wait_until(|s| s.handled == 2).await.unwrap();
    assert_eq!((stats.failures, stats.poisoned), (0, 0));
    worker.shutdown(Duration::from_secs(1)).await.unwrap();
    broker.wait_idle().await;
    assert_eq!(broker.queue_depth("otel.legacy.error"), Some(0));

    let spans = process_spans(&exporter.get_finished_spans().unwrap(), "otel.legacy");
    assert_eq!(spans.len(), 2);
    for span in &spans {
        // Each in a trace of its own, with no parent.
        assert_ne!(span.span_context.trace_id(), TraceId::INVALID);
        assert_eq!(span.parent_span_id, SpanId::INVALID);
    }
    assert_ne!(
        spans[0].span_context.trace_id(),
        spans[1].span_context.trace_id()
    );
}

#[tokio::test(start_paused = true)]
async fn one_trace_across_an_rpc_call_and_its_reply() {
    let exporter = InMemorySpanExporter::default();
    let _guard = export_to(&exporter);

    let broker = LocalBroker::new();
    let server_conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let client_conn: Arc<dyn Connection> = Arc::new(broker.connect());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    let server = RpcServer::builder(server_conn, "otel.rpc")
        .serve_raw(move |request: Message| {
            log.lock().unwrap().push(traceparent(&request));
            async { Ok::<_, String>(Message::new(&b"pong"[..])) }
        })
        .await
        .expect("start the server");
    let client = RpcClient::new(client_conn).await.expect("client");

    let root = tracing::info_span!("caller");
    let reply = tracing::Instrument::instrument(
        client.call_raw("otel.rpc", Message::new(&b"ping"[..])),
        root.clone(),
    )
    .await
    .expect("the call");
    drop(root);
    assert_eq!(&reply.body[..], b"pong");
    server.shutdown().await.expect("shutdown");

    let spans = exporter.get_finished_spans().unwrap();
    let caller = spans
        .iter()
        .find(|s| s.name == "caller")
        .expect("the caller's span");
    let trace_id = caller.span_context.trace_id();
    assert_ne!(trace_id, TraceId::INVALID);
    // The request carried the caller's context, with no inject of the
    // user's: the client wrote it.
    let requests = requests.lock().unwrap().clone();
    assert_eq!(
        requests,
        vec![Some(format!(
            "00-{trace_id}-{}-01",
            caller.span_context.span_id()
        ))]
    );
    // The server handled it as a child of the caller, in the same trace,
    // and its reply carries the handling span's context.
    let handled = process_spans(&spans, "otel.rpc");
    assert_eq!(handled.len(), 1);
    let handled = &handled[0];
    assert_eq!(handled.span_context.trace_id(), trace_id, "one trace id");
    assert_eq!(handled.parent_span_id, caller.span_context.span_id());
    assert!(handled.parent_span_is_remote);
    assert_eq!(
        traceparent(&reply),
        Some(format!(
            "00-{trace_id}-{}-01",
            handled.span_context.span_id()
        ))
    );
}

#[tokio::test(start_paused = true)]
async fn a_traceparent_the_caller_set_is_kept() {
    let exporter = InMemorySpanExporter::default();
    let _guard = export_to(&exporter);

    let broker = LocalBroker::new();
    let conn: Arc<dyn Connection> = Arc::new(broker.connect());
    conn.declare_queue("otel.kept", Default::default())
        .await
        .unwrap();
    let theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let span = tracing::info_span!("publisher");
    let _entered = span.enter();
    // Through each library path that writes a trace: the caller's wins.
    let mut sent = 0;
    for path in ["send_to_queue", "publish", "inject"] {
        let mut message = Message::new(path.as_bytes().to_vec());
        message
            .properties
            .headers
            .insert(TRACEPARENT_HEADER.into(), FieldValue::String(theirs.into()));
        match path {
            "send_to_queue" => conn.send_to_queue("otel.kept", message).await.unwrap(),
            "publish" => conn
                .publish("", "otel.kept", message, PublishOptions::default())
                .await
                .unwrap(),
            _ => {
                otel::inject(&mut message);
                conn.publish("", "otel.kept", message, PublishOptions::default())
                    .await
                    .unwrap();
            }
        }
        sent += 1;
    }
    // And a message without one gets the current span's, through a plain
    // publish as through the helpers.
    conn.send_to_queue("otel.kept", Message::new(&b"fresh"[..]))
        .await
        .unwrap();
    conn.publish(
        "",
        "otel.kept",
        Message::new(&b"fresh too"[..]),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    let mut consumer = conn
        .consume("otel.kept", ConsumeOptions::auto_ack())
        .await
        .unwrap();
    for _ in 0..sent {
        let delivery = consumer.next().await.unwrap().unwrap();
        assert_eq!(traceparent(&delivery.message).as_deref(), Some(theirs));
    }
    for _ in 0..2 {
        let fresh = consumer.next().await.unwrap().unwrap();
        let written = traceparent(&fresh.message).expect("a traceparent");
        assert_ne!(written, theirs);
        let cx = otel::extract(&fresh.message.properties.headers).expect("well-formed");
        assert_ne!(cx.span().span_context().trace_id(), TraceId::INVALID);
    }
}
