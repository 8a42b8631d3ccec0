//! Per-port response policies over real sockets: CORS modes, embedding, frame-ancestors,
//! loopback redirect rewriting (SPEC §5).

mod support;

use support::{echo_backend, raw, Edge};

/// VM `v` publishes ports 39378 (strip + frame_ancestors), 39380 (passthrough, no embed,
/// no redirect rewriting) and 4000 (allow_origins) on the echo backend; `*` is permissive
/// for https://app.example.
async fn setup() -> (Edge, u16) {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&format!(
        "[[registry.vms]]\nid = \"v\"\naddress = \"127.0.0.1\"\nports = {{ 39378 = {b}, 39380 = {b}, 4000 = {b} }}\n\n\
         [[policy]]\nport = \"*\"\ncors = \"permissive\"\nallow_origins = [\"https://app.example\"]\nembed = true\nrewrite_redirects = true\n\n\
         [[policy]]\nport = 39378\ncors = \"strip\"\nframe_ancestors = [\"'self'\", \"https://cmux.example\"]\n\n\
         [[policy]]\nport = 39380\ncors = \"passthrough\"\nembed = false\nrewrite_redirects = false\n\n\
         [[policy]]\nport = 4000\nallow_origins = [\"https://ok.example\"]\n"
    ))
    .await;
    (edge, b)
}

const PREFLIGHT: &[(&str, &str)] = &[
    ("Origin", "https://app.example"),
    ("Access-Control-Request-Method", "PUT"),
    ("Access-Control-Request-Headers", "x-token, content-type"),
];

fn cors_headers(r: &support::RawResponse) -> Vec<String> {
    r.headers
        .iter()
        .filter(|(k, _)| k.to_ascii_lowercase().starts_with("access-control-"))
        .map(|(k, v)| format!("{}: {v}", k.to_ascii_lowercase()))
        .collect()
}

#[tokio::test]
async fn permissive_preflight_is_answered_at_the_edge_with_the_origin_echoed() {
    let (edge, b) = setup().await;
    let r = raw(
        edge.http,
        &Edge::host(b, "v"),
        "OPTIONS",
        "/api",
        PREFLIGHT,
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("x-token, content-type")
    );
    assert_eq!(r.header("access-control-max-age"), Some("86400"));
    assert!(r
        .header("access-control-allow-methods")
        .unwrap()
        .contains("PUT"));
    assert_eq!(r.header("vary"), Some("Origin"));
    assert!(r.header("x-request-id").is_some());
    // no VM needed: a preflight for an unknown id is still answered
    let r = raw(
        edge.http,
        &Edge::host(b, "nobody"),
        "OPTIONS",
        "/",
        PREFLIGHT,
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 204);
}

#[tokio::test]
async fn options_without_origin_goes_to_the_upstream() {
    let (edge, b) = setup().await;
    let r = raw(edge.http, &Edge::host(b, "v"), "OPTIONS", "/x", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["method"], "OPTIONS");
    assert!(cors_headers(&r).is_empty());
}

#[tokio::test]
async fn permissive_responses_replace_an_upstream_star_and_vary_on_origin() {
    let (edge, b) = setup().await;
    let path = "/respond?h=Access-Control-Allow-Origin:*&h=X-Custom:1";
    let r = raw(
        edge.http,
        &Edge::host(b, "v"),
        "GET",
        path,
        &[("Origin", "https://app.example")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(
        r.headers_named("access-control-allow-origin"),
        ["https://app.example"]
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert!(r
        .header("access-control-expose-headers")
        .unwrap()
        .contains("x-custom"));
    assert_eq!(r.header("vary"), Some("Origin"));
    // without Origin nothing is added, and the upstream's own header stays
    let r = raw(edge.http, &Edge::host(b, "v"), "GET", path, &[], b"")
        .await
        .unwrap();
    assert_eq!(cors_headers(&r), ["access-control-allow-origin: *"]);
}

#[tokio::test]
async fn allow_origins_limits_who_is_granted() {
    let (edge, _) = setup().await;
    let host = Edge::host(4000, "v");
    let r = raw(
        edge.http,
        &host,
        "GET",
        "/",
        &[("Origin", "https://ok.example")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://ok.example")
    );
    let r = raw(
        edge.http,
        &host,
        "GET",
        "/",
        &[("Origin", "https://evil.example")],
        b"",
    )
    .await
    .unwrap();
    assert!(cors_headers(&r).is_empty());
}

#[tokio::test]
async fn strip_answers_options_bare_and_removes_every_cors_header() {
    let (edge, _) = setup().await;
    let host = Edge::host(39378, "v");
    let r = raw(edge.http, &host, "OPTIONS", "/", PREFLIGHT, b"")
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    assert!(cors_headers(&r).is_empty());
    let path = "/respond?h=Access-Control-Allow-Origin:https%3A%2F%2Fx&h=Access-Control-Allow-Credentials:true";
    let r = raw(
        edge.http,
        &host,
        "GET",
        path,
        &[("Origin", "https://app.example")],
        b"",
    )
    .await
    .unwrap();
    assert!(cors_headers(&r).is_empty(), "{:?}", cors_headers(&r));
}

#[tokio::test]
async fn frame_ancestors_leaves_exactly_one_csp() {
    let (edge, _) = setup().await;
    let path = "/respond?h=Content-Security-Policy:frame-ancestors+'none'&h=X-Frame-Options:DENY";
    let r = raw(edge.http, &Edge::host(39378, "v"), "GET", path, &[], b"")
        .await
        .unwrap();
    assert_eq!(
        r.headers_named("content-security-policy"),
        ["frame-ancestors 'self' https://cmux.example"]
    );
    assert!(r.header("x-frame-options").is_none());
}

#[tokio::test]
async fn embed_strips_framing_and_isolation_headers() {
    let (edge, b) = setup().await;
    let blockers = [
        "Content-Security-Policy:default-src+'self'",
        "Content-Security-Policy-Report-Only:default-src+'self'",
        "X-Frame-Options:DENY",
        "Cross-Origin-Embedder-Policy:require-corp",
        "Cross-Origin-Opener-Policy:same-origin",
        "Cross-Origin-Resource-Policy:same-origin",
    ];
    let path = format!("/respond?h={}", blockers.join("&h="));
    let r = raw(edge.http, &Edge::host(b, "v"), "GET", &path, &[], b"")
        .await
        .unwrap();
    for h in blockers {
        let name = h.split(':').next().unwrap();
        if name == "Content-Security-Policy" {
            // SPEC §10: exactly one, ours, in place of what embed removed
            assert_eq!(
                r.headers_named(name),
                ["frame-ancestors https://app.example"]
            );
        } else {
            assert!(r.header(name).is_none(), "{name} survived");
        }
    }
    // embed = false keeps them
    let r = raw(edge.http, &Edge::host(39380, "v"), "GET", &path, &[], b"")
        .await
        .unwrap();
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
}

#[tokio::test]
async fn loopback_redirects_become_preview_urls() {
    let (edge, b) = setup().await;
    let host = Edge::host(b, "v");
    let public = edge.http.port();
    for (to, expected) in [
        (
            "http://localhost:3000/cb?x=1%23h",
            format!("http://port-3000-vm-v.edge.test:{public}/cb?x=1#h"),
        ),
        (
            "http://127.0.0.1:5173/",
            format!("http://port-5173-vm-v.edge.test:{public}/"),
        ),
        (
            "http://0.0.0.0:9000/a",
            format!("http://port-9000-vm-v.edge.test:{public}/a"),
        ),
        (
            "http://[::1]:5174/b",
            format!("http://port-5174-vm-v.edge.test:{public}/b"),
        ),
    ] {
        let path = format!(
            "/redirect?to={}",
            to.replace('[', "%5B").replace(']', "%5D")
        );
        let r = raw(
            edge.http,
            &format!("{host}:{public}"),
            "GET",
            &path,
            &[],
            b"",
        )
        .await
        .unwrap();
        assert_eq!(r.status, 302);
        assert_eq!(r.header("location"), Some(expected.as_str()), "{to}");
    }
    for untouched in [
        "/login",
        "http://localhost/cb",
        "https://example.org:3000/x",
    ] {
        let r = raw(
            edge.http,
            &host,
            "GET",
            &format!("/redirect?to={untouched}"),
            &[],
            b"",
        )
        .await
        .unwrap();
        assert_eq!(r.header("location"), Some(untouched));
    }
    // rewrite_redirects = false leaves loopback locations alone
    let r = raw(
        edge.http,
        &Edge::host(39380, "v"),
        "GET",
        "/redirect?to=http://localhost:3000/",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.header("location"), Some("http://localhost:3000/"));
}

#[tokio::test]
async fn a_trusted_tls_terminating_proxy_makes_redirects_https() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge =
        Edge::start("[[registry.vms]]\nid = \"v\"\naddress = \"127.0.0.1\"\n\n[trust]\nproxies = [\"127.0.0.2\"]\n")
            .await;
    let r = support::raw_from(
        Some("127.0.0.2".parse().unwrap()),
        edge.http,
        &Edge::host(b, "v"),
        "GET",
        "/redirect?to=http://localhost:3000/cb",
        &[("X-Forwarded-Proto", "https")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(
        r.header("location"),
        Some("https://port-3000-vm-v.edge.test/cb")
    );
}

#[tokio::test]
async fn head_refused_by_the_upstream_is_retried_as_get_and_answered_as_head() {
    let (edge, b) = setup().await;
    let host = Edge::host(b, "v");
    let r = raw(
        edge.http,
        &host,
        "HEAD",
        "/no-head",
        &[("Origin", "https://app.example")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("5"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.header("x-method-seen"), Some("GET"));
    assert!(r.header("transfer-encoding").is_none());
    assert!(r.body.is_empty(), "a HEAD answer carried a body");
    // the policy applies to the fallback answer like to any other
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );

    // the same over h2c
    let client = reqwest::Client::builder()
        .resolve(&host, edge.http)
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let resp = client
        .head(format!("http://{host}:{}/no-head", edge.http.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-length").unwrap(), "5");
    assert!(resp.bytes().await.unwrap().is_empty());
    // a GET is untouched
    let r = raw(edge.http, &host, "GET", "/no-head", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.text(), "hello");
}
