//! The upgrade socket's directory (SPEC §10 "Upgrade socket"): created 0700 when missing and
//! used for the hand-over; a directory other users can write to is refused at start, by the
//! running process and by the upgrading one.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, raw, DOMAIN};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(dir: &Path, sock: &Path) -> (std::path::PathBuf, SocketAddr, SocketAddr) {
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.join("routes.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nthreads = 1\nshutdown_grace = \"5s\"\nupgrade_sock = \"{}\"\n\n\
             [listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n\
             [[domains]]\nname = \"{DOMAIN}\"\n",
            sock.display()
        ),
    )
    .unwrap();
    (config, http, admin)
}

fn spawn(config: &Path, upgrade: bool, stderr: Stdio) -> Running {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cmux-edge"));
    cmd.args(["run", "--config"]).arg(config);
    if upgrade {
        cmd.arg("--upgrade");
    }
    Running(
        cmd.env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn cmux-edge"),
    )
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn healthy(admin: SocketAddr) -> bool {
    raw(admin, "127.0.0.1", "GET", "/healthz", &[], b"")
        .await
        .is_ok_and(|r| r.status == 200)
}

async fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_world_writable_socket_directory_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (config, _, _) = write_config(dir.path(), &shared.join("upgrade.sock"));
    for upgrade in [false, true] {
        let mut p = spawn(&config, upgrade, Stdio::piped());
        let mut status = None;
        wait_until(Duration::from_secs(20), "cmux-edge to refuse", || {
            status = p.0.try_wait().unwrap();
            status.is_some()
        })
        .await;
        assert!(!status.unwrap().success(), "upgrade={upgrade}");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut p.0.stderr.take().unwrap(), &mut err).unwrap();
        assert!(
            err.contains("writable by group or others") && err.contains("upgrade.sock"),
            "upgrade={upgrade}: {err}"
        );
    }
}

/// 0755: nobody else can plant a socket, but anyone can connect to pingora's 0666 one and
/// hand the upgrading process listeners of their own: `run --upgrade` refuses; `run` serves.
#[tokio::test]
async fn a_directory_others_can_open_is_refused_by_the_upgrading_process() {
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (config, _, admin) = write_config(dir.path(), &open.join("upgrade.sock"));
    let mut p = spawn(&config, true, Stdio::piped());
    let mut status = None;
    wait_until(
        Duration::from_secs(20),
        "cmux-edge --upgrade to refuse",
        || {
            status = p.0.try_wait().unwrap();
            status.is_some()
        },
    )
    .await;
    assert!(!status.unwrap().success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut p.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("open to group or others"), "{err}");
    let _running = spawn(&config, false, Stdio::null());
    let deadline = Instant::now() + Duration::from_secs(15);
    while !healthy(admin).await {
        assert!(Instant::now() < deadline, "cmux-edge run did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_socket_in_a_private_directory_hands_the_listeners_over() {
    let dir = tempfile::tempdir().unwrap();
    // missing: the edge creates it 0700
    let sock = dir
        .path()
        .join("run")
        .join("cmux-edge")
        .join("upgrade.sock");
    let (config, http, admin) = write_config(dir.path(), &sock);
    let mut old = spawn(&config, false, Stdio::inherit());
    let deadline = Instant::now() + Duration::from_secs(15);
    while !healthy(admin).await {
        assert!(Instant::now() < deadline, "cmux-edge did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mode = std::fs::metadata(sock.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    let mut new = spawn(&config, true, Stdio::inherit());
    wait_until(Duration::from_secs(5), "the upgrade socket", || {
        sock.exists()
    })
    .await;
    signal(&old.0, "QUIT");
    let mut status = None;
    wait_until(Duration::from_secs(30), "the old process to exit", || {
        assert!(new.0.try_wait().unwrap().is_none(), "the new process died");
        status = old.0.try_wait().unwrap();
        status.is_some()
    })
    .await;
    assert!(status.unwrap().success());
    // the listeners are the new process's now
    assert!(healthy(admin).await);
    let r = raw(http, DOMAIN, "GET", "/", &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(new.0.try_wait().unwrap().is_none());
}
