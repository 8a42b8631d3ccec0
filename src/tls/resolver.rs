//! SNI certificate selection for rustls: exact name → `*.parent` wildcard; a handshake
//! without SNI gets the certificate of `default_sni` (the first configured domain).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, ResolvesServerCert};

use super::CertStore;

#[derive(Debug)]
pub struct SniResolver {
    store: ArcSwap<CertStore>,
    /// Name whose certificate answers handshakes without SNI; a name without a certificate
    /// gets none (the handshake fails with an alert), never this one.
    default_sni: Option<String>,
    /// When a handshake for a name without a certificate was last logged (bounded).
    unserved: DashMap<String, Instant>,
}

/// A name without a certificate is logged at most this often, so a scanner cannot flood the log.
const UNSERVED_LOG_EVERY: Duration = Duration::from_secs(600);
const UNSERVED_NAMES: usize = 1024;

impl SniResolver {
    pub fn new(store: CertStore, default_sni: Option<String>) -> SniResolver {
        SniResolver {
            store: ArcSwap::from_pointee(store),
            default_sni,
            unserved: DashMap::new(),
        }
    }

    /// Replaces every certificate at once; new handshakes see the new set.
    pub fn swap(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }

    pub fn store(&self) -> Arc<CertStore> {
        self.store.load_full()
    }

    /// The certificate a handshake for `sni` gets. A client that names no server (an IP
    /// address in the URL) gets the default; a name we have no certificate for gets none.
    pub fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let store = self.store.load();
        match sni {
            Some(n) => store.find(&n.to_ascii_lowercase()).cloned(),
            None => self
                .default_sni
                .as_deref()
                .and_then(|d| store.find(d).cloned()),
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let picked = self.pick(hello.server_name());
        if picked.is_none() {
            self.log_unserved(hello.server_name().unwrap_or("(no SNI)"));
        }
        picked
    }
}

impl SniResolver {
    /// Warns once per name per [`UNSERVED_LOG_EVERY`]; the handshake fails with an alert.
    fn log_unserved(&self, name: &str) {
        let now = Instant::now();
        if let Some(last) = self.unserved.get(name) {
            if now.duration_since(*last) < UNSERVED_LOG_EVERY {
                return;
            }
        }
        if self.unserved.len() >= UNSERVED_NAMES {
            self.unserved.clear();
        }
        self.unserved.insert(name.chars().take(253).collect(), now);
        tracing::warn!(
            sni = name,
            "TLS handshake refused: no certificate for this name"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &std::path::Path, file: &str, names: &[&str]) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&key)
                .unwrap();
        std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    }

    #[test]
    fn exact_then_wildcard_default_only_without_sni() {
        let dir = tempfile::tempdir().unwrap();
        pair(dir.path(), "wild", &["*.example.com", "example.com"]);
        pair(dir.path(), "exact", &["port-1-vm-a.example.com"]);
        let (store, problems) = CertStore::load_dir(dir.path());
        assert!(problems.is_empty(), "{problems:?}");
        let names = |ck: Option<Arc<CertifiedKey>>| {
            let ck = ck.expect("a certificate");
            crate::tls::store::inspect(&ck.cert[0], dir.path())
                .unwrap()
                .names
        };
        let r = SniResolver::new(store, Some("example.com".into()));
        assert_eq!(
            names(r.pick(Some("PORT-1-vm-a.example.com"))),
            ["port-1-vm-a.example.com"]
        );
        assert_eq!(
            names(r.pick(Some("port-2-vm-a.example.com")))[0],
            "*.example.com"
        );
        assert_eq!(names(r.pick(None))[0], "*.example.com");
        assert!(r.pick(Some("other.org")).is_none(), "unknown names fail");
        assert!(r.pick(Some("a.b.example.com")).is_none());
    }
}
