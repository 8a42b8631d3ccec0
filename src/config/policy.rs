//! `[[policy]]` and `[trust]`: per-port behaviour, and whose forwarding headers are believed.

use super::*;
use crate::policy::{embed, gate, AllowOrigins, Cookies, ServiceWorkers};

const POLICY_KEYS: &[&str] = &[
    "port",
    "cors",
    "allow_origins",
    "allow_private_network",
    "embed",
    "frame_ancestors",
    "rewrite_redirects",
    "inject_shim",
    "cookies",
    "service_workers",
    "pass_client_headers",
    "host_header",
    "access",
];

/// One `[[policy]]` table as read: its port (`None` for `"*"`), what it sets, and where its
/// `cors` and `pass_client_headers` stand, for the checks that need the merged view.
struct Read<'r, 'i> {
    port: Option<u16>,
    patch: PolicyPatch,
    cors: Option<Val<'r, 'i>>,
    pass: Option<Val<'r, 'i>>,
    /// `allow_origins` is written, valid or not (a bad one is reported on its own).
    origins: bool,
}

pub(super) fn policies(top: &Table, reachable: &PortSet) -> Policies {
    let mut read: Vec<Read> = Vec::new();
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
            None if read.iter().any(|r| r.port.is_none()) => {
                port_val.error("a second policy for port \"*\"")
            }
            Some(p) if read.iter().any(|r| r.port == Some(p)) => {
                port_val.error(format!("a second policy for port {p}"))
            }
            _ => read.push(Read {
                port,
                patch,
                cors: t.get("cors"),
                pass: t.get("pass_client_headers"),
                origins: t.get("allow_origins").is_some(),
            }),
        }
    }
    let star = read.iter().find(|r| r.port.is_none());
    let star_cors = star.and_then(|r| r.patch.cors);
    let star_origins = star.is_some_and(|r| r.origins);
    for r in &read {
        // SPEC §10: permissive CORS names who it grants. Reported where permissive is set.
        let permissive = r.patch.cors.or(star_cors) == Some(Cors::Permissive);
        let origins = r.origins || star_origins;
        if let (true, false, Some(cors)) = (permissive, origins, &r.cors) {
            cors.error(
                "cors = \"permissive\" needs allow_origins: the dashboard's origins, e.g. \
                 [\"https://cmux.example.com\"] (or [\"*\"]: every origin, without credentials)",
            );
        }
        // A port a passed client header would make the in-sandbox proxy dial must itself be
        // reachable: a policy passing X-Cmux-Port-Internal on a port [ports] refuses is a
        // mistake (the per-request values are checked by `policy::gate`).
        if let (Some(port), Some(pass), Some(list)) =
            (r.port, &r.pass, &r.patch.pass_client_headers)
        {
            let names_a_port = list
                .iter()
                .any(|h| gate::PORT_HEADERS.contains(&h.as_str()));
            if names_a_port && !reachable.allows(port) {
                pass.error(format!(
                    "passes a port-naming header on port {port}, which [ports] does not allow"
                ));
            }
        }
    }
    let ports: Vec<(u16, PolicyPatch)> = read
        .iter()
        .filter_map(|r| r.port.map(|p| (p, r.patch.clone())))
        .collect();
    Policies::new(star.map(|r| &r.patch), &ports)
}

/// A list of strings, each checked by `check` and reported where it stands; `None` when
/// any item is wrong.
fn checked_list(v: &Val, check: fn(&str) -> Result<(), String>) -> Option<Vec<String>> {
    let mut ok = true;
    let mut out = Vec::new();
    for item in v.array()? {
        match item.str() {
            Some(s) => match check(s) {
                Ok(()) => out.push(s.to_owned()),
                Err(e) => {
                    item.error(e);
                    ok = false;
                }
            },
            None => ok = false,
        }
    }
    ok.then_some(out)
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
        p.allow_origins = checked_list(&v, AllowOrigins::check_entry).and_then(|list| {
            AllowOrigins::new(list.iter().map(String::as_str))
                .map_err(|e| v.error(e))
                .ok()
        });
    }
    p.allow_private_network = t.bool("allow_private_network");
    p.embed = t.bool("embed");
    if let Some(v) = t.get("frame_ancestors") {
        p.frame_ancestors = checked_list(&v, embed::check_source);
    }
    p.rewrite_redirects = t.bool("rewrite_redirects");
    p.inject_shim = t.bool("inject_shim");
    if let Some(v) = t.get("cookies") {
        p.cookies = v.parse_str(|s| match s {
            "host" => Ok(Cookies::Host),
            "passthrough" => Ok(Cookies::Passthrough),
            _ => Err(format!("cookies {s:?} is not \"host\" or \"passthrough\"")),
        });
    }
    if let Some(v) = t.get("service_workers") {
        p.service_workers = v.parse_str(|s| match s {
            "edge-only" => Ok(ServiceWorkers::EdgeOnly),
            "allow" => Ok(ServiceWorkers::Allow),
            _ => Err(format!(
                "service_workers {s:?} is not \"edge-only\" or \"allow\""
            )),
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(extra: &str) -> Vec<String> {
        let text = format!("[[domains]]\nname = \"example.com\"\n{extra}");
        match Config::parse(Path::new("t.toml"), &text) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn permissive_without_allow_origins_is_refused_where_it_is_set() {
        let p = problems("[[policy]]\nport = \"*\"\ncors = \"permissive\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with(
                "t.toml:5:8: policy[1].cors: cors = \"permissive\" needs allow_origins"
            ),
            "{p:?}"
        );
        // a port policy inherits the list from "*"
        let ok = "[[policy]]\nport = \"*\"\nallow_origins = [\"https://a.example\"]\n\
                  [[policy]]\nport = 3000\ncors = \"permissive\"\n";
        assert!(problems(ok).is_empty());
        let p = problems("[[policy]]\nport = 3000\ncors = \"permissive\"\n");
        assert!(p[0].starts_with("t.toml:5:8: policy[1].cors"), "{p:?}");
    }

    #[test]
    fn bad_origins_and_any_site_frame_ancestors_are_refused_item_by_item() {
        let p = problems(
            "[[policy]]\nport = \"*\"\ncors = \"permissive\"\n\
             allow_origins = [\"https://ok.example\", \"https://*.com\", \"https://x/\"]\n\
             frame_ancestors = [\"'self'\", \"*\"]\n",
        );
        let keys: Vec<&str> = p
            .iter()
            .map(|l| l.split(": ").nth(1).unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            [
                "policy[1].allow_origins[2]",
                "policy[1].allow_origins[3]",
                "policy[1].frame_ancestors[2]"
            ],
            "{p:?}"
        );
        let p =
            problems("[[policy]]\nport = \"*\"\nallow_origins = [\"*\", \"https://a.example\"]\n");
        assert!(p[0].contains("must be the only entry"), "{p:?}");
    }

    #[test]
    fn new_keys_parse_and_reject_unknown_values() {
        let ok = "[[policy]]\nport = \"*\"\ncookies = \"passthrough\"\n\
                  service_workers = \"allow\"\nallow_private_network = true\n";
        assert!(problems(ok).is_empty());
        let p =
            problems("[[policy]]\nport = \"*\"\ncookies = \"none\"\nservice_workers = \"yes\"\n");
        assert_eq!(p.len(), 2, "{p:?}");
    }

    #[test]
    fn a_passed_port_header_on_an_unreachable_port_is_refused() {
        let p = problems(
            "[ports]\ndeny = [39379]\n[[policy]]\nport = 39379\n\
             pass_client_headers = [\"X-Cmux-Port-Internal\"]\n",
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("policy[1].pass_client_headers"), "{p:?}");
        let ok = "[ports]\ndeny = [22]\n[[policy]]\nport = 39379\n\
                  pass_client_headers = [\"X-Cmux-Port-Internal\"]\n";
        assert!(problems(ok).is_empty());
    }
}
