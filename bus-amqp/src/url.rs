//! `amqp://` and `amqps://` URLs: parsing (with several hosts for a cluster)
//! and redaction.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bus_core::{Error, Result};
use percent_encoding::percent_decode_str;

/// One broker node: a host name or address, and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BrokerHost {
    /// Host name, IPv4 address, or IPv6 address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl BrokerHost {
    /// A host and port.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        BrokerHost {
            host: host.into(),
            port,
        }
    }
}

impl fmt::Display for BrokerHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A parsed broker URL:
/// `amqp[s]://[user[:password]@]host[:port][,host[:port]...][/vhost][?query]`.
///
/// * The user and password are percent-decoded; without them RabbitMQ's
///   defaults `guest`/`guest` are used.
/// * Several comma-separated hosts name the nodes of a cluster; the
///   connection goes to the first that answers, in order.
/// * The port defaults to 5672 for `amqp` and 5671 for `amqps`.
/// * The virtual host is the percent-decoded path without its leading `/`:
///   `/%2f` is `/`, `/prod` is `prod`; without a path it is `/`; a lone `/`
///   is the empty virtual host, as the RabbitMQ URI specification says.
/// * Query keys understood: `heartbeat` (seconds), `connection_timeout`
///   (milliseconds), `frame_max`, `channel_max`. Others are refused.
///
/// `Debug` and `Display` never show the user or the password: see
/// [`AmqpUrl::redacted`].
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    /// Whether the scheme is `amqps` (TLS).
    pub tls: bool,
    /// The nodes to try, in order.
    pub hosts: Vec<BrokerHost>,
    /// The virtual host.
    pub vhost: String,
    /// The user name.
    pub username: String,
    pub(crate) password: String,
    /// Heartbeat interval asked for, in seconds (`heartbeat=`).
    pub heartbeat: Option<u16>,
    /// Time allowed for one TCP connect and handshake (`connection_timeout=`).
    pub connection_timeout: Option<Duration>,
    /// Largest frame size asked for (`frame_max=`).
    pub frame_max: Option<u32>,
    /// Most channels asked for (`channel_max=`).
    pub channel_max: Option<u16>,
    /// `cacertfile=`: a PEM file of certificate authorities trusted for
    /// `amqps://`, besides the bundled web roots (the name RabbitMQ's URI
    /// query parameters and its Erlang client use).
    pub cacertfile: Option<PathBuf>,
    /// `certfile=`: the client certificate (PEM) for mutual TLS; needs
    /// `keyfile`.
    pub certfile: Option<PathBuf>,
    /// `keyfile=`: the client certificate's private key (PKCS#8 PEM).
    pub keyfile: Option<PathBuf>,
    /// `server_name_indication=`: the name sent in the TLS handshake (SNI)
    /// and that the broker's certificate must carry, when it differs from
    /// the host connected to (a node reached by IP address or through a
    /// tunnel, with a certificate for its DNS name). `None`: the host of
    /// each node.
    pub server_name: Option<String>,
}

fn invalid(redacted: &str, why: impl fmt::Display) -> Error {
    Error::InvalidArgument(format!("invalid AMQP URL {redacted}: {why}"))
}

fn decode(part: &str, what: &str, redacted: &str) -> Result<String> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            invalid(
                redacted,
                format!("the {what} is not UTF-8 once percent-decoded"),
            )
        })
}

fn parse_host(spec: &str, default_port: u16, redacted: &str) -> Result<BrokerHost> {
    let (host, port) = if let Some(rest) = spec.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid(redacted, "unclosed '[' in an IPv6 host"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| invalid(redacted, format!("unexpected {p:?} after ']'")))?,
            ),
        };
        (h.to_owned(), port)
    } else {
        match spec.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (spec.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err(invalid(redacted, "a host is empty"));
    }
    let port = match port {
        None | Some("") => default_port,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
            invalid(
                redacted,
                format!("port {p:?} is not a number from 1 to 65535"),
            )
        })?,
    };
    Ok(BrokerHost {
        host: decode(&host, "host", redacted)?,
        port,
    })
}

impl AmqpUrl {
    /// Parses a URL.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the problem; the message shows the
    /// URL with its credentials hidden.
    pub fn parse(url: &str) -> Result<Self> {
        let redacted = bus_core::redact_url(url);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid(&redacted, "expected amqp:// or amqps://"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "amqp" => false,
            "amqps" => true,
            other => {
                return Err(invalid(
                    &redacted,
                    format!("unknown scheme {other:?}; expected amqp or amqps"),
                ))
            }
        };
        let default_port = if tls { 5671 } else { 5672 };
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        if before_query.contains('#') {
            return Err(invalid(&redacted, "fragments ('#') are not allowed"));
        }
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], Some(&before_query[i + 1..])),
            None => (before_query, None),
        };
        let (userinfo, hostlist) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => ("guest".to_owned(), "guest".to_owned()),
            Some(ui) => match ui.split_once(':') {
                Some((u, p)) => (
                    decode(u, "user", &redacted)?,
                    decode(p, "password", &redacted)?,
                ),
                None => (decode(ui, "user", &redacted)?, String::new()),
            },
        };
        if hostlist.is_empty() {
            return Err(invalid(&redacted, "no host"));
        }
        let hosts = hostlist
            .split(',')
            .map(|h| parse_host(h.trim(), default_port, &redacted))
            .collect::<Result<Vec<_>>>()?;
        let vhost = match path {
            None => "/".to_owned(),
            Some(p) => {
                if p.contains('/') {
                    return Err(invalid(
                        &redacted,
                        "the virtual host must be one path segment; write '/' as %2f",
                    ));
                }
                decode(p, "virtual host", &redacted)?
            }
        };
        let mut parsed = AmqpUrl {
            tls,
            hosts,
            vhost,
            username,
            password,
            heartbeat: None,
            connection_timeout: None,
            frame_max: None,
            channel_max: None,
            cacertfile: None,
            certfile: None,
            keyfile: None,
            server_name: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let number = |what: &str| {
                v.parse::<u64>().map_err(|_| {
                    invalid(
                        &redacted,
                        format!("query parameter {what} needs a number, got {v:?}"),
                    )
                })
            };
            let too_big =
                |what: &str| invalid(&redacted, format!("query parameter {what} is too large"));
            match k {
                "heartbeat" => {
                    parsed.heartbeat = Some(u16::try_from(number(k)?).map_err(|_| too_big(k))?)
                }
                "connection_timeout" => {
                    parsed.connection_timeout = Some(Duration::from_millis(number(k)?))
                }
                "frame_max" => {
                    parsed.frame_max = Some(u32::try_from(number(k)?).map_err(|_| too_big(k))?)
                }
                "channel_max" => {
                    parsed.channel_max = Some(u16::try_from(number(k)?).map_err(|_| too_big(k))?)
                }
                "cacertfile" | "certfile" | "keyfile" | "server_name_indication" if !tls => {
                    return Err(invalid(
                        &redacted,
                        format!("query parameter {k} is for TLS: use amqps://"),
                    ));
                }
                "cacertfile" | "certfile" | "keyfile" => {
                    let path = Some(PathBuf::from(decode(v, k, &redacted)?));
                    match k {
                        "cacertfile" => parsed.cacertfile = path,
                        "certfile" => parsed.certfile = path,
                        _ => parsed.keyfile = path,
                    }
                }
                "server_name_indication" => {
                    let name = decode(v, k, &redacted)?;
                    // The same check the TLS handshake makes, up front.
                    rustls_pki_types::ServerName::try_from(name.as_str()).map_err(|_| {
                        invalid(
                            &redacted,
                            format!("{k}={name:?} is not a DNS name or an IP address"),
                        )
                    })?;
                    parsed.server_name = Some(name);
                }
                "verify" => {
                    return Err(invalid(
                        &redacted,
                        format!(
                            "query parameter {k} is not supported: the broker's certificate is always verified"
                        ),
                    ))
                }
                other => {
                    return Err(invalid(
                        &redacted,
                        format!(
                            "unknown query parameter {other:?}; known: heartbeat, connection_timeout, frame_max, channel_max, cacertfile, certfile, keyfile, server_name_indication"
                        ),
                    ))
                }
            }
        }
        if parsed.certfile.is_some() != parsed.keyfile.is_some() {
            return Err(invalid(
                &redacted,
                "certfile and keyfile go together (the client certificate and its key)",
            ));
        }
        Ok(parsed)
    }

    /// The URL with the credentials hidden, listing every host:
    /// `amqp://***@h1:5672,h2:5672/%2f`.
    #[must_use]
    pub fn redacted(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(ToString::to_string).collect();
        let vhost: String =
            percent_encoding::utf8_percent_encode(&self.vhost, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        format!(
            "{}://***@{}/{}",
            if self.tls { "amqps" } else { "amqp" },
            hosts.join(","),
            vhost
        )
    }

    /// Replaces the password (e.g. one read from a secret store).
    #[must_use]
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = password.into();
        self
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpUrl")
            .field("url", &self.redacted())
            .field("heartbeat", &self.heartbeat)
            .field("connection_timeout", &self.connection_timeout)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url_is_parsed() {
        let u =
            AmqpUrl::parse("amqp://us%40er:p%3Ass@broker.example:5673/%2f?heartbeat=5").unwrap();
        assert!(!u.tls);
        assert_eq!(u.hosts, vec![BrokerHost::new("broker.example", 5673)]);
        assert_eq!(u.username, "us@er");
        assert_eq!(u.password, "p:ss");
        assert_eq!(u.vhost, "/");
        assert_eq!(u.heartbeat, Some(5));
    }

    #[test]
    fn defaults_follow_the_rabbitmq_uri_spec() {
        let u = AmqpUrl::parse("amqp://localhost").unwrap();
        assert_eq!(u.hosts, vec![BrokerHost::new("localhost", 5672)]);
        assert_eq!(
            (u.username.as_str(), u.password.as_str()),
            ("guest", "guest")
        );
        assert_eq!(u.vhost, "/");
        assert_eq!(AmqpUrl::parse("amqp://localhost/").unwrap().vhost, "");
        assert_eq!(
            AmqpUrl::parse("amqp://localhost/prod").unwrap().vhost,
            "prod"
        );
        let s = AmqpUrl::parse("amqps://h").unwrap();
        assert!(s.tls);
        assert_eq!(s.hosts[0].port, 5671);
    }

    #[test]
    fn several_hosts_make_a_cluster_list() {
        let u = AmqpUrl::parse("amqp://u:p@h1:5672,h2,[::1]:5674/%2f").unwrap();
        assert_eq!(
            u.hosts,
            vec![
                BrokerHost::new("h1", 5672),
                BrokerHost::new("h2", 5672),
                BrokerHost::new("::1", 5674)
            ]
        );
        assert_eq!(u.redacted(), "amqp://***@h1:5672,h2:5672,[::1]:5674/%2F");
    }

    #[test]
    fn bad_urls_are_refused_without_showing_credentials() {
        for bad in [
            "http://u:hunter2@h/",
            "amqp://u:hunter2@h:99999/",
            "amqp://u:hunter2@/",
            "amqp://u:hunter2@h/a/b",
            "amqp://u:hunter2@h/?nope=1",
            "amqp://u:hunter2@h:0/",
            "amqp://u:hunter2@[::1/",
            "amqp://u:hunter2@h/?server_name_indication=rabbit.test",
            "amqps://u:hunter2@h/?server_name_indication=not%20a%20name",
            "amqps://u:hunter2@h/?verify=verify_none",
        ] {
            let e = AmqpUrl::parse(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn server_name_indication_sets_the_tls_name() {
        let u = AmqpUrl::parse("amqps://u:p@10.0.0.5/%2f?server_name_indication=rabbit.internal")
            .unwrap();
        assert_eq!(u.server_name.as_deref(), Some("rabbit.internal"));
        assert_eq!(u.hosts[0].host, "10.0.0.5");
        let u = AmqpUrl::parse("amqps://u:p@h/%2f?server_name_indication=10.0.0.5").unwrap();
        assert_eq!(u.server_name.as_deref(), Some("10.0.0.5"));
        assert_eq!(AmqpUrl::parse("amqps://u:p@h/").unwrap().server_name, None);
    }

    #[test]
    fn debug_and_display_hide_credentials() {
        let u = AmqpUrl::parse("amqp://alice:hunter2@h/%2f").unwrap();
        for shown in [format!("{u:?}"), u.to_string(), u.redacted()] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(!shown.contains("alice"), "{shown}");
        }
    }
}
