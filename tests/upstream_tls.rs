//! `scheme = "https"` VMs (README "Upstream TLS"): a real TLS backend reached by IP and by
//! name, verified against `[registry] tls_ca`; `tls_server_name` and `tls_verify = false`.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use support::{raw, Edge};
use tokio::net::TcpListener;

/// The policy keys these tests rely on, written out so built-in defaults do not matter.
const POLICY: &str = "[[policy]]\nport = \"*\"\ninject_shim = false\nembed = false\n";

/// A test CA, and a leaf it signed for `localhost` and `127.0.0.1`.
struct Pki {
    ca_pem: String,
    leaf: (Vec<u8>, Vec<u8>),
}

fn pki() -> Pki {
    let (ca, leaf, key) = support::test_ca_and_leaf("test CA for VM certificates");
    Pki {
        ca_pem: ca.pem(),
        leaf: (leaf.der().to_vec(), key.serialize_der()),
    }
}

/// A self-signed certificate for `localhost` that no configured CA vouches for.
fn self_signed() -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.der().to_vec(), key.serialize_der())
}

/// An HTTPS server on 127.0.0.1 that answers `sni=<the SNI it got, or "-">`.
async fn tls_backend((cert, key): (Vec<u8>, Vec<u8>)) -> SocketAddr {
    support::install_crypto();
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.into()],
            rustls::pki_types::PrivateKeyDer::try_from(key).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = stream.get_ref().1.server_name().unwrap_or("-").to_owned();
                let svc = hyper::service::service_fn(move |_req| {
                    let body = format!("sni={sni}");
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    addr
}

/// An edge whose `[registry] tls_ca` is `ca_pem` (as `vm-ca.pem`), with these VMs.
async fn edge_trusting(ca_pem: String, vms: &str) -> Edge {
    Edge::start_with(
        &format!("[registry]\ntls_ca = \"vm-ca.pem\"\n\n{vms}\n{POLICY}"),
        false,
        move |dir| std::fs::write(dir.join("vm-ca.pem"), ca_pem).unwrap(),
    )
    .await
}

async fn get(edge: &Edge, port: u16, id: &str) -> (u16, String) {
    let r = raw(edge.http, &Edge::host(port, id), "GET", "/", &[], b"")
        .await
        .unwrap();
    (r.status, r.text())
}

#[tokio::test]
async fn https_vms_are_verified_by_ip_and_by_name_against_the_configured_ca() {
    let pki = pki();
    let signed = tls_backend(pki.leaf.clone()).await;
    let p = signed.port();
    let edge = edge_trusting(
        pki.ca_pem.clone(),
        "[[registry.vms]]\nid = \"byip\"\naddress = \"127.0.0.1\"\nscheme = \"https\"\n\n\
         [[registry.vms]]\nid = \"byname\"\naddress = \"localhost\"\nscheme = \"https\"\n\n\
         [[registry.vms]]\nid = \"named\"\naddress = \"127.0.0.1\"\nscheme = \"https\"\n\
         tls_server_name = \"localhost\"\n\n\
         [[registry.vms]]\nid = \"wrongname\"\naddress = \"127.0.0.1\"\nscheme = \"https\"\n\
         tls_server_name = \"other.test\"\n",
    )
    .await;
    // An IP address: no SNI (RFC 6066), the certificate's IP SAN is what is checked.
    assert_eq!(get(&edge, p, "byip").await, (200, "sni=-".to_owned()));
    // A name: sent as SNI and checked.
    assert_eq!(
        get(&edge, p, "byname").await,
        (200, "sni=localhost".to_owned())
    );
    assert_eq!(
        get(&edge, p, "named").await,
        (200, "sni=localhost".to_owned())
    );
    // A name the certificate does not carry fails verification: 502, never the VM's answer.
    let (status, body) = get(&edge, p, "wrongname").await;
    assert_eq!(status, 502, "{body}");
}

#[tokio::test]
async fn a_self_signed_vm_needs_tls_verify_false() {
    let backend = tls_backend(self_signed()).await;
    let p = backend.port();
    let edge = Edge::start(&format!(
        "[[registry.vms]]\nid = \"strict\"\naddress = \"127.0.0.1\"\nscheme = \"https\"\n\n\
         [[registry.vms]]\nid = \"dev\"\naddress = \"localhost\"\nscheme = \"https\"\ntls_verify = false\n\n\
         [[registry.vms]]\nid = \"devip\"\naddress = \"127.0.0.1\"\nscheme = \"https\"\ntls_verify = false\n\n{POLICY}"
    ))
    .await;
    let (status, body) = get(&edge, p, "strict").await;
    assert_eq!(status, 502, "an unknown issuer is refused: {body}");
    assert_eq!(
        get(&edge, p, "dev").await,
        (200, "sni=localhost".to_owned())
    );
    assert_eq!(get(&edge, p, "devip").await, (200, "sni=-".to_owned()));
}

/// A new `tls_ca` applies to the next request even where a connection verified under the old
/// one sits in the pool: a CA taken out of the bundle vouches for nothing from the reload on.
#[tokio::test]
async fn a_reloaded_tls_ca_is_not_bypassed_by_a_pooled_connection() {
    let (old, other) = (pki(), pki());
    let backend = tls_backend(old.leaf.clone()).await;
    let p = backend.port();
    let edge = edge_trusting(
        old.ca_pem.clone(),
        "[[registry.vms]]\nid = \"byip\"\naddress = \"127.0.0.1\"\nscheme = \"https\"\n",
    )
    .await;
    assert_eq!(get(&edge, p, "byip").await, (200, "sni=-".to_owned()));

    let reloads = r#"cmux_edge_config_reloads_total{result="ok"}"#;
    let before = support::metric(edge.admin, reloads).await.unwrap_or(0.0);
    let ca = edge.dir.path().join("vm-ca.pem");
    std::fs::write(ca.with_extension("tmp"), &other.ca_pem).unwrap();
    std::fs::rename(ca.with_extension("tmp"), &ca).unwrap();
    edge.signal("HUP");
    support::wait_metric(edge.admin, reloads, |n| n > before).await;

    let (status, body) = get(&edge, p, "byip").await;
    assert_eq!(status, 502, "the old CA's connection was reused: {body}");
}
