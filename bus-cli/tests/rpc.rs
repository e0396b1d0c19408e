//! `bus call` against the Python legacy server, `bus serve --exec` called
//! by the Python legacy client and by `bus call`, and the timeout exit code.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn call_talks_to_the_python_legacy_server() {
    require_python();
    let url = amqp_url();
    let q = unique("cli-legacy-server");
    let mut server = Background::start(
        Command::new("python3")
            .arg(python_peer("legacy_server.py"))
            .args([&q, "1"])
            .env("AMQP_ADDR", &url),
    );
    assert_eq!(server.next_line(LIMIT).as_deref(), Some("ready"));
    let request = r#"{"echo":"hé","audio":{"$bytes":"00017f80ff"},"n":[1,-2,3.5,null,true]}"#;
    let out = ok(&url, &["call", &q, request, "--timeout", "30"]);
    let reply: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(reply["msg"], "hello from service");
    assert_eq!(reply["echo"], "hé");
    assert_eq!(
        reply["request"],
        json!({"echo": "hé", "audio": {"$bytes": "00017f80ff"}, "n": [1, -2, 3.5, null, true]})
    );
    // What the server saw: the legacy request properties.
    let seen: Value = serde_json::from_str(&server.next_line(LIMIT).unwrap()).unwrap();
    assert_eq!(
        seen["content_type"],
        Value::Null,
        "msgpack without a content type"
    );
    assert!(seen["reply_to"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(
        seen["correlation_id"].as_str().map(str::len),
        Some(36),
        "a UUID4 string"
    );
    assert!(server.wait(LIMIT).success());
    ok(&url, &["delete", "queue", &q]);
}

#[test]
fn call_exits_3_on_timeout_and_4_when_nobody_serves() {
    let url = amqp_url();
    let q = unique("cli-silent");
    ok(&url, &["declare", "queue", &q]);
    let (c, err) = code(&url, &["call", &q, "{}", "--timeout", "0.5"]);
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("no reply"), "{err}");
    ok(&url, &["delete", "queue", &q]);
    let (c, err) = code(
        &url,
        &["call", &unique("cli-nobody"), "{}", "--timeout", "5"],
    );
    assert_eq!(c, 4, "{err}");
    let (c, _) = code(&url, &["call", &q, "{not json", "--timeout", "5"]);
    assert_eq!(c, 2);
}

fn serve(url: &str, q: &str, exec: &str, extra: &[&str]) -> Background {
    let mut s = Background::start(bus(url).args(["serve", q, "--exec", exec]).args(extra));
    s.wait_stderr("serving", LIMIT);
    s
}

const PY_SERVICE: &str = r#"python3 -c 'import json,os,sys; r=json.load(sys.stdin); print(json.dumps({"got": r, "queue": os.environ["BUS_QUEUE"], "corr": os.environ.get("BUS_CORRELATION_ID")}))'"#;

#[test]
fn serve_exec_is_called_by_the_python_legacy_client() {
    require_python();
    let url = amqp_url();
    let q = unique("cli-serve");
    let server = serve(&url, &q, PY_SERVICE, &["--msgpack", "--concurrency", "2"]);
    let out = Command::new("python3")
        .arg(python_peer("legacy_client.py"))
        .args([
            &q,
            r#"{"text":"ünïcode","data":{"$bytes":"00ff"},"n":[1,2]}"#,
        ])
        .env("AMQP_ADDR", &url)
        .env("RPC_TIMEOUT_SECS", "30")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(
        reply["got"],
        json!({"text": "ünïcode", "data": {"$bytes": "00ff"}, "n": [1, 2]})
    );
    assert_eq!(reply["queue"], q.as_str());
    assert_eq!(reply["corr"].as_str().map(str::len), Some(36));

    // A failing program is an error reply: `bus call` exits 1 and says why.
    drop(server);
    let mut server = serve(&url, &q, "echo broken >&2; exit 7", &["--msgpack"]);
    let (c, err) = code(&url, &["call", &q, "{}", "--timeout", "30"]);
    assert_eq!(c, 1, "{err}");
    assert!(
        err.contains("exited with code 7") && err.contains("broken"),
        "{err}"
    );
    server.signal("TERM");
    assert_eq!(server.wait(LIMIT).code(), Some(0));
    ok(&url, &["delete", "queue", &q]);
}

#[test]
fn serve_and_call_over_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let q = "upper";
    let mut server = serve(&url, q, "tr a-z A-Z", &[]);
    // Raw mode: stdin to stdout; `call` sends msgpack, so the reply is the
    // same msgpack with its ASCII letters upper-cased.
    let out = ok(&url, &["call", q, r#""abc""#, "--timeout", "30"]);
    assert_eq!(out.trim(), r#""ABC""#);
    server.signal("INT");
    assert_eq!(server.wait(LIMIT).code(), Some(0));
    let out = server.stderr_lines().join("\n");
    assert!(out.contains("served 1 requests"), "{out}");
}
