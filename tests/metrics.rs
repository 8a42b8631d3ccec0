//! `/metrics` on the admin listener (SPEC §7): Prometheus text, `cmux_edge_` names, bounded labels.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use prometheus_parse::{Scrape, Value};
use support::{echo_backend, raw, wait_metric, ws_backend, Edge, DOMAIN};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// `/metrics` read by a real Prometheus text-format parser.
async fn scrape(edge: &Edge) -> Scrape {
    let r = raw(edge.admin, "127.0.0.1", "GET", "/metrics", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let text = r.text();
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
}

/// The value of one series, written like `name{a="b",c="d"}` or `name`.
fn value(scrape: &Scrape, series: &str) -> f64 {
    let (name, labels) = series
        .split_once('{')
        .map_or((series, ""), |(n, l)| (n, l.trim_end_matches('}')));
    let wanted: Vec<(&str, &str)> = labels
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k, v.trim_matches('"')))
        .collect();
    let sample = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == wanted.len()
                && wanted.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no series {series}"));
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{series} is not a single number: {other:?}"),
    }
}

/// The `_count` of a histogram (prometheus-parse folds `_count` into the histogram sample).
fn histogram_count(scrape: &Scrape, name: &str, kind: &str) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.get("kind") == Some(kind))
        .and_then(|s| match &s.value {
            Value::Histogram(buckets) => buckets.last().map(|b| b.count),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no histogram {name}{{kind={kind}}}"))
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
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let m = scrape(&edge).await;
    let v = |series: &str| value(&m, series);
    assert_eq!(
        v(r#"cmux_edge_requests_total{class="2xx",kind="preview"}"#),
        3.0
    );
    assert_eq!(
        v(r#"cmux_edge_requests_total{class="4xx",kind="edge"}"#),
        1.0
    );
    assert_eq!(
        v(r#"cmux_edge_requests_total{class="5xx",kind="edge"}"#),
        1.0
    );
    assert_eq!(
        v(r#"cmux_edge_requests_total{class="5xx",kind="preview"}"#),
        1.0
    );
    assert_eq!(
        v(r#"cmux_edge_requests_total{class="2xx",kind="apex"}"#),
        1.0
    );
    assert_eq!(v("cmux_edge_loop_rejections_total"), 1.0);
    assert_eq!(v(r#"cmux_edge_refusals_total{reason="unknown_vm"}"#), 1.0);
    assert_eq!(
        v(r#"cmux_edge_registry_lookups_total{result="found"}"#),
        4.0
    );
    assert_eq!(
        v(r#"cmux_edge_registry_lookups_total{result="unknown"}"#),
        1.0
    );
    // Each source asked is counted: admin first (it knows none), then the static list.
    assert_eq!(
        v(r#"cmux_edge_registry_source_lookups_total{result="unknown",source="admin"}"#),
        5.0
    );
    assert_eq!(
        v(r#"cmux_edge_registry_source_lookups_total{result="found",source="static"}"#),
        4.0
    );
    assert_eq!(v(r#"cmux_edge_upstream_errors_total{kind="connect"}"#), 1.0);
    assert_eq!(
        histogram_count(&m, "cmux_edge_request_duration_seconds", "preview"),
        4.0
    );
    assert!(r
        .text()
        .contains(r#"cmux_edge_request_duration_seconds_bucket{kind="preview",le="0.0001"}"#));
    assert_eq!(v("cmux_edge_active_websockets"), 0.0);
    assert!(v("cmux_edge_sent_bytes_total") > 0.0);

    assert_bounded_labels(&m);
}

/// Every series is `cmux_edge_*` and no label value carries a VM id, a host or a path.
fn assert_bounded_labels(m: &Scrape) {
    for sample in &m.samples {
        assert!(sample.metric.starts_with("cmux_edge_"), "{}", sample.metric);
        for (label, value) in sample.labels.iter() {
            for leak in ["secret-vm-id", DOMAIN, "port-", "/", "slow", "127.0.0.1"] {
                assert!(
                    !value.contains(leak),
                    "{value:?} ({leak}) leaked into label {label} of {}",
                    sample.metric
                );
            }
        }
    }
}

#[tokio::test]
async fn the_gauges_count_a_request_and_a_websocket_while_they_are_open() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let (ws, _) = ws_backend().await;
    let edge = Edge::start("[[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n").await;
    let admin = edge.admin;
    wait_metric(admin, "cmux_edge_active_requests", |n| n == 0.0).await;

    // a slow request is in flight: 1, then 0 once it is answered
    let (addr, host) = (edge.http, Edge::host(b, "local"));
    let slow =
        tokio::spawn(async move { raw(addr, &host, "GET", "/slow?ms=5000", &[], b"").await });
    wait_metric(admin, "cmux_edge_active_requests", |n| n == 1.0).await;
    assert_eq!(slow.await.unwrap().unwrap().status, 200);
    wait_metric(admin, "cmux_edge_active_requests", |n| n == 0.0).await;

    // a WebSocket is open: 1, then 0 once closed
    assert_eq!(
        value(&scrape(&edge).await, "cmux_edge_active_websockets"),
        0.0
    );
    let mut req = format!("ws://{}/ws", edge.http)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("host", Edge::host(ws.port(), "local").parse().unwrap());
    let (mut sock, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    sock.send(Message::text("open")).await.unwrap();
    assert_eq!(sock.next().await.unwrap().unwrap(), Message::text("open"));
    wait_metric(admin, "cmux_edge_active_websockets", |n| n == 1.0).await;
    sock.close(None).await.unwrap();
    while let Some(Ok(_)) = sock.next().await {}
    wait_metric(admin, "cmux_edge_active_websockets", |n| n == 0.0).await;
}

#[tokio::test]
async fn timeouts_registry_errors_and_reloads_are_counted() {
    support::install_crypto();
    let b = echo_backend().await.port();
    // VM ids starting with "h" are asked of a control plane that is not there.
    let dead = support::free_port();
    let config = format!(
        "[registry]\nsources = [\"static\", \"http\"]\nurl = \"http://127.0.0.1:{dead}/vms/{{id}}\"\ntimeout = \"1s\"\n\n\
         [[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n\n\
         [timeouts]\nread = \"1s\"\n"
    );
    let edge = Edge::start(&config).await;
    let slow = raw(
        edge.http,
        &Edge::host(b, "local"),
        "GET",
        "/slow?ms=3000",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(slow.status, 504);
    let unavailable = raw(edge.http, &Edge::host(b, "h1"), "GET", "/", &[], b"")
        .await
        .unwrap();
    assert_eq!(unavailable.status, 503, "{}", unavailable.text());

    let before = scrape(&edge).await;
    let v = |series: &str| value(&before, series);
    assert_eq!(v(r#"cmux_edge_upstream_errors_total{kind="timeout"}"#), 1.0);
    assert_eq!(
        v(r#"cmux_edge_registry_lookups_total{result="error"}"#),
        1.0
    );
    assert_eq!(
        v(r#"cmux_edge_registry_source_lookups_total{result="error",source="http"}"#),
        1.0
    );
    assert_eq!(
        v(r#"cmux_edge_registry_lookups_total{result="found"}"#),
        1.0
    );

    // a reload (the same config with one more VM) is counted ok
    let path = edge.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{text}\n[[registry.vms]]\nid = \"other\"\naddress = \"127.0.0.1\"\n"),
    )
    .unwrap();
    edge.signal("HUP");
    wait_metric(
        edge.admin,
        r#"cmux_edge_config_reloads_total{result="ok"}"#,
        |n| n >= 1.0,
    )
    .await;
    assert_bounded_labels(&scrape(&edge).await);
}

#[tokio::test]
async fn byte_counters_move_with_the_bodies_each_way() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start("[[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n").await;
    let before = scrape(&edge).await;
    let body = vec![b'x'; 10_000];
    let r = raw(
        edge.http,
        &Edge::host(b, "local"),
        "POST",
        "/echo-body",
        &[],
        &body,
    )
    .await
    .unwrap();
    assert_eq!(r.body.len(), 10_000);
    let after = scrape(&edge).await;
    let moved = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(moved("cmux_edge_received_bytes_total"), 10_000.0);
    assert_eq!(moved("cmux_edge_sent_bytes_total"), 10_000.0);
}

#[tokio::test]
async fn active_connections_count_open_downstream_connections() {
    support::install_crypto();
    let edge = Edge::start("").await;
    let gauge_reaches = |want: f64| {
        let edge = &edge;
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let now = value(&scrape(edge).await, "cmux_edge_active_connections");
                if now == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "active connections stuck at {now}, want {want}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    gauge_reaches(0.0).await;
    let a = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    let b = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    gauge_reaches(2.0).await;
    drop(a);
    gauge_reaches(1.0).await;
    drop(b);
    gauge_reaches(0.0).await;
}
