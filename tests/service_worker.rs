//! `/proxy-sw.js` in headless Chromium: once the worker controls a preview page, an image, a
//! script and a `fetch` POST with a body aimed at loopback URLs all reach the right VM port
//! through the edge. The POST is made from a dedicated worker, where the page shim does not
//! run, so only the service worker can have rewritten it; the backends also listen on
//! 127.0.0.1, so a request the worker failed to rewrite would arrive `direct`.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use support::Edge;
use tokio::net::TcpListener;

/// Every request a backend saw, as `"<path>:<edge|direct>:<body>"`.
type Seen = Arc<Mutex<Vec<String>>>;

/// 1×1 transparent PNG.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x00, 0x01, 0x00, 0x00,
    0x05, 0x00, 0x01, 0x0d, 0x0a, 0x2d, 0xb4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae,
    0x42, 0x60, 0x82,
];

async fn backend(page: String, worker: String) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let (page, worker, log) = (page.clone(), worker.clone(), log.clone());
        async move {
            let via = if req.headers().contains_key("x-cmux-proxied") {
                "edge"
            } else {
                "direct"
            };
            let path = req.uri().path().to_owned();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            log.lock()
                .unwrap()
                .push(format!("{path}:{via}:{}", String::from_utf8_lossy(&body)));
            let typed = |ct: &str, body: Bytes| {
                Response::builder()
                    .header("content-type", ct)
                    .body(Full::new(body))
                    .unwrap()
            };
            match path.as_str() {
                "/page" => typed("text/html; charset=utf-8", Bytes::from(page)),
                "/worker.js" => typed("application/javascript", Bytes::from(worker)),
                "/img.png" => typed("image/png", Bytes::from_static(PNG)),
                "/s.js" => typed(
                    "application/javascript",
                    Bytes::from_static(b"window.__fromScript = 'ran';"),
                ),
                _ => typed("text/plain", Bytes::from(format!("{path}:{via}"))),
            }
        }
    });
    (addr, seen)
}

/// Waits until the worker controls the page, then loads an image and a script from
/// `localhost:<vm>` and has a dedicated worker POST to it; reports what happened.
fn page(vm: u16) -> String {
    format!(
        r#"<!doctype html><html><head><title>sw</title></head><body>
<script>
const report = o => fetch("/report", {{ method: "POST", body: JSON.stringify(o) }});
const load = el => new Promise(res => {{ el.onload = () => res("load"); el.onerror = () => res("error"); }});
async function main() {{
  await navigator.serviceWorker.ready;
  if (!navigator.serviceWorker.controller)
    await new Promise(r => navigator.serviceWorker.addEventListener("controllerchange", r));
  const out = {{}};
  const img = new Image();
  const imgDone = load(img);
  img.src = "http://localhost:{vm}/img.png";
  out.img = await imgDone;
  const s = document.createElement("script");
  const sDone = load(s);
  s.src = "http://localhost:{vm}/s.js";
  document.head.appendChild(s);
  out.script = (await sDone) + ":" + window.__fromScript;
  out.post = await new Promise(res => {{
    const w = new Worker("/worker.js");
    w.onmessage = m => res(m.data);
    w.onerror = e => res("worker error " + e.message);
  }});
  report(out);
}}
main().catch(e => report({{ error: String(e) }}));
</script></body></html>"#
    )
}

fn worker(vm: u16) -> String {
    format!(
        r#"fetch("http://localhost:{vm}/post", {{ method: "POST", body: "hello-through-the-worker" }})
  .then(r => r.text()).then(t => postMessage(t), e => postMessage("error " + e));"#
    )
}

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
async fn the_service_worker_carries_images_scripts_and_posts_with_a_body_to_the_right_port() {
    support::install_crypto();
    let (vm, vm_seen) = backend(String::new(), String::new()).await;
    let (app, app_seen) = backend(page(vm.port()), worker(vm.port())).await;
    // Chromium resolves *.localhost itself, and treats it as a secure context (service workers).
    let edge = Edge::start(
        "[[domains]]\nname = \"localhost\"\n\n\
         [[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n\n\
         [[policy]]\nport = \"*\"\ninject_shim = true\ncors = \"permissive\"\nallow_origins = [\"http://*.localhost:*\"]\nembed = true\n",
    )
    .await;
    let profile = tempfile::tempdir().unwrap();
    let _browser = support::chromium(
        &format!(
            "http://port-{}-vm-local.localhost:{}/page",
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
    assert_eq!(result["img"], "load", "{result}");
    assert_eq!(result["script"], "load:ran", "{result}");
    assert_eq!(result["post"], "/post:edge", "{result}");
    let seen = vm_seen.lock().unwrap().clone();
    for want in [
        "/img.png:edge:",
        "/s.js:edge:",
        "/post:edge:hello-through-the-worker",
    ] {
        assert!(seen.iter().any(|s| s == want), "{want} not in {seen:?}");
    }
    assert!(
        !seen.iter().any(|s| s.contains(":direct:")),
        "something bypassed the edge: {seen:?}"
    );
}
