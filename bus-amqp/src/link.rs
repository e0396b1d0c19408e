//! One live lapin connection to one node ("a link"), and how it is opened.

use std::fmt;
use std::sync::Arc;

use bus_core::{Error, Result};
use lapin::auth::AuthProvider;
use lapin::types::{LongString, ShortString};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{ConnectionProperties, Event};

use crate::convert::{broker_close, error_from_code};
use crate::options::AmqpOptions;
use crate::tls::{is_tls_failure, Tls};
use crate::url::{AmqpUrl, BrokerHost};

/// A connected lapin connection. A new one (with the next generation) is
/// made by each recovery; channels are tied to the link they were opened
/// on.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) generation: u64,
    pub(crate) conn: Arc<lapin::Connection>,
    pub(crate) host: BrokerHost,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("generation", &self.generation)
            .field("host", &self.host.to_string())
            .finish()
    }
}

/// What `op` gives, or `None` when `link` dies first.
///
/// Lapin does not always answer a request made while its connection fails:
/// a channel open caught by the failure can wait forever. Requests whose
/// effect dies with the link (opening a channel, starting a consumer,
/// declaring the topology again) go through here, so that the caller moves
/// on to the next link instead.
pub(crate) async fn unless_lost<T>(
    link: &Link,
    op: impl std::future::Future<Output = T>,
) -> Option<T> {
    let lost = async {
        // Only while a request is pending, which is rare (once per
        // channel): a short poll is simpler than a second event listener.
        while link.conn.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        biased;
        r = op => Some(r),
        () = lost => None,
    }
}

/// Where the connection stands.
#[derive(Clone, Debug)]
pub(crate) enum LinkState {
    Up(Link),
    /// Lost; recovery is under way.
    Down {
        reason: String,
    },
    /// Closed by the application (`by_user`) or given up on.
    Closed {
        by_user: bool,
        reason: String,
    },
}

/// SASL PLAIN with credentials that live only here, so that they never go
/// into the URI lapin logs at trace level.
struct PlainAuth {
    username: String,
    password: String,
}

impl AuthProvider for PlainAuth {
    fn mechanism(&self) -> ShortString {
        "PLAIN".into()
    }

    fn auth_starter(&self) -> std::result::Result<LongString, String> {
        let mut s = Vec::with_capacity(self.username.len() + self.password.len() + 2);
        s.push(0);
        s.extend_from_slice(self.username.as_bytes());
        s.push(0);
        s.extend_from_slice(self.password.as_bytes());
        Ok(LongString::from(s))
    }
}

/// Opens a link to the first node that answers, trying them in order.
///
/// Returns the link and a listener of its events, made before anything can
/// happen on it so that no error goes unseen.
pub(crate) async fn connect_any(
    url: &AmqpUrl,
    options: &AmqpOptions,
    generation: u64,
) -> Result<(Link, futures::stream::BoxStream<'static, Event>)> {
    let mut failures = Vec::new();
    let mut last = None;
    // Whether every node failed in a way retrying cannot cure (a
    // certificate the client does not trust, say).
    let mut permanent = true;
    // Read and checked once for every node it is tried on.
    let tls = Tls::new(url, options)?;
    for host in &url.hosts {
        let attempt = connect_one(url, options, tls.as_ref(), host);
        match tokio::time::timeout(options.connect_timeout, attempt).await {
            Ok(Ok(conn)) => {
                let events = Box::pin(conn.events_listener());
                tracing::info!(host = %host, generation, "connected to the broker");
                return Ok((
                    Link {
                        generation,
                        conn: Arc::new(conn),
                        host: host.clone(),
                    },
                    events,
                ));
            }
            // Input the URL or the options got wrong is the same for every
            // node.
            Ok(Err(e @ Error::InvalidArgument(_))) => return Err(e),
            Ok(Err(e)) => {
                tracing::debug!(host = %host, error = %e, "could not connect");
                permanent &= !e.is_temporary();
                failures.push(format!("{host}: {e}"));
                last = Some(e);
            }
            Err(_) => {
                permanent = false;
                let e = Error::Timeout(options.connect_timeout);
                failures.push(format!(
                    "{host}: no answer within {:?}",
                    options.connect_timeout
                ));
                last = Some(e);
            }
        }
    }
    let all = failures.join("; ");
    Err(match last {
        // One node refused the credentials or the virtual host: that is what
        // the caller must hear about, not "connection refused".
        Some(Error::AccessRefused(_)) if url.hosts.len() == 1 => {
            Error::AccessRefused(format!("{}: {all}", url.redacted()).into())
        }
        Some(Error::NotFound(_)) if url.hosts.len() == 1 => {
            Error::NotFound(format!("{}: {all}", url.redacted()).into())
        }
        Some(_) if permanent => Error::backend(
            "amqp",
            false,
            format!("could not connect to any node of {}: {all}", url.redacted()),
        ),
        _ => Error::ConnectionLost(format!(
            "could not connect to any node of {}: {all}",
            url.redacted()
        )),
    })
}

async fn connect_one(
    url: &AmqpUrl,
    options: &AmqpOptions,
    tls: Option<&Tls>,
    host: &BrokerHost,
) -> Result<lapin::Connection> {
    let heartbeat = url
        .heartbeat
        .unwrap_or_else(|| u16::try_from(options.heartbeat.as_secs()).unwrap_or(u16::MAX));
    let uri = AMQPUri {
        scheme: if url.tls {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: String::new(),
                password: String::new(),
            },
            host: host.host.clone(),
            port: host.port,
        },
        vhost: url.vhost.clone(),
        query: AMQPQueryString {
            frame_max: url.frame_max,
            channel_max: url.channel_max,
            heartbeat: Some(heartbeat),
            connection_timeout: Some(
                url.connection_timeout
                    .unwrap_or(options.connect_timeout)
                    .as_millis()
                    .min(u128::from(u64::MAX)) as u64,
            ),
            auth_mechanism: None,
        },
    };
    let mut props = ConnectionProperties::default().with_auth_provider(PlainAuth {
        username: url.username.clone(),
        password: url.password.clone(),
    });
    if let Some(name) = &options.connection_name {
        props = props.with_connection_name(LongString::from(name.as_bytes()));
    }
    if let Some(tls) = tls {
        tls.start_attempt();
    }
    let runtime = lapin::runtime::default_runtime().map_err(|e| {
        Error::NotSupported(format!("the AMQP transport needs a tokio runtime: {e}"))
    })?;
    // lapin's own connector (TCP, then TLS for amqps://), with bus-amqp's
    // TLS configuration: the name sent and checked can differ from the
    // host, and the connection learns whether the broker asked for a
    // client certificate.
    let tls_name = url.server_name.clone().unwrap_or_else(|| host.host.clone());
    let connect = {
        let (tls, tls_name) = (tls.cloned(), tls_name.clone());
        async move |uri: AMQPUri, runtime| {
            use lapin::tcp::{AMQPUriTcpExt, TLSConfig};
            let plain = AMQPUri {
                scheme: AMQPScheme::AMQP,
                ..uri
            };
            let stream = plain
                .connect_with_config_async(TLSConfig::default(), &runtime)
                .await?;
            match &tls {
                Some(tls) => Ok(stream.into_rustls(&tls.connector, &tls_name).await?),
                None => Ok(stream),
            }
        }
    };
    lapin::Connection::connector(uri, runtime, connect, props)
        .await
        .map_err(|e| match broker_close(&e) {
            // 530 NOT_ALLOWED is how RabbitMQ refuses a missing virtual host.
            Some(c) if c.code == 530 => {
                Error::NotFound(format!("virtual host {:?}: {}", url.vhost, c.text).into())
            }
            Some(c) => error_from_code(c.code, c.text),
            None => match (e.kind(), &tls) {
                (lapin::ErrorKind::IOError(io), Some(_)) if is_tls_failure(io) => Error::backend(
                    "amqp",
                    false,
                    format!("TLS handshake with {host} (as {tls_name:?}) failed: {io}"),
                ),
                // TLS 1.3: the broker refuses a client without a
                // certificate after the client's handshake completed, and
                // its alert can be lost to the reset that follows.
                (_, Some(tls)) if tls.refused_for_lack_of_certificate() => Error::backend(
                    "amqp",
                    false,
                    format!(
                        "TLS with {host} (as {tls_name:?}): the broker asked for a client certificate, none is configured \
                         (certfile and keyfile in the URL, or AmqpOptions::tls_client_identity), and it then dropped \
                         the connection ({e})"
                    ),
                ),
                (lapin::ErrorKind::IOError(io), _) => Error::ConnectionLost(io.to_string()),
                _ => Error::ConnectionLost(e.to_string()),
            },
        })
}
