#![doc = include_str!("../README.md")]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

use std::sync::Arc;

pub use bus_core::*;

/// The in-process broker, always available.
pub use bus_local as local;

/// Opens a connection to the transport a URL names.
///
/// | scheme | transport | feature |
/// |---|---|---|
/// | `memory://NAME` | in-process broker; connections with the same `NAME` share one broker in this process | always on |
///
/// # Errors
/// [`Error::InvalidArgument`] for a URL without a scheme or with an unknown
/// one, and [`Error::NotSupported`] naming the Cargo feature to enable for a
/// known scheme whose transport is compiled out; otherwise whatever the
/// transport reports while connecting.
pub async fn connect(url: &str) -> Result<Arc<dyn Connection>> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{url:?} is not a bus URL: expected SCHEME://..., e.g. memory://test"
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
        "amqp" | "amqps" => Err(Error::NotSupported(format!(
            "the {scheme}:// transport is compiled out: enable the `amqp` feature of `bus`"
        ))),
        #[cfg(feature = "file")]
        "file" => {
            // file:///abs/path or file://localhost/abs/path, as RFC 8089.
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(Error::InvalidArgument(format!(
                    "{url:?}: expected file:///absolute/path (a local absolute path)"
                )));
            }
            Ok(Arc::new(bus_file::FileConnection::open(path).await?))
        }
        #[cfg(not(feature = "file"))]
        "file" => Err(Error::NotSupported(
            "the file:// transport is compiled out: enable the `file` feature of `bus`".into(),
        )),
        other => Err(Error::InvalidArgument(format!(
            "unknown transport scheme {other:?} in {url:?}: expected memory://, amqp://, amqps:// or file://"
        ))),
    }
}
