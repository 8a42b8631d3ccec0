//! HEAD → GET fallback against a slow endless GET body (SPEC §5, §11): the client's HEAD is
//! answered (headers, the GET's real `Content-Length`, no body) over HTTP/1.1 and HTTP/2, and
//! the edge stops reading the GET body, closing that upstream connection.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{raw, Edge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The length the GET claims; the body trickles forever.
const LENGTH: &str = "1000000000";

/// A raw HTTP/1.1 backend: HEAD → 405; GET → 200 with a huge length and a slow endless body.
/// Counts GET bodies whose connection the peer closed.
async fn endless_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let counter = closed.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s, counter.clone()));
        }
    });
    (addr, closed)
}

async fn serve(mut s: TcpStream, closed: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        if head.starts_with("HEAD ") {
            let r = b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n";
            if s.write_all(r).await.is_err() {
                return;
            }
            continue;
        }
        let r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {LENGTH}\r\n\r\n"
        );
        if s.write_all(r.as_bytes()).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if s.write_all(&[b'x'; 1024]).await.is_err() {
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
}

async fn setup() -> (Edge, Arc<AtomicUsize>) {
    support::install_crypto();
    let (b, closed) = endless_backend().await;
    let edge = Edge::start(&format!(
        "[[registry.vms]]\nid = \"v\"\naddress = \"127.0.0.1\"\nports = {{ 39378 = {} }}\n\n\
         [[policy]]\nport = 39378\ninject_shim = false\n",
        b.port()
    ))
    .await;
    (edge, closed)
}

/// Waits (generously) for the backend to see its GET connection closed.
async fn upstream_closed(closed: &AtomicUsize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while closed.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the edge kept reading the GET body behind a HEAD"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn head_fallback_over_http1_ends_and_stops_reading() {
    let (edge, closed) = setup().await;
    let host = Edge::host(39378, "v");
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        raw(edge.http, &host, "HEAD", "/", &[], b""),
    )
    .await
    .expect("the HEAD never completed")
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(LENGTH));
    assert!(r.body.is_empty());
    upstream_closed(&closed).await;
}

#[tokio::test]
async fn head_fallback_over_http2_ends_and_stops_reading() {
    let (edge, closed) = setup().await;
    let host = Edge::host(39378, "v");
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve(&host, edge.http)
        .no_proxy()
        .build()
        .unwrap();
    let url = format!("http://{host}:{}/", edge.http.port());
    let r = tokio::time::timeout(Duration::from_secs(20), client.head(&url).send())
        .await
        .expect("the HEAD never completed")
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        r.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(LENGTH)
    );
    // The stream ends cleanly: an empty body, not a reset or a hang.
    let body = tokio::time::timeout(Duration::from_secs(20), r.bytes())
        .await
        .expect("the HEAD's HTTP/2 stream never ended")
        .expect("the HEAD's HTTP/2 stream was reset");
    assert!(body.is_empty());
    upstream_closed(&closed).await;
}
