//! `cmux-edge explain` names the source that answered, in every registry layout, and honours
//! the admin registrations' `expires_at`. Everything it reads is in a temp dir of its own.

use std::process::Command;

fn explain(dir: &std::path::Path, host: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
        .args(["explain", host, "--config"])
        .arg(dir.join("routes.toml"))
        .env_remove("CMUX_EDGE_CONFIG")
        .output()
        .expect("run cmux-edge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn registry_line(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("registry:"))
        .unwrap_or_else(|| panic!("no registry line in {out}"))
}

const CONFIG: &str = "[[domains]]\nname = \"example.com\"\n\n\
    [registry]\nsources = [\"admin\", \"static\", \"template\"]\ntemplate = \"10.9.0.{id}\"\n\n\
    [[registry.vms]]\nid = \"listed\"\naddress = \"127.0.0.1\"\n";

#[test]
fn explain_names_the_source_that_answered_and_skips_expired_registrations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), CONFIG).unwrap();
    std::fs::write(
        dir.path().join("cmux-edge-state.json"),
        r#"{"api": {"address": "10.0.0.5"},
            "old": {"address": "10.0.0.6", "expires_at": "2001-01-01T00:00:00Z"},
            "7": {"address": "10.0.0.7", "expires_at": "2001-01-01T00:00:00Z"}}"#,
    )
    .unwrap();
    let (code, out) = explain(dir.path(), "port-3000-vm-listed.example.com");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        registry_line(&out),
        "registry:  static -> 127.0.0.1:3000 (Http)"
    );
    let (code, out) = explain(dir.path(), "port-3000-vm-api.example.com");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        registry_line(&out),
        "registry:  admin -> 10.0.0.5:3000 (Http)"
    );
    // Expired: the admin registration is gone, and the next source answers.
    let (code, out) = explain(dir.path(), "port-3000-vm-7.example.com");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        registry_line(&out),
        "registry:  template -> 10.9.0.7:3000 (Http)"
    );
    let (code, out) = explain(dir.path(), "port-3000-vm-old.example.com");
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        registry_line(&out),
        "registry:  no source -> 404 unknown vm old"
    );
    // `explain` reads the state file and never rewrites it.
    let state = std::fs::read_to_string(dir.path().join("cmux-edge-state.json")).unwrap();
    assert!(state.contains("\"old\""), "{state}");
}

#[test]
fn explain_with_a_single_source_names_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        "[[domains]]\nname = \"example.com\"\n\n[registry]\nsources = [\"static\"]\n\n\
         [[registry.vms]]\nid = \"listed\"\naddress = \"127.0.0.1\"\n",
    )
    .unwrap();
    let (code, out) = explain(dir.path(), "port-3000-vm-listed.example.com");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        registry_line(&out),
        "registry:  static -> 127.0.0.1:3000 (Http)"
    );
}
