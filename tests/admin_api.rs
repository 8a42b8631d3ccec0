//! The admin API (SPEC §7 `/api/vms`): bearer token, registrations that apply to the very next
//! request, and durability across `kill -9`.

mod support;

use support::{echo_backend, raw, Edge};

const TOKEN: &str = "s3cret-token-0123456789abcdef-0123";

async fn setup() -> (Edge, u16) {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&format!("[admin]\ntoken = \"{TOKEN}\"\n")).await;
    (edge, b)
}

async fn api(
    edge: &Edge,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> support::RawResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = auth.as_deref() {
        headers.push(("Authorization", a));
    }
    raw(
        edge.admin,
        "127.0.0.1",
        method,
        path,
        &headers,
        body.as_bytes(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn the_api_needs_the_bearer_token() {
    let (edge, _) = setup().await;
    assert_eq!(api(&edge, "GET", "/api/vms", None, "").await.status, 401);
    assert_eq!(
        api(&edge, "GET", "/api/vms", Some("wrong"), "")
            .await
            .status,
        401
    );
    assert_eq!(
        api(&edge, "GET", "/api/vms", Some(TOKEN), "").await.status,
        200
    );
    // and it is not on the public listener
    let r = raw(
        edge.http,
        "edge.test",
        "GET",
        "/api/vms",
        &[("Authorization", "Bearer s3cret-token-0123456789abcdef-0123")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.text(), "cmux-edge");
}

#[tokio::test]
async fn only_the_whole_token_opens_the_api() {
    let (edge, _) = setup().await;
    let near_misses = [
        "s3cret-token-0123456789abcdef-012",   // a prefix
        "s3cret-token-0123456789abcdef-01232", // the token and more
        "s3cret-token-0123456789abcdef-012x",  // same length, last byte differs
        "x3cret-token-0123456789abcdef-0123",  // same length, first byte differs
        "S3CRET-TOKEN-0123456789ABCDEF-0123",  // tokens are case-sensitive
    ];
    for t in near_misses {
        let r = api(
            &edge,
            "PUT",
            "/api/vms/a",
            Some(t),
            r#"{"address": "127.0.0.1"}"#,
        )
        .await;
        assert_eq!(r.status, 401, "{t}");
    }
    // a token sent as another scheme is not a bearer token
    let r = raw(
        edge.admin,
        "127.0.0.1",
        "GET",
        "/api/vms",
        &[("Authorization", "Basic s3cret-token-0123456789abcdef-0123")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    // the scheme name itself is case-insensitive (RFC 9110 §11.1)
    let r = raw(
        edge.admin,
        "127.0.0.1",
        "GET",
        "/api/vms",
        &[("Authorization", "bearer s3cret-token-0123456789abcdef-0123")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    // nothing was registered by the refused calls
    let list = api(&edge, "GET", "/api/vms", Some(TOKEN), "").await.json();
    assert_eq!(list, serde_json::json!({}));
}

#[tokio::test]
async fn without_a_configured_token_the_api_is_closed() {
    support::install_crypto();
    let edge = Edge::start("").await;
    let r = api(&edge, "GET", "/api/vms", Some(""), "").await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("admin API disabled"), "{}", r.text());
}

#[tokio::test]
async fn put_routes_the_next_request_and_delete_makes_it_404() {
    let (edge, b) = setup().await;
    let host = Edge::host(b, "fresh");
    assert_eq!(
        raw(edge.http, &host, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        404
    );
    let r = api(
        &edge,
        "PUT",
        "/api/vms/fresh",
        Some(TOKEN),
        r#"{"address": "127.0.0.1"}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        raw(edge.http, &host, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    // replacing answers 200; a port map is honoured on the next request
    let body = format!(
        r#"{{"address": "127.0.0.1", "ports": {{"80": {b}}}, "labels": {{"task": "t1"}}}}"#
    );
    assert_eq!(
        api(&edge, "PUT", "/api/vms/fresh", Some(TOKEN), &body)
            .await
            .status,
        200
    );
    let r = raw(
        edge.http,
        &Edge::host(80, "fresh"),
        "GET",
        "/mapped",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.json()["path"], "/mapped");
    let list = api(&edge, "GET", "/api/vms", Some(TOKEN), "").await.json();
    assert_eq!(list["fresh"]["labels"]["task"], "t1");
    assert_eq!(
        api(&edge, "DELETE", "/api/vms/fresh", Some(TOKEN), "")
            .await
            .status,
        204
    );
    assert_eq!(
        raw(edge.http, &host, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        api(&edge, "DELETE", "/api/vms/fresh", Some(TOKEN), "")
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn bad_input_gets_a_400_with_the_reason() {
    let (edge, _) = setup().await;
    let r = api(&edge, "PUT", "/api/vms/a", Some(TOKEN), "{not json").await;
    assert_eq!(r.status, 400);
    assert!(r.text().starts_with("invalid JSON"), "{}", r.text());
    let r = api(
        &edge,
        "PUT",
        "/api/vms/a",
        Some(TOKEN),
        r#"{"address": "x@evil"}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.text()
            .contains("neither an IP address nor a lowercase DNS name"),
        "{}",
        r.text()
    );
    let r = api(
        &edge,
        "PUT",
        "/api/vms/Bad_Id-",
        Some(TOKEN),
        r#"{"address": "127.0.0.1"}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    let r = api(
        &edge,
        "PUT",
        "/api/vms/a",
        Some(TOKEN),
        r#"{"address": "127.0.0.1", "colour": 1}"#,
    )
    .await;
    assert_eq!(r.status, 400, "unknown fields are refused");
}

#[tokio::test]
async fn kill_9_right_after_a_put_loses_nothing() {
    let (mut edge, b) = setup().await;
    for id in ["k1", "k2", "k3"] {
        let r = api(
            &edge,
            "PUT",
            &format!("/api/vms/{id}"),
            Some(TOKEN),
            r#"{"address": "127.0.0.1"}"#,
        )
        .await;
        assert_eq!(r.status, 201);
    }
    assert_eq!(
        api(&edge, "DELETE", "/api/vms/k2", Some(TOKEN), "")
            .await
            .status,
        204
    );
    edge.kill9_and_restart().await;
    assert_eq!(
        raw(edge.http, &Edge::host(b, "k1"), "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        raw(edge.http, &Edge::host(b, "k3"), "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        raw(edge.http, &Edge::host(b, "k2"), "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        404
    );
}

#[tokio::test]
async fn a_torn_state_file_is_kept_aside_and_the_proxy_starts() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let mut edge = Edge::start_with(&format!("[admin]\ntoken = \"{TOKEN}\"\n"), false, |dir| {
        std::fs::write(
            dir.join("cmux-edge-state.json"),
            r#"{"k1": {"address": "127.0.0.1"}, "k2": {"addr"#,
        )
        .unwrap();
    })
    .await;
    assert_eq!(
        raw(edge.http, &Edge::host(b, "k1"), "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        404
    );
    let names: Vec<String> = std::fs::read_dir(edge.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("cmux-edge-state.corrupt-")),
        "{names:?}"
    );
    // the API works and persists again
    let r = api(
        &edge,
        "PUT",
        "/api/vms/k1",
        Some(TOKEN),
        r#"{"address": "127.0.0.1"}"#,
    )
    .await;
    assert_eq!(r.status, 201);
    edge.kill9_and_restart().await;
    assert_eq!(
        raw(edge.http, &Edge::host(b, "k1"), "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test]
async fn a_registration_expires_at_expires_at_and_is_swept_from_disk() {
    let (edge, b) = setup().await;
    let until = humantime::format_rfc3339(
        std::time::SystemTime::now() + std::time::Duration::from_millis(1500),
    );
    let body = format!(r#"{{"address": "127.0.0.1", "expires_at": "{until}"}}"#);
    assert_eq!(
        api(&edge, "PUT", "/api/vms/brief", Some(TOKEN), &body)
            .await
            .status,
        201
    );
    let host = Edge::host(b, "brief");
    assert_eq!(
        raw(edge.http, &host, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(2000)).await;
    assert_eq!(
        raw(edge.http, &host, "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        api(&edge, "GET", "/api/vms/brief", Some(TOKEN), "")
            .await
            .status,
        404
    );
    // the sweep (once a second) also takes it out of the state file
    let state = edge.dir.path().join("cmux-edge-state.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::read_to_string(&state).unwrap().contains("brief") {
        assert!(
            std::time::Instant::now() < deadline,
            "expired VM still in the state file"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let r = api(
        &edge,
        "PUT",
        "/api/vms/x",
        Some(TOKEN),
        r#"{"address": "127.0.0.1", "expires_at": "soon"}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("RFC 3339"), "{}", r.text());
}
