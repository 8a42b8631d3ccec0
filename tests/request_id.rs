//! `X-Request-Id`: a valid one (1–128 characters of `[A-Za-z0-9._:-]`) from a trusted proxy is
//! kept; anyone else's is replaced by a fresh id. Either way the upstream gets the id and the
//! client gets it back, refusals included.

mod support;

use std::net::IpAddr;

use support::{echo_backend, raw_from, seen, Edge};

const TRUSTED: &str = "127.0.0.2";
const UNTRUSTED: &str = "127.0.0.3";

async fn setup() -> (Edge, String) {
    support::install_crypto();
    let backend = echo_backend().await;
    let edge = Edge::start(&format!(
        "[[registry.vms]]\nid = \"local\"\naddress = \"127.0.0.1\"\n\n\
         [trust]\nproxies = [\"{TRUSTED}\"]\n"
    ))
    .await;
    (edge, Edge::host(backend.port(), "local"))
}

async fn get(edge: &Edge, from: &str, host: &str, id: &str) -> support::RawResponse {
    let from: IpAddr = from.parse().unwrap();
    raw_from(
        Some(from),
        edge.http,
        host,
        "GET",
        "/",
        &[("X-Request-Id", id)],
        b"",
    )
    .await
    .unwrap()
}

fn is_generated(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn a_valid_request_id_from_a_trusted_proxy_goes_upstream_and_back() {
    let (edge, host) = setup().await;
    let id = "cf-ray:8a1b2c3d4e5f.ams_01";
    let r = get(&edge, TRUSTED, &host, id).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some(id));
    assert_eq!(seen(&r.json(), "x-request-id"), [id]);
}

#[tokio::test]
async fn a_request_id_from_an_untrusted_client_is_replaced_upstream_and_back() {
    let (edge, host) = setup().await;
    let r = get(&edge, UNTRUSTED, &host, "forged-by-the-client").await;
    assert_eq!(r.status, 200);
    let ours = r.header("x-request-id").unwrap();
    assert!(is_generated(ours), "{ours}");
    assert_eq!(seen(&r.json(), "x-request-id"), [ours]);
}

#[tokio::test]
async fn an_invalid_request_id_even_from_a_trusted_proxy_is_replaced() {
    let (edge, host) = setup().await;
    let too_long = "a".repeat(129);
    for bad in ["has space", "semi;colon", "<script>", too_long.as_str()] {
        let r = get(&edge, TRUSTED, &host, bad).await;
        assert_eq!(r.status, 200);
        let ours = r.header("x-request-id").unwrap();
        assert!(is_generated(ours), "{bad:?} -> {ours}");
        assert_eq!(seen(&r.json(), "x-request-id"), [ours]);
    }
    let longest = "a".repeat(128);
    let r = get(&edge, TRUSTED, &host, &longest).await;
    assert_eq!(r.header("x-request-id"), Some(longest.as_str()));
}

#[tokio::test]
async fn a_refusal_carries_the_trusted_request_id_too() {
    let (edge, _) = setup().await;
    let r = get(&edge, TRUSTED, "port-1-vm-nobody.edge.test", "trace-42").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-request-id"), Some("trace-42"));
    let r = get(&edge, UNTRUSTED, "port-1-vm-nobody.edge.test", "trace-42").await;
    assert_eq!(r.status, 404);
    assert!(is_generated(r.header("x-request-id").unwrap()));
}

#[path = "support/raw_h2.rs"]
mod raw_h2;

/// Over HTTP/2 the id goes out "never indexed" (RFC 7541 §6.2.3): every response's id is new,
/// so entering it into the connection's HPACK table would only push out the fields that repeat.
#[tokio::test]
async fn over_http2_the_id_is_sent_never_indexed() {
    let (edge, host) = setup().await;
    let mut c = raw_h2::Conn::open(edge.http).await;
    let request = raw_h2::block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", &host),
    ]);
    let answer = c.request(&request).await;
    let raw_h2::Answer::Headers {
        status: Some(200),
        block,
        ..
    } = answer
    else {
        panic!("no 200: {answer}");
    };
    let fields = raw_h2::representations(&block).expect("a header block that parses");
    let never = fields
        .iter()
        .filter(|f| **f == raw_h2::Representation::NeverIndexed)
        .count();
    assert_eq!(never, 1, "one never-indexed field, the id: {fields:?}");
}
