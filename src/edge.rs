//! One generation of the running proxy: a validated [`Config`] with the registry built from
//! it, and the decision procedure every request (and `cmux-edge explain`) goes through.
//!
//! [`Edge`] holds the current generation behind an `ArcSwap`; a reload builds a new one
//! and swaps it in, while requests already under way finish on the one they started with.
//! What must outlive a reload (admin-API VMs, activity, wakes in flight) lives on `Edge`,
//! not on the generation.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, SourceKind};
use crate::policy::Policy;
use crate::registry::{
    Address, AdminVms, Counted, FileSource, HttpSource, Layered, ProxmoxSource, Registry, Scheme,
    StaticVms, TemplateSource, Vm,
};
use crate::respond::Refusal;
use crate::route::{normalize_host, Routed};

/// Requests under way, for a shutdown that ends as soon as they are done.
pub static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// State shared by every request: the current config generation, and what outlives every
/// reload.
pub struct Edge {
    current: ArcSwap<Generation>,
    pub admin_vms: Arc<AdminVms>,
    /// Per VM and port activity (SPEC §13).
    pub activity: crate::lifecycle::Activity,
    /// Wakes in flight and their waiters (SPEC §13).
    pub wakes: crate::lifecycle::Wakes,
}

impl Edge {
    pub fn new(config: Config, admin_vms: Arc<AdminVms>) -> Edge {
        Edge {
            current: ArcSwap::from_pointee(Generation::new(config, Some(admin_vms.clone()))),
            admin_vms,
            activity: Default::default(),
            wakes: Default::default(),
        }
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Installs a new config; requests under way keep the generation they started with.
    pub fn swap(&self, config: Config) {
        let generation = Generation::new(config, Some(self.admin_vms.clone()));
        self.current.store(Arc::new(generation));
    }
}

/// The routed preview, once every gate let it through: where it goes and how it behaves.
#[derive(Debug)]
pub struct Target {
    pub port: u16,
    pub id: String,
    pub scope: Option<String>,
    /// The host label and where its port sits, plus the domain: sibling-port URLs.
    pub label: String,
    pub port_span: std::ops::Range<usize>,
    pub domain: String,
    pub policy: Arc<Policy>,
    /// The address actually dialled: resolved once, never looked up again.
    pub addr: SocketAddr,
    pub tls_sni: Option<String>,
    /// `address:port` as the registry names it, for `host_header = "upstream"`.
    pub authority: String,
}

pub struct Generation {
    pub config: Config,
    pub registry: Arc<dyn Registry>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// What the host alone decides, before the registry is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostDecision {
    /// The bare domain: answer `status` with `body`.
    Apex { status: u16, body: String },
    Preview {
        port: u16,
        id: String,
        scope: Option<String>,
        /// The host label, and where its port digits sit (sibling-port URLs for redirects).
        label: String,
        port_span: std::ops::Range<usize>,
        domain: String,
        pattern: usize,
    },
}

/// A fully routed preview request.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub vm: Arc<Vm>,
    pub upstream_port: u16,
}

impl Generation {
    /// `admin` (the admin-API registrations) is asked where `[registry] sources` puts
    /// `"admin"`; `None` leaves it out (e.g. `explain` without a state file).
    pub fn new(config: Config, admin: Option<Arc<dyn Registry>>) -> Generation {
        let registry = build_registry(&config, admin);
        Generation { config, registry }
    }

    /// Host → apex or preview, with the 421/400 refusals of SPEC §3. The port's
    /// reachability (403) is [`Generation::check_port`], after the loop check.
    pub fn decide_host(&self, raw_host: &str) -> Result<HostDecision, Refusal> {
        let host = normalize_host(raw_host);
        if host.is_empty() {
            return Err(Refusal::NoHost);
        }
        match self.config.router.route(&host)? {
            Routed::Apex(i) => {
                let d = &self.config.router.domains()[i];
                Ok(HostDecision::Apex {
                    status: d.apex_status,
                    body: d.apex_body.clone(),
                })
            }
            Routed::Preview(p) => Ok(HostDecision::Preview {
                port: p.port,
                id: p.id.to_owned(),
                scope: p.scope.map(str::to_owned),
                label: p.label.to_owned(),
                port_span: p.port_span.clone(),
                domain: self.config.router.domains()[p.domain].name.clone(),
                pattern: p.pattern,
            }),
        }
    }

    /// The bare domain's answer (SPEC §3), for every path and method.
    pub fn apex(&self, decision: &HostDecision) -> crate::respond::Reply {
        let (status, body) = match decision {
            HostDecision::Apex { status, body } => (*status, body.clone()),
            HostDecision::Preview { .. } => (200, "cmux-edge".to_owned()),
        };
        crate::respond::Reply::text(status, body, "apex")
    }

    /// `[ports]`: 403 for a VM port that may not be reached.
    pub fn check_port(&self, port: u16) -> Result<(), Refusal> {
        if self.config.ports.allows(port) {
            Ok(())
        } else {
            Err(Refusal::PortDenied(port))
        }
    }

    pub fn policy(&self, port: u16) -> &Arc<Policy> {
        self.config.policies.for_port(port)
    }

    /// Asks the registry; unknown ids are 404, an unavailable registry 503.
    pub async fn resolve(&self, id: &str, port: u16) -> Result<Resolved, Refusal> {
        let answer = self.registry.lookup(id).resolve().await;
        crate::metrics::METRICS.registry_lookup(crate::metrics::lookup_result(&answer));
        match answer {
            Ok(Some(vm)) => Ok(Resolved {
                upstream_port: vm.upstream_port(port),
                vm,
            }),
            Ok(None) => Err(Refusal::UnknownVm(id.to_owned())),
            Err(e) => {
                tracing::warn!(vm = id, error = %e, "registry lookup failed");
                Err(Refusal::RegistryUnavailable(id.to_owned()))
            }
        }
    }
}

impl Generation {
    /// The registry's address for this VM port, resolved once when it is a name: 502 when it
    /// does not resolve (404 for a template source, whose names stand for ids), 504 when DNS
    /// takes longer than `[timeouts] connect`.
    pub async fn upstream_addr(
        &self,
        id: &str,
        port: u16,
        resolved: &Resolved,
    ) -> Result<SocketAddr, Refusal> {
        let vm = &resolved.vm;
        let unreachable = || Refusal::Unreachable {
            id: id.to_owned(),
            port,
        };
        let name = match &vm.address {
            Address::Ip(ip) => return Ok(SocketAddr::new(*ip, resolved.upstream_port)),
            Address::Name(name) => name,
        };
        let lookup = tokio::net::lookup_host((name.as_str(), resolved.upstream_port));
        match tokio::time::timeout(self.config.timeouts.connect, lookup).await {
            Ok(Ok(mut addrs)) => match addrs.next() {
                Some(a) => Ok(a),
                None if vm.unresolvable_is_unknown => Err(Refusal::UnknownVm(id.to_owned())),
                None => Err(unreachable()),
            },
            Ok(Err(e)) => {
                tracing::debug!(vm = %id, name = %name, error = %e, "upstream name does not resolve");
                if vm.unresolvable_is_unknown {
                    Err(Refusal::UnknownVm(id.to_owned()))
                } else {
                    Err(unreachable())
                }
            }
            Err(_) => Err(Refusal::Timeout {
                id: id.to_owned(),
                port,
            }),
        }
    }

    /// The SNI for a TLS upstream (`scheme = "https"`), `None` for plain HTTP.
    pub fn upstream_sni(vm: &Vm) -> Option<String> {
        match vm.scheme {
            Scheme::Http => None,
            Scheme::Https => Some(match &vm.address {
                Address::Name(n) => n.clone(),
                Address::Ip(_) => String::new(),
            }),
        }
    }
}

/// The configured sources in order. A source that cannot answer anything (no admin
/// registry, an empty static list) is left out so lookups skip it.
fn build_registry(config: &Config, admin: Option<Arc<dyn Registry>>) -> Arc<dyn Registry> {
    let r = &config.registry;
    let mut sources: Vec<Arc<dyn Registry>> = Vec::with_capacity(r.sources.len());
    let mut admin = admin;
    for kind in &r.sources {
        let source: Option<Arc<dyn Registry>> = match kind {
            SourceKind::Admin => admin.take(),
            SourceKind::Static if r.vms.is_empty() => None,
            SourceKind::Static => Some(Arc::new(StaticVms::new(r.vms.clone()))),
            SourceKind::Template => r
                .template
                .clone()
                .map(|t| Arc::new(TemplateSource::new(t)) as Arc<dyn Registry>),
            SourceKind::Http => r.http.clone().and_then(|h| match HttpSource::new(h) {
                Ok(s) => Some(Arc::new(s) as Arc<dyn Registry>),
                Err(e) => {
                    tracing::error!("{e}");
                    None
                }
            }),
            SourceKind::File => r
                .file
                .clone()
                .map(|f| Arc::new(FileSource::new(f)) as Arc<dyn Registry>),
            SourceKind::Proxmox => r.proxmox.clone().and_then(|p| match ProxmoxSource::new(p) {
                Ok(s) => Some(Arc::new(s) as Arc<dyn Registry>),
                Err(e) => {
                    tracing::error!("{e}");
                    None
                }
            }),
        };
        sources.extend(source.map(|s| Arc::new(Counted::new(s)) as Arc<dyn Registry>));
    }
    if admin.is_some() {
        tracing::warn!(
            "[registry] sources does not list \"admin\": admin-API registrations are stored but not routed"
        );
    }
    match sources.len() {
        0 => Arc::new(StaticVms::default()),
        1 => sources.remove(0),
        _ => Arc::new(Layered::new(sources)),
    }
}
