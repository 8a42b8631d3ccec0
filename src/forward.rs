//! What the upstream sees: the request headers cmux-edge forwards, strips and adds (SPEC §4).
//!
//! - every client `X-Cmux-*` header is dropped unless the port's policy lets it through;
//! - `X-Forwarded-*`, `Forwarded`, `X-Real-IP`, `True-Client-IP`, `X-Original-URL`,
//!   `X-Rewrite-URL` only from a trusted proxy, `CF-Connecting-IP` only on Cloudflare's
//!   path, and never in an underscore spelling (`X_Forwarded_For`), which CGI-style stacks
//!   read as the real thing (SPEC §10);
//! - only `Upgrade: websocket` goes through; `Connection` cannot name framing, `Host`,
//!   `Cookie`, `Origin` or `Authorization` away;
//! - `X-Cmux-Proxied`, `-Port-Internal`, `-Vm-Id`, `-Workspace-Internal` are ours;
//! - hop-by-hop headers, and those named in `Connection`, stop here (an Upgrade keeps
//!   `Connection: upgrade` + `Upgrade`);
//! - `Host` is the public host unless the policy says `upstream`;
//! - `X-Forwarded-For/Proto/Host` describe the client as [`crate::trust`] resolved it.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::policy::{HostHeader, Policy};

pub const X_CMUX_PROXIED: &str = "x-cmux-proxied";
pub const X_CMUX_PORT_INTERNAL: &str = "x-cmux-port-internal";
pub const X_CMUX_VM_ID: &str = "x-cmux-vm-id";
pub const X_CMUX_WORKSPACE_INTERNAL: &str = "x-cmux-workspace-internal";
pub const X_REQUEST_ID: &str = "x-request-id";
// Parsed once: a `&str` name is parsed on every lookup. A clone of a static custom name is a
// pointer copy.
static PROXIED: HeaderName = HeaderName::from_static(X_CMUX_PROXIED);
static PORT_INTERNAL: HeaderName = HeaderName::from_static(X_CMUX_PORT_INTERNAL);
static VM_ID: HeaderName = HeaderName::from_static(X_CMUX_VM_ID);
static WORKSPACE_INTERNAL: HeaderName = HeaderName::from_static(X_CMUX_WORKSPACE_INTERNAL);
static REQUEST_ID: HeaderName = HeaderName::from_static(X_REQUEST_ID);
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

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

/// Request-only hop-by-hop fields: pingora re-frames a body left without `Content-Length` or
/// `Transfer-Encoding` as chunked after the filters ran; `HTTP2-Settings` belongs to an h2c
/// upgrade, which is never forwarded.
const REQUEST_HOP_BY_HOP: &[&str] = &["transfer-encoding", "http2-settings"];

/// pingora's own upstream request sanitising is turned off for our peers: it strips every
/// `Connection`-nominated field (`Content-Length`, `Cookie`, `Authorization` included) and
/// answers 400 to a nominated `Host` before [`upstream_request`] runs, which SPEC §10 says
/// to ignore. [`upstream_request`] does all of it instead, in one place.
pub fn pingora_request_policy() -> pingora::upstreams::peer::HttpUpstreamRequestPolicy {
    pingora::upstreams::peer::HttpUpstreamRequestPolicy::preserve()
}

/// `Connection` tokens that are never honoured (SPEC §10): naming them would strip message
/// framing or the credentials and origin an app decides on, so they are ignored.
const NEVER_CONNECTION_NAMED: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "host",
    "cookie",
    "origin",
    "authorization",
];

/// Client headers about the client or the original URL that only a trusted proxy may state
/// (SPEC §10). The whole `X-Forwarded-*` family is matched by prefix.
const FROM_TRUSTED_ONLY: &[&str] = &[
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-original-url",
    "x-rewrite-url",
];

/// Ours to set, whoever the peer: the client's values are read first (a trusted chain is
/// extended), then replaced.
const FORWARDED_OURS: &[&str] = &["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];

/// `a` equals `b` (lowercase, dashes) with `_` in `a` read as `-`.
fn eq_dash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(&x, &y)| x == y || (x == b'_' && y == b'-'))
}

fn starts_with_dash(a: &[u8], prefix: &[u8]) -> bool {
    a.len() >= prefix.len() && eq_dash(&a[..prefix.len()], prefix)
}

/// Whether the upgrade this request asks for is one cmux-edge tunnels: WebSocket only
/// (SPEC §10), on HTTP/1.1, named by `Upgrade` (like pingora, whether or not `Connection`
/// repeats it: the upstream gets the normalised `Connection: upgrade` either way).
pub fn is_upgrade(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req.headers.get_all(header::UPGRADE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
            })
        })
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
    if content_length(&req.headers).is_err() {
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
fn content_length(h: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut found: Option<u64> = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
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
        .get_all(&PROXIED)
        .iter()
        .any(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"true"))
}

/// Removes hop-by-hop headers, every header named in `Connection` (RFC 9110 §7.6.1) except
/// the never-honoured names, and every other name `drop` picks.
///
/// One pass over the names present, then a removal for each one found: a lookup per listed
/// name parsed every name again and hashed it, ten times a request, found or not. The
/// `Connection` values are cloned (a reference count, not a copy) so that the map can be
/// edited while reading them.
fn strip_hop_by_hop(h: &mut HeaderMap, drop: impl Fn(&HeaderName) -> bool) {
    if h.contains_key(header::CONNECTION) {
        let values: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
        for v in &values {
            let Ok(v) = v.to_str() else { continue };
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if NEVER_CONNECTION_NAMED
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(token))
                {
                    continue;
                }
                // By `&str`: looked up case-insensitively, no `HeaderName` built.
                h.remove(token);
            }
        }
    }
    let stops = |n: &HeaderName| HOP_BY_HOP.contains(&n.as_str()) || drop(n);
    if h.keys().any(stops) {
        let names: Vec<HeaderName> = h.keys().filter(|n| stops(n)).cloned().collect();
        for n in &names {
            h.remove(n);
        }
    }
}

/// Everything about one request that decides the upstream headers.
pub struct Forward<'a> {
    pub port: u16,
    pub id: &'a str,
    pub scope: Option<&'a str>,
    pub policy: &'a Policy,
    /// The client after trusted-proxy resolution.
    pub client_ip: IpAddr,
    /// The TCP peer is a trusted proxy: extend its X-Forwarded-For chain, keep what it says
    /// about the client (`Forwarded`, `X-Real-IP`, `X-Forwarded-Port`...).
    pub trusted_peer: bool,
    /// The peer is on Cloudflare's path: its `CF-Connecting-IP` is kept.
    pub cloudflare: bool,
    pub peer_ip: IpAddr,
    /// The original request was HTTPS (our TLS, or a trusted proxy's word).
    pub https: bool,
    /// The public host as the client sent it (port included).
    pub public_host: &'a str,
    /// `address:port` of the upstream, for `host_header = "upstream"`.
    pub upstream_authority: &'a str,
    pub request_id: &'a str,
    /// [`is_upgrade`], decided once in `request_filter`.
    pub upgrade: bool,
}

/// Whether a client header stops here (SPEC §4, §10). Names are lowercase (the `http`
/// crate's form); `_` is read as `-`, and an underscore spelling of a protected name is
/// never legitimate, whoever sends it.
fn client_header_dropped(name: &HeaderName, f: &Forward<'_>) -> bool {
    let n = name.as_str().as_bytes();
    let underscore = n.contains(&b'_');
    if starts_with_dash(n, b"x-cmux-") {
        return underscore || !f.policy.passes_client_header(name);
    }
    if starts_with_dash(n, b"x-forwarded-") {
        return underscore || !f.trusted_peer || FORWARDED_OURS.iter().any(|o| n == o.as_bytes());
    }
    if eq_dash(n, b"cf-connecting-ip") {
        return underscore || !f.cloudflare;
    }
    if FROM_TRUSTED_ONLY.iter().any(|t| eq_dash(n, t.as_bytes())) {
        return underscore || !f.trusted_peer;
    }
    false
}

/// Rewrites the upstream request header (SPEC §4, §10).
///
/// The headers are edited as a bare [`HeaderMap`], names parsed once, and the request is
/// rebuilt without pingora's header-case map: `insert_header` parses every name it is given,
/// allocates a custom one twice and keeps that second map in step, about 1 µs for the eight
/// headers added here (benches/RESULTS.md, `pingora_api`). An HTTP/1.1 upstream then gets
/// pingora's title case for standard names and lowercase for the rest, which is what a
/// request from an HTTP/2 client (every browser over TLS) always got: no upstream can depend
/// on the client's spelling.
pub fn upstream_request(req: &mut RequestHeader, f: &Forward<'_>) -> pingora::Result<()> {
    let target = raw_target_to_keep(req);
    let end_stream = req.send_end_stream();
    let placeholder = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts: http::request::Parts = std::mem::replace(req, placeholder).into();
    // Edited to the end even when a value is refused, so that `req` is whole again either way.
    let edited = upstream_headers(&mut parts.headers, f);
    *req = RequestHeader::from(parts);
    if let Some(end_stream) = end_stream {
        req.set_send_end_stream(end_stream);
    }
    if let Some(target) = target {
        req.set_raw_path(&target)?;
    }
    edited
}

/// The request-target bytes, when the URI alone would not give them back (absolute-form,
/// not UTF-8): `RequestHeader::from(Parts)` keeps only the URI.
fn raw_target_to_keep(req: &RequestHeader) -> Option<Box<[u8]>> {
    let raw = req.raw_path();
    let uri = req
        .uri
        .path_and_query()
        .map(|p| p.as_str().as_bytes())
        .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or_default();
    (raw != uri || !req.raw_path_is_utf8()).then(|| raw.into())
}

fn upstream_headers(h: &mut HeaderMap, f: &Forward<'_>) -> pingora::Result<()> {
    // A trusted peer's chain is extended; anyone else's is not evidence of anything.
    let mut xff = String::new();
    if f.trusted_peer {
        for v in h.get_all(&X_FORWARDED_FOR) {
            if let Ok(s) = v.to_str() {
                xff.push_str(s);
                xff.push_str(", ");
            }
        }
    }

    // `Content-Length: 5` twice, or `5, 5`: the VM gets it once (`check_framing` refused
    // values that disagree).
    let lengths = h.get_all(header::CONTENT_LENGTH).iter().count();
    let listed = h
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes().contains(&b','));
    if lengths > 1 || listed {
        if let Ok(Some(n)) = content_length(h) {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    strip_hop_by_hop(h, |n: &HeaderName| {
        REQUEST_HOP_BY_HOP.contains(&n.as_str()) || client_header_dropped(n, f)
    });
    // At most nine more below: one growth instead of several.
    h.reserve(9);

    if f.upgrade {
        // Only WebSocket is tunnelled: `Upgrade: h2c` and friends never reach the VM.
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }

    h.insert(PROXIED.clone(), HeaderValue::from_static("true"));
    // A header the policy passes keeps the client's value: the desktop preview picks the
    // in-sandbox port with X-Cmux-Port-Internal on port 39379.
    // The policy first: by default it passes none, and the client's copy is already gone.
    let client_sent = |h: &HeaderMap, name: &HeaderName| {
        f.policy.passes_client_header(name) && h.contains_key(name)
    };
    if !client_sent(h, &PORT_INTERNAL) {
        h.insert(PORT_INTERNAL.clone(), HeaderValue::from(f.port));
    }
    if !client_sent(h, &VM_ID) {
        h.insert(VM_ID.clone(), value(f.id)?);
    }
    match f.scope {
        _ if client_sent(h, &WORKSPACE_INTERNAL) => {}
        Some(s) if !s.eq_ignore_ascii_case("base") => {
            h.insert(WORKSPACE_INTERNAL.clone(), value(s)?);
        }
        _ => {}
    }

    match f.policy.host_header {
        HostHeader::Preserve => {
            // HTTP/2 carries the host in :authority only; an HTTP/1.1 upstream needs Host.
            if !h.contains_key(header::HOST) {
                h.insert(header::HOST, value(f.public_host)?);
            }
        }
        HostHeader::Upstream => {
            h.insert(header::HOST, value(f.upstream_authority)?);
        }
    }

    let hop = if f.trusted_peer {
        f.peer_ip
    } else {
        f.client_ip
    };
    crate::access_log::push_ip(&mut xff, hop);
    // An address list: always a valid value, and the `String` becomes it without a copy.
    h.insert(
        X_FORWARDED_FOR.clone(),
        HeaderValue::try_from(xff).map_err(bad_value)?,
    );
    let proto = HeaderValue::from_static(if f.https { "https" } else { "http" });
    h.insert(X_FORWARDED_PROTO.clone(), proto);
    h.insert(X_FORWARDED_HOST.clone(), value(f.public_host)?);
    h.insert(REQUEST_ID.clone(), request_id_value(f.request_id)?);
    Ok(())
}

fn value(s: &str) -> pingora::Result<HeaderValue> {
    HeaderValue::from_str(s).map_err(bad_value)
}

fn bad_value(_: impl std::error::Error) -> Box<pingora::Error> {
    pingora::Error::explain(
        pingora::ErrorType::InvalidHTTPHeader,
        "invalid header value",
    )
}

/// Longest `X-Request-Id` taken from a trusted proxy.
pub const MAX_REQUEST_ID: usize = 128;

/// `X-Request-Id` as a header value marked sensitive: HTTP/2 then sends it "never indexed"
/// (RFC 7541 §6.2.3). An id is new on every response, so indexing it would only churn the
/// HPACK table and evict the headers that do repeat (`content-type`, `date`): h2load over TLS,
/// 115,200 → 112,500 instructions per response (benches/RESULTS.md). HTTP/1.1 ignores it.
pub fn request_id_value(id: &str) -> pingora::Result<HeaderValue> {
    let mut v = HeaderValue::from_str(id).map_err(|_| {
        pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "bad request id")
    })?;
    v.set_sensitive(true);
    Ok(v)
}

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

/// The response header the client gets: hop-by-hop headers an upstream sends stop here (a 101
/// keeps `Connection: upgrade` + `Upgrade`, which are the point of it), and `X-Request-Id` is
/// ours. Edited as a bare [`HeaderMap`] and rebuilt without pingora's header-case map, as
/// [`upstream_request`] does: an HTTP/1.1 client then gets title case for standard names and
/// lowercase for the rest, as every HTTP/2 client does.
pub fn downstream_response(resp: &mut ResponseHeader, request_id: &str) -> pingora::Result<()> {
    let id = request_id_value(request_id)?;
    // A phrase other than the status's own is kept (a copy only then).
    let reason = resp
        .get_reason_phrase()
        .filter(|r| Some(*r) != resp.status.canonical_reason())
        .map(str::to_owned);
    let placeholder = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts: http::response::Parts = std::mem::replace(resp, placeholder).into();
    let switching = parts.status == http::StatusCode::SWITCHING_PROTOCOLS;
    let h = &mut parts.headers;
    let upgrade = h.get(header::UPGRADE).cloned();
    strip_hop_by_hop(h, |_: &HeaderName| false);
    if let (true, Some(u)) = (switching, upgrade) {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u);
    }
    h.insert(REQUEST_ID.clone(), id);
    *resp = ResponseHeader::from(parts);
    if reason.is_some() {
        resp.set_reason_phrase(reason.as_deref())?;
    }
    Ok(())
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
            cloudflare: false,
            peer_ip: "192.0.2.1".parse().unwrap(),
            https: false,
            public_host: "port-5173-vm-200.example.com",
            upstream_authority: "10.0.0.2:5173",
            request_id: "rid",
            upgrade: false,
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
    fn the_rebuilt_request_keeps_its_method_target_version_and_end_of_stream() {
        let p = Policy::default();
        let f = fwd(&p);
        for target in [
            &b"/p?q=1"[..],
            b"http://example.com/abs?x=1",
            b"/caf\xc3\xa9/\xff",
            b"*",
        ] {
            let mut r = RequestHeader::build("OPTIONS", target, None).unwrap();
            r.set_version(http::Version::HTTP_2);
            r.set_send_end_stream(false);
            upstream_request(&mut r, &f).unwrap();
            assert_eq!(r.method, http::Method::OPTIONS);
            assert_eq!(r.raw_path(), target, "{}", String::from_utf8_lossy(target));
            assert_eq!(r.raw_path_is_utf8(), std::str::from_utf8(target).is_ok());
            assert_eq!(r.version, http::Version::HTTP_2);
            assert_eq!(r.send_end_stream(), Some(false));
        }
    }

    #[test]
    fn the_upstream_request_goes_out_in_title_case_for_standard_names() {
        let p = Policy::default();
        let mut r = request(&[("HOST", "a.example"), ("x-App-Thing", "1")]);
        upstream_request(&mut r, &fwd(&p)).unwrap();
        let mut wire = Vec::new();
        r.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).unwrap();
        assert!(wire.contains("Host: a.example\r\n"), "{wire}");
        assert!(wire.contains("x-app-thing: 1\r\n"), "{wire}");
        assert!(wire.contains("x-cmux-proxied: true\r\n"), "{wire}");
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
        let f = Forward {
            upgrade: true,
            ..fwd(&p)
        };
        upstream_request(&mut r, &f).unwrap();
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

    /// Every header SPEC §10 names, in both spellings.
    const IDENTITY: &[(&str, &str)] = &[
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("True-Client-IP", "6.6.6.6"),
        ("CF-Connecting-IP", "6.6.6.6"),
        ("X-Forwarded-Port", "1"),
        ("X-Forwarded-Prefix", "/evil"),
        ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("X_Real_IP", "6.6.6.6"),
        ("True_Client_IP", "6.6.6.6"),
        ("CF_Connecting_IP", "6.6.6.6"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("X_Forwarded_Port", "1"),
        ("X_Original_URL", "/admin"),
        ("X_Rewrite_URL", "/admin"),
        ("x_cmux_vm_id", "evil"),
        ("X_Cmux_Port_Internal", "22"),
    ];

    fn names(r: &RequestHeader) -> Vec<String> {
        r.headers.keys().map(|k| k.as_str().to_owned()).collect()
    }

    #[test]
    fn an_untrusted_peer_states_nothing_about_the_client_in_any_spelling() {
        let p = Policy {
            pass_client_headers: vec![HeaderName::from_static("x-cmux-port-internal")],
            ..Policy::default()
        };
        let mut r = request(IDENTITY);
        upstream_request(&mut r, &fwd(&p)).unwrap();
        let left = names(&r);
        for (h, _) in IDENTITY {
            let lower = h.to_ascii_lowercase();
            let ours = ["x-forwarded-for", "x-cmux-vm-id", "x-cmux-port-internal"];
            if !ours.contains(&lower.replace('_', "-").as_str()) || lower.contains('_') {
                assert!(!left.contains(&lower), "{h} reached the upstream: {left:?}");
            }
        }
        assert_eq!(get(&r, "x-forwarded-for"), ["192.0.2.1"]);
        assert_eq!(get(&r, "x-cmux-vm-id"), ["200"]);
        assert_eq!(get(&r, "x-cmux-port-internal"), ["5173"]);
    }

    #[test]
    fn a_trusted_peer_keeps_what_it_says_but_never_underscores_or_an_unbelieved_cf_ip() {
        let p = Policy::default();
        let mut r = request(IDENTITY);
        let mut f = fwd(&p);
        f.trusted_peer = true;
        upstream_request(&mut r, &f).unwrap();
        for h in [
            "forwarded",
            "x-real-ip",
            "true-client-ip",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-original-url",
            "x-rewrite-url",
        ] {
            assert_eq!(get(&r, h).len(), 1, "{h} dropped");
        }
        assert!(get(&r, "cf-connecting-ip").is_empty());
        assert!(
            names(&r).iter().all(|n| !n.contains('_')),
            "{:?}",
            names(&r)
        );
        f.cloudflare = true;
        let mut r = request(IDENTITY);
        upstream_request(&mut r, &f).unwrap();
        assert_eq!(get(&r, "cf-connecting-ip"), ["6.6.6.6"]);
    }

    #[test]
    fn only_websocket_upgrades_are_forwarded() {
        let p = Policy::default();
        let mut r = request(&[
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]);
        assert!(!is_upgrade(&r));
        upstream_request(&mut r, &fwd(&p)).unwrap();
        for h in ["upgrade", "connection", "http2-settings"] {
            assert!(get(&r, h).is_empty(), "{h} forwarded");
        }
    }

    #[test]
    fn connection_cannot_name_framing_or_credentials_away() {
        let p = Policy::default();
        let mut r = request(&[
            (
                "Connection",
                "Content-Length, transfer-encoding, HOST, cookie, Origin, authorization, x-gone",
            ),
            ("Content-Length", "3"),
            ("Host", "port-5173-vm-200.example.com"),
            ("Cookie", "a=1"),
            ("Origin", "https://a.example"),
            ("Authorization", "Bearer t"),
            ("X-Gone", "1"),
        ]);
        upstream_request(&mut r, &fwd(&p)).unwrap();
        for h in [
            "content-length",
            "host",
            "cookie",
            "origin",
            "authorization",
        ] {
            assert_eq!(get(&r, h).len(), 1, "{h} was stripped");
        }
        assert!(get(&r, "x-gone").is_empty());
    }

    #[test]
    fn response_hop_by_hop_is_stripped_but_101_keeps_upgrade() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Connection", "keep-alive").unwrap();
        resp.append_header("Keep-Alive", "timeout=5").unwrap();
        resp.append_header("Set-Cookie", "a=1").unwrap();
        resp.append_header("Set-Cookie", "b=2").unwrap();
        downstream_response(&mut resp, "id-1").unwrap();
        assert!(resp.headers.get("keep-alive").is_none());
        assert!(resp.headers.get("connection").is_none());
        assert_eq!(resp.headers.get_all("set-cookie").iter().count(), 2);

        let mut resp = ResponseHeader::build(101, None).unwrap();
        resp.append_header("Connection", "Upgrade").unwrap();
        resp.append_header("Upgrade", "websocket").unwrap();
        resp.append_header("Sec-WebSocket-Accept", "x").unwrap();
        downstream_response(&mut resp, "id-1").unwrap();
        assert_eq!(resp.headers.get("connection").unwrap(), "upgrade");
        assert_eq!(resp.headers.get("upgrade").unwrap(), "websocket");
        assert_eq!(resp.headers.get("x-request-id").unwrap(), "id-1");
    }

    #[test]
    fn the_rebuilt_response_keeps_its_status_version_reason_and_headers() {
        let mut resp = ResponseHeader::build(299, None).unwrap();
        resp.set_version(http::Version::HTTP_10);
        resp.set_reason_phrase(Some("Fine Thanks")).unwrap();
        resp.append_header("X-App", "1").unwrap();
        resp.append_header("Content-Type", "text/plain").unwrap();
        downstream_response(&mut resp, "id-2").unwrap();
        assert_eq!(resp.status.as_u16(), 299);
        assert_eq!(resp.version, http::Version::HTTP_10);
        assert_eq!(resp.get_reason_phrase(), Some("Fine Thanks"));
        assert_eq!(resp.headers.get("x-app").unwrap(), "1");
        let mut wire = Vec::new();
        resp.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).unwrap();
        assert!(wire.contains("Content-Type: text/plain\r\n"), "{wire}");
        assert!(wire.contains("x-request-id: id-2\r\n"), "{wire}");

        let mut ok = ResponseHeader::build(200, None).unwrap();
        ok.set_reason_phrase(Some("OK")).unwrap();
        downstream_response(&mut ok, "id-3").unwrap();
        assert_eq!(ok.get_reason_phrase(), Some("OK"));
    }
}
