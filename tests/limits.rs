//! `[limits]` (SPEC §11) over real sockets: the real binary, real backends and clients, the
//! metric read from `/metrics`.
//!
//! - `requests_per_ip` with `burst_per_ip`: the burst passes, the next is 429 with
//!   `Retry-After`; another client is not affected.
//! - Keying: two clients behind one trusted proxy are counted apart; an untrusted peer's
//!   `X-Forwarded-For` changes nothing.
//! - `requests_per_vm`, `websockets_per_vm` (refused before the 101), `connections_per_ip`
//!   (closed at accept), each with its slot given back when the holder ends.
//! - `unknown_ids_per_ip`: a spray of random ids stops reaching a recording control plane.
//! - `dry_run`, `cmux_edge_limited_total{limit,dry_run}`, and a reload keeps the counts.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use support::{echo_backend, raw, raw_from, ws_backend, Edge, RawResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

/// VM `v` at 127.0.0.1, VM `w` too, `127.0.0.2` a trusted proxy, and `limits`.
fn config(limits: &str) -> String {
    format!(
        "[[registry.vms]]\nid = \"v\"\naddress = \"127.0.0.1\"\n\n\
         [[registry.vms]]\nid = \"w\"\naddress = \"127.0.0.1\"\n\n\
         [trust]\nproxies = [\"127.0.0.2\"]\n\n\
         [limits]\n{limits}\n"
    )
}

async fn get_from(
    edge: &Edge,
    from: Option<IpAddr>,
    host: &str,
    headers: &[(&str, &str)],
) -> RawResponse {
    raw_from(from, edge.http, host, "GET", "/", headers, b"")
        .await
        .unwrap()
}

/// `cmux_edge_limited_total{limit,dry_run}` from `/metrics` (0 when absent).
async fn limited(edge: &Edge, limit: &str, dry_run: bool) -> u64 {
    let r = raw(edge.admin, "127.0.0.1", "GET", "/metrics", &[], b"")
        .await
        .unwrap();
    let want = format!("cmux_edge_limited_total{{dry_run=\"{dry_run}\",limit=\"{limit}\"}} ");
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn assert_limited(r: &RawResponse, limit: &str) {
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.text(), format!("rate limited: {limit}\n"));
    let retry: u32 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry >= 1, "Retry-After is never 0");
}

#[tokio::test]
async fn a_client_over_its_request_rate_and_burst_gets_429_with_retry_after() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&config("requests_per_ip = \"1/min\"\nburst_per_ip = 3")).await;
    let host = Edge::host(b, "v");
    for i in 0..3 {
        let r = get_from(&edge, ip("127.0.0.1"), &host, &[]).await;
        assert_eq!(
            r.status,
            200,
            "request {i} is within the burst: {}",
            r.text()
        );
    }
    let r = get_from(&edge, ip("127.0.0.1"), &host, &[]).await;
    assert_limited(&r, "requests_per_ip");
    let retry: u32 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "one request a minute: {retry}");
    // another client has its own bucket
    let r = get_from(&edge, ip("127.0.0.3"), &host, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(limited(&edge, "requests_per_ip", false).await, 1);
    assert_eq!(limited(&edge, "requests_per_ip", true).await, 0);
}

#[tokio::test]
async fn two_clients_behind_one_trusted_proxy_are_limited_separately() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&config("requests_per_ip = \"1/min\"\nburst_per_ip = 2")).await;
    let host = Edge::host(b, "v");
    let proxy = ip("127.0.0.2");
    let one = [("X-Forwarded-For", "203.0.113.1")];
    let two = [("X-Forwarded-For", "203.0.113.2")];
    for _ in 0..2 {
        assert_eq!(get_from(&edge, proxy, &host, &one).await.status, 200);
    }
    assert_limited(
        &get_from(&edge, proxy, &host, &one).await,
        "requests_per_ip",
    );
    for _ in 0..2 {
        assert_eq!(get_from(&edge, proxy, &host, &two).await.status, 200);
    }
    assert_limited(
        &get_from(&edge, proxy, &host, &two).await,
        "requests_per_ip",
    );
}

#[tokio::test]
async fn an_untrusted_peers_x_forwarded_for_changes_nothing() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&config("requests_per_ip = \"1/min\"\nburst_per_ip = 2")).await;
    let host = Edge::host(b, "v");
    let from = ip("127.0.0.4");
    for n in 1..=2 {
        let xff = format!("198.51.100.{n}");
        let r = get_from(&edge, from, &host, &[("X-Forwarded-For", &xff)]).await;
        assert_eq!(r.status, 200);
    }
    let r = get_from(&edge, from, &host, &[("X-Forwarded-For", "198.51.100.9")]).await;
    assert_limited(&r, "requests_per_ip");
}

/// Answers `/hold` only once `release` is set (counting arrivals), anything else at once.
async fn holding_backend() -> (SocketAddr, Arc<AtomicUsize>, Arc<tokio::sync::Notify>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let (a, r) = (arrived.clone(), release.clone());
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let (a, r) = (a.clone(), r.clone());
        async move {
            if req.uri().path() == "/hold" {
                let released = r.notified();
                a.fetch_add(1, Ordering::SeqCst);
                released.await;
            }
            Response::new(Full::new(Bytes::from_static(b"done")))
        }
    });
    (addr, arrived, release)
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn requests_over_requests_per_vm_are_refused_until_one_ends() {
    support::install_crypto();
    let (backend, arrived, release) = holding_backend().await;
    let edge = Edge::start(&config("requests_per_vm = 2")).await;
    let host = Edge::host(backend.port(), "v");
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (addr, host) = (edge.http, host.clone());
            tokio::spawn(async move { raw(addr, &host, "GET", "/hold", &[], b"").await })
        })
        .collect();
    until("two requests at the VM", || {
        arrived.load(Ordering::SeqCst) == 2
    })
    .await;
    let r = raw(edge.http, &host, "GET", "/", &[], b"").await.unwrap();
    assert_limited(&r, "requests_per_vm");
    // another VM has its own count
    let other = raw(
        edge.http,
        &Edge::host(backend.port(), "w"),
        "GET",
        "/",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(other.status, 200);
    release.notify_waiters();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
    let r = raw(edge.http, &host, "GET", "/", &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "the slots were given back");
    assert_eq!(limited(&edge, "requests_per_vm", false).await, 1);
}

fn ws_request(edge: &Edge, port: u16, id: &str) -> http::Request<()> {
    let mut req = format!("ws://{}/ws", edge.http)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("host", Edge::host(port, id).parse().unwrap());
    req
}

#[tokio::test]
async fn a_websocket_over_websockets_per_vm_is_refused_before_its_101() {
    support::install_crypto();
    let (ws, _) = ws_backend().await;
    let edge = Edge::start(&config("websockets_per_vm = 1")).await;
    let (first, resp) = tokio_tungstenite::connect_async(ws_request(&edge, ws.port(), "v"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    match tokio_tungstenite::connect_async(ws_request(&edge, ws.port(), "v")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 429);
            assert!(resp.headers().get("retry-after").is_some());
        }
        other => panic!(
            "expected a 429 before any 101, got {:?}",
            other.map(|r| r.1)
        ),
    }
    // another VM is not affected
    let (_other, resp) = tokio_tungstenite::connect_async(ws_request(&edge, ws.port(), "w"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    drop(first);
    // once the first WebSocket is closed, its slot is free again
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio_tungstenite::connect_async(ws_request(&edge, ws.port(), "v")).await {
            Ok((_, resp)) => {
                assert_eq!(resp.status(), 101);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "slot never freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(limited(&edge, "websockets_per_vm", false).await >= 1);
}

/// A keep-alive connection from `from` that has had one request answered.
async fn open_connection(edge: &Edge, from: &str, host: &str) -> std::io::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    let mut stream = s.connect(edge.http).await?;
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    if n == 0 || !buf.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "closed or refused: {}",
            String::from_utf8_lossy(&buf[..n])
        )));
    }
    Ok(stream)
}

#[tokio::test]
async fn connections_over_connections_per_ip_are_closed_at_accept() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&config("connections_per_ip = 2")).await;
    let host = Edge::host(b, "v");
    let one = open_connection(&edge, "127.0.0.5", &host).await.unwrap();
    let _two = open_connection(&edge, "127.0.0.5", &host).await.unwrap();
    let third = open_connection(&edge, "127.0.0.5", &host).await;
    assert!(third.is_err(), "a third connection is closed unanswered");
    // another client address is not affected
    let _other = open_connection(&edge, "127.0.0.6", &host).await.unwrap();
    drop(one);
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = open_connection(&edge, "127.0.0.5", &host).await {
        assert!(Instant::now() < deadline, "slot never freed: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(limited(&edge, "connections_per_ip", false).await >= 1);
}

#[tokio::test]
async fn dry_run_counts_and_logs_but_refuses_nothing() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&config(
        "requests_per_ip = \"1/min\"\nburst_per_ip = 1\ndry_run = true",
    ))
    .await;
    let host = Edge::host(b, "v");
    for _ in 0..3 {
        assert_eq!(
            get_from(&edge, ip("127.0.0.1"), &host, &[]).await.status,
            200
        );
    }
    assert_eq!(limited(&edge, "requests_per_ip", true).await, 2);
    assert_eq!(limited(&edge, "requests_per_ip", false).await, 0);
}

#[tokio::test]
async fn a_reload_neither_resets_nor_forgets_a_count() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let limits = "requests_per_ip = \"1/min\"\nburst_per_ip = 2";
    let edge = Edge::start(&config(limits)).await;
    let host = Edge::host(b, "v");
    for _ in 0..2 {
        assert_eq!(
            get_from(&edge, ip("127.0.0.1"), &host, &[]).await.status,
            200
        );
    }
    let path = edge.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n# reloaded\n")).unwrap();
    let reloads = || async {
        let r = raw(edge.admin, "127.0.0.1", "GET", "/metrics", &[], b"")
            .await
            .unwrap();
        r.text()
            .contains("cmux_edge_config_reloads_total{result=\"ok\"} 1")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reloads().await {
        assert!(Instant::now() < deadline, "no reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_limited(
        &get_from(&edge, ip("127.0.0.1"), &host, &[]).await,
        "requests_per_ip",
    );
}

/// A control plane that knows `known` (at 127.0.0.1) and records every question.
async fn recording_control_plane() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            if req.uri().path() == "/vms/known" {
                Response::new(Full::new(Bytes::from_static(
                    br#"{"address": "127.0.0.1"}"#,
                )))
            } else {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                r
            }
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn a_spray_of_unknown_ids_stops_reaching_the_control_plane() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let (cp, hits) = recording_control_plane().await;
    let edge = Edge::start(&format!(
        "[registry]\nsource = \"http\"\nurl = \"http://{cp}/vms/{{id}}\"\n\
         timeout = \"5s\"\ncache_ttl = \"5m\"\nnegative_ttl = \"5m\"\n\n\
         [limits]\nunknown_ids_per_ip = \"3/min\"\n"
    ))
    .await;
    let known = Edge::host(b, "known");
    assert_eq!(
        raw(edge.http, &known, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    for i in 0..20 {
        let r = raw(
            edge.http,
            &Edge::host(b, &format!("spray{i}")),
            "GET",
            "/",
            &[],
            b"",
        )
        .await
        .unwrap();
        if i < 3 {
            assert_eq!(r.status, 404, "miss {i} is within the budget: {}", r.text());
        } else {
            assert_limited(&r, "unknown_ids_per_ip");
        }
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        4,
        "the control plane heard the known id and three misses, nothing more"
    );
    // ids the cache knows still answer for the sprayer: the known VM, a cached miss
    assert_eq!(
        raw(edge.http, &known, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    let cached_miss = Edge::host(b, "spray0");
    assert_eq!(
        raw(edge.http, &cached_miss, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        404
    );
    // another client still gets its answers
    let other = raw_from(
        ip("127.0.0.3"),
        edge.http,
        &Edge::host(b, "fresh"),
        "GET",
        "/",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(other.status, 404);
    assert_eq!(hits.load(Ordering::SeqCst), 5);
    assert_eq!(limited(&edge, "unknown_ids_per_ip", false).await, 17);
}
