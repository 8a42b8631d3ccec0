//! `source = "http"` against a real control-plane server: coalescing, caches, stale-on-error.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use support::{echo_backend, raw, Edge};
use tokio::net::TcpListener;

struct ControlPlane {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    /// While set, every answer is a 503: the control plane is down.
    down: Arc<std::sync::atomic::AtomicBool>,
}

/// Knows VM `known` at 127.0.0.1; answers after 200 ms so concurrent lookups overlap.
/// Requires `Authorization: Bearer cp-token`.
async fn control_plane() -> ControlPlane {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (counter, is_down) = (hits.clone(), down.clone());
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let (counter, is_down) = (counter.clone(), is_down.clone());
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let authorized = req
                .headers()
                .get("authorization")
                .is_some_and(|v| v == "Bearer cp-token");
            let status = |code: u16| {
                Response::builder()
                    .status(code)
                    .body(Full::new(Bytes::new()))
            };
            let resp = match (authorized, req.uri().path()) {
                _ if is_down.load(Ordering::SeqCst) => status(503),
                (false, _) => status(401),
                (true, "/vms/known") => Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(
                        br#"{"address": "127.0.0.1"}"#,
                    ))),
                _ => status(404),
            };
            resp.unwrap()
        }
    });
    ControlPlane { addr, hits, down }
}

async fn edge_for(cp: &ControlPlane, cache_ttl: &str) -> Edge {
    Edge::start(&format!(
        "[registry]\nsource = \"http\"\nurl = \"http://{}/vms/{{id}}\"\ntoken = \"cp-token\"\n\
         timeout = \"2s\"\ncache_ttl = \"{cache_ttl}\"\nnegative_ttl = \"30s\"\nstale_for = \"5m\"\n",
        cp.addr
    ))
    .await
}

#[tokio::test]
async fn a_hundred_concurrent_requests_make_one_control_plane_lookup() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let cp = control_plane().await;
    let edge = edge_for(&cp, "30s").await;
    let host = Edge::host(b, "known");
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (addr, host) = (edge.http, host.clone());
        tasks.push(tokio::spawn(async move {
            raw(addr, &host, "GET", "/", &[], b"")
                .await
                .map(|r| r.status)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    assert_eq!(cp.hits.load(Ordering::SeqCst), 1);
    // and the positive cache answers the next one without asking
    assert_eq!(
        raw(edge.http, &host, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(cp.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unknown_ids_are_cached_too() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let cp = control_plane().await;
    let edge = edge_for(&cp, "30s").await;
    for _ in 0..3 {
        let r = raw(edge.http, &Edge::host(b, "ghost"), "GET", "/", &[], b"")
            .await
            .unwrap();
        assert_eq!((r.status, r.text().as_str()), (404, "unknown vm ghost\n"));
    }
    assert_eq!(cp.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn with_the_control_plane_down_a_recent_vm_keeps_routing() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let cp = control_plane().await;
    let edge = edge_for(&cp, "100ms").await;
    let host = Edge::host(b, "known");
    assert_eq!(
        raw(edge.http, &host, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    cp.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // the cache expired and the control plane fails: the last good answer is served
    assert_eq!(
        raw(edge.http, &host, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    // an id never seen cannot be served stale: 503, not a guess
    let r = raw(
        edge.http,
        &Edge::host(b, "never-seen"),
        "GET",
        "/",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
}
