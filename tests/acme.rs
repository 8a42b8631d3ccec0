//! ACME against real peers on 127.0.0.1 (SPEC §8): Pebble as the CA, BIND 9 taking
//! TSIG-signed dynamic updates (`rfc2136`), pebble-challtestsrv driven by a hook (`exec`),
//! HTTP-01 on the edge's own HTTP listener, renewal of a short-lived certificate, and the
//! Cloudflare v4 API as a local server replaying its documented answers.

#[path = "support/acme.rs"]
mod acme_support;
mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acme_support::{addr, connect, leaf_for, wait_ready, ChallTestSrv, Daemon, Pebble};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use rustls::pki_types::CertificateDer;
use support::{echo_backend, free_port, raw, Edge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use cmux_edge::tls::dns::{txt_values, Cloudflare, DnsProvider};

/// A BIND 9 primary for `edge.test` that accepts TSIG-signed dynamic updates.
struct Bind {
    _daemon: Daemon,
    server: SocketAddr,
}

const TSIG_SECRET: &str = "c2VjcmV0LXRzaWcta2V5LWZvci1jbXV4LWVkZ2UtdGVzdHMtMzItYnl0ZXM=";

impl Bind {
    async fn start(dir: &Path) -> Bind {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let d = dir.display();
        std::fs::write(
            dir.join("edge.test.zone"),
            "$TTL 60\n\
             @ IN SOA ns.edge.test. admin.edge.test. 1 60 60 600 1\n\
             @ IN NS ns.edge.test.\n\
             ns IN A 127.0.0.1\n\
             @ IN A 127.0.0.1\n\
             * IN A 127.0.0.1\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("named.conf"),
            format!(
                "key \"cmux-edge.\" {{ algorithm hmac-sha256; secret \"{TSIG_SECRET}\"; }};\n\
                 options {{\n directory \"{d}\";\n pid-file none;\n listen-on port {port} {{ 127.0.0.1; }};\n\
                 listen-on-v6 {{ none; }};\n recursion no;\n dnssec-validation no;\n notify no;\n\
                 session-keyfile \"{d}/session.key\";\n managed-keys-directory \"{d}\";\n}};\n\
                 zone \"edge.test\" {{ type primary; file \"{d}/edge.test.zone\"; allow-update {{ key \"cmux-edge.\"; }}; }};\n"
            ),
        )
        .unwrap();
        let child = Command::new("named")
            .args(["-g", "-4", "-c"])
            .arg(dir.join("named.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("named (Debian package `bind9`) must be installed");
        let bind = Bind {
            _daemon: Daemon(child),
            server: addr(port),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while txt_values(bind.server, "edge.test.").await.is_err() {
            assert!(Instant::now() < deadline, "named did not answer on {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bind
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(edge: &Edge) -> String {
    raw(edge.admin, "127.0.0.1", "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text()
}

#[tokio::test]
async fn a_wildcard_and_apex_certificate_is_issued_by_pebble_through_tsig_updates_to_bind() {
    support::install_crypto();
    let backend = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let bind = Bind::start(&dir.path().join("bind")).await;
    let http = addr(free_port());
    let https = addr(free_port());
    let pebble = Pebble::start(&dir.path().join("pebble"), bind.server, http.port(), None);
    pebble.ready().await;
    let config = format!(
        "[[registry.vms]]\nid = \"x\"\naddress = \"127.0.0.1\"\nports = {{ 1 = {} }}\n\n\
         [tls]\ncerts_dir = \"certs\"\n\n[tls.acme]\ndirectory = \"{}\"\nca_bundle = \"{}\"\n\
         email = \"ops@edge.test\"\ndomains = [\"edge.test\", \"*.edge.test\"]\nretry_after = \"1s\"\n\
         dns = {{ provider = \"rfc2136\", server = \"{}\", key_name = \"cmux-edge.\", key_secret = \"{TSIG_SECRET}\", propagation_timeout = \"30s\" }}\n",
        backend.port(),
        pebble.directory,
        pebble.https_ca.display(),
        bind.server,
    );
    let edge = Edge::start_in(tempfile::tempdir().unwrap(), &config, http, Some(https)).await;
    wait_ready(&edge, Duration::from_secs(90)).await;

    // The chain verifies against Pebble's root, for a preview host and for the apex.
    let root = pebble.issuing_root().await;
    let leaf = leaf_for(https, "port-1-vm-x.edge.test", &root)
        .await
        .unwrap();
    assert_eq!(leaf, leaf_for(https, "edge.test", &root).await.unwrap());
    let (_, mut tls) = connect(https, "port-1-vm-x.edge.test", &root)
        .await
        .unwrap();
    let resp = http_get(&mut tls, "port-1-vm-x.edge.test", "/").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    // Keys are private, the challenge records are gone, and the order is counted.
    let certs = edge.dir.path().join("certs");
    assert_eq!(mode(&certs.join("acme-edge.test.key")), 0o600);
    let account = std::fs::read_dir(&certs)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("acme-account-"))
        .expect("account stored");
    assert_eq!(mode(&account.path()), 0o600);
    assert!(txt_values(bind.server, "_acme-challenge.edge.test.")
        .await
        .unwrap()
        .is_empty());
    let m = metrics(&edge).await;
    assert_eq!(
        metric(&m, "cmux_edge_acme_orders_total{result=\"ok\"}"),
        1.0
    );
    assert!(m.contains("cmux_edge_cert_expiry_timestamp_seconds{name=\"*.edge.test\"}"));
}

/// Sends one keep-alive HTTP/1.1 GET on an open connection and reads the whole answer.
async fn http_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

fn hook(dir: &Path, management: SocketAddr, log: &Path) -> PathBuf {
    let p = dir.join("dns-hook");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\nset -e\necho \"$1 $2\" >> {log}\n\
             case \"$1\" in\n\
             present) curl -fsS -X POST -d \"{{\\\"host\\\":\\\"$2\\\",\\\"value\\\":\\\"$3\\\"}}\" http://{management}/set-txt ;;\n\
             cleanup) curl -fsS -X POST -d \"{{\\\"host\\\":\\\"$2\\\"}}\" http://{management}/clear-txt ;;\n\
             *) echo \"unknown action $1\" >&2; exit 2 ;;\n\
             esac\n",
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[tokio::test]
async fn the_exec_hook_sets_txt_records_and_replicas_sharing_certs_dir_order_once() {
    support::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let chall = ChallTestSrv::start().await;
    let pebble = Pebble::start(&dir.path().join("pebble"), chall.dns, free_port(), None);
    pebble.ready().await;
    let log = dir.path().join("hook.log");
    let hook = hook(dir.path(), chall.management, &log);
    let certs = dir.path().join("shared-certs");
    let config = format!(
        "[tls]\ncerts_dir = \"{}\"\n\n[tls.acme]\ndirectory = \"{}\"\nca_bundle = \"{}\"\n\
         domains = [\"edge.test\", \"*.edge.test\"]\nretry_after = \"1s\"\n\
         dns = {{ provider = \"exec\", command = \"{}\", resolvers = [\"{}\"], propagation_timeout = \"30s\" }}\n",
        certs.display(),
        pebble.directory,
        pebble.https_ca.display(),
        hook.display(),
        chall.dns,
    );
    // Two replicas on one certs_dir, as on a shared volume.
    let (https_a, https_b) = (addr(free_port()), addr(free_port()));
    let a = Edge::start_in(
        tempfile::tempdir().unwrap(),
        &config,
        addr(free_port()),
        Some(https_a),
    );
    let b = Edge::start_in(
        tempfile::tempdir().unwrap(),
        &config,
        addr(free_port()),
        Some(https_b),
    );
    let (a, b) = tokio::join!(a, b);
    wait_ready(&a, Duration::from_secs(90)).await;
    wait_ready(&b, Duration::from_secs(90)).await;

    let root = pebble.issuing_root().await;
    let leaf_a = leaf_for(https_a, "port-5173-vm-y.edge.test", &root)
        .await
        .unwrap();
    let leaf_b = leaf_for(https_b, "port-5173-vm-y.edge.test", &root)
        .await
        .unwrap();
    assert_eq!(
        leaf_a, leaf_b,
        "the second replica serves the first one's certificate"
    );
    let calls = std::fs::read_to_string(&log).unwrap();
    let presents = calls.lines().filter(|l| l.starts_with("present ")).count();
    assert_eq!(
        presents, 2,
        "one order (apex + wildcard), not one per replica:\n{calls}"
    );
    assert!(
        calls.contains("present _acme-challenge.edge.test."),
        "{calls}"
    );
    assert!(
        calls.contains("cleanup _acme-challenge.edge.test."),
        "{calls}"
    );
    assert!(!certs.join(".acme.lock").exists(), "the lock is released");
}

/// A CA that requires external account binding, as ZeroSSL and Google do.
const EAB_KID: &str = "kid-1";
const EAB_KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";

#[tokio::test]
async fn http01_is_answered_on_the_http_listener_even_with_https_redirects_and_eab() {
    support::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let chall = ChallTestSrv::start().await;
    let http = addr(free_port());
    let https = addr(free_port());
    let pebble = Pebble::start_with(
        &dir.path().join("pebble"),
        chall.dns,
        http.port(),
        None,
        Some((EAB_KID, EAB_KEY)),
    );
    pebble.ready().await;
    let config = format!(
        "[trust]\nproxies = [\"127.0.0.1\"]\n\n\
         [tls]\ncerts_dir = \"certs\"\nredirect_http = true\n\n[tls.acme]\ndirectory = \"{}\"\n\
         ca_bundle = \"{}\"\ndomains = [\"www.edge.test\"]\nretry_after = \"1s\"\n\
         eab = {{ kid = \"{EAB_KID}\", hmac_key = \"{EAB_KEY}\" }}\n",
        pebble.directory,
        pebble.https_ca.display(),
    );
    let edge = Edge::start_in(tempfile::tempdir().unwrap(), &config, http, Some(https)).await;
    wait_ready(&edge, Duration::from_secs(90)).await;
    let root = pebble.issuing_root().await;
    leaf_for(https, "www.edge.test", &root).await.unwrap();

    // Everything else on plain HTTP is sent to HTTPS, path and query kept.
    let r = raw(http, "port-1-vm-x.edge.test", "GET", "/a/b?c=d", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some(format!("https://port-1-vm-x.edge.test:{}/a/b?c=d", https.port()).as_str())
    );
    // A trusted proxy that terminated TLS itself is not sent round in circles.
    let r = raw(
        http,
        "port-1-vm-x.edge.test",
        "GET",
        "/",
        &[("X-Forwarded-Proto", "https")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404, "routed (to an unknown VM), not redirected");
    // An unknown token is a plain 404, not a redirect.
    let r = raw(
        http,
        "www.edge.test",
        "GET",
        "/.well-known/acme-challenge/nope",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn a_short_lived_certificate_is_renewed_and_open_connections_keep_working() {
    support::install_crypto();
    let backend = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let chall = ChallTestSrv::start().await;
    let pebble = Pebble::start(&dir.path().join("pebble"), chall.dns, free_port(), Some(40));
    pebble.ready().await;
    let log = dir.path().join("hook.log");
    let hook = hook(dir.path(), chall.management, &log);
    let http = addr(free_port());
    let https = addr(free_port());
    let config = format!(
        "[[registry.vms]]\nid = \"x\"\naddress = \"127.0.0.1\"\nports = {{ 1 = {} }}\n\n\
         [tls]\ncerts_dir = \"certs\"\n\n[tls.acme]\ndirectory = \"{}\"\nca_bundle = \"{}\"\n\
         domains = [\"*.edge.test\"]\nrenew_before = \"30s\"\nretry_after = \"1s\"\n\
         dns = {{ provider = \"exec\", command = \"{}\", resolvers = [\"{}\"], propagation_timeout = \"30s\" }}\n",
        backend.port(),
        pebble.directory,
        pebble.https_ca.display(),
        hook.display(),
        chall.dns,
    );
    let edge = Edge::start_in(tempfile::tempdir().unwrap(), &config, http, Some(https)).await;
    wait_ready(&edge, Duration::from_secs(90)).await;
    let root = pebble.issuing_root().await;
    let host = "port-1-vm-x.edge.test";
    let (first, mut open) = connect(https, host, &root).await.unwrap();
    assert!(http_get(&mut open, host, "/before")
        .await
        .starts_with("HTTP/1.1 200"));

    // 40 s certificates renewed 30 s before expiry: a new one within ~10 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let renewed = loop {
        let leaf = leaf_for(https, host, &root).await.unwrap();
        if leaf != first {
            break leaf;
        }
        assert!(Instant::now() < deadline, "the certificate was not renewed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_ne!(serial(&renewed), serial(&first));
    // The connection opened on the old certificate still carries requests.
    assert!(http_get(&mut open, host, "/after")
        .await
        .starts_with("HTTP/1.1 200"));
}

fn serial(der: &CertificateDer<'_>) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    cert.raw_serial().to_vec()
}

/// What the fake Cloudflare API saw: method, path and query, Authorization, body.
type Calls = Arc<Mutex<Vec<(String, String, String, String)>>>;

/// Replays Cloudflare v4 answers in their documented shapes (`success`, `errors`,
/// `messages`, `result`, `result_info`).
async fn fake_cloudflare(token: &'static str) -> (SocketAddr, Calls) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
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
            seen.lock().unwrap().push((
                method.clone(),
                pq.clone(),
                auth.clone(),
                String::from_utf8_lossy(&body).into_owned(),
            ));
            const ZONE: &str = "023e105f4ecef8ad9ca31a8372d0c353";
            const REC: &str = "372e67954025e0ba6aaa6d586b9e0b59";
            let ok = |result: serde_json::Value| serde_json::json!({"success": true, "errors": [], "messages": [], "result": result});
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
            } else if method == "POST" && pq == format!("/client/v4/zones/{ZONE}/dns_records") {
                let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let mut rec = sent.clone();
                rec["id"] = REC.into();
                rec["proxied"] = false.into();
                (200, ok(rec))
            } else if method == "GET"
                && pq.starts_with(&format!("/client/v4/zones/{ZONE}/dns_records?type=TXT"))
            {
                (200, ok(serde_json::json!([{"id": REC, "type": "TXT"}])))
            } else if method == "DELETE"
                && pq == format!("/client/v4/zones/{ZONE}/dns_records/{REC}")
            {
                (200, ok(serde_json::json!({"id": REC})))
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
async fn the_cloudflare_provider_finds_the_zone_then_adds_and_removes_one_txt_value() {
    let (api, calls) = fake_cloudflare("cf-token").await;
    let cf = Cloudflare::new(
        format!("http://{api}/client/v4"),
        "cf-token".into(),
        None,
        60,
    );
    let fqdn = "_acme-challenge.sub.edge.test.";
    cf.present(fqdn, "abc=def").await.unwrap();
    cf.cleanup(fqdn, "abc=def").await.unwrap();
    let calls = calls.lock().unwrap().clone();
    let seq: Vec<(String, String)> = calls.iter().map(|c| (c.0.clone(), c.1.clone())).collect();
    let z = "/client/v4/zones/023e105f4ecef8ad9ca31a8372d0c353";
    assert_eq!(
        seq,
        [
            ("GET".into(), "/client/v4/zones?name=sub.edge.test".into()),
            ("GET".into(), "/client/v4/zones?name=edge.test".into()),
            ("POST".into(), format!("{z}/dns_records")),
            ("GET".into(), "/client/v4/zones?name=sub.edge.test".into()),
            ("GET".into(), "/client/v4/zones?name=edge.test".into()),
            (
                "GET".into(),
                format!(
                    "{z}/dns_records?type=TXT&name=_acme-challenge.sub.edge.test&content=abc%3Ddef"
                )
            ),
            (
                "DELETE".into(),
                format!("{z}/dns_records/372e67954025e0ba6aaa6d586b9e0b59")
            ),
        ]
    );
    assert!(calls.iter().all(|c| c.2 == "Bearer cf-token"));
    let created: serde_json::Value = serde_json::from_str(&calls[2].3).unwrap();
    assert_eq!(
        created,
        serde_json::json!({"type": "TXT", "name": "_acme-challenge.sub.edge.test", "content": "abc=def", "ttl": 60})
    );

    // A wrong token is reported with Cloudflare's own words.
    let bad = Cloudflare::new(format!("http://{api}/client/v4"), "wrong".into(), None, 60);
    let e = bad.present(fqdn, "v").await.unwrap_err().to_string();
    assert!(e.contains("Authentication error (10000)"), "{e}");
}
