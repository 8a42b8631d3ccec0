//! The `[tls]` and `[tls.acme]` settings, as validated by [`crate::config`].
//!
//! Secrets (API tokens, TSIG keys, EAB keys) are read from the environment at load time and
//! never appear in `Debug` output, so a logged config leaks nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub certs_dir: PathBuf,
    /// Plain-HTTP requests get a 308 to `https://` (ACME challenges excepted).
    pub redirect_http: bool,
    pub acme: Option<AcmeSettings>,
}

/// A secret value: bytes that `Debug` never shows.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AcmeSettings {
    /// The ACME directory URL (`letsencrypt`, `letsencrypt-staging` and `zerossl` are names
    /// for the well-known ones).
    pub directory: String,
    pub email: Option<String>,
    /// Extra roots for the ACME server's own HTTPS (Pebble, a private CA), read at load.
    pub ca_bundle: Vec<CertificateDer<'static>>,
    /// The names of the one certificate ordered, e.g. `["example.com", "*.example.com"]`.
    pub domains: Vec<String>,
    /// DNS-01 when set (required for wildcards); HTTP-01 otherwise.
    pub dns: Option<DnsSettings>,
    /// Renew this long before expiry; `None` = one third of the certificate's lifetime.
    pub renew_before: Option<Duration>,
    /// External account binding, for CAs that need it (ZeroSSL, Google).
    pub eab: Option<Eab>,
    /// How often the certificate is looked at even when nothing is due.
    pub check_interval: Duration,
    /// First wait after a failed order; doubled per failure (with jitter) up to `check_interval`.
    pub retry_after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Eab {
    pub kid: String,
    /// The decoded HMAC key.
    pub hmac_key: Secret,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DnsSettings {
    pub provider: DnsProviderSettings,
    /// Where TXT propagation is checked. Empty: the provider's authoritative servers.
    pub resolvers: Vec<SocketAddr>,
    /// How long to wait for the TXT records to be visible before giving up on an order.
    pub propagation_timeout: Duration,
    /// TTL of the TXT records written.
    pub ttl: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DnsProviderSettings {
    /// `command present|cleanup <fqdn> <value>`, lego's convention.
    Exec { command: PathBuf, timeout: Duration },
    /// Cloudflare's v4 API with a scoped API token (`Zone.DNS:Edit`).
    Cloudflare {
        api_token: Secret,
        /// `https://api.cloudflare.com/client/v4` unless overridden.
        api_url: String,
        /// Skips the zone lookup by name.
        zone_id: Option<String>,
    },
    /// TSIG-signed dynamic update (RFC 2136) to an authoritative server.
    Rfc2136 {
        server: SocketAddr,
        /// The zone to update; found by asking `server` for SOA records when absent.
        zone: Option<String>,
        key_name: String,
        key_secret: Secret,
        key_algorithm: TsigAlgorithm,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsigAlgorithm {
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

impl TsigAlgorithm {
    pub fn parse(s: &str) -> Result<TsigAlgorithm, String> {
        match s.to_ascii_lowercase().trim_end_matches('.') {
            "hmac-sha256" => Ok(TsigAlgorithm::HmacSha256),
            "hmac-sha384" => Ok(TsigAlgorithm::HmacSha384),
            "hmac-sha512" => Ok(TsigAlgorithm::HmacSha512),
            _ => Err(format!(
                "key_algorithm {s:?} is not \"hmac-sha256\", \"hmac-sha384\" or \"hmac-sha512\""
            )),
        }
    }
}

/// Let's Encrypt production, the default directory.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
pub const ZEROSSL: &str = "https://acme.zerossl.com/v2/DV90";
pub const CLOUDFLARE_API: &str = "https://api.cloudflare.com/client/v4";

/// A directory URL from its name or URL.
pub fn directory_url(s: &str) -> Result<String, String> {
    match s {
        "letsencrypt" => Ok(LETSENCRYPT.into()),
        "letsencrypt-staging" => Ok(LETSENCRYPT_STAGING.into()),
        "zerossl" => Ok(ZEROSSL.into()),
        url if url.starts_with("https://") => Ok(url.into()),
        _ => Err(format!(
            "directory {s:?} is not an https:// URL, \"letsencrypt\", \"letsencrypt-staging\" or \"zerossl\""
        )),
    }
}

/// `example.com` or `*.example.com`: lowercase DNS names of two labels or more.
pub fn acme_domain(s: &str) -> Result<String, String> {
    let lower = s.trim_end_matches('.').to_ascii_lowercase();
    let bare = lower.strip_prefix("*.").unwrap_or(&lower);
    let labels: Vec<&str> = bare.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) || bare.len() > 253 {
        return Err(format!(
            "{s:?} is not a DNS name (a wildcard may only be a leading \"*.\")"
        ));
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acme_domains_are_dns_names_with_at_most_a_leading_wildcard() {
        assert_eq!(acme_domain("Example.COM.").unwrap(), "example.com");
        assert_eq!(acme_domain("*.edge.test").unwrap(), "*.edge.test");
        for bad in ["com", "a.*.b", "*.com", "a..b", "-a.b", "a_b.c", ""] {
            assert!(acme_domain(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn directory_names_and_urls() {
        assert_eq!(directory_url("letsencrypt").unwrap(), LETSENCRYPT);
        assert!(directory_url("http://insecure/dir").is_err());
        assert!(directory_url("https://127.0.0.1:14000/dir").is_ok());
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let s = Secret(b"hunter2".to_vec());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
