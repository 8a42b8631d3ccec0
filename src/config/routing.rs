//! `[[domains]]`, `[[routes]]` and `[ports]`: which hosts are served and which VM ports reached.

use super::*;

pub(super) fn domains(top: &Table) -> Vec<Domain> {
    let tables = top.tables("domains", &["name", "apex"]);
    if tables.is_empty() && top.get("domains").is_none() {
        top.ctx().report(
            &(0..0),
            "domains",
            "at least one [[domains]] entry is needed",
        );
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for t in tables {
        let Some(name_val) = t.require("name") else {
            continue;
        };
        let Some(name) = name_val.parse_str(parse_domain) else {
            continue;
        };
        if !seen.insert(name.clone()) {
            name_val.error(format!("domain {name:?} is listed twice"));
            continue;
        }
        let mut d = Domain {
            name,
            apex_status: 200,
            apex_body: "cmux-edge".into(),
        };
        if let Some(apex) = t.table("apex", &["status", "body"]) {
            if let Some(v) = apex.get("status") {
                match v.int() {
                    Some(n) if (200..=599).contains(&n) => d.apex_status = n as u16,
                    Some(_) => v.error("status must be between 200 and 599"),
                    None => {}
                }
            }
            if let Some(b) = apex.str("body") {
                d.apex_body = b.to_owned();
            }
        }
        out.push(d);
    }
    out
}

pub(super) fn parse_domain(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a lowercase domain name like \"example.com\" (no wildcard, no dot at either end)"
        ))
    }
}

pub(super) fn routes(top: &Table) -> Vec<Pattern> {
    let tables = top.tables("routes", &["pattern", "regex"]);
    if top.get("routes").is_none() {
        return Pattern::template(DEFAULT_PATTERN).into_iter().collect();
    }
    let mut out = Vec::new();
    for t in tables {
        let compiled = match (t.get("pattern"), t.get("regex")) {
            (Some(p), None) => p.parse_str(|s| Pattern::template(s).map_err(|e| e.to_string())),
            (None, Some(r)) => r.parse_str(|s| Pattern::regex(s).map_err(|e| e.to_string())),
            (Some(_), Some(r)) => {
                r.error("a route has either pattern or regex, not both");
                None
            }
            (None, None) => {
                t.missing("pattern");
                None
            }
        };
        out.extend(compiled);
    }
    out
}

pub(super) fn port_list(v: Option<Val>) -> Option<Vec<(u16, u16)>> {
    let v = v?;
    let mut out = Vec::new();
    for item in v.array()? {
        let range = match item.value() {
            toml::de::DeValue::Integer(_) => item.int().and_then(|n| {
                u16::try_from(n)
                    .ok()
                    .filter(|&p| p >= 1)
                    .map(|p| (p, p))
                    .or_else(|| {
                        item.error("port must be 1-65535");
                        None
                    })
            }),
            _ => item.parse_str(parse_port_range),
        };
        out.extend(range);
    }
    Some(out)
}

pub(super) fn ports(top: &Table) -> PortSet {
    let Some(t) = top.table("ports", &["allow", "deny"]) else {
        return PortSet::new(&[(1, 65535)], &[]);
    };
    let allow = port_list(t.get("allow")).unwrap_or_else(|| vec![(1, 65535)]);
    let deny = port_list(t.get("deny")).unwrap_or_default();
    PortSet::new(&allow, &deny)
}
