//! `[limits]`: the bounds that always apply (`rewrite_max`, `rewrites`, SPEC §11).

use super::*;
use crate::rewrite::RewriteLimits;

pub(super) fn limits(top: &Table) -> RewriteLimits {
    let mut l = RewriteLimits::default();
    let Some(t) = top.table("limits", &["rewrite_max", "rewrites"]) else {
        return l;
    };
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

#[cfg(test)]
mod tests {
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
