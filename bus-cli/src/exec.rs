//! One process per message, for `work --exec` and `serve --exec`.
//!
//! The command runs through `sh -c`, with the body on its standard input
//! and the message's properties in environment variables:
//!
//! | variable | value |
//! |---|---|
//! | `BUS_QUEUE` | the queue consumed |
//! | `BUS_EXCHANGE`, `BUS_ROUTING_KEY` | where the message was published |
//! | `BUS_REDELIVERED` | `1` or `0` |
//! | `BUS_ATTEMPT` | the attempt number (1 for the first) |
//! | `BUS_CONTENT_TYPE`, `BUS_CONTENT_ENCODING`, `BUS_CORRELATION_ID`, `BUS_REPLY_TO`, `BUS_EXPIRATION`, `BUS_MESSAGE_ID`, `BUS_TIMESTAMP`, `BUS_TYPE`, `BUS_USER_ID`, `BUS_APP_ID`, `BUS_PRIORITY`, `BUS_DELIVERY_MODE` | the property, when set |
//! | `BUS_HEADERS` | every header, as one JSON object |
//! | `BUS_HEADER_<NAME>` | each header, `NAME` upper-cased with other characters than letters and digits as `_`; strings as they are, other values as JSON |
//! | `BUS_BODY_FILE` | a file holding the body, named after the message's `x-legacy-file` header when it has one (so `job42.wav` keeps its extension); `{file}` in the command is replaced by this path |
//!
//! The body file lives in a private temporary folder removed once the
//! process ends.

use std::path::PathBuf;
use std::process::Stdio;

use bus::{FieldValue, Message};
use bus_file::legacy::FILE_HEADER;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::codec::{field_to_json, table_to_json};

/// What the process did.
#[derive(Debug)]
pub struct Outcome {
    /// The exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Everything it wrote to standard output.
    pub stdout: Vec<u8>,
    /// The end of what it wrote to standard error (at most 4 KiB).
    pub stderr_tail: String,
}

impl Outcome {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Why it failed, for an error header or reply.
    pub fn failure(&self) -> String {
        let how = match self.code {
            Some(c) => format!("exited with code {c}"),
            None => "was killed by a signal".to_owned(),
        };
        if self.stderr_tail.trim().is_empty() {
            format!("the command {how}")
        } else {
            format!("the command {how}: {}", self.stderr_tail.trim())
        }
    }
}

/// Where a message came from, for the environment.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The queue consumed.
    pub queue: String,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// The attempt number, 1 for the first.
    pub attempt: u32,
}

fn env_name(header: &str) -> String {
    let mut s = String::from("BUS_HEADER_");
    s.extend(header.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    s
}

/// A file name that cannot leave the temporary folder.
fn body_file_name(m: &Message) -> String {
    let name = m
        .properties
        .headers
        .get(FILE_HEADER)
        .and_then(FieldValue::as_str)
        .filter(|n| {
            !n.is_empty()
                && !n.starts_with('.')
                && !n.contains('/')
                && !n.contains('\0')
                && n.len() <= 200
        });
    name.map_or_else(|| "body".to_owned(), str::to_owned)
}

/// Runs `command` for one message and waits for it.
pub async fn run(command: &str, origin: &Origin, message: &Message) -> std::io::Result<Outcome> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("bus-exec-{}", uuid::Uuid::new_v4().simple()));
    // Private from its creation: it holds the message body.
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let result = run_in(&dir, command, origin, message).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    dir: &std::path::Path,
    command: &str,
    origin: &Origin,
    message: &Message,
) -> std::io::Result<Outcome> {
    let body_file: PathBuf = dir.join(body_file_name(message));
    std::fs::write(&body_file, &message.body)?;
    let shown_path = body_file.to_string_lossy().into_owned();
    let command = command.replace("{file}", &shell_quote(&shown_path));

    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(&command);
    let p = &message.properties;
    cmd.env("BUS_QUEUE", &origin.queue)
        .env("BUS_EXCHANGE", &origin.exchange)
        .env("BUS_ROUTING_KEY", &origin.routing_key)
        .env(
            "BUS_REDELIVERED",
            if origin.redelivered { "1" } else { "0" },
        )
        .env("BUS_ATTEMPT", origin.attempt.max(1).to_string())
        .env("BUS_BODY_FILE", &body_file)
        .env("BUS_HEADERS", table_to_json(&p.headers).to_string());
    let optional = [
        ("BUS_CONTENT_TYPE", p.content_type.clone()),
        ("BUS_CONTENT_ENCODING", p.content_encoding.clone()),
        ("BUS_CORRELATION_ID", p.correlation_id.clone()),
        ("BUS_REPLY_TO", p.reply_to.clone()),
        ("BUS_EXPIRATION", p.expiration.clone()),
        ("BUS_MESSAGE_ID", p.message_id.clone()),
        ("BUS_TIMESTAMP", p.timestamp.map(|t| t.to_string())),
        ("BUS_TYPE", p.kind.clone()),
        ("BUS_USER_ID", p.user_id.clone()),
        ("BUS_APP_ID", p.app_id.clone()),
        ("BUS_PRIORITY", p.priority.map(|v| v.to_string())),
        (
            "BUS_DELIVERY_MODE",
            p.delivery_mode.map(|v| v.as_u8().to_string()),
        ),
    ];
    for (k, v) in optional {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    for (k, v) in &p.headers {
        let text = match v {
            FieldValue::String(s) => s.clone(),
            other => field_to_json(other).to_string(),
        };
        if !text.contains('\0') {
            cmd.env(env_name(k), text);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let body = message.body.clone();
    // A program that does not read its input must not block us: write in
    // the background and ignore a closed pipe.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
        let _ = stdin.shutdown().await;
    });
    let output = child.wait_with_output().await?;
    writer.abort();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail_start = stderr.len().saturating_sub(4096);
    let tail_start = (tail_start..stderr.len())
        .find(|i| stderr.is_char_boundary(*i))
        .unwrap_or(stderr.len());
    Ok(Outcome {
        code: output.status.code(),
        stdout: output.stdout,
        stderr_tail: stderr[tail_start..].to_owned(),
    })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_become_variable_names() {
        assert_eq!(env_name("x-legacy-file"), "BUS_HEADER_X_LEGACY_FILE");
        assert_eq!(env_name("lang"), "BUS_HEADER_LANG");
    }

    #[test]
    fn body_files_never_leave_their_folder() {
        let m = Message::new(&b""[..]).with_header(FILE_HEADER, "../../etc/passwd");
        assert_eq!(body_file_name(&m), "body");
        let m = Message::new(&b""[..]).with_header(FILE_HEADER, "job42.wav");
        assert_eq!(body_file_name(&m), "job42.wav");
    }
}
