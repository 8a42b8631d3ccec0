//! CORS at the edge (SPEC §5): `permissive` answers preflights and grants the calling Origin
//! with credentials; `strip` removes every `Access-Control-*`; `passthrough` does nothing.
//!
//! Grants always name the Origin, never `*`: `*` and credentials never go together, and
//! `Vary: Origin` keeps shared caches from serving one origin's grant to another.

use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

use super::{Cors, Policy};

const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS, HEAD";
const MAX_AGE: &str = "86400";

/// What the edge answers to an OPTIONS request itself, if anything.
/// The preflight answer as a gate: `Err` is the 204 the edge writes itself, before the
/// registry is asked (a preflight needs no VM).
pub fn answer_preflight(policy: &Policy, req: &RequestHeader) -> Result<(), crate::respond::Reply> {
    match preflight(policy, req) {
        Some(head) => Err(crate::respond::Reply::head(head, "preflight")),
        None => Ok(()),
    }
}

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
            if origin_allowed(policy, origin) {
                let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
                let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
                let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_METHODS, ALLOW_METHODS);
                if let Some(h) = req.headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
                    let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_HEADERS, h.clone());
                }
                // Chrome's Private Network Access preflight for public page → local preview.
                if req
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

fn origin_allowed(policy: &Policy, origin: &HeaderValue) -> bool {
    origin.to_str().is_ok_and(|o| policy.origin_allowed(o))
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
            if !origin_allowed(policy, origin) {
                return;
            }
            let expose = resp
                .headers
                .get(header::ACCESS_CONTROL_EXPOSE_HEADERS)
                .cloned()
                .or_else(|| expose_list(resp));
            remove_cors(resp);
            let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
            if let Some(e) = expose {
                let _ = resp.insert_header(header::ACCESS_CONTROL_EXPOSE_HEADERS, e);
            }
            add_vary_origin(resp);
        }
    }
}

fn remove_cors(resp: &mut ResponseHeader) {
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

    #[test]
    fn permissive_preflight_echoes_origin_and_requested_headers() {
        let p = Policy::default();
        let req = options(&[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "PUT"),
            ("Access-Control-Request-Headers", "x-a, content-type"),
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
    }

    #[test]
    fn options_without_origin_is_not_a_preflight_in_permissive_mode() {
        let p = Policy::default();
        assert!(preflight(&p, &options(&[])).is_none());
        assert!(preflight(&p, &options(&[("Origin", "https://a")])).is_none());
    }

    #[test]
    fn allow_origins_limits_grants() {
        let p = Policy {
            allow_origins: Some(vec!["https://ok.example".into()]),
            ..Policy::default()
        };
        let req = options(&[
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "GET"),
        ]);
        let r = preflight(&p, &req).unwrap();
        assert!(h(&r, "access-control-allow-origin").is_none());
        let mut resp = ResponseHeader::build(200, None).unwrap();
        response(
            &p,
            Some(&HeaderValue::from_static("https://evil.example")),
            &mut resp,
        );
        assert!(h(&resp, "access-control-allow-origin").is_none());
    }

    #[test]
    fn an_upstream_star_is_replaced_by_the_origin() {
        let p = Policy::default();
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
        let p = Policy::default();
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
    fn passthrough_touches_nothing() {
        let p = Policy {
            cors: Cors::Passthrough,
            ..Policy::default()
        };
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
