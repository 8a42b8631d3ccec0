//! Config reload (SPEC §2): SIGHUP and file changes swap the config in place; a bad file is
//! refused and the old config keeps serving; open connections survive.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::{echo_backend, metric, raw, wait_log, wait_metric, ws_backend, Edge};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn vms(ids: &[&str]) -> String {
    ids.iter()
        .map(|id| format!("[[registry.vms]]\nid = \"{id}\"\naddress = \"127.0.0.1\"\n\n"))
        .collect()
}

const RELOADS_OK: &str = r#"cmux_edge_config_reloads_total{result="ok"}"#;
const RELOADS_ERROR: &str = r#"cmux_edge_config_reloads_total{result="error"}"#;

/// A reload counter now (0 while the series does not exist yet).
async fn reloads(edge: &Edge, series: &str) -> f64 {
    metric(edge.admin, series).await.unwrap_or(0.0)
}

/// Rewrites the config keeping the listeners the harness chose, atomically.
fn rewrite(edge: &Edge, extra: &str) {
    let path = edge.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let head = &text[..text.find("[[domains]]").unwrap()];
    // whole files only (temp + rename): the poller never reads a half-written one
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!("{head}[[domains]]\nname = \"edge.test\"\n\n{extra}"),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

async fn status(edge: &Edge, host: &str) -> u16 {
    raw(edge.http, host, "GET", "/", &[], b"")
        .await
        .map(|r| r.status)
        .unwrap_or(0)
}

async fn eventually(edge: &Edge, host: &str, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let got = status(edge, host).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host}: still {got}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sighup_reload_adds_a_vm() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&vms(&["a"])).await;
    assert_eq!(status(&edge, &Edge::host(b, "b")).await, 404);
    let before = reloads(&edge, RELOADS_OK).await;
    rewrite(&edge, &vms(&["a", "b"]));
    edge.signal("HUP");
    wait_metric(edge.admin, RELOADS_OK, |n| n > before).await;
    assert_eq!(status(&edge, &Edge::host(b, "b")).await, 200);
    assert_eq!(status(&edge, &Edge::host(b, "a")).await, 200);
}

#[tokio::test]
async fn a_changed_file_is_picked_up_without_a_signal() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&vms(&["a"])).await;
    rewrite(&edge, &vms(&["a", "bb"]));
    wait_metric(edge.admin, RELOADS_OK, |n| n >= 1.0).await;
    assert_eq!(status(&edge, &Edge::host(b, "bb")).await, 200);
}

#[tokio::test]
async fn a_broken_reload_keeps_the_old_config_serving() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&vms(&["a"])).await;
    let ok_before = reloads(&edge, RELOADS_OK).await;
    rewrite(
        &edge,
        "[[registry.vms]]\nid = \"b\"\naddress = \"not an address\"\n[bogus]\n",
    );
    edge.signal("HUP");
    // the refusal is counted (needs refused reloads to count result="error")
    wait_metric(edge.admin, RELOADS_ERROR, |n| n >= 1.0).await;
    assert_eq!(
        reloads(&edge, RELOADS_OK).await,
        ok_before,
        "a broken file was taken"
    );
    assert_eq!(status(&edge, &Edge::host(b, "a")).await, 200);
    assert_eq!(status(&edge, &Edge::host(b, "b")).await, 404);
    // and a good file after the bad one is taken
    rewrite(&edge, &vms(&["b"]));
    edge.signal("HUP");
    wait_metric(edge.admin, RELOADS_OK, |n| n > ok_before).await;
    assert_eq!(status(&edge, &Edge::host(b, "b")).await, 200);
    assert_eq!(status(&edge, &Edge::host(b, "a")).await, 404);
}

#[tokio::test]
async fn a_websocket_opened_before_a_reload_still_echoes_after_it() {
    support::install_crypto();
    let (ws, _) = ws_backend().await;
    let edge = Edge::start(&vms(&["local"])).await;
    let mut req = format!("ws://{}/ws", edge.http)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("host", Edge::host(ws.port(), "local").parse().unwrap());
    let (mut sock, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    sock.send(Message::text("before")).await.unwrap();
    assert_eq!(sock.next().await.unwrap().unwrap(), Message::text("before"));
    // the reload even removes the VM: the open tunnel is not torn down
    rewrite(&edge, &vms(&["other"]));
    edge.signal("HUP");
    eventually(&edge, &Edge::host(ws.port(), "local"), 404).await;
    sock.send(Message::text("after")).await.unwrap();
    assert_eq!(sock.next().await.unwrap().unwrap(), Message::text("after"));
}

#[tokio::test]
async fn a_hundred_reloads_under_continuous_load_fail_no_request() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start(&vms(&["a"])).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (addr, host, stop) = (edge.http, Edge::host(b, "a"), stop.clone());
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match raw(addr, &host, "GET", "/", &[], b"").await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(format!("status {}", r.status)),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    for i in 0..100 {
        // every version keeps VM a; each one is a real change (another VM id)
        rewrite(&edge, &vms(&["a", &format!("v{i}")]));
        edge.signal("HUP");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(&edge, &Edge::host(b, "v99"), 200).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = c.await.unwrap();
        assert!(
            failed.is_empty(),
            "{} failed requests, e.g. {:?}",
            failed.len(),
            failed.first()
        );
        total += ok;
    }
    assert!(
        total > 100,
        "only {total} requests were made during the reloads"
    );
}

#[tokio::test]
async fn the_file_source_picks_up_changes_and_survives_a_broken_file() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let (edge, logs) = Edge::start_logged(
        "[registry]\nsource = \"file\"\nfile = \"vms.json\"\n",
        |dir| {
            std::fs::write(dir.join("vms.json"), r#"{"f1": {"address": "127.0.0.1"}}"#).unwrap();
        },
    )
    .await;
    let vms_file = edge.dir.path().join("vms.json");
    assert_eq!(status(&edge, &Edge::host(b, "f1")).await, 200);
    std::fs::write(
        &vms_file,
        r#"{"f1": {"address": "127.0.0.1"}, "f2": {"address": "127.0.0.1"}}"#,
    )
    .unwrap();
    eventually(&edge, &Edge::host(b, "f2"), 200).await;
    // a torn write is refused (seen in the log); the previous VMs keep routing
    std::fs::write(&vms_file, r#"{"f3": {"addre"#).unwrap();
    wait_log(&logs, "VM file refused").await;
    assert_eq!(status(&edge, &Edge::host(b, "f2")).await, 200);
    assert_eq!(status(&edge, &Edge::host(b, "f3")).await, 404);
}

#[tokio::test]
async fn the_file_source_reads_toml_too() {
    support::install_crypto();
    let b = echo_backend().await.port();
    let edge = Edge::start_with(
        "[registry]\nsource = \"file\"\nfile = \"vms.toml\"\n",
        false,
        |dir| {
            std::fs::write(dir.join("vms.toml"), "[t1]\naddress = \"127.0.0.1\"\n").unwrap();
        },
    )
    .await;
    assert_eq!(status(&edge, &Edge::host(b, "t1")).await, 200);
}
