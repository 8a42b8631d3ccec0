//! Headless Chromium loads a preview page through cmux-edge. The page calls
//! `fetch('http://localhost:<B>/data')`, XHR, opens `new WebSocket('ws://localhost:<W>/')`,
//! and is itself reached through a loopback redirect. The test passes only when every answer
//! came from the right backend *through the edge*: the backends also listen on 127.0.0.1, so a
//! URL the shim failed to rewrite would reach them directly and report `direct`.
//!
//! Chromium runs in real time (no virtual-time budget, which does not wait for WebSocket
//! traffic); the page reports what it saw by POSTing to its own backend, and the test waits for
//! that report with a bound.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use support::{ws_backend, Edge};
use tokio::net::TcpListener;

/// Every request a backend saw, as `"<path>:<edge|direct>:<body>"`.
type Seen = Arc<Mutex<Vec<String>>>;

/// A backend whose answers say whether they came through the edge.
async fn backend(page: String) -> (SocketAddr, Seen) {
    serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), page)
}

fn serve(listener: TcpListener, page: String) -> (SocketAddr, Seen) {
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let (page, log) = (page.clone(), log.clone());
        async move {
            let via = if req.headers().contains_key("x-cmux-proxied") {
                "edge"
            } else {
                "direct"
            };
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or("0").to_owned();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            log.lock()
                .unwrap()
                .push(format!("{path}:{via}:{}", String::from_utf8_lossy(&body)));
            let html = |body: String| {
                Response::builder()
                    .header("content-type", "text/html; charset=utf-8")
                    .body(Full::new(Bytes::from(body)))
            };
            let resp = match path.as_str() {
                "/start" => Response::builder()
                    .status(302)
                    .header("location", format!("http://localhost:{}/page", addr.port()))
                    .body(Full::new(Bytes::new())),
                "/nav" => html(format!(
                    "<!doctype html><html><head></head><body>leaving<script>\
                     setTimeout(() => {{ location.href = 'http://localhost:{query}/landed'; }}, 50);\
                     </script></body></html>"
                )),
                "/page" => html(page.replace("VIA", via)),
                _ => Response::builder()
                    .header("content-type", "text/plain")
                    .body(Full::new(Bytes::from(format!("{path}:{via}")))),
            };
            resp.unwrap()
        }
    });
    (addr, seen)
}

fn page(data_port: u16, ws_port: u16) -> String {
    format!(
        r#"<!doctype html><html><head><title>preview</title></head><body>
<script>
const out = {{ page: "VIA" }};
const done = () => {{
  if ("fetch" in out && "xhr" in out && "ws" in out)
    fetch("/report", {{ method: "POST", body: JSON.stringify(out) }});
}};
fetch("http://localhost:{data_port}/data").then(r => r.text())
  .then(t => {{ out.fetch = t; done(); }}, e => {{ out.fetch = "error " + e; done(); }});
const xhr = new XMLHttpRequest();
xhr.open("GET", "http://127.0.0.1:{data_port}/xhr");
xhr.onload = () => {{ out.xhr = xhr.responseText; done(); }};
xhr.onerror = () => {{ out.xhr = "error"; done(); }};
xhr.send();
const ws = new WebSocket("ws://localhost:{ws_port}/");
ws.onopen = () => ws.send("ping-through-edge");
ws.onmessage = m => {{ out.ws = m.data; done(); ws.close(); }};
ws.onerror = () => {{ out.ws = "error"; done(); }};
</script></body></html>"#
    )
}

/// cmux-edge serving domain `localhost` (which Chromium resolves itself) and VM `local`.
async fn localhost_edge() -> Edge {
    // The cmux preset: the shim, and CORS for the page's rewritten cross-port fetches.
    let edge = Edge::start(
        "[[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n\n\
         [[policy]]\nport = \"*\"\ncors = \"permissive\"\nallow_origins = [\"http://*.localhost:*\"]\n\
         inject_shim = true\nrewrite_redirects = true\n",
    )
    .await;
    // The harness names the domain edge.test; add localhost and reload.
    let cfg = std::fs::read_to_string(edge.config_path()).unwrap();
    std::fs::write(
        edge.config_path(),
        cfg.replace(
            "[[domains]]",
            "[[domains]]\nname = \"localhost\"\n\n[[domains]]",
        ),
    )
    .unwrap();
    edge.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while support::raw(edge.http, "localhost", "GET", "/", &[], b"")
        .await
        .map(|r| r.status)
        .unwrap_or(0)
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "reload with the localhost domain not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    edge
}

/// Waits (bounded) until a backend has seen a request whose record starts with `prefix`.
async fn wait_for(seen: &Seen, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        if let Some(hit) = seen.lock().unwrap().iter().find(|s| s.starts_with(prefix)) {
            return hit.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {prefix:?} within 45 s; the backend saw {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_real_browser_reaches_the_right_backends_through_the_edge() {
    support::install_crypto();
    let (data, _) = backend(String::new()).await;
    let (ws, seen_ws) = ws_backend().await;
    let (app, app_seen) = backend(page(data.port(), ws.port())).await;
    let edge = localhost_edge().await;
    let profile = tempfile::tempdir().unwrap();
    let _browser = support::chromium(
        &format!(
            "http://port-{}-vm-local.localhost:{}/start",
            app.port(),
            edge.http.port()
        ),
        profile.path(),
        &[],
    );
    let report = wait_for(&app_seen, "/report:").await;
    let json = report.splitn(3, ':').nth(2).unwrap();
    let result: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {report}"));

    // the report itself went through the edge, and so did the page: the loopback redirect
    // from /start was rewritten to the preview URL
    assert!(report.starts_with("/report:edge:"), "{report}");
    assert_eq!(result["page"], "edge", "{result}");
    assert_eq!(result["fetch"], "/data:edge", "{result}");
    assert_eq!(result["xhr"], "/xhr:edge", "{result}");
    assert_eq!(result["ws"], "ping-through-edge", "{result}");
    let ws_headers = seen_ws.lock().unwrap().clone();
    assert!(
        ws_headers
            .iter()
            .any(|(k, v)| k == "x-cmux-proxied" && v == "true"),
        "the WebSocket bypassed the edge: {ws_headers:?}"
    );
}

#[tokio::test]
async fn a_location_assignment_to_a_loopback_url_lands_on_the_preview() {
    support::install_crypto();
    let (data, data_seen) = backend(String::new()).await;
    let (app, _) = backend(String::new()).await;
    let edge = localhost_edge().await;
    let profile = tempfile::tempdir().unwrap();
    let _browser = support::chromium(
        &format!(
            "http://port-{}-vm-local.localhost:{}/nav?{}",
            app.port(),
            edge.http.port(),
            data.port()
        ),
        profile.path(),
        &[],
    );
    // a missed rewrite would land on the data backend directly: "/landed:direct:"
    let landed = wait_for(&data_seen, "/landed:").await;
    assert_eq!(landed, "/landed:edge:");
}

/// A page that fetches `url` with credentials (and a header that needs a preflight) and
/// reports to its own server whether it could read the answer.
fn reader_page(url: &str) -> String {
    format!(
        r#"<!doctype html><html><head><title>dashboard</title></head><body><script>
const report = s => fetch("/report", {{ method: "POST", body: s }});
fetch("{url}", {{ credentials: "include", headers: {{ "x-token": "1" }} }})
  .then(r => r.text()).then(t => report("read " + t), e => report("blocked"));
</script></body></html>"#
    )
}

#[tokio::test]
async fn an_unlisted_origin_cannot_read_a_preview_with_credentials_while_the_dashboard_can() {
    support::install_crypto();
    let (preview, _) = backend(String::new()).await;
    // Two origins on 127.0.0.1, told apart by port: the dashboard (listed) and another site.
    let dashboard_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dashboard_origin = format!("http://{}", dashboard_listener.local_addr().unwrap());
    drop(dashboard_listener);
    let edge = Edge::start(&format!(
        "[[domains]]\nname = \"localhost\"\n\n\
         [[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n\n\
         [[policy]]\nport = \"*\"\ncors = \"permissive\"\nallow_origins = [\"{dashboard_origin}\"]\n"
    ))
    .await;
    let url = format!(
        "http://port-{}-vm-local.localhost:{}/data",
        preview.port(),
        edge.http.port()
    );
    let page = reader_page(&url).replace("VIA", "");
    let (dashboard, dashboard_seen) =
        backend_on(&dashboard_origin["http://".len()..], page.clone()).await;
    let (other, other_seen) = backend(page).await;
    let (p1, p2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _b1 = support::chromium(&format!("http://{dashboard}/page"), p1.path(), &[]);
    let _b2 = support::chromium(&format!("http://{other}/page"), p2.path(), &[]);
    assert_eq!(
        wait_for(&dashboard_seen, "/report:").await,
        "/report:direct:read /data:edge"
    );
    assert_eq!(
        wait_for(&other_seen, "/report:").await,
        "/report:direct:blocked"
    );
}

/// [`backend`] on a chosen address (one whose origin went into the edge's config first).
async fn backend_on(addr: &str, page: String) -> (SocketAddr, Seen) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return serve(l, page),
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot bind {addr} again: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
