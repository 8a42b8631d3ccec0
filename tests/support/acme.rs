//! What the ACME tests share: Pebble on loopback with a CA of the test's making,
//! pebble-challtestsrv as its DNS, and the TLS and readiness checks against the edge.
//! Included by `tests/acme.rs` and `tests/acme_config.rs` only (`#[path]`), so that the other
//! test binaries do not build it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::support::{free_port, raw, test_ca_and_leaf, Edge};

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A child process killed when the test ends, whatever happens.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn wait_tcp(a: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(a).await.is_err() {
        assert!(Instant::now() < deadline, "{what} did not start on {a}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pebble on loopback, with its HTTPS certificate from a CA the test made (the Debian package
/// ships none) and challenges validated against `dns` and the edge's HTTP port.
pub struct Pebble {
    _daemon: Daemon,
    pub directory: String,
    pub listen: SocketAddr,
    pub management: SocketAddr,
    /// The CA of Pebble's own HTTPS listener, as `ca_bundle` for the edge.
    pub https_ca: PathBuf,
    pub https_ca_der: CertificateDer<'static>,
}

impl Pebble {
    pub fn start(
        dir: &Path,
        dns: SocketAddr,
        http_port: u16,
        validity_secs: Option<u64>,
    ) -> Pebble {
        Pebble::start_with(dir, dns, http_port, validity_secs, None)
    }

    /// `eab`: (kid, base64url HMAC key) that every new account must be bound to.
    pub fn start_with(
        dir: &Path,
        dns: SocketAddr,
        http_port: u16,
        validity_secs: Option<u64>,
        eab: Option<(&str, &str)>,
    ) -> Pebble {
        let (ca, leaf, key) = test_ca_and_leaf("test CA for pebble's HTTPS");
        std::fs::create_dir_all(dir).unwrap();
        let https_ca = dir.join("pebble-https-ca.pem");
        std::fs::write(&https_ca, ca.pem()).unwrap();
        std::fs::write(dir.join("pebble.crt"), leaf.pem()).unwrap();
        std::fs::write(dir.join("pebble.key"), key.serialize_pem()).unwrap();
        let (port, management) = (free_port(), free_port());
        let mut conf = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("pebble.crt"),
            "privateKey": dir.join("pebble.key"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some(v) = validity_secs {
            conf["pebble"]["certificateValidityPeriod"] = v.into();
        }
        if let Some((kid, key)) = eab {
            conf["pebble"]["externalAccountBindingRequired"] = true.into();
            conf["pebble"]["externalAccountMACKeys"] = serde_json::json!({ kid: key });
        }
        std::fs::write(dir.join("pebble.json"), conf.to_string()).unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .arg("-dnsserver")
            .arg(dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble (Debian package `pebble`) must be installed");
        Pebble {
            _daemon: Daemon(child),
            directory: format!("https://127.0.0.1:{port}/dir"),
            listen: addr(port),
            management: addr(management),
            https_ca,
            https_ca_der: ca.der().clone(),
        }
    }

    pub async fn ready(&self) {
        wait_tcp(self.listen, "pebble").await;
        wait_tcp(self.management, "pebble management").await;
    }

    /// The root Pebble signs certificates with (random per run), from its management API.
    pub async fn issuing_root(&self) -> CertificateDer<'static> {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_der(&self.https_ca_der).unwrap()])
            .no_proxy()
            .build()
            .unwrap();
        let pem = client
            .get(format!(
                "https://127.0.0.1:{}/roots/0",
                self.management.port()
            ))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }
}

/// pebble-challtestsrv: a DNS server whose TXT records are set over its HTTP API.
pub struct ChallTestSrv {
    _daemon: Daemon,
    pub dns: SocketAddr,
    pub management: SocketAddr,
}

impl ChallTestSrv {
    pub async fn start() -> ChallTestSrv {
        let (dns, management) = (free_port(), free_port());
        let child = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-management", &format!("127.0.0.1:{management}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv (Debian package `pebble`) must be installed");
        let srv = ChallTestSrv {
            _daemon: Daemon(child),
            dns: addr(dns),
            management: addr(management),
        };
        wait_tcp(srv.management, "pebble-challtestsrv").await;
        srv
    }
}

/// Handshakes with `sni`, verifying the chain against `root`; returns the leaf.
pub async fn leaf_for(
    https: SocketAddr,
    sni: &str,
    root: &CertificateDer<'static>,
) -> std::io::Result<CertificateDer<'static>> {
    let (leaf, _) = connect(https, sni, root).await?;
    Ok(leaf)
}

pub async fn connect(
    https: SocketAddr,
    sni: &str,
    root: &CertificateDer<'static>,
) -> std::io::Result<(
    CertificateDer<'static>,
    tokio_rustls::client::TlsStream<TcpStream>,
)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(https).await?;
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    Ok((leaf, tls))
}

/// Waits for `/readyz` to say 200 (a certificate for every ACME domain is installed).
pub async fn wait_ready(edge: &Edge, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let r = raw(edge.admin, "127.0.0.1", "GET", "/readyz", &[], b"")
            .await
            .unwrap();
        if r.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate within {within:?}: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
