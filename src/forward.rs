//! What the upstream sees: the request headers cmux-edge forwards, strips and adds (SPEC §4).
//!
//! - every client `X-Cmux-*` header is dropped unless the port's policy lets it through;
//! - `X-Cmux-Proxied`, `-Port-Internal`, `-Vm-Id`, `-Workspace-Internal` are ours;
//! - hop-by-hop headers, and those named in `Connection`, stop here (an Upgrade keeps
//!   `Connection: upgrade` + `Upgrade`);
//! - `Host` is the public host unless the policy says `upstream`;
//! - `X-Forwarded-For/Proto/Host` describe the client as [`crate::trust`] resolved it.

use std::net::IpAddr;

use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::policy::{HostHeader, Policy};

pub const X_CMUX_PROXIED: &str = "x-cmux-proxied";
pub const X_CMUX_PORT_INTERNAL: &str = "x-cmux-port-internal";
pub const X_CMUX_VM_ID: &str = "x-cmux-vm-id";
pub const X_CMUX_WORKSPACE_INTERNAL: &str = "x-cmux-workspace-internal";
pub const X_REQUEST_ID: &str = "x-request-id";

/// RFC 9110 §7.6.1 hop-by-hop fields plus the non-standard ones seen in the wild.
/// `Transfer-Encoding` is left to pingora, which owns message framing.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Whether the request asks to switch protocols (WebSocket): `Connection` lists `upgrade`
/// and an `Upgrade` header is present.
pub fn is_upgrade(req: &RequestHeader) -> bool {
    req.headers.contains_key(header::UPGRADE)
        && connection_tokens(&req.headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// 508 for a request that already went through a cmux proxy (SPEC §4): right after host
/// parsing, before any other answer or registry call.
pub fn check_loop(req: &RequestHeader) -> Result<(), crate::respond::Refusal> {
    if is_loop(req) {
        Err(crate::respond::Refusal::Loop)
    } else {
        Ok(())
    }
}

/// Longest request target forwarded (nginx's `large_client_header_buffers` default).
const MAX_URI: usize = 8 * 1024;
/// Largest request head forwarded (names + values); pingora's own limit is 1 MiB.
const MAX_HEAD: usize = 64 * 1024;

/// Request framing a VM could read differently from the edge (SPEC §11), refused before
/// anything else: 414 over [`MAX_URI`], 431 over [`MAX_HEAD`], 400 for `Content-Length` values
/// that disagree or are not plain digits, and for a `Transfer-Encoding` other than `chunked`
/// (pingora would frame `gzip, chunked` as chunked and drop the coding). Identical
/// `Content-Length` values are collapsed into one by [`upstream_request`]. What pingora itself
/// refuses first (conflicting lengths, bad chunk sizes, obs-fold, `chunked, identity`) is
/// answered by its own bare 400.
pub fn check_framing(req: &RequestHeader) -> Result<(), crate::respond::Refusal> {
    use crate::respond::Refusal;
    if req.raw_path().len() > MAX_URI {
        return Err(Refusal::UriTooLong);
    }
    let head: usize = req
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if head > MAX_HEAD {
        return Err(Refusal::HeadTooLarge);
    }
    if content_length(req).is_err() {
        return Err(Refusal::BadFraming("Content-Length"));
    }
    let mut te = req
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .peekable();
    if te.peek().is_some() {
        let only_chunked = te.count() == 1
            && req
                .headers
                .get(header::TRANSFER_ENCODING)
                .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"));
        if !only_chunked {
            return Err(Refusal::BadFraming("Transfer-Encoding"));
        }
    }
    Ok(())
}

/// The one length all `Content-Length` values (and list members) agree on; `Err` when they
/// disagree or one is not 1*DIGIT.
fn content_length(req: &RequestHeader) -> Result<Option<u64>, ()> {
    let mut found: Option<u64> = None;
    for v in req.headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) || part.len() > 19 {
                return Err(());
            }
            let n: u64 = std::str::from_utf8(part)
                .ok()
                .and_then(|p| p.parse().ok())
                .ok_or(())?;
            if found.is_some_and(|f| f != n) {
                return Err(());
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// `X-Cmux-Proxied: true`, compared case-insensitively (SPEC §4).
pub fn is_loop(req: &RequestHeader) -> bool {
    req.headers
        .get_all(X_CMUX_PROXIED)
        .iter()
        .any(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"true"))
}

fn connection_tokens(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Headers named in `Connection`: hop-by-hop by declaration (RFC 9110 §7.6.1).
fn connection_named(headers: &http::HeaderMap) -> Vec<HeaderName> {
    connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect()
}

/// Removes hop-by-hop headers and every header named in `Connection`. Goes through
/// pingora's `remove_header` so its header-case map stays in step.
macro_rules! strip_hop_by_hop {
    ($h:expr) => {{
        for n in connection_named(&$h.headers) {
            $h.remove_header(&n);
        }
        for n in HOP_BY_HOP {
            $h.remove_header(*n);
        }
    }};
}

/// Everything about one request that decides the upstream headers.
pub struct Forward<'a> {
    pub port: u16,
    pub id: &'a str,
    pub scope: Option<&'a str>,
    pub policy: &'a Policy,
    /// The client after trusted-proxy resolution.
    pub client_ip: IpAddr,
    /// The TCP peer is a trusted proxy: extend its X-Forwarded-For chain.
    pub trusted_peer: bool,
    pub peer_ip: IpAddr,
    /// The original request was HTTPS (our TLS, or a trusted proxy's word).
    pub https: bool,
    /// The public host as the client sent it (port included).
    pub public_host: &'a str,
    /// `address:port` of the upstream, for `host_header = "upstream"`.
    pub upstream_authority: &'a str,
    pub request_id: &'a str,
}

/// Rewrites the upstream request header in place.
pub fn upstream_request(req: &mut RequestHeader, f: &Forward<'_>) -> pingora::Result<()> {
    let upgrade = is_upgrade(req);
    let upgrade_value = req.headers.get(header::UPGRADE).cloned();
    let client_xff = req
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .cloned()
        .collect::<Vec<_>>();

    // `Content-Length: 5` twice, or `5, 5`: the VM gets it once (`check_framing` refused
    // values that disagree).
    let lengths = req.headers.get_all(header::CONTENT_LENGTH).iter().count();
    let listed = req
        .headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes().contains(&b','));
    if lengths > 1 || listed {
        if let Ok(Some(n)) = content_length(req) {
            req.insert_header(header::CONTENT_LENGTH, n.to_string())?;
        }
    }
    strip_hop_by_hop!(req);
    let cmux: Vec<HeaderName> = req
        .headers
        .keys()
        .filter(|n| n.as_str().starts_with("x-cmux-") && !f.policy.passes_client_header(n))
        .cloned()
        .collect();
    for n in cmux {
        req.remove_header(&n);
    }
    for n in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        req.remove_header(n);
    }

    if let (true, Some(u)) = (upgrade, upgrade_value) {
        req.insert_header(header::CONNECTION, "upgrade")?;
        req.insert_header(header::UPGRADE, u)?;
    }

    req.insert_header(X_CMUX_PROXIED, "true")?;
    // A header the policy passes keeps the client's value: the desktop preview picks the
    // in-sandbox port with X-Cmux-Port-Internal on port 39379.
    let client_sent = |req: &RequestHeader, name: &'static str| {
        req.headers.contains_key(name)
            && f.policy
                .passes_client_header(&HeaderName::from_static(name))
    };
    if !client_sent(req, X_CMUX_PORT_INTERNAL) {
        req.insert_header(X_CMUX_PORT_INTERNAL, f.port.to_string())?;
    }
    if !client_sent(req, X_CMUX_VM_ID) {
        req.insert_header(X_CMUX_VM_ID, f.id)?;
    }
    match f.scope {
        _ if client_sent(req, X_CMUX_WORKSPACE_INTERNAL) => {}
        Some(s) if !s.eq_ignore_ascii_case("base") => {
            req.insert_header(X_CMUX_WORKSPACE_INTERNAL, s)?
        }
        _ => {}
    }

    match f.policy.host_header {
        HostHeader::Preserve => {
            // HTTP/2 carries the host in :authority only; an HTTP/1.1 upstream needs Host.
            if !req.headers.contains_key(header::HOST) {
                req.insert_header(header::HOST, f.public_host)?;
            }
        }
        HostHeader::Upstream => req.insert_header(header::HOST, f.upstream_authority)?,
    }

    // Untrusted peers start a new chain: their own X-Forwarded-For is not evidence of anything.
    let mut xff = String::new();
    if f.trusted_peer {
        for v in &client_xff {
            if let Ok(s) = v.to_str() {
                xff.push_str(s);
                xff.push_str(", ");
            }
        }
        xff.push_str(&f.peer_ip.to_string());
    } else {
        xff.push_str(&f.client_ip.to_string());
    }
    req.insert_header("x-forwarded-for", xff)?;
    req.insert_header("x-forwarded-proto", if f.https { "https" } else { "http" })?;
    req.insert_header("x-forwarded-host", f.public_host)?;
    req.insert_header(X_REQUEST_ID, f.request_id)?;
    Ok(())
}

/// Longest `X-Request-Id` taken from a trusted proxy.
pub const MAX_REQUEST_ID: usize = 128;

/// The `X-Request-Id` a trusted proxy sent, when it is one we can log and pass on verbatim:
/// 1–128 characters of `[A-Za-z0-9._:-]` (UUIDs, hex, Cloudflare ray ids, `host:seq`). Anything
/// else, and anything from an untrusted peer, gets a fresh id instead.
pub fn trusted_request_id(req: &RequestHeader, trusted_peer: bool) -> Option<&str> {
    if !trusted_peer {
        return None;
    }
    let mut values = req.headers.get_all(X_REQUEST_ID).iter();
    let v = values.next()?;
    if values.next().is_some() {
        return None; // two ids: neither is the request's
    }
    let b = v.as_bytes();
    let valid = (1..=MAX_REQUEST_ID).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'));
    // Only ASCII passed the check, so this cannot fail.
    valid.then(|| v.to_str().ok()).flatten()
}

/// Hop-by-hop headers an upstream sends must not reach the client. A 101 keeps
/// `Connection: upgrade` + `Upgrade`, which are the point of it.
pub fn downstream_response(resp: &mut ResponseHeader) {
    let switching = resp.status == http::StatusCode::SWITCHING_PROTOCOLS;
    let upgrade = resp.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop!(resp);
    if let (true, Some(u)) = (switching, upgrade) {
        // Both values are valid header values; insert cannot fail on them.
        let _ = resp.insert_header(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let _ = resp.insert_header(header::UPGRADE, u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    #[test]
    fn a_request_id_is_taken_only_from_a_trusted_peer_and_only_when_valid() {
        let ok = request(&[("x-request-id", "3f2a-9c:edge.1_A")]);
        assert_eq!(trusted_request_id(&ok, true), Some("3f2a-9c:edge.1_A"));
        assert_eq!(trusted_request_id(&ok, false), None);
        let longest = "a".repeat(MAX_REQUEST_ID);
        let r = request(&[("x-request-id", &longest)]);
        assert_eq!(trusted_request_id(&r, true), Some(longest.as_str()));
        let too_long = "a".repeat(MAX_REQUEST_ID + 1);
        for bad in [
            "",
            "has space",
            "semi;colon",
            "slash/",
            "é",
            too_long.as_str(),
        ] {
            let r = request(&[("x-request-id", bad)]);
            assert_eq!(trusted_request_id(&r, true), None, "{bad:?}");
        }
        let two = request(&[("x-request-id", "a"), ("x-request-id", "b")]);
        assert_eq!(trusted_request_id(&two, true), None);
        assert_eq!(trusted_request_id(&request(&[]), true), None);
    }

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/p?q=1", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn fwd<'a>(policy: &'a Policy) -> Forward<'a> {
        Forward {
            port: 5173,
            id: "200",
            scope: None,
            policy,
            client_ip: "192.0.2.1".parse().unwrap(),
            trusted_peer: false,
            peer_ip: "192.0.2.1".parse().unwrap(),
            https: false,
            public_host: "port-5173-vm-200.example.com",
            upstream_authority: "10.0.0.2:5173",
            request_id: "rid",
        }
    }

    fn get<'r>(r: &'r RequestHeader, name: &str) -> Vec<&'r str> {
        r.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn loop_header_is_true_in_any_case_only() {
        assert!(is_loop(&request(&[("X-Cmux-Proxied", "true")])));
        assert!(is_loop(&request(&[("X-Cmux-Proxied", "TRUE")])));
        assert!(!is_loop(&request(&[("X-Cmux-Proxied", "1")])));
        assert!(!is_loop(&request(&[])));
    }

    #[test]
    fn client_cmux_headers_are_replaced_by_ours() {
        let p = Policy::default();
        let mut r = request(&[
            ("X-Cmux-Port-Internal", "1"),
            ("X-Cmux-Workspace-Internal", "evil"),
            ("X-Cmux-Host-Override", "localhost:1"),
            ("Cookie", "a=1"),
        ]);
        let mut f = fwd(&p);
        f.scope = Some("feat-x");
        upstream_request(&mut r, &f).unwrap();
        assert_eq!(get(&r, "x-cmux-port-internal"), ["5173"]);
        assert_eq!(get(&r, "x-cmux-workspace-internal"), ["feat-x"]);
        assert_eq!(get(&r, "x-cmux-vm-id"), ["200"]);
        assert_eq!(get(&r, "x-cmux-proxied"), ["true"]);
        assert!(get(&r, "x-cmux-host-override").is_empty());
        assert_eq!(get(&r, "cookie"), ["a=1"]);
    }

    #[test]
    fn base_scope_sends_no_workspace_header() {
        let p = Policy::default();
        let mut r = request(&[("X-Cmux-Workspace-Internal", "evil")]);
        let mut f = fwd(&p);
        f.scope = Some("base");
        upstream_request(&mut r, &f).unwrap();
        assert!(get(&r, "x-cmux-workspace-internal").is_empty());
    }

    #[test]
    fn a_passed_header_keeps_the_client_value() {
        let p = Policy {
            pass_client_headers: vec![HeaderName::from_static("x-cmux-port-internal")],
            ..Policy::default()
        };
        let mut r = request(&[("X-Cmux-Port-Internal", "3000")]);
        upstream_request(&mut r, &fwd(&p)).unwrap();
        assert_eq!(get(&r, "x-cmux-port-internal"), ["3000"]);
        let mut r = request(&[]);
        upstream_request(&mut r, &fwd(&p)).unwrap();
        assert_eq!(get(&r, "x-cmux-port-internal"), ["5173"]);
    }

    #[test]
    fn policy_can_pass_named_client_headers() {
        let p = Policy {
            pass_client_headers: vec![HeaderName::from_static("x-cmux-host-override")],
            ..Policy::default()
        };
        let mut r = request(&[("X-Cmux-Host-Override", "localhost:3006")]);
        upstream_request(&mut r, &fwd(&p)).unwrap();
        assert_eq!(get(&r, "x-cmux-host-override"), ["localhost:3006"]);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_stop_here() {
        let p = Policy::default();
        let mut r = request(&[
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "s"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic x"),
            ("TE", "trailers"),
        ]);
        upstream_request(&mut r, &fwd(&p)).unwrap();
        for h in [
            "connection",
            "x-secret",
            "keep-alive",
            "proxy-authorization",
            "te",
        ] {
            assert!(get(&r, h).is_empty(), "{h} forwarded");
        }
    }

    #[test]
    fn upgrade_keeps_connection_upgrade() {
        let p = Policy::default();
        let mut r = request(&[
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "k"),
        ]);
        assert!(is_upgrade(&r));
        upstream_request(&mut r, &fwd(&p)).unwrap();
        assert_eq!(get(&r, "connection"), ["upgrade"]);
        assert_eq!(get(&r, "upgrade"), ["websocket"]);
        assert_eq!(get(&r, "sec-websocket-key"), ["k"]);
    }

    #[test]
    fn host_is_preserved_or_set_to_the_upstream() {
        let mut p = Policy::default();
        let mut r = request(&[("Host", "port-5173-vm-200.example.com:8080")]);
        upstream_request(&mut r, &fwd(&p)).unwrap();
        assert_eq!(get(&r, "host"), ["port-5173-vm-200.example.com:8080"]);
        p.host_header = HostHeader::Upstream;
        upstream_request(&mut r, &fwd(&p)).unwrap();
        assert_eq!(get(&r, "host"), ["10.0.0.2:5173"]);
        // HTTP/2 requests have no Host header: the public host is supplied
        let mut r = request(&[]);
        upstream_request(&mut r, &fwd(&Policy::default())).unwrap();
        assert_eq!(get(&r, "host"), ["port-5173-vm-200.example.com"]);
    }

    #[test]
    fn forwarded_headers_depend_on_trust() {
        let p = Policy::default();
        let mut r = request(&[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
        ]);
        upstream_request(&mut r, &fwd(&p)).unwrap();
        assert_eq!(get(&r, "x-forwarded-for"), ["192.0.2.1"]);
        assert_eq!(get(&r, "x-forwarded-proto"), ["http"]);
        assert_eq!(
            get(&r, "x-forwarded-host"),
            ["port-5173-vm-200.example.com"]
        );

        let mut r = request(&[("X-Forwarded-For", "1.2.3.4")]);
        let mut f = fwd(&p);
        f.trusted_peer = true;
        f.peer_ip = "127.0.0.1".parse().unwrap();
        f.client_ip = "1.2.3.4".parse().unwrap();
        f.https = true;
        upstream_request(&mut r, &f).unwrap();
        assert_eq!(get(&r, "x-forwarded-for"), ["1.2.3.4, 127.0.0.1"]);
        assert_eq!(get(&r, "x-forwarded-proto"), ["https"]);
    }

    #[test]
    fn response_hop_by_hop_is_stripped_but_101_keeps_upgrade() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Connection", "keep-alive").unwrap();
        resp.append_header("Keep-Alive", "timeout=5").unwrap();
        resp.append_header("Set-Cookie", "a=1").unwrap();
        resp.append_header("Set-Cookie", "b=2").unwrap();
        downstream_response(&mut resp);
        assert!(resp.headers.get("keep-alive").is_none());
        assert!(resp.headers.get("connection").is_none());
        assert_eq!(resp.headers.get_all("set-cookie").iter().count(), 2);

        let mut resp = ResponseHeader::build(101, None).unwrap();
        resp.append_header("Connection", "Upgrade").unwrap();
        resp.append_header("Upgrade", "websocket").unwrap();
        resp.append_header("Sec-WebSocket-Accept", "x").unwrap();
        downstream_response(&mut resp);
        assert_eq!(resp.headers.get("connection").unwrap(), "upgrade");
        assert_eq!(resp.headers.get("upgrade").unwrap(), "websocket");
    }
}
