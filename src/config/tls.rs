//! `[tls]` and `[tls.acme]`: certificate directory, HTTP→HTTPS redirect, and the ACME order
//! with its DNS provider.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;

use super::reader::{Table, Val};
use super::{pem_bundle, resolve_secret, Listen};
use crate::tls::settings::{
    acme_domain, directory_url, AcmeSettings, DnsProviderSettings, DnsSettings, Eab, Secret,
    TlsSettings, TsigAlgorithm, CLOUDFLARE_API, LETSENCRYPT,
};

pub(super) fn tls(top: &Table, base: &Path, listen: &Listen) -> TlsSettings {
    let mut s = TlsSettings {
        certs_dir: base.join("certs"),
        redirect_http: false,
        acme: None,
    };
    let Some(t) = top.table("tls", &["certs_dir", "redirect_http", "acme"]) else {
        return s;
    };
    if let Some(d) = t.str("certs_dir") {
        s.certs_dir = base.join(d);
    }
    if let Some(r) = t.bool("redirect_http") {
        if r && listen.https.is_none() {
            if let Some(v) = t.get("redirect_http") {
                v.error("redirect_http needs a [listen] https listener to redirect to");
            }
        }
        s.redirect_http = r;
    }
    if let Some(a) = t.get("acme") {
        s.acme = acme(&a, base, listen);
    }
    s
}

fn acme(v: &Val, base: &Path, listen: &Listen) -> Option<AcmeSettings> {
    let t = v.table(&[
        "directory",
        "email",
        "ca_bundle",
        "domains",
        "dns",
        "renew_before",
        "eab",
        "check_interval",
        "retry_after",
    ])?;
    let mut a = AcmeSettings {
        directory: LETSENCRYPT.into(),
        email: None,
        ca_bundle: Vec::new(),
        domains: Vec::new(),
        dns: None,
        renew_before: None,
        eab: None,
        check_interval: Duration::from_secs(6 * 3600),
        retry_after: Duration::from_secs(60),
    };
    if let Some(d) = t.get("directory") {
        a.directory = d.parse_str(directory_url).unwrap_or_default();
    }
    if let Some(e) = t.get("email") {
        a.email = e.parse_str(|s| {
            if s.contains('@') && !s.contains([' ', ',', '\n']) {
                Ok(s.to_owned())
            } else {
                Err(format!("{s:?} is not an email address"))
            }
        });
    }
    if let Some(c) = t.get("ca_bundle") {
        a.ca_bundle = c
            .parse_str(|f| pem_bundle(base, f).map(|(_, certs)| certs))
            .unwrap_or_default();
    }
    if let Some(d) = t.require("domains") {
        let items = d.array().unwrap_or_default();
        if items.is_empty() {
            d.error("at least one domain is needed");
        }
        for item in items {
            if let Some(name) = item.parse_str(acme_domain) {
                if a.domains.contains(&name) {
                    item.error(format!("{name} is listed twice"));
                } else {
                    a.domains.push(name);
                }
            }
        }
    }
    if let Some(dns) = t.get("dns") {
        a.dns = dns_settings(&dns, base);
    }
    for (key, slot) in [
        ("check_interval", &mut a.check_interval),
        ("retry_after", &mut a.retry_after),
    ] {
        if let Some(v) = t.get(key) {
            match v.duration() {
                Some(d) if d.is_zero() => v.error("must be longer than zero"),
                Some(d) => *slot = d,
                None => {}
            }
        }
    }
    if let Some(v) = t.get("renew_before") {
        a.renew_before = v.duration();
    }
    if let Some(e) = t.get("eab") {
        a.eab = eab(&e);
    }
    let wildcard = a.domains.iter().find(|d| d.starts_with("*."));
    // A `dns` that failed to validate has been reported already.
    if t.get("dns").is_none() {
        if let Some(w) = wildcard {
            v.error(format!(
                "{w} can only be validated through DNS-01: set dns = {{ provider = ... }}"
            ));
        } else if listen.http.is_none() {
            v.error("HTTP-01 (no dns provider set) needs a [listen] http listener on port 80");
        }
    }
    if listen.https.is_none() {
        v.error("ACME certificates need a [listen] https listener to serve them");
    }
    Some(a)
}

fn eab(v: &Val) -> Option<Eab> {
    let t = v.table(&["kid", "hmac_key"])?;
    let kid = t.require("kid").and_then(|k| k.str().map(str::to_owned));
    let key = t.require("hmac_key").and_then(|k| {
        k.parse_str(|s| {
            let raw = resolve_secret(s)?;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(raw.trim().trim_end_matches('='))
                .map_err(|_| "hmac_key is not base64url".to_owned())
        })
    });
    Some(Eab {
        kid: kid?,
        hmac_key: Secret(key?),
    })
}

/// Keys of `dns` that belong to one provider or another.
const PROVIDER_KEYS: [&str; 10] = [
    "command",
    "timeout",
    "api_token",
    "api_url",
    "zone_id",
    "server",
    "zone",
    "key_name",
    "key_secret",
    "key_algorithm",
];

fn dns_settings(v: &Val, base: &Path) -> Option<DnsSettings> {
    let mut known = vec!["provider", "resolvers", "propagation_timeout", "ttl"];
    known.extend(PROVIDER_KEYS);
    let t = v.table(&known)?;
    let provider = t.require("provider")?;
    let name = provider.str()?;
    // Keys that belong to another provider are mistakes worth naming.
    let own: &[&str] = match name {
        "exec" => &["command", "timeout"],
        "cloudflare" => &["api_token", "api_url", "zone_id"],
        "rfc2136" => &["server", "zone", "key_name", "key_secret", "key_algorithm"],
        _ => &[],
    };
    for key in PROVIDER_KEYS {
        if !own.contains(&key) && !own.is_empty() {
            if let Some(k) = t.get(key) {
                k.error(format!("{key} does not apply to provider {name:?}"));
            }
        }
    }
    let provider = match name {
        "exec" => {
            let command = t
                .require("command")
                .and_then(|c| c.str().map(|s| resolve_command(s, base)));
            let timeout = t.duration("timeout").unwrap_or(Duration::from_secs(60));
            DnsProviderSettings::Exec {
                command: command?,
                timeout,
            }
        }
        "cloudflare" => {
            let token = t
                .require("api_token")
                .and_then(|v| v.parse_str(resolve_secret));
            let api_url = match t.get("api_url") {
                Some(u) => u.parse_str(|s| {
                    if s.starts_with("https://") || s.starts_with("http://") {
                        Ok(s.trim_end_matches('/').to_owned())
                    } else {
                        Err(format!("{s:?} is not an http(s) URL"))
                    }
                })?,
                None => CLOUDFLARE_API.into(),
            };
            DnsProviderSettings::Cloudflare {
                api_token: Secret(token?.into_bytes()),
                api_url,
                zone_id: t.str("zone_id").map(str::to_owned),
            }
        }
        "rfc2136" => {
            let server = t.require("server").and_then(|s| s.parse_str(dns_server));
            let zone = match t.get("zone") {
                Some(z) => Some(z.parse_str(acme_domain_or_tld)?),
                None => None,
            };
            let key_name = t
                .require("key_name")
                .and_then(|k| k.str().map(str::to_owned));
            let key_secret = t.require("key_secret").and_then(|k| {
                k.parse_str(|s| {
                    let raw = resolve_secret(s)?;
                    base64::engine::general_purpose::STANDARD
                        .decode(raw.trim())
                        .map_err(|_| {
                            "key_secret is not base64 (as tsig-keygen prints it)".to_owned()
                        })
                })
            });
            let key_algorithm = match t.get("key_algorithm") {
                Some(a) => a.parse_str(TsigAlgorithm::parse)?,
                None => TsigAlgorithm::HmacSha256,
            };
            DnsProviderSettings::Rfc2136 {
                server: server?,
                zone,
                key_name: key_name?,
                key_secret: Secret(key_secret?),
                key_algorithm,
            }
        }
        other => {
            provider.error(format!(
                "provider {other:?} is not \"cloudflare\", \"rfc2136\" or \"exec\""
            ));
            return None;
        }
    };
    let mut resolvers = Vec::new();
    if let Some(r) = t.get("resolvers") {
        for item in r.array().unwrap_or_default() {
            if let Some(a) = item.parse_str(dns_server) {
                resolvers.push(a);
            }
        }
    }
    let ttl = match t.get("ttl") {
        Some(v) => match v.int() {
            Some(n) if (1..=86400).contains(&n) => n as u32,
            Some(_) => {
                v.error("ttl must be between 1 and 86400 seconds");
                60
            }
            None => 60,
        },
        None => 60,
    };
    Some(DnsSettings {
        provider,
        resolvers,
        propagation_timeout: t
            .duration("propagation_timeout")
            .unwrap_or(Duration::from_secs(120)),
        ttl,
    })
}

fn dns_server(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address like \"127.0.0.1:53\""))
}

/// A zone may be a bare TLD-like name in test setups, so only the characters are checked.
fn acme_domain_or_tld(s: &str) -> Result<String, String> {
    let z = s.trim_end_matches('.').to_ascii_lowercase();
    if z.is_empty()
        || z.split('.').any(|l| l.is_empty())
        || !z
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!("{s:?} is not a zone name"));
    }
    Ok(z)
}

/// A command with a slash is a path (relative to the config); a bare name is looked up in PATH.
fn resolve_command(s: &str, base: &Path) -> PathBuf {
    if s.contains('/') {
        base.join(s)
    } else {
        PathBuf::from(s)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};
    use crate::tls::settings::{DnsProviderSettings, LETSENCRYPT};

    const LISTEN: &str =
        "[listen]\nhttp = \"127.0.0.1:8080\"\nhttps = \"127.0.0.1:8443\"\n[[domains]]\nname = \"example.com\"\n";

    fn parse(tls: &str) -> Result<Config, ConfigError> {
        Config::parse(
            Path::new("/etc/cmux/routes.toml"),
            &format!("{LISTEN}{tls}"),
        )
    }

    fn problems(tls: &str) -> Vec<String> {
        parse(tls)
            .unwrap_err()
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn an_rfc2136_wildcard_order_parses_with_defaults() {
        let c = parse(
            "[tls.acme]\ndomains = [\"example.com\", \"*.Example.com\"]\n\
             dns = { provider = \"rfc2136\", server = \"127.0.0.1:53\", key_name = \"k.\", key_secret = \"c2VjcmV0\" }\n",
        )
        .unwrap();
        let a = c.tls.acme.unwrap();
        assert_eq!(a.directory, LETSENCRYPT);
        assert_eq!(a.domains, ["example.com", "*.example.com"]);
        assert_eq!(a.renew_before, None, "one third of the lifetime");
        let dns = a.dns.unwrap();
        assert_eq!(dns.ttl, 60);
        match dns.provider {
            DnsProviderSettings::Rfc2136 { key_secret, .. } => assert_eq!(key_secret.0, b"secret"),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.tls.certs_dir, Path::new("/etc/cmux/certs"));
    }

    #[test]
    fn a_wildcard_without_a_dns_provider_is_refused_where_it_is_written() {
        let p = problems("[tls.acme]\ndomains = [\"*.example.com\"]\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("routes.toml:6:"), "{p:?}");
        assert!(p[0].contains("DNS-01"), "{p:?}");
    }

    #[test]
    fn bad_acme_values_each_get_their_own_line() {
        let p = problems(
            "[tls.acme]\ndirectory = \"http://plain\"\nemail = \"nobody\"\ndomains = [\"a..b\"]\n\
             dns = { provider = \"route53\" }\n",
        );
        let all = p.join("\n");
        assert!(all.contains("tls.acme.directory"), "{all}");
        assert!(all.contains("tls.acme.email"), "{all}");
        assert!(all.contains("tls.acme.domains[1]"), "{all}");
        assert!(all.contains("provider \"route53\""), "{all}");
    }

    #[test]
    fn keys_of_another_provider_and_unset_secrets_are_refused() {
        let p = problems(
            "[tls.acme]\ndomains = [\"example.com\"]\n\
             dns = { provider = \"exec\", command = \"/bin/true\", api_token = \"x\" }\n",
        );
        assert!(
            p.join("\n")
                .contains("api_token does not apply to provider \"exec\""),
            "{p:?}"
        );
        let p = problems(
            "[tls.acme]\ndomains = [\"example.com\"]\n\
             dns = { provider = \"cloudflare\", api_token = \"env:CMUX_EDGE_SURELY_UNSET_CF\" }\n",
        );
        assert!(
            p.join("\n")
                .contains("CMUX_EDGE_SURELY_UNSET_CF is not set"),
            "{p:?}"
        );
    }

    #[test]
    fn a_ca_bundle_is_read_at_load_and_a_missing_one_is_named_where_it_is_written() {
        let p =
            problems("[tls.acme]\ndomains = [\"example.com\"]\nca_bundle = \"no-such-ca.pem\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("routes.toml:8:13: tls.acme.ca_bundle"),
            "{p:?}"
        );
        assert!(p[0].contains("/etc/cmux/no-such-ca.pem"), "{p:?}");
    }

    #[test]
    fn redirect_http_needs_an_https_listener() {
        let c = Config::parse(
            Path::new("r.toml"),
            "[[domains]]\nname = \"example.com\"\n[tls]\nredirect_http = true\n",
        );
        let e = c.unwrap_err().to_string();
        assert!(e.contains("redirect_http needs a [listen] https"), "{e}");
    }
}
