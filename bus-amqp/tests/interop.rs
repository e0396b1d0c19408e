//! RPC between this library and the legacy Python peers of docs/LEGACY.md
//! contract 1 (`tests/python/`: pika + msgpack, written as the production
//! workers and callers are), over a real RabbitMQ, in both directions:
//!
//! - a Rust [`RpcClient`] (direct reply-to, and the classic exclusive reply
//!   queue configured either way) calling the Python worker;
//! - the Python caller calling a Rust [`RpcServer`] with a typed handler,
//!   including a handler error and an undecodable request;
//! - a Python and a Rust worker serving one queue together.
//!
//! The payload carries nested maps, arrays, binary data of every msgpack
//! bin size, unicode strings, integers of every width, floats, booleans and
//! nil. Bodies are compared as msgpack values (`rmpv`), so a bin that came
//! back as a str or an array of integers fails the test.
//!
//! Needs RabbitMQ (`AMQP_ADDR`, default the local broker) and `python3` with
//! `pika` and `msgpack` (`scripts/test-all` installs them); fails, never
//! skips, without them.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bus_amqp::{AmqpOptions, ReplyMode};
use bus_core::rpc::{decode_message, Format, RpcClient, RpcClientOptions, RpcServer, ERROR_HEADER};
use bus_core::{Connection, Error};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use serde_json::json;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;

// ---------------------------------------------------------------- payload

/// Integers at the edges of every msgpack integer width.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Widths {
    u8_max: u8,
    u16_max: u16,
    u32_max: u32,
    u64_max: u64,
    i8_min: i8,
    i16_min: i16,
    i32_min: i32,
    i64_min: i64,
    negative_fixint: i64,
    zero: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Speaker {
    name: String,
    scores: BTreeMap<String, f64>,
    aliases: Vec<String>,
    nothing: BTreeMap<String, u8>,
    deeper: BTreeMap<String, Vec<Option<String>>>,
}

/// A speech job as the backend sends it: what the legacy workers get.
///
/// Floats are f64 only (Python has no f32: a float32 comes back as a
/// float64) and dyadic, so that their JSON text is exact both ways.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    id: u32,
    text: String,
    words: Vec<String>,
    /// Larger than 65 535 bytes: msgpack bin 32.
    #[serde(with = "serde_bytes")]
    audio: Vec<u8>,
    /// Every byte value: bin 16.
    #[serde(with = "serde_bytes")]
    header: Vec<u8>,
    #[serde(with = "serde_bytes")]
    empty: Vec<u8>,
    /// An array of bins.
    chunks: Vec<ByteBuf>,
    widths: Widths,
    floats: Vec<f64>,
    yes: bool,
    no: bool,
    missing: Option<String>,
    matrix: Vec<Vec<i32>>,
    echo: Speaker,
}

fn job(id: u32) -> Job {
    Job {
        id,
        text: format!("héllo wörld — 你好, 世界 🎤 #{id}"),
        words: vec!["α".into(), String::new(), "日本語".into(), "Ñandú".into()],
        audio: (0..70_000u32).map(|i| (i * 7 + id) as u8).collect(),
        header: (0..=255u8).rev().chain(0..=255).collect(),
        empty: Vec::new(),
        chunks: vec![
            ByteBuf::from(vec![0u8, 0xff, 0x80]),
            ByteBuf::from(Vec::new()),
            ByteBuf::from("RIFF".as_bytes().to_vec()),
        ],
        widths: Widths {
            u8_max: u8::MAX,
            u16_max: u16::MAX,
            u32_max: u32::MAX,
            u64_max: u64::MAX,
            i8_min: i8::MIN,
            i16_min: i16::MIN,
            i32_min: i32::MIN,
            i64_min: i64::MIN,
            negative_fixint: -5,
            zero: 0,
        },
        floats: vec![0.5, -1.5, 1024.125, 0.0009765625, 12_345_678.5, 0.0],
        yes: true,
        no: false,
        missing: None,
        matrix: vec![vec![1, -2, 3], vec![], vec![i32::MAX]],
        echo: Speaker {
            name: "Zoë 🗣".into(),
            scores: [("en".to_string(), 0.75), ("zh".to_string(), 0.125)].into(),
            aliases: vec!["z".into(), "ゾーイ".into()],
            nothing: BTreeMap::new(),
            deeper: [(
                "levels".to_string(),
                vec![Some("one".into()), None, Some("三".into())],
            )]
            .into(),
        },
    }
}

/// The demo service's reply: `msg`, the request's `echo` value when it has
/// one, and (in these tests) the whole request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct DemoReply {
    msg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    echo: Option<Speaker>,
    request: Job,
}

fn demo_reply(request: Job) -> DemoReply {
    DemoReply {
        msg: "hello from service".into(),
        echo: Some(request.echo.clone()),
        request,
    }
}

// ------------------------------------------------------- msgpack and JSON

/// A value as msgpack puts it on the wire, written as the library writes it.
fn wire_value<T: Serialize>(value: &T) -> rmpv::Value {
    let bytes = Format::MsgPack.encode(value).unwrap();
    read_wire(&bytes)
}

fn read_wire(mut bytes: &[u8]) -> rmpv::Value {
    let value = rmpv::decode::read_value(&mut bytes)
        .unwrap_or_else(|e| panic!("the body is not msgpack: {e}"));
    assert!(
        bytes.is_empty(),
        "{} bytes after the msgpack value",
        bytes.len()
    );
    value
}

/// The JSON form the Python caller reads and prints: bin as
/// `{"$bytes": "<hex>"}`.
fn json_of(value: &rmpv::Value) -> serde_json::Value {
    use rmpv::Value as V;
    match value {
        V::Nil => serde_json::Value::Null,
        V::Boolean(b) => json!(b),
        V::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => json!(u),
            (None, Some(n)) => json!(n),
            (None, None) => unreachable!("a msgpack integer is a u64 or an i64"),
        },
        V::F32(f) => json!(f64::from(*f)),
        V::F64(f) => json!(f),
        V::String(s) => json!(s.as_str().expect("test strings are UTF-8")),
        V::Binary(b) => json!({ "$bytes": hex(b) }),
        V::Array(items) => items.iter().map(json_of).collect(),
        V::Map(entries) => entries
            .iter()
            .map(|(k, v)| {
                let key = k.as_str().expect("test map keys are strings");
                (key.to_owned(), json_of(v))
            })
            .collect::<serde_json::Map<_, _>>()
            .into(),
        V::Ext(..) => panic!("no msgpack ext values in these tests"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ------------------------------------------------------------ Python peers

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("python")
        .join(name)
}

fn python(name: &str) -> Command {
    let mut command = Command::new("python3");
    command
        .arg("-u")
        .arg(script(name))
        // The URL (with its password) goes through the environment, not the
        // command line other users of the machine can read.
        .env("AMQP_ADDR", amqp_addr())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

fn spawn(mut command: Command, what: &str) -> Child {
    command.spawn().unwrap_or_else(|e| {
        panic!("cannot run python3 for {what} (python3 with pika and msgpack is needed): {e}")
    })
}

const PYTHON_HINT: &str =
    "python3 needs pika and msgpack (scripts/test-all installs them: pip install pika msgpack)";

/// The legacy worker running on a queue until dropped (which kills it).
struct PythonServer {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
}

impl PythonServer {
    /// Starts the worker and waits until it consumes its queue.
    async fn start(queue: &str) -> PythonServer {
        let mut command = python("legacy_server.py");
        command.arg(queue);
        let mut child = spawn(command, "the legacy worker");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = collect(child.stderr.take().unwrap());
        let mut server = PythonServer {
            child,
            lines,
            stderr,
        };
        let ready = server
            .next_line("the Python worker to consume its queue")
            .await;
        assert_eq!(ready, "ready", "the Python worker said {ready:?}");
        server
    }

    async fn next_line(&mut self, what: &str) -> String {
        let line = within(30, what, self.lines.next_line()).await;
        match line {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => panic!(
                "the Python worker stopped while waiting for {what} ({PYTHON_HINT}); its stderr:\n{}",
                self.stderr.lock().unwrap()
            ),
        }
    }

    /// What the worker saw of the next request it served.
    async fn next_served(&mut self) -> serde_json::Value {
        let line = self.next_line("the Python worker to serve a request").await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }

    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

fn collect(mut stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes).await;
        sink.lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(&bytes));
    });
    text
}

/// What one run of the legacy caller came to.
struct ClientRun {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl ClientRun {
    /// The reply it printed, failing the test when it got none.
    fn reply(&self) -> serde_json::Value {
        assert!(
            self.status.success(),
            "the Python caller failed ({}; {PYTHON_HINT}): {}{}",
            self.status,
            self.stdout,
            self.stderr
        );
        let line = self.stdout.trim();
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }

    /// The reply's properties that were set, as the caller printed them.
    fn reply_properties(&self) -> serde_json::Map<String, serde_json::Value> {
        let line = self
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("reply properties: "))
            .unwrap_or_else(|| panic!("no reply properties in {:?}", self.stderr));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }
}

/// Runs the legacy caller once: `request` to `queue`.
async fn python_call(queue: &str, request: &serde_json::Value) -> ClientRun {
    let mut command = python("legacy_client.py");
    // On standard input: the audio alone is longer than a command-line
    // argument may be.
    command
        .arg(queue)
        .arg("-")
        .env("RPC_TIMEOUT_SECS", "30")
        .stdin(Stdio::piped());
    let mut child = spawn(command, "the legacy caller");
    let mut stdin = child.stdin.take().unwrap();
    let request = request.to_string();
    let out = within(60, "the Python caller", async move {
        stdin.write_all(request.as_bytes()).await.unwrap();
        drop(stdin);
        child.wait_with_output().await
    })
    .await
    .unwrap();
    ClientRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ----------------------------------------------------------------- queues

fn fresh_queue(what: &str) -> (String, QueueCleanup) {
    let queue = fresh(&format!("interop.{what}"));
    let cleanup = QueueCleanup::new(&[&queue]);
    (queue, cleanup)
}

async fn delete_queue_in_time(conn: &dyn Connection, queue: &str) {
    within(30, "deleting the queue", delete_queue(conn, queue)).await;
}

// ------------------------------------------- Rust client, Python worker

/// Calls the Python worker with several jobs in flight at once and checks
/// every reply, byte for byte as msgpack values, and what the worker saw.
async fn rust_client_calls_python_worker(
    what: &str,
    amqp: AmqpOptions,
    client: RpcClientOptions,
    reply_to_prefix: &str,
) {
    let (queue, _guard) = fresh_queue(what);
    let mut worker = PythonServer::start(&queue).await;
    let conn = connect_with(amqp).await;
    let client = RpcClient::with_options(conn.clone(), client).await.unwrap();

    let calls = (1..=4).map(|id| {
        let client = &client;
        let queue = &queue;
        async move {
            let request = Format::MsgPack.to_message(&job(id)).unwrap();
            let reply = client.call_raw(queue, request).await.unwrap();
            (id, reply)
        }
    });
    let replies = within(60, "the replies", futures::future::join_all(calls)).await;
    for (id, reply) in replies {
        assert_eq!(
            read_wire(&reply.body),
            wire_value(&demo_reply(job(id))),
            "the reply to job {id} is not the demo reply echoing the request"
        );
        let typed: DemoReply = decode_message(&reply).unwrap();
        assert_eq!(typed, demo_reply(job(id)));
        assert_eq!(
            reply.properties.content_type, None,
            "the legacy worker sets no content type"
        );
    }

    let mut correlation_ids = Vec::new();
    for _ in 0..4 {
        let seen = worker.next_served().await;
        let reply_to = seen["reply_to"].as_str().unwrap();
        assert!(
            reply_to.starts_with(reply_to_prefix),
            "reply_to {reply_to:?} should start with {reply_to_prefix:?}"
        );
        assert_eq!(
            seen["content_type"],
            serde_json::Value::Null,
            "a legacy request has no content type"
        );
        let id = seen["correlation_id"].as_str().unwrap().to_owned();
        let uuid = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(
            (id.len(), uuid.get_version_num()),
            (36, 4),
            "{id:?} is not a UUID4 string with dashes"
        );
        correlation_ids.push(id);
    }
    correlation_ids.sort();
    correlation_ids.dedup();
    assert_eq!(
        correlation_ids.len(),
        4,
        "each call has its own correlation id"
    );

    worker.stop().await;
    delete_queue_in_time(&*conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_with_direct_reply_to_calls_a_python_worker() {
    rust_client_calls_python_worker(
        "direct",
        AmqpOptions::default(),
        RpcClientOptions::default(),
        "amq.rabbitmq.reply-to.",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_with_classic_reply_queue_calls_a_python_worker() {
    rust_client_calls_python_worker(
        "classic",
        AmqpOptions::default(),
        RpcClientOptions::default().classic_reply_queue(true),
        "amq.gen-",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_on_a_classic_reply_mode_connection_calls_a_python_worker() {
    rust_client_calls_python_worker(
        "classic-mode",
        AmqpOptions::default().with_reply_mode(ReplyMode::Classic),
        RpcClientOptions::default(),
        "amq.gen-",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_sends_any_value_a_python_worker_echoes() {
    let (queue, _guard) = fresh_queue("values");
    let mut worker = PythonServer::start(&queue).await;
    let conn = connect().await;
    let client = RpcClient::new(conn.clone()).await.unwrap();

    // Requests that are not maps, and a map whose "echo" is nil: the worker
    // answers each, echoing only a map's "echo".
    let requests: Vec<rmpv::Value> = vec![
        rmpv::Value::from("just a string ✓"),
        rmpv::Value::from(12),
        rmpv::Value::Nil,
        rmpv::Value::Array(vec![rmpv::Value::Binary(vec![1, 2]), 1.5.into()]),
        rmpv::Value::Map(vec![
            ("x".into(), 12.into()),
            ("echo".into(), rmpv::Value::Nil),
        ]),
    ];
    for request in requests {
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, &request).unwrap();
        let reply = within(
            30,
            "the reply",
            client.call_raw(&queue, bus_core::Message::new(body)),
        )
        .await
        .unwrap();
        let mut expected = vec![("msg".into(), "hello from service".into())];
        if let Some(echo) = request
            .as_map()
            .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("echo")))
        {
            expected.push(("echo".into(), echo.1.clone()));
        }
        expected.push(("request".into(), request.clone()));
        assert_eq!(read_wire(&reply.body), rmpv::Value::Map(expected));
        worker.next_served().await;
    }

    worker.stop().await;
    delete_queue_in_time(&*conn, &queue).await;
}

// ------------------------------------------- Python caller, Rust server

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_caller_calls_a_rust_server_with_a_typed_handler() {
    let (queue, _guard) = fresh_queue("rust-server");
    let conn = connect().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let server = RpcServer::builder(conn.clone(), queue.clone())
        .serve(move |request: Job| {
            let seen_tx = seen_tx.clone();
            async move {
                let _ = seen_tx.send(request.clone());
                Ok::<_, Error>(demo_reply(request))
            }
        })
        .await
        .unwrap();

    for id in [7, 8] {
        let run = python_call(&queue, &json_of(&wire_value(&job(id)))).await;
        let reply = run.reply();
        assert_eq!(reply, json_of(&wire_value(&demo_reply(job(id)))));
        // As the legacy workers answer: the correlation id and nothing else.
        let properties = run.reply_properties();
        assert_eq!(
            properties.keys().collect::<Vec<_>>(),
            ["correlation_id"],
            "{properties:?}"
        );
        assert_eq!(
            properties["correlation_id"].as_str().map(str::len),
            Some(36)
        );
        // And what the typed handler decoded is the job, field for field.
        let request = within(5, "the handler's request", seen.recv()).await;
        assert_eq!(request, Some(job(id)));
    }

    within(30, "the server to stop", server.shutdown())
        .await
        .unwrap();
    delete_queue_in_time(&*conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_handler_errors_reach_a_python_caller_as_a_map() {
    let (queue, _guard) = fresh_queue("errors");
    let conn = connect().await;
    let server = RpcServer::builder(conn.clone(), queue.clone())
        .serve(|request: Job| async move {
            Err::<DemoReply, _>(format!("model exploded on job {} — ünïcødé", request.id))
        })
        .await
        .unwrap();

    let run = python_call(&queue, &json_of(&wire_value(&job(3)))).await;
    assert_eq!(
        run.reply(),
        json!({ "error": "model exploded on job 3 — ünïcødé" })
    );
    // The header a Rust caller turns into Error::Remote; the legacy caller
    // ignores it.
    let properties = run.reply_properties();
    assert_eq!(
        properties["headers"][ERROR_HEADER],
        json!("model exploded on job 3 — ünïcødé"),
        "{properties:?}"
    );

    // A request the typed handler cannot take gets an error map too.
    let run = python_call(&queue, &json!("not a job")).await;
    let reply = run.reply();
    let error = reply["error"].as_str().unwrap_or_else(|| {
        panic!("expected {{\"error\": text}}, got {reply}");
    });
    assert!(
        error.starts_with("the request cannot be decoded"),
        "{error:?}"
    );
    assert_eq!(reply.as_object().unwrap().len(), 1, "{reply}");

    within(30, "the server to stop", server.shutdown())
        .await
        .unwrap();
    delete_queue_in_time(&*conn, &queue).await;
}

// ------------------------------------------------ mixed workers, one queue

#[derive(Clone, Copy, Debug)]
enum FirstDeclarer {
    Python,
    Rust,
}

/// One Python and one Rust worker on one queue, each declaring it its own
/// way (which must be the same way, or the second gets
/// PRECONDITION_FAILED), and a Rust client's calls all answered by the two.
async fn python_and_rust_workers_share_a_queue(first: FirstDeclarer) {
    let (queue, _guard) = fresh_queue(&format!("shared-{first:?}"));
    let conn = connect().await;
    let rust_served = Arc::new(AtomicUsize::new(0));
    let start_rust = || {
        let counter = rust_served.clone();
        RpcServer::builder(conn.clone(), queue.clone()).serve(move |request: Job| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Error>(demo_reply(request)) }
        })
    };
    let (mut python, rust) = match first {
        FirstDeclarer::Python => {
            let python = PythonServer::start(&queue).await;
            let rust = start_rust()
                .await
                .expect("the Rust server declares the queue as the Python one did");
            (python, rust)
        }
        FirstDeclarer::Rust => {
            let rust = start_rust().await.unwrap();
            let python = PythonServer::start(&queue).await;
            (python, rust)
        }
    };

    let client = RpcClient::new(conn.clone()).await.unwrap();
    const CALLS: u32 = 20;
    let calls = (1..=CALLS).map(|id| {
        let client = &client;
        let queue = &queue;
        async move { (id, client.call::<_, DemoReply>(queue, &job(id)).await) }
    });
    let replies = within(60, "the replies", futures::future::join_all(calls)).await;
    for (id, reply) in replies {
        assert_eq!(reply.unwrap(), demo_reply(job(id)), "call {id}");
    }

    let by_rust = rust_served.load(Ordering::SeqCst);
    let by_python = CALLS as usize - by_rust;
    for _ in 0..by_python {
        python.next_served().await;
    }
    assert!(
        by_rust > 0 && by_python > 0,
        "both workers should have served: Rust {by_rust}, Python {by_python}"
    );

    within(30, "the Rust server to stop", rust.shutdown())
        .await
        .unwrap();
    python.stop().await;
    delete_queue_in_time(&*conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_worker_joins_a_python_worker_on_its_queue() {
    python_and_rust_workers_share_a_queue(FirstDeclarer::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_joins_a_rust_worker_on_its_queue() {
    python_and_rust_workers_share_a_queue(FirstDeclarer::Rust).await;
}
