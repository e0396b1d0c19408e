#![doc = include_str!("../README.md")]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

use std::sync::Arc;

pub use bus_core::*;

/// The in-process broker, always available.
pub use bus_local as local;

/// The RabbitMQ transport (feature `amqp`).
#[cfg(feature = "amqp")]
pub use bus_amqp as amqp;

/// The folder transport and the legacy folder integration (feature `file`).
#[cfg(feature = "file")]
pub use bus_file as file;

/// Opens a connection to the transport a URL names.
///
/// | scheme | transport | feature |
/// |---|---|---|
/// | `memory://NAME` | in-process broker; connections with the same `NAME` share one broker in this process | always on |
/// | `amqp://user:pass@host:port/vhost`, `amqps://...` | RabbitMQ; several `host:port` separated by commas for a cluster (the first that answers) | `amqp` |
/// | `file:///absolute/path` | a folder shared by every process that opens it | `file` |
///
/// Credentials in the URL never appear in errors.
///
/// # Errors
/// [`Error::InvalidArgument`] for a URL without a scheme or with an unknown
/// one, and [`Error::NotSupported`] naming the Cargo feature to enable for a
/// known scheme whose transport is compiled out; otherwise whatever the
/// transport reports while connecting.
pub async fn connect(url: &str) -> Result<Arc<dyn Connection>> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{:?} is not a bus URL: expected SCHEME://..., e.g. memory://test",
            redact_url(url)
        ))
    })?;
    match scheme {
        "memory" => {
            let name = rest.trim_end_matches('/');
            Ok(Arc::new(local::LocalBroker::named(name).connect()))
        }
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => Ok(Arc::new(bus_amqp::AmqpConnection::connect(url).await?)),
        #[cfg(not(feature = "amqp"))]
        "amqp" | "amqps" => Err(compiled_out(scheme, "amqp")),
        #[cfg(feature = "file")]
        "file" => {
            // file:///abs/path or file://localhost/abs/path, as RFC 8089.
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            // `.` and `..` are resolved by the transport, which refuses a
            // path that climbs above `/` (`file:///../..`) or is `/` itself.
            if !path.starts_with('/') {
                return Err(Error::InvalidArgument(format!(
                    "{:?}: expected file:///absolute/path (a local absolute path)",
                    redact_url(url)
                )));
            }
            Ok(Arc::new(bus_file::FileConnection::open(path).await?))
        }
        #[cfg(not(feature = "file"))]
        "file" => Err(compiled_out(scheme, "file")),
        other => Err(Error::InvalidArgument(format!(
            "unknown transport scheme {other:?} in {:?}: expected memory://, amqp://, amqps:// or file://",
            redact_url(url)
        ))),
    }
}

/// The error for a known scheme whose transport was not compiled in.
#[cfg_attr(all(feature = "amqp", feature = "file"), allow(dead_code))]
fn compiled_out(scheme: &str, feature: &str) -> Error {
    Error::NotSupported(format!(
        "the {scheme}:// transport is compiled out: enable the `{feature}` feature of `bus`"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_urls_with_one_name_share_a_broker() {
        let a = connect("memory://facade-test").await.unwrap();
        let b = connect("memory://facade-test/").await.unwrap();
        a.declare_queue("shared", QueueOptions::default())
            .await
            .unwrap();
        a.send_to_queue("shared", Message::new(&b"x"[..]))
            .await
            .unwrap();
        assert_eq!(b.inspect_queue("shared").await.unwrap().message_count, 1);
        let other = connect("memory://facade-other").await.unwrap();
        assert!(matches!(
            other.inspect_queue("shared").await,
            Err(Error::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn bad_urls_are_clear_errors_without_credentials() {
        match connect("amqq://user:secret@host/").await {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains("amqq"), "{m}");
                assert!(!m.contains("secret"), "{m}");
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        match connect("no-scheme:secret@x").await {
            Err(Error::InvalidArgument(m)) => assert!(!m.contains("secret"), "{m}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[cfg(feature = "file")]
    #[tokio::test]
    async fn hostile_file_urls_are_refused_without_credentials() {
        for url in [
            "file:///../..",
            "file:///..",
            "file:///",
            "file://localhost/../../..",
        ] {
            assert!(
                matches!(connect(url).await, Err(Error::InvalidArgument(_))),
                "{url}"
            );
        }
        match connect("file://user:pw@elsewhere/srv/bus").await {
            Err(Error::InvalidArgument(m)) => assert!(!m.contains("pw"), "{m}"),
            Err(other) => panic!("expected InvalidArgument, got {other:?}"),
            Ok(_) => panic!("a remote file URL was accepted"),
        }
    }

    #[test]
    fn redaction_is_bus_cores() {
        assert_eq!(redact_url("amqp://u:p@h:5672/%2f"), "amqp://***@h:5672/%2f");
        assert_eq!(
            redact_url("amqp://guest:S3CR3T/x@host/"),
            "amqp://***@host/"
        );
        assert_eq!(
            redact_url("file://user:pw@localhost/x"),
            "file://***@localhost/x"
        );
    }

    #[test]
    fn a_compiled_out_transport_names_its_feature() {
        match compiled_out("amqps", "amqp") {
            Error::NotSupported(m) => {
                assert!(m.contains("amqps://"), "{m}");
                assert!(m.contains("`amqp` feature"), "{m}");
            }
            other => panic!("expected NotSupported, got {other:?}"),
        }
    }
}
