//! VMs registered through the admin API (`PUT /api/vms/{id}`), layered over the configured
//! source, and persisted so that a restart, even after `kill -9`, loses nothing.
//!
//! Every change rewrites the state file atomically (temp file, fsync, rename, fsync of the
//! directory) before the API answers 2xx. A state file that cannot be read at start is kept
//! aside as `<name>.corrupt-<unix time>` and reported, never silently discarded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::{Address, Lookup, Registry, Scheme, Vm, VmState};

/// The JSON of one VM, as the API takes it and the state file stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub address: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    #[serde(default, skip_serializing_if = "is_http")]
    pub scheme: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339; after it the registration is gone (404), and the sweep drops it from disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Revocation (SPEC §12): sessions and tokens with a lower epoch are refused.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub access_epoch: u64,
    /// `running` (the default), `paused` or `stopped` (SPEC §13).
    #[serde(default, skip_serializing_if = "VmState::is_running")]
    pub state: VmState,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_http(s: &str) -> bool {
    s.is_empty() || s == "http"
}

impl VmSpec {
    /// When the registration ends, if it does.
    pub fn expiry(&self) -> Result<Option<SystemTime>, String> {
        self.expires_at
            .as_deref()
            .map(|t| {
                humantime::parse_rfc3339_weak(t)
                    .map_err(|e| format!("expires_at {t:?} is not an RFC 3339 time: {e}"))
            })
            .transpose()
    }

    /// Validates into a [`Vm`]; the error says what is wrong, for a 400.
    pub fn to_vm(&self, id: &str) -> Result<Vm, String> {
        crate::route::check_name(id, "id").map_err(|e| e.to_string())?;
        let address = Address::parse(&self.address)?;
        let mut ports = BTreeMap::new();
        for (from, to) in &self.ports {
            let from = crate::route::parse_port(from)
                .map_err(|_| format!("ports: {from:?} is not a port 1-65535"))?;
            if *to == 0 {
                return Err(format!("ports: {from} maps to port 0"));
            }
            ports.insert(from, *to);
        }
        self.expiry()?;
        let scheme = match self.scheme.as_str() {
            "" | "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => return Err(format!("scheme {other:?} is not \"http\" or \"https\"")),
        };
        Ok(Vm {
            id: id.to_owned(),
            address,
            ports,
            scheme,
            unresolvable_is_unknown: false,
            tls_server_name: None,
            tls_verify: true,
            self_reported: false,
            access_epoch: self.access_epoch,
            state: self.state,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct AdminVms {
    /// id → (route target, what was registered, when it expires).
    vms: DashMap<String, (Arc<Vm>, VmSpec, Option<SystemTime>)>,
    path: PathBuf,
    /// Serialises writers so the file always reflects one whole state.
    write_lock: Mutex<()>,
}

impl AdminVms {
    /// Loads `path` if it exists. A file that does not parse is moved aside and reported.
    pub fn open(path: PathBuf) -> (AdminVms, Option<String>) {
        let me = AdminVms {
            vms: DashMap::new(),
            path,
            write_lock: Mutex::new(()),
        };
        let text = match std::fs::read_to_string(&me.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (me, None),
            Err(e) => {
                let msg = format!("cannot read {}: {e}", me.path.display());
                return (me, Some(msg));
            }
        };
        let parsed: Result<BTreeMap<String, VmSpec>, String> = serde_json::from_str(&text)
            .map_err(|e| e.to_string())
            .and_then(|m: BTreeMap<String, VmSpec>| {
                for (id, spec) in &m {
                    spec.to_vm(id).map_err(|e| format!("vm {id:?}: {e}"))?;
                }
                Ok(m)
            });
        match parsed {
            Ok(map) => {
                for (id, spec) in map {
                    if let (Ok(vm), Ok(exp)) = (spec.to_vm(&id), spec.expiry()) {
                        me.vms.insert(id, (Arc::new(vm), spec, exp));
                    }
                }
                (me, None)
            }
            Err(e) => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = me.path.with_extension(format!("corrupt-{stamp}"));
                let moved = std::fs::rename(&me.path, &aside);
                let msg = match moved {
                    Ok(()) => format!(
                        "state file {} is corrupt ({e}); kept aside as {} and starting empty",
                        me.path.display(),
                        aside.display()
                    ),
                    Err(m) => format!(
                        "state file {} is corrupt ({e}) and could not be moved aside: {m}",
                        me.path.display()
                    ),
                };
                (me, Some(msg))
            }
        }
    }

    /// The registrations in `path` as they are, for `explain`: nothing is written, moved or
    /// reported; what does not parse is left out.
    pub fn read_only(path: PathBuf) -> AdminVms {
        let me = AdminVms {
            vms: DashMap::new(),
            path,
            write_lock: Mutex::new(()),
        };
        let map: BTreeMap<String, VmSpec> = std::fs::read_to_string(&me.path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        for (id, spec) in map {
            if let (Ok(vm), Ok(exp)) = (spec.to_vm(&id), spec.expiry()) {
                me.vms.insert(id, (Arc::new(vm), spec, exp));
            }
        }
        me
    }

    pub fn list(&self) -> BTreeMap<String, VmSpec> {
        let now = SystemTime::now();
        self.vms
            .iter()
            .filter(|e| live(e.value().2, now))
            .map(|e| (e.key().clone(), e.value().1.clone()))
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<VmSpec> {
        self.vms
            .get(id)
            .filter(|e| live(e.value().2, SystemTime::now()))
            .map(|e| e.value().1.clone())
    }

    /// Registers or replaces; returns whether it was new. Persisted before returning.
    pub fn put(&self, id: &str, spec: VmSpec) -> Result<bool, PutError> {
        let vm = spec.to_vm(id).map_err(PutError::Invalid)?;
        let expiry = spec.expiry().map_err(PutError::Invalid)?;
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.vms.insert(id.to_owned(), (Arc::new(vm), spec, expiry));
        if let Err(e) = self.persist() {
            // Keep memory and disk in step: undo.
            match old {
                Some(o) => self.vms.insert(id.to_owned(), o),
                None => self.vms.remove(id).map(|(_, v)| v),
            };
            return Err(PutError::State(e));
        }
        Ok(old.is_none())
    }

    /// Removes; returns whether it existed. Persisted before returning.
    pub fn delete(&self, id: &str) -> Result<bool, StateError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, old)) = self.vms.remove(id) else {
            return Ok(false);
        };
        if let Err(e) = self.persist() {
            self.vms.insert(id.to_owned(), old);
            return Err(e);
        }
        Ok(true)
    }

    fn persist(&self) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(&self.list()).unwrap_or_default();
        // Registrations name internal addresses: readable by the service only.
        crate::files::write_atomic(&self.path, &json, 0o600).map_err(|source| StateError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    State(#[from] StateError),
}

fn live(expiry: Option<SystemTime>, now: SystemTime) -> bool {
    expiry.is_none_or(|t| now < t)
}

impl Registry for AdminVms {
    fn kind(&self) -> &'static str {
        "admin"
    }

    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        let vm = self.vms.get(id).and_then(|e| {
            let (vm, _, expiry) = e.value();
            live(*expiry, SystemTime::now()).then(|| vm.clone())
        });
        Lookup::Ready(Ok(vm))
    }

    /// The expiry sweep: expired registrations leave memory and the state file.
    fn refresh(&self) {
        let now = SystemTime::now();
        if self.vms.iter().all(|e| live(e.value().2, now)) {
            return;
        }
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.vms.retain(|_, v| live(v.2, now));
        if let Err(e) = self.persist() {
            tracing::error!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(address: &str) -> VmSpec {
        VmSpec {
            address: address.into(),
            ports: BTreeMap::from([("39378".into(), 32768)]),
            scheme: String::new(),
            labels: BTreeMap::new(),
            expires_at: None,
            access_epoch: 0,
            state: Default::default(),
        }
    }

    #[test]
    fn put_persists_and_reopen_restores() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (vms, problem) = AdminVms::open(path.clone());
        assert!(problem.is_none());
        assert!(vms.put("200", spec("10.0.0.2")).unwrap());
        assert!(!vms.put("200", spec("10.0.0.3")).unwrap());
        let (again, _) = AdminVms::open(path);
        assert_eq!(again.get("200").unwrap().address, "10.0.0.3");
        assert!(again.delete("200").unwrap());
        assert!(!again.delete("200").unwrap());
    }

    #[test]
    fn invalid_specs_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (vms, _) = AdminVms::open(dir.path().join("s.json"));
        assert!(matches!(
            vms.put("Bad!", spec("10.0.0.2")),
            Err(PutError::Invalid(_))
        ));
        assert!(matches!(
            vms.put("a", spec("x@y")),
            Err(PutError::Invalid(_))
        ));
    }

    #[test]
    fn a_corrupt_state_file_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{\"200\": {\"address\": ").unwrap();
        let (vms, problem) = AdminVms::open(path.clone());
        assert!(problem.unwrap().contains("corrupt"));
        assert!(vms.list().is_empty());
        assert!(!path.exists());
        let aside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(aside.len(), 1);
        assert!(aside[0].file_name().to_string_lossy().contains("corrupt-"));
    }
}
