//! The `proxmox` source against a local server that replays the PVE API's JSON shapes:
//! `/cluster/resources?type=vm` to find the node, `/nodes/{node}/lxc/{vmid}/interfaces` for
//! the address, `Authorization: PVEAPIToken=...` on every call.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use support::{raw, Edge};
use tokio::net::TcpListener;

const TOKEN: &str = "root@pam!cmux=0b6f2a5e-7c1d-4d9e-9f3a-2b8c1e0d4f6a";

/// What PVE 8 answers (trimmed to a few fields per entry, as real answers carry many more).
const RESOURCES: &str = r#"{"data":[
  {"id":"lxc/200","type":"lxc","vmid":200,"node":"pve1","name":"cmux-200","status":"running","maxmem":2147483648,"uptime":5123,"template":0},
  {"id":"lxc/201","type":"lxc","vmid":201,"node":"pve2","name":"cmux-201","status":"stopped","maxmem":2147483648,"uptime":0,"template":0},
  {"id":"lxc/202","type":"lxc","vmid":202,"node":"pve1","name":"cmux-202","status":"running","maxmem":2147483648,"uptime":61,"template":0},
  {"id":"qemu/300","type":"qemu","vmid":300,"node":"pve1","name":"win","status":"running","maxmem":8589934592,"uptime":77,"template":0}
]}"#;
/// Container 200's interfaces: its eth0 address is this machine's own (non-loopback) IPv4,
/// so a request routed to it reaches a backend the test runs.
fn interfaces_200() -> String {
    format!(
        r#"{{"data":[
  {{"name":"lo","hwaddr":"00:00:00:00:00:00","inet":"127.0.0.1/8","inet6":"::1/128"}},
  {{"name":"eth0","hwaddr":"bc:24:11:2c:69:f0","inet":"{}/24","inet6":"fe80::be24:11ff:fe2c:69f0/64"}}
]}}"#,
        support::host_ipv4()
    )
}

/// Container 202's: the same address, after a loopback one.
fn interfaces_202() -> String {
    format!(
        r#"{{"data":[{{"name":"lo","inet":"127.0.0.1/8"}},{{"name":"eth0","inet":"{}/24"}}]}}"#,
        support::host_ipv4()
    )
}

struct FakePve {
    addr: SocketAddr,
    /// Every call: path?query and the Authorization header.
    calls: Arc<Mutex<Vec<(String, String)>>>,
}

type Calls = Arc<Mutex<Vec<(String, String)>>>;

/// The PVE API's answers, recording every call.
async fn pve_answer(req: Request<hyper::body::Incoming>, seen: Calls) -> Response<Full<Bytes>> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    seen.lock().unwrap().push((target.clone(), auth.clone()));
    if auth != format!("PVEAPIToken={TOKEN}") {
        return Response::builder()
            .status(401)
            .body(Full::new(Bytes::from_static(b"authentication failure")))
            .unwrap();
    }
    let body = match target.as_str() {
        "/api2/json/cluster/resources?type=vm" => RESOURCES.to_owned(),
        "/api2/json/nodes/pve1/lxc/200/interfaces" => interfaces_200(),
        "/api2/json/nodes/pve1/lxc/202/interfaces" => interfaces_202(),
        _ => {
            return Response::builder()
                .status(500)
                .body(Full::new(Bytes::from_static(b"{\"data\":null}")))
                .unwrap()
        }
    };
    Response::builder()
        .header("content-type", "application/json;charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn fake_pve() -> FakePve {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    support::spawn_http(listener, move |req| pve_answer(req, seen.clone()));
    FakePve { addr, calls }
}

/// The same API over HTTPS with a self-signed certificate for `localhost`, as PVE serves
/// it; returns the API and the certificate's PEM (PVE's `pve-root-ca.pem` plays this part).
async fn fake_pve_over_tls() -> (FakePve, String) {
    support::install_crypto();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let seen = seen.clone();
                    async move { Ok::<_, std::convert::Infallible>(pve_answer(req, seen).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    (FakePve { addr, calls }, cert.pem())
}

fn registry(pve: &FakePve, token: &str) -> String {
    format!(
        "[registry]\nsources = [\"proxmox\"]\npve_url = \"http://{}\"\npve_token = \"{token}\"\n",
        pve.addr
    )
}

async fn explain(config: &std::path::Path, host: &str) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
        .args(["explain", host, "--config"])
        .arg(config)
        .env_remove("PVE_API_URL")
        .env_remove("PVE_API_TOKEN")
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `routes.toml` for `example.com` with `registry` in it.
fn write_config(dir: &tempfile::TempDir, registry: &str) -> std::path::PathBuf {
    let config = dir.path().join("routes.toml");
    std::fs::write(
        &config,
        format!("[[domains]]\nname = \"example.com\"\n\n{registry}"),
    )
    .unwrap();
    config
}

#[tokio::test]
async fn a_running_container_resolves_to_its_first_ipv4_through_the_pve_api() {
    let pve = fake_pve().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &registry(&pve, TOKEN));
    let out = explain(&config, "port-39378-vm-200.example.com").await;
    assert!(
        out.contains(&format!(
            "registry:  proxmox -> {}:39378",
            support::host_ipv4()
        )),
        "{out}"
    );
    let calls = pve.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [
            (
                "/api2/json/cluster/resources?type=vm".to_owned(),
                format!("PVEAPIToken={TOKEN}")
            ),
            (
                "/api2/json/nodes/pve1/lxc/200/interfaces".to_owned(),
                format!("PVEAPIToken={TOKEN}")
            ),
        ]
    );

    // a stopped container, a QEMU VM and a vmid PVE does not list are unknown
    for id in ["201", "300", "404"] {
        let out = explain(&config, &format!("port-80-vm-{id}.example.com")).await;
        assert!(out.contains(&format!("404 unknown vm {id}")), "{id}: {out}");
    }
    // an id that cannot be a vmid never reaches the API
    pve.calls.lock().unwrap().clear();
    let out = explain(&config, "port-80-vm-morphvm-abc.example.com").await;
    assert!(out.contains("404 unknown vm morphvm-abc"), "{out}");
    assert!(pve.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_refused_token_is_registry_unavailable_not_unknown() {
    let pve = fake_pve().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &registry(&pve, "root@pam!cmux=wrong"));
    let out = explain(&config, "port-80-vm-200.example.com").await;
    assert!(out.contains("503 registry unavailable for vm 200"), "{out}");
}

#[tokio::test]
async fn concurrent_requests_through_the_edge_make_one_pair_of_pve_calls() {
    support::install_crypto();
    let pve = fake_pve().await;
    // The container's address is this machine's own, where the echo backend listens: every
    // request is answered by the VM itself.
    let backend = support::echo_backend_on(support::host_ipv4().into()).await;
    let edge = Edge::start(&registry(&pve, TOKEN)).await;
    let host = Edge::host(backend.port(), "200");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (addr, host) = (edge.http, host.clone());
            tokio::spawn(async move { raw(addr, &host, "GET", "/", &[], b"").await.unwrap() })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(support::seen(&r.json(), "x-cmux-vm-id"), ["200"]);
    }
    assert_eq!(
        pve.calls.lock().unwrap().len(),
        2,
        "one resources call and one interfaces call"
    );
    // another container: the cluster listing is reused, only its interfaces are asked
    let r = raw(
        edge.http,
        &Edge::host(backend.port(), "202"),
        "GET",
        "/",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(support::seen(&r.json(), "x-cmux-vm-id"), ["202"]);
    let calls = pve.calls.lock().unwrap().clone();
    assert_eq!(
        calls
            .iter()
            .map(|(path, _)| path.as_str())
            .collect::<Vec<_>>(),
        [
            "/api2/json/cluster/resources?type=vm",
            "/api2/json/nodes/pve1/lxc/200/interfaces",
            "/api2/json/nodes/pve1/lxc/202/interfaces"
        ]
    );
}

#[tokio::test]
async fn cold_lookups_of_many_ids_share_one_cluster_listing_and_its_failure() {
    use cmux_edge::registry::{CachePolicy, ProxmoxSettings, ProxmoxSource, Registry};
    let source = |addr: SocketAddr| {
        Arc::new(
            ProxmoxSource::new(ProxmoxSettings {
                url: format!("http://{addr}"),
                token: TOKEN.into(),
                ca_pem: None,
                policy: CachePolicy {
                    timeout: Duration::from_secs(5),
                    cache_ttl: Duration::from_secs(30),
                    negative_ttl: Duration::from_secs(5),
                    stale_for: Duration::from_secs(300),
                    concurrency: 64,
                },
                find_stopped: false,
            })
            .unwrap(),
        )
    };
    let ids: [&'static str; 8] = ["200", "201", "202", "300", "404", "405", "406", "407"];
    let pve = fake_pve().await;
    let src = source(pve.addr);
    let lookups: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let src = src.clone();
            tokio::spawn(async move { src.lookup(id).resolve().await.map(|vm| vm.is_some()) })
        })
        .collect();
    let mut found = Vec::new();
    for l in lookups {
        found.push(l.await.unwrap().unwrap());
    }
    assert_eq!(
        found,
        [true, false, true, false, false, false, false, false]
    );
    let listings = |calls: &Calls| {
        calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.contains("cluster/resources"))
            .count()
    };
    assert_eq!(listings(&pve.calls), 1);

    // a failing listing (slow, then 500) is shared too: one call, every lookup gets the error
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .push((req.uri().to_string(), String::new()));
            tokio::time::sleep(Duration::from_millis(300)).await;
            Response::builder()
                .status(500)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
    });
    let src = source(addr);
    let started = std::time::Instant::now();
    let lookups: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let src = src.clone();
            tokio::spawn(async move { src.lookup(id).resolve().await.is_err() })
        })
        .collect();
    for l in lookups {
        assert!(l.await.unwrap(), "an unavailable PVE API is an error");
    }
    assert_eq!(listings(&calls), 1);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn over_https_the_pve_ca_file_is_the_trust_anchor() {
    let (pve, ca_pem) = fake_pve_over_tls().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pve-root-ca.pem"), ca_pem).unwrap();
    let config = dir.path().join("routes.toml");
    let write = |ca_line: &str| {
        std::fs::write(
            &config,
            format!(
                "[[domains]]\nname = \"example.com\"\n\n[registry]\nsources = [\"proxmox\"]\n\
                 pve_url = \"https://localhost:{}\"\npve_token = \"{TOKEN}\"\n{ca_line}",
                pve.addr.port()
            ),
        )
        .unwrap()
    };
    write("pve_ca = \"pve-root-ca.pem\"\n");
    let out = explain(&config, "port-8080-vm-200.example.com").await;
    assert!(
        out.contains(&format!(
            "registry:  proxmox -> {}:8080",
            support::host_ipv4()
        )),
        "{out}"
    );
    // without it the self-signed certificate is not trusted: no answer, and no call made
    pve.calls.lock().unwrap().clear();
    write("");
    let out = explain(&config, "port-8080-vm-200.example.com").await;
    assert!(out.contains("503 registry unavailable for vm 200"), "{out}");
    assert!(pve.calls.lock().unwrap().is_empty());
}

/// SPEC §10: a container's reported address is checked like any other, and never gets the
/// loopback exception: outside `[upstreams] allow` it is refused before any connection.
#[tokio::test]
async fn a_container_address_outside_upstreams_allow_is_refused() {
    support::install_crypto();
    let pve = fake_pve().await;
    // container 200 reports 10.100.0.200
    let edge = Edge::start(&format!(
        "[upstreams]\nallow = [\"10.200.0.0/16\"]\nallow_loopback = true\n\n{}",
        registry(&pve, TOKEN)
    ))
    .await;
    let r = raw(edge.http, &Edge::host(80, "200"), "GET", "/", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.text(), "upstream address not allowed: vm 200\n");
}
