//! `bus work --exec`: a program behind a queue, its environment, its
//! concurrency, retries and the poison queue (the worker runtime's policy),
//! and a clean stop.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

const LIMIT: Duration = Duration::from_secs(60);

struct Worker {
    url: String,
    queue: String,
    output: String,
    process: Background,
}

impl Worker {
    fn start(url: &str, exec: &str, extra: &[&str]) -> Worker {
        let queue = unique("cli-work");
        let output = format!("{queue}.out");
        ok(url, &["declare", "queue", &queue, "--durable"]);
        ok(url, &["declare", "queue", &output, "--durable"]);
        let process = Background::start(
            bus(url)
                .args(["work", &queue, "--exec", exec, "--output-queue", &output])
                .args(extra),
        );
        // Started once it consumes (its poison queue is declared by then).
        wait_until(LIMIT, "the worker to consume", || {
            let v: Value = serde_json::from_str(&ok(url, &["inspect", &queue, "--json"])).unwrap();
            v["consumers"] == 1
        });
        Worker {
            url: url.to_owned(),
            queue,
            output,
            process,
        }
    }

    fn error_queue(&self) -> String {
        format!("{}.error", self.queue)
    }

    fn stop(mut self) {
        self.process.signal("TERM");
        assert_eq!(self.process.wait(LIMIT).code(), Some(0));
        for q in [&self.queue, &self.output, &self.error_queue()] {
            ok(&self.url, &["delete", "queue", q]);
        }
    }
}

#[test]
fn the_program_gets_the_body_on_stdin_and_the_properties_in_its_environment() {
    let url = amqp_url();
    let w = Worker::start(
        &url,
        r#"printf '%s|%s|%s|%s|%s|%s|' "$BUS_QUEUE" "$BUS_ROUTING_KEY" "$BUS_REDELIVERED" "$BUS_CORRELATION_ID" "$BUS_HEADER_LANG" "$BUS_ATTEMPT"; cat; printf '|'; cat {file}"#,
        &[],
    );
    ok(
        &url,
        &[
            "publish",
            "-q",
            &w.queue,
            "--correlation-id",
            "c-9",
            "--header",
            "lang=en",
            "the body",
        ],
    );
    let out = take(&url, &w.output, 1, LIMIT);
    assert_eq!(
        out[0]["body"],
        format!("{q}|{q}|0|c-9|en|1|the body|the body", q = w.queue)
    );
    assert_eq!(out[0]["properties"]["correlation_id"], "c-9");
    assert_eq!(ready(&url, &w.queue), 0, "acked");
    w.stop();
}

#[test]
fn a_program_that_fails_once_is_retried_and_then_succeeds() {
    let url = amqp_url();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("failed-once");
    let exec = format!(
        "cat >/dev/null; if [ -e {m} ]; then echo \"attempt $BUS_ATTEMPT\"; else touch {m}; echo 'flaky' >&2; exit 1; fi",
        m = mark.display()
    );
    let w = Worker::start(&url, &exec, &["--retries", "1", "--delays", "none"]);
    ok(&url, &["publish", "-q", &w.queue, "job"]);
    let out = take(&url, &w.output, 1, LIMIT);
    assert_eq!(out[0]["body"], "attempt 2\n");
    assert!(mark.exists());
    assert_eq!(ready(&url, &w.queue), 0);
    assert_eq!(ready(&url, &w.error_queue()), 0, "not poisoned");
    w.stop();
}

#[test]
fn a_program_that_always_fails_is_retried_then_poisoned_with_why() {
    let url = amqp_url();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("attempts");
    let exec = format!(
        "cat >/dev/null; echo $BUS_ATTEMPT >> {l}; echo 'model not loaded' >&2; exit 3",
        l = log.display()
    );
    // One in-process retry, one delayed retry through the broker: 4 attempts.
    let w = Worker::start(&url, &exec, &["--retries", "1", "--delays", "200ms"]);
    ok(
        &url,
        &[
            "publish",
            "-q",
            &w.queue,
            "--header",
            "x-legacy-file=job7.wav",
            "--persistent",
            "audio",
        ],
    );
    let poisoned = take(&url, &w.error_queue(), 1, LIMIT);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "1\n2\n3\n4\n",
        "each attempt ran once"
    );
    let m = &poisoned[0];
    assert_eq!(m["body"], "audio", "the original body");
    assert_eq!(
        m["properties"]["delivery_mode"], 2,
        "the original properties"
    );
    let h = &m["headers"];
    assert_eq!(h["x-legacy-file"], "job7.wav", "the original headers");
    let why = h["x-bus-error"].as_str().unwrap();
    assert!(
        why.contains("exited with code 3") && why.contains("model not loaded"),
        "{why}"
    );
    assert_eq!(h["x-bus-reason"], "exhausted");
    assert_eq!(h["x-bus-attempts"], 4);
    assert_eq!(h["x-bus-original-routing-key"], w.queue.as_str());
    assert_eq!(h["x-bus-original-exchange"], "");
    assert!(h["x-bus-worker"].as_str().is_some_and(|s| !s.is_empty()));
    // Not redelivered in a loop: the source queue is empty, nothing came out.
    assert_eq!(ready(&url, &w.queue), 0);
    assert_eq!(ready(&url, &w.output), 0);
    w.stop();
}

#[test]
fn a_permanent_exit_code_poisons_at_once() {
    let url = amqp_url();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("attempts");
    let exec = format!(
        "cat >/dev/null; echo $BUS_ATTEMPT >> {l}; exit 65",
        l = log.display()
    );
    let w = Worker::start(&url, &exec, &["--permanent-exit", "65"]);
    ok(&url, &["publish", "-q", &w.queue, "bad input"]);
    let poisoned = take(&url, &w.error_queue(), 1, LIMIT);
    assert_eq!(poisoned[0]["headers"]["x-bus-reason"], "permanent");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "1\n", "no retry");
    w.stop();
}

#[test]
fn concurrency_runs_that_many_processes_at_once() {
    let url = amqp_url();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // Each run announces itself and waits (bounded) until three are running:
    // with fewer at once, they time out and fail.
    let exec = format!(
        "touch {d}/$BUS_MESSAGE_ID; i=0; while [ $(ls {d} | wc -l) -lt 3 ]; do i=$((i+1)); \
         [ $i -gt 400 ] && exit 1; sleep 0.05; done; echo ok"
    );
    let w = Worker::start(&url, &exec, &["--concurrency", "3"]);
    for i in 0..3 {
        ok(
            &url,
            &[
                "publish",
                "-q",
                &w.queue,
                "--message-id",
                &format!("m{i}"),
                "x",
            ],
        );
    }
    let out = take(&url, &w.output, 3, LIMIT);
    assert!(out.iter().all(|m| m["body"] == "ok\n"), "{out:?}");
    assert_eq!(ready(&url, &w.error_queue()), 0);
    w.stop();
}

#[test]
fn sigterm_lets_the_running_program_finish() {
    let url = amqp_url();
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let release = dir.path().join("release");
    let exec = format!(
        "touch {s}; i=0; while [ ! -e {r} ]; do i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.05; done; echo finished",
        s = started.display(),
        r = release.display()
    );
    let mut w = Worker::start(&url, &exec, &[]);
    ok(&url, &["publish", "-q", &w.queue, "job"]);
    ok(&url, &["publish", "-q", &w.queue, "next"]);
    wait_until(LIMIT, "the program to start", || started.exists());
    w.process.signal("TERM");
    // Released only once the worker has stopped consuming (its consumer
    // is gone from the queue), so it cannot start "next" meanwhile.
    wait_until(LIMIT, "the worker to stop consuming", || {
        let v: Value = serde_json::from_str(&ok(&url, &["inspect", &w.queue, "--json"])).unwrap();
        v["consumers"] == 0
    });
    std::fs::write(&release, "").unwrap();
    assert_eq!(w.process.wait(LIMIT).code(), Some(0));
    let out = take(&url, &w.output, 1, LIMIT);
    assert_eq!(out[0]["body"], "finished\n");
    // The message not started went back to the queue.
    assert_eq!(ready(&url, &w.queue), 1);
    let left: Value = serde_json::from_str(&ok(&url, &["get", &w.queue, "--json"])).unwrap();
    assert_eq!(left["body"], "next");
    for q in [&w.queue, &w.output, &w.error_queue()] {
        ok(&url, &["delete", "queue", q]);
    }
}
