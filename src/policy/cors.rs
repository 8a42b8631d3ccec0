//! CORS at the edge (SPEC §5, §10): `permissive` answers preflights and grants the origins
//! of `allow_origins`; `strip` removes every `Access-Control-*`; `passthrough` (the built-in
//! default) does nothing.
//!
//! `allow_origins` is compiled at load into exact origins and the two pattern forms
//! (`https://*.example.com`, `http://localhost:*`); a request's `Origin` is split once and
//! compared in place, without allocating. Listed origins are granted by name with
//! credentials and `Vary: Origin`; `["*"]` grants every origin as `*`, never with
//! credentials. For an Origin that is not granted the edge removes the app's own
//! `Access-Control-*` headers: in `permissive` mode the edge alone decides.

use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

use super::{Cors, Policy};

const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS, HEAD";
const MAX_AGE: &str = "86400";

/// What `permissive` grants one Origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Not granted: no `Access-Control-*` at all.
    None,
    /// A listed origin: named, with credentials.
    Credentialed,
    /// `allow_origins = ["*"]`: `Access-Control-Allow-Origin: *`, no credentials.
    Anonymous,
}

/// `allow_origins`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowOrigins {
    /// The entries as configured, normalised (lowercase, default port dropped): the
    /// `frame-ancestors` list when `embed` has none of its own.
    pub listed: Vec<String>,
    any: bool,
    patterns: Vec<OriginPattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct OriginPattern {
    scheme: Box<str>,
    host: HostPattern,
    port: PortPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(Box<str>),
    /// `*.example.com`: stored as `.example.com`; any depth of subdomain, not the domain.
    SubdomainOf(Box<str>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    /// No port: the scheme's default.
    Default,
    Exact(u16),
    /// `:*`
    Any,
}

/// An Origin split into its parts, borrowed from the header.
struct Parts<'a> {
    scheme: &'a str,
    host: &'a str,
    port: Option<&'a str>,
}

/// `scheme://host[:port]` and nothing else (no path, no user info).
fn split_origin(s: &str) -> Option<Parts<'_>> {
    let (scheme, rest) = s.split_once("://")?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let end = v6.find(']')?;
        let after = &v6[end + 1..];
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (&rest[..end + 2], port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    Some(Parts { scheme, host, port })
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

impl OriginPattern {
    /// One configured entry: an exact origin, `scheme://*.domain[:port]` or `scheme://host:*`.
    fn parse(entry: &str) -> Result<OriginPattern, String> {
        let bad = |why: &str| {
            format!(
                "{entry:?} is not an origin or origin pattern ({why}); expected e.g. \"https://cmux.example.com\", \"https://*.example.com\" or \"http://localhost:*\""
            )
        };
        let s = entry.to_ascii_lowercase();
        if s.ends_with('/') {
            return Err(bad("an origin has no path, not even \"/\""));
        }
        let p = split_origin(&s).ok_or_else(|| bad("not scheme://host[:port]"))?;
        let scheme_ok = p.scheme.starts_with(|c: char| c.is_ascii_lowercase())
            && p.scheme
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b));
        if !scheme_ok {
            return Err(bad("bad scheme"));
        }
        let port = match p.port {
            None => PortPattern::Default,
            Some("*") => PortPattern::Any,
            Some(n) if n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0') => {
                match n.parse::<u16>() {
                    Ok(n) => {
                        if default_port(p.scheme) == Some(n) {
                            PortPattern::Default
                        } else {
                            PortPattern::Exact(n)
                        }
                    }
                    Err(_) => return Err(bad("the port is not 1-65535 or *")),
                }
            }
            Some(_) => return Err(bad("the port is not 1-65535 or *")),
        };
        let host = if let Some(domain) = p.host.strip_prefix("*.") {
            if !valid_hostname(domain) || !(domain.contains('.') || domain == "localhost") {
                return Err(bad(
                    "*. needs a domain with a dot after it, like *.example.com",
                ));
            }
            HostPattern::SubdomainOf(format!(".{domain}").into())
        } else if let Some(v6) = p.host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("bad IPv6 address"))?;
            HostPattern::Exact(p.host.into())
        } else if valid_hostname(p.host) {
            HostPattern::Exact(p.host.into())
        } else {
            return Err(bad("bad host; a wildcard is only allowed as a leading *."));
        };
        Ok(OriginPattern {
            scheme: p.scheme.into(),
            host,
            port,
        })
    }

    /// The entry as a string: also a valid CSP host-source.
    fn to_source(&self) -> String {
        let host = match &self.host {
            HostPattern::Exact(h) => h.to_string(),
            HostPattern::SubdomainOf(d) => format!("*{d}"),
        };
        match self.port {
            PortPattern::Default => format!("{}://{host}", self.scheme),
            PortPattern::Exact(p) => format!("{}://{host}:{p}", self.scheme),
            PortPattern::Any => format!("{}://{host}:*", self.scheme),
        }
    }

    fn matches(&self, o: &Parts<'_>) -> bool {
        if !o.scheme.eq_ignore_ascii_case(&self.scheme) {
            return false;
        }
        let host_ok = match &self.host {
            HostPattern::Exact(h) => o.host.eq_ignore_ascii_case(h),
            HostPattern::SubdomainOf(d) => {
                o.host.len() > d.len()
                    && o.host.is_char_boundary(o.host.len() - d.len())
                    && o.host[o.host.len() - d.len()..].eq_ignore_ascii_case(d)
            }
        };
        if !host_ok {
            return false;
        }
        match (self.port, o.port) {
            (PortPattern::Any, _) => true,
            (PortPattern::Default, None) => true,
            (PortPattern::Exact(p), Some(s)) => {
                // Digits only: "+80" or "080" are not what a browser sends.
                s.bytes().all(|b| b.is_ascii_digit())
                    && !s.starts_with('0')
                    && s.parse::<u16>() == Ok(p)
            }
            _ => false,
        }
    }
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

impl AllowOrigins {
    /// `["*"]`: every origin, without credentials.
    pub fn any() -> AllowOrigins {
        AllowOrigins {
            listed: vec!["*".into()],
            any: true,
            patterns: Vec::new(),
        }
    }

    /// Checks one configured entry; `"*"` is only valid alone ([`AllowOrigins::new`]).
    pub fn check_entry(entry: &str) -> Result<(), String> {
        if entry == "*" {
            return Ok(());
        }
        OriginPattern::parse(entry).map(|_| ())
    }

    /// Compiles a list whose entries passed [`AllowOrigins::check_entry`].
    pub fn new<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<AllowOrigins, String> {
        let mut patterns = Vec::new();
        let mut any = false;
        for e in entries {
            if e == "*" {
                any = true;
            } else {
                patterns.push(OriginPattern::parse(e)?);
            }
        }
        match (any, patterns.is_empty()) {
            (true, true) => Ok(AllowOrigins::any()),
            (true, false) => Err(
                "\"*\" grants every origin without credentials and must be the only entry".into(),
            ),
            (false, true) => Err("allow_origins needs at least one origin".into()),
            (false, false) => Ok(AllowOrigins {
                listed: patterns.iter().map(OriginPattern::to_source).collect(),
                any: false,
                patterns,
            }),
        }
    }

    /// `true` for `["*"]`.
    pub fn is_any(&self) -> bool {
        self.any
    }

    /// What this list grants an Origin header value. Compares in place: no allocation.
    pub fn grant(&self, origin: &[u8]) -> Grant {
        if self.any {
            return Grant::Anonymous;
        }
        let Ok(s) = std::str::from_utf8(origin) else {
            return Grant::None;
        };
        match split_origin(s) {
            Some(parts) if self.patterns.iter().any(|p| p.matches(&parts)) => Grant::Credentialed,
            _ => Grant::None,
        }
    }
}

/// The preflight answer as a gate: `Err` is the 204 the edge writes itself, before the
/// registry is asked (a preflight needs no VM).
pub fn answer_preflight(policy: &Policy, req: &RequestHeader) -> Result<(), crate::respond::Reply> {
    match preflight(policy, req) {
        Some(head) => Err(crate::respond::Reply::head(head, "preflight")),
        None => Ok(()),
    }
}

/// What the edge answers to an OPTIONS request itself, if anything.
pub fn preflight(policy: &Policy, req: &RequestHeader) -> Option<ResponseHeader> {
    if req.method != http::Method::OPTIONS {
        return None;
    }
    let mut resp = ResponseHeader::build(204, Some(8)).ok()?;
    match policy.cors {
        Cors::Passthrough => return None,
        // SPEC §5: every OPTIONS is answered 204 bare.
        Cors::Strip => {}
        Cors::Permissive => {
            let origin = req.headers.get(header::ORIGIN)?;
            req.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
            let grant = policy.grant(origin.as_bytes());
            if grant != Grant::None {
                allow_origin(&mut resp, grant, origin);
                let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_METHODS, ALLOW_METHODS);
                if let Some(h) = req.headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
                    let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_HEADERS, h.clone());
                }
                // Chrome's Private Network Access preflight (public page → private address):
                // granted only when the operator says previews may be reached that way.
                if policy.allow_private_network
                    && req
                        .headers
                        .get("access-control-request-private-network")
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
                {
                    let _ = resp.insert_header("access-control-allow-private-network", "true");
                }
                let _ = resp.insert_header(header::ACCESS_CONTROL_MAX_AGE, MAX_AGE);
            }
            let _ = resp.insert_header(header::VARY, "Origin");
        }
    }
    let _ = resp.insert_header(header::CONTENT_LENGTH, 0);
    Some(resp)
}

/// `Access-Control-Allow-Origin` (+ credentials) for a grant that is not `None`.
fn allow_origin(resp: &mut ResponseHeader, grant: Grant, origin: &HeaderValue) {
    match grant {
        Grant::Credentialed => {
            let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
        }
        Grant::Anonymous => {
            let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*");
        }
        Grant::None => {}
    }
}

fn is_cors_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("access-control-")
}

/// Applies the policy to a proxied response. `origin` is the request's `Origin`, if any.
pub fn response(policy: &Policy, origin: Option<&HeaderValue>, resp: &mut ResponseHeader) {
    match policy.cors {
        Cors::Passthrough => {}
        Cors::Strip => remove_cors(resp),
        Cors::Permissive => {
            let Some(origin) = origin else { return };
            let grant = policy.grant(origin.as_bytes());
            let expose = match grant {
                Grant::None => None,
                _ => resp
                    .headers
                    .get(header::ACCESS_CONTROL_EXPOSE_HEADERS)
                    .cloned()
                    .or_else(|| expose_list(resp)),
            };
            remove_cors(resp);
            allow_origin(resp, grant, origin);
            if let Some(e) = expose {
                let _ = resp.insert_header(header::ACCESS_CONTROL_EXPOSE_HEADERS, e);
            }
            add_vary_origin(resp);
        }
    }
}

fn remove_cors(resp: &mut ResponseHeader) {
    if !resp.headers.keys().any(is_cors_header) {
        return;
    }
    let names: Vec<HeaderName> = resp
        .headers
        .keys()
        .filter(|n| is_cors_header(n))
        .cloned()
        .collect();
    for n in names {
        resp.remove_header(&n);
    }
}

/// `*` means nothing to a credentialed request, so expose the response's own header names.
fn expose_list(resp: &ResponseHeader) -> Option<HeaderValue> {
    const SAFELISTED: &[&str] = &[
        "cache-control",
        "content-language",
        "content-length",
        "content-type",
        "expires",
        "last-modified",
        "pragma",
        "set-cookie",
    ];
    let mut list = String::new();
    for name in resp.headers.keys() {
        let n = name.as_str();
        if SAFELISTED.contains(&n) || is_cors_header(name) || list.split(", ").any(|x| x == n) {
            continue;
        }
        if !list.is_empty() {
            list.push_str(", ");
        }
        list.push_str(n);
    }
    (!list.is_empty())
        .then(|| HeaderValue::from_str(&list).ok())
        .flatten()
}

fn add_vary_origin(resp: &mut ResponseHeader) {
    let has = resp.headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim() == "*" || t.trim().eq_ignore_ascii_case("origin"))
        })
    });
    if !has {
        let _ = resp.append_header(header::VARY, "Origin");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("OPTIONS", b"/", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn h<'a>(r: &'a ResponseHeader, n: &str) -> Option<&'a str> {
        r.headers.get(n).and_then(|v| v.to_str().ok())
    }

    fn permissive(list: &[&str]) -> Policy {
        Policy {
            cors: Cors::Permissive,
            allow_origins: Some(AllowOrigins::new(list.iter().copied()).unwrap()),
            ..Policy::default()
        }
    }

    fn grant(list: &[&str], origin: &str) -> Grant {
        permissive(list).grant(origin.as_bytes())
    }

    #[test]
    fn exact_origins_match_case_insensitively_and_only_exactly() {
        let l = &["https://App.example", "http://localhost:5173"];
        assert_eq!(grant(l, "https://app.example"), Grant::Credentialed);
        assert_eq!(grant(l, "HTTPS://APP.EXAMPLE"), Grant::Credentialed);
        assert_eq!(grant(l, "http://localhost:5173"), Grant::Credentialed);
        for no in [
            "http://app.example",
            "https://app.example:8443",
            "https://app.example.evil",
            "https://evil-app.example",
            "https://app.example/",
            "http://localhost:5174",
            "http://localhost",
            "null",
            "",
        ] {
            assert_eq!(grant(l, no), Grant::None, "{no}");
        }
        // a default port written out is the same origin as the browser's form
        assert_eq!(
            grant(&["https://a.example:443"], "https://a.example"),
            Grant::Credentialed
        );
    }

    #[test]
    fn subdomain_patterns_match_any_depth_but_not_the_domain_or_lookalikes() {
        let l = &["https://*.example.com"];
        assert_eq!(grant(l, "https://a.example.com"), Grant::Credentialed);
        assert_eq!(grant(l, "https://a.b.example.com"), Grant::Credentialed);
        for no in [
            "https://example.com",
            "https://evilexample.com",
            "http://a.example.com",
            "https://a.example.com:8443",
            "https://a.example.com.evil",
        ] {
            assert_eq!(grant(l, no), Grant::None, "{no}");
        }
    }

    #[test]
    fn any_port_patterns_match_every_port_of_one_host() {
        let l = &["http://localhost:*"];
        assert_eq!(grant(l, "http://localhost:5173"), Grant::Credentialed);
        assert_eq!(grant(l, "http://localhost"), Grant::Credentialed);
        assert_eq!(grant(l, "http://localhost.evil:5173"), Grant::None);
        assert_eq!(grant(l, "https://localhost:5173"), Grant::None);
        assert_eq!(
            grant(&["http://[::1]:*"], "http://[::1]:80"),
            Grant::Credentialed
        );
    }

    #[test]
    fn star_grants_everyone_without_credentials_and_must_stand_alone() {
        assert_eq!(grant(&["*"], "https://anything.example"), Grant::Anonymous);
        assert!(AllowOrigins::new(["*", "https://a.example"]).is_err());
        assert!(AllowOrigins::new([]).is_err());
    }

    #[test]
    fn bad_entries_are_refused_at_load() {
        for bad in [
            "cmux.example.com",
            "https://cmux.example.com/",
            "https://cmux.example.com/app",
            "https://*",
            "https://*.com",
            "https://a.*.example.com",
            "https://ex*ample.com",
            "https://a.example:0",
            "https://a.example:99999",
            "https://a.example:08",
            "https://user@a.example",
            "https://[::zz]",
        ] {
            assert!(AllowOrigins::check_entry(bad).is_err(), "{bad}");
        }
        for good in [
            "*",
            "https://a.example",
            "http://localhost:*",
            "https://*.a.example",
        ] {
            assert!(AllowOrigins::check_entry(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn a_listed_origin_preflight_echoes_origin_and_requested_headers() {
        let p = permissive(&["https://app.example"]);
        let req = options(&[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "PUT"),
            ("Access-Control-Request-Headers", "x-a, content-type"),
            ("Access-Control-Request-Private-Network", "true"),
        ]);
        let r = preflight(&p, &req).unwrap();
        assert_eq!(r.status, 204);
        assert_eq!(
            h(&r, "access-control-allow-origin"),
            Some("https://app.example")
        );
        assert_eq!(h(&r, "access-control-allow-credentials"), Some("true"));
        assert_eq!(
            h(&r, "access-control-allow-headers"),
            Some("x-a, content-type")
        );
        assert_eq!(h(&r, "access-control-max-age"), Some("86400"));
        assert_eq!(h(&r, "vary"), Some("Origin"));
        assert!(h(&r, "access-control-allow-methods")
            .unwrap()
            .contains("PUT"));
        // no Private Network Access without allow_private_network
        assert!(h(&r, "access-control-allow-private-network").is_none());
        let p = Policy {
            allow_private_network: true,
            ..p
        };
        let r = preflight(&p, &req).unwrap();
        assert_eq!(h(&r, "access-control-allow-private-network"), Some("true"));
    }

    #[test]
    fn options_without_origin_is_not_a_preflight_in_permissive_mode() {
        let p = permissive(&["https://a"]);
        assert!(preflight(&p, &options(&[])).is_none());
        assert!(preflight(&p, &options(&[("Origin", "https://a")])).is_none());
    }

    #[test]
    fn allow_origins_limits_grants_and_unlisted_origins_get_nothing() {
        let p = Policy {
            allow_private_network: true,
            ..permissive(&["https://ok.example"])
        };
        let req = options(&[
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "x-a"),
            ("Access-Control-Request-Private-Network", "true"),
        ]);
        let r = preflight(&p, &req).unwrap();
        assert!(r
            .headers
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")));
        let mut resp = ResponseHeader::build(200, None).unwrap();
        // the app's own grant does not survive either
        resp.append_header("Access-Control-Allow-Origin", "https://evil.example")
            .unwrap();
        resp.append_header("Access-Control-Allow-Credentials", "true")
            .unwrap();
        response(
            &p,
            Some(&HeaderValue::from_static("https://evil.example")),
            &mut resp,
        );
        assert!(resp
            .headers
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")));
        assert_eq!(h(&resp, "vary"), Some("Origin"));
    }

    #[test]
    fn star_answers_star_and_never_credentials() {
        let p = permissive(&["*"]);
        let req = options(&[
            ("Origin", "https://any.example"),
            ("Access-Control-Request-Method", "GET"),
        ]);
        let r = preflight(&p, &req).unwrap();
        assert_eq!(h(&r, "access-control-allow-origin"), Some("*"));
        assert!(h(&r, "access-control-allow-credentials").is_none());
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Access-Control-Allow-Credentials", "true")
            .unwrap();
        response(
            &p,
            Some(&HeaderValue::from_static("https://any.example")),
            &mut resp,
        );
        assert_eq!(h(&resp, "access-control-allow-origin"), Some("*"));
        assert!(h(&resp, "access-control-allow-credentials").is_none());
    }

    #[test]
    fn an_upstream_star_is_replaced_by_the_origin() {
        let p = permissive(&["https://app.example"]);
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Access-Control-Allow-Origin", "*")
            .unwrap();
        resp.append_header("X-Custom", "1").unwrap();
        response(
            &p,
            Some(&HeaderValue::from_static("https://app.example")),
            &mut resp,
        );
        assert_eq!(
            h(&resp, "access-control-allow-origin"),
            Some("https://app.example")
        );
        assert_eq!(h(&resp, "access-control-allow-credentials"), Some("true"));
        assert_eq!(h(&resp, "access-control-expose-headers"), Some("x-custom"));
        assert_eq!(h(&resp, "vary"), Some("Origin"));
    }

    #[test]
    fn no_origin_no_cors_headers() {
        let p = permissive(&["https://a"]);
        let mut resp = ResponseHeader::build(200, None).unwrap();
        response(&p, None, &mut resp);
        assert!(resp
            .headers
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")));
    }

    #[test]
    fn strip_removes_every_cors_header_and_answers_options_bare() {
        let p = Policy {
            cors: Cors::Strip,
            ..Policy::default()
        };
        let r = preflight(&p, &options(&[])).unwrap();
        assert_eq!(r.status, 204);
        assert!(r
            .headers
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")));
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Access-Control-Allow-Origin", "https://x")
            .unwrap();
        resp.append_header("Access-Control-Max-Age", "5").unwrap();
        response(&p, Some(&HeaderValue::from_static("https://x")), &mut resp);
        assert!(resp
            .headers
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")));
    }

    #[test]
    fn passthrough_is_the_default_and_touches_nothing() {
        let p = Policy::default();
        assert_eq!(p.cors, Cors::Passthrough);
        let req = options(&[
            ("Origin", "https://a"),
            ("Access-Control-Request-Method", "GET"),
        ]);
        assert!(preflight(&p, &req).is_none());
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Access-Control-Allow-Origin", "*")
            .unwrap();
        response(&p, Some(&HeaderValue::from_static("https://a")), &mut resp);
        assert_eq!(h(&resp, "access-control-allow-origin"), Some("*"));
    }
}
