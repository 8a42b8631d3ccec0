//! Upstream egress (SPEC §10 `[upstreams]`), against the real binary: whatever source names
//! an address (static, template, admin API, file, a DNS name), the address actually dialled
//! is checked; the built-in deny set (loopback, `::ffff:127.0.0.1`, `0.0.0.0`, link-local
//! metadata) and the edge's own listeners answer 502 `upstream address not allowed`, counted
//! as refusal reason `egress`; allowed addresses are still proxied; `check` warns about
//! static addresses that are always refused and a `proxmox` source without `allow`.

mod support;

use std::net::SocketAddr;
use std::process::Command;

use support::{echo_backend, free_port, raw, Edge};

const TOKEN: &str = "egress-test-token-0123456789abcdef0123";

fn no_loopback(extra: &str) -> String {
    format!("[upstreams]\nallow_loopback = false\n\n{extra}")
}

fn vm(id: &str, address: &str) -> String {
    format!("[[registry.vms]]\nid = \"{id}\"\naddress = \"{address}\"\n\n")
}

async fn get(edge: &Edge, port: u16, id: &str) -> support::RawResponse {
    raw(edge.http, &Edge::host(port, id), "GET", "/", &[], b"")
        .await
        .unwrap()
}

fn assert_refused(r: &support::RawResponse, id: &str) {
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.text(), format!("upstream address not allowed: vm {id}\n"));
}

async fn egress_refusals(edge: &Edge) -> f64 {
    let r = raw(edge.admin, "127.0.0.1", "GET", "/metrics", &[], b"")
        .await
        .unwrap();
    r.text()
        .lines()
        .find(|l| l.starts_with("cmux_edge_refusals_total{reason=\"egress\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test]
async fn loopback_unspecified_and_metadata_addresses_are_refused_and_counted() {
    let backend = echo_backend().await;
    let edge = Edge::start(&no_loopback(&format!(
        "{}{}{}{}{}",
        vm("lo", "127.0.0.1"),
        vm("mapped", "::ffff:127.0.0.1"),
        vm("zero", "0.0.0.0"),
        vm("meta", "169.254.169.254"),
        vm("six", "::1"),
    )))
    .await;
    let port = backend.port();
    for id in ["lo", "mapped", "zero", "meta", "six"] {
        assert_refused(&get(&edge, port, id).await, id);
    }
    assert_eq!(egress_refusals(&edge).await, 5.0);
}

#[tokio::test]
async fn allowed_loopback_is_proxied_but_never_to_the_edges_own_listeners() {
    let backend = echo_backend().await;
    let edge = Edge::start(&format!(
        "[upstreams]\nallow_loopback = true\n\n{}{}",
        vm("local", "127.0.0.1"),
        vm("mapped", "::ffff:127.0.0.1"),
    ))
    .await;
    let r = get(&edge, backend.port(), "local").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"method\""), "{}", r.text());
    for id in ["local", "mapped"] {
        // the admin listener (/metrics, /api) and the public listener itself
        assert_refused(&get(&edge, edge.admin.port(), id).await, id);
        assert_refused(&get(&edge, edge.http.port(), id).await, id);
    }
    let r = raw(
        edge.http,
        &Edge::host(edge.admin.port(), "local"),
        "GET",
        "/metrics",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502);
    assert!(!r.text().contains("cmux_edge_"), "{}", r.text());
    // a name that resolves to loopback is loopback
    let edge = Edge::start(&no_loopback(&vm("named", "localhost"))).await;
    assert_refused(&get(&edge, backend.port(), "named").await, "named");
}

#[tokio::test]
async fn template_addresses_are_checked() {
    let backend = echo_backend().await;
    let edge = Edge::start(&no_loopback(
        "[registry]\nsource = \"template\"\ntemplate = \"127.0.0.{id}\"\n",
    ))
    .await;
    assert_refused(&get(&edge, backend.port(), "1").await, "1");
}

#[tokio::test]
async fn admin_api_registrations_are_checked() {
    let backend = echo_backend().await;
    let edge = Edge::start(&format!(
        "[upstreams]\nallow_loopback = true\n\n[admin]\ntoken = \"{TOKEN}\"\n"
    ))
    .await;
    let auth = format!("Bearer {TOKEN}");
    for (id, address) in [("meta", "169.254.169.254"), ("lo", "::ffff:127.0.0.1")] {
        let body = format!("{{\"address\": \"{address}\"}}");
        let r = raw(
            edge.admin,
            "127.0.0.1",
            "PUT",
            &format!("/api/vms/{id}"),
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
        .await
        .unwrap();
        assert!(r.status < 300, "{} {}", r.status, r.text());
    }
    assert_refused(&get(&edge, backend.port(), "meta").await, "meta");
    assert_refused(&get(&edge, edge.admin.port(), "lo").await, "lo");
    let r = get(&edge, backend.port(), "lo").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn file_source_addresses_are_checked() {
    let backend = echo_backend().await;
    let edge = Edge::start_with(
        &no_loopback("[registry]\nsource = \"file\"\nfile = \"vms.json\"\n"),
        false,
        |dir| {
            std::fs::write(
                dir.join("vms.json"),
                r#"{"zero": {"address": "0.0.0.0"}, "lo": {"address": "127.0.0.1"}}"#,
            )
            .unwrap();
        },
    )
    .await;
    assert_refused(&get(&edge, backend.port(), "zero").await, "zero");
    assert_refused(&get(&edge, backend.port(), "lo").await, "lo");
}

#[tokio::test]
async fn allow_limits_upstreams_to_its_networks() {
    let backend = echo_backend().await;
    let edge = Edge::start(&format!(
        "[upstreams]\nallow = [\"10.100.0.0/16\"]\n\n{}{}",
        vm("lan", "10.200.0.1"),
        vm("lo", "127.0.0.1"),
    ))
    .await;
    assert_refused(&get(&edge, backend.port(), "lan").await, "lan");
    assert_refused(&get(&edge, backend.port(), "lo").await, "lo");
}

/// The shipped routes.toml allows loopback for its `local` VM, and still never serves the
/// admin listener through the public one (`port-9180-vm-local.localhost:8080/metrics`).
#[tokio::test]
async fn the_shipped_config_does_not_reach_its_admin_listener() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/routes.toml")).unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = shipped
        .replace("127.0.0.1:8080", &http.to_string())
        .replace("127.0.0.1:9180", &admin.to_string());
    assert!(
        config.contains(&admin.to_string()),
        "the shipped listeners moved"
    );
    let edge = Edge::run_config(tempfile::tempdir().unwrap(), &config, http, None, admin).await;
    let host = format!("port-{}-vm-local.localhost", admin.port());
    let r = raw(edge.http, &host, "GET", "/metrics", &[], b"")
        .await
        .unwrap();
    assert_refused(&r, "local");
    let backend = echo_backend().await;
    let host = format!("port-{}-vm-local.localhost", backend.port());
    let r = raw(edge.http, &host, "GET", "/", &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("PVE_API_URL")
        .env_remove("PVE_API_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_warns_about_a_static_address_that_is_always_refused() {
    let (ok, out, err) = check(&format!(
        "[[domains]]\nname = \"example.com\"\n\n{}{}",
        vm("meta", "169.254.169.254"),
        vm("fine", "10.0.0.7"),
    ));
    assert!(ok, "{err}");
    assert!(out.contains("config ok"), "{out}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains(
            "routes.toml:6:11: registry.vms[1].address: 169.254.169.254 is always refused"
        ),
        "{err}"
    );
    // loopback without allow_loopback too
    let (ok, _, err) = check(&format!(
        "[[domains]]\nname = \"example.com\"\n\n{}",
        vm("lo", "127.0.0.1")
    ));
    assert!(ok && err.contains("allow_loopback"), "{err}");
}

#[test]
fn check_warns_about_a_proxmox_source_without_allow() {
    let pve = "[registry]\nsources = [\"proxmox\"]\npve_url = \"https://pve.lan:8006\"\n\
               pve_token = \"root@pam!cmux=s3cret\"\n";
    let (ok, _, err) = check(&format!("[[domains]]\nname = \"example.com\"\n\n{pve}"));
    assert!(ok, "{err}");
    assert!(
        err.contains("warning:")
            && err.contains("registry.sources")
            && err.contains("[upstreams] allow"),
        "{err}"
    );
    let (ok, _, err) = check(&format!(
        "[[domains]]\nname = \"example.com\"\n\n{pve}\n[upstreams]\nallow = [\"10.100.0.0/16\"]\n"
    ));
    assert!(ok && !err.contains("warning:"), "{err}");
}

#[test]
fn bad_upstream_networks_are_check_errors() {
    let (ok, _, err) = check(
        "[[domains]]\nname = \"example.com\"\n\n[upstreams]\nallow = [\"10.0.0.0/33\"]\nallow_loopback = \"yes\"\nbogus = 1\n",
    );
    assert!(!ok);
    for key in [
        "upstreams.allow[1]",
        "upstreams.allow_loopback",
        "upstreams.bogus",
    ] {
        assert!(err.contains(key), "{key}: {err}");
    }
}
