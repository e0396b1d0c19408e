//! TLS against a real RabbitMQ TLS listener: an extra node started by this
//! test (`bus-t1@localhost`, TLS on port 5696, mutual TLS required with
//! `fail_if_no_peer_cert`), with certificates made in the run by the
//! `openssl` command. The shared default node is not touched.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bus_amqp::{AmqpConnection, AmqpOptions};
use bus_core::{Connection, ConnectionExt, ConsumeOptions, Error, Message, QueueOptions};
use support::cluster::Cluster;
use support::*;

const TLS_PORT: u16 = 5696;

/// A private CA, a server certificate for localhost and 127.0.0.1 signed by
/// it, a client certificate signed by it, and an unrelated CA; removed
/// when dropped.
struct Certificates {
    dir: PathBuf,
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): install it (apt-get install openssl)")
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certificates {
    fn make() -> Certificates {
        let dir =
            std::env::temp_dir().join(format!("bus-amqp-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let certs = Certificates { dir };
        let d = &certs.dir;
        for ca in ["ca", "wrong-ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-subj",
                    &format!("/CN=bus test {ca}"),
                ],
            );
        }
        for (who, usage, cn) in [
            ("server", "serverAuth", "localhost"),
            ("client", "clientAuth", "bus-client"),
        ] {
            std::fs::write(
                d.join(format!("{who}.ext")),
                format!(
                    "subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:rabbit.test\nbasicConstraints=CA:FALSE\n\
                     keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
                ),
            )
            .unwrap();
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{who}.key"),
                    "-out",
                    &format!("{who}.csr"),
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{who}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &format!("{who}.pem"),
                    "-extfile",
                    &format!("{who}.ext"),
                ],
            );
        }
        std::fs::write(d.join("garbage.pem"), "this is not a certificate\n").unwrap();
        certs
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn node_conf(&self) -> String {
        format!(
            "listeners.ssl.default = 127.0.0.1:{TLS_PORT}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n",
            self.path("ca.pem"),
            self.path("server.pem"),
            self.path("server.key"),
        )
    }
}

fn url(host: &str, query: &str) -> String {
    format!("amqps://guest:guest@{host}:{TLS_PORT}/%2f?{query}")
}

async fn connect_err(url: &str) -> Error {
    let options = AmqpOptions::default().with_connect_timeout(Duration::from_secs(10));
    match within(
        30,
        "a TLS connection attempt",
        AmqpConnection::connect_with(url, options),
    )
    .await
    {
        Ok(_) => panic!("connected to {url}"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_from_the_url_private_ca_client_certificate_and_clear_failures() {
    let certs = Certificates::make();
    let conf = certs.node_conf();
    let cluster = tokio::task::spawn_blocking(move || Cluster::start_with("t", 5695, 1, &conf))
        .await
        .expect("start the TLS node");
    let ca = certs.path("ca.pem");
    let identity = format!(
        "certfile={}&keyfile={}",
        certs.path("client.pem"),
        certs.path("client.key")
    );

    // The private CA and the client certificate, all from the URL (what
    // bus::connect hands over), by host name and by IP address.
    for host in ["localhost", "127.0.0.1"] {
        let conn = within(
            30,
            "the TLS connection",
            AmqpConnection::connect(&url(host, &format!("cacertfile={ca}&{identity}"))),
        )
        .await
        .unwrap_or_else(|e| panic!("TLS to {host} with the private CA: {e}"));
        let q = fresh("tls");
        conn.declare_queue(&q, QueueOptions::default())
            .await
            .unwrap();
        conn.send_to_queue(&q, Message::new("over tls"))
            .await
            .unwrap();
        let mut c = conn.consume(&q, ConsumeOptions::prefetch(1)).await.unwrap();
        let d = next_delivery(&mut c, 10, "the message over TLS").await;
        assert_eq!(&d.message.body[..], b"over tls");
        d.ack().await.unwrap();
        drop(c);
        conn.delete_queue(&q, Default::default()).await.unwrap();
        conn.close().await.unwrap();
    }

    // A TLS name other than the host (`server_name_indication`): the node
    // is reached at 127.0.0.1, and its certificate is checked for
    // rabbit.test, a name it carries but that resolves nowhere.
    let conn = within(
        30,
        "the TLS connection with a server name",
        AmqpConnection::connect(&url(
            "127.0.0.1",
            &format!("cacertfile={ca}&{identity}&server_name_indication=rabbit.test"),
        )),
    )
    .await
    .unwrap_or_else(|e| panic!("TLS to 127.0.0.1 as rabbit.test: {e}"));
    assert!(conn.is_open());
    conn.close().await.unwrap();
    // A name the certificate does not carry: refused, permanently, and the
    // error says which name was checked.
    let e = connect_err(&url(
        "127.0.0.1",
        &format!("cacertfile={ca}&{identity}&server_name_indication=other.test"),
    ))
    .await;
    assert!(!e.is_temporary(), "a name mismatch is permanent: {e}");
    let text = e.to_string();
    assert!(
        text.contains("\"other.test\"") && text.to_lowercase().contains("certificate"),
        "{text}"
    );
    // A malformed name is refused before connecting.
    let e = connect_err(&url(
        "127.0.0.1",
        &format!("cacertfile={ca}&server_name_indication=not%20a%20name"),
    ))
    .await;
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("server_name_indication")),
        "{e:?}"
    );

    // A CA that did not sign the broker's certificate: permanent.
    let e = connect_err(&url(
        "localhost",
        &format!("cacertfile={}&{identity}", certs.path("wrong-ca.pem")),
    ))
    .await;
    assert!(
        !e.is_temporary(),
        "an untrusted certificate is permanent: {e}"
    );
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");

    // No client certificate where the broker requires one: permanent. The
    // listener speaks TLS 1.3 (the broker's default), where the client's
    // side of the handshake completes before the broker checks for a
    // certificate, and the broker's refusal arrives either as an alert or,
    // when the client's first AMQP bytes meet the closed socket, as a bare
    // reset (about one attempt in seven here). Both must be permanent and
    // say why, so the case is tried many times.
    for attempt in 0..20 {
        let e = connect_err(&url("localhost", &format!("cacertfile={ca}"))).await;
        assert!(
            !e.is_temporary(),
            "attempt {attempt}: a refused client is permanent: {e}"
        );
        let text = e.to_string();
        assert!(
            text.contains("TLS") && text.to_lowercase().contains("certificate"),
            "attempt {attempt}: {text}"
        );
    }

    // A CA file that cannot be read, or holds no certificate: said so.
    let e = connect_err(&url("localhost", "cacertfile=/nonexistent/ca.pem")).await;
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("/nonexistent/ca.pem")),
        "{e:?}"
    );
    let e = connect_err(&url(
        "localhost",
        &format!("cacertfile={}", certs.path("garbage.pem")),
    ))
    .await;
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("no PEM certificate")),
        "{e:?}"
    );
    // A client certificate without its key is a malformed URL.
    let e = connect_err(&url(
        "localhost",
        &format!("cacertfile={ca}&certfile={}", certs.path("client.pem")),
    ))
    .await;
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("keyfile")),
        "{e:?}"
    );

    tokio::task::block_in_place(|| drop(cluster));
    drop(certs);
}
