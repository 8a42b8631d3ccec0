//! The core proxy over real sockets: the real binary, real backends, real clients.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::{echo_backend, raw, raw_from, seen, ws_backend, Edge, DOMAIN};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// One VM `local` on 127.0.0.1; VM `mapped` publishes VM port 39378 on the backend's port.
fn registry(backend_port: u16) -> String {
    format!(
        "[[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n\n\
         [[registry.vms]]\nid = \"mapped\"\naddress = \"127.0.0.1\"\nports = {{ 39378 = {backend_port}, 39379 = {backend_port}, 39380 = {backend_port} }}\n\n\
         [ports]\ndeny = [22]\n\n\
         [[policy]]\nport = 39379\npass_client_headers = [\"X-Cmux-Port-Internal\", \"X-Cmux-Host-Override\"]\n\n\
         [[policy]]\nport = 39380\nhost_header = \"upstream\"\n\n\
         [trust]\nproxies = [\"127.0.0.2\"]\n\n\
         [timeouts]\nread = \"2s\"\n"
    )
}

async fn setup() -> (Edge, u16) {
    support::install_crypto();
    let backend = echo_backend().await;
    let edge = Edge::start(&registry(backend.port())).await;
    (edge, backend.port())
}

#[tokio::test]
async fn a_preview_host_reaches_the_vm_port() {
    let (edge, port) = setup().await;
    let r = raw(
        edge.http,
        &Edge::host(port, "local"),
        "GET",
        "/p?q=1",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["path"], "/p");
    assert_eq!(j["query"], "q=1");
    assert_eq!(r.header("x-request-id").map(str::len), Some(32));
}

#[tokio::test]
async fn every_routing_status_of_spec_section_3_has_its_one_line_body() {
    let (edge, port) = setup().await;
    let cases: &[(String, u16, &str)] = &[
        (
            "example.org".into(),
            421,
            "misdirected request: example.org is not served here",
        ),
        (
            format!("port-0-vm-a.{DOMAIN}"),
            400,
            "invalid preview host: port \"0\"",
        ),
        (
            format!("port-65536-vm-a.{DOMAIN}"),
            400,
            "invalid preview host: port \"65536\"",
        ),
        (
            format!("port-080-vm-a.{DOMAIN}"),
            400,
            "invalid preview host: port \"080\"",
        ),
        (
            format!("a.b.{DOMAIN}"),
            400,
            "invalid preview host: \"a.b\" has more than one label",
        ),
        (
            format!("port-1-vm-{}.{DOMAIN}", "a".repeat(54)),
            400,
            "invalid preview host: label is 64 bytes",
        ),
        (
            format!("port-80-vm-a%2f.{DOMAIN}"),
            400,
            "invalid preview host: character '%'",
        ),
        (
            format!("hello.{DOMAIN}"),
            400,
            "invalid preview host: \"hello\" matches no route pattern",
        ),
        (
            format!("port-22-vm-local.{DOMAIN}"),
            403,
            "port 22 is not reachable",
        ),
        (
            format!("port-{port}-vm-nobody.{DOMAIN}"),
            404,
            "unknown vm nobody",
        ),
        (DOMAIN.into(), 200, "cmux-edge"),
    ];
    for (host, status, body) in cases {
        let r = raw(edge.http, host, "GET", "/", &[], b"").await.unwrap();
        assert_eq!(r.status, *status, "{host}: {}", r.text());
        assert!(r.text().starts_with(body), "{host}: {:?}", r.text());
        assert_eq!(r.text().trim_end().lines().count(), 1, "{host}");
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; charset=utf-8"),
            "{host}"
        );
        assert!(r.header("x-request-id").is_some(), "{host}");
    }
}

#[tokio::test]
async fn hosts_with_userinfo_are_400_and_never_routed() {
    // pingora's HTTP parser refuses userinfo in Host (RFC 9112 §3.2) before any hook runs,
    // so the status is SPEC's but the body is pingora's (empty).
    let (edge, _) = setup().await;
    for host in [
        format!("port-80-vm-a@127.0.0.1:1.{DOMAIN}"),
        format!("port-80-vm-a@b.{DOMAIN}"),
    ] {
        let r = raw(edge.http, &host, "GET", "/", &[], b"").await.unwrap();
        assert_eq!(r.status, 400, "{host}");
    }
}

#[tokio::test]
async fn host_case_port_and_trailing_dot_do_not_matter() {
    let (edge, port) = setup().await;
    let host = format!("PORT-{port}-VM-Local.Edge.Test.:8080");
    let r = raw(edge.http, &host, "GET", "/", &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn x_forwarded_host_from_a_client_is_never_used_for_routing() {
    let (edge, port) = setup().await;
    let r = raw(
        edge.http,
        "example.org",
        "GET",
        "/",
        &[("X-Forwarded-Host", &Edge::host(port, "local"))],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 421);
}

#[tokio::test]
async fn loop_header_true_in_any_case_is_508_and_other_values_pass() {
    let (edge, port) = setup().await;
    let host = Edge::host(port, "local");
    for v in ["true", "TRUE", " True "] {
        let r = raw(edge.http, &host, "GET", "/", &[("X-Cmux-Proxied", v)], b"")
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.text().as_str()),
            (508, "Loop detected in proxy\n"),
            "{v}"
        );
    }
    // before any registry call: an unknown vm with the loop header is still 508
    let r = raw(
        edge.http,
        &Edge::host(port, "nobody"),
        "GET",
        "/",
        &[("X-Cmux-Proxied", "true")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 508);
    let r = raw(
        edge.http,
        &host,
        "GET",
        "/",
        &[("X-Cmux-Proxied", "1")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn cmux_headers_are_injected_and_client_ones_stripped() {
    let (edge, port) = setup().await;
    let r = raw(
        edge.http,
        &Edge::host(port, "local"),
        "GET",
        "/",
        &[
            ("X-Cmux-Port-Internal", "1"),
            ("X-Cmux-Workspace-Internal", "evil"),
            ("X-Cmux-Host-Override", "localhost:1"),
            ("X-Cmux-Vm-Id", "other"),
        ],
        b"",
    )
    .await
    .unwrap();
    let j = r.json();
    assert_eq!(seen(&j, "x-cmux-proxied"), ["true"]);
    assert_eq!(seen(&j, "x-cmux-port-internal"), [port.to_string()]);
    assert_eq!(seen(&j, "x-cmux-vm-id"), ["local"]);
    assert!(seen(&j, "x-cmux-workspace-internal").is_empty());
    assert!(seen(&j, "x-cmux-host-override").is_empty());
}

#[tokio::test]
async fn pass_client_headers_lets_the_named_ones_through_on_that_port_only() {
    let (edge, _) = setup().await;
    let headers = [
        ("X-Cmux-Port-Internal", "5173"),
        ("X-Cmux-Host-Override", "localhost:5173"),
    ];
    let r = raw(
        edge.http,
        &Edge::host(39379, "mapped"),
        "GET",
        "/",
        &headers,
        b"",
    )
    .await
    .unwrap();
    let j = r.json();
    // the client's value wins over ours for a passed header
    assert_eq!(seen(&j, "x-cmux-port-internal"), ["5173"]);
    assert_eq!(seen(&j, "x-cmux-host-override"), ["localhost:5173"]);
    let r = raw(
        edge.http,
        &Edge::host(39378, "mapped"),
        "GET",
        "/",
        &headers,
        b"",
    )
    .await
    .unwrap();
    let j = r.json();
    assert_eq!(seen(&j, "x-cmux-port-internal"), ["39378"]);
    assert!(seen(&j, "x-cmux-host-override").is_empty());
}

#[tokio::test]
async fn host_is_preserved_by_default_and_upstream_on_request() {
    let (edge, backend_port) = setup().await;
    let host = Edge::host(39378, "mapped");
    let j = raw(edge.http, &host, "GET", "/", &[], b"")
        .await
        .unwrap()
        .json();
    assert_eq!(seen(&j, "host"), std::slice::from_ref(&host));
    assert_eq!(seen(&j, "x-forwarded-host"), [host]);
    let j = raw(
        edge.http,
        &Edge::host(39380, "mapped"),
        "GET",
        "/",
        &[],
        b"",
    )
    .await
    .unwrap()
    .json();
    assert_eq!(seen(&j, "host"), [format!("127.0.0.1:{backend_port}")]);
}

#[tokio::test]
async fn forwarded_headers_are_believed_only_from_trusted_proxies() {
    let (edge, port) = setup().await;
    let host = Edge::host(port, "local");
    let spoof = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("CF-Connecting-IP", "7.7.7.7"),
    ];
    let j = raw(edge.http, &host, "GET", "/", &spoof, b"")
        .await
        .unwrap()
        .json();
    assert_eq!(seen(&j, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen(&j, "x-forwarded-proto"), ["http"]);

    let trusted = Some("127.0.0.2".parse().unwrap());
    let j = raw_from(trusted, edge.http, &host, "GET", "/", &spoof, b"")
        .await
        .unwrap()
        .json();
    assert_eq!(seen(&j, "x-forwarded-for"), ["6.6.6.6, 127.0.0.2"]);
    assert_eq!(seen(&j, "x-forwarded-proto"), ["https"]);
}

#[tokio::test]
async fn two_set_cookie_headers_survive() {
    let (edge, port) = setup().await;
    let r = raw(
        edge.http,
        &Edge::host(port, "local"),
        "GET",
        "/cookies",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(
        r.headers_named("set-cookie"),
        ["a=1; Path=/", "b=2; Path=/"]
    );
}

#[tokio::test]
async fn repeated_request_headers_stay_repeated() {
    let (edge, port) = setup().await;
    let r = raw(
        edge.http,
        &Edge::host(port, "local"),
        "GET",
        "/",
        &[("X-A", "1"), ("X-A", "2")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(seen(&r.json(), "x-a"), ["1", "2"]);
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_the_edge() {
    let (edge, port) = setup().await;
    let headers = [
        ("Keep-Alive", "timeout=5"),
        ("X-Secret", "s"),
        ("Proxy-Authorization", "Basic eA=="),
    ];
    let mut req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close, X-Secret\r\n",
        Edge::host(port, "local")
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let body = body
        .find('{')
        .map(|i| &body[i..body.rfind('}').unwrap() + 1])
        .unwrap();
    let j: serde_json::Value = serde_json::from_str(body).unwrap();
    for h in ["keep-alive", "x-secret", "proxy-authorization"] {
        assert!(seen(&j, h).is_empty(), "{h} was forwarded");
    }
}

/// A backend that echoes a request body, and reports on `first` as soon as the first body
/// bytes arrive (before the body is complete).
async fn streaming_backend() -> (u16, tokio::sync::mpsc::UnboundedReceiver<usize>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    support::spawn_http(listener, move |req| {
        let tx = tx.clone();
        async move {
            let mut body = req.into_body();
            let mut got = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    if got.is_empty() && !data.is_empty() {
                        let _ = tx.send(data.len());
                    }
                    got.extend_from_slice(data);
                }
            }
            hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(got)))
        }
    });
    (port, rx)
}

#[tokio::test]
async fn a_1mib_post_is_streamed_intact() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    support::install_crypto();
    let (port, mut first) = streaming_backend().await;
    let edge = Edge::start(&registry(port)).await;
    let body: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut s = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        Edge::host(port, "local"),
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let half = body.len() / 2;
    s.write_all(&body[..half]).await.unwrap();
    // The client holds the second half back: a buffering proxy would wait for it forever.
    let seen_first = tokio::time::timeout(Duration::from_secs(15), first.recv())
        .await
        .expect("the VM saw no byte before the client finished sending: the body was buffered")
        .unwrap();
    assert!(seen_first > 0 && seen_first <= half);
    s.write_all(&body[half..]).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..split])
    );
    let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
    let got = if head.contains("transfer-encoding: chunked") {
        support::RawResponse::dechunked(&buf[split..])
    } else {
        buf[split..].to_vec()
    };
    assert_eq!(got.len(), body.len());
    assert!(got == body, "body changed in transit");
}

#[tokio::test]
async fn h2c_prior_knowledge_is_routed_by_authority() {
    let (edge, port) = setup().await;
    let host = Edge::host(port, "local");
    let client = reqwest::Client::builder()
        .resolve(&host, edge.http)
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let resp = client
        .get(format!("http://{host}:{}/h2", edge.http.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let j: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(j["path"], "/h2");
    assert_eq!(seen(&j, "host"), [format!("{host}:{}", edge.http.port())]);
    assert_eq!(seen(&j, "x-cmux-vm-id"), ["local"]);
    // a loop over h2 is refused the same way
    let resp = client
        .get(format!("http://{host}:{}/", edge.http.port()))
        .header("x-cmux-proxied", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 508);
}

#[tokio::test]
async fn a_closed_backend_port_is_502_and_a_slow_one_504() {
    let (edge, port) = setup().await;
    let closed = support::free_port();
    let r = raw(
        edge.http,
        &Edge::host(closed, "local"),
        "GET",
        "/",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(
        r.text(),
        format!("upstream unreachable: vm local port {closed}\n")
    );
    // [timeouts] read = "2s"
    let r = raw(
        edge.http,
        &Edge::host(port, "local"),
        "GET",
        "/slow",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let r = raw(
        edge.http,
        &Edge::host(port, "local"),
        "GET",
        "/slow?ms=3000",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 504);
    assert_eq!(
        r.text(),
        format!("upstream timeout: vm local port {port}\n")
    );
}

#[tokio::test]
async fn upstream_error_statuses_pass_through_unchanged() {
    let (edge, port) = setup().await;
    let r = raw(
        edge.http,
        &Edge::host(port, "local"),
        "GET",
        "/status/503",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("content-type"), Some("application/json"));
}

async fn ws_edge() -> (Edge, u16, support::SeenHeaders) {
    support::install_crypto();
    let (ws, seen_headers) = ws_backend().await;
    let edge = Edge::start(&registry(ws.port())).await;
    (edge, ws.port(), seen_headers)
}

fn ws_request(edge: &Edge, port: u16, path: &str) -> http::Request<()> {
    let mut req = format!("ws://{}{path}", edge.http)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("host", Edge::host(port, "local").parse().unwrap());
    req
}

#[tokio::test]
async fn websocket_text_binary_and_ping_are_tunnelled() {
    let (edge, port, seen_headers) = ws_edge().await;
    let mut req = ws_request(&edge, port, "/ws");
    req.headers_mut()
        .insert("x-cmux-workspace-internal", "evil".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers().get("x-backend").unwrap(), "ws-echo");
    ws.send(Message::text("hello-ws")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello-ws"));
    ws.send(Message::binary(vec![1u8, 2, 3, 4])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3, 4])
    );
    ws.send(Message::Ping("pp".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Pong("pp".into())
    );
    ws.close(None).await.unwrap();
    let h = seen_headers.lock().unwrap().clone();
    let get = |n: &str| {
        h.iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("x-cmux-proxied"), ["true"]);
    assert_eq!(get("x-cmux-vm-id"), ["local"]);
    assert!(
        get("x-cmux-workspace-internal").is_empty(),
        "client X-Cmux-* reached the upstream on WS"
    );
}

#[tokio::test]
async fn websocket_subprotocol_is_negotiated_end_to_end() {
    let (edge, port, _) = ws_edge().await;
    let mut req = ws_request(&edge, port, "/hmr");
    req.headers_mut()
        .insert("sec-websocket-protocol", "foo, vite-hmr".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "vite-hmr"
    );
    ws.send(Message::text("subprotocol")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("subprotocol")
    );
}

#[tokio::test]
async fn websocket_refusal_reaches_the_client_with_headers_and_body() {
    let (edge, port, _) = ws_edge().await;
    let handshake = [
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ];
    let r = raw(
        edge.http,
        &Edge::host(port, "local"),
        "GET",
        "/refuse",
        &handshake,
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-why"), Some("nope"));
    assert_eq!(r.text(), "refused by backend");
}

#[tokio::test]
async fn a_quiet_websocket_outlives_the_read_timeout_and_is_closed_at_websocket_idle() {
    // pingora cuts a silent connection after its read timeout; a tunnel must live until
    // websocket_idle instead. read = 1 s, websocket_idle = 6 s: a tunnel quiet for 2.5 s is
    // still open, then, left quiet, the edge closes it.
    support::install_crypto();
    let (ws, _) = ws_backend().await;
    let edge = Edge::start(&format!(
        "{}\n",
        registry(ws.port()).replace("read = \"2s\"", "read = \"1s\"\nwebsocket_idle = \"6s\"")
    ))
    .await;
    let (mut sock, _) = tokio_tungstenite::connect_async(ws_request(&edge, ws.port(), "/ws"))
        .await
        .unwrap();
    sock.send(Message::text("tick")).await.unwrap();
    assert_eq!(sock.next().await.unwrap().unwrap(), Message::text("tick"));
    // quiet both ways for longer than [timeouts] read
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sock.send(Message::text("after read")).await.unwrap();
    assert_eq!(
        sock.next().await.unwrap().unwrap(),
        Message::text("after read"),
        "a quiet WebSocket was cut at [timeouts] read"
    );
    // now quiet for good: the edge closes it (with websocket_idle = 1h this would hang)
    let end = tokio::time::timeout(Duration::from_secs(30), sock.next())
        .await
        .expect("the quiet WebSocket was not closed at websocket_idle");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_)) | Ok(Message::Binary(_)))),
        "{end:?}"
    );
}

#[tokio::test]
async fn sigterm_finishes_the_in_flight_request_and_exits_as_soon_as_drained() {
    support::install_crypto();
    let backend = echo_backend().await;
    // A grace of 30 s: pingora alone would sit out all of it; cmux-edge leaves once drained.
    let mut edge = Edge::start_server(
        "threads = 1\nshutdown_grace = \"30s\"",
        &registry(backend.port()),
    )
    .await;
    let addr = edge.http;
    let host = Edge::host(backend.port(), "local");
    let inflight =
        tokio::spawn(async move { raw(addr, &host, "GET", "/slow?ms=1000", &[], b"").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    edge.signal("TERM");
    let signalled = std::time::Instant::now();
    let r = inflight.await.unwrap().unwrap();
    assert_eq!(r.status, 200, "in-flight request was cut");
    assert_eq!(r.json()["path"], "/slow");
    // well inside the 30 s grace, so only an exit on drain passes
    let deadline = signalled + Duration::from_secs(15);
    loop {
        if let Some(status) = edge.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running 15 s into a 30 s grace with nothing in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigint_drains_too() {
    let (mut edge, port) = setup().await;
    let addr = edge.http;
    let host = Edge::host(port, "local");
    let inflight =
        tokio::spawn(async move { raw(addr, &host, "GET", "/slow?ms=1500", &[], b"").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    edge.signal("INT");
    let r = inflight
        .await
        .unwrap()
        .expect("the in-flight request was cut by SIGINT");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/slow", "the body arrived whole");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while edge.child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(edge.child.try_wait().unwrap().unwrap().success());
}

#[tokio::test]
async fn admin_endpoints_live_on_the_admin_listener_only() {
    let (edge, port) = setup().await;
    let r = raw(edge.admin, "127.0.0.1", "GET", "/healthz", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = raw(edge.admin, "127.0.0.1", "GET", "/readyz", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // on a preview host, /healthz is the app's own path
    let r = raw(
        edge.http,
        &Edge::host(port, "local"),
        "GET",
        "/healthz",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.json()["path"], "/healthz");
}

#[tokio::test]
async fn the_template_source_reaches_the_address_it_builds() {
    support::install_crypto();
    let backend = echo_backend().await;
    let edge =
        Edge::start("[registry]\nsource = \"template\"\ntemplate = \"127.0.0.{id}\"\n").await;
    let r = raw(
        edge.http,
        &Edge::host(backend.port(), "1"),
        "GET",
        "/t",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/t");
    // an id that cannot make an address is an unknown vm, not a lookup of anything
    let r = raw(
        edge.http,
        &Edge::host(backend.port(), "zz"),
        "GET",
        "/",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (404, "unknown vm zz\n"));
}
