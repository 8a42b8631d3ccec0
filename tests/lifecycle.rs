//! The sandbox lifecycle (SPEC §13) against a control-plane emulator: a real HTTP server that
//! serves the `http` registry (a VM `paused` until resumed) and a resume endpoint that starts
//! the VM's backends after a delay. Then activity (pull and webhook) and the metrics.
//!
//! Every config writes the policy keys it relies on.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::{Request, Response};
use support::{free_port, raw, Edge};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

const ADMIN_TOKEN: &str = "lifecycle-admin-token-0123456789abcdef";
const POLICY: &str = "[[policy]]\nport = \"*\"\ncors = \"passthrough\"\nembed = false\ninject_shim = false\nrewrite_redirects = false\n";
/// VM ports: 80 is the HTTP echo, 81 the WebSocket echo.
const HTTP: u16 = 80;
const WS: u16 = 81;

/// What starts a VM's backends once it is resumed.
type Starter = Arc<dyn Fn() + Send + Sync>;

/// The HTTP echo on `http` and the WebSocket echo on `ws`, bound when called.
fn echo_and_ws(http: u16, ws: u16) -> Starter {
    Arc::new(move || {
        let bind = |p: u16| {
            let l = std::net::TcpListener::bind(("127.0.0.1", p)).expect("bind VM port");
            l.set_nonblocking(true).unwrap();
            TcpListener::from_std(l).unwrap()
        };
        support::echo_on(bind(http));
        support::ws_on(bind(ws));
    })
}

/// One resume call as the control plane saw it.
#[derive(Debug, Clone)]
struct Resume {
    id: String,
    idempotency_key: String,
    authorization: String,
}

#[derive(Clone)]
struct ControlPlane {
    addr: SocketAddr,
    /// id → state; absent: unknown.
    states: Arc<Mutex<HashMap<String, &'static str>>>,
    resumes: Arc<Mutex<Vec<Resume>>>,
    /// VM port → the port its backend listens on.
    ports: HashMap<u16, u16>,
}

/// How the resume endpoint behaves.
#[derive(Clone)]
struct Plan {
    /// The status it answers.
    status: u16,
    /// After a 2xx: mark the VM running, then start the backends after this delay.
    delay: Duration,
    start: Option<Starter>,
}

/// Reserved ports for a VM's backends: VM port → local port.
fn vm_ports() -> HashMap<u16, u16> {
    HashMap::from([(HTTP, free_port()), (WS, free_port())])
}

async fn control_plane(
    initial: &[(&str, &'static str)],
    ports: HashMap<u16, u16>,
    plan: Plan,
) -> ControlPlane {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp = ControlPlane {
        addr: listener.local_addr().unwrap(),
        states: Arc::new(Mutex::new(
            initial.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        )),
        resumes: Arc::default(),
        ports,
    };
    let me = cp.clone();
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let (me, plan) = (me.clone(), plan.clone());
        async move {
            let path = req.uri().path().to_owned();
            let header = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let reply = |status: u16, body: String| {
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap()
            };
            let rest = path.strip_prefix("/vms/").unwrap_or("");
            if let Some(id) = rest.strip_suffix("/resume") {
                me.resumes.lock().unwrap().push(Resume {
                    id: id.to_owned(),
                    idempotency_key: header("idempotency-key"),
                    authorization: header("authorization"),
                });
                if (200..300).contains(&plan.status) {
                    me.states.lock().unwrap().insert(id.to_owned(), "running");
                    if let Some(start) = plan.start.clone() {
                        tokio::spawn(async move {
                            tokio::time::sleep(plan.delay).await;
                            start();
                        });
                    }
                }
                return reply(plan.status, "{}".into());
            }
            let state = me.states.lock().unwrap().get(rest).copied();
            match state {
                Some(state) => reply(
                    200,
                    serde_json::json!({
                        "address": "127.0.0.1",
                        "ports": {HTTP.to_string(): me.ports[&HTTP], WS.to_string(): me.ports[&WS]},
                        "state": state,
                    })
                    .to_string(),
                ),
                None => reply(404, String::new()),
            }
        }
    });
    cp
}

impl ControlPlane {
    fn registry(&self) -> String {
        format!(
            "[registry]\nsource = \"http\"\nurl = \"http://{}/vms/{{id}}\"\ntimeout = \"2s\"\ncache_ttl = \"5s\"\nnegative_ttl = \"1s\"\n",
            self.addr
        )
    }

    fn resume_url(&self) -> String {
        format!("http://{}/vms/{{id}}/resume", self.addr)
    }

    fn resumes(&self) -> Vec<Resume> {
        self.resumes.lock().unwrap().clone()
    }
}

async fn edge(cp: &ControlPlane, wake: &str) -> Edge {
    Edge::start(&format!(
        "[admin]\ntoken = \"{ADMIN_TOKEN}\"\n\n{}\n[wake]\n{wake}\n\n{POLICY}",
        cp.registry()
    ))
    .await
}

async fn admin_get(edge: &Edge, path: &str) -> support::RawResponse {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    raw(
        edge.admin,
        "127.0.0.1",
        "GET",
        path,
        &[("Authorization", auth.as_str())],
        b"",
    )
    .await
    .unwrap()
}

/// One sample of the edge's `/metrics` (0 when absent).
async fn metric(edge: &Edge, series: &str) -> f64 {
    let text = raw(edge.admin, "127.0.0.1", "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A WebSocket through the edge to `host`.
async fn websocket(
    edge: &Edge,
    host: &str,
    ua: Option<&str>,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(edge.http).await.unwrap();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{host}/ws"),
    )
    .unwrap();
    if let Some(ua) = ua {
        req.headers_mut().insert("user-agent", ua.parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("WebSocket handshake through the edge");
    assert_eq!(resp.status(), 101);
    ws
}

async fn echo_once(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("echo in time")
        .unwrap()
        .unwrap();
    assert_eq!(back.into_text().unwrap().as_str(), text);
}

fn starting(cp_delay_ms: u64, start: Option<Starter>) -> Plan {
    Plan {
        status: 202,
        delay: Duration::from_millis(cp_delay_ms),
        start,
    }
}

#[tokio::test]
async fn two_hundred_requests_for_a_paused_vm_make_one_resume_call_and_all_are_answered() {
    support::install_crypto();
    let ports = vm_ports();
    let starter = echo_and_ws(ports[&HTTP], ports[&WS]);
    let cp = control_plane(&[("b1", "paused")], ports, starting(1500, Some(starter))).await;
    std::env::set_var("CMUX_TEST_WAKE_TOKEN", "wake-secret");
    let edge = edge(
        &cp,
        &format!(
            "url = \"{}\"\ntoken = \"env:CMUX_TEST_WAKE_TOKEN\"\ntimeout = \"30s\"\nmax_waiting = 1000\non_connect_error = false\n",
            cp.resume_url()
        ),
    )
    .await;
    let (http_host, ws_host) = (Edge::host(HTTP, "b1"), Edge::host(WS, "b1"));
    let mut tasks = Vec::new();
    for i in 0..200usize {
        let (addr, http_host, ws_host) = (edge.http, http_host.clone(), ws_host.clone());
        tasks.push(tokio::spawn(async move {
            match i % 5 {
                0 | 1 => {
                    let r = raw(addr, &http_host, "GET", &format!("/get/{i}"), &[], b"")
                        .await
                        .unwrap();
                    assert_eq!(r.status, 200, "{}", r.text());
                    assert_eq!(r.json()["path"], format!("/get/{i}"));
                }
                2 | 3 => {
                    let body = format!("body of request {i} ").repeat(50);
                    let r = raw(addr, &http_host, "POST", "/echo-body", &[], body.as_bytes())
                        .await
                        .unwrap();
                    assert_eq!(r.status, 200, "{}", r.text());
                    assert_eq!(r.text(), body);
                }
                _ => {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    let (mut ws, resp) =
                        tokio_tungstenite::client_async(format!("ws://{ws_host}/ws"), tcp)
                            .await
                            .expect("held WebSocket upgrade");
                    assert_eq!(resp.status(), 101);
                    echo_once(&mut ws, &format!("hello {i}")).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let resumes = cp.resumes();
    assert_eq!(resumes.len(), 1, "exactly one resume call: {resumes:?}");
    assert_eq!(resumes[0].id, "b1");
    assert_eq!(resumes[0].idempotency_key.len(), 32);
    assert_eq!(resumes[0].authorization, "Bearer wake-secret");
    assert_eq!(
        metric(&edge, "cmux_edge_wakes_total{result=\"awake\"}").await,
        1.0
    );
    assert_eq!(metric(&edge, "cmux_edge_wake_seconds_count").await, 1.0);
    assert_eq!(metric(&edge, "cmux_edge_waiting_requests").await, 0.0);
    let text = raw(edge.admin, "127.0.0.1", "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text();
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("cmux_edge_wake") && l.contains("b1")),
        "no VM id in wake metrics"
    );
}

const NAVIGATE: &[(&str, &str)] = &[
    ("Accept", "text/html,application/xhtml+xml,*/*;q=0.8"),
    ("Sec-Fetch-Mode", "navigate"),
];

#[tokio::test]
async fn a_navigation_gets_the_waiting_page_at_once_and_its_status_endpoint_follows_the_wake() {
    support::install_crypto();
    let ports = vm_ports();
    let starter = echo_and_ws(ports[&HTTP], ports[&WS]);
    let cp = control_plane(&[("b1", "paused")], ports, starting(1500, Some(starter))).await;
    let wake = format!("url = \"{}\"\ntimeout = \"30s\"\n", cp.resume_url());
    let edge = edge(&cp, &wake).await;
    let host = Edge::host(HTTP, "b1");
    let page = raw(edge.http, &host, "GET", "/", NAVIGATE, b"")
        .await
        .unwrap();
    assert_eq!(page.status, 503);
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert!(page.header("retry-after").is_some());
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let html = page.text();
    assert!(html.contains("/.cmux-edge/wake-status") && html.contains("location.reload()"));
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "self-contained"
    );
    // the navigation itself started the wake
    eventually("the resume call", async || cp.resumes().len() == 1).await;
    eventually("the status turns running", async || {
        let r = raw(edge.http, &host, "GET", "/.cmux-edge/wake-status", &[], b"")
            .await
            .unwrap();
        r.json()["state"] == "running"
    })
    .await;
    let r = raw(edge.http, &host, "GET", "/", NAVIGATE, b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(cp.resumes().len(), 1);
}

/// The real page: it reports that it loaded by fetching `/loaded`.
fn html_backend(port: u16, seen: Arc<Mutex<Vec<String>>>) -> Starter {
    Arc::new(move || {
        let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        l.set_nonblocking(true).unwrap();
        let seen = seen.clone();
        support::spawn_http(TcpListener::from_std(l).unwrap(), move |req| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(req.uri().path().to_owned());
                Response::builder()
                    .header("content-type", "text/html; charset=utf-8")
                    .header("cache-control", "no-store")
                    .body(Full::new(Bytes::from_static(
                        b"<!doctype html><title>real</title><p>the real page</p><script>fetch('/loaded')</script>",
                    )))
                    .unwrap()
            }
        });
    })
}

#[tokio::test]
async fn in_a_real_browser_the_waiting_page_turns_into_the_real_page_after_the_wake() {
    support::install_crypto();
    let ports = vm_ports();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let starter = html_backend(ports[&HTTP], seen.clone());
    let cp = control_plane(&[("b1", "paused")], ports, starting(2000, Some(starter))).await;
    let edge = Edge::start(&format!(
        "[[domains]]\nname = \"localhost\"\n\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n\n{}\n[wake]\nurl = \"{}\"\ntimeout = \"30s\"\n\n{POLICY}",
        cp.registry(),
        cp.resume_url()
    ))
    .await;
    let profile = tempfile::tempdir().unwrap();
    let _browser = support::chromium(
        &format!("http://port-{HTTP}-vm-b1.localhost:{}/", edge.http.port()),
        profile.path(),
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.lock().unwrap().iter().any(|p| p == "/loaded") {
        assert!(
            Instant::now() < deadline,
            "the real page never loaded; the backend saw {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The backend came up after the browser's first navigation, which got the waiting page:
    // only the page's own reload can have brought the browser to the real page.
    assert_eq!(cp.resumes().len(), 1);
    assert_eq!(
        seen.lock().unwrap().iter().filter(|p| *p == "/").count(),
        1,
        "{:?}",
        seen.lock().unwrap()
    );
}

#[tokio::test]
async fn a_wake_past_the_timeout_answers_503_with_retry_after() {
    support::install_crypto();
    // resumed, but the VM never comes up
    let cp = control_plane(&[("b1", "paused")], vm_ports(), starting(0, None)).await;
    let wake = format!(
        "url = \"{}\"\ntimeout = \"1s\"\nmax_waiting = 10\non_connect_error = false\n",
        cp.resume_url()
    );
    let edge = edge(&cp, &wake).await;
    let r = raw(edge.http, &Edge::host(HTTP, "b1"), "GET", "/", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "vm b1 is waking up\n");
    assert_eq!(r.header("retry-after"), Some("5"));
    eventually("the timeout counted", async || {
        metric(&edge, "cmux_edge_wakes_total{result=\"timeout\"}").await == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_failed_wake_answers_502_with_the_reason() {
    support::install_crypto();
    let plan = Plan {
        status: 500,
        delay: Duration::ZERO,
        start: None,
    };
    let cp = control_plane(&[("b1", "paused")], vm_ports(), plan).await;
    let wake = format!("url = \"{}\"\ntimeout = \"10s\"\n", cp.resume_url());
    let edge = edge(&cp, &wake).await;
    let r = raw(edge.http, &Edge::host(HTTP, "b1"), "POST", "/", &[], b"x")
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.text(), "wake failed: vm b1: the hook answered 500\n");
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        metric(&edge, "cmux_edge_wakes_total{result=\"failed\"}").await,
        1.0
    );
}

#[tokio::test]
async fn requests_beyond_max_waiting_answer_503_at_once() {
    support::install_crypto();
    let cp = control_plane(&[("b1", "paused")], vm_ports(), starting(0, None)).await;
    let wake = format!(
        "url = \"{}\"\ntimeout = \"120s\"\nmax_waiting = 2\n",
        cp.resume_url()
    );
    let edge = edge(&cp, &wake).await;
    let host = Edge::host(HTTP, "b1");
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (addr, host) = (edge.http, host.clone());
            tokio::spawn(async move { raw(addr, &host, "GET", "/", &[], b"").await })
        })
        .collect();
    eventually("two requests held", async || {
        metric(&edge, "cmux_edge_waiting_requests").await == 2.0
    })
    .await;
    let r = raw(edge.http, &host, "GET", "/", &[], b"").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "too many requests waiting for vm b1 to wake\n");
    assert!(r.header("retry-after").is_some());
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn on_connect_error_wakes_a_running_vm_whose_port_refuses() {
    support::install_crypto();
    let ports = vm_ports();
    let starter = echo_and_ws(ports[&HTTP], ports[&WS]);
    // the control plane says running (it does not track state), but nothing listens yet
    let cp = control_plane(&[("b1", "running")], ports, starting(1000, Some(starter))).await;
    let wake = format!(
        "url = \"{}\"\ntimeout = \"30s\"\non_connect_error = true\n",
        cp.resume_url()
    );
    let edge = edge(&cp, &wake).await;
    let body = b"a body that must arrive intact".repeat(10);
    let r = raw(
        edge.http,
        &Edge::host(HTTP, "b1"),
        "POST",
        "/echo-body",
        &[],
        &body,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, body);
    assert_eq!(cp.resumes().len(), 1);
}

#[tokio::test]
async fn without_on_connect_error_a_refusing_running_vm_is_a_502() {
    support::install_crypto();
    let cp = control_plane(&[("b1", "running")], vm_ports(), starting(0, None)).await;
    let wake = format!(
        "url = \"{}\"\ntimeout = \"30s\"\non_connect_error = false\n",
        cp.resume_url()
    );
    let edge = edge(&cp, &wake).await;
    let r = raw(edge.http, &Edge::host(HTTP, "b1"), "GET", "/", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert!(cp.resumes().is_empty());
}

/// The hook wakes the VM, and runs with a cleared environment: `PATH` and `CMUX_EDGE_WAKE_*`
/// only, so the edge's secrets (cargo's `CARGO_*` stand in for them here) never reach it.
#[tokio::test]
async fn the_exec_hook_wakes_the_vm_without_the_edges_environment() {
    support::install_crypto();
    let ports = vm_ports();
    // the control plane here only serves the registry; the hook is a script
    let cp = control_plane(&[("b1", "paused")], ports.clone(), starting(0, None)).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("woken");
    let seen_env = dir.path().join("env");
    let hook = dir.path().join("resume-vm");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nenv > {}\necho \"$1\" >> {}\n",
            seen_env.display(),
            marker.display()
        ),
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&hook).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // what the hook's control plane would do: bring the VM up once asked
    let watcher = {
        let (marker, cp, start) = (
            marker.clone(),
            cp.clone(),
            echo_and_ws(ports[&HTTP], ports[&WS]),
        );
        tokio::spawn(async move {
            while !marker.exists() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            cp.states.lock().unwrap().insert("b1".into(), "running");
            start();
        })
    };
    let wake = format!(
        "command = [\"{}\", \"{{id}}\"]\ntimeout = \"30s\"\n",
        hook.display()
    );
    let edge = edge(&cp, &wake).await;
    let r = raw(edge.http, &Edge::host(HTTP, "b1"), "GET", "/x", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "b1\n");
    let env = std::fs::read_to_string(&seen_env).unwrap();
    assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
    assert!(!env.contains("CARGO"), "{env}");
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
    watcher.abort();
}

#[tokio::test]
async fn a_failing_exec_hook_is_a_502_with_its_exit_status() {
    support::install_crypto();
    let cp = control_plane(&[("b1", "paused")], vm_ports(), starting(0, None)).await;
    let edge = edge(&cp, "command = [\"/bin/false\"]\ntimeout = \"10s\"\n").await;
    let r = raw(edge.http, &Edge::host(HTTP, "b1"), "GET", "/", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert!(
        r.text()
            .starts_with("wake failed: vm b1: the command exit status: 1"),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn the_admin_api_takes_a_state_and_a_paused_registration_is_woken() {
    support::install_crypto();
    let ports = vm_ports();
    let admin_port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    // the control plane resumes by re-registering the VM as running
    let (http_port, ws_port) = (ports[&HTTP], ports[&WS]);
    let start = echo_and_ws(http_port, ws_port);
    let reregister: Starter = Arc::new(move || {
        start();
        tokio::spawn(async move {
            let body = serde_json::json!({"address": "127.0.0.1", "ports": {"80": http_port}});
            let auth = format!("Bearer {ADMIN_TOKEN}");
            let r = raw(
                admin,
                "127.0.0.1",
                "PUT",
                "/api/vms/b1",
                &[("Authorization", auth.as_str())],
                body.to_string().as_bytes(),
            )
            .await
            .unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        });
    });
    let cp = control_plane(&[], ports, starting(500, Some(reregister))).await;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // the harness picks the admin port itself: write the config by hand
    let config = format!(
        "[server]\nthreads = 1\n\n[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n[[domains]]\nname = \"{}\"\n\n\
         [admin]\ntoken = \"{ADMIN_TOKEN}\"\nstate_file = \"{}\"\n\n[registry]\nsources = [\"admin\"]\n\n\
         [upstreams]\nallow_loopback = true\n\n[wake]\nurl = \"{}\"\ntimeout = \"30s\"\n\n{POLICY}",
        support::DOMAIN,
        dir.path().join("vms.json").display(),
        cp.resume_url()
    );
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let auth = [("Authorization", auth.as_str())];
    let deadline = Instant::now() + Duration::from_secs(30);
    let put =
        serde_json::json!({"address": "127.0.0.1", "ports": {"80": http_port}, "state": "paused"});
    loop {
        if let Ok(r) = raw(
            admin,
            "127.0.0.1",
            "PUT",
            "/api/vms/b1",
            &auth,
            put.to_string().as_bytes(),
        )
        .await
        {
            assert_eq!(r.status, 201, "{}", r.text());
            break;
        }
        assert!(Instant::now() < deadline, "edge did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = raw(admin, "127.0.0.1", "GET", "/api/vms/b1", &auth, b"")
        .await
        .unwrap();
    assert_eq!(r.json()["state"], "paused");
    while TcpStream::connect(http).await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = raw(
        http,
        &Edge::host(HTTP, "b1"),
        "GET",
        "/after-wake",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/after-wake");
    let r = raw(admin, "127.0.0.1", "GET", "/api/vms/b1", &auth, b"")
        .await
        .unwrap();
    assert!(
        r.json().get("state").is_none(),
        "running is the default: {}",
        r.text()
    );
    assert_eq!(cp.resumes().len(), 1);
    let _ = child.kill();
    let _ = child.wait();
}

/// A PVE API with one container, 200 on node pve1, stopped until `status/start`.
struct Pve {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<(String, String, String)>>>,
}

const PVE_TOKEN: &str = "root@pam!edge=00000000-0000-0000-0000-000000000000";

/// This machine's address off loopback (the proxmox source never routes to loopback).
fn local_ip() -> std::net::IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("10.255.255.255:1").unwrap();
    let ip = s.local_addr().unwrap().ip();
    assert!(!ip.is_loopback(), "this test needs an address off loopback");
    ip
}

async fn fake_pve(backend: u16, ip: std::net::IpAddr) -> Pve {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = calls.clone();
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let (seen, running) = (seen.clone(), running.clone());
        async move {
            let target = req.uri().path_and_query().unwrap().as_str().to_owned();
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            seen.lock()
                .unwrap()
                .push((req.method().to_string(), target.clone(), auth));
            let up = running.load(std::sync::atomic::Ordering::SeqCst);
            let body = match (req.method().as_str(), target.as_str()) {
                ("GET", "/api2/json/cluster/resources?type=vm") => serde_json::json!({"data": [
                    {"id": "lxc/200", "type": "lxc", "vmid": 200, "node": "pve1",
                     "status": if up { "running" } else { "stopped" }}
                ]}),
                ("GET", "/api2/json/nodes/pve1/lxc/200/interfaces") => serde_json::json!({"data": [
                    {"name": "lo", "inet": "127.0.0.1/8"},
                    {"name": "eth0", "inet": format!("{ip}/24")}
                ]}),
                ("POST", "/api2/json/nodes/pve1/lxc/200/status/start") => {
                    running.store(true, std::sync::atomic::Ordering::SeqCst);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        let l = std::net::TcpListener::bind(("0.0.0.0", backend)).unwrap();
                        l.set_nonblocking(true).unwrap();
                        support::echo_on(TcpListener::from_std(l).unwrap());
                    });
                    serde_json::json!({"data": "UPID:pve1:0001:start:200:root@pam:"})
                }
                _ => serde_json::json!({"data": null}),
            };
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap()
        }
    });
    Pve { addr, calls }
}

#[tokio::test]
async fn the_proxmox_source_finds_a_stopped_container_and_the_wake_starts_it() {
    support::install_crypto();
    let backend = free_port();
    let pve = fake_pve(backend, local_ip()).await;
    let edge = Edge::start(&format!(
        "[registry]\nsources = [\"proxmox\"]\npve_url = \"http://{}\"\npve_token = \"{PVE_TOKEN}\"\ncache_ttl = \"30s\"\n\n\
         [wake]\nproxmox = true\ntimeout = \"30s\"\n\n{POLICY}",
        pve.addr
    ))
    .await;
    let r = raw(
        edge.http,
        &Edge::host(backend, "200"),
        "GET",
        "/pve",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/pve");
    let calls = pve.calls.lock().unwrap().clone();
    let starts: Vec<_> = calls.iter().filter(|c| c.0 == "POST").collect();
    assert_eq!(starts.len(), 1, "{calls:?}");
    assert_eq!(starts[0].1, "/api2/json/nodes/pve1/lxc/200/status/start");
    assert_eq!(starts[0].2, format!("PVEAPIToken={PVE_TOKEN}"));
}

/// An edge with two running VMs on static registrations (no control plane), activity on.
async fn activity_edge(extra: &str) -> (Edge, u16, u16) {
    let http = support::echo_backend().await.port();
    let (ws, _) = support::ws_backend().await;
    let edge = Edge::start(&format!(
        "[admin]\ntoken = \"{ADMIN_TOKEN}\"\n\n[[registry.vms]]\nid = \"b1\"\naddress = \"127.0.0.1\"\n\
         ports = {{ {HTTP} = {http}, {WS} = {} }}\n\n[[registry.vms]]\nid = \"b2\"\naddress = \"127.0.0.1\"\n\
         ports = {{ {HTTP} = {http} }}\n\n{extra}\n{POLICY}",
        ws.port()
    ))
    .await;
    (edge, http, ws.port())
}

#[tokio::test]
async fn activity_counts_http_requests_bytes_and_websocket_frames_per_port() {
    support::install_crypto();
    let (edge, _, _) = activity_edge("").await;
    let host = Edge::host(HTTP, "b1");
    for _ in 0..3 {
        let r = raw(edge.http, &host, "POST", "/echo-body", &[], b"0123456789")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let mut ws = websocket(&edge, &Edge::host(WS, "b1"), None).await;
    echo_once(&mut ws, "twelve bytes").await;
    let a = admin_get(&edge, "/api/vms/b1/activity").await;
    assert_eq!(a.status, 200, "{}", a.text());
    let a = a.json();
    assert_eq!(a["requests"], 4, "{a}");
    assert_eq!(a["open_websockets"], 1, "{a}");
    let port = |p: u16| {
        a["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["port"] == p)
            .cloned()
            .unwrap_or_else(|| panic!("port {p} in {a}"))
    };
    assert_eq!(port(HTTP)["requests"], 3);
    assert_eq!(port(HTTP)["bytes_in"], 30);
    assert_eq!(port(HTTP)["bytes_out"], 30);
    // one masked frame in (2 + 4 + 12 bytes), one unmasked frame out (2 + 12)
    assert_eq!(port(WS)["bytes_in"], 18, "{a}");
    assert_eq!(port(WS)["bytes_out"], 14, "{a}");
    assert!(a["last_bytes"].is_string() && a["last_request"].is_string());
    drop(ws);
    eventually("the WebSocket counted closed", async || {
        admin_get(&edge, "/api/vms/b1/activity").await.json()["open_websockets"] == 0
    })
    .await;
    // the token is required
    let r = raw(edge.admin, "127.0.0.1", "GET", "/api/activity", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(admin_get(&edge, "/api/vms/zz/activity").await.status, 404);
}

fn idle_ids(json: &serde_json::Value) -> Vec<String> {
    json["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn idle_for_lists_a_vm_whose_open_websocket_is_quiet_and_not_one_whose_websocket_talks() {
    support::install_crypto();
    let (edge, _, _) = activity_edge("").await;
    let mut quiet = websocket(&edge, &Edge::host(WS, "b1"), None).await;
    echo_once(&mut quiet, "hi").await;
    let r = raw(edge.http, &Edge::host(HTTP, "b2"), "GET", "/", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // b1 keeps a WebSocket open but silent; b2 had one request: both idle for 2 s
    let idle = admin_get(&edge, "/api/activity?idle_for=2s").await.json();
    assert_eq!(idle_ids(&idle), ["b1", "b2"], "{idle}");
    assert_eq!(idle["vms"][0]["open_websockets"], 1);
    // a frame makes b1 active again
    echo_once(&mut quiet, "still here").await;
    let idle = admin_get(&edge, "/api/activity?idle_for=2s").await.json();
    assert_eq!(idle_ids(&idle), ["b2"], "{idle}");
    let all = admin_get(&edge, "/api/activity").await.json();
    assert_eq!(idle_ids(&all), ["b1", "b2"]);
    assert_eq!(
        admin_get(&edge, "/api/activity?idle_for=soon").await.status,
        400
    );
}

#[tokio::test]
async fn ignored_user_agents_are_not_activity() {
    support::install_crypto();
    let (edge, _, _) =
        activity_edge("[activity]\nignore_user_agents = [\"kube-probe/*\", \"Uptime-Kuma/*\"]\n")
            .await;
    let host = Edge::host(HTTP, "b1");
    for ua in ["kube-probe/1.29", "Uptime-Kuma/1.23.0"] {
        let r = raw(
            edge.http,
            &host,
            "GET",
            "/healthz",
            &[("User-Agent", ua)],
            b"",
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "still proxied");
    }
    let mut probe = websocket(&edge, &Edge::host(WS, "b1"), Some("kube-probe/1.29")).await;
    echo_once(&mut probe, "ping").await;
    assert_eq!(admin_get(&edge, "/api/vms/b1/activity").await.status, 404);
    let r = raw(
        edge.http,
        &host,
        "GET",
        "/",
        &[("User-Agent", "Mozilla/5.0")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let a = admin_get(&edge, "/api/vms/b1/activity").await.json();
    assert_eq!(a["requests"], 1, "{a}");
    assert_eq!(a["open_websockets"], 0, "{a}");
}

/// Verifies `X-Cmux-Signature` the way the README tells a control plane to.
fn verify(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let mut t = "";
    let mut v1 = "";
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = x,
            Some(("v1", x)) => v1 = x,
            _ => {}
        }
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut msg = format!("{t}.").into_bytes();
    msg.extend_from_slice(body);
    let Ok(tag) = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(v1.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    ring::hmac::verify(&key, &msg, &tag).is_ok()
}

#[tokio::test]
async fn webhook_batches_are_signed_and_arrive_without_loss_after_a_receiver_outage() {
    support::install_crypto();
    let receiver_port = free_port();
    std::env::set_var("CMUX_TEST_WEBHOOK_SECRET", "whsec-test");
    let (edge, _, _) = activity_edge(&format!(
        "[activity]\nwebhook = {{ url = \"http://127.0.0.1:{receiver_port}/activity\", secret = \"env:CMUX_TEST_WEBHOOK_SECRET\", interval = \"200ms\" }}\n"
    ))
    .await;
    // the receiver is down: traffic now must still arrive later
    let host = Edge::host(HTTP, "b1");
    for _ in 0..5 {
        assert_eq!(
            raw(edge.http, &host, "GET", "/", &[], b"")
                .await
                .unwrap()
                .status,
            200
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eventually("failed deliveries counted", async || {
        metric(&edge, "cmux_edge_activity_batches_total{result=\"failed\"}").await >= 1.0
    })
    .await;
    // the receiver comes up
    let batches: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let bad: Arc<Mutex<usize>> = Arc::default();
    let listener = TcpListener::bind(("127.0.0.1", receiver_port))
        .await
        .unwrap();
    {
        let (batches, bad) = (batches.clone(), bad.clone());
        support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
            let (batches, bad) = (batches.clone(), bad.clone());
            async move {
                let sig = req
                    .headers()
                    .get("x-cmux-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let body = http_body_util::BodyExt::collect(req.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                if verify(b"whsec-test", &sig, &body) {
                    batches
                        .lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    Response::new(Full::new(Bytes::new()))
                } else {
                    *bad.lock().unwrap() += 1;
                    Response::builder()
                        .status(401)
                        .body(Full::new(Bytes::new()))
                        .unwrap()
                }
            }
        });
    }
    eventually("the backlog delivered", async || {
        batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b["vms"].as_array().cloned().unwrap_or_default())
            .any(|vm| vm["id"] == "b1" && vm["requests"] == 5)
    })
    .await;
    let got = batches.lock().unwrap().clone();
    assert_eq!(*bad.lock().unwrap(), 0, "every signature verifies");
    // in order from the first, none lost
    let seqs: Vec<u64> = got
        .iter()
        .map(|b| b["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{got:?}");
    assert!(got.len() >= 2, "batches queued during the outage: {got:?}");
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(got[0]["replica"], host_name.as_str());
    assert!(metric(&edge, "cmux_edge_activity_batches_total{result=\"sent\"}").await >= 2.0);
    // a wrong secret does not verify
    assert!(!verify(b"other", "t=1,v1=00", b"{}"));
}
