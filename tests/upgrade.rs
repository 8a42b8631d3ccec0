//! Zero-downtime binary upgrade (SPEC §9): a new process started with `run --upgrade` takes
//! the listening sockets over from the old one on SIGQUIT, through `[server] upgrade_sock`.
//! A client that keeps sending requests the whole time sees no failure.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{echo_backend, free_port, raw, Edge, DOMAIN};

/// Requests the client makes after the old process is gone: all of them are the new one's.
const AFTER_OLD_EXITED: usize = 50;

#[tokio::test]
async fn a_client_sees_no_failed_request_across_a_binary_upgrade() {
    support::install_crypto();
    let backend = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    // the upgrade socket's directory must be private (SPEC §10)
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let sock = dir.path().join("upgrade.sock");
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("routes.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nthreads = 1\nshutdown_grace = \"5s\"\nupgrade_sock = \"{}\"\n\n\
             [listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n\
             [[domains]]\nname = \"{DOMAIN}\"\n\n\
             [[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n\n\
             [upstreams]\nallow_loopback = true\n",
            sock.display()
        ),
    )
    .unwrap();

    let mut old = Running(spawn(&config, false));
    wait_healthy(admin, http).await;

    // The client: one request after another, each on a fresh connection, until told to stop.
    let host = Edge::host(backend.port(), "local");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let client = tokio::spawn({
        let (stop, ok) = (stop.clone(), ok.clone());
        async move {
            let mut failures = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(40);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match raw(http, &host, "GET", "/upgrade", &[], b"").await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}: {}", r.status, r.text())),
                    Err(e) => failures.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            failures
        }
    });
    wait_until(Duration::from_secs(5), "first requests", || {
        ok.load(Ordering::Relaxed) >= 20
    })
    .await;

    // pingora's order: the new process waits on the socket first, then the old one gets SIGQUIT.
    let mut new = Running(spawn(&config, true));
    wait_until(
        Duration::from_secs(5),
        "the new process's upgrade socket",
        || sock.exists(),
    )
    .await;
    signal(&old.0, "QUIT");

    // pingora keeps the old listeners open 5 s beside the new ones, then the old one drains.
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = old.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            new.0.try_wait().unwrap().is_none(),
            "the new process died during the hand-over"
        );
        assert!(Instant::now() < deadline, "the old process did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "the old process exited with {exit}");

    let served_by_old = ok.load(Ordering::Relaxed);
    wait_until(
        Duration::from_secs(10),
        "requests served by the new process",
        || ok.load(Ordering::Relaxed) >= served_by_old + AFTER_OLD_EXITED,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let failures = client.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        failures.len() + ok.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    assert!(
        new.0.try_wait().unwrap().is_none(),
        "the new process stopped"
    );
}

/// A process of the real binary, killed if the test ends early.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(config: &Path, upgrade: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cmux-edge"));
    cmd.args(["run", "--config"]).arg(config);
    if upgrade {
        cmd.arg("--upgrade");
    }
    cmd.env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn cmux-edge")
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn wait_healthy(admin: SocketAddr, http: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while raw(admin, "127.0.0.1", "GET", "/healthz", &[], b"")
        .await
        .map_or(true, |r| r.status != 200)
        || tokio::net::TcpStream::connect(http).await.is_err()
    {
        assert!(Instant::now() < deadline, "cmux-edge did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(limit: Duration, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
