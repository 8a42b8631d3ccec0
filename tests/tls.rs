//! TLS termination over real handshakes: SNI selection, ALPN, h2 over TLS, hot reload.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use support::{echo_backend, raw, seen, Edge, DOMAIN};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A self-signed certificate for `names`, written as `dir/file.crt` + `dir/file.key`.
fn write_cert(dir: &Path, file: &str, names: &[&str]) -> CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    cert.der().clone()
}

fn config(backend_port: u16) -> String {
    format!(
        "[[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\nports = {{ 443 = {backend_port} }}\n\n[tls]\ncerts_dir = \"certs\"\n"
    )
}

/// Handshakes with `sni`, trusting `roots`; returns the served leaf and the ALPN protocol.
async fn handshake(
    addr: std::net::SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
) -> std::io::Result<(CertificateDer<'static>, Option<Vec<u8>>)> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    let leaf = conn.peer_certificates().unwrap()[0].clone().into_owned();
    Ok((leaf, conn.alpn_protocol().map(<[u8]>::to_vec)))
}

#[tokio::test]
async fn sni_picks_exact_then_wildcard_and_alpn_offers_h2() {
    support::install_crypto();
    let backend = echo_backend().await;
    let mut wild = None;
    let mut exact = None;
    let edge = Edge::start_with(&config(backend.port()), true, |dir| {
        let certs = dir.join("certs");
        // file names say nothing: certificates are chosen by the names inside them
        wild = Some(write_cert(&certs, "a", &["*.edge.test", "edge.test"]));
        exact = Some(write_cert(&certs, "b", &["port-443-vm-local.edge.test"]));
    })
    .await;
    let (wild, exact) = (wild.unwrap(), exact.unwrap());
    let roots = [wild.clone(), exact.clone()];
    let https = edge.https.unwrap();

    let (leaf, alpn) = handshake(https, "port-443-vm-local.edge.test", &roots)
        .await
        .unwrap();
    assert_eq!(leaf, exact);
    assert_eq!(alpn.as_deref(), Some(b"h2".as_slice()));
    let (leaf, _) = handshake(https, "port-5173-vm-local.edge.test", &roots)
        .await
        .unwrap();
    assert_eq!(leaf, wild);
    let (leaf, _) = handshake(https, DOMAIN, &roots).await.unwrap();
    assert_eq!(leaf, wild);
}

/// The handshake failed because the server sent a fatal `access_denied` alert.
fn assert_access_denied<T: std::fmt::Debug>(result: std::io::Result<T>) {
    let err = result.expect_err("the handshake succeeded");
    let tls = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a TLS error: {err:?}"));
    assert_eq!(
        tls,
        &rustls::Error::AlertReceived(rustls::AlertDescription::AccessDenied),
        "not the server's alert"
    );
}

#[tokio::test]
async fn a_name_without_a_certificate_fails_the_handshake_cleanly() {
    support::install_crypto();
    let backend = echo_backend().await;
    let mut wild = None;
    let edge = Edge::start_with(&config(backend.port()), true, |dir| {
        wild = Some(write_cert(&dir.join("certs"), "wild", &["*.edge.test"]));
    })
    .await;
    let roots = [wild.unwrap()];
    let https = edge.https.unwrap();
    // The server refuses with an alert; a wrong certificate would instead fail the client's
    // own verification (InvalidCertificate), and a dropped connection would be an I/O error.
    assert_access_denied(handshake(https, "other.example", &roots).await);
    // two labels deep is not covered by a one-level wildcard
    assert_access_denied(handshake(https, "a.b.edge.test", &roots).await);
    // and the listener still serves afterwards
    assert!(handshake(https, "port-1-vm-local.edge.test", &roots)
        .await
        .is_ok());
}

#[tokio::test]
async fn h2_over_tls_is_routed_by_authority_with_forwarded_proto_https() {
    support::install_crypto();
    let backend = echo_backend().await;
    let mut wild = None;
    let edge = Edge::start_with(&config(backend.port()), true, |dir| {
        wild = Some(write_cert(
            &dir.join("certs"),
            "wild",
            &["*.edge.test", "edge.test"],
        ));
    })
    .await;
    let https = edge.https.unwrap();
    let host = "port-443-vm-local.edge.test";
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_der(wild.unwrap().as_ref()).unwrap()])
        .resolve(host, https)
        .no_proxy()
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://{host}:{}/tls?x=1", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let j: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(j["path"], "/tls");
    assert_eq!(seen(&j, "x-forwarded-proto"), ["https"]);
    assert_eq!(seen(&j, "x-cmux-port-internal"), ["443"]);
}

#[tokio::test]
async fn a_certificate_added_at_run_time_is_served_without_restart() {
    support::install_crypto();
    let backend = echo_backend().await;
    let edge = Edge::start_with(&config(backend.port()), true, |dir| {
        std::fs::create_dir_all(dir.join("certs")).unwrap();
    })
    .await;
    let https = edge.https.unwrap();
    // no certificate yet: not ready, handshakes fail
    let r = raw(edge.admin, "127.0.0.1", "GET", "/readyz", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert!(r.text().contains("no TLS certificate"), "{}", r.text());

    let cert = write_cert(&edge.dir.path().join("certs"), "late", &["*.edge.test"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((leaf, _)) = handshake(
            https,
            "port-1-vm-local.edge.test",
            std::slice::from_ref(&cert),
        )
        .await
        {
            assert_eq!(leaf, cert);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = raw(edge.admin, "127.0.0.1", "GET", "/readyz", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_corrupt_pem_is_reported_and_the_certificate_loaded_before_keeps_serving() {
    support::install_crypto();
    let backend = echo_backend().await;
    let mut first = None;
    let edge = Edge::start_with(&config(backend.port()), true, |dir| {
        first = Some(write_cert(&dir.join("certs"), "site", &["*.edge.test"]));
    })
    .await;
    let first = first.unwrap();
    let https = edge.https.unwrap();
    let sni = "port-1-vm-local.edge.test";
    assert_eq!(
        handshake(https, sni, std::slice::from_ref(&first))
            .await
            .unwrap()
            .0,
        first
    );

    // A botched renewal: the certificate file is garbage now.
    let certs = edge.dir.path().join("certs");
    std::fs::write(
        certs.join("site.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    // A second pair dropped in at the same time proves the directory was re-read.
    let other = write_cert(&certs, "other", &["other.edge.test"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while handshake(https, "other.edge.test", std::slice::from_ref(&other))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the directory was not re-read");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        handshake(https, sni, std::slice::from_ref(&first))
            .await
            .unwrap()
            .0,
        first,
        "the name stays served by the certificate that loaded before"
    );
    let r = raw(edge.admin, "127.0.0.1", "GET", "/readyz", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}
