//! Every example, run as the program a user runs, checking its outcome:
//! - the RPC examples (`examples/rpc_server.rs`, `examples/rpc_client.rs`)
//!   against the legacy Python peers (`bus-amqp/tests/python/`: pika +
//!   msgpack, as the production workers and callers are written), over a
//!   real RabbitMQ: the Python caller calls the `rpc_server` example, and
//!   the `rpc_client` example calls the Python worker;
//! - `worker`, in memory and on RabbitMQ; `quickstart`, `topics` and
//!   `work_queue` in memory;
//! - the legacy folder pair: `legacy_worker` on folders, and
//!   `legacy_bridge` from a folder through RabbitMQ into a folder.
//!
//! The examples are built with `cargo build` first (a no-op when `cargo
//! test` already built them), and run as the programs a user runs.
//!
//! Needs RabbitMQ (`AMQP_ADDR`, default the local broker) and `python3` with
//! `pika` and `msgpack` (`scripts/test-all` installs them); fails, never
//! skips, without them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bus::{Connection, DeleteQueueOptions, QueueOptions};
use serde_json::{json, Value as Json};

fn amqp_addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

const PYTHON_HINT: &str =
    "python3 needs pika and msgpack (scripts/test-all installs them: pip install pika msgpack)";

// ------------------------------------------------------------- the broker

/// A connection of the test's own, for setting up and removing queues.
struct Broker {
    runtime: tokio::runtime::Runtime,
    conn: Arc<dyn Connection>,
}

impl Broker {
    fn connect() -> Broker {
        // A worker thread of its own keeps the connection's heartbeats going
        // while the test waits on other programs.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let conn = runtime
            .block_on(bus::connect(&amqp_addr()))
            .unwrap_or_else(|e| {
                panic!("RabbitMQ is not reachable ({e}); start it (rabbitmq-server -detached) or set AMQP_ADDR")
            });
        Broker { runtime, conn }
    }

    fn declare_queue(&self, queue: &str) {
        self.runtime
            .block_on(self.conn.declare_queue(queue, QueueOptions::default()))
            .unwrap();
    }

    fn delete_queue(&self, queue: &str) {
        self.runtime
            .block_on(self.conn.delete_queue(queue, DeleteQueueOptions::default()))
            .unwrap();
    }
}

/// Deletes the test's queue if the test fails before its own clean-up.
struct QueueGuard(String);

impl Drop for QueueGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("rabbitmqctl")
                .args(["delete_queue", &self.0])
                .output();
        }
    }
}

fn fresh_queue(what: &str) -> (String, QueueGuard) {
    let queue = format!("bus-examples-test.{what}.{}", uuid::Uuid::new_v4().simple());
    (queue.clone(), QueueGuard(queue))
}

// ---------------------------------------------------------- the examples

struct Examples {
    rpc_server: PathBuf,
    rpc_client: PathBuf,
    worker: PathBuf,
    quickstart: PathBuf,
    topics: PathBuf,
    work_queue: PathBuf,
    legacy_worker: PathBuf,
    legacy_bridge: PathBuf,
}

/// Builds the examples once per test run and returns their executables.
fn examples() -> &'static Examples {
    static EXAMPLES: OnceLock<Examples> = OnceLock::new();
    EXAMPLES.get_or_init(|| {
        let mut build = Command::new(env!("CARGO"));
        build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "-p", "bus", "--example", "rpc_server"])
            .args(["--example", "rpc_client", "--example", "worker"])
            .args(["--example", "quickstart", "--example", "topics"])
            .args(["--example", "work_queue", "--example", "legacy_worker"])
            .args(["--example", "legacy_bridge"])
            // The feature set `cargo test --all-features` built them with,
            // so this is a no-op then; the legacy examples need `file` and
            // `amqp`.
            .arg("--all-features")
            .arg("--message-format=json")
            .stdin(Stdio::null());
        // Generous: other builds may hold cargo's lock on the target folder.
        let out = run(build, None, 1800, "building the examples");
        assert!(
            out.status.success(),
            "cargo build of the examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut executables = HashMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(message) = serde_json::from_str::<Json>(line) else {
                continue;
            };
            if let (Some(name), Some(exe)) = (
                message["target"]["name"].as_str(),
                message["executable"].as_str(),
            ) {
                executables.insert(name.to_owned(), PathBuf::from(exe));
            }
        }
        let mut take = |name: &str| {
            executables.remove(name).unwrap_or_else(|| {
                panic!("cargo build did not report the {name} example's executable")
            })
        };
        Examples {
            rpc_server: take("rpc_server"),
            rpc_client: take("rpc_client"),
            worker: take("worker"),
            quickstart: take("quickstart"),
            topics: take("topics"),
            work_queue: take("work_queue"),
            legacy_worker: take("legacy_worker"),
            legacy_bridge: take("legacy_bridge"),
        }
    })
}

// ------------------------------------------------------------- processes

/// Runs a program to its end with `stdin` as its input, killing it and
/// failing the test if it takes longer than `secs`.
fn run(mut command: Command, stdin: Option<&str>, secs: u64, what: &str) -> Output {
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    if let Some(text) = stdin {
        let mut input = child.stdin.take().unwrap();
        input.write_all(text.as_bytes()).unwrap();
    }
    let pid = child.id();
    let (done, outcome) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match outcome.recv_timeout(Duration::from_secs(secs)) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what} failed to run: {e}")),
        Err(_) => {
            // Not reaped yet (its waiter thread still waits): the pid is
            // still this child's.
            kill(pid, libc::SIGKILL);
            panic!("timed out after {secs}s: {what}");
        }
    }
}

fn kill(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A long-running program whose output lines the test waits on. Dropping it
/// kills the program.
struct Running {
    name: &'static str,
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn start(name: &'static str, mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = err.read_to_end(&mut bytes);
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&bytes));
        });
        Running {
            name,
            child,
            lines,
            stderr,
        }
    }

    /// The next line it prints, within `secs`.
    fn next_line(&self, secs: u64, what: &str) -> String {
        match self.lines.recv_timeout(Duration::from_secs(secs)) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("timed out after {secs}s waiting for {}: {what}", self.name)
            }
            Err(RecvTimeoutError::Disconnected) => panic!(
                "{} ended while waiting for {what}; its stderr:\n{}",
                self.name,
                self.stderr.lock().unwrap()
            ),
        }
    }

    /// Sends `signal` and collects what it prints until it exits.
    fn stop_with(mut self, signal: libc::c_int, secs: u64) -> (ExitStatus, Vec<String>) {
        kill(self.child.id(), signal);
        let mut rest = Vec::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(secs)) {
                Ok(line) => rest.push(line),
                // Standard output closed: it is exiting.
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{} did not stop within {secs}s of the signal", self.name)
                }
            }
        }
        (self.child.wait().unwrap(), rest)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bus-amqp")
        .join("tests")
        .join("python")
        .join(name)
}

fn python(name: &str) -> Command {
    let mut command = Command::new("python3");
    command
        .arg("-u")
        .arg(python_script(name))
        .env("AMQP_ADDR", amqp_addr());
    command
}

fn example(path: &Path) -> Command {
    let mut command = Command::new(path);
    command.env("BUS_URL", amqp_addr());
    command
}

/// Runs the legacy Python caller once and returns the reply it printed.
fn python_call(queue: &str, request: &Json) -> Json {
    let mut command = python("legacy_client.py");
    command.args([queue, "-"]).env("RPC_TIMEOUT_SECS", "30");
    let out = run(command, Some(&request.to_string()), 60, "the Python caller");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python caller failed ({}; {PYTHON_HINT}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{stdout:?} is not JSON: {e}"))
}

/// A request with every kind of value the legacy peers exchange: nested
/// maps and arrays, binary data, unicode, integers of many sizes, floats,
/// booleans, nil.
fn rich_request() -> Json {
    json!({
        "x": 12,
        "text": "héllo wörld — 你好 🎤",
        "audio": { "$bytes": "52494646000102fffe80" },
        "sizes": [0, -1, 255, 65_536, u64::MAX, i64::MIN],
        "floats": [0.5, -1.5, 1024.125],
        "flags": [true, false, null],
        "echo": {
            "speaker": "Zoë",
            "scores": { "en": 0.75, "zh": 0.125 },
            "clips": [{ "$bytes": "" }, { "$bytes": "00ff" }],
            "empty": {}
        }
    })
}

// ------------------------------------------------------------------ tests

#[test]
fn python_caller_calls_the_rpc_server_example() {
    let broker = Broker::connect();
    let (queue, _guard) = fresh_queue("rpc-server");
    let server = Running::start("the rpc_server example", {
        let mut command = example(&examples().rpc_server);
        command.arg(&queue);
        command
    });
    let serving = server.next_line(60, "its first line");
    assert!(
        serving.starts_with(&format!("serving {queue:?} on amqp://***@")),
        "{serving:?}"
    );
    assert!(
        !serving.contains("guest:"),
        "credentials printed: {serving:?}"
    );

    let request = rich_request();
    assert_eq!(
        python_call(&queue, &request),
        json!({ "msg": "hello from service", "echo": request["echo"] })
    );
    assert!(server
        .next_line(10, "its line for request 1")
        .starts_with("request 1: "));
    for (n, plain) in [
        json!({ "x": 12 }),
        json!("not a map"),
        json!([1, { "echo": 2 }]),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            python_call(&queue, &plain),
            json!({ "msg": "hello from service" }),
            "{plain}"
        );
        let line = server.next_line(10, "its line for a request");
        assert!(
            line.starts_with(&format!("request {}: ", n + 2)),
            "{line:?}"
        );
    }
    assert_eq!(
        python_call(&queue, &json!({ "echo": null })),
        json!({ "msg": "hello from service", "echo": null })
    );

    // Ctrl-C: a graceful stop.
    let (status, rest) = server.stop_with(libc::SIGINT, 30);
    assert!(status.success(), "{status}; printed {rest:?}");
    assert_eq!(
        rest.last().map(String::as_str),
        Some("stopped after serving 5 requests"),
        "{rest:?}"
    );
    broker.delete_queue(&queue);
}

#[test]
fn rpc_client_example_calls_a_python_worker() {
    let broker = Broker::connect();
    let (queue, _guard) = fresh_queue("rpc-client");
    let worker = Running::start("the Python worker", {
        let mut command = python("legacy_server.py");
        command.arg(&queue);
        command
    });
    assert_eq!(
        worker.next_line(30, "its ready line"),
        "ready",
        "{PYTHON_HINT}"
    );

    let request = rich_request();
    let mut command = example(&examples().rpc_client);
    command.args([queue.as_str(), &request.to_string()]);
    let out = run(command, None, 60, "the rpc_client example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rpc_client failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout:?}");
    let reply: Json = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        reply,
        json!({ "msg": "hello from service", "echo": request["echo"], "request": request })
    );

    let seen: Json = serde_json::from_str(&worker.next_line(10, "its served line")).unwrap();
    assert_eq!(seen["content_type"], Json::Null, "{seen}");
    assert_eq!(
        seen["correlation_id"].as_str().map(str::len),
        Some(36),
        "{seen}"
    );
    drop(worker);
    broker.delete_queue(&queue);
}

#[test]
fn rpc_client_example_fails_clearly() {
    let broker = Broker::connect();
    let (queue, _guard) = fresh_queue("rpc-client-fails");
    let client = &examples().rpc_client;

    // No such queue: the request is unroutable.
    let mut command = example(client);
    command.args([queue.as_str(), "{}"]);
    let out = run(command, None, 60, "the rpc_client example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no queue"), "{stderr}");

    // A queue nobody serves: the call times out.
    broker.declare_queue(&queue);
    let mut command = example(client);
    command
        .args([queue.as_str(), "{}"])
        .env("RPC_TIMEOUT_SECS", "1");
    let out = run(command, None, 60, "the rpc_client example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no reply") && stderr.contains(&queue),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    // Not JSON.
    let mut command = example(client);
    command.args([queue.as_str(), "{oops"]);
    let out = run(command, None, 60, "the rpc_client example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not JSON"), "{stderr}");
    broker.delete_queue(&queue);
}

// ------------------------------------------------------------ the worker

/// Runs the `worker` example on `url` (the in-memory broker when `None`)
/// and checks that it showed every path and exited 0.
fn run_worker_example(url: Option<&str>) {
    let mut command = Command::new(&examples().worker);
    match url {
        Some(url) => command.env("BUS_URL", url),
        None => command.env_remove("BUS_URL"),
    };
    let out = run(command, None, 120, "the worker example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the worker example failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "job 3 on attempt 4",
        "poisoned (Permanent) after 1 attempt(s)",
        "poisoned (Undecodable) after 1 attempt(s)",
        "poisoned (Exhausted) after 6 attempt(s)",
        "every path checked",
    ] {
        assert!(
            stdout.contains(line),
            "the worker example did not print {line:?}:\n{stdout}"
        );
    }
}

#[test]
fn worker_example_shows_every_path_in_memory() {
    run_worker_example(None);
}

#[test]
fn worker_example_shows_every_path_on_rabbitmq() {
    run_worker_example(Some(&amqp_addr()));
}

/// Runs a self-checking example on the in-memory transport: it must exit 0
/// and print `expected`.
fn run_in_memory(path: &Path, what: &str, expected: &str) {
    let mut command = Command::new(path);
    command.env_remove("BUS_URL");
    let out = run(command, None, 120, what);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(expected),
        "{what} did not print {expected:?}:\n{stdout}"
    );
}

#[test]
fn quickstart_example_serves_every_job_despite_a_dead_worker() {
    run_in_memory(&examples().quickstart, "the quickstart example", "0 lost");
}

#[test]
fn topics_example_routes_as_bound() {
    run_in_memory(
        &examples().topics,
        "the topics example",
        "topic and fanout routing behaved as bound",
    );
}

#[test]
fn work_queue_example_redelivers_the_nacked_job() {
    run_in_memory(
        &examples().work_queue,
        "the work_queue example",
        "done exactly once; 1 redelivered",
    );
}

// ------------------------------------------------- the legacy folder pair

/// Drops `name` with `content` into `dir` the way a well-behaved legacy
/// writer does: written under a hidden name, then renamed in.
fn drop_file(dir: &Path, name: &str, content: &[u8]) {
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, content).unwrap();
    std::fs::rename(&partial, dir.join(name)).unwrap();
}

/// Waits until `path` exists with content, within `secs`: the program
/// writes it atomically, so its first appearance is its whole content.
fn wait_for_file(path: &Path, secs: u64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} did not appear within {secs}s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn legacy_worker_example_answers_each_dropped_file() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::create_dir_all(&input).unwrap();
    std::fs::create_dir_all(&output).unwrap();
    let worker = Running::start("the legacy_worker example", {
        let mut command = Command::new(&examples().legacy_worker);
        command.arg(&input).arg(&output);
        command
    });
    assert!(worker
        .next_line(60, "its serving line")
        .starts_with("serving "));

    let jobs: [(&str, &[u8]); 3] = [
        ("job1.wav", b"RIFF...."),
        ("job2.wav", b""),
        ("caf\u{e9} \"quoted\".wav", &[0xff; 300]),
    ];
    for (name, content) in jobs {
        drop_file(&input, name, content);
    }
    let mut served: Vec<String> = (0..jobs.len())
        .map(|_| worker.next_line(60, "a line per served file"))
        .collect();
    served.sort();
    for (name, content) in jobs {
        let stem = name.strip_suffix(".wav").unwrap();
        let result = output.join(format!("{stem}.json"));
        assert!(
            served.contains(&format!("{name} -> {}", result.display())),
            "no line for {name:?} in {served:?}"
        );
        let json: Json = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
        assert_eq!(json, json!({ "name": name, "bytes": content.len() }));
        // Consumed inputs move to IN/done/, whole.
        assert_eq!(
            std::fs::read(input.join("done").join(name)).unwrap(),
            content
        );
        assert!(!input.join(name).exists(), "{name} still waiting in IN");
    }
}

#[test]
fn legacy_bridge_example_carries_files_through_rabbitmq_and_back() {
    let broker = Broker::connect();
    // The example's own queue names: start from empty ones.
    for queue in ["legacy-bridge.requests", "legacy-bridge.results"] {
        broker.delete_queue(queue);
    }
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::create_dir_all(&input).unwrap();
    std::fs::create_dir_all(&output).unwrap();
    let bridge = Running::start("the legacy_bridge example", {
        let mut command = example(&examples().legacy_bridge);
        command.arg(&input).arg(&output);
        command
    });
    let first = bridge.next_line(60, "its bridging line");
    assert!(
        first.starts_with("bridging ") && !first.contains("guest:"),
        "{first:?}"
    );

    let jobs: [(&str, &[u8]); 2] = [("job42.wav", b"RIFF0123456789"), ("job43.wav", b"x")];
    for (name, content) in jobs {
        drop_file(&input, name, content);
    }
    let mut processed: Vec<String> = (0..jobs.len())
        .map(|_| bridge.next_line(60, "a line per processed job"))
        .collect();
    processed.sort();
    assert_eq!(processed, ["processed job42.wav", "processed job43.wav"]);
    for (name, content) in jobs {
        let stem = name.strip_suffix(".wav").unwrap();
        let json: Json =
            serde_json::from_str(&wait_for_file(&output.join(format!("{stem}.json")), 60)).unwrap();
        assert_eq!(json, json!({ "name": name, "bytes": content.len() }));
        // The input was acked (moved to IN/done/) once the broker confirmed.
        let done = input.join("done").join(name);
        assert_eq!(wait_for_file(&done, 60).as_bytes(), content);
    }
    drop(bridge);
    for queue in ["legacy-bridge.requests", "legacy-bridge.results"] {
        broker.delete_queue(queue);
    }
}
