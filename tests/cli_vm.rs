//! `cmux-edge vm add|rm|ls` against a running edge's admin API, as an operator runs them:
//! address and token from the config file, `--admin` / `--token` overrides, one-line errors
//! and exit 1 on 401, 400 and a refused connection.

mod support;

use support::{echo_backend, raw, Edge};

const TOKEN: &str = "cli-token-0123456789abcdef01234567";

struct Run {
    code: i32,
    out: String,
    err: String,
}

async fn vm(args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
        .arg("vm")
        .args(args)
        .env_remove("CMUX_EDGE_CONFIG")
        .env_remove("CMUX_EDGE_ADMIN_TOKEN")
        .output()
        .await
        .expect("run cmux-edge vm");
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn started() -> (Edge, String) {
    support::install_crypto();
    let edge = Edge::start(&format!("[admin]\ntoken = \"{TOKEN}\"\n")).await;
    let config = edge.config_path().display().to_string();
    (edge, config)
}

async fn status(edge: &Edge, port: u16, id: &str) -> u16 {
    raw(edge.http, &Edge::host(port, id), "GET", "/", &[], b"")
        .await
        .unwrap()
        .status
}

#[tokio::test]
async fn add_routes_ls_lists_and_rm_removes_with_the_configs_address_and_token() {
    let b = echo_backend().await.port();
    let (edge, config) = started().await;

    let r = vm(&["--config", &config, "add", "200", "127.0.0.1"]).await;
    assert_eq!((r.code, r.out.as_str()), (0, "vm 200 added\n"), "{}", r.err);
    assert_eq!(status(&edge, b, "200").await, 200);

    let r = vm(&[
        "add",
        "200",
        "127.0.0.1",
        "--port",
        &format!("80={b}"),
        "--label",
        "task=t1",
        "--label",
        "owner=ci",
        "--expires-at",
        "2999-01-01T00:00:00Z",
        "--config",
        &config,
    ])
    .await;
    assert_eq!(
        (r.code, r.out.as_str()),
        (0, "vm 200 replaced\n"),
        "{}",
        r.err
    );
    // the port map is honoured on the next request
    assert_eq!(status(&edge, 80, "200").await, 200);

    let r = vm(&["--config", &config, "ls"]).await;
    assert_eq!(r.code, 0, "{}", r.err);
    let lines: Vec<&str> = r.out.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.out);
    assert!(lines[0].starts_with("ID   ADDRESS    PORTS"), "{}", r.out);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row,
        [
            "200",
            "127.0.0.1",
            &format!("80={b}"),
            "http",
            "2999-01-01T00:00:00Z",
            "owner=ci,task=t1"
        ]
    );

    let r = vm(&["--config", &config, "ls", "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&r.out).expect("ls --json is JSON");
    assert_eq!(json["200"]["labels"]["task"], "t1");
    assert_eq!(json["200"]["ports"]["80"], b);

    let r = vm(&["--config", &config, "rm", "200"]).await;
    assert_eq!(
        (r.code, r.out.as_str()),
        (0, "vm 200 removed\n"),
        "{}",
        r.err
    );
    assert_eq!(status(&edge, 80, "200").await, 404);
    let r = vm(&["--config", &config, "ls"]).await;
    assert_eq!(r.out, "no VMs registered\n");

    let r = vm(&["--config", &config, "rm", "200"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.err, "cmux-edge: unknown vm 200 (404)\n");
}

#[tokio::test]
async fn admin_and_token_flags_work_without_a_config_file() {
    let b = echo_backend().await.port();
    let (edge, _) = started().await;
    let admin = edge.admin.to_string();
    let r = vm(&[
        "--config",
        "/nonexistent/routes.toml",
        "--admin",
        &admin,
        "--token",
        TOKEN,
        "add",
        "flagged",
        "127.0.0.1",
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(status(&edge, b, "flagged").await, 200);
    // the token can come from the environment too, out of `ps`
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
        .args(["vm", "ls", "--json", "--admin", &format!("http://{admin}/")])
        .args(["--config", "/nonexistent/routes.toml"])
        .env("CMUX_EDGE_ADMIN_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"flagged\""));
}

#[tokio::test]
async fn a_wrong_token_is_one_line_and_exit_1() {
    let (_edge, config) = started().await;
    let r = vm(&["--config", &config, "--token", "nope", "ls"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.err.lines().count(), 1, "{}", r.err);
    assert!(
        r.err
            .starts_with("cmux-edge: the admin API at http://127.0.0.1:")
            && r.err
                .contains("refused the token (401): missing or wrong bearer token"),
        "{}",
        r.err
    );
    assert_eq!(r.out, "");
}

#[tokio::test]
async fn an_invalid_vm_is_one_line_with_the_apis_reason_and_exit_1() {
    let (_edge, config) = started().await;
    let r = vm(&["--config", &config, "add", "a", "x@evil"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.err.lines().count(), 1, "{}", r.err);
    assert!(
        r.err
            .starts_with("cmux-edge: the admin API answered 400: invalid vm:")
            && r.err
                .contains("neither an IP address nor a lowercase DNS name"),
        "{}",
        r.err
    );
    let r = vm(&["--config", &config, "add", "Bad_Id-", "127.0.0.1"]).await;
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(r.err.contains("400"), "{}", r.err);
    // malformed flags never reach the API: clap's usage error
    let r = vm(&["--config", &config, "add", "a", "127.0.0.1", "--port", "80"]).await;
    assert_eq!(r.code, 2);
    assert!(r.err.contains("is not VM=PUBLIC"), "{}", r.err);
}

#[tokio::test]
async fn a_refused_connection_is_one_line_and_exit_1() {
    let port = support::free_port();
    let r = vm(&[
        "--admin",
        &format!("127.0.0.1:{port}"),
        "--token",
        TOKEN,
        "ls",
    ])
    .await;
    assert_eq!(r.code, 1);
    assert_eq!(r.err.lines().count(), 1, "{}", r.err);
    assert!(
        r.err.starts_with(&format!(
            "cmux-edge: cannot reach the admin API at http://127.0.0.1:{port}:"
        )) && r.err.to_lowercase().contains("connection refused"),
        "{}",
        r.err
    );
}

#[tokio::test]
async fn without_a_token_anywhere_it_says_where_to_put_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, "[[domains]]\nname = \"example.com\"\n").unwrap();
    let r = vm(&["--config", &path.display().to_string(), "ls"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.err.contains("has no [admin] token") && r.err.contains("--token"),
        "{}",
        r.err
    );
}
