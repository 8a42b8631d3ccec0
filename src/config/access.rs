//! `[access]`: the keys control-plane tokens are checked with, and the edge's session cookie
//! (SPEC §12). Keys are decoded here too, so `check` points at a bad secret or PEM file.

use std::path::Path;
use std::time::Duration;

use super::reader::{Table, Val};
use super::resolve_secret;
use crate::access::{check_key, AccessSettings, KeySettings, KeySource};
use crate::tls::settings::Secret;

pub(super) fn access(top: &Table, base: &Path) -> Option<AccessSettings> {
    let Some(t) = top.table("access", &["keys", "session", "cookie", "session_secret"]) else {
        token_without_access(top);
        return None;
    };
    let mut s = AccessSettings {
        keys: Vec::new(),
        session: Duration::from_secs(12 * 3600),
        cookie: crate::access::DEFAULT_COOKIE.into(),
        session_secret: None,
    };
    if let Some(v) = t.require("keys") {
        let items = v.array().unwrap_or_default();
        if items.is_empty() {
            v.error("at least one key is needed");
        }
        for item in items {
            if let Some(k) = key(&item, base) {
                if s.keys.iter().any(|o| o.id == k.id) {
                    item.error(format!("key id {:?} is listed twice", k.id));
                } else {
                    s.keys.push(k);
                }
            }
        }
    }
    if let Some(v) = t.get("session") {
        match v.duration() {
            Some(d) if d < Duration::from_secs(1) => v.error("must be at least 1s"),
            Some(d) => s.session = d,
            None => {}
        }
    }
    if let Some(v) = t.get("cookie") {
        s.cookie = v
            .parse_str(|c| {
                let token_char =
                    |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
                if c.is_empty() || !c.bytes().all(token_char) {
                    Err(format!("{c:?} is not a cookie name"))
                } else if c.starts_with("__Host-") || c.starts_with("__Secure-") {
                    Err("leave the prefix out: __Host- is added on HTTPS".into())
                } else {
                    Ok(c.to_owned())
                }
            })
            .unwrap_or(s.cookie);
    }
    if let Some(v) = t.get("session_secret") {
        s.session_secret = v.parse_str(|x| resolve_secret(x).map(|x| Secret(x.into_bytes())));
    }
    let has_hs256 = s
        .keys
        .iter()
        .any(|k| matches!(k.source, KeySource::Secret(_)));
    if !has_hs256 && s.session_secret.is_none() && !s.keys.is_empty() {
        t.missing("session_secret");
    }
    Some(s)
}

/// `{ id = "k1", secret = "env:..." }` or `{ id = "k2", public_key = "k2.pem" }`.
fn key(v: &Val, base: &Path) -> Option<KeySettings> {
    let t = v.table(&["id", "secret", "public_key"])?;
    let id = t.require("id").and_then(|i| {
        i.parse_str(|s| {
            if s.is_empty() || s.len() > 64 || s.chars().any(|c| c.is_control()) {
                Err(format!("{s:?} is not a key id (1-64 printable characters)"))
            } else {
                Ok(s.to_owned())
            }
        })
    })?;
    let source = match (t.get("secret"), t.get("public_key")) {
        (Some(s), None) => s.parse_str(|x| {
            let secret = resolve_secret(x)?;
            if secret.len() < 32 {
                return Err("an HS256 secret needs at least 32 bytes".into());
            }
            Ok(KeySource::Secret(Secret(secret.into_bytes())))
        })?,
        (None, Some(p)) => p.parse_str(|file| {
            let path = base.join(file);
            std::fs::read(&path)
                .map(KeySource::Ed25519Pem)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        })?,
        _ => {
            v.error("a key has either secret (HS256) or public_key (Ed25519 PEM)");
            return None;
        }
    };
    let k = KeySettings { id, source };
    if let Err(e) = check_key(&k) {
        v.error(e);
        return None;
    }
    Some(k)
}

/// `access = "token"` in a `[[policy]]` without `[access]` would silently stay public.
fn token_without_access(top: &Table) {
    let Some(policies) = top.get("policy") else {
        return;
    };
    let toml::de::DeValue::Array(items) = policies.value() else {
        return;
    };
    for item in items {
        let toml::de::DeValue::Table(t) = item.get_ref() else {
            continue;
        };
        if let Some(v) = t.get("access") {
            if matches!(v.get_ref(), toml::de::DeValue::String(s) if s == "token") {
                policies.ctx_report(
                    &v.span(),
                    "access = \"token\" needs an [access] section with keys",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn parse(extra: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(
            Path::new("t.toml"),
            &format!("[[domains]]\nname = \"example.com\"\n{extra}"),
        )
    }

    #[test]
    fn access_defaults_and_keys() {
        let c = parse(&format!(
            "[access]\nkeys = [ {{ id = \"k1\", secret = \"{SECRET}\" }} ]\n"
        ))
        .unwrap();
        let a = c.access.unwrap();
        assert_eq!(a.keys.len(), 1);
        assert_eq!(a.session, std::time::Duration::from_secs(12 * 3600));
        assert_eq!(a.cookie, "cmux_edge_session");
        assert_eq!(
            c.policies.for_port(1).access,
            crate::access::Visibility::Token
        );
        assert!(parse("").unwrap().access.is_none());
    }

    #[test]
    fn bad_keys_are_reported_where_they_stand() {
        let err = parse(&format!(
            "[access]\nkeys = [ {{ id = \"k1\", secret = \"short\" }}, \
             {{ id = \"k2\", secret = \"{SECRET}\" }}, {{ id = \"k2\", secret = \"{SECRET}\" }}, \
             {{ id = \"k3\", public_key = \"missing.pem\" }}, {{ id = \"k4\" }} ]\n\
             cookie = \"__Host-x\"\nsession = \"0s\"\n"
        ))
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(
                "t.toml:4:32: access.keys[1].secret: an HS256 secret needs at least 32 bytes"
            ),
            "{text}"
        );
        assert!(
            text.contains("access.keys[3]: key id \"k2\" is listed twice"),
            "{text}"
        );
        assert!(
            text.contains("access.keys[4].public_key: cannot read"),
            "{text}"
        );
        assert!(
            text.contains("access.keys[5]: a key has either secret"),
            "{text}"
        );
        assert!(
            text.contains("access.cookie: leave the prefix out"),
            "{text}"
        );
        assert!(
            text.contains("access.session: must be at least 1s"),
            "{text}"
        );
    }

    #[test]
    fn public_keys_alone_need_a_session_secret() {
        let dir = tempfile::tempdir().unwrap();
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap()
            .public_key_pem();
        std::fs::write(dir.path().join("k.pem"), pem).unwrap();
        let text = "[[domains]]\nname = \"example.com\"\n[access]\nkeys = [ { id = \"k\", public_key = \"k.pem\" } ]\n".to_owned();
        let err = Config::parse(&dir.path().join("t.toml"), &text).unwrap_err();
        assert_eq!(err.problems[0].key, "access.session_secret", "{err}");
        let ok = format!("{text}session_secret = \"{SECRET}\"\n");
        assert!(Config::parse(&dir.path().join("t.toml"), &ok).is_ok());
        // a PEM that is not an Ed25519 public key is refused at load
        std::fs::write(dir.path().join("k.pem"), "not a pem").unwrap();
        let err = Config::parse(&dir.path().join("t.toml"), &ok).unwrap_err();
        assert_eq!(err.problems[0].key, "access.keys[1]", "{err}");
    }

    #[test]
    fn a_port_policy_says_public_or_token() {
        let c = parse(&format!(
            "[access]\nkeys = [ {{ id = \"k1\", secret = \"{SECRET}\" }} ]\n\
             [[policy]]\nport = 3000\naccess = \"public\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.policies.for_port(3000).access,
            crate::access::Visibility::Public
        );
        assert_eq!(
            c.policies.for_port(3001).access,
            crate::access::Visibility::Token
        );
        let err = parse("[[policy]]\nport = 1\naccess = \"open\"\n").unwrap_err();
        assert!(err.to_string().contains("access \"open\" is not"), "{err}");
    }
}
