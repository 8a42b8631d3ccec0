//! ACME as the README configures it, through the real binary: the Cloudflare DNS provider
//! named in `[tls.acme] dns` (a local server replaying Cloudflare's v4 API, which publishes
//! each TXT record to pebble-challtestsrv, where Pebble looks), a stale lock left in
//! `certs_dir` by a crashed replica, and a failing CA: `acme_orders_total{result="error"}`
//! and a backoff that grows.

#[path = "support/acme.rs"]
mod acme_support;
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acme_support::{addr, leaf_for, wait_ready, ChallTestSrv, Pebble};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use support::{free_port, raw, wait_metric, Edge};
use tokio::net::TcpListener;

/// What the fake Cloudflare API saw: method, path and query, Authorization.
type Calls = Arc<Mutex<Vec<(String, String, String)>>>;

const ZONE: &str = "023e105f4ecef8ad9ca31a8372d0c353";

/// Cloudflare's v4 API for zone `edge.test`, in its documented shapes; a created TXT record is
/// published to challtestsrv (`management`) and withdrawn when deleted.
async fn fake_cloudflare(token: &'static str, management: SocketAddr) -> (SocketAddr, Calls) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    // record id -> (name, content)
    let records: Arc<Mutex<HashMap<String, (String, String)>>> = Arc::default();
    let challtestsrv = reqwest::Client::builder().no_proxy().build().unwrap();
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let (seen, records, challtestsrv) = (seen.clone(), records.clone(), challtestsrv.clone());
        async move {
            let method = req.method().to_string();
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock()
                .unwrap()
                .push((method.clone(), pq.clone(), auth.clone()));
            let ok = |result: serde_json::Value| serde_json::json!({"success": true, "errors": [], "messages": [], "result": result});
            let records_path = format!("/client/v4/zones/{ZONE}/dns_records");
            let (status, answer) = if auth != format!("Bearer {token}") {
                (
                    403,
                    serde_json::json!({"success": false, "errors": [{"code": 10000, "message": "Authentication error"}], "messages": [], "result": null}),
                )
            } else if method == "GET" && pq == "/client/v4/zones?name=edge.test" {
                let mut v =
                    ok(serde_json::json!([{"id": ZONE, "name": "edge.test", "status": "active"}]));
                v["result_info"] =
                    serde_json::json!({"page": 1, "per_page": 20, "count": 1, "total_count": 1});
                (200, v)
            } else if method == "GET" && pq.starts_with("/client/v4/zones?name=") {
                (200, ok(serde_json::json!([])))
            } else if method == "POST" && pq == records_path {
                let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let (name, content) = (
                    sent["name"].as_str().unwrap().to_owned(),
                    sent["content"].as_str().unwrap().to_owned(),
                );
                challtestsrv
                    .post(format!("http://{management}/set-txt"))
                    .body(
                        serde_json::json!({"host": format!("{name}."), "value": content})
                            .to_string(),
                    )
                    .send()
                    .await
                    .unwrap()
                    .error_for_status()
                    .unwrap();
                let id = format!("{:032x}", records.lock().unwrap().len() + 1);
                records.lock().unwrap().insert(id.clone(), (name, content));
                let mut rec = sent.clone();
                rec["id"] = id.into();
                rec["proxied"] = false.into();
                (200, ok(rec))
            } else if method == "GET" && pq.starts_with(&format!("{records_path}?type=TXT")) {
                let found: Vec<serde_json::Value> = records
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, (name, content))| {
                        let q = pq.replace("%3D", "=").replace("%2D", "-");
                        q.contains(&format!("name={name}&"))
                            && q.contains(&format!("content={content}"))
                    })
                    .map(|(id, _)| serde_json::json!({"id": id, "type": "TXT"}))
                    .collect();
                (200, ok(serde_json::Value::Array(found)))
            } else if let (true, Some(id)) = (
                method == "DELETE",
                pq.strip_prefix(&format!("{records_path}/")),
            ) {
                let removed = records.lock().unwrap().remove(id);
                if let Some((name, _)) = removed {
                    let _ = challtestsrv
                        .post(format!("http://{management}/clear-txt"))
                        .body(serde_json::json!({"host": format!("{name}.")}).to_string())
                        .send()
                        .await;
                }
                (200, ok(serde_json::json!({"id": id})))
            } else {
                (
                    404,
                    serde_json::json!({"success": false, "errors": [{"code": 7003, "message": "Could not route"}], "messages": [], "result": null}),
                )
            };
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(answer.to_string())))
                .unwrap()
        }
    });
    (a, calls)
}

#[tokio::test]
async fn the_cloudflare_provider_in_the_config_gets_a_wildcard_and_takes_over_a_stale_lock() {
    support::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let chall = ChallTestSrv::start().await;
    let pebble = Pebble::start(&dir.path().join("pebble"), chall.dns, free_port(), None);
    pebble.ready().await;
    let (api, calls) = fake_cloudflare("cf-token-from-env", chall.management).await;
    let config = format!(
        "[tls]\ncerts_dir = \"certs\"\n\n[tls.acme]\ndirectory = \"{}\"\nca_bundle = \"{}\"\n\
         domains = [\"edge.test\", \"*.edge.test\"]\nretry_after = \"1s\"\n\
         dns = {{ provider = \"cloudflare\", api_token = \"env:CMUX_EDGE_TEST_CF_TOKEN\", api_url = \"http://{api}/client/v4\", resolvers = [\"{}\"], propagation_timeout = \"30s\" }}\n",
        pebble.directory,
        pebble.https_ca.display(),
        chall.dns,
    );
    let edge_dir = tempfile::tempdir().unwrap();
    // A replica that crashed an hour ago while ordering left its lock behind.
    let certs = edge_dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let lock = std::fs::File::create(certs.join(".acme.lock")).unwrap();
    std::io::Write::write_all(&mut &lock, b"pid 4194304 on crashed-replica\n").unwrap();
    lock.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    drop(lock);

    let (http, https) = (addr(free_port()), addr(free_port()));
    let edge = Edge::start_full_command(
        edge_dir,
        support::DEFAULT_SERVER,
        &config,
        http,
        Some(https),
        |cmd, path| {
            support::run_config(cmd, path);
            cmd.env("CMUX_EDGE_TEST_CF_TOKEN", "cf-token-from-env");
        },
    )
    .await;
    wait_ready(&edge, Duration::from_secs(90)).await;

    let root = pebble.issuing_root().await;
    let leaf = leaf_for(https, "port-1-vm-x.edge.test", &root)
        .await
        .unwrap();
    assert_eq!(leaf, leaf_for(https, "edge.test", &root).await.unwrap());

    // The token came from the environment; each name's TXT value was created and removed
    // through the API, in the zone found by name.
    let calls = calls.lock().unwrap().clone();
    assert!(
        calls.iter().all(|c| c.2 == "Bearer cf-token-from-env"),
        "{calls:?}"
    );
    let records = format!("/client/v4/zones/{ZONE}/dns_records");
    let count = |m: &str, p: &str| calls.iter().filter(|c| c.0 == m && c.1 == p).count();
    assert_eq!(count("POST", &records), 2, "{calls:?}");
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.0 == "DELETE" && c.1.starts_with(&records))
            .count(),
        2,
        "{calls:?}"
    );
    assert_eq!(
        wait_metric(
            edge.admin,
            r#"cmux_edge_acme_orders_total{result="ok"}"#,
            |n| n >= 1.0
        )
        .await,
        1.0
    );
    // the stale lock was taken over and released after the order
    assert!(!edge.dir.path().join("certs/.acme.lock").exists());
}

#[tokio::test]
async fn a_failing_ca_is_counted_as_error_and_retried_with_a_growing_backoff() {
    support::install_crypto();
    // Nothing listens on the directory's port: every order fails at once.
    let dead = free_port();
    let config = format!(
        "[tls]\ncerts_dir = \"certs\"\n\n[tls.acme]\ndirectory = \"https://127.0.0.1:{dead}/dir\"\n\
         domains = [\"edge.test\"]\nretry_after = \"1s\"\ncheck_interval = \"1h\"\n"
    );
    let edge = Edge::start_with(&config, true, |_| {}).await;
    let series = r#"cmux_edge_acme_orders_total{result="error"}"#;
    let mut seen_at = Vec::new();
    for n in 1..=4 {
        wait_metric(edge.admin, series, |v| v >= f64::from(n)).await;
        seen_at.push(Instant::now());
    }
    // retry_after 1 s doubles per failure (±20%): the third wait (about 4 s) is longer than
    // the first (about 1 s) by far more than any jitter; without backoff they would be alike.
    let first = seen_at[1] - seen_at[0];
    let third = seen_at[3] - seen_at[2];
    assert!(
        third > first + Duration::from_millis(1500),
        "no growing backoff: waits {first:?} then {third:?}"
    );
    assert_eq!(
        support::metric(edge.admin, r#"cmux_edge_acme_orders_total{result="ok"}"#)
            .await
            .unwrap_or(0.0),
        0.0
    );
    let r = raw(edge.admin, "127.0.0.1", "GET", "/readyz", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 503);
}
