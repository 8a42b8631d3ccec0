//! SNI certificate selection for rustls: exact name → `*.parent` wildcard → `default_sni`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, ResolvesServerCert};

use super::CertStore;

#[derive(Debug)]
pub struct SniResolver {
    store: ArcSwap<CertStore>,
    /// Name whose certificate answers handshakes without SNI or for unknown names.
    default_sni: Option<String>,
}

impl SniResolver {
    pub fn new(store: CertStore, default_sni: Option<String>) -> SniResolver {
        SniResolver {
            store: ArcSwap::from_pointee(store),
            default_sni,
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
            tracing::debug!(sni = hello.server_name(), "no certificate for handshake");
        }
        picked
    }
}
