//! The README's "From folders to RabbitMQ in four commands", run as
//! written there: the topology file and the commands are read from the
//! README (only the queue names are made unique for the shared broker).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

const LIMIT: Duration = Duration::from_secs(60);
const HEADING: &str = "## From folders to RabbitMQ in four commands";

/// The fenced blocks of the README section, as (language, text).
fn section_blocks() -> Vec<(String, String)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme.find(HEADING).expect("the README section");
    let rest = &readme[start + HEADING.len()..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            blocks.push((lang.to_owned(), body.join("\n")));
        }
    }
    blocks
}

/// The legacy script: reads the file it is given, prints a result.
const ASR_PY: &str = r#"import json, os, sys
path = sys.argv[1]
data = open(path, "rb").read()
print(json.dumps({"file": os.path.basename(path), "bytes": len(data)}))
"#;

struct Env {
    dir: tempfile::TempDir,
    url: String,
    prefix: String,
}

impl Env {
    /// A README command line as a process: `&` and the queue names adapted.
    fn command(&self, line: &str) -> Command {
        let line = line.trim().trim_end_matches('&').trim();
        let line = self.rename(line);
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_bus"))
            .parent()
            .unwrap()
            .to_owned();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!("exec {line}"))
            .current_dir(self.dir.path())
            .env("PATH", path)
            .env("BUS_URL", &self.url)
            .env("IN", self.dir.path().join("in"))
            .env("OUT", self.dir.path().join("out"));
        c
    }

    /// The README's queue names made unique.
    fn rename(&self, text: &str) -> String {
        text.replace("asr.requests", &format!("{}.requests", self.prefix))
            .replace("asr.results", &format!("{}.results", self.prefix))
    }

    fn drop_file(&self, name: &str, content: &[u8]) {
        // A legacy producer; renamed in so the test knows when it is complete.
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("in").join(name)).unwrap();
    }
}

#[test]
fn the_readme_migration_runs_as_written_and_rolls_back() {
    require_python();
    let blocks = section_blocks();
    let toml = &blocks
        .iter()
        .find(|(l, _)| l == "toml")
        .expect("a toml block")
        .1;
    let shells: Vec<&String> = blocks
        .iter()
        .filter(|(l, _)| l == "sh")
        .map(|(_, b)| b)
        .collect();
    assert_eq!(shells.len(), 2, "the forward and the rollback blocks");
    let forward: Vec<&str> = shells[0].lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(forward.len(), 4, "four commands: {forward:?}");
    let rollback: Vec<&str> = shells[1].lines().filter(|l| !l.trim().is_empty()).collect();

    let env = Env {
        dir: tempfile::tempdir().unwrap(),
        url: amqp_url(),
        prefix: unique("cli-mig"),
    };
    let p = &env.prefix;
    std::fs::create_dir(env.dir.path().join("in")).unwrap();
    std::fs::write(env.dir.path().join("speech.toml"), env.rename(toml)).unwrap();
    std::fs::write(env.dir.path().join("asr.py"), ASR_PY).unwrap();

    // 1. The topology (twice: idempotent).
    for _ in 0..2 {
        let out = env.command(forward[0]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let requests = format!("{p}.requests");
    let results = format!("{p}.results");
    // 2, 3, 4: the long-running ones.
    let mut inbound = Background::start(&mut env.command(forward[1]));
    let mut worker = Background::start(&mut env.command(forward[2]));
    let mut outbound = Background::start(&mut env.command(forward[3]));

    env.drop_file("job1.wav", &[1u8; 1000]);
    env.drop_file("job2.wav", &[2u8; 2000]);
    let out = env.dir.path().join("out");
    wait_until(LIMIT, "both results in $OUT", || {
        files_in(&out) == ["job1.json", "job2.json"]
    });
    let r1: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("job1.json")).unwrap()).unwrap();
    assert_eq!(r1, serde_json::json!({"file": "job1.wav", "bytes": 1000}));
    let r2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("job2.json")).unwrap()).unwrap();
    assert_eq!(r2, serde_json::json!({"file": "job2.wav", "bytes": 2000}));
    let done = env.dir.path().join("in/done");
    assert_eq!(files_in(&done), ["job1.wav", "job2.wav"]);

    // Rolling back: stop the worker, a request arrives meanwhile, stop the
    // input bridge, send what is queued back to the legacy folder.
    worker.signal("TERM");
    assert_eq!(worker.wait(LIMIT).code(), Some(0));
    env.drop_file("job3.wav", &[3u8; 3000]);
    wait_until(LIMIT, "job3 queued", || ready(&env.url, &requests) == 1);
    inbound.signal("TERM");
    assert_eq!(inbound.wait(LIMIT).code(), Some(0));
    assert_eq!(files_in(&done), ["job1.wav", "job2.wav", "job3.wav"]);

    assert_eq!(rollback.len(), 1, "{rollback:?}");
    let mut back = Background::start(&mut env.command(rollback[0]));
    let input = env.dir.path().join("in");
    wait_until(LIMIT, "job3.wav back in $IN", || {
        files_in(&input) == ["job3.wav"]
    });
    assert_eq!(
        std::fs::read(input.join("job3.wav")).unwrap(),
        vec![3u8; 3000]
    );
    wait_until(LIMIT, "the requests queue drained", || {
        ready(&env.url, &requests) == 0
    });
    back.signal("TERM");
    assert_eq!(back.wait(LIMIT).code(), Some(0));
    outbound.signal("TERM");
    assert_eq!(outbound.wait(LIMIT).code(), Some(0));
    assert_eq!(ready(&env.url, &results), 0);
    assert_eq!(
        ready(&env.url, &format!("{requests}.error")),
        0,
        "nothing failed"
    );

    for q in [&requests, &results, &format!("{requests}.error")] {
        ok(&env.url, &["delete", "queue", q]);
    }
}
