//! Embedding (SPEC §5 `embed`, `frame_ancestors`): previews live in dashboard iframes, so the
//! headers that forbid framing or cross-origin isolation are removed, and a port may instead
//! state exactly who may frame it.

use http::header;
use pingora::http::ResponseHeader;

use super::Policy;

/// Headers that stop a page from being framed or embedded cross-origin.
const EMBED_BLOCKERS: &[&str] = &[
    "content-security-policy",
    "content-security-policy-report-only",
    "x-frame-options",
    "frame-options",
    "cross-origin-embedder-policy",
    "cross-origin-opener-policy",
    "cross-origin-resource-policy",
];

pub fn response(policy: &Policy, resp: &mut ResponseHeader) {
    if policy.embed {
        for h in EMBED_BLOCKERS {
            resp.remove_header(*h);
        }
    }
    if let Some(fa) = &policy.frame_ancestors {
        // Exactly one CSP: ours. `insert_header` replaces every value of the name.
        let _ = resp.insert_header(header::CONTENT_SECURITY_POLICY, fa.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embed_strips_framing_and_isolation_headers() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for h in EMBED_BLOCKERS {
            resp.append_header(h.to_string(), "x").unwrap();
        }
        resp.append_header("Set-Cookie", "a=1").unwrap();
        response(&Policy::default(), &mut resp);
        assert_eq!(resp.headers.len(), 1);
    }

    #[test]
    fn frame_ancestors_is_the_one_csp() {
        let p = Policy {
            embed: false,
            frame_ancestors: Some("frame-ancestors 'self' https://cmux.example".into()),
            ..Policy::default()
        };
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Content-Security-Policy", "default-src 'none'")
            .unwrap();
        resp.append_header("Content-Security-Policy", "frame-ancestors 'none'")
            .unwrap();
        response(&p, &mut resp);
        let csp: Vec<_> = resp
            .headers
            .get_all("content-security-policy")
            .iter()
            .collect();
        assert_eq!(csp, ["frame-ancestors 'self' https://cmux.example"]);
    }
}
