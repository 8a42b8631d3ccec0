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
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use support::{free_port, raw, Edge};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

const ADMIN_TOKEN: &str = "admin-token";
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
        !text.lines().any(|l| l.starts_with("cmux_edge_wake") && l.contains("b1")),
        "no VM id in wake metrics"
    );
}
