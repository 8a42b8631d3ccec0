//! Real peers for the integration tests: an HTTP echo backend (h1 + h2c) that reports what it
//! received, a WebSocket echo backend, the real `cmux-edge` binary on ephemeral ports, and a
//! raw HTTP/1.1 client for hosts no URL parser would accept.
#![allow(dead_code)]
// tungstenite's handshake callback signature returns its own large error type.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};

pub const DOMAIN: &str = "edge.test";

/// The `[server]` body [`Edge::start`] writes.
pub const DEFAULT_SERVER: &str = "threads = 1\nshutdown_grace = \"5s\"";

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A port that was free a moment ago, and never handed out before in this test process: the
/// kernel may give a just-released port out again, and two listeners of one edge (http and
/// admin) then collide ("two listeners share one address").
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// Peak resident memory (VmHWM) of a process, in KiB: the bomb, shim and flood tests bound
/// how much the edge grows.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// A test CA (named `ca_name`), and a leaf it signed for `localhost` and `127.0.0.1`, with
/// the leaf's key: the upstream-TLS tests' VM certificates and Pebble's HTTPS.
pub fn test_ca_and_leaf(ca_name: &str) -> (rcgen::Certificate, rcgen::Certificate, rcgen::KeyPair) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = params.signed_by(&key, &issuer).unwrap();
    (ca, leaf, key)
}

/// What the echo backend saw, as JSON: `{"method","path","version","headers":[[k,v]..],"body_len"}`.
/// Paths: `/cookies` two Set-Cookie; `/slow?ms=N`; `/echo-body` the body back; `/status/N`.
pub async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    echo_on(listener);
    addr
}

/// The echo backend on a listener the test bound (e.g. a VM that comes up later).
pub fn echo_on(listener: TcpListener) {
    spawn_http(listener, |req| async move {
        echo(req).await.unwrap_or_else(|e| match e {})
    });
}

/// The echo backend on `ip` (e.g. [`host_ipv4`], where a loopback address would not do).
pub async fn echo_backend_on(ip: std::net::IpAddr) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    spawn_http(listener, |req| async move {
        echo(req).await.unwrap_or_else(|e| match e {})
    });
    addr
}

/// Serves HTTP/1.1 and h2c on `listener` with `handler`, until the test ends.
pub fn spawn_http<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(io, svc)
                .await;
            });
        }
    });
}

async fn echo(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if path == "/html" {
        return Ok(html_page(&query));
    }
    if path == "/no-head" {
        // Like many dev servers: HEAD is not implemented (405, or `?status=501`).
        let resp = if method == "HEAD" {
            Response::builder()
                .status(if query == "status=501" { 501 } else { 405 })
                .body(Full::new(Bytes::new()))
        } else {
            Response::builder()
                .header("content-type", "text/plain")
                .header("x-method-seen", method.as_str())
                .body(Full::new(Bytes::from_static(b"hello")))
        };
        return Ok(resp.expect("response"));
    }
    let mut resp = Response::builder().header("content-type", "application/json");
    if path == "/cookies" {
        resp = resp
            .header("set-cookie", "a=1; Path=/")
            .header("set-cookie", "b=2; Path=/");
    }
    if path == "/slow" {
        let ms: u64 = query.trim_start_matches("ms=").parse().unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if path == "/respond" || path == "/redirect" {
        for pair in query.split('&') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            let v = percent_decode(v);
            match k {
                "h" => {
                    if let Some((name, value)) = v.split_once(':') {
                        resp = resp.header(name.trim(), value.trim());
                    }
                }
                "to" => resp = resp.status(302).header("location", v),
                _ => {}
            }
        }
    }
    if path == "/echo-body" {
        return Ok(resp.body(Full::new(body)).expect("response"));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        resp = resp.status(code.parse::<u16>().unwrap_or(500));
    }
    let json = serde_json::json!({
        "method": method, "path": path, "query": query, "version": version,
        "headers": headers, "body_len": body.len(),
    });
    Ok(resp
        .body(Full::new(Bytes::from(json.to_string())))
        .expect("response"))
}

/// `/html?enc=gzip|deflate|br|zstd|compress&nohead=1&size=N&ct=...`: an HTML page (with a
/// `<head>` unless `nohead`), padded to about N bytes, encoded as asked.
fn html_page(query: &str) -> Response<Full<Bytes>> {
    use std::io::Write;
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(percent_decode)
    };
    let head = if param("nohead").is_some() {
        ""
    } else {
        "<head><title>t</title></head>"
    };
    let mut page = format!("<!doctype html><html>{head}<body><p id=\"x\">hello</p>");
    if let Some(size) = param("size").and_then(|s| s.parse::<usize>().ok()) {
        let filler = "<div class=\"row\">0123456789 abcdefghij klmnopqrst uvwxyz</div>\n";
        page.reserve(size);
        while page.len() < size {
            page.push_str(filler);
        }
    }
    page.push_str("</body></html>");
    let enc = param("enc").unwrap_or_default();
    let body: Vec<u8> = match enc.as_str() {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(page.as_bytes()).expect("gzip");
            e.finish().expect("gzip")
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(page.as_bytes()).expect("deflate");
            e.finish().expect("deflate")
        }
        "br" => {
            let mut out = Vec::new();
            brotli::BrotliCompress(&mut page.as_bytes(), &mut out, &Default::default())
                .expect("br");
            out
        }
        "zstd" => zstd::encode_all(page.as_bytes(), 3).expect("zstd"),
        _ => page.into_bytes(),
    };
    let mut resp = Response::builder()
        .header(
            "content-type",
            param("ct").unwrap_or_else(|| "text/html; charset=utf-8".into()),
        )
        .header("etag", "\"v1\"")
        .header("content-md5", "Q2hlY2sgSW50ZWdyaXR5IQ==");
    if !enc.is_empty() {
        resp = resp.header("content-encoding", enc);
    }
    resp.body(Full::new(Bytes::from(body))).expect("response")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(n) = u8::from_str_radix(&s[i + 1..(i + 3).min(s.len())], 16) {
                out.push(n);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Headers the WebSocket backend saw on its last handshake.
pub type SeenHeaders = Arc<Mutex<Vec<(String, String)>>>;

/// WebSocket echo. Picks `vite-hmr` when offered; `/refuse` answers 403 with a header and body.
pub async fn ws_backend() -> (SocketAddr, SeenHeaders) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
    let addr = listener.local_addr().expect("addr");
    (addr, ws_on(listener))
}

/// The WebSocket echo backend on a listener the test bound.
pub fn ws_on(listener: TcpListener) -> SeenHeaders {
    let seen: SeenHeaders = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen2.clone();
            tokio::spawn(async move {
                let callback =
                    |req: &WsRequest, mut resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
                        *seen.lock().expect("lock") = req
                            .headers()
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.to_string(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect();
                        if req.uri().path() == "/refuse" {
                            let mut e = ErrorResponse::new(Some("refused by backend".into()));
                            *e.status_mut() = http::StatusCode::FORBIDDEN;
                            e.headers_mut()
                                .insert("x-why", http::HeaderValue::from_static("nope"));
                            return Err(e);
                        }
                        let offered = req
                            .headers()
                            .get("sec-websocket-protocol")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if offered.split(',').any(|p| p.trim() == "vite-hmr") {
                            resp.headers_mut().insert(
                                "sec-websocket-protocol",
                                http::HeaderValue::from_static("vite-hmr"),
                            );
                        }
                        resp.headers_mut()
                            .insert("x-backend", http::HeaderValue::from_static("ws-echo"));
                        Ok(resp)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        return;
                    }
                    let echo = msg.is_text() || msg.is_binary();
                    if echo && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    seen
}

/// The backends of these tests listen on 127.0.0.1, which `[upstreams]` refuses by default:
/// every generated config allows loopback unless the test writes its own `[upstreams]`.
pub fn loopback_upstreams(extra: &str) -> &'static str {
    if extra.contains("[upstreams]") {
        ""
    } else {
        "[upstreams]\nallow_loopback = true\n\n"
    }
}

/// The real binary, with a config written to a temp dir. Killed on drop.
pub struct Edge {
    pub child: Child,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Edge {
    /// `extra` is appended to a config with `[[domains]] edge.test`, the listeners, and
    /// whatever `[registry]`/`[[policy]]` the test needs.
    pub async fn start(extra: &str) -> Edge {
        Edge::start_with(extra, false, |_| {}).await
    }

    pub async fn start_with(
        extra: &str,
        https: bool,
        prepare: impl FnOnce(&std::path::Path),
    ) -> Edge {
        let dir = tempfile::tempdir().expect("tempdir");
        prepare(dir.path());
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let https_addr: Option<SocketAddr> =
            https.then(|| format!("127.0.0.1:{}", free_port()).parse().expect("addr"));
        Edge::start_in(dir, extra, http, https_addr).await
    }

    /// Like [`Edge::start_with`], on listener addresses the test chose (a peer such as an
    /// ACME server must know the HTTP port before the edge starts).
    pub async fn start_in(
        dir: tempfile::TempDir,
        extra: &str,
        http: SocketAddr,
        https_addr: Option<SocketAddr>,
    ) -> Edge {
        Edge::start_full(dir, DEFAULT_SERVER, extra, http, https_addr).await
    }

    /// Like [`Edge::start`], with `server` as the body of the `[server]` section instead of
    /// the harness's `threads = 1` + `shutdown_grace = "5s"`.
    pub async fn start_server(server: &str, extra: &str) -> Edge {
        let dir = tempfile::tempdir().expect("tempdir");
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Edge::start_full(dir, server, extra, http, None).await
    }

    /// The most general start: `[server]` body, extra config, listener addresses.
    pub async fn start_full(
        dir: tempfile::TempDir,
        server: &str,
        extra: &str,
        http: SocketAddr,
        https_addr: Option<SocketAddr>,
    ) -> Edge {
        Edge::start_full_command(dir, server, extra, http, https_addr, run_config).await
    }

    /// [`Edge::start_full`], the binary started by `command` (see [`Edge::start_command`]).
    pub async fn start_full_command(
        dir: tempfile::TempDir,
        server: &str,
        extra: &str,
        http: SocketAddr,
        https_addr: Option<SocketAddr>,
        command: impl FnOnce(&mut Command, &std::path::Path),
    ) -> Edge {
        let admin = write_config(dir.path(), server, extra, http, https_addr);
        Edge::spawn_on(dir, http, https_addr, admin, None, command).await
    }

    /// Runs the binary on `config` as written (its listeners must be `http`, `https` and
    /// `admin`), e.g. a copy of the shipped `routes.toml` moved to free ports.
    pub async fn run_config(
        dir: tempfile::TempDir,
        config: &str,
        http: SocketAddr,
        https_addr: Option<SocketAddr>,
        admin: SocketAddr,
    ) -> Edge {
        std::fs::write(dir.path().join("routes.toml"), config).expect("write config");
        Edge::spawn_on(dir, http, https_addr, admin, None, run_config).await
    }

    /// Starts the binary on the config already written in `dir`; with `logs`, its stderr
    /// lines are collected there (and still echoed) instead of inherited.
    async fn spawn_on(
        dir: tempfile::TempDir,
        http: SocketAddr,
        https_addr: Option<SocketAddr>,
        admin: SocketAddr,
        logs: Option<Logs>,
        command: impl FnOnce(&mut Command, &std::path::Path),
    ) -> Edge {
        let path = dir.path().join("routes.toml");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cmux-edge"));
        cmd.env("RUST_LOG", "warn");
        command(&mut cmd, &path);
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(if logs.is_some() {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("spawn cmux-edge");
        if let (Some(logs), Some(stderr)) = (logs, child.stderr.take()) {
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    eprintln!("{line}");
                    logs.lock().expect("logs").push(line);
                }
            });
        }
        let edge = Edge {
            child,
            http,
            https: https_addr,
            admin,
            dir,
        };
        edge.wait_ready().await;
        edge
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            // Started = healthy and the listeners seen up; /readyz may still wait on
            // certificates, which is for each test to look at.
            if let Ok(r) = raw(self.admin, "127.0.0.1", "GET", "/readyz", &[], b"").await {
                if !r.text().contains("listeners not started")
                    && TcpStream::connect(self.http).await.is_ok()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cmux-edge did not become ready");
    }

    /// Like [`Edge::start_with`] (no https), with the binary's stderr lines collected.
    pub async fn start_logged(extra: &str, prepare: impl FnOnce(&std::path::Path)) -> (Edge, Logs) {
        let dir = tempfile::tempdir().expect("tempdir");
        prepare(dir.path());
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin = write_config(dir.path(), DEFAULT_SERVER, extra, http, None);
        let logs = Logs::default();
        let edge = Edge::spawn_on(dir, http, None, admin, Some(logs.clone()), run_config).await;
        (edge, logs)
    }

    /// The harness's config in a fresh directory, the binary started by `command` (given the
    /// config path: it sets the arguments, environment, working directory).
    pub async fn start_command(
        extra: &str,
        command: impl FnOnce(&mut Command, &std::path::Path),
    ) -> Edge {
        let dir = tempfile::tempdir().expect("tempdir");
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin = write_config(dir.path(), DEFAULT_SERVER, extra, http, None);
        Edge::spawn_on(dir, http, None, admin, None, command).await
    }

    /// [`Edge::start_command`] with the binary's stderr lines collected.
    pub async fn start_command_logged(
        extra: &str,
        command: impl FnOnce(&mut Command, &std::path::Path),
    ) -> (Edge, Logs) {
        let dir = tempfile::tempdir().expect("tempdir");
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin = write_config(dir.path(), DEFAULT_SERVER, extra, http, None);
        let logs = Logs::default();
        let edge = Edge::spawn_on(dir, http, None, admin, Some(logs.clone()), command).await;
        (edge, logs)
    }

    /// `kill -9`, then start again on the same config and directory.
    pub async fn kill9_and_restart(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
        self.child = Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
            .args(["run", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("respawn cmux-edge");
        self.wait_ready().await;
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("routes.toml")
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// A preview host for `port`/`id` under the test domain.
    pub fn host(port: u16, id: &str) -> String {
        format!("port-{port}-vm-{id}.{DOMAIN}")
    }

    /// A reqwest client that resolves every preview host to the edge.
    pub fn client(&self, host: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .resolve(host, self.http)
            .no_proxy()
            .build()
            .expect("client")
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `run --config <path>`: how the harness starts the binary.
pub fn run_config(cmd: &mut Command, config: &std::path::Path) {
    cmd.args(["run", "--config"]).arg(config);
}

/// Stderr lines of a binary started with [`Edge::start_logged`].
pub type Logs = Arc<Mutex<Vec<String>>>;

/// Waits (up to 20 s) for a log line containing `needle`.
pub async fn wait_log(logs: &Logs, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(l) = logs
            .lock()
            .expect("logs")
            .iter()
            .find(|l| l.contains(needle))
        {
            return l.clone();
        }
        assert!(Instant::now() < deadline, "no log line with {needle:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `dir/routes.toml` with the harness's listeners; returns the admin address.
fn write_config(
    dir: &std::path::Path,
    server: &str,
    extra: &str,
    http: SocketAddr,
    https_addr: Option<SocketAddr>,
) -> SocketAddr {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let https_line = https_addr
        .map(|a| format!("https = \"{a}\"\n"))
        .unwrap_or_default();
    let config = format!(
        "[server]\n{server}\n\n[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n{https_line}\n{}\
             [[domains]]\nname = \"{DOMAIN}\"\n\n{extra}\n",
        loopback_upstreams(extra)
    );
    let path = dir.join("routes.toml");
    std::fs::write(&path, config).expect("write config");
    admin
}

pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A chunked body's bytes.
    pub fn dechunked(body: &[u8]) -> Vec<u8> {
        dechunk(body)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The echo backend's JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Headers the echo backend received, from its JSON, lowercased names.
pub fn seen(json: &serde_json::Value, name: &str) -> Vec<String> {
    json["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter(|p| p[0].as_str() == Some(name))
        .map(|p| p[1].as_str().unwrap_or("").to_owned())
        .collect()
}

/// One HTTP/1.1 request over a fresh connection with `Connection: close`, any Host at all.
pub async fn raw(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<RawResponse> {
    raw_from(None, addr, host, method, path, headers, body).await
}

/// Like [`raw`], from a chosen local address (e.g. 127.0.0.2, to play a trusted proxy).
pub async fn raw_from(
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<RawResponse> {
    let mut stream = match local {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(SocketAddr::new(ip, 0))?;
            s.connect(addr).await?
        }
    };
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("response timed out"))??;
    parse_response(&buf, method == "HEAD")
}

fn parse_response(buf: &[u8], head: bool) -> std::io::Result<RawResponse> {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "no header end in {:?}",
                String::from_utf8_lossy(buf)
            ))
        })?;
    let head_text = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked && !head {
        body = dechunk(&body);
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = nl + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}

/// One sample of `/metrics` on `admin`, written like `name{a="b",c="d"}` or `name` (labels in
/// any order, all of them named); `None` while the series does not exist.
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let r = raw(admin, "127.0.0.1", "GET", "/metrics", &[], b"")
        .await
        .ok()?;
    let text = r.text();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text format");
    let (name, labels) = series
        .split_once('{')
        .map_or((series, ""), |(n, l)| (n, l.trim_end_matches('}')));
    let wanted: Vec<(&str, &str)> = labels
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim_matches('"')))
        .collect();
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == wanted.len()
                && wanted.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// Waits (up to 20 s) until `series` on `admin` satisfies `want`; returns its value.
pub async fn wait_metric(admin: SocketAddr, series: &str, want: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = metric(admin, series).await;
        if let Some(v) = now.filter(|v| want(*v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached the wanted value (last: {now:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// This machine's own non-loopback IPv4 address (the one a packet to a private network
/// would leave from): for tests where a loopback address would be refused.
pub fn host_ipv4() -> std::net::Ipv4Addr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp bind");
    s.connect("10.255.255.255:9").expect("a route off loopback");
    match s.local_addr().expect("local addr").ip() {
        std::net::IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => ip,
        other => panic!("no non-loopback IPv4 address here: {other}"),
    }
}

/// Debian's Chromium, which `.ci/run` installs.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Opens `url` in headless Chromium with a fresh profile in `profile`, plus `extra` flags;
/// the browser is killed when the handle drops. The flags keep it off the (closed) network.
pub fn chromium(url: &str, profile: &std::path::Path, extra: &[&str]) -> tokio::process::Child {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    );
    tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--remote-debugging-port=0",
        ])
        .args(extra)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run chromium")
}
