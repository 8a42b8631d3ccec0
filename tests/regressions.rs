//! Behaviour the README promised and the binary did not keep (issue 16), each through the
//! real binary and real sockets.

mod support;

use support::{echo_backend, raw, Edge};

/// The policy keys these tests rely on, written out so built-in defaults do not matter.
const POLICY: &str = "[[policy]]\nport = \"*\"\ninject_shim = false\nembed = false\n";

async fn metrics(edge: &Edge) -> String {
    raw(edge.admin, "127.0.0.1", "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text()
}

fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// SPEC §4: the loop check comes right after host parsing, before the HTTPS redirect.
#[tokio::test]
async fn a_looping_plain_http_request_gets_508_not_the_https_redirect() {
    let edge = Edge::start_with(
        &format!(
            "[[registry.vms]]\nid = \"a\"\naddress = \"127.0.0.1\"\n\n{POLICY}\n\
             [tls]\ncerts_dir = \"certs\"\nredirect_http = true\n"
        ),
        true,
        |_| {},
    )
    .await;
    let host = Edge::host(3000, "a");
    let plain = raw(edge.http, &host, "GET", "/x", &[], b"").await.unwrap();
    assert_eq!(plain.status, 308, "redirect_http is on: {}", plain.text());
    let looped = raw(
        edge.http,
        &host,
        "GET",
        "/x",
        &[("X-Cmux-Proxied", "true")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(looped.status, 508, "{}", looped.text());
    assert_eq!(looped.text(), "Loop detected in proxy\n");
}

/// With DNS-01 the edge never answers HTTP-01 paths: a preview's own
/// `/.well-known/acme-challenge/*` reaches its VM.
#[tokio::test]
async fn with_dns01_acme_challenge_paths_of_previews_reach_the_vm() {
    let backend = echo_backend().await;
    let edge = Edge::start_with(
        &format!(
            "[[registry.vms]]\nid = \"a\"\naddress = \"127.0.0.1\"\n\n{POLICY}\n\
             [tls]\ncerts_dir = \"certs\"\n\n[tls.acme]\n\
             directory = \"https://127.0.0.1:1/dir\"\ndomains = [\"*.edge.test\"]\n\
             retry_after = \"1h\"\ndns = {{ provider = \"exec\", command = \"/bin/true\" }}\n"
        ),
        true,
        |_| {},
    )
    .await;
    let r = raw(
        edge.http,
        &Edge::host(backend.port(), "a"),
        "GET",
        "/.well-known/acme-challenge/some-token",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/.well-known/acme-challenge/some-token");
}

/// A VM whose DNS name does not resolve is an upstream failure of a preview request: 502,
/// `upstream_errors_total{kind="connect"}`, and `requests_total{kind="preview"}`, not a refusal.
#[tokio::test]
async fn a_vm_name_that_does_not_resolve_counts_as_an_upstream_error_of_a_preview() {
    let edge = Edge::start(&format!(
        "[[registry.vms]]\nid = \"gone\"\naddress = \"no-such-vm.invalid\"\n\n{POLICY}\n"
    ))
    .await;
    let before = metrics(&edge).await;
    let r = raw(edge.http, &Edge::host(3000, "gone"), "GET", "/", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.text(), "upstream unreachable: vm gone port 3000\n");
    let after = metrics(&edge).await;
    let delta = |key: &str| sample(&after, key) - sample(&before, key);
    assert_eq!(
        delta("cmux_edge_upstream_errors_total{kind=\"connect\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("cmux_edge_requests_total{class=\"5xx\",kind=\"preview\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("cmux_edge_requests_total{class=\"5xx\",kind=\"edge\"}"),
        0.0,
        "{after}"
    );
    assert_eq!(
        delta("cmux_edge_refusals_total{reason=\"upstream_unreachable\"}"),
        0.0,
        "{after}"
    );
}

/// A reload that does not touch the `http` source's settings keeps its cache: the control
/// plane is not asked again for an id it answered before the reload.
#[tokio::test]
async fn a_reload_keeps_the_http_registry_cache_warm() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let backend = echo_backend().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plane = listener.local_addr().unwrap();
    let counted = calls.clone();
    support::spawn_http(listener, move |_req| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                r#"{"address": "127.0.0.1"}"#,
            )))
        }
    });
    let edge = Edge::start(&format!(
        "[registry]\nsource = \"http\"\nurl = \"http://{plane}/vms/{{id}}\"\ncache_ttl = \"1h\"\n\n{POLICY}\n"
    ))
    .await;
    let host = Edge::host(backend.port(), "warm");
    let get = || raw(edge.http, &host, "GET", "/", &[], b"");
    assert_eq!(get().await.unwrap().status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let reloads = |m: &str| sample(m, "cmux_edge_config_reloads_total{result=\"ok\"}");
    let before = reloads(&metrics(&edge).await);
    let mut text = std::fs::read_to_string(edge.config_path()).unwrap();
    text.push_str("\n# touched\n");
    std::fs::write(edge.config_path(), text).unwrap();
    edge.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while reloads(&metrics(&edge).await) <= before {
        assert!(std::time::Instant::now() < deadline, "no reload seen");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(get().await.unwrap().status, 200);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the reload emptied the cache"
    );
}
