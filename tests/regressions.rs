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
