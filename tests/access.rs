//! Preview access control (SPEC §12) against the real binary: tokens signed as a control
//! plane would (the `jsonwebtoken` crate, HS256 and EdDSA), the exchange into the edge's
//! session cookie over HTTP and HTTPS, what the VM receives (the echo backend reports it),
//! revocation through the admin API, key rotation by reload, WebSockets, and the
//! `cmux-edge token` command. Every config states the `[[policy]]` keys it relies on.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{echo_backend, raw, seen, ws_backend, Edge, RawResponse, DOMAIN};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const K1: &str = "k1-secret-0123456789abcdef0123456789";
const K2: &str = "k2-secret-abcdef0123456789abcdef0123";
const COOKIE: &str = "cmux_edge_session";

/// Every policy key the tests rely on, stated; `access` per test.
fn policy(access: &str) -> String {
    format!(
        "[[policy]]\nport = \"*\"\naccess = \"{access}\"\ncors = \"passthrough\"\nembed = false\n\
         inject_shim = false\nrewrite_redirects = false\n"
    )
}

fn vms() -> &'static str {
    "[[registry.vms]]\nid = \"a\"\naddress = \"127.0.0.1\"\n\n\
     [[registry.vms]]\nid = \"b\"\naddress = \"127.0.0.1\"\n"
}

fn access_section(keys: &str) -> String {
    format!("[access]\nkeys = [ {keys} ]\nsession = \"12h\"\ncookie = \"{COOKIE}\"\n")
}

fn k1() -> String {
    format!("{{ id = \"k1\", secret = \"{K1}\" }}")
}

async fn private_edge() -> (Edge, u16) {
    support::install_crypto();
    let backend = echo_backend().await;
    let edge = Edge::start(&format!(
        "{}{}{}",
        access_section(&k1()),
        policy("token"),
        vms()
    ))
    .await;
    (edge, backend.port())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(kid: &str, secret: &[u8], claims: &Value) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, &EncodingKey::from_secret(secret).unwrap()).unwrap()
}

fn claims(vm: &str, ports: Value) -> Value {
    json!({ "vm": vm, "ports": ports, "exp": now() + 60, "iat": now() })
}

fn token(vm: &str, port: u16) -> String {
    hs256("k1", K1.as_bytes(), &claims(vm, json!([port])))
}

async fn get(edge: &Edge, host: &str, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    raw(edge.http, host, "GET", path, headers, b"")
        .await
        .unwrap()
}

fn assert_denied(r: &RawResponse, reason: &str) {
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.text(), format!("preview access denied: {reason}\n"));
}

/// The session cookie's `name=value` from a 302's Set-Cookie.
fn session_pair(r: &RawResponse) -> String {
    let set = r.header("set-cookie").expect("Set-Cookie");
    set.split(';').next().unwrap().to_owned()
}

/// Exchanges a token for `vm`/`port` and returns the cookie pair.
async fn exchange(edge: &Edge, vm: &str, port: u16) -> String {
    let t = token(vm, port);
    let r = get(
        edge,
        &Edge::host(port, vm),
        &format!("/?cmux_token={t}"),
        &[],
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.text());
    session_pair(&r)
}

async fn metric(edge: &Edge, series: &str) -> f64 {
    let m = raw(edge.admin, "127.0.0.1", "GET", "/metrics", &[], b"")
        .await
        .unwrap()
        .text();
    m.lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0.0)
}

async fn wait_metric(edge: &Edge, series: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(edge, series).await < at_least {
        assert!(
            Instant::now() < deadline,
            "{series} never reached {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_request_without_a_token_or_session_is_refused_401_missing() {
    let (edge, port) = private_edge().await;
    let r = get(&edge, &Edge::host(port, "a"), "/", &[]).await;
    assert_denied(&r, "missing");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        r.header("www-authenticate"),
        Some("Cmux-Token realm=\"preview\"")
    );
    // a browser navigation gets the same 401 as a small page
    let r = get(
        &edge,
        &Edge::host(port, "a"),
        "/",
        &[("Sec-Fetch-Mode", "navigate"), ("Accept", "text/html")],
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(
        r.text().contains("preview access denied: missing"),
        "{}",
        r.text()
    );
    assert_eq!(
        metric(&edge, "cmux_edge_access_total{outcome=\"missing\"}").await,
        2.0
    );
    assert_eq!(
        metric(&edge, "cmux_edge_refusals_total{reason=\"access_denied\"}").await,
        2.0
    );
}

#[tokio::test]
async fn an_expired_token_is_refused_and_up_to_60_seconds_of_skew_is_accepted() {
    let (edge, port) = private_edge().await;
    let host = Edge::host(port, "a");
    let with_exp = |exp: u64| {
        hs256(
            "k1",
            K1.as_bytes(),
            &json!({ "vm": "a", "ports": [port], "exp": exp }),
        )
    };
    let r = get(
        &edge,
        &host,
        "/",
        &[("X-Cmux-Token", &with_exp(now() - 30))],
    )
    .await;
    assert_eq!(r.status, 200, "within the leeway: {}", r.text());
    let r = get(
        &edge,
        &host,
        "/",
        &[("X-Cmux-Token", &with_exp(now() - 120))],
    )
    .await;
    assert_denied(&r, "expired");
    let r = get(
        &edge,
        &host,
        &format!("/?cmux_token={}", with_exp(now() - 120)),
        &[],
    )
    .await;
    assert_denied(&r, "expired");
}

#[tokio::test]
async fn a_token_whose_nbf_is_in_the_future_is_refused() {
    let (edge, port) = private_edge().await;
    let host = Edge::host(port, "a");
    let with_nbf = |nbf: u64| {
        hs256(
            "k1",
            K1.as_bytes(),
            &json!({ "vm": "a", "ports": [port], "exp": now() + 600, "nbf": nbf }),
        )
    };
    let r = get(
        &edge,
        &host,
        "/",
        &[("X-Cmux-Token", &with_nbf(now() + 300))],
    )
    .await;
    assert_denied(&r, "expired");
    // a control plane whose clock runs 30 s ahead is fine
    let r = get(
        &edge,
        &host,
        "/",
        &[("X-Cmux-Token", &with_nbf(now() + 30))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn a_token_for_another_vm_or_another_port_is_refused() {
    let (edge, port) = private_edge().await;
    let host = Edge::host(port, "a");
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &token("b", port))]).await;
    assert_denied(&r, "wrong vm");
    let r = get(
        &edge,
        &host,
        "/",
        &[("X-Cmux-Token", &token("a", port + 1))],
    )
    .await;
    assert_denied(&r, "wrong port");
}

#[tokio::test]
async fn a_star_token_opens_every_port_of_its_vm_only() {
    let (edge, port) = private_edge().await;
    let other = echo_backend().await.port();
    let star = hs256("k1", K1.as_bytes(), &claims("a", json!("*")));
    for p in [port, other] {
        let r = get(&edge, &Edge::host(p, "a"), "/", &[("X-Cmux-Token", &star)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = get(
        &edge,
        &Edge::host(port, "b"),
        "/",
        &[("X-Cmux-Token", &star)],
    )
    .await;
    assert_denied(&r, "wrong vm");
    // and a session from a "*" token is good on the VM's other ports too
    let r = get(
        &edge,
        &Edge::host(port, "a"),
        &format!("/?cmux_token={star}"),
        &[],
    )
    .await;
    let pair = session_pair(&r);
    let r = get(&edge, &Edge::host(other, "a"), "/", &[("Cookie", &pair)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn a_bad_signature_alg_none_and_an_unknown_kid_are_refused_as_bad_signature() {
    let (edge, port) = private_edge().await;
    let host = Edge::host(port, "a");
    let c = claims("a", json!([port]));
    let wrong_secret = hs256("k1", b"not-the-configured-secret-at-all-0123", &c);
    let unknown_kid = hs256("k9", K1.as_bytes(), &c);
    let no_kid = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(K1.as_bytes()).unwrap(),
    )
    .unwrap();
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({ "alg": "none", "typ": "JWT", "kid": "k1" })),
        b64(&c)
    );
    let valid = token("a", port);
    let tampered = {
        let parts: Vec<&str> = valid.split('.').collect();
        let mut other = c.clone();
        other["ports"] = json!("*");
        format!("{}.{}.{}", parts[0], b64(&other), parts[2])
    };
    for (what, t) in [
        ("wrong secret", wrong_secret),
        ("unknown kid", unknown_kid),
        ("no kid", no_kid),
        ("alg none", alg_none),
        ("tampered claims", tampered),
        ("garbage", "not.a.jwt".to_owned()),
    ] {
        let r = get(&edge, &host, "/", &[("X-Cmux-Token", &t)]).await;
        assert_eq!(r.status, 401, "{what}");
        assert_denied(&r, "bad signature");
        let r = get(&edge, &host, &format!("/?cmux_token={t}"), &[]).await;
        assert_denied(&r, "bad signature");
    }
}

#[tokio::test]
async fn an_algorithm_other_than_the_key_ids_own_is_refused() {
    support::install_crypto();
    let backend = echo_backend().await;
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let public_pem = ed.public_key_pem();
    let private_pem = ed.serialize_pem();
    let pem_for_edge = public_pem.clone();
    let edge = Edge::start_with(
        &format!(
            "{}{}{}",
            access_section(&format!(
                "{}, {{ id = \"k2\", public_key = \"k2.pem\" }}",
                k1()
            )),
            policy("token"),
            vms()
        ),
        false,
        move |dir| std::fs::write(dir.join("k2.pem"), pem_for_edge).unwrap(),
    )
    .await;
    let port = backend.port();
    let host = Edge::host(port, "a");
    let c = claims("a", json!([port]));
    let eddsa = |kid: &str| {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(
            &h,
            &c,
            &EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    // the Ed25519 key works for EdDSA
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &eddsa("k2"))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // an EdDSA token on the HS256 key id
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &eddsa("k1"))]).await;
    assert_denied(&r, "bad signature");
    // an HS256 token on the Ed25519 key id, "signed" with the public key as the HMAC secret
    let confused = hs256("k2", public_pem.as_bytes(), &c);
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &confused)]).await;
    assert_denied(&r, "bad signature");
}

#[tokio::test]
async fn the_exchange_answers_302_to_the_same_url_without_the_token_keeping_other_parameters() {
    let (edge, port) = private_edge().await;
    let host = Edge::host(port, "a");
    let t = token("a", port);
    let r = get(
        &edge,
        &host,
        &format!("/app/page?x=1&cmux_token={t}&y=two&z"),
        &[],
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(r.header("location"), Some("/app/page?x=1&y=two&z"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let pair = session_pair(&r);
    assert!(pair.starts_with(&format!("{COOKIE}=")), "{pair}");
    assert!(
        !pair.contains(&t),
        "the session is not the control plane's token"
    );
    // following it with the cookie reaches the VM
    let r = get(&edge, &host, "/app/page?x=1&y=two&z", &[("Cookie", &pair)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/app/page");
    assert_eq!(r.json()["query"], "x=1&y=two&z");
    assert_eq!(
        metric(&edge, "cmux_edge_access_total{outcome=\"exchange\"}").await,
        1.0
    );
    assert_eq!(
        metric(&edge, "cmux_edge_access_total{outcome=\"session\"}").await,
        1.0
    );
}

fn attributes(set_cookie: &str) -> Vec<String> {
    set_cookie
        .split(';')
        .skip(1)
        .map(|a| a.trim().to_ascii_lowercase())
        .collect()
}

#[tokio::test]
async fn over_plain_http_the_cookie_is_secure_httponly_host_only_lax_except_on_localhost() {
    let (edge, port) = private_edge().await;
    let t = token("a", port);
    let r = get(
        &edge,
        &Edge::host(port, "a"),
        &format!("/?cmux_token={t}"),
        &[],
    )
    .await;
    let set = r.header("set-cookie").unwrap().to_owned();
    assert!(set.starts_with(&format!("{COOKIE}=")), "{set}");
    let attrs = attributes(&set);
    for a in [
        "secure",
        "httponly",
        "path=/",
        "samesite=lax",
        "max-age=43200",
    ] {
        assert!(attrs.iter().any(|x| x == a), "{a} missing in {set}");
    }
    assert!(!attrs.iter().any(|x| x.starts_with("domain")), "{set}");
    assert!(!attrs.iter().any(|x| x == "partitioned"), "{set}");

    // with cmux_embed=1: SameSite=None; Secure; Partitioned, and the parameter goes too
    let r = get(
        &edge,
        &Edge::host(port, "a"),
        &format!("/p?cmux_embed=1&cmux_token={t}&q=1"),
        &[],
    )
    .await;
    assert_eq!(r.header("location"), Some("/p?q=1"));
    let attrs = attributes(r.header("set-cookie").unwrap());
    for a in [
        "secure",
        "httponly",
        "path=/",
        "samesite=none",
        "partitioned",
    ] {
        assert!(attrs.iter().any(|x| x == a), "{a} missing in {attrs:?}");
    }

    // plain-HTTP localhost development: no Secure, or the browser would drop it
    let local = Edge::start(&format!(
        "[[domains]]\nname = \"localhost\"\n\n{}{}{}",
        access_section(&k1()),
        policy("token"),
        vms()
    ))
    .await;
    let r = get(
        &local,
        &format!("port-{port}-vm-a.localhost"),
        &format!("/?cmux_token={t}"),
        &[],
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.text());
    let attrs = attributes(r.header("set-cookie").unwrap());
    assert!(!attrs.iter().any(|x| x == "secure"), "{attrs:?}");
    assert!(attrs.iter().any(|x| x == "httponly"), "{attrs:?}");
    assert!(attrs.iter().any(|x| x == "samesite=lax"), "{attrs:?}");
}

/// A self-signed certificate for `*.edge.test` in `dir/certs`.
fn write_cert(dir: &std::path::Path) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![format!("*.{DOMAIN}")]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("wild.crt"), cert.pem()).unwrap();
    std::fs::write(certs.join("wild.key"), key.serialize_pem()).unwrap();
}

async fn tls_edge(config: &str) -> Edge {
    support::install_crypto();
    Edge::start_with(
        &format!("{config}[tls]\ncerts_dir = \"certs\"\n"),
        true,
        write_cert,
    )
    .await
}

fn https_client(edge: &Edge, host: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .resolve(host, edge.https.unwrap())
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

#[tokio::test]
async fn over_https_the_cookie_is_host_prefixed_and_works() {
    let backend = echo_backend().await;
    let port = backend.port();
    let edge = tls_edge(&format!(
        "{}{}{}",
        access_section(&k1()),
        policy("token"),
        vms()
    ))
    .await;
    let host = Edge::host(port, "a");
    let https = edge.https.unwrap().port();
    let client = https_client(&edge, &host);
    let url = format!("https://{host}:{https}/x?cmux_token={}", token("a", port));
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "/x");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.starts_with(&format!("__Host-{COOKIE}=")), "{set}");
    let attrs = attributes(&set);
    for a in ["secure", "httponly", "path=/", "samesite=lax"] {
        assert!(attrs.iter().any(|x| x == a), "{a} missing in {set}");
    }
    assert!(!attrs.iter().any(|x| x.starts_with("domain")), "{set}");
    let pair = set.split(';').next().unwrap().to_owned();
    let r = client
        .get(format!("https://{host}:{https}/x"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert!(seen(&body, "cookie").is_empty(), "{body}");
    // the unprefixed name means nothing over HTTPS (a sibling could have planted it)
    let plain = pair.replacen("__Host-", "", 1);
    let r = client
        .get(format!("https://{host}:{https}/x"))
        .header("cookie", &plain)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_session_is_host_only_another_vm_or_port_refuses_it() {
    let (edge, port) = private_edge().await;
    let other = echo_backend().await.port();
    let pair = exchange(&edge, "a", port).await;
    let r = get(&edge, &Edge::host(port, "a"), "/", &[("Cookie", &pair)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&edge, &Edge::host(port, "b"), "/", &[("Cookie", &pair)]).await;
    assert_denied(&r, "wrong vm");
    let r = get(&edge, &Edge::host(other, "a"), "/", &[("Cookie", &pair)]).await;
    assert_denied(&r, "wrong port");
    // a forged value
    let forged = format!("{}x", &pair[..pair.len() - 1]);
    let r = get(&edge, &Edge::host(port, "a"), "/", &[("Cookie", &forged)]).await;
    assert_denied(&r, "bad signature");
}

#[tokio::test]
async fn automation_sends_the_token_in_x_cmux_token_and_gets_no_cookie() {
    let (edge, port) = private_edge().await;
    let r = get(
        &edge,
        &Edge::host(port, "a"),
        "/api?k=v",
        &[("X-Cmux-Token", &token("a", port))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("set-cookie").is_none());
    let body = r.json();
    assert_eq!(body["query"], "k=v");
    assert!(seen(&body, "x-cmux-token").is_empty(), "{body}");
    assert_eq!(
        metric(&edge, "cmux_edge_access_total{outcome=\"header\"}").await,
        1.0
    );
}

#[tokio::test]
async fn the_edge_credentials_never_reach_the_vm_while_its_own_authorization_and_cookies_do() {
    let (edge, port) = private_edge().await;
    let pair = exchange(&edge, "a", port).await;
    let cookie = format!("app=1; {pair}; theme=\"dark\";lang=fr");
    let r = get(
        &edge,
        &Edge::host(port, "a"),
        "/",
        &[
            ("Cookie", &cookie),
            ("Authorization", "Bearer the-vm-own-token"),
            ("X-Cmux-Token", "leftover"),
        ],
    )
    .await;
    // a cookie and a (bad) header token: the header is checked first
    assert_denied(&r, "bad signature");
    let r = get(
        &edge,
        &Edge::host(port, "a"),
        "/?cmux_embedx=1",
        &[
            ("Cookie", &cookie),
            ("Authorization", "Bearer the-vm-own-token"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(seen(&body, "cookie"), ["app=1; theme=\"dark\";lang=fr"]);
    assert_eq!(seen(&body, "authorization"), ["Bearer the-vm-own-token"]);
    assert_eq!(body["query"], "cmux_embedx=1");
    // with the header path, the token header is gone too, and the VM's cookies are whole
    let r = get(
        &edge,
        &Edge::host(port, "a"),
        "/",
        &[("Cookie", "app=1"), ("X-Cmux-Token", &token("a", port))],
    )
    .await;
    let body = r.json();
    assert!(seen(&body, "x-cmux-token").is_empty(), "{body}");
    assert_eq!(seen(&body, "cookie"), ["app=1"]);
}

#[tokio::test]
async fn a_public_port_needs_no_token_and_still_strips_the_edge_parameters() {
    support::install_crypto();
    let open = echo_backend().await.port();
    let closed = echo_backend().await.port();
    let edge = Edge::start(&format!(
        "{}{}[[policy]]\nport = {open}\naccess = \"public\"\n{}",
        access_section(&k1()),
        policy("token"),
        vms()
    ))
    .await;
    let r = get(&edge, &Edge::host(open, "a"), "/?a=1&cmux_token=x.y.z", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["query"], "a=1");
    let r = get(&edge, &Edge::host(closed, "a"), "/", &[]).await;
    assert_denied(&r, "missing");
    assert_eq!(
        metric(&edge, "cmux_edge_access_total{outcome=\"public\"}").await,
        1.0
    );
}

#[tokio::test]
async fn without_an_access_section_every_port_is_public_as_before() {
    support::install_crypto();
    let port = echo_backend().await.port();
    let edge = Edge::start(&format!(
        "[[policy]]\nport = \"*\"\ncors = \"passthrough\"\nembed = false\ninject_shim = false\n{}",
        vms()
    ))
    .await;
    let r = get(&edge, &Edge::host(port, "a"), "/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn key_rotation_by_reload_accepts_the_new_key_and_drops_the_removed_one() {
    let (edge, port) = private_edge().await;
    let host = Edge::host(port, "a");
    let by_k2 = hs256("k2", K2.as_bytes(), &claims("a", json!([port])));
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &by_k2)]).await;
    assert_denied(&r, "bad signature");

    let cfg = std::fs::read_to_string(edge.config_path()).unwrap();
    let both = format!("{}, {{ id = \"k2\", secret = \"{K2}\" }}", k1());
    std::fs::write(edge.config_path(), cfg.replace(&k1(), &both)).unwrap();
    edge.signal("HUP");
    wait_metric(&edge, "cmux_edge_config_reloads_total{result=\"ok\"}", 1.0).await;
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &by_k2)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &token("a", port))]).await;
    assert_eq!(r.status, 200, "both keys while they overlap: {}", r.text());

    let only_k2 = format!("{{ id = \"k2\", secret = \"{K2}\" }}");
    std::fs::write(edge.config_path(), cfg.replace(&k1(), &only_k2)).unwrap();
    edge.signal("HUP");
    wait_metric(&edge, "cmux_edge_config_reloads_total{result=\"ok\"}", 2.0).await;
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &token("a", port))]).await;
    assert_denied(&r, "bad signature");
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &by_k2)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn raising_access_epoch_through_the_admin_api_revokes_earlier_sessions_and_tokens() {
    support::install_crypto();
    let port = echo_backend().await.port();
    let edge = Edge::start(&format!(
        "[admin]\ntoken = \"admin-token-0123456789abcdef0123456789\"\n{}{}",
        access_section(&k1()),
        policy("token")
    ))
    .await;
    let put = |epoch: u64| {
        let body = format!(r#"{{"address": "127.0.0.1", "access_epoch": {epoch}}}"#);
        let admin = edge.admin;
        async move {
            let r = raw(
                admin,
                "127.0.0.1",
                "PUT",
                "/api/vms/rv",
                &[
                    (
                        "Authorization",
                        "Bearer admin-token-0123456789abcdef0123456789",
                    ),
                    ("Content-Type", "application/json"),
                ],
                body.as_bytes(),
            )
            .await
            .unwrap();
            assert!(r.status == 200 || r.status == 201, "{}", r.text());
        }
    };
    put(0).await;
    let host = Edge::host(port, "rv");
    let pair = exchange(&edge, "rv", port).await;
    let old_token = token("rv", port);
    let r = get(&edge, &host, "/", &[("Cookie", &pair)]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    put(1).await;
    let r = get(&edge, &host, "/", &[("Cookie", &pair)]).await;
    assert_denied(&r, "revoked");
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &old_token)]).await;
    assert_denied(&r, "revoked");
    // a token issued under the new epoch works, and so does its session
    let mut c = claims("rv", json!([port]));
    c["epoch"] = json!(1);
    let fresh = hs256("k1", K1.as_bytes(), &c);
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &fresh)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&edge, &host, &format!("/?cmux_token={fresh}"), &[]).await;
    let pair = session_pair(&r);
    let r = get(&edge, &host, "/", &[("Cookie", &pair)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = raw(
        edge.admin,
        "127.0.0.1",
        "GET",
        "/api/vms/rv",
        &[(
            "Authorization",
            "Bearer admin-token-0123456789abcdef0123456789",
        )],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(listed.json()["access_epoch"], 1, "{}", listed.text());
}

#[tokio::test]
async fn the_token_command_mints_a_token_a_running_edge_accepts() {
    let (edge, port) = private_edge().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
        .args(["token", "--config"])
        .arg(edge.config_path())
        .args([
            "--vm",
            "a",
            "--port",
            &port.to_string(),
            "--ttl",
            "2m",
            "--key",
            "k1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(t.split('.').count(), 3, "{t}");
    let r = get(&edge, &Edge::host(port, "a"), "/", &[("X-Cmux-Token", &t)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&edge, &Edge::host(port, "b"), "/", &[("X-Cmux-Token", &t)]).await;
    assert_denied(&r, "wrong vm");
    // an unknown key id is an error, not a token
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
        .args(["token", "--config"])
        .arg(edge.config_path())
        .args(["--vm", "a", "--key", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn a_websocket_upgrade_is_refused_before_101_without_a_token_and_tunnelled_with_one() {
    support::install_crypto();
    let (ws, seen_headers) = ws_backend().await;
    let port = ws.port();
    let edge = Edge::start(&format!(
        "{}{}{}",
        access_section(&k1()),
        policy("token"),
        vms()
    ))
    .await;
    let host = Edge::host(port, "a");
    let r = get(
        &edge,
        &host,
        "/ws",
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    .await;
    assert_denied(&r, "missing");
    assert!(
        seen_headers.lock().unwrap().is_empty(),
        "the backend was reached"
    );

    let pair = exchange(&edge, "a", port).await;
    let mut req = format!("ws://{}/ws", edge.http)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("host", host.parse().unwrap());
    req.headers_mut().insert("cookie", pair.parse().unwrap());
    let (mut conn, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    conn.send(Message::text("through")).await.unwrap();
    assert_eq!(
        conn.next().await.unwrap().unwrap(),
        Message::text("through")
    );
    let h = seen_headers.lock().unwrap().clone();
    assert!(!h.iter().any(|(k, _)| k == "cookie"), "{h:?}");
}

#[tokio::test]
async fn access_token_in_a_policy_without_an_access_section_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(
        &path,
        format!("[[domains]]\nname = \"{DOMAIN}\"\n[[policy]]\nport = \"*\"\naccess = \"token\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cmux-edge"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":5:10: policy: access = \"token\" needs an [access]"),
        "{err}"
    );
}

/// What the framed app saw, one `"<path>?<query>|<via>|<cookie>"` per request.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// The preview app: its first page reloads itself once (`location.reload()`), after the
/// exchange took the token out of the URL, so the second load carries nothing but the cookie.
async fn framed_app() -> (std::net::SocketAddr, Seen) {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Seen::default();
    let log = seen.clone();
    support::spawn_http(
        listener,
        move |req: hyper::Request<hyper::body::Incoming>| {
            let log = log.clone();
            async move {
                let h = |n: &str| {
                    req.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                };
                let via = if h("x-cmux-proxied") == "true" {
                    "edge"
                } else {
                    "direct"
                };
                let line = format!(
                    "{}?{}|{via}|{}",
                    req.uri().path(),
                    req.uri().query().unwrap_or(""),
                    h("cookie")
                );
                let mut seen = log.lock().unwrap();
                seen.push(line);
                let loads = seen.iter().filter(|s| s.starts_with("/framed?")).count();
                let script = if loads == 1 {
                    "<script>location.reload()</script>"
                } else {
                    ""
                };
                hyper::Response::builder()
                    .header("content-type", "text/html; charset=utf-8")
                    .body(Full::new(bytes::Bytes::from(format!(
                        "<!doctype html><html><body>framed load {loads}{script}</body></html>"
                    ))))
                    .unwrap()
            }
        },
    );
    (addr, seen)
}

/// The dashboard, on another site (`http://127.0.0.1:<port>/`), framing `src`.
async fn dashboard(src: String) -> std::net::SocketAddr {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    support::spawn_http(
        listener,
        move |_req: hyper::Request<hyper::body::Incoming>| {
            let src = src.clone();
            async move {
                hyper::Response::builder()
                    .header("content-type", "text/html; charset=utf-8")
                    .body(Full::new(bytes::Bytes::from(format!(
                        "<!doctype html><html><body><h1>dashboard</h1>\
                     <iframe src=\"{src}\" width=\"600\" height=\"400\"></iframe></body></html>"
                    ))))
                    .unwrap()
            }
        },
    );
    addr
}

/// Headless Chromium over the HTTPS listener (`SameSite=None` needs `Secure`), trusting the
/// self-signed test certificate. Without `cmux_embed=1` the `SameSite=Lax` cookie is not sent
/// in the cross-site frame and the first load after the 302 is already refused.
#[tokio::test]
async fn a_dashboard_on_another_site_frames_a_private_preview_which_then_reloads_on_the_cookie_alone(
) {
    let (app, seen) = framed_app().await;
    let port = app.port();
    let edge = tls_edge(&format!(
        "{}[[policy]]\nport = \"*\"\naccess = \"token\"\ncors = \"passthrough\"\nembed = true\n\
         frame_ancestors = [\"http://127.0.0.1:*\"]\ninject_shim = false\nrewrite_redirects = false\n{}",
        access_section(&k1()),
        vms()
    ))
    .await;
    let https = edge.https.unwrap().port();
    let src = format!(
        "https://{}:{https}/framed?cmux_token={}&cmux_embed=1",
        Edge::host(port, "a"),
        token("a", port)
    );
    let board = dashboard(src).await;
    let profile = tempfile::tempdir().unwrap();
    let _browser = support::chromium(
        &format!("http://127.0.0.1:{}/", board.port()),
        profile.path(),
        &[
            // the test certificate is self-signed; *.edge.test is the edge on 127.0.0.1
            "--ignore-certificate-errors",
            &format!("--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1"),
        ],
    );

    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let loads: Vec<String> = seen.lock().unwrap().clone();
        if loads.len() >= 2 {
            // both loads came through the edge, with the token gone and no edge cookie
            assert_eq!(
                loads[..2],
                ["/framed?|edge|", "/framed?|edge|"],
                "{loads:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the framed preview did not load twice within 45 s: {loads:?} (edge: {} 401s)",
            metric(&edge, "cmux_edge_refusals_total{reason=\"access_denied\"}").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&edge, "cmux_edge_access_total{outcome=\"exchange\"}").await,
        1.0
    );
    // the reload (and anything else the frame asked for) passed on the session
    assert!(metric(&edge, "cmux_edge_access_total{outcome=\"session\"}").await >= 1.0);
    assert_eq!(
        metric(&edge, "cmux_edge_refusals_total{reason=\"access_denied\"}").await,
        0.0
    );
}

#[tokio::test]
async fn access_epoch_from_the_file_source_and_static_vms_revokes_too() {
    support::install_crypto();
    let port = echo_backend().await.port();
    let edge = Edge::start_with(
        &format!(
            "[registry]\nsources = [\"static\", \"file\"]\nfile = \"vms.json\"\n\
             [[registry.vms]]\nid = \"st\"\naddress = \"127.0.0.1\"\naccess_epoch = 2\n{}{}",
            access_section(&k1()),
            policy("token")
        ),
        false,
        |dir| {
            std::fs::write(
                dir.join("vms.json"),
                r#"{"fv": {"address": "127.0.0.1", "access_epoch": 0}}"#,
            )
            .unwrap()
        },
    )
    .await;
    // static: a token without `epoch` (0) is older than the VM's epoch 2
    let host = Edge::host(port, "st");
    let r = get(&edge, &host, "/", &[("X-Cmux-Token", &token("st", port))]).await;
    assert_denied(&r, "revoked");
    let mut c = claims("st", json!([port]));
    c["epoch"] = json!(2);
    let r = get(
        &edge,
        &host,
        "/",
        &[("X-Cmux-Token", &hs256("k1", K1.as_bytes(), &c))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // file: raising the epoch in the file revokes the session issued before
    let host = Edge::host(port, "fv");
    let pair = exchange(&edge, "fv", port).await;
    let r = get(&edge, &host, "/", &[("Cookie", &pair)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    std::fs::write(
        edge.dir.path().join("vms.json"),
        r#"{"fv": {"address": "127.0.0.1", "access_epoch": 5}}"#,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(&edge, &host, "/", &[("Cookie", &pair)]).await;
        if r.status == 401 {
            assert_denied(&r, "revoked");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the file change was never applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
