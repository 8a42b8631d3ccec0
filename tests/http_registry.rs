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

/// A control plane on its own runtime, so the test can stop it for real: dropping the
/// runtime closes the listener and every connection the edge had pooled.
struct StoppableControlPlane {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl StoppableControlPlane {
    fn start() -> StoppableControlPlane {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let _inside = runtime.enter();
        let listener = TcpListener::from_std(std_listener).unwrap();
        support::spawn_http(listener, |req: Request<hyper::body::Incoming>| async move {
            if req.uri().path() == "/vms/known" {
                Response::new(Full::new(Bytes::from_static(
                    br#"{"address": "127.0.0.1"}"#,
                )))
            } else {
                Response::builder()
                    .status(404)
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }
        });
        StoppableControlPlane {
            addr,
            runtime: Some(runtime),
        }
    }

    fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for StoppableControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn with_the_control_plane_stopped_a_recent_vm_keeps_routing_for_stale_for() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let mut cp = StoppableControlPlane::start();
    let edge = Edge::start(&format!(
        "[registry]\nsource = \"http\"\nurl = \"http://{}/vms/{{id}}\"\n\
         timeout = \"1s\"\ncache_ttl = \"100ms\"\nstale_for = \"2s\"\n",
        cp.addr
    ))
    .await;
    let host = Edge::host(b, "known");
    assert_eq!(
        raw(edge.http, &host, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    cp.stop();
    // the runtime's worker drops the listener a moment later
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(cp.addr).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the control plane still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // connection refused, cache expired: the last good answer keeps routing
    assert_eq!(
        raw(edge.http, &host, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    // but only for stale_for: then the edge admits it does not know
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let r = raw(edge.http, &host, "GET", "/", &[], b"").await.unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (503, "registry unavailable for vm known\n")
    );
}

#[tokio::test]
async fn a_hanging_control_plane_costs_at_most_the_timeout() {
    support::install_crypto();
    let b = echo_backend().await.port();
    // accepts connections and never answers
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    support::spawn_http(
        listener,
        |_req: Request<hyper::body::Incoming>| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(Full::new(Bytes::new()))
        },
    );
    let edge = Edge::start(&format!(
        "[registry]\nsource = \"http\"\nurl = \"http://{addr}/vms/{{id}}\"\ntimeout = \"500ms\"\n"
    ))
    .await;
    let started = std::time::Instant::now();
    let r = raw(edge.http, &Edge::host(b, "known"), "GET", "/", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn control_plane_calls_in_flight_are_bounded_by_concurrency() {
    use cmux_edge::registry::{HttpSource, HttpSourceSettings, Registry};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (now, peak, hits) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (n, p, h) = (now.clone(), peak.clone(), hits.clone());
    support::spawn_http(listener, move |_req: Request<hyper::body::Incoming>| {
        let (n, p, h) = (n.clone(), p.clone(), h.clone());
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            let inside = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(inside, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Response::new(Full::new(Bytes::from_static(
                br#"{"address": "127.0.0.1"}"#,
            )))
        }
    });
    let source = Arc::new(
        HttpSource::new(HttpSourceSettings {
            url: format!("http://{addr}/vms/{{id}}"),
            token: None,
            timeout: Duration::from_secs(10),
            cache_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            stale_for: Duration::from_secs(300),
            concurrency: 4,
        })
        .unwrap(),
    );
    let lookups: Vec<_> = (0..200)
        .map(|i| {
            let source = source.clone();
            tokio::spawn(async move { source.lookup(&format!("vm{i}")).resolve().await })
        })
        .collect();
    for l in lookups {
        assert!(l.await.unwrap().unwrap().is_some());
    }
    assert_eq!(hits.load(Ordering::SeqCst), 200, "one call per distinct id");
    assert!(
        peak.load(Ordering::SeqCst) <= 4,
        "{} calls were in flight at once",
        peak.load(Ordering::SeqCst)
    );
}
