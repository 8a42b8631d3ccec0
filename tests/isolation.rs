//! SPEC §10 over real sockets: the edge treats every VM as hostile. The built-in policy with no
//! `[[policy]]` at all; `permissive` CORS only for `allow_origins` (exact, patterns, `*`
//! without credentials), Private Network Access only when allowed; exactly one
//! `frame-ancestors` with `embed`; host-only cookies; the service-worker gate; and the client
//! headers an upstream never sees from an untrusted peer.

mod support;

use std::net::IpAddr;

use support::{echo_backend, raw, raw_from, seen, Edge, RawResponse};

/// VM `v` publishes every port below on the echo backend. No `"*"` policy: whatever a port
/// does not set is the built-in default.
async fn setup() -> (Edge, u16) {
    support::install_crypto();
    let b = echo_backend().await.port();
    let ports: Vec<String> = [1000, 2001, 2002, 2003, 2004, 2005, 2006, 39379]
        .iter()
        .map(|p| format!("{p} = {b}"))
        .collect();
    let edge = Edge::start(&format!(
        "[[registry.vms]]\nid = \"v\"\naddress = \"127.0.0.1\"\nports = {{ {} }}\n\n\
         [ports]\ndeny = [22]\n\n\
         [[policy]]\nport = 2001\ncors = \"permissive\"\nembed = true\n\
         allow_origins = [\"https://dash.test\", \"https://*.team.test\", \"http://localhost:*\"]\n\n\
         [[policy]]\nport = 2002\ncors = \"permissive\"\nallow_origins = [\"*\"]\nallow_private_network = true\nembed = true\n\n\
         [[policy]]\nport = 2003\nembed = true\nallow_origins = [\"https://dash.test\"]\nframe_ancestors = [\"'self'\", \"https://frame.test\"]\n\n\
         [[policy]]\nport = 2004\nembed = true\n\n\
         [[policy]]\nport = 2005\ncookies = \"passthrough\"\nservice_workers = \"allow\"\n\n\
         [[policy]]\nport = 2006\ninject_shim = true\n\n\
         [[policy]]\nport = 39379\npass_client_headers = [\"X-Cmux-Port-Internal\"]\n\n\
         [trust]\nproxies = [\"127.0.0.2\"]\n",
        ports.join(", ")
    ))
    .await;
    (edge, b)
}

fn cors(r: &RawResponse) -> Vec<String> {
    let mut v: Vec<String> = r
        .headers
        .iter()
        .filter(|(k, _)| k.to_ascii_lowercase().starts_with("access-control-"))
        .map(|(k, v)| format!("{}: {v}", k.to_ascii_lowercase()))
        .collect();
    v.sort();
    v
}

async fn get(edge: &Edge, port: u16, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    raw(edge.http, &Edge::host(port, "v"), "GET", path, headers, b"")
        .await
        .unwrap()
}

async fn preflight(edge: &Edge, port: u16, origin: &str, extra: &[(&str, &str)]) -> RawResponse {
    let mut h = vec![
        ("Origin", origin),
        ("Access-Control-Request-Method", "PUT"),
        ("Access-Control-Request-Headers", "x-token"),
    ];
    h.extend_from_slice(extra);
    raw(
        edge.http,
        &Edge::host(port, "v"),
        "OPTIONS",
        "/api",
        &h,
        b"",
    )
    .await
    .unwrap()
}

/// The app grants every origin with credentials and frames for nobody: what a careless dev
/// server (or a hostile one) sends.
const GREEDY_APP: &str =
    "/respond?h=Access-Control-Allow-Origin:*&h=Access-Control-Allow-Credentials:true\
     &h=Content-Security-Policy:frame-ancestors+'none'&h=X-Frame-Options:DENY";

#[tokio::test]
async fn with_no_policy_the_edge_adds_no_cors_keeps_framing_headers_injects_nothing_and_strips_cookie_domains(
) {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start("[[registry.vms]]\nid = \"v\"\naddress = \"127.0.0.1\"\n").await;
    let host = Edge::host(b, "v");
    // the preflight goes to the app
    let r = raw(
        edge.http,
        &host,
        "OPTIONS",
        "/api",
        &[
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "PUT"),
        ],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["method"], "OPTIONS");
    assert!(cors(&r).is_empty(), "{:?}", cors(&r));
    // the app's own CORS and framing headers pass untouched
    let path = "/respond?h=Content-Security-Policy:default-src+'self'&h=X-Frame-Options:DENY\
                &h=Cross-Origin-Opener-Policy:same-origin\
                &h=Set-Cookie:a%3D1%3B+Domain%3Dedge.test%3B+Path%3D%2F&h=Set-Cookie:b%3D2%3B+domain%3D.edge.test";
    let r = raw(
        edge.http,
        &host,
        "GET",
        path,
        &[("Origin", "https://evil.example")],
        b"",
    )
    .await
    .unwrap();
    assert!(cors(&r).is_empty(), "{:?}", cors(&r));
    assert_eq!(
        r.headers_named("content-security-policy"),
        ["default-src 'self'"]
    );
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("cross-origin-opener-policy"), Some("same-origin"));
    assert_eq!(r.headers_named("set-cookie"), ["a=1; Path=/", "b=2"]);
    // no shim in HTML, and /proxy-sw.js is the app's own path
    let r = raw(edge.http, &host, "GET", "/html", &[], b"")
        .await
        .unwrap();
    assert!(!r.text().contains("data-cmux-shim"), "{}", r.text());
    assert_eq!(r.header("etag"), Some("\"v1\""));
    let r = raw(edge.http, &host, "GET", "/proxy-sw.js", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.json()["path"], "/proxy-sw.js");
}

#[test]
fn permissive_without_allow_origins_is_refused_by_check_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(
        &path,
        "[[domains]]\nname = \"example.com\"\n\n[[policy]]\nport = \"*\"\ncors = \"permissive\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("routes.toml:6:8: policy[1].cors: cors = \"permissive\" needs allow_origins"),
        "{text}"
    );
}

#[tokio::test]
async fn a_listed_origin_is_granted_with_credentials_and_vary_origin() {
    let (edge, _) = setup().await;
    let r = preflight(&edge, 2001, "https://dash.test", &[]).await;
    assert_eq!(r.status, 204);
    assert_eq!(
        cors(&r),
        [
            "access-control-allow-credentials: true",
            "access-control-allow-headers: x-token",
            "access-control-allow-methods: GET, POST, PUT, PATCH, DELETE, OPTIONS, HEAD",
            "access-control-allow-origin: https://dash.test",
            "access-control-max-age: 86400",
        ]
    );
    assert_eq!(r.header("vary"), Some("Origin"));
    let r = get(&edge, 2001, GREEDY_APP, &[("Origin", "https://dash.test")]).await;
    assert_eq!(
        r.headers_named("access-control-allow-origin"),
        ["https://dash.test"]
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("vary"), Some("Origin"));
}

#[tokio::test]
async fn pattern_origins_grant_subdomains_and_any_port_but_not_lookalikes() {
    let (edge, _) = setup().await;
    for origin in [
        "https://a.team.test",
        "https://b.c.team.test",
        "http://localhost:5173",
    ] {
        let r = preflight(&edge, 2001, origin, &[]).await;
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
        let r = get(&edge, 2001, "/", &[("Origin", origin)]).await;
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    }
    for origin in [
        "https://team.test",
        "https://evilteam.test",
        "http://a.team.test",
        "https://localhost:5173",
        "http://localhost.evil.test:5173",
    ] {
        let r = preflight(&edge, 2001, origin, &[]).await;
        assert!(cors(&r).is_empty(), "{origin}: {:?}", cors(&r));
    }
}

#[tokio::test]
async fn an_unlisted_origin_gets_no_grant_and_no_requested_headers_even_when_the_app_grants_it() {
    let (edge, _) = setup().await;
    let r = preflight(&edge, 2001, "https://evil.example", &[]).await;
    assert_eq!(r.status, 204);
    assert!(cors(&r).is_empty(), "{:?}", cors(&r));
    assert_eq!(r.header("vary"), Some("Origin"));
    let r = get(
        &edge,
        2001,
        GREEDY_APP,
        &[("Origin", "https://evil.example")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(cors(&r).is_empty(), "{:?}", cors(&r));
}

#[tokio::test]
async fn star_grants_every_origin_but_never_with_credentials() {
    let (edge, _) = setup().await;
    let r = preflight(&edge, 2002, "https://anyone.example", &[]).await;
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("access-control-allow-headers"), Some("x-token"));
    assert!(r.header("access-control-allow-credentials").is_none());
    let r = get(
        &edge,
        2002,
        GREEDY_APP,
        &[("Origin", "https://anyone.example")],
    )
    .await;
    assert_eq!(r.headers_named("access-control-allow-origin"), ["*"]);
    assert!(
        r.header("access-control-allow-credentials").is_none(),
        "{:?}",
        cors(&r)
    );
}

#[tokio::test]
async fn private_network_access_is_granted_only_with_allow_private_network() {
    let (edge, _) = setup().await;
    let pna = [("Access-Control-Request-Private-Network", "true")];
    let r = preflight(&edge, 2002, "https://anyone.example", &pna).await;
    assert_eq!(
        r.header("access-control-allow-private-network"),
        Some("true")
    );
    let r = preflight(&edge, 2001, "https://dash.test", &pna).await;
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://dash.test")
    );
    assert!(r.header("access-control-allow-private-network").is_none());
}

#[tokio::test]
async fn embed_leaves_exactly_one_frame_ancestors_from_frame_ancestors_else_allow_origins_else_self(
) {
    let (edge, _) = setup().await;
    for (port, expected) in [
        (2003, "frame-ancestors 'self' https://frame.test"),
        (
            2001,
            "frame-ancestors https://dash.test https://*.team.test http://localhost:*",
        ),
        (2002, "frame-ancestors 'self'"), // allow_origins = ["*"]: never any site
        (2004, "frame-ancestors 'self'"),
    ] {
        let path = format!(
            "{GREEDY_APP}&h=Content-Security-Policy-Report-Only:default-src+'none'\
             &h=Cross-Origin-Embedder-Policy:require-corp&h=Cross-Origin-Resource-Policy:same-origin"
        );
        let r = get(&edge, port, &path, &[]).await;
        assert_eq!(
            r.headers_named("content-security-policy"),
            [expected],
            "port {port}"
        );
        for h in [
            "x-frame-options",
            "content-security-policy-report-only",
            "cross-origin-embedder-policy",
            "cross-origin-resource-policy",
        ] {
            assert!(r.header(h).is_none(), "port {port}: {h} survived");
        }
    }
}

#[tokio::test]
async fn domain_is_removed_from_every_set_cookie_and_repeated_headers_stay_in_order() {
    let (edge, _) = setup().await;
    let path = "/respond?h=Set-Cookie:sid%3D1%3B+Domain%3Dedge.test%3B+Path%3D%2F%3B+HttpOnly\
                &h=Set-Cookie:theme%3Ddark%3B+Path%3D%2F\
                &h=Set-Cookie:t%3D3%3BDOMAIN%3D.edge.test%3BSecure";
    let r = get(&edge, 1000, path, &[]).await;
    assert_eq!(
        r.headers_named("set-cookie"),
        [
            "sid=1; Path=/; HttpOnly",
            "theme=dark; Path=/",
            "t=3;Secure"
        ]
    );
    // without Domain, two cookies pass byte for byte
    let r = get(&edge, 1000, "/cookies", &[]).await;
    assert_eq!(
        r.headers_named("set-cookie"),
        ["a=1; Path=/", "b=2; Path=/"]
    );
    // cookies = "passthrough" leaves Domain alone
    let r = get(&edge, 2005, path, &[]).await;
    assert_eq!(
        r.headers_named("set-cookie")[0],
        "sid=1; Domain=edge.test; Path=/; HttpOnly"
    );
}

#[tokio::test]
async fn a_service_worker_script_is_refused_unless_it_is_the_edges_own_or_workers_are_allowed() {
    let (edge, _) = setup().await;
    let sw = [("Service-Worker", "script")];
    let r = get(&edge, 1000, "/sw.js", &sw).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "service worker not allowed\n");
    assert!(r.header("x-request-id").is_some());
    // the shim's own worker registers
    let r = get(&edge, 2006, "/proxy-sw.js", &sw).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/javascript"));
    // but no other script on the same port
    assert_eq!(get(&edge, 2006, "/sw.js", &sw).await.status, 403);
    // service_workers = "allow": the VM's own worker reaches it
    let r = get(&edge, 2005, "/sw.js", &sw).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/sw.js");
    // a plain fetch of the same script is not a registration
    assert_eq!(get(&edge, 1000, "/sw.js", &[]).await.status, 200);
    let metrics = raw(edge.admin, "127.0.0.1", "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("cmux_edge_refusals_total{reason=\"service_worker_refused\"} 2"),
        "{metrics}"
    );
}

/// Every header SPEC §10 names, and its underscore spelling.
const IDENTITY: &[(&str, &str)] = &[
    ("Forwarded", "for=6.6.6.6"),
    ("X-Real-IP", "6.6.6.6"),
    ("True-Client-IP", "6.6.6.6"),
    ("CF-Connecting-IP", "6.6.6.6"),
    ("X-Forwarded-Port", "1"),
    ("X-Forwarded-Prefix", "/evil"),
    ("X-Original-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
    ("X_Forwarded_For", "6.6.6.6"),
    ("X_Forwarded_Host", "evil.example"),
    ("X_Real_IP", "6.6.6.6"),
    ("True_Client_IP", "6.6.6.6"),
    ("CF_Connecting_IP", "6.6.6.6"),
    ("X_Forwarded_Port", "1"),
    ("X_Forwarded_Prefix", "/evil"),
    ("X_Original_URL", "/admin"),
    ("X_Rewrite_URL", "/admin"),
    ("x_cmux_vm_id", "evil"),
    ("X_CMUX_PROXIED", "false"),
];

/// Names the echo backend saw, lowercased.
fn names(j: &serde_json::Value) -> Vec<String> {
    j["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap().to_owned())
        .collect()
}

async fn echo_seen(
    edge: &Edge,
    from: Option<IpAddr>,
    headers: &[(&str, &str)],
) -> serde_json::Value {
    raw_from(
        from,
        edge.http,
        &Edge::host(1000, "v"),
        "GET",
        "/",
        headers,
        b"",
    )
    .await
    .unwrap()
    .json()
}

#[tokio::test]
async fn an_untrusted_peer_cannot_state_who_the_client_is_in_any_spelling() {
    let (edge, _) = setup().await;
    let j = echo_seen(&edge, None, IDENTITY).await;
    let left = names(&j);
    for (h, _) in IDENTITY {
        assert!(
            !left.contains(&h.to_ascii_lowercase()),
            "{h} reached the upstream: {left:?}"
        );
    }
    assert_eq!(seen(&j, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen(&j, "x-cmux-vm-id"), ["v"]);
}

#[tokio::test]
async fn a_trusted_proxy_keeps_what_it_states_but_never_underscores_or_cf_connecting_ip() {
    let (edge, _) = setup().await;
    let j = echo_seen(&edge, Some("127.0.0.2".parse().unwrap()), IDENTITY).await;
    for (h, v) in [
        ("forwarded", "for=6.6.6.6"),
        ("x-real-ip", "6.6.6.6"),
        ("true-client-ip", "6.6.6.6"),
        ("x-forwarded-port", "1"),
        ("x-forwarded-prefix", "/evil"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
    ] {
        assert_eq!(seen(&j, h), [v], "{h}");
    }
    let left = names(&j);
    assert!(left.iter().all(|n| !n.contains('_')), "{left:?}");
    // "cloudflare" is not in [trust]: this peer is not on Cloudflare's path
    assert!(seen(&j, "cf-connecting-ip").is_empty());
    assert_eq!(seen(&j, "x-forwarded-for"), ["127.0.0.2"]);
}

#[tokio::test]
async fn cf_connecting_ip_is_believed_and_kept_only_on_cloudflares_path() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(
        "[[registry.vms]]\nid = \"v\"\naddress = \"127.0.0.1\"\n\n\
         [trust]\nproxies = [\"cloudflare\", \"127.0.0.2\"]\n",
    )
    .await;
    let cf = [("CF-Connecting-IP", "203.0.113.7")];
    let host = Edge::host(b, "v");
    // cloudflared (listed beside "cloudflare", README "Run behind Cloudflare Tunnel")
    let j = raw_from(
        Some("127.0.0.2".parse().unwrap()),
        edge.http,
        &host,
        "GET",
        "/",
        &cf,
        b"",
    )
    .await
    .unwrap()
    .json();
    assert_eq!(seen(&j, "cf-connecting-ip"), ["203.0.113.7"]);
    // anyone else
    let j = raw(edge.http, &host, "GET", "/", &cf, b"")
        .await
        .unwrap()
        .json();
    assert!(seen(&j, "cf-connecting-ip").is_empty());
    assert_eq!(seen(&j, "x-forwarded-for"), ["127.0.0.1"]);
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_forwarded() {
    let (edge, _) = setup().await;
    let j = echo_seen(
        &edge,
        None,
        &[
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
    )
    .await;
    for h in ["upgrade", "http2-settings"] {
        assert!(seen(&j, h).is_empty(), "{h} forwarded: {j}");
    }
    assert_eq!(j["version"], "HTTP/1.1");
}

#[tokio::test]
async fn connection_naming_content_length_or_credentials_strips_nothing() {
    let (edge, _) = setup().await;
    let r = raw(
        edge.http,
        &Edge::host(1000, "v"),
        "POST",
        "/",
        &[
            (
                "Connection",
                "content-length, Transfer-Encoding, Cookie, Authorization, Origin, Host",
            ),
            ("Cookie", "a=1"),
            ("Authorization", "Bearer t"),
            ("Origin", "https://dash.test"),
        ],
        b"hello",
    )
    .await
    .unwrap();
    let j = r.json();
    assert_eq!(j["body_len"], 5);
    assert_eq!(seen(&j, "content-length"), ["5"]);
    assert_eq!(seen(&j, "cookie"), ["a=1"]);
    assert_eq!(seen(&j, "authorization"), ["Bearer t"]);
    assert_eq!(seen(&j, "origin"), ["https://dash.test"]);
    assert_eq!(seen(&j, "host"), [Edge::host(1000, "v")]);
}

#[tokio::test]
async fn a_passed_port_header_cannot_reach_a_port_that_ports_denies() {
    let (edge, _) = setup().await;
    let r = get(&edge, 39379, "/", &[("X-Cmux-Port-Internal", "22")]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "port 22 is not reachable\n");
    let r = get(&edge, 39379, "/", &[("X-Cmux-Port-Internal", "3000")]).await;
    assert_eq!(seen(&r.json(), "x-cmux-port-internal"), ["3000"]);
}
