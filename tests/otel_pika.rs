//! W3C Trace Context between the library and a Python service traced by the
//! official OpenTelemetry instrumentation for pika, over RabbitMQ, in both
//! directions (`tests/python/otel_pika_peer.py`, pika's `PikaInstrumentor`
//! unmodified, the Python SDK exporting in memory; the library's spans go
//! to the Rust SDK's in-memory exporter through tracing-opentelemetry):
//!
//! - pika → worker: the headers the instrumentation writes reach the
//!   worker's handler as written, and the worker's `process` span continues
//!   the trace: same trace id, the instrumentation's send span as its
//!   (remote) parent, and the `tracestate` the Python trace carries;
//! - bus → pika: a publish made inside a span is the parent of the receive
//!   span the instrumentation opens for its consumer, `tracestate` included.
//!
//! Messages from plain (uninstrumented) pika, without any trace header, are
//! the legacy peers' of `bus-amqp/tests/interop.rs`; the worker's handling
//! of messages without a trace is `bus-local/tests/worker_otel.rs`'s.
//!
//! Needs RabbitMQ (`AMQP_ADDR`, default the local broker) and `python3`
//! with pika, opentelemetry-sdk and opentelemetry-instrumentation-pika
//! (`scripts/test-all` installs them); fails, never skips, without them.
//! Its own test binary: it installs a tracing subscriber for its thread.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::otel::{TRACEPARENT_HEADER, TRACESTATE_HEADER};
use bus::worker::{HandlerError, Job, Worker};
use bus::{
    Connection, DeleteQueueOptions, FieldTable, FieldValue, Message, PublishOptions, QueueOptions,
};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

fn amqp_addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Bounds a wait: fails the test if `f` takes longer than `secs`.
async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {secs}s waiting for {what}"))
}

/// Spans go to `exporter` while the guard lives; the tests run on one
/// thread (current-thread runtime), the worker included.
fn export_to(exporter: &InMemorySpanExporter) -> tracing::subscriber::DefaultGuard {
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("otel_pika")));
    tracing::subscriber::set_default(subscriber)
}

async fn connect() -> Arc<dyn Connection> {
    bus::connect(&amqp_addr()).await.unwrap_or_else(|e| {
        panic!(
            "RabbitMQ is not reachable at {} ({e}); start it (rabbitmq-server -detached) or set AMQP_ADDR",
            bus::redact_url(&amqp_addr())
        )
    })
}

fn fresh(what: &str) -> String {
    format!(
        "bus-test.otel-pika.{what}.{}",
        uuid::Uuid::new_v4().simple()
    )
}

/// Deletes the test's queues with `rabbitmqctl` if the test fails before
/// deleting them itself (that is, when dropped while the test panics).
struct QueueCleanup(Vec<String>);

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let vhost = bus::amqp::AmqpUrl::parse(&amqp_addr())
            .map(|u| u.vhost)
            .unwrap_or_else(|_| "/".into());
        for queue in &self.0 {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["delete_queue", "-p", &vhost, queue])
                .output();
        }
    }
}

async fn delete_queues(conn: &dyn Connection, queues: &[&str]) {
    for queue in queues {
        within(
            30,
            "deleting a queue",
            conn.delete_queue(queue, DeleteQueueOptions::default()),
        )
        .await
        .unwrap_or_else(|e| panic!("delete {queue}: {e}"));
    }
}

// ------------------------------------------------------------ Python peer

const PYTHON_HINT: &str =
    "python3 needs pika, opentelemetry-sdk and opentelemetry-instrumentation-pika \
     (scripts/test-all installs them)";

/// The instrumented Python peer, killed when dropped (a failing test never
/// leaves it behind).
struct Peer {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
    /// Reads `stderr` until the peer closes it.
    stderr_reader: JoinHandle<()>,
}

impl Peer {
    fn start(args: &[&str]) -> Peer {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join("python")
            .join("otel_pika_peer.py");
        let mut child = Command::new("python3")
            .arg("-u")
            .arg(script)
            .args(args)
            // The URL (with its password) goes through the environment, not
            // the command line other users of the machine can read.
            .env("AMQP_ADDR", amqp_addr())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 ({PYTHON_HINT}): {e}"));
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stderr_pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let stderr_reader = tokio::spawn(async move {
            let mut bytes = Vec::new();
            let _ = stderr_pipe.read_to_end(&mut bytes).await;
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&bytes));
        });
        Peer {
            child,
            lines,
            stderr,
            stderr_reader,
        }
    }

    /// All the peer wrote on stderr, once it closed it (or a bound passed).
    async fn stderr(&mut self) -> String {
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.stderr_reader).await;
        self.stderr.lock().unwrap().clone()
    }

    async fn next_line(&mut self, what: &str) -> String {
        match within(60, what, self.lines.next_line()).await {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => panic!(
                "the Python peer stopped before {what} ({PYTHON_HINT}); its stderr:\n{}",
                self.stderr().await
            ),
        }
    }

    async fn next_json<T: serde::de::DeserializeOwned>(&mut self, what: &str) -> T {
        let line = self.next_line(what).await;
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{line:?} is not what {what} is: {e}"))
    }

    /// Waits for the peer to exit, failing the test unless it succeeded.
    async fn finish(mut self) {
        let status = within(60, "the Python peer to exit", self.child.wait())
            .await
            .unwrap();
        assert!(
            status.success(),
            "the Python peer failed ({status}; {PYTHON_HINT}); its stderr:\n{}",
            self.stderr().await
        );
    }
}

/// A finished span of the Python SDK, as the peer prints it.
#[derive(Debug, Deserialize)]
struct PySpan {
    name: String,
    kind: String,
    trace_id: String,
    span_id: String,
    parent_span_id: Option<String>,
    parent_is_remote: Option<bool>,
    tracestate: String,
}

/// The trace headers a message carried, as the peer prints them.
#[derive(Debug, Deserialize, PartialEq)]
struct PyHeaders {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

/// One publish of the peer: the span it was made in, the instrumentation's
/// send spans, and the headers it wrote.
#[derive(Debug, Deserialize)]
struct Published {
    body: String,
    request: PySpan,
    sends: Vec<PySpan>,
    headers: PyHeaders,
}

/// One message the peer consumed, and the instrumentation's receive span.
#[derive(Debug, Deserialize)]
struct Received {
    body: String,
    headers: PyHeaders,
    receive: Option<PySpan>,
}

/// A `traceparent`'s trace id, span id and flags; fails the test unless it
/// is a well-formed version 00 one.
fn parse_traceparent(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    match parts[..] {
        ["00", trace, span, flags] if trace.len() == 32 && span.len() == 16 && flags.len() == 2 => {
            (trace.to_owned(), span.to_owned(), flags.to_owned())
        }
        _ => panic!("{value:?} is not a W3C traceparent"),
    }
}

fn header_text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.get(name)? {
        FieldValue::String(s) => Some(s.clone()),
        other => panic!("the {name} header is {other:?}, not a string"),
    }
}

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

// ------------------------------------------------------- pika → worker

#[tokio::test]
async fn a_pika_publish_is_the_parent_of_the_workers_process_span() {
    let exporter = InMemorySpanExporter::default();
    let _guard = export_to(&exporter);
    let conn = connect().await;
    let queue = fresh("to-worker");
    let error_queue = format!("{queue}.error");
    let _cleanup = QueueCleanup(vec![queue.clone(), error_queue.clone()]);

    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let worker = Worker::builder(conn.clone(), queue.clone())
        .queue_options(QueueOptions::default())
        .handle_raw(move |job: Job| {
            let body = String::from_utf8_lossy(&job.body).into_owned();
            let headers = PyHeaders {
                traceparent: header_text(job.headers(), TRACEPARENT_HEADER),
                tracestate: header_text(job.headers(), TRACESTATE_HEADER),
            };
            let _ = seen_tx.send((body, headers));
            async { Ok::<(), HandlerError>(()) }
        })
        .await
        .expect("start the worker");

    // The worker consumes the queue: the peer's messages reach it.
    let mut peer = Peer::start(&["publish", &queue]);
    let mut published = Vec::new();
    for _ in 0..2 {
        published.push(peer.next_json::<Published>("a publish of the peer").await);
    }
    peer.finish().await;
    let mut handled = Vec::new();
    for _ in 0..2 {
        let message = within(30, "the worker to handle a message", seen.recv()).await;
        handled.push(message.expect("the worker runs"));
    }
    let report = within(
        30,
        "the worker to stop",
        worker.shutdown(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    assert_eq!(report.stats.handled, 2, "{:?}", report.stats);

    let spans = exporter.get_finished_spans().unwrap();
    let processed = process_spans(&spans, &queue);
    assert_eq!(
        processed.len(),
        2,
        "one process span per message: {processed:?}"
    );
    for message in &published {
        let what = &message.body;
        // The handler got the headers as the instrumentation wrote them.
        let (_, got) = handled
            .iter()
            .find(|(body, _)| body == what)
            .unwrap_or_else(|| panic!("the worker never handled {what:?}"));
        assert_eq!(got, &message.headers, "{what}: the headers the worker got");

        // What the instrumentation wrote: its send span, in the request's
        // trace.
        let traceparent = message.headers.traceparent.as_deref().unwrap_or_else(|| {
            panic!("{what}: the instrumentation wrote no traceparent: {message:?}")
        });
        let (trace_id, parent_id, flags) = parse_traceparent(traceparent);
        assert_eq!(trace_id, message.request.trace_id, "{what}: {message:?}");
        // Sampled; the Python SDK also sets W3C level 2's random-trace-id
        // bit (03) on the traces it starts, which the library accepts.
        let flags = u8::from_str_radix(&flags, 16).unwrap();
        assert_eq!(flags & 1, 1, "{what}: {traceparent:?} is not sampled");
        let send = message
            .sends
            .iter()
            .find(|s| s.span_id == parent_id)
            .unwrap_or_else(|| {
                panic!("{what}: the traceparent names none of the send spans: {message:?}")
            });
        assert_eq!(
            (
                send.kind.as_str(),
                send.name.as_str(),
                send.trace_id.as_str()
            ),
            (
                "PRODUCER",
                format!("{queue} send").as_str(),
                trace_id.as_str()
            ),
            "{what}: {send:?}"
        );
        assert_eq!(
            message.headers.tracestate.as_deref().unwrap_or(""),
            message.request.tracestate,
            "{what}: the tracestate written is the request's"
        );

        // The worker's handling continues that trace, from that span.
        let span = processed
            .iter()
            .find(|s| s.span_context.trace_id().to_string() == trace_id)
            .unwrap_or_else(|| {
                panic!("{what}: no process span in trace {trace_id}: {processed:?}")
            });
        assert_eq!(span.parent_span_id.to_string(), parent_id, "{what}");
        assert!(span.parent_span_is_remote, "{what}: the parent is remote");
        assert!(span.span_context.is_sampled(), "{what}: sampled, as sent");
        assert_eq!(
            span.span_context.trace_state().header(),
            message.request.tracestate,
            "{what}: the process span keeps the Python trace's tracestate"
        );
    }
    let traced: Vec<&str> = published.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(traced, ["plain", "tracestate"]);
    assert_eq!(
        published[1].request.tracestate, "pika=py-1,vendor=x",
        "the peer's second message carries a tracestate"
    );

    delete_queues(&*conn, &[&queue, &error_queue]).await;
    conn.close().await.unwrap();
}

// ------------------------------------------------------------ bus → pika

#[tokio::test]
async fn a_bus_publish_is_the_parent_of_the_pika_consumers_receive_span() {
    let exporter = InMemorySpanExporter::default();
    let _guard = export_to(&exporter);
    let conn = connect().await;
    let queue = fresh("to-pika");
    let _cleanup = QueueCleanup(vec![queue.clone()]);
    within(
        30,
        "declaring the queue",
        conn.declare_queue(&queue, QueueOptions::default()),
    )
    .await
    .unwrap();
    let mut peer = Peer::start(&["consume", &queue, "2"]);
    let ready = peer.next_line("the peer to consume its queue").await;
    assert_eq!(ready, "ready", "the peer said {ready:?}");

    // "plain" in a trace of its own; "tracestate" in one continued from a
    // remote parent that carries a tracestate.
    let random = uuid::Uuid::new_v4().into_bytes();
    let remote = SpanContext::new(
        TraceId::from_bytes(random),
        SpanId::from_bytes(random[..8].try_into().unwrap()),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("bus", "rust-1"), ("vendor", "y")]).unwrap(),
    );
    let plain = tracing::info_span!("bus-request", body = "plain");
    let continued = tracing::info_span!("bus-request", body = "tracestate");
    continued
        .set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
        .unwrap();
    for (span, body) in [(&plain, "plain"), (&continued, "tracestate")] {
        let _entered = span.enter();
        within(
            30,
            "a publish",
            conn.publish("", &queue, Message::new(body), PublishOptions::default()),
        )
        .await
        .unwrap();
    }
    drop((plain, continued));

    let mut received = Vec::new();
    for _ in 0..2 {
        received.push(
            peer.next_json::<Received>("a message the peer consumed")
                .await,
        );
    }
    peer.finish().await;

    let spans = exporter.get_finished_spans().unwrap();
    let published: Vec<&SpanData> = spans.iter().filter(|s| s.name == "bus-request").collect();
    assert_eq!(published.len(), 2, "{spans:?}");
    for (message, expected_state) in [("plain", ""), ("tracestate", "bus=rust-1,vendor=y")] {
        let ours = published
            .iter()
            .find(|s| {
                s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "body" && kv.value.as_str() == message)
            })
            .unwrap_or_else(|| panic!("no publish span for {message:?}"));
        let trace_id = ours.span_context.trace_id().to_string();
        let span_id = ours.span_context.span_id().to_string();
        assert_eq!(ours.span_context.trace_state().header(), expected_state);
        let got = received
            .iter()
            .find(|r| r.body == message)
            .unwrap_or_else(|| panic!("the peer never got {message:?}: {received:?}"));
        assert_eq!(
            got.headers,
            PyHeaders {
                traceparent: Some(format!("00-{trace_id}-{span_id}-01")),
                tracestate: (!expected_state.is_empty()).then(|| expected_state.to_owned()),
            },
            "{message}: the headers pika read"
        );
        let receive = got.receive.as_ref().unwrap_or_else(|| {
            panic!("{message}: the consumer ran in no span the instrumentation exported")
        });
        assert_eq!(
            (receive.kind.as_str(), receive.name.as_str()),
            ("CONSUMER", format!("{queue} receive").as_str()),
            "{message}: {receive:?}"
        );
        assert_eq!(
            receive.trace_id, trace_id,
            "{message}: the trace goes on in Python"
        );
        assert_eq!(
            receive.parent_span_id.as_deref(),
            Some(span_id.as_str()),
            "{message}: the receive span's parent is the publishing span"
        );
        assert_eq!(receive.parent_is_remote, Some(true), "{message}");
        assert_eq!(receive.tracestate, expected_state, "{message}");
    }

    delete_queues(&*conn, &[&queue]).await;
    conn.close().await.unwrap();
}
