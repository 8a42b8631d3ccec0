//! `source = "static"`: the `[[registry.vms]]` list of the config file.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Lookup, Registry, Vm};

#[derive(Debug, Default)]
pub struct StaticVms {
    vms: HashMap<String, Arc<Vm>>,
}

impl StaticVms {
    pub fn new(vms: Vec<Vm>) -> StaticVms {
        StaticVms {
            vms: vms
                .into_iter()
                .map(|v| (v.id.clone(), Arc::new(v)))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.vms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }
}

impl Registry for StaticVms {
    fn kind(&self) -> &'static str {
        "static"
    }

    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        Lookup::Ready(Ok(self.vms.get(id).cloned()))
    }
}
