//! TLS termination: the certificate store loaded from `certs_dir` and the SNI resolver that
//! hands rustls the right certificate per handshake (SPEC §8).
//!
//! The resolver holds the store behind an `ArcSwap`: a reload (file change, ACME renewal)
//! builds a whole new store and swaps it in; handshakes already under way keep the old one.

mod resolver;
mod store;

pub use resolver::SniResolver;
pub use store::{dir_fingerprint, CertInfo, CertStore, LoadProblem};
