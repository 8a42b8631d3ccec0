//! Layered registry sources (SPEC §2 `[registry]`): "Sources can be layered — first answer
//! wins". `sources = [...]` gives the order; `source = X` keeps admin and static in front.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use support::{raw, Edge};
use tokio::net::TcpListener;

const TOKEN: &str = "layer-token-0123456789abcdef012345";

/// A backend that answers every request with its own name, so a test sees who served it.
async fn named_backend(name: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    support::spawn_http(
        listener,
        move |_req: Request<hyper::body::Incoming>| async move {
            Response::new(Full::new(Bytes::from_static(name.as_bytes())))
        },
    );
    port
}

/// Who answers `port-80-vm-<id>`: the body of the backend the chosen VM maps port 80 to.
async fn served_by(edge: &Edge, id: &str) -> String {
    let r = raw(edge.http, &Edge::host(80, id), "GET", "/", &[], b"")
        .await
        .unwrap();
    if r.status == 200 {
        r.text()
    } else {
        format!("{} {}", r.status, r.text().trim_end())
    }
}

async fn register(edge: &Edge, id: &str, port80: u16) {
    let body = format!(r#"{{"address": "127.0.0.1", "ports": {{"80": {port80}}}}}"#);
    let auth = format!("Bearer {TOKEN}");
    let r = raw(
        edge.admin,
        "127.0.0.1",
        "PUT",
        &format!("/api/vms/{id}"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
}

/// A static `dup` and `only-static` VM, plus an admin-registered `dup` and `only-admin`.
async fn edge_with(registry: &str) -> Edge {
    let from_static = named_backend("static").await;
    let from_admin = named_backend("admin").await;
    let edge = Edge::start(&format!(
        "[admin]\ntoken = \"{TOKEN}\"\n\n[registry]\n{registry}\n\
         [[registry.vms]]\nid = \"dup\"\naddress = \"127.0.0.1\"\nports = {{ 80 = {from_static} }}\n\n\
         [[registry.vms]]\nid = \"only-static\"\naddress = \"127.0.0.1\"\nports = {{ 80 = {from_static} }}\n"
    ))
    .await;
    register(&edge, "dup", from_admin).await;
    register(&edge, "only-admin", from_admin).await;
    edge
}

#[tokio::test]
async fn the_first_source_that_knows_the_id_answers_in_the_listed_order() {
    support::install_crypto();
    let edge = edge_with("sources = [\"admin\", \"static\"]").await;
    assert_eq!(served_by(&edge, "dup").await, "admin");
    assert_eq!(served_by(&edge, "only-static").await, "static");
    assert_eq!(served_by(&edge, "only-admin").await, "admin");
    assert_eq!(served_by(&edge, "nobody").await, "404 unknown vm nobody");

    let edge = edge_with("sources = [\"static\", \"admin\"]").await;
    assert_eq!(served_by(&edge, "dup").await, "static");
    assert_eq!(served_by(&edge, "only-static").await, "static");
    assert_eq!(served_by(&edge, "only-admin").await, "admin");
}

#[tokio::test]
async fn source_alone_keeps_admin_registrations_in_front() {
    support::install_crypto();
    let edge = edge_with("source = \"static\"").await;
    assert_eq!(served_by(&edge, "dup").await, "admin");
    assert_eq!(served_by(&edge, "only-static").await, "static");
}

#[tokio::test]
async fn a_source_left_out_of_sources_is_not_asked() {
    support::install_crypto();
    let from_admin = named_backend("admin").await;
    let edge = Edge::start(&format!(
        "[admin]\ntoken = \"{TOKEN}\"\n\n[registry]\nsources = [\"template\"]\ntemplate = \"127.0.0.{{id}}\"\n"
    ))
    .await;
    // stored (the API answers 201) but never routed: the template answers instead
    register(&edge, "7", from_admin).await;
    // (nothing listens on 127.0.0.7:80)
    assert_eq!(
        served_by(&edge, "7").await,
        "502 upstream unreachable: vm 7 port 80"
    );
    assert_eq!(
        served_by(&edge, "not-an-ip").await,
        "404 unknown vm not-an-ip"
    );
}

struct ControlPlane {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

/// Knows `dup` and `only-cp`, both with port 80 published on `port80`.
async fn control_plane(port80: u16) -> ControlPlane {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    support::spawn_http(listener, move |req: Request<hyper::body::Incoming>| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            match req.uri().path() {
                "/vms/dup" | "/vms/only-cp" => Response::new(Full::new(Bytes::from(format!(
                    r#"{{"address": "127.0.0.1", "ports": {{"80": {port80}}}}}"#
                )))),
                _ => Response::builder()
                    .status(404)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            }
        }
    });
    ControlPlane { addr, hits }
}

async fn edge_over_http(order: &str, cp: &ControlPlane) -> Edge {
    let from_admin = named_backend("admin").await;
    let edge = Edge::start(&format!(
        "[admin]\ntoken = \"{TOKEN}\"\n\n[registry]\nsources = {order}\n\
         url = \"http://{}/vms/{{id}}\"\n",
        cp.addr
    ))
    .await;
    register(&edge, "dup", from_admin).await;
    register(&edge, "only-admin", from_admin).await;
    edge
}

#[tokio::test]
async fn admin_before_http_answers_without_asking_the_control_plane() {
    support::install_crypto();
    let cp = control_plane(named_backend("control-plane").await).await;
    let edge = edge_over_http(r#"["admin", "http"]"#, &cp).await;
    assert_eq!(served_by(&edge, "dup").await, "admin");
    assert_eq!(served_by(&edge, "only-admin").await, "admin");
    assert_eq!(cp.hits.load(Ordering::SeqCst), 0);
    assert_eq!(served_by(&edge, "only-cp").await, "control-plane");
    assert_eq!(cp.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn http_before_admin_lets_the_control_plane_win() {
    support::install_crypto();
    let cp = control_plane(named_backend("control-plane").await).await;
    let edge = edge_over_http(r#"["http", "admin"]"#, &cp).await;
    assert_eq!(served_by(&edge, "dup").await, "control-plane");
    // the control plane's 404 is not the last word: the next source is asked
    assert_eq!(served_by(&edge, "only-admin").await, "admin");
    assert_eq!(cp.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_control_plane_outage_does_not_hide_the_sources_after_it() {
    support::install_crypto();
    // a control plane that fails every call
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    support::spawn_http(listener, |_req: Request<hyper::body::Incoming>| async {
        Response::builder()
            .status(503)
            .body(Full::new(Bytes::new()))
            .unwrap()
    });
    let cp = ControlPlane {
        addr,
        hits: Arc::default(),
    };
    let edge = edge_over_http(r#"["http", "admin"]"#, &cp).await;
    assert_eq!(served_by(&edge, "only-admin").await, "admin");
    // nobody knows it and one source failed: that is not a 404
    assert_eq!(
        served_by(&edge, "nobody").await,
        "503 registry unavailable for vm nobody"
    );
}
