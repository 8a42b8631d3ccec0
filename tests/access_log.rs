//! The access log (SPEC §9): one structured line per request, JSON with
//! `CMUX_EDGE_LOG_FORMAT=json`, with the request id, the client after trusted-proxy
//! resolution, host, vm id, port, method, path without the query, status, bytes, duration,
//! upstream address and upstream status. A WebSocket session is one line, written at close.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::{echo_backend, free_port, raw, raw_from, ws_backend, Edge, DOMAIN};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn an_http_request_is_one_json_line_with_every_field() {
    support::install_crypto();
    let backend = echo_backend().await;
    let edge = LoggedEdge::start().await;
    let host = Edge::host(backend.port(), "local");

    // Through a trusted proxy that names the real client: the log names the client.
    let r = raw_from(
        Some("127.0.0.2".parse().unwrap()),
        edge.http,
        &host,
        "POST",
        "/status/418?token=s3cr3t",
        &[("CF-Connecting-IP", "203.0.113.7")],
        b"hello",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 418);
    let id = r.header("x-request-id").unwrap().to_owned();

    let line = edge.access_line(&id).await;
    assert_eq!(line["client"], "203.0.113.7");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["host"], host);
    assert_eq!(line["path"], "/status/418");
    assert_eq!(line["vm"], "local");
    assert_eq!(line["port"], backend.port());
    assert_eq!(line["status"], 418);
    assert_eq!(line["upstream_status"], 418);
    assert_eq!(line["upstream"], backend.to_string());
    assert_eq!(line["bytes_in"], 5);
    assert_eq!(line["bytes_out"], r.body.len());
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0, "{line}");
    assert_eq!(line["websocket"], false);
    assert!(
        !line.to_string().contains("s3cr3t"),
        "the query string reached the log: {line}"
    );
    assert_eq!(edge.lines_with(&id).len(), 1, "one line per request");
}

#[tokio::test]
async fn a_refusal_is_logged_with_its_reason_and_no_upstream() {
    support::install_crypto();
    let backend = echo_backend().await;
    let edge = LoggedEdge::start().await;
    let r = raw(
        edge.http,
        &Edge::host(backend.port(), "nobody"),
        "GET",
        "/",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404);
    let line = edge.access_line(r.header("x-request-id").unwrap()).await;
    assert_eq!(line["status"], 404);
    assert_eq!(line["refusal"], "unknown_vm");
    assert_eq!(line["client"], "127.0.0.1");
    assert_eq!(line["upstream"], "");
    assert_eq!(line["upstream_status"], 0);
    assert_eq!(line["bytes_out"], r.body.len());
}

#[tokio::test]
async fn a_websocket_session_is_logged_at_close_with_duration_and_bytes_both_ways() {
    support::install_crypto();
    let (ws_addr, _) = ws_backend().await;
    let edge = LoggedEdge::start().await;
    let mut req = format!("ws://{}/socket?session=s3cr3t", edge.http)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("host", Edge::host(ws_addr.port(), "local").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();

    let sent = "x".repeat(1000);
    ws.send(Message::text(sent.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(sent));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        edge.lines_with(&id).is_empty(),
        "an open WebSocket was logged before it closed"
    );
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}

    let line = edge.access_line(&id).await;
    assert_eq!(line["websocket"], true);
    assert_eq!(line["status"], 101);
    assert_eq!(line["upstream_status"], 101);
    assert_eq!(line["path"], "/socket");
    assert_eq!(line["vm"], "local");
    assert_eq!(line["upstream"], ws_addr.to_string());
    assert!(line["duration_ms"].as_f64().unwrap() >= 300.0, "{line}");
    // 1000 bytes of text each way, plus framing and the close frames.
    let bytes_in = line["bytes_in"].as_u64().unwrap();
    let bytes_out = line["bytes_out"].as_u64().unwrap();
    assert!((1000..1100).contains(&bytes_in), "{line}");
    assert!((1000..1100).contains(&bytes_out), "{line}");
}

/// The real binary with JSON logs at `info`, its stderr collected line by line.
#[tokio::test]
async fn lines_still_buffered_when_the_server_stops_are_written_before_it_exits() {
    support::install_crypto();
    let backend = echo_backend().await;
    let mut edge = LoggedEdge::start().await;
    let host = Edge::host(backend.port(), "local");
    let r = raw(edge.http, &host, "GET", "/last", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").unwrap().to_owned();
    // At once: well inside the writer's 100 ms flush interval.
    edge.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while edge.edge.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "cmux-edge did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The exit closed stderr; give the reader thread a moment to take the last lines.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        edge.lines_with(&id).len(),
        1,
        "the last request's line was lost"
    );
}

struct LoggedEdge {
    edge: Edge,
    lines: Arc<Mutex<Vec<String>>>,
}

impl std::ops::Deref for LoggedEdge {
    type Target = Edge;
    fn deref(&self) -> &Edge {
        &self.edge
    }
}

impl LoggedEdge {
    /// VM `local` on 127.0.0.1; 127.0.0.2 is a trusted proxy.
    async fn start() -> LoggedEdge {
        let dir = tempfile::tempdir().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = format!(
            "[server]\nthreads = 1\n\n[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n\
             [[domains]]\nname = \"{DOMAIN}\"\n\n\
             [[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n\n\
             [trust]\nproxies = [\"cloudflare\", \"127.0.0.2\"]\n\n[upstreams]\nallow_loopback = true\n"
        );
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn,access=info")
            .env("CMUX_EDGE_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let edge = Edge {
            child,
            http,
            https: None,
            admin,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while raw(admin, "127.0.0.1", "GET", "/healthz", &[], b"")
            .await
            .map_or(true, |r| r.status != 200)
            || tokio::net::TcpStream::connect(http).await.is_err()
        {
            assert!(Instant::now() < deadline, "cmux-edge did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        LoggedEdge { edge, lines }
    }

    /// Access-log lines (each must be a JSON object) for one request id.
    fn lines_with(&self, request_id: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
            })
            .filter(|v| v["target"] == "access" && v["request_id"] == request_id)
            .collect()
    }

    /// The one access-log line of a request, waiting a little for it to be written.
    async fn access_line(&self, request_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = self.lines_with(request_id).pop() {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no access line for {request_id}: {:?}",
                self.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
