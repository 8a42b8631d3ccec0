//! The backend behind every proxy in `benches/compare`: small and fast, so that the proxy is
//! what gets measured. One thread (the harness pins it next to the load generator).
//!
//! - `GET /small` → 200, a fixed 32-byte `text/plain` body
//! - `GET /64k`   → 200, 65,536 bytes of `application/octet-stream`
//! - `GET /ws`    → WebSocket echo (every text/binary message is sent back)
//! - anything else → 404
//!
//! `--http ADDR` serves HTTP/1.1; `--tls ADDR --cert F --key F` also serves TLS with ALPN h2 and
//! http/1.1, so the "direct" column of the TLS workloads has a baseline too.
//!
//! usage: bench_backend --http 127.0.0.1:9000 [--tls 127.0.0.1:9443 --cert C --key K]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

const SMALL: &[u8; 32] = b"hello from the bench backend :)\n";

struct Bodies {
    small: Bytes,
    big: Bytes,
}

fn plain(status: StatusCode, ctype: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

async fn handle(
    bodies: Arc<Bodies>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/small" => plain(StatusCode::OK, "text/plain", bodies.small.clone()),
        "/64k" => plain(
            StatusCode::OK,
            "application/octet-stream",
            bodies.big.clone(),
        ),
        "/ws" => {
            let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
                return Ok(plain(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "not a websocket request\n".into(),
                ));
            };
            let accept = derive_accept_key(key.as_bytes());
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(io) = upgrade.await else { return };
                let mut ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert(header::CONNECTION, "upgrade".parse().unwrap());
            h.insert(header::UPGRADE, "websocket".parse().unwrap());
            h.insert(header::SEC_WEBSOCKET_ACCEPT, accept.parse().unwrap());
            r
        }
        _ => plain(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn tls_acceptor(cert: &str, key: &str) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench_backend --http ADDR [--tls ADDR --cert FILE --key FILE]";
    let http: SocketAddr = arg(&args, "--http")
        .ok_or_else(|| anyhow::anyhow!(usage))?
        .parse()?;
    let tls = match (
        arg(&args, "--tls"),
        arg(&args, "--cert"),
        arg(&args, "--key"),
    ) {
        (Some(a), Some(c), Some(k)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            Some((a.parse::<SocketAddr>()?, tls_acceptor(&c, &k)?))
        }
        (None, _, _) => None,
        _ => anyhow::bail!(usage),
    };
    let bodies = Arc::new(Bodies {
        small: Bytes::from_static(SMALL),
        big: Bytes::from(vec![b'x'; 65536]),
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let plain_listener = TcpListener::bind(http).await?;
        if let Some((addr, acceptor)) = tls {
            let listener = TcpListener::bind(addr).await?;
            let bodies = bodies.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        // Out of descriptors: let connections close rather than spin.
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let (acceptor, bodies) = (acceptor.clone(), bodies.clone());
                    tokio::spawn(async move {
                        let Ok(stream) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(move |r| handle(bodies.clone(), r));
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        }
        println!("bench_backend listening on {http}");
        loop {
            let Ok((tcp, _)) = plain_listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| handle(bodies.clone(), r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    })
}
