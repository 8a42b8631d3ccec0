//! Headless Chromium loads a preview page through cmux-edge. The page calls
//! `fetch('http://localhost:<B>/data')`, opens `new WebSocket('ws://localhost:<W>/')`, and is
//! reached through a loopback redirect. The test passes only when every answer came from the
//! right backend *through the edge*: the backends also listen on 127.0.0.1, so a URL the shim
//! failed to rewrite would reach them directly and report `direct`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use support::{ws_backend, Edge};
use tokio::net::TcpListener;

const CHROMIUM: &str = "/usr/bin/chromium";

/// A backend whose answers say whether they came through the edge.
async fn backend(page: String) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let page = page.clone();
        async move {
            let via = if req.headers().contains_key("x-cmux-proxied") {
                "edge"
            } else {
                "direct"
            };
            let path = req.uri().path().to_owned();
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
                     setTimeout(() => {{ location.href = 'http://localhost:{}/landed'; }}, 50);\
                     </script></body></html>",
                    req.uri().query().unwrap_or("0")
                )),
                "/page" => html(page.replace("VIA", via)),
                _ => Response::builder()
                    .header("content-type", "text/plain")
                    .body(Full::new(Bytes::from(format!("{path}:{via}")))),
            };
            resp.unwrap()
        }
    });
    addr
}

fn page(data_port: u16, ws_port: u16) -> String {
    format!(
        r#"<!doctype html><html><head><title>preview</title></head><body>
<pre id="out">pending</pre>
<script>
const out = {{ page: "VIA" }};
const show = () => {{ document.getElementById("out").textContent = JSON.stringify(out); }};
fetch("http://localhost:{data_port}/data").then(r => r.text())
  .then(t => {{ out.fetch = t; show(); }}, e => {{ out.fetch = "error " + e; show(); }});
const xhr = new XMLHttpRequest();
xhr.open("GET", "http://127.0.0.1:{data_port}/xhr");
xhr.onload = () => {{ out.xhr = xhr.responseText; show(); }};
xhr.onerror = () => {{ out.xhr = "error"; show(); }};
xhr.send();
const ws = new WebSocket("ws://localhost:{ws_port}/");
ws.onopen = () => ws.send("ping-through-edge");
ws.onmessage = m => {{ out.ws = m.data; show(); ws.close(); }};
ws.onerror = () => {{ out.ws = "error"; show(); }};
show();
</script></body></html>"#
    )
}

/// cmux-edge serving domain `localhost` (which Chromium resolves itself) and VM `local`.
async fn localhost_edge() -> Edge {
    let edge = Edge::start("[[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n").await;
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
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while support::raw(edge.http, "localhost", "GET", "/", &[], b"")
        .await
        .map(|r| r.status)
        .unwrap_or(0)
        != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "reload with the localhost domain not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    edge
}

/// Loads `url` in headless Chromium and returns the final DOM.
async fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=15000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("chromium timed out")
        .expect("run chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_real_browser_reaches_the_right_backends_through_the_edge() {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    );
    support::install_crypto();
    let data = backend(String::new()).await;
    let (ws, seen_ws) = ws_backend().await;
    let app = backend(page(data.port(), ws.port())).await;
    let edge = localhost_edge().await;
    let start = format!(
        "http://port-{}-vm-local.localhost:{}/start",
        app.port(),
        edge.http.port()
    );
    let dom = dump_dom(&start).await;
    let json = dom
        .split("<pre id=\"out\">")
        .nth(1)
        .and_then(|s| s.split("</pre>").next())
        .unwrap_or_else(|| panic!("no result in DOM:\n{dom}"));
    let result: serde_json::Value = serde_json::from_str(&json.replace("&quot;", "\""))
        .unwrap_or_else(|e| panic!("{e}: {json}"));

    // the loopback redirect was rewritten to the preview URL, so the page itself came via the edge
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
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing"
    );
    support::install_crypto();
    let data = backend(String::new()).await;
    let app = backend(String::new()).await;
    let edge = localhost_edge().await;
    let start = format!(
        "http://port-{}-vm-local.localhost:{}/nav?{}",
        app.port(),
        edge.http.port(),
        data.port()
    );
    let dom = dump_dom(&start).await;
    // the data backend answers "<path>:<via>"; a missed rewrite would land on it directly
    assert!(dom.contains("/landed:edge"), "{dom}");
}
