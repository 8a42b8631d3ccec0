//! `[limits]` (SPEC §11): per-client and per-VM limits, each off unless set.

use super::reader::{Table, Val};
use crate::limits::{LimitSettings, RatePer};

/// Every key of `[limits]`. `rewrite_max` and `rewrites` (bounded HTML rewriting) are parsed
/// by the rewrite-bounds code, not here: they are listed only so that one allowed-key list
/// covers the whole section when both parts are merged.
const KEYS: &[&str] = &[
    "connections_per_ip",
    "requests_per_ip",
    "burst_per_ip",
    "requests_per_vm",
    "websockets_per_vm",
    "unknown_ids_per_ip",
    "dry_run",
    "rewrite_max",
    "rewrites",
];

pub(super) fn limits(top: &Table) -> LimitSettings {
    let mut l = LimitSettings::default();
    let Some(t) = top.table("limits", KEYS) else {
        return l;
    };
    let count = |key: &str| t.get(key).and_then(|v| positive(&v));
    l.connections_per_ip = count("connections_per_ip");
    l.burst_per_ip = count("burst_per_ip");
    l.requests_per_vm = count("requests_per_vm");
    l.websockets_per_vm = count("websockets_per_vm");
    l.requests_per_ip = t
        .get("requests_per_ip")
        .and_then(|v| v.parse_str(RatePer::parse));
    l.unknown_ids_per_ip = t
        .get("unknown_ids_per_ip")
        .and_then(|v| v.parse_str(RatePer::parse));
    l.dry_run = t.bool("dry_run").unwrap_or(false);
    if let (Some(v), None) = (t.get("burst_per_ip"), t.get("requests_per_ip")) {
        v.error("burst_per_ip needs requests_per_ip");
    }
    l
}

/// A count of at least 1 that fits in a `u32`.
fn positive(v: &Val) -> Option<u32> {
    let n = v.int()?;
    match u32::try_from(n) {
        Ok(n) if n > 0 => Some(n),
        _ => {
            v.error("must be a whole number from 1 to 4294967295");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::config::Config;
    use crate::limits::{LimitSettings, RatePer};

    const MINIMAL: &str = "[[domains]]\nname = \"example.com\"\n";

    fn parse(limits: &str) -> Result<LimitSettings, String> {
        Config::parse(Path::new("t.toml"), &format!("{MINIMAL}[limits]\n{limits}"))
            .map(|c| c.limits)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn every_limit_is_off_unless_set() {
        let c = Config::parse(Path::new("t.toml"), MINIMAL).unwrap();
        assert_eq!(c.limits, LimitSettings::default());
        assert_eq!(parse("").unwrap(), LimitSettings::default());
    }

    #[test]
    fn the_spec_example_parses() {
        let l = parse(
            "connections_per_ip = 256\nrequests_per_ip = \"50/s\"\nburst_per_ip = 200\n\
             requests_per_vm = 1000\nwebsockets_per_vm = 500\nunknown_ids_per_ip = \"10/min\"\n\
             dry_run = true\n",
        )
        .unwrap();
        assert_eq!(l.connections_per_ip, Some(256));
        assert_eq!(
            l.requests_per_ip,
            Some(RatePer {
                count: 50,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(l.burst_per_ip, Some(200));
        assert_eq!(l.requests_per_vm, Some(1000));
        assert_eq!(l.websockets_per_vm, Some(500));
        assert_eq!(l.unknown_ids_per_ip.map(|r| r.count), Some(10));
        assert!(l.dry_run);
    }

    #[test]
    fn bad_values_are_reported_at_their_key() {
        let e = parse("requests_per_vm = 0\n").unwrap_err();
        assert!(
            e.contains("t.toml:4:") && e.contains("limits.requests_per_vm"),
            "{e}"
        );
        let e = parse("requests_per_ip = \"fast\"\n").unwrap_err();
        assert!(
            e.contains("limits.requests_per_ip") && e.contains("50/s"),
            "{e}"
        );
        let e = parse("burst_per_ip = 5\n").unwrap_err();
        assert!(e.contains("needs requests_per_ip"), "{e}");
        let e = parse("connections = 5\n").unwrap_err();
        assert!(e.contains("limits.connections"), "{e}");
    }
}
