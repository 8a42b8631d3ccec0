//! SNI certificate selection for rustls: exact name → `*.parent` wildcard → `default_sni`.

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
    /// Name whose certificate answers handshakes without SNI or for unknown names.
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

    /// The certificate a handshake for `sni` gets.
    pub fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let store = self.store.load();
        let by_name = sni.and_then(|n| store.find(&n.to_ascii_lowercase()).cloned());
        by_name.or_else(|| {
            self.default_sni
                .as_deref()
                .and_then(|d| store.find(d).cloned())
        })
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let picked = self.pick(hello.server_name());
        if picked.is_none() {
            self.log_unserved(hello.server_name().unwrap_or("-"));
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
