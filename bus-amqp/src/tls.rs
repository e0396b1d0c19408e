//! TLS for `amqps://`: the rustls client configuration built from the URL
//! and the options (trusted CAs, client certificate, the name checked),
//! and the classification of TLS failures.
//!
//! The configuration is built here rather than by lapin so that the name
//! sent and verified can differ from the host (`server_name_indication`),
//! and so that the connection knows whether the broker asked for a client
//! certificate: under TLS 1.3 the client's side of the handshake completes
//! before the broker checks the certificate, and the broker's refusal of a
//! client without one can arrive as a bare TCP reset, which would
//! otherwise look like a network fault.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bus_core::{Error, Result};
use lapin::tcp::RustlsConnector;
use rustls::client::ResolvesClientCert;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::options::AmqpOptions;
use crate::url::AmqpUrl;

/// The TLS side of one connection attempt.
#[derive(Clone, Debug)]
pub(crate) struct Tls {
    pub(crate) connector: RustlsConnector,
    /// Whether a client certificate is configured.
    pub(crate) has_identity: bool,
    /// Set when the broker asks for a client certificate during the
    /// handshake (a `CertificateRequest`).
    pub(crate) asked_for_certificate: Arc<AtomicBool>,
}

impl Tls {
    /// The TLS settings of a connection (`None` for `amqp://`): the URL's
    /// files win over the options. Trusted: the bundled web roots and the
    /// CA file or PEM given.
    ///
    /// # Errors
    /// `InvalidArgument` naming the file or option that cannot be read,
    /// holds no certificate, or whose key does not fit its certificate.
    pub(crate) fn new(url: &AmqpUrl, options: &AmqpOptions) -> Result<Option<Tls>> {
        if !url.tls {
            return Ok(None);
        }
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
        let ca = match &url.cacertfile {
            Some(path) => {
                let pem = read_pem("CA file", path)?;
                Some(certificates(&format!("CA file {}", path.display()), &pem)?)
            }
            None => match &options.tls_ca_pem {
                Some(pem) => Some(certificates(
                    "CA certificate of AmqpOptions::tls_ca_pem",
                    pem,
                )?),
                None => None,
            },
        };
        if let Some(certs) = ca {
            let (_, ignored) = roots.add_parsable_certificates(certs);
            if ignored > 0 {
                return Err(Error::InvalidArgument(format!(
                    "{ignored} certificate(s) of the CA file are not usable as trust anchors"
                )));
            }
        }
        let identity = match (&url.certfile, &url.keyfile) {
            (Some(cert), Some(key)) => Some((
                read_pem("client certificate file", cert)?,
                read_pem("client key file", key)?,
            )),
            _ => options.tls_client_identity.clone(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::NotSupported(format!("TLS: {e}")))?
            .with_root_certificates(roots);
        let mut config = match &identity {
            Some((cert, key)) => {
                let chain = certificates("client certificate", cert)?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| {
                    Error::InvalidArgument(format!("the client key is not a PEM private key: {e}"))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "the client certificate and key do not make an identity: {e}"
                    ))
                })?
            }
            None => builder.with_no_client_auth(),
        };
        let asked_for_certificate = Arc::new(AtomicBool::new(false));
        config.client_auth_cert_resolver = Arc::new(RecordsRequest {
            inner: config.client_auth_cert_resolver.clone(),
            asked: asked_for_certificate.clone(),
        });
        Ok(Some(Tls {
            connector: RustlsConnector::from(config),
            has_identity: identity.is_some(),
            asked_for_certificate,
        }))
    }

    /// Forgets what an earlier attempt with this configuration learnt, so
    /// that [`Tls::refused_for_lack_of_certificate`] speaks of the next one
    /// (attempts are made one at a time).
    pub(crate) fn start_attempt(&self) {
        self.asked_for_certificate.store(false, Ordering::Release);
    }

    /// Whether a connection that broke before the AMQP handshake broke
    /// because the broker wants a client certificate and none was given:
    /// the broker asked for one during the TLS handshake. Retrying cannot
    /// cure that.
    pub(crate) fn refused_for_lack_of_certificate(&self) -> bool {
        !self.has_identity && self.asked_for_certificate.load(Ordering::Acquire)
    }
}

/// Answers the broker's certificate request as configured, and notes that
/// it was asked.
#[derive(Debug)]
struct RecordsRequest {
    inner: Arc<dyn ResolvesClientCert>,
    asked: Arc<AtomicBool>,
}

impl ResolvesClientCert for RecordsRequest {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.asked.store(true, Ordering::Release);
        self.inner.resolve(root_hint_subjects, sigschemes)
    }

    fn only_raw_public_keys(&self) -> bool {
        self.inner.only_raw_public_keys()
    }

    fn has_certs(&self) -> bool {
        self.inner.has_certs()
    }
}

/// Whether an I/O error is a TLS failure that retrying cannot cure: a
/// certificate the client does not trust (or that does not name the
/// host), or a broker refusing the client's certificate. rustls reports
/// them as `InvalidData`; a broker's alert closes the handshake.
pub(crate) fn is_tls_failure(io: &std::io::Error) -> bool {
    if io.kind() == std::io::ErrorKind::InvalidData {
        return true;
    }
    let text = io.to_string().to_ascii_lowercase();
    ["certificate", "handshake", "alert", "tls"]
        .iter()
        .any(|w| text.contains(w))
}

/// Reads a PEM file named by the URL, with an error naming it.
fn read_pem(what: &str, path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        Error::InvalidArgument(format!("cannot read the {what} {}: {e}", path.display()))
    })
}

/// The certificates of PEM text; refuses text that holds none, or one that
/// does not parse, rather than trusting nothing and failing later with an
/// unknown issuer.
fn certificates(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidArgument(format!("the {what} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the {what} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(certs)
}
