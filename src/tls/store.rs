//! Certificates on disk: `NAME.crt` + `NAME.key` PEM pairs in `certs_dir`.
//!
//! A certificate serves the DNS names inside it (its SANs), never its file name. A pair that
//! cannot be used is reported and skipped; the rest still load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use pingora::tls::sign::CertifiedKey;
use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What one loaded certificate covers.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub file: PathBuf,
    /// DNS SANs, lowercase; wildcards as `*.example.com`.
    pub names: Vec<String>,
    /// Unix seconds of `notBefore` and `notAfter`.
    pub not_before: i64,
    pub not_after: i64,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct LoadProblem {
    pub file: PathBuf,
    pub reason: String,
}

/// An immutable set of certificates indexed by the names they serve.
#[derive(Default)]
pub struct CertStore {
    /// name → the certificate serving it, and its `notAfter` (the one installed decides).
    exact: HashMap<String, (Arc<CertifiedKey>, i64)>,
    /// `example.com` → the certificate for `*.example.com`, and its `notAfter`.
    wildcard: HashMap<String, (Arc<CertifiedKey>, i64)>,
    infos: Vec<CertInfo>,
    /// `certs[i]` is the key pair described by `infos[i]`.
    certs: Vec<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("certs", &self.infos)
            .finish()
    }
}

impl CertStore {
    /// Loads every `*.crt` with a matching `*.key`. A missing directory is an empty store.
    pub fn load_dir(dir: &Path) -> (CertStore, Vec<LoadProblem>) {
        let mut store = CertStore::default();
        let mut problems = Vec::new();
        let mut crts: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "crt"))
                .collect(),
            Err(_) => return (store, problems),
        };
        // Of two certificates for one name, the one valid longer wins (`add`); file order only
        // breaks a tie (the later file), so the result never depends on `read_dir` order.
        crts.sort();
        for crt in crts {
            let key = crt.with_extension("key");
            match load_pair(&crt, &key) {
                Ok((ck, info)) => store.add(Arc::new(ck), info),
                Err(reason) => problems.push(LoadProblem { file: crt, reason }),
            }
        }
        (store, problems)
    }

    /// Like [`CertStore::load_dir`], but a file that no longer loads (a corrupt PEM, a key
    /// written before its certificate) keeps serving what `previous` had loaded from it.
    pub fn load_dir_over(dir: &Path, previous: &CertStore) -> (CertStore, Vec<LoadProblem>) {
        let (mut store, mut problems) = CertStore::load_dir(dir);
        for p in &mut problems {
            let kept = previous
                .infos
                .iter()
                .zip(&previous.certs)
                .find(|(i, _)| i.file == p.file);
            if let Some((info, ck)) = kept {
                store.add(ck.clone(), info.clone());
                p.reason
                    .push_str("; the certificate loaded before from this file stays in service");
            }
        }
        (store, problems)
    }

    /// Adds a certificate for its names; where two serve one name, the one valid longer wins
    /// (on a tie, the one added last), compared with the certificate installed for the name.
    pub fn add(&mut self, ck: Arc<CertifiedKey>, info: CertInfo) {
        for name in &info.names {
            let (map, key) = match name.strip_prefix("*.") {
                Some(parent) => (&mut self.wildcard, parent.to_owned()),
                None => (&mut self.exact, name.clone()),
            };
            let wins = map
                .get(&key)
                .is_none_or(|(_, installed)| info.not_after >= *installed);
            if wins {
                map.insert(key, (ck.clone(), info.not_after));
            }
        }
        self.infos.push(info);
        self.certs.push(ck);
    }

    /// Exact name, then the wildcard of its parent.
    pub fn find(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        if let Some((ck, _)) = self.exact.get(name) {
            return Some(ck);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).map(|(ck, _)| ck)
    }

    pub fn infos(&self) -> &[CertInfo] {
        &self.infos
    }

    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }
}

fn load_pair(crt: &Path, key: &Path) -> Result<(CertifiedKey, CertInfo), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(crt)
        .map_err(|e| format!("cannot read certificate: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in file".into());
    }
    if !key.exists() {
        return Err(format!("no key file {}", key.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        // Never echo key material; the error names the file only.
        format!("cannot read private key {}: {e}", key.display())
    })?;
    let ck = CertifiedKey::from_der(chain, der, &default_provider())
        .map_err(|e| format!("certificate and key do not go together: {e}"))?;
    let info = inspect(&ck.cert[0], crt)?;
    if info.names.is_empty() {
        return Err("certificate has no DNS subjectAltName".into());
    }
    Ok((ck, info))
}

/// Reads the SAN DNS names and expiry of an end-entity certificate.
pub fn inspect(der: &CertificateDer<'_>, file: &Path) -> Result<CertInfo, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("cannot parse certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    Ok(CertInfo {
        file: file.to_owned(),
        names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// A cheap fingerprint of the directory (names, sizes, mtimes) to notice changes.
pub fn dir_fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            // metadata() follows symlinks, as Kubernetes Secret volumes need.
            let path = e.path();
            let md = std::fs::metadata(&path).ok()?;
            Some((path, md.len(), md.modified().ok()))
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `names` whose info claims `not_after`; `tag` tells them apart.
    fn cert(names: &[&str], not_after: i64, tag: &str) -> (Arc<CertifiedKey>, CertInfo) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, tag);
        let c = params.self_signed(&key).unwrap();
        let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let ck = CertifiedKey::from_der(vec![c.der().clone()], der, &default_provider()).unwrap();
        let info = CertInfo {
            file: PathBuf::from(format!("{tag}.crt")),
            names: names.iter().map(|s| s.to_string()).collect(),
            not_before: 0,
            not_after,
        };
        (Arc::new(ck), info)
    }

    #[test]
    fn the_longest_valid_wins_among_three_or_more() {
        let mut store = CertStore::default();
        for (not_after, tag) in [(100, "short"), (300, "long"), (200, "middle")] {
            let (ck, info) = cert(&["a.example.com", "*.example.com"], not_after, tag);
            store.add(ck, info);
        }
        for name in ["a.example.com", "b.example.com"] {
            let ck = store.find(name).unwrap();
            let (_, c) = x509_parser::parse_x509_certificate(ck.cert[0].as_ref()).unwrap();
            let cn = c.subject().iter_common_name().next().unwrap();
            assert_eq!(cn.as_str().unwrap(), "long", "{name}");
        }
    }
}
