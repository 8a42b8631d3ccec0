//! `source = "file"`: a JSON or TOML file of VMs, `{ "<id>": {"address": ..., "ports": ...} }`
//! (TOML: one `[<id>]` table per VM), re-read when it changes.
//!
//! The reloader calls [`Registry::refresh`] every second, off the request path; a lookup is
//! only a map read. A file that does not parse is reported and the previous VMs stay.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use super::{Lookup, Registry, Vm, VmSpec};

#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    vms: ArcSwap<HashMap<String, Arc<Vm>>>,
    stamp: Mutex<Option<(SystemTime, u64)>>,
}

impl FileSource {
    pub fn new(path: PathBuf) -> FileSource {
        let me = FileSource {
            path,
            vms: ArcSwap::from_pointee(HashMap::new()),
            stamp: Mutex::new(None),
        };
        me.refresh();
        me
    }

    fn read(&self) -> Result<HashMap<String, Arc<Vm>>, String> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| e.to_string())?;
        let is_toml = self.path.extension().is_some_and(|e| e == "toml");
        let specs: BTreeMap<String, VmSpec> = if is_toml {
            toml::from_str(&text).map_err(|e| e.to_string())?
        } else {
            serde_json::from_str(&text).map_err(|e| e.to_string())?
        };
        specs
            .iter()
            .map(|(id, s)| {
                s.to_vm(id)
                    .map(|vm| (id.clone(), Arc::new(vm)))
                    .map_err(|e| format!("vm {id:?}: {e}"))
            })
            .collect()
    }
}

impl Registry for FileSource {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        Lookup::Ready(Ok(self.vms.load().get(id).cloned()))
    }

    fn refresh(&self) {
        let now = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        let Ok(mut seen) = self.stamp.lock() else {
            return;
        };
        if now.is_some() && *seen == now {
            return;
        }
        *seen = now;
        match self.read() {
            Ok(vms) => {
                tracing::info!(file = %self.path.display(), vms = vms.len(), "VM file loaded");
                self.vms.store(Arc::new(vms));
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), "VM file refused, keeping the previous VMs: {e}")
            }
        }
    }
}
