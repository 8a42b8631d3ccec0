//! `/metrics` on the admin listener (SPEC §7): Prometheus text, `cmux_edge_` names, bounded labels.

mod support;

use support::{echo_backend, raw, Edge};

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[tokio::test]
async fn metrics_count_requests_refusals_and_lookups_without_vm_labels() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge =
        Edge::start("[[registry.vms]]\nid = \"secret-vm-id\"\naddress = \"127.0.0.1\"\n").await;
    let ok = Edge::host(b, "secret-vm-id");
    for _ in 0..3 {
        assert_eq!(
            raw(edge.http, &ok, "GET", "/", &[], b"")
                .await
                .unwrap()
                .status,
            200
        );
    }
    assert_eq!(
        raw(edge.http, &Edge::host(b, "nobody"), "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        404
    );
    let looped = raw(
        edge.http,
        &ok,
        "GET",
        "/",
        &[("X-Cmux-Proxied", "true")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(looped.status, 508);
    assert_eq!(
        raw(edge.http, "edge.test", "GET", "/", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    let closed = support::free_port();
    assert_eq!(
        raw(
            edge.http,
            &Edge::host(closed, "secret-vm-id"),
            "GET",
            "/",
            &[],
            b""
        )
        .await
        .unwrap()
        .status,
        502
    );

    let r = raw(edge.admin, "127.0.0.1", "GET", "/metrics", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text();
    assert_eq!(
        value(
            &text,
            r#"cmux_edge_requests_total{class="2xx",kind="preview"}"#
        ),
        3.0
    );
    assert_eq!(
        value(
            &text,
            r#"cmux_edge_requests_total{class="4xx",kind="edge"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"cmux_edge_requests_total{class="5xx",kind="edge"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"cmux_edge_requests_total{class="5xx",kind="preview"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"cmux_edge_requests_total{class="2xx",kind="apex"}"#
        ),
        1.0
    );
    assert_eq!(value(&text, "cmux_edge_loop_rejections_total"), 1.0);
    assert_eq!(
        value(&text, r#"cmux_edge_refusals_total{reason="unknown_vm"}"#),
        1.0
    );
    assert_eq!(
        value(&text, r#"cmux_edge_registry_lookups_total{result="found"}"#),
        4.0
    );
    assert_eq!(
        value(
            &text,
            r#"cmux_edge_registry_lookups_total{result="unknown"}"#
        ),
        1.0
    );
    assert_eq!(
        value(&text, r#"cmux_edge_upstream_errors_total{kind="connect"}"#),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"cmux_edge_request_duration_seconds_count{kind="preview"}"#
        ),
        4.0
    );
    assert!(
        text.contains(r#"cmux_edge_request_duration_seconds_bucket{kind="preview",le="0.0001"}"#)
    );
    assert_eq!(value(&text, "cmux_edge_active_websockets"), 0.0);
    assert!(
        !text.contains("secret-vm-id"),
        "a VM id leaked into a label"
    );
    assert!(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .all(|l| l.starts_with("cmux_edge_")));
}
