//! Embedding (SPEC §5 `embed`, `frame_ancestors`; §10): previews live in dashboard iframes, so
//! `embed = true` removes the headers that forbid framing or cross-origin isolation and puts
//! exactly one `Content-Security-Policy: frame-ancestors <list>` in their place. The list is
//! `frame_ancestors`, else the policy's `allow_origins` (unless `"*"`), else `'self'`: a
//! preview is never frameable by any site. Without `embed`, `frame_ancestors` alone still
//! makes that one CSP the port's.
//!
//! Cost per response: a few header removals and one insert of a value built at load.

use http::header::{self, HeaderValue};
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

/// The CSP value a resolved policy puts on its responses, if any (built at load).
pub fn frame_ancestors(policy: &Policy) -> Option<HeaderValue> {
    let list = match &policy.frame_ancestors {
        Some(list) if !list.is_empty() => list.join(" "),
        _ if !policy.embed => return None,
        _ => match &policy.allow_origins {
            Some(o) if !o.is_any() => o.listed.join(" "),
            _ => "'self'".to_owned(),
        },
    };
    HeaderValue::from_str(&format!("frame-ancestors {list}")).ok()
}

/// Checks one `frame_ancestors` entry at load: a CSP source expression that does not let
/// every site frame the preview (`*`, a bare scheme such as `https:`, a `*` host).
pub fn check_source(s: &str) -> Result<(), String> {
    if s.is_empty() || s.contains([';', ',', ' ', '\n', '\r', '\t']) {
        return Err(format!("{s:?} is not a CSP source expression"));
    }
    let host = s.split_once("://").map_or(s, |(_, rest)| rest);
    let any_site = s == "*" || s.ends_with(':') || host == "*" || host.starts_with("*:");
    if any_site {
        return Err(format!(
            "{s:?} would let any site frame the preview; list the dashboard's origins"
        ));
    }
    Ok(())
}

pub fn response(policy: &Policy, resp: &mut ResponseHeader) {
    if policy.embed {
        for h in EMBED_BLOCKERS {
            resp.remove_header(*h);
        }
    }
    if let Some(csp) = &policy.csp {
        // Exactly one CSP: ours. `insert_header` replaces every value of the name.
        let _ = resp.insert_header(header::CONTENT_SECURITY_POLICY, csp.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{AllowOrigins, PolicyPatch};

    fn resolved(patch: PolicyPatch) -> Policy {
        patch.apply(&Policy::default(), "*".into())
    }

    fn csps(p: &Policy) -> Vec<String> {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Content-Security-Policy", "default-src 'none'")
            .unwrap();
        resp.append_header("Content-Security-Policy", "frame-ancestors 'none'")
            .unwrap();
        response(p, &mut resp);
        resp.headers
            .get_all("content-security-policy")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn embed_strips_framing_and_isolation_headers_for_one_frame_ancestors() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for h in EMBED_BLOCKERS {
            resp.append_header(h.to_string(), "x").unwrap();
        }
        resp.append_header("Set-Cookie", "a=1").unwrap();
        let p = resolved(PolicyPatch {
            embed: Some(true),
            ..Default::default()
        });
        response(&p, &mut resp);
        assert_eq!(resp.headers.len(), 2);
        assert_eq!(
            resp.headers.get("content-security-policy").unwrap(),
            "frame-ancestors 'self'"
        );
    }

    #[test]
    fn the_list_is_frame_ancestors_else_allow_origins_else_self() {
        let origins = AllowOrigins::new(["https://cmux.example", "http://localhost:*"]).unwrap();
        let p = resolved(PolicyPatch {
            embed: Some(true),
            allow_origins: Some(origins.clone()),
            frame_ancestors: Some(vec!["'self'".into(), "https://f.example".into()]),
            ..Default::default()
        });
        assert_eq!(csps(&p), ["frame-ancestors 'self' https://f.example"]);
        let p = resolved(PolicyPatch {
            embed: Some(true),
            allow_origins: Some(origins),
            ..Default::default()
        });
        assert_eq!(
            csps(&p),
            ["frame-ancestors https://cmux.example http://localhost:*"]
        );
        let p = resolved(PolicyPatch {
            embed: Some(true),
            allow_origins: Some(AllowOrigins::any()),
            ..Default::default()
        });
        assert_eq!(csps(&p), ["frame-ancestors 'self'"]);
    }

    #[test]
    fn without_embed_or_frame_ancestors_the_app_keeps_its_csp() {
        let p = Policy::default();
        assert_eq!(csps(&p), ["default-src 'none'", "frame-ancestors 'none'"]);
        let p = resolved(PolicyPatch {
            frame_ancestors: Some(vec!["'self'".into(), "https://cmux.example".into()]),
            ..Default::default()
        });
        assert_eq!(csps(&p), ["frame-ancestors 'self' https://cmux.example"]);
    }

    #[test]
    fn sources_that_let_any_site_frame_are_refused() {
        for bad in ["*", "https:", "http://*", "https://*:443", "a b", "x;y", ""] {
            assert!(check_source(bad).is_err(), "{bad}");
        }
        for ok in [
            "'self'",
            "'none'",
            "https://*.example.com",
            "http://localhost:*",
        ] {
            assert!(check_source(ok).is_ok(), "{ok}");
        }
    }
}
