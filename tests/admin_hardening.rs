//! The admin listener against DNS rebinding and weak tokens (SPEC §10 "Admin"): only IP
//! literals, `localhost` and `[admin] hosts` are answered, and `check` refuses a token under
//! 32 bytes or a placeholder, with its file:line:column.

mod support;

use std::process::Command;

use support::{raw, Edge};

const TOKEN: &str = "admin-hardening-0123456789abcdef0123";

#[tokio::test]
async fn the_admin_listener_answers_only_ip_literal_localhost_or_listed_hosts() {
    let edge = Edge::start(&format!(
        "[admin]\ntoken = \"{TOKEN}\"\nhosts = [\"edge-admin.cmux.svc\"]\n"
    ))
    .await;
    let port = edge.admin.port();
    for host in [
        "127.0.0.1".to_owned(),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_owned(),
        format!("localhost:{port}"),
        "edge-admin.cmux.svc".to_owned(),
        format!("EDGE-ADMIN.cmux.svc:{port}"),
    ] {
        let r = raw(edge.admin, &host, "GET", "/metrics", &[], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }
    let auth = format!("Bearer {TOKEN}");
    for host in [
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        "localhost.evil.example".to_owned(),
        "127.0.0.1.nip.io".to_owned(),
    ] {
        for path in ["/metrics", "/healthz", "/api/vms"] {
            let r = raw(
                edge.admin,
                &host,
                "GET",
                path,
                &[("Authorization", auth.as_str())],
                b"",
            )
            .await
            .unwrap();
            assert_eq!(r.status, 421, "{host}{path}: {}", r.text());
            assert_eq!(r.text().lines().count(), 1, "{}", r.text());
            assert!(!r.text().contains("cmux_edge_"), "{}", r.text());
        }
    }
}

fn check(admin: &str, env: Option<&str>) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(
        &path,
        format!("[[domains]]\nname = \"example.com\"\n\n[admin]\n{admin}\n"),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cmux-edge"));
    cmd.args(["check", "--config"]).arg(&path);
    match env {
        Some(v) => cmd.env("CMUX_EDGE_TEST_ADMIN_TOKEN", v),
        None => cmd.env_remove("CMUX_EDGE_TEST_ADMIN_TOKEN"),
    };
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_refuses_a_short_or_placeholder_admin_token() {
    for token in [
        "s3cret-token",
        "replace-me",
        "changeme",
        "change-me",
        "secret",
    ] {
        let (ok, err) = check(&format!("token = \"{token}\""), None);
        assert!(!ok, "{token} accepted");
        assert!(
            err.contains("routes.toml:5:9: admin.token: the token "),
            "{err}"
        );
    }
    // from the environment too, without printing it
    let (ok, err) = check(
        "token = \"env:CMUX_EDGE_TEST_ADMIN_TOKEN\"",
        Some("short-one"),
    );
    assert!(
        !ok && err.contains("admin.token") && !err.contains("short-one"),
        "{err}"
    );
    let (ok, err) = check(&format!("token = \"{TOKEN}\""), None);
    assert!(ok, "{err}");
}
