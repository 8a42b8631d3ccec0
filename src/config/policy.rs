//! `[[policy]]` and `[trust]`: per-port behaviour, and whose forwarding headers are believed.

use super::*;

const POLICY_KEYS: &[&str] = &[
    "port",
    "cors",
    "allow_origins",
    "embed",
    "frame_ancestors",
    "rewrite_redirects",
    "inject_shim",
    "pass_client_headers",
    "host_header",
    "access",
];

pub(super) fn policies(top: &Table) -> Policies {
    let mut default: Option<PolicyPatch> = None;
    let mut ports: Vec<(u16, PolicyPatch)> = Vec::new();
    for t in top.tables("policy", POLICY_KEYS) {
        let Some(port_val) = t.require("port") else {
            continue;
        };
        let port = match port_val.value() {
            toml::de::DeValue::String(s) if s == "*" => None,
            toml::de::DeValue::Integer(_) => match port_val.int() {
                Some(n) if (1..=65535).contains(&n) => Some(n as u16),
                _ => {
                    port_val.error("port must be 1-65535 or \"*\"");
                    continue;
                }
            },
            _ => {
                port_val.error("port must be a number 1-65535 or \"*\"");
                continue;
            }
        };
        let patch = policy_patch(&t);
        match port {
            None if default.is_some() => port_val.error("a second policy for port \"*\""),
            None => default = Some(patch),
            Some(p) if ports.iter().any(|(q, _)| *q == p) => {
                port_val.error(format!("a second policy for port {p}"))
            }
            Some(p) => ports.push((p, patch)),
        }
    }
    Policies::new(default.as_ref(), &ports)
}

pub(super) fn string_list(v: &Val) -> Option<Vec<String>> {
    v.array()?
        .iter()
        .map(|i| i.str().map(str::to_owned))
        .collect()
}

pub(super) fn policy_patch(t: &Table) -> PolicyPatch {
    let mut p = PolicyPatch::default();
    if let Some(v) = t.get("cors") {
        p.cors = v.parse_str(|s| match s {
            "permissive" => Ok(Cors::Permissive),
            "strip" => Ok(Cors::Strip),
            "passthrough" => Ok(Cors::Passthrough),
            _ => Err(format!(
                "cors {s:?} is not \"permissive\", \"strip\" or \"passthrough\""
            )),
        });
    }
    if let Some(v) = t.get("allow_origins") {
        p.allow_origins =
            string_list(&v).map(|l| l.iter().map(|o| o.to_ascii_lowercase()).collect());
    }
    p.embed = t.bool("embed");
    if let Some(v) = t.get("frame_ancestors") {
        p.frame_ancestors = string_list(&v).and_then(|list| {
            let bad = list
                .iter()
                .find(|s| s.is_empty() || s.contains([';', ',', ' ', '\n']));
            match bad {
                Some(b) => {
                    v.error(format!("{b:?} is not a CSP source expression"));
                    None
                }
                None => Some(list),
            }
        });
    }
    p.rewrite_redirects = t.bool("rewrite_redirects");
    p.inject_shim = t.bool("inject_shim");
    if let Some(v) = t.get("pass_client_headers") {
        p.pass_client_headers = v.array().map(|items| {
            items
                .iter()
                .filter_map(|i| {
                    i.parse_str(|s| {
                        let lower = s.to_ascii_lowercase();
                        if !lower.starts_with("x-cmux-") {
                            return Err(format!(
                                "{s:?} is not an X-Cmux-* header (other client headers pass anyway)"
                            ));
                        }
                        HeaderName::from_bytes(lower.as_bytes())
                            .map_err(|_| format!("{s:?} is not a header name"))
                    })
                })
                .collect()
        });
    }
    if let Some(v) = t.get("host_header") {
        p.host_header = v.parse_str(|s| match s {
            "preserve" => Ok(HostHeader::Preserve),
            "upstream" => Ok(HostHeader::Upstream),
            _ => Err(format!(
                "host_header {s:?} is not \"preserve\" or \"upstream\""
            )),
        });
    }
    p.access = t.get("access").and_then(|v| {
        v.parse_str(|s| match s {
            "token" => Ok(crate::access::Visibility::Token),
            "public" => Ok(crate::access::Visibility::Public),
            _ => Err(format!("access {s:?} is not \"token\" or \"public\"")),
        })
    });
    p
}

pub(super) fn trust(top: &Table) -> TrustedProxies {
    let Some(t) = top.table("trust", &["proxies"]) else {
        return TrustedProxies::default();
    };
    let Some(v) = t.get("proxies") else {
        return TrustedProxies::default();
    };
    let mut entries = Vec::new();
    for item in v.array().unwrap_or_default() {
        if let Some(s) = item.str() {
            match TrustedProxies::parse([s]) {
                Ok(_) => entries.push(s),
                Err(e) => item.error(e),
            }
        }
    }
    TrustedProxies::parse(entries).unwrap_or_default()
}
