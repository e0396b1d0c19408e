//! Opening the transport a URL names, with errors that say what to do.

use std::sync::Arc;

use bus::Connection;

use crate::fail::{CliResult, Fail};

/// The URL used when neither `--url` nor `BUS_URL` is given.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Connects to `url` through `bus::connect`.
///
/// `memory://` is refused (an in-process broker dies with this command).
/// A broker that cannot be reached is reported with its address (never the
/// credentials) and what to check.
pub async fn open(url: &str) -> CliResult<Arc<dyn Connection>> {
    let shown = bus::redact_url(url);
    if url.starts_with("memory://") {
        return Err(Fail::usage(format!(
            "{shown}: memory:// is an in-process broker that ends with this command, so nothing \
             could reach it; use amqp://HOST (RabbitMQ) or file:///PATH (a folder)"
        )));
    }
    match bus::connect(url).await {
        Ok(conn) => Ok(conn),
        Err(e) if url.starts_with("amqp://") || url.starts_with("amqps://") => {
            let hosts = hosts_of(url);
            let hint = match &e {
                bus::Error::AccessRefused(_) => {
                    "check the user, password and virtual host in the URL".to_owned()
                }
                bus::Error::NotFound(_) => "check the virtual host in the URL".to_owned(),
                _ => "is RabbitMQ running? scripts/test-all starts one".to_owned(),
            };
            Err(Fail::error(format!("cannot reach {hosts}: {hint} ({e})")))
        }
        Err(bus::Error::Io(e)) if url.starts_with("file://") => Err(Fail::error(format!(
            "cannot open the folder of {shown}: {e} (does its parent exist and is it writable?)"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The `host:port` list of an AMQP URL, without credentials.
fn hosts_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hosts = hosts.split('?').next().unwrap_or(hosts);
    if hosts.is_empty() {
        "localhost:5672".to_owned()
    } else {
        hosts
            .split(',')
            .map(|h| {
                if h.contains(':') {
                    h.to_owned()
                } else {
                    let port = if url.starts_with("amqps://") {
                        5671
                    } else {
                        5672
                    };
                    format!("{h}:{port}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::hosts_of;

    #[test]
    fn hosts_never_carry_credentials() {
        assert_eq!(
            hosts_of("amqp://u:secret@10.0.0.1:5673/%2f"),
            "10.0.0.1:5673"
        );
        assert_eq!(hosts_of("amqp://u:p@a,b:1/v"), "a:5672,b:1");
        assert_eq!(hosts_of("amqps://h"), "h:5671");
    }
}
