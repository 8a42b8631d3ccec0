//! Host-only cookies (SPEC §10 `cookies`): with `cookies = "host"` (the built-in default) the
//! `Domain=` attribute of every upstream `Set-Cookie` is removed, so a cookie a VM sets over
//! HTTP belongs to its own preview host and no other: one preview can neither plant nor read
//! cookies for its siblings under the shared preview domain. What a proxy cannot stop
//! (`document.cookie` in the page) is in the README, "Isolating tenants".
//!
//! Cost per response: one scan of the `Set-Cookie` values; they are rebuilt (one allocation
//! each) only when one of them names a `Domain`. Repeated headers stay repeated and in order;
//! every other attribute is left byte for byte.

use http::header::{HeaderValue, SET_COOKIE};
use pingora::http::ResponseHeader;

use super::{Cookies, Policy};

pub fn response(policy: &Policy, resp: &mut ResponseHeader) {
    if policy.cookies != Cookies::Host {
        return;
    }
    let mut values = resp.headers.get_all(SET_COOKIE).iter();
    if !values.any(|v| has_domain(v.as_bytes())) {
        return;
    }
    let rebuilt: Vec<HeaderValue> = resp
        .headers
        .get_all(SET_COOKIE)
        .iter()
        .map(strip_domain)
        .collect();
    resp.remove_header(&SET_COOKIE);
    for v in rebuilt {
        let _ = resp.append_header(SET_COOKIE, v);
    }
}

/// Attributes follow the first `;`; the cookie pair itself (even one named `Domain`) is not
/// an attribute.
fn attributes(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b';').skip(1)
}

/// `Domain`, `domain = x`, ` DOMAIN`: the attribute name, trimmed, compared without case.
fn is_domain(attr: &[u8]) -> bool {
    let name = attr.split(|&b| b == b'=').next().unwrap_or_default();
    name.trim_ascii().eq_ignore_ascii_case(b"domain")
}

fn has_domain(v: &[u8]) -> bool {
    attributes(v).any(is_domain)
}

/// The value without its `Domain` attributes (all of them: a browser uses the last).
pub fn strip_domain(v: &HeaderValue) -> HeaderValue {
    let b = v.as_bytes();
    if !has_domain(b) {
        return v.clone();
    }
    let mut out = Vec::with_capacity(b.len());
    for (i, part) in b.split(|&c| c == b';').enumerate() {
        if i > 0 {
            if is_domain(part) {
                continue;
            }
            out.push(b';');
        }
        out.extend_from_slice(part);
    }
    // Only bytes of a valid value remain, so this cannot fail; keep the original if it did.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(s: &str) -> String {
        strip_domain(&HeaderValue::from_str(s).unwrap())
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn domain_is_removed_in_any_case_and_spacing_and_nothing_else() {
        assert_eq!(
            strip("sid=1; Domain=example.com; Path=/; Secure; HttpOnly; SameSite=Lax"),
            "sid=1; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
        assert_eq!(strip("a=1;domain=.example.com;Path=/"), "a=1;Path=/");
        assert_eq!(strip("a=1; DOMAIN = example.com"), "a=1");
        assert_eq!(strip("a=1; Domain="), "a=1");
        assert_eq!(strip("a=1; Domain"), "a=1");
        // two Domain attributes: both go
        assert_eq!(
            strip("a=1; Domain=a.com; Max-Age=5; domain=b.com"),
            "a=1; Max-Age=5"
        );
    }

    #[test]
    fn values_without_domain_are_untouched() {
        for s in [
            "a=1",
            "a=1; Path=/",
            "Domain=x; Path=/", // a cookie named Domain is not an attribute
            "a=domain=1; Path=/",
            "a=1; Domainx=y",
            "",
            ";;;",
            "=; =",
        ] {
            assert_eq!(strip(s), s, "{s:?}");
        }
    }

    #[test]
    fn malformed_and_non_utf8_values_do_not_panic() {
        let v = HeaderValue::from_bytes(b"a=\xff; Domain=x.com; Path=/\xfe").unwrap();
        assert_eq!(strip_domain(&v).as_bytes(), b"a=\xff; Path=/\xfe");
        assert_eq!(strip(";Domain=x"), "");
        assert_eq!(strip("; domain"), "");
    }

    #[test]
    fn repeated_set_cookie_headers_stay_repeated_and_in_order() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Set-Cookie", "a=1; Domain=example.com; Path=/")
            .unwrap();
        resp.append_header("X-Other", "1").unwrap();
        resp.append_header("Set-Cookie", "b=2; Path=/").unwrap();
        resp.append_header("Set-Cookie", "c=3; domain=.example.com")
            .unwrap();
        response(&Policy::default(), &mut resp);
        let all: Vec<_> = resp
            .headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(all, ["a=1; Path=/", "b=2; Path=/", "c=3"]);
        assert_eq!(resp.headers.get("x-other").unwrap(), "1");
    }

    #[test]
    fn passthrough_leaves_domain() {
        let p = Policy {
            cookies: Cookies::Passthrough,
            ..Policy::default()
        };
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Set-Cookie", "a=1; Domain=example.com")
            .unwrap();
        response(&p, &mut resp);
        assert_eq!(
            resp.headers.get("set-cookie").unwrap(),
            "a=1; Domain=example.com"
        );
    }
}
