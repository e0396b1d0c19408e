//! Running the built `bus` binary as a user would, against RabbitMQ
//! (`AMQP_ADDR`, default the local broker) or a `file://` folder.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The broker the tests use.
pub fn amqp_url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A fresh name.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The `bus` command with `BUS_URL` set.
pub fn bus(url: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bus"));
    c.env("BUS_URL", url).env_remove("AMQP_URL");
    c
}

/// Runs `bus ARGS` to the end.
pub fn run(url: &str, args: &[&str]) -> Output {
    bus(url)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run bus")
}

/// Runs `bus ARGS` with `input` on stdin.
pub fn run_with_input(url: &str, args: &[&str], input: &[u8]) -> Output {
    let mut child = bus(url)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bus");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    child.wait_with_output().expect("wait bus")
}

/// Runs `bus ARGS`, asserts exit 0, returns stdout.
pub fn ok(url: &str, args: &[&str]) -> String {
    let out = run(url, args);
    assert_success(&out, args);
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Asserts exit 0 with the output in the message otherwise.
pub fn assert_success(out: &Output, what: &[&str]) {
    assert!(
        out.status.success(),
        "bus {what:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The exit code and stderr of `bus ARGS`.
pub fn code(url: &str, args: &[&str]) -> (i32, String) {
    let out = run(url, args);
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The ready-message count of a queue, through `bus inspect --json`.
pub fn ready(url: &str, queue: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&ok(url, &["inspect", queue, "--json"])).expect("inspect json");
    v["messages"].as_u64().expect("messages")
}

/// Polls `cond` until it holds or `limit` passes (then panics with `what`).
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Takes `n` messages off a queue (acked) as JSON objects, waiting for them
/// up to `limit`.
pub fn take(url: &str, queue: &str, n: usize, limit: Duration) -> Vec<serde_json::Value> {
    let mut child =
        Background::start(bus(url).args(["consume", queue, "--json", "--count", &n.to_string()]));
    let mut got = Vec::new();
    while got.len() < n {
        let line = child
            .next_line(limit)
            .unwrap_or_else(|| panic!("only {} of {n} messages from {queue}", got.len()));
        got.push(serde_json::from_str(&line).expect("a JSON line"));
    }
    let status = child.wait(limit);
    assert!(status.success(), "consume exited {status:?}");
    got
}

/// A process in the background whose stdout lines arrive on a channel
/// (and whose stderr is kept). Killed when dropped.
pub struct Background {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Background {
    /// Starts `cmd` with piped stdout and stderr.
    pub fn start(cmd: &mut Command) -> Background {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (etx, stderr) = mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if etx.send(line).is_err() {
                    break;
                }
            }
        });
        Background {
            child,
            lines,
            stderr,
        }
    }

    /// The next stdout line, waiting up to `limit`.
    pub fn next_line(&mut self, limit: Duration) -> Option<String> {
        self.lines.recv_timeout(limit).ok()
    }

    /// Waits for a stderr line containing `needle`, up to `limit`.
    pub fn wait_stderr(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no stderr line with {needle:?} within {limit:?}"),
            }
        }
    }

    /// Every standard-error line not read yet, up to its end: for a
    /// process that has exited (after [`Background::wait`]). The reader
    /// thread may still be forwarding its last lines, so this waits for
    /// the pipe's end of file, up to a minute, rather than taking only
    /// what has arrived.
    pub fn stderr_lines(&mut self) -> Vec<String> {
        const LIMIT: Duration = Duration::from_secs(60);
        let deadline = Instant::now() + LIMIT;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return lines,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "standard error still open {LIMIT:?} after the process exited: {lines:?}"
                    )
                }
            }
        }
    }

    /// Sends a signal (`libc`-free: through `kill`).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
    }

    /// Waits for the process to exit, up to `limit` (then kills it and panics).
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("process did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The Python legacy peers of bus-amqp's interoperability tests.
pub fn python_peer(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bus-amqp/tests/python")
        .join(name)
}

/// Asserts the Python peers' libraries are installed (scripts/test-all
/// installs them): the tests that need them fail, never skip.
pub fn require_python() {
    let st = Command::new("python3")
        .args(["-c", "import pika, msgpack"])
        .status()
        .expect("python3 is needed by the legacy interoperability tests");
    assert!(
        st.success(),
        "python3 with pika and msgpack is needed (scripts/test-all installs them)"
    );
}

/// Names of the plain files (not hidden, not folders) in `dir`, sorted.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
