//! `cmux-edge check` and `explain`, as an operator runs them.

use std::process::Command;

fn edge(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
        .args(args)
        .env_remove("CMUX_EDGE_CONFIG")
        .output()
        .expect("run cmux-edge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, text).unwrap();
    let p = path.display().to_string();
    (dir, p)
}

#[test]
fn the_shipped_routes_toml_checks_ok() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/routes.toml");
    let (code, out, err) = edge(&["check", "--config", shipped]);
    assert_eq!((code, out.as_str()), (0, "config ok\n"), "{err}");
}

#[test]
fn check_reports_every_problem_with_file_line_column_and_key() {
    let (_d, path) = write(
        "[listen]\nhttp = \"nowhere\"\n\n[[domains]]\nname = \"example.com\"\ncolour = \"blue\"\n\n\
         [[routes]]\npattern = \"port-{port}-vm-{vm}\"\n\n[[policy]]\nport = 39378\ncors = \"maybe\"\n",
    );
    let (code, out, err) = edge(&["check", "--config", &path]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(
        lines[0].starts_with(&format!("{path}:2:8: listen.http: ")),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!("{path}:6:1: domains[1].colour: unknown key")),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "{path}:9:11: routes[1].pattern: unknown placeholder {{vm}}"
        )),
        "{err}"
    );
    assert!(
        lines[3].starts_with(&format!("{path}:13:8: policy[1].cors: ")),
        "{err}"
    );
}

#[test]
fn check_of_a_missing_file_says_so() {
    let (code, _, err) = edge(&["check", "--config", "/nonexistent/routes.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read config"), "{err}");
}

#[test]
fn explain_shows_pattern_port_id_scope_policy_and_registry_answer() {
    let (_d, path) = write(
        "[[domains]]\nname = \"example.com\"\n\n[[routes]]\npattern = \"port-{port}-vm-{id}\"\n\n\
         [[routes]]\npattern = \"cmux-{id}-{scope}-{port}\"\n\n\
         [[registry.vms]]\nid = \"200\"\naddress = \"10.100.0.200\"\nports = { 39378 = 32768 }\n\n\
         [[policy]]\nport = 39378\ncors = \"strip\"\n",
    );
    let (code, out, _) = edge(&[
        "explain",
        "port-39378-vm-200.example.com",
        "--config",
        &path,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("pattern:   port-{port}-vm-{id} (route 1)"),
        "{out}"
    );
    assert!(out.contains("port:      39378"), "{out}");
    assert!(out.contains("id:        200"), "{out}");
    assert!(out.contains("cors=Strip"), "{out}");
    assert!(
        out.contains("registry:  static -> 10.100.0.200:32768"),
        "{out}"
    );
    assert!(
        out.contains("sources:   admin, static (first answer wins)"),
        "{out}"
    );

    let (code, out, _) = edge(&[
        "explain",
        "cmux-200-feat-x-5173.example.com",
        "--config",
        &path,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("(route 2)") && out.contains("scope:     feat-x"),
        "{out}"
    );

    let (code, out, _) = edge(&[
        "explain",
        "port-5173-vm-nope.example.com",
        "--config",
        &path,
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("404 unknown vm nope"), "{out}");

    let (code, out, _) = edge(&["explain", "elsewhere.org", "--config", &path]);
    assert_eq!(code, 1);
    assert!(out.contains("rejected:  421 misdirected request"), "{out}");
}

#[test]
fn explain_fills_templates_only_with_validated_ids() {
    let (_d, path) = write(
        "[[domains]]\nname = \"example.com\"\n\n[registry]\nsource = \"template\"\ntemplate = \"10.100.0.{id}\"\n",
    );
    let (code, out, _) = edge(&["explain", "port-80-vm-200.example.com", "--config", &path]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("registry:  template -> 10.100.0.200:80"),
        "{out}"
    );
    let (code, out, _) = edge(&["explain", "port-80-vm-abc.example.com", "--config", &path]);
    assert_eq!(code, 1);
    assert!(out.contains("404 unknown vm abc"), "{out}");
}

#[test]
fn the_shipped_preset_is_the_cmux_one() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/routes.toml");
    let explain = |host: &str| edge(&["explain", host, "--config", shipped]).1;
    let vscode = explain("port-39378-vm-local.localhost");
    assert!(
        vscode.contains("cors=Strip") && vscode.contains("inject_shim=false"),
        "{vscode}"
    );
    let proxy = explain("port-39379-vm-local.localhost");
    assert!(
        proxy.contains("pass_client_headers=[\"x-cmux-port-internal\", \"x-cmux-host-override\"]"),
        "{proxy}"
    );
    let vnc = explain("port-39380-vm-local.localhost");
    assert!(
        vnc.contains("cors=Passthrough") && vnc.contains("embed=false"),
        "{vnc}"
    );
    assert!(
        vnc.contains("rewrite_redirects=false") && vnc.contains("inject_shim=false"),
        "{vnc}"
    );
    let dev = explain("port-5173-vm-local.localhost");
    assert!(
        dev.contains("cors=Permissive") && dev.contains("inject_shim=true"),
        "{dev}"
    );
    assert!(dev.contains("registry:  static -> 127.0.0.1:5173"), "{dev}");
}

#[test]
fn check_refuses_source_and_sources_together_and_unknown_source_names() {
    let (_d, path) = write(
        "[[domains]]\nname = \"example.com\"\n\n[registry]\nsource = \"http\"\nsources = [\"admin\", \"etcd\"]\n",
    );
    let (code, out, err) = edge(&["check", "--config", &path]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.contains(&format!("{path}:6:11: registry.sources: use either source")),
        "{err}"
    );
    let (_d, path) = write(
        "[[domains]]\nname = \"example.com\"\n\n[registry]\nsources = [\"admin\", \"etcd\"]\n",
    );
    let (code, _, err) = edge(&["check", "--config", &path]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{path}:5:21: registry.sources[2]: unknown source \"etcd\""
        )),
        "{err}"
    );
}
