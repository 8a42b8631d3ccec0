//! TLS termination (SPEC §8): the certificate store loaded from `certs_dir`, the SNI resolver
//! that hands rustls the right certificate per handshake, and ACME, which keeps a certificate
//! for `[tls.acme] domains` in that directory.
//!
//! The resolver holds the store behind an `ArcSwap`: a reload (file change, ACME renewal)
//! builds a whole new store and swaps it in; handshakes already under way keep the old one.

pub mod acme;
pub mod dns;
mod resolver;
pub mod settings;
mod store;

use std::path::Path;

pub use resolver::SniResolver;
pub use store::{dir_fingerprint, CertInfo, CertStore, LoadProblem};

use crate::metrics::METRICS;

/// Re-reads `dir` and swaps the result in. A file that stopped loading keeps its previous
/// certificate, so a half-written or corrupt file never takes a name out of service.
pub async fn reload_store(dir: &Path, resolver: &SniResolver) {
    let previous = resolver.store();
    let dir = dir.to_owned();
    let Ok((store, problems)) =
        tokio::task::spawn_blocking(move || CertStore::load_dir_over(&dir, &previous)).await
    else {
        return;
    };
    for p in problems {
        tracing::warn!("certificate skipped: {p}");
    }
    tracing::info!(certs = store.infos().len(), "certificates loaded");
    METRICS.certificates(store.infos());
    resolver.swap(store);
}
