//! README features proven through the real binary: the command line and its environment,
//! domains and route grammars, `[ports]`, `[trust]`, `env:` secrets, the admin state file and
//! body limit, the upstream timeouts, HEAD retried as GET, and `cors = "strip"`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{echo_backend, free_port, raw, raw_from, seen, wait_log, Edge, DOMAIN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One VM `local` on 127.0.0.1, and the policy keys these tests rely on.
const LOCAL: &str = "[[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n\n\
    [[policy]]\nport = \"*\"\ncors = \"passthrough\"\nembed = false\ninject_shim = false\n\
    rewrite_redirects = false\nhost_header = \"preserve\"\n";

async fn get(edge: &Edge, host: &str) -> support::RawResponse {
    raw(edge.http, host, "GET", "/", &[], b"").await.unwrap()
}

#[tokio::test]
async fn with_no_subcommand_it_runs_routes_toml_of_the_current_directory() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start_command(LOCAL, |cmd, config| {
        cmd.current_dir(config.parent().unwrap())
            .env_remove("CMUX_EDGE_CONFIG");
    })
    .await;
    let r = get(&edge, &Edge::host(b, "local")).await;
    assert_eq!(r.status, 200);
    assert_eq!(seen(&r.json(), "x-cmux-vm-id"), ["local"]);
}

#[tokio::test]
async fn cmux_edge_config_names_the_config_file() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start_command(LOCAL, |cmd, config| {
        // run from a directory with no routes.toml: only the variable can lead to the file
        let elsewhere = config.parent().unwrap().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        cmd.arg("run")
            .current_dir(elsewhere)
            .env("CMUX_EDGE_CONFIG", config);
    })
    .await;
    assert_eq!(get(&edge, &Edge::host(b, "local")).await.status, 200);
}

#[tokio::test]
async fn a_bare_domain_answers_its_apex() {
    support::install_crypto();
    // `[domains.apex]` belongs to the harness's edge.test; other.test keeps the default.
    let edge = Edge::start(&format!(
        "[domains.apex]\nstatus = 404\nbody = \"nothing at the apex\"\n\n\
         [[domains]]\nname = \"other.test\"\n\n{LOCAL}"
    ))
    .await;
    let r = get(&edge, DOMAIN).await;
    assert_eq!(r.status, 404);
    assert!(r.text().starts_with("nothing at the apex"), "{}", r.text());
    let r = get(&edge, "other.test").await;
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("cmux-edge"), "{}", r.text());
}

#[tokio::test]
async fn a_regex_route_takes_its_named_groups_and_validates_them() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&format!(
        "[[routes]]\nregex = '(?P<id>[a-z0-9]+)--(?P<port>[0-9]+)'\n\n{LOCAL}"
    ))
    .await;
    let r = get(&edge, &format!("local--{b}.{DOMAIN}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(seen(&j, "x-cmux-vm-id"), ["local"]);
    assert_eq!(seen(&j, "x-cmux-port-internal"), [b.to_string()]);
    // anchored at both ends
    assert_eq!(
        get(&edge, &format!("xlocal--{b}x.{DOMAIN}")).await.status,
        400
    );
    // the port group is validated like {port}: no leading zero
    assert_eq!(
        get(&edge, &format!("local--0{b}.{DOMAIN}")).await.status,
        400
    );
    // and the default pattern is not tried once routes are configured
    assert_eq!(get(&edge, &Edge::host(b, "local")).await.status, 400);
}

#[tokio::test]
async fn morph_and_scoped_patterns_route_and_set_the_workspace_header() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&format!(
        "[[routes]]\npattern = \"port-{{port}}-{{id}}\"\n\n\
         [[routes]]\npattern = \"cmux-{{id}}-{{scope}}-{{port}}\"\n\n\
         [[registry.vms]]\nid = \"morphvm-abc123\"\naddress = \"127.0.0.1\"\n\n\
         [[registry.vms]]\nid = \"b1\"\naddress = \"127.0.0.1\"\n\n{LOCAL}"
    ))
    .await;
    let client_forgery = [("X-Cmux-Workspace-Internal", "evil")];
    let ask = |label: String| {
        let host = format!("{label}.{DOMAIN}");
        let addr = edge.http;
        async move {
            let r = raw(addr, &host, "GET", "/", &client_forgery, b"")
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{host}: {}", r.text());
            r.json()
        }
    };
    let j = ask(format!("port-{b}-morphvm-abc123")).await;
    assert_eq!(seen(&j, "x-cmux-vm-id"), ["morphvm-abc123"]);
    assert!(seen(&j, "x-cmux-workspace-internal").is_empty());

    let j = ask(format!("cmux-b1-feat-x-{b}")).await;
    assert_eq!(seen(&j, "x-cmux-vm-id"), ["b1"]);
    assert_eq!(seen(&j, "x-cmux-port-internal"), [b.to_string()]);
    assert_eq!(seen(&j, "x-cmux-workspace-internal"), ["feat-x"]);

    // scope `base` and no scope at all send no workspace header (and not the client's)
    for label in [format!("cmux-b1-base-{b}"), format!("cmux-b1-{b}")] {
        let j = ask(label.clone()).await;
        assert_eq!(seen(&j, "x-cmux-vm-id"), ["b1"], "{label}");
        assert!(seen(&j, "x-cmux-workspace-internal").is_empty(), "{label}");
    }
}

#[tokio::test]
async fn ports_allow_admits_only_the_listed_ports_and_ranges() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let other = loop {
        let p = free_port();
        if ![1, b, b + 1].contains(&p) {
            break p;
        }
    };
    // the backend's port is admitted through a range, port 1 by number
    let edge = Edge::start(&format!(
        "[ports]\nallow = [1, \"{b}-{}\"]\n\n{LOCAL}",
        b + 1
    ))
    .await;
    assert_eq!(get(&edge, &Edge::host(b, "local")).await.status, 200);
    // port 1 is allowed, so it is tried (nothing listens there)
    assert_eq!(get(&edge, &Edge::host(1, "local")).await.status, 502);
    let r = get(&edge, &Edge::host(other, "local")).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), format!("port {other} is not reachable\n"));
}

/// The access log's JSON line for the request whose path is `path`.
async fn access_line(logs: &support::Logs, path: &str) -> serde_json::Value {
    let line = wait_log(logs, &format!("\"path\":\"{path}\"")).await;
    serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap()
}

#[tokio::test]
async fn trust_believes_forwarded_headers_only_from_the_listed_ranges() {
    support::install_crypto();
    let b = echo_backend().await.port();
    // "cloudflare" and a CIDR covering 127.0.0.2-127.0.0.3; 127.0.0.1 and .4 are untrusted.
    let (edge, logs) = Edge::start_command_logged(
        &format!("[trust]\nproxies = [\"cloudflare\", \"127.0.0.2/31\"]\n\n{LOCAL}"),
        |cmd, config| {
            support::run_config(cmd, config);
            cmd.env("RUST_LOG", "warn,access=info")
                .env("CMUX_EDGE_LOG_FORMAT", "json");
        },
    )
    .await;
    let host = Edge::host(b, "local");
    let claims = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("CF-Connecting-IP", "7.7.7.7"),
    ];
    for (n, from) in ["127.0.0.2", "127.0.0.3"].into_iter().enumerate() {
        let path = format!("/trusted-{n}");
        let r = raw_from(
            Some(from.parse().unwrap()),
            edge.http,
            &host,
            "GET",
            &path,
            &claims,
            b"",
        )
        .await
        .unwrap();
        let j = r.json();
        assert_eq!(seen(&j, "x-forwarded-for"), [format!("6.6.6.6, {from}")]);
        assert_eq!(seen(&j, "x-forwarded-proto"), ["https"]);
        assert_eq!(access_line(&logs, &path).await["client"], "7.7.7.7");
    }
    for (n, from) in ["127.0.0.1", "127.0.0.4"].into_iter().enumerate() {
        let path = format!("/untrusted-{n}");
        let r = raw_from(
            Some(from.parse().unwrap()),
            edge.http,
            &host,
            "GET",
            &path,
            &claims,
            b"",
        )
        .await
        .unwrap();
        let j = r.json();
        assert_eq!(seen(&j, "x-forwarded-for"), [from]);
        assert_eq!(seen(&j, "x-forwarded-proto"), ["http"]);
        assert_eq!(access_line(&logs, &path).await["client"], from);
    }
}

const VM_JSON: &str = r#"{"address": "127.0.0.1"}"#;

async fn put_vm(edge: &Edge, id: &str, token: &str, body: &[u8]) -> support::RawResponse {
    let auth = format!("Bearer {token}");
    raw(
        edge.admin,
        "127.0.0.1",
        "PUT",
        &format!("/api/vms/{id}"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn the_admin_token_comes_from_the_environment_and_state_goes_to_state_file() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start_command(
        &format!(
            "[admin]\ntoken = \"env:CMUX_EDGE_TEST_ADMIN_TOKEN\"\nstate_file = \"state/vms.json\"\n\n{LOCAL}"
        ),
        |cmd, config| {
            std::fs::create_dir_all(config.parent().unwrap().join("state")).unwrap();
            support::run_config(cmd, config);
            cmd.env("CMUX_EDGE_TEST_ADMIN_TOKEN", "t0ken-from-env-0123456789abcdef012345");
        },
    )
    .await;
    // the literal "env:..." is not the token
    let r = put_vm(
        &edge,
        "a1",
        "env:CMUX_EDGE_TEST_ADMIN_TOKEN",
        VM_JSON.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = put_vm(
        &edge,
        "a1",
        "t0ken-from-env-0123456789abcdef012345",
        VM_JSON.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(get(&edge, &Edge::host(b, "a1")).await.status, 200);

    let dir = edge.dir.path();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state/vms.json")).unwrap()).unwrap();
    assert!(state.to_string().contains("a1"), "{state}");
    assert!(!dir.join("cmux-edge-state.json").exists());
}

#[tokio::test]
async fn an_oversized_admin_body_is_413() {
    support::install_crypto();
    let edge = Edge::start(&format!(
        "[admin]\ntoken = \"tok-0123456789abcdef0123456789abcdef\"\n\n{LOCAL}"
    ))
    .await;
    // valid JSON, padded past the limit with whitespace
    let mut body = b"{\"address\": \"127.0.0.1\"".to_vec();
    body.resize(body.len() + 100 * 1024, b' ');
    body.push(b'}');
    let r = put_vm(&edge, "big", "tok-0123456789abcdef0123456789abcdef", &body).await;
    assert_eq!(r.status, 413, "{}", r.text());
    // the same registration, small, is taken
    assert_eq!(
        put_vm(
            &edge,
            "big",
            "tok-0123456789abcdef0123456789abcdef",
            VM_JSON.as_bytes()
        )
        .await
        .status,
        201
    );
}

/// A backend that accepts connections and never reads or answers: the listen queue fills,
/// and later connection attempts hang in SYN.
async fn black_hole() -> (SocketAddr, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    // fill the accept queue (never accepted); the listener must stay open
    let mut held = Vec::new();
    for _ in 0..4 {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    std::mem::forget(listener);
    (addr, held)
}

#[tokio::test]
async fn the_connect_timeout_is_a_504() {
    support::install_crypto();
    let (hole, _held) = black_hole().await;
    let edge = Edge::start(&format!("[timeouts]\nconnect = \"1s\"\n\n{LOCAL}")).await;
    let r = get(&edge, &Edge::host(hole.port(), "local")).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(
        r.text(),
        format!("upstream timeout: vm local port {}\n", hole.port())
    );
    assert_eq!(
        support::metric(
            edge.admin,
            r#"cmux_edge_upstream_errors_total{kind="timeout"}"#
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn the_write_timeout_cuts_an_upstream_that_stops_reading() {
    support::install_crypto();
    // The VM reads the request head and then nothing: the body fills the socket buffers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 1024];
                let _ = s.read(&mut head).await;
                tokio::time::sleep(Duration::from_secs(120)).await;
            });
        }
    });
    // read = 10 s: without the write timeout the request would end as a read timeout.
    let (edge, logs) = Edge::start_command_logged(
        &format!("[timeouts]\nwrite = \"1s\"\nread = \"10s\"\n\n{LOCAL}"),
        |cmd, config| {
            support::run_config(cmd, config);
            cmd.env("RUST_LOG", "warn,access=info")
                .env("CMUX_EDGE_LOG_FORMAT", "json");
        },
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    let len = 64 * 1024 * 1024;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        Edge::host(port, "local")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    // keep sending while the edge is willing to read; stop when it is not
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < len {
            match tokio::time::timeout(Duration::from_secs(30), wr.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break,
            }
        }
    });
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut buf)).await;
    writer.abort();
    assert!(
        read.is_ok(),
        "no answer within 30 s: the write to the upstream was never cut"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.starts_with("HTTP/1.1 504"),
        "{:?}",
        &text[..text.len().min(200)]
    );
    assert_eq!(
        support::metric(
            edge.admin,
            r#"cmux_edge_upstream_errors_total{kind="timeout"}"#
        )
        .await,
        Some(1.0)
    );
    let line = access_line(&logs, "/upload").await;
    assert_eq!(line["error"], "WriteTimedout", "{line}");
}

/// An echo backend that counts the connections it accepted and those that were closed.
async fn counting_backend() -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (o, c) = (opened.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            o.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"pooled")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (port, opened, closed)
}

#[tokio::test]
async fn an_idle_pooled_upstream_connection_is_closed_after_the_idle_timeout() {
    support::install_crypto();
    let (port, opened, closed) = counting_backend().await;
    let edge = Edge::start(&format!("[timeouts]\nidle = \"2s\"\n\n{LOCAL}")).await;
    let host = Edge::host(port, "local");
    for _ in 0..3 {
        let r = get(&edge, &host).await;
        assert_eq!((r.status, r.text().as_str()), (200, "pooled"));
    }
    // the three requests shared one pooled connection
    assert_eq!(opened.load(Ordering::SeqCst), 1);
    assert_eq!(closed.load(Ordering::SeqCst), 0);
    // left idle, the edge closes it (with the 60 s default it would still be open)
    let deadline = Instant::now() + Duration::from_secs(20);
    while closed.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the idle pooled connection was kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // the next request needs a new connection
    assert_eq!(get(&edge, &host).await.status, 200);
    assert_eq!(opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_head_the_upstream_answers_501_is_retried_as_get() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(LOCAL).await;
    let r = raw(
        edge.http,
        &Edge::host(b, "local"),
        "HEAD",
        "/no-head?status=501",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-method-seen"), Some("GET"));
    assert_eq!(r.header("content-length"), Some("5"));
    assert!(r.body.is_empty(), "a HEAD answer carried a body");

    // and over HTTP/2 (h2c with prior knowledge)
    let host = Edge::host(b, "local");
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve(&host, edge.http)
        .no_proxy()
        .build()
        .unwrap();
    let resp = h2
        .head(format!(
            "http://{host}:{}/no-head?status=501",
            edge.http.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-method-seen"], "GET");
    assert_eq!(resp.headers()["content-length"], "5");
    assert!(resp.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn cors_strip_answers_every_options_bare_and_removes_cors_headers() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&format!(
        "{LOCAL}\n[[policy]]\nport = {b}\ncors = \"strip\"\n"
    ))
    .await;
    let host = Edge::host(b, "local");
    // a bare OPTIONS (no Origin, no Access-Control-Request-Method) never reaches the VM
    for headers in [
        vec![],
        vec![
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "PUT"),
        ],
    ] {
        let r = raw(edge.http, &host, "OPTIONS", "/", &headers, b"")
            .await
            .unwrap();
        assert_eq!(r.status, 204, "{headers:?}: {}", r.text());
        assert!(r.body.is_empty());
        assert!(
            !r.headers
                .iter()
                .any(|(k, _)| k.to_ascii_lowercase().starts_with("access-control-")),
            "{:?}",
            r.headers
        );
    }
    // a VM's own CORS headers are removed
    let r = raw(
        edge.http,
        &host,
        "GET",
        "/respond?h=Access-Control-Allow-Origin:*&h=Access-Control-Allow-Credentials:true",
        &[("Origin", "https://app.example")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        !r.headers
            .iter()
            .any(|(k, _)| k.to_ascii_lowercase().starts_with("access-control-")),
        "{:?}",
        r.headers
    );
}
