//! publish, get, consume, declare, bind, unbind, inspect, purge, delete,
//! topology apply and the exit codes, on RabbitMQ and on a folder.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

const LIMIT: Duration = Duration::from_secs(30);

/// RabbitMQ, and a fresh folder (kept alive by the returned guard).
fn transports() -> (Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = format!("file://{}", dir.path().join("bus").display());
    (vec![amqp_url(), file], dir)
}

#[test]
fn publish_then_get_and_consume_round_trip_every_property_as_json() {
    let (urls, _dir) = transports();
    for url in &urls {
        let q = unique("cli-props");
        ok(url, &["declare", "queue", &q, "--durable"]);
        ok(
            url,
            &[
                "publish",
                "--queue",
                &q,
                "héllo",
                "--persistent",
                "--header",
                "lang=en",
                "--header",
                "tries:=3",
                "--content-type",
                "text/plain",
                "--content-encoding",
                "identity",
                "--priority",
                "3",
                "--correlation-id",
                "c-1",
                "--reply-to",
                "back",
                "--expiration",
                "600000",
                "--message-id",
                "m-1",
                "--timestamp",
                "1700000000",
                "--type",
                "job",
                "--app-id",
                "cli-test",
            ],
        );
        // get leaves the message where it is.
        let first: Value = serde_json::from_str(&ok(url, &["get", &q, "--json"])).unwrap();
        assert_eq!(first["body"], "héllo", "{url}");
        assert_eq!(first["body_encoding"], "text");
        assert_eq!(first["routing_key"], q.as_str());
        assert_eq!(first["redelivered"], false);
        assert_eq!(first["headers"]["lang"], "en");
        assert_eq!(first["headers"]["tries"], 3);
        let p = &first["properties"];
        assert_eq!(p["delivery_mode"], 2);
        assert_eq!(p["content_type"], "text/plain");
        assert_eq!(p["content_encoding"], "identity");
        assert_eq!(p["priority"], 3);
        assert_eq!(p["correlation_id"], "c-1");
        assert_eq!(p["reply_to"], "back");
        assert_eq!(p["expiration"], "600000");
        assert_eq!(p["message_id"], "m-1");
        assert_eq!(p["timestamp"], 1_700_000_000u64);
        assert_eq!(p["type"], "job");
        assert_eq!(p["app_id"], "cli-test");
        assert_eq!(
            ready(url, &q),
            1,
            "get must leave the queue as it was ({url})"
        );

        // consume acks by default: the queue is empty afterwards.
        let got = take(url, &q, 1, LIMIT);
        assert_eq!(got[0]["body"], "héllo");
        assert_eq!(got[0]["redelivered"], true, "requeued by get");
        assert_eq!(ready(url, &q), 0);
        ok(url, &["delete", "queue", &q]);
    }
}

#[test]
fn bodies_come_from_arguments_files_stdin_and_lines_in_order() {
    let (urls, dir) = transports();
    let file = dir.path().join("body.bin");
    std::fs::write(&file, [0u8, 1, 2, 255]).unwrap();
    for url in &urls {
        let q = unique("cli-bodies");
        ok(url, &["declare", "queue", &q]);
        ok(
            url,
            &["publish", "-q", &q, "--file", file.to_str().unwrap()],
        );
        let out = run_with_input(url, &["publish", "-q", &q], b"from stdin");
        assert_success(&out, &["publish (stdin)"]);
        let lines: String = (1..=50).map(|i| format!("line {i}\n")).collect();
        let out = run_with_input(url, &["publish", "-q", &q, "--lines"], lines.as_bytes());
        assert_success(&out, &["publish --lines"]);
        let got = take(url, &q, 52, LIMIT);
        assert_eq!(got[0]["body_encoding"], "base64");
        assert_eq!(got[0]["body"], "AAEC/w==");
        assert_eq!(got[1]["body"], "from stdin");
        for (i, m) in got[2..].iter().enumerate() {
            assert_eq!(
                m["body"],
                format!("line {}", i + 1),
                "{url}: lines keep their order"
            );
        }
        ok(url, &["delete", "queue", &q]);
    }
}

#[test]
fn msgpack_bodies_are_python_packb_bytes_and_decode_back() {
    let (urls, _dir) = transports();
    for url in &urls {
        let q = unique("cli-msgpack");
        ok(url, &["declare", "queue", &q]);
        ok(
            url,
            &[
                "publish",
                "-q",
                &q,
                "--msgpack",
                r#"{"b":1,"a":[-1,2.5,"x"],"raw":{"$bytes":"00ff"}}"#,
            ],
        );
        let raw: Value =
            serde_json::from_str(&ok(url, &["get", &q, "--json", "--decode", "base64"])).unwrap();
        // msgpack.packb({"b": 1, "a": [-1, 2.5, "x"], "raw": b"\x00\xff"}), Python 3.11, msgpack 1.2.
        let want = [
            0x83, 0xa1, b'b', 0x01, 0xa1, b'a', 0x93, 0xff, 0xcb, 0x40, 0x04, 0, 0, 0, 0, 0, 0,
            0xa1, b'x', 0xa3, b'r', b'a', b'w', 0xc4, 0x02, 0x00, 0xff,
        ];
        use base64::Engine as _;
        let body = base64::engine::general_purpose::STANDARD
            .decode(raw["body"].as_str().unwrap())
            .unwrap();
        assert_eq!(body, want, "{url}");
        let decoded = take_decoded(url, &q);
        assert_eq!(decoded["body_encoding"], "msgpack");
        assert_eq!(
            decoded["body"],
            serde_json::json!({"a": [-1, 2.5, "x"], "b": 1, "raw": {"$bytes": "00ff"}})
        );
        ok(url, &["delete", "queue", &q]);
    }
}

fn take_decoded(url: &str, q: &str) -> Value {
    let out = ok(
        url,
        &[
            "consume", q, "--count", "1", "--json", "--decode", "msgpack",
        ],
    );
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn ack_modes_requeue_reject_and_no_ack() {
    let url = amqp_url();
    let q = unique("cli-modes");
    ok(&url, &["declare", "queue", &q]);
    for i in 0..3 {
        ok(&url, &["publish", "-q", &q, &format!("m{i}")]);
    }
    // requeue: printed, left in the queue.
    let out = ok(
        &url,
        &[
            "consume",
            &q,
            "-n",
            "3",
            "--json",
            "--ack-mode",
            "requeue",
            "--prefetch",
            "3",
        ],
    );
    assert_eq!(out.lines().count(), 3);
    assert_eq!(ready(&url, &q), 3);
    // get --ack takes them off.
    let out = ok(&url, &["get", &q, "--count", "2", "--ack", "--json"]);
    assert_eq!(out.lines().count(), 2);
    assert_eq!(ready(&url, &q), 1);
    // no-ack: gone once delivered.
    let out = ok(
        &url,
        &["consume", &q, "-n", "1", "--ack-mode", "no-ack", "--json"],
    );
    let m: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(m["body"].as_str().unwrap().starts_with('m'));
    assert_eq!(ready(&url, &q), 0);
    // get on an empty queue prints nothing and succeeds.
    assert_eq!(ok(&url, &["get", &q]), "");
    ok(&url, &["delete", "queue", &q]);
}

#[test]
fn exit_codes_are_the_documented_ones() {
    let url = amqp_url();
    // 4: unroutable (mandatory by default), to a missing queue and to an unbound exchange.
    let (c, err) = code(&url, &["publish", "-q", &unique("cli-missing"), "x"]);
    assert_eq!(c, 4, "{err}");
    assert!(err.contains("unroutable"), "{err}");
    let x = unique("cli-x");
    ok(&url, &["declare", "exchange", &x, "--type", "topic"]);
    let (c, err) = code(&url, &["publish", "-e", &x, "-k", "a.b", "x"]);
    assert_eq!(c, 4, "{err}");
    assert!(err.contains("bus bind"), "says what to do: {err}");
    // --no-mandatory drops it instead.
    assert_eq!(
        code(
            &url,
            &["publish", "-e", &x, "-k", "a.b", "--no-mandatory", "x"]
        )
        .0,
        0
    );
    ok(&url, &["delete", "exchange", &x]);
    // 2: usage.
    assert_eq!(code(&url, &["publish", "--no-such-flag"]).0, 2);
    assert_eq!(
        code(&url, &["publish", "-q", "q", "--header", "novalue", "x"]).0,
        2
    );
    assert_eq!(code(&url, &["frobnicate"]).0, 2);
    // 0: help, with examples, for every verb.
    for verb in [
        "publish", "consume", "get", "call", "work", "serve", "bridge", "declare", "bind",
        "unbind", "inspect", "purge", "delete", "topology", "bench",
    ] {
        let out = run(&url, &["help", verb]);
        assert_eq!(out.status.code(), Some(0), "help {verb}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example"),
            "bus help {verb} has an example:\n{text}"
        );
    }
    // 1: an error, e.g. inspecting a missing queue, with what to do.
    let (c, err) = code(&url, &["inspect", &unique("cli-none")]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn urls_memory_is_refused_unreachable_brokers_say_what_to_do_without_credentials() {
    let (c, err) = code("memory://x", &["inspect", "q"]);
    assert_eq!(c, 2);
    assert!(
        err.contains("memory://") && err.contains("amqp://"),
        "{err}"
    );
    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("amqp://someone:s3cr3t-pw@127.0.0.1:{port}/%2f");
    let (c, err) = code(&url, &["inspect", "q"]);
    assert_eq!(c, 1, "{err}");
    assert!(
        err.contains(&format!("cannot reach 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("is RabbitMQ running?"), "{err}");
    assert!(
        !err.contains("s3cr3t-pw") && !err.contains("someone"),
        "credentials printed: {err}"
    );
    // --url wins over BUS_URL.
    let out = support::bus("memory://x")
        .args(["--url", &url, "inspect", "q"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[test]
fn declare_bind_unbind_inspect_purge_delete() {
    let (urls, _dir) = transports();
    for url in &urls {
        let x = unique("cli-ex");
        let q = unique("cli-q");
        ok(
            url,
            &["declare", "exchange", &x, "--type", "topic", "--durable"],
        );
        ok(
            url,
            &[
                "declare",
                "queue",
                &q,
                "--durable",
                "--arg",
                "x-max-length:=100",
            ],
        );
        // The same declaration again is fine; another one is a clear error.
        ok(
            url,
            &[
                "declare",
                "queue",
                &q,
                "--durable",
                "--arg",
                "x-max-length:=100",
            ],
        );
        let (c, err) = code(url, &["declare", "queue", &q]);
        assert_eq!(c, 1, "{url}: {err}");
        assert!(err.contains("precondition"), "{err}");
        ok(url, &["bind", &q, &x, "--routing-key", "asr.*"]);
        ok(url, &["publish", "-e", &x, "-k", "asr.en", "one"]);
        ok(url, &["publish", "-e", &x, "-k", "asr.fr", "two"]);
        let info: Value = serde_json::from_str(&ok(url, &["inspect", &q, "--json"])).unwrap();
        assert_eq!(
            info,
            serde_json::json!({"queue": q, "messages": 2, "consumers": 0})
        );
        assert!(ok(url, &["inspect", &x, "--exchange"]).contains("exists"));
        assert_eq!(ok(url, &["purge", &q]).trim(), "2");
        ok(url, &["unbind", &q, &x, "--routing-key", "asr.*"]);
        assert_eq!(
            code(url, &["publish", "-e", &x, "-k", "asr.en", "x"]).0,
            4,
            "{url}: unbound"
        );
        ok(url, &["publish", "-q", &q, "left"]);
        assert_eq!(ok(url, &["delete", "queue", &q]).trim(), "1");
        ok(url, &["delete", "exchange", &x]);
        assert_eq!(code(url, &["inspect", &q]).0, 1);
        assert_eq!(code(url, &["inspect", &x, "--exchange"]).0, 1);
    }
}

#[test]
fn topology_apply_is_idempotent_and_reports_instead_of_failing_half_way() {
    let (urls, dir) = transports();
    for url in &urls {
        let x = unique("cli-topo-x");
        let q = unique("cli-topo-q");
        let dlq = unique("cli-topo-dlq");
        let file = dir.path().join(format!("{q}.toml"));
        std::fs::write(
            &file,
            format!(
                r#"
[[exchange]]
name = "{x}"
type = "topic"
durable = true

[[queue]]
name = "{dlq}"
durable = true

[[queue]]
name = "{q}"
durable = true
arguments = {{ x-max-priority = 5, x-dead-letter-exchange = "", x-dead-letter-routing-key = "{dlq}" }}

[[binding]]
queue = "{q}"
exchange = "{x}"
routing_key = "asr.#"
"#
            ),
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let first = ok(url, &["topology", "apply", f]);
        assert!(first.contains(&format!("created  exchange {x}")), "{first}");
        assert!(first.contains(&format!("created  queue {q}")), "{first}");
        assert!(first.contains("bound    binding"), "{first}");
        let second = ok(url, &["topology", "apply", f]);
        assert!(
            second.contains(&format!("exists   exchange {x}")),
            "{second}"
        );
        assert!(second.contains(&format!("exists   queue {q}")), "{second}");
        assert!(
            second.contains(&format!("exists   queue {dlq}")),
            "{second}"
        );
        ok(url, &["publish", "-e", &x, "-k", "asr.en.1", "routed"]);
        assert_eq!(ready(url, &q), 1);

        // A conflicting queue is reported; the rest is still applied.
        let other = unique("cli-topo-new");
        std::fs::write(
            &file,
            format!(
                "[[queue]]\nname = \"{q}\"\ndurable = false\n\n[[queue]]\nname = \"{other}\"\n"
            ),
        )
        .unwrap();
        let out = run(url, &["topology", "apply", f]);
        assert_eq!(out.status.code(), Some(1));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("conflict queue {q}")), "{text}");
        assert!(text.contains(&format!("created  queue {other}")), "{text}");
        // A malformed file changes nothing (checked before anything is declared).
        let bad = unique("cli-topo-bad");
        std::fs::write(
            &file,
            format!("[[queue]]\nname = \"{bad}\"\n\n[[queue]]\nname = \"x\"\narguments = {{ x-max-priority = \"high\" }}\n"),
        )
        .unwrap();
        assert_eq!(code(url, &["topology", "apply", f]).0, 2);
        assert_eq!(
            code(url, &["inspect", &bad]).0,
            1,
            "nothing declared from a bad file"
        );
        for n in [&q, &dlq, &other] {
            ok(url, &["delete", "queue", n]);
        }
        ok(url, &["delete", "exchange", &x]);
    }
}

#[test]
fn consume_stops_cleanly_on_sigterm() {
    let url = amqp_url();
    let q = unique("cli-sig");
    ok(&url, &["declare", "queue", &q]);
    ok(&url, &["publish", "-q", &q, "first"]);
    let mut c = Background::start(bus(&url).args(["consume", &q, "--json"]));
    let line = c.next_line(LIMIT).expect("a delivery");
    assert!(line.contains("first"));
    c.signal("TERM");
    let st = c.wait(LIMIT);
    assert_eq!(st.code(), Some(0));
    assert_eq!(ready(&url, &q), 0, "the message in hand was acked");
    ok(&url, &["delete", "queue", &q]);
}

#[test]
fn exchange_types_of_plugins_are_passed_on_and_unknown_ones_refused() {
    let (urls, _dir) = transports();
    for url in &urls {
        let x = unique("cli-plugin");
        // The default node has no plugin exchange types; a folder takes none.
        let (c, err) = code(
            url,
            &[
                "declare",
                "exchange",
                &x,
                "--type",
                "x-bus-cli-no-such-type",
            ],
        );
        assert_eq!(c, 1, "{url}: {err}");
        assert!(
            err.contains("not supported") && err.contains("x-bus-cli-no-such-type"),
            "{url}: {err}"
        );
        let (c, err) = code(url, &["inspect", "--exchange", &x]);
        assert_eq!(c, 1, "{url}: the refused exchange was created: {err}");
        assert!(err.contains("no exchange"), "{url}: {err}");
    }
    // A misspelt built-in type is a usage error naming what is accepted.
    let (c, err) = code(&urls[0], &["declare", "exchange", "x", "--type", "topc"]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("x-delayed-message"), "{err}");
}
