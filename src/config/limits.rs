//! `[limits]` (SPEC §11): per-client and per-VM limits, each off unless set, and the bounds
//! of HTML rewriting (`rewrite_max`, `rewrites`), which always apply.

use super::*;
use crate::limits::{LimitSettings, RatePer};
use crate::rewrite::RewriteLimits;

/// Every key of `[limits]`.
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

pub(super) fn limits(top: &Table) -> (LimitSettings, RewriteLimits) {
    let mut l = LimitSettings::default();
    let Some(t) = top.table("limits", KEYS) else {
        return (l, RewriteLimits::default());
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
    (l, rewrite(&t))
}

/// `rewrite_max` and `rewrites`: the bounds of HTML rewriting, which always apply.
fn rewrite(t: &Table) -> RewriteLimits {
    let mut l = RewriteLimits::default();
    if let Some(v) = t.get("rewrite_max") {
        let size = match v.value() {
            toml::de::DeValue::Integer(_) => v.int().and_then(|n| u64::try_from(n).ok()),
            _ => v.parse_str(parse_size),
        };
        match size {
            Some(n) if n >= 64 * 1024 => l.max_decoded = n,
            Some(_) => v.error("rewrite_max must be at least 64KiB"),
            None if v.str().is_none() && v.int().is_some() => {
                v.error("rewrite_max must be a size like \"16MiB\"")
            }
            None => {}
        }
    }
    if let Some(v) = t.get("rewrites") {
        match v.int() {
            Some(n) if (1..=1_000_000).contains(&n) => l.concurrent = n as usize,
            Some(_) => v.error("rewrites must be between 1 and 1000000"),
            None => {}
        }
    }
    l
}

/// `"16MiB"`, `"512KiB"`, `"1GiB"`, `"1048576"` (bytes).
pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("{s:?} is not a size like \"16MiB\", \"512KiB\" or a number of bytes");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
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

#[cfg(test)]
mod rewrite_tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text)
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("16MB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }

    #[test]
    fn limits_have_defaults_and_are_checked() {
        let d = "[[domains]]\nname = \"example.com\"\n";
        let c = parse(d).unwrap();
        assert_eq!(c.rewrite_limits.max_decoded, 16 << 20);
        assert_eq!(c.rewrite_limits.concurrent, 256);
        let c = parse(&format!(
            "[limits]\nrewrite_max = \"512KiB\"\nrewrites = 3\n{d}"
        ))
        .unwrap();
        assert_eq!(c.rewrite_limits.max_decoded, 512 << 10);
        assert_eq!(c.rewrite_limits.concurrent, 3);
        let c = parse(&format!("[limits]\nrewrite_max = 1048576\n{d}")).unwrap();
        assert_eq!(c.rewrite_limits.max_decoded, 1 << 20);
        for bad in [
            "rewrite_max = \"16MB\"",
            "rewrite_max = 10",
            "rewrites = 0",
            "nope = 1",
        ] {
            let e = parse(&format!("[limits]\n{bad}\n{d}")).unwrap_err();
            assert!(e.to_string().contains("t.toml:2:"), "{bad}: {e}");
        }
    }
}
