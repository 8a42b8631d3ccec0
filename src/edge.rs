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
use pingora::upstreams::peer::HttpPeer;

use crate::access::Access;
use crate::config::{Config, SourceKind};
use crate::dns::DnsCache;
use crate::policy::Policy;
use crate::registry::{
    Address, AdminVms, Counted, FileSource, HttpSource, Layered, ProxmoxSource, Registry, Scheme,
    StaticVms, TemplateSource, Vm,
};
use crate::respond::{self, Answer, Refusal};
use crate::route::{normalize_host, Routed};

/// Requests under way, for a shutdown that ends as soon as they are done.
pub static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// State shared by every request: the current config generation, and what outlives every
/// reload.
pub struct Edge {
    current: ArcSwap<Generation>,
    pub admin_vms: Arc<AdminVms>,
    /// `[limits]` counts: kept across reloads, thresholds from each generation.
    pub limits: crate::limits::Counters,
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
            limits: crate::limits::Counters::new(),
            activity: Default::default(),
            wakes: Default::default(),
        }
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Installs a new config; requests under way keep the generation they started with.
    /// An `http` or `proxmox` source whose settings did not change is carried over with its
    /// warm cache.
    pub fn swap(&self, config: Config) {
        let previous = self.current();
        let generation = Generation::build(config, Some(self.admin_vms.clone()), Some(&previous));
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
    /// `scheme = "https"`: how the TLS connection to the VM is made and checked.
    pub tls: Option<UpstreamTls>,
    /// `address:port` as the registry names it, for `host_header = "upstream"` (empty
    /// otherwise: see [`Resolved::authority`]).
    pub authority: String,
}

pub struct Generation {
    pub config: Config,
    pub registry: Arc<dyn Registry>,
    /// The sources that ask someone, as built: a reload with equal settings reuses them.
    asking: Asking,
    /// Upstream names resolved recently (bounded; see [`crate::dns`]).
    pub dns: DnsCache,
    /// `[access]` with its keys decoded (SPEC §12).
    pub access: Access,
}

/// The `http` and `proxmox` sources of a generation (uncounted), whose caches, coalescing and
/// pooled connections are worth keeping across a reload that did not change their settings.
#[derive(Default, Clone)]
struct Asking {
    http: Option<Arc<dyn Registry>>,
    proxmox: Option<Arc<dyn Registry>>,
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

impl Resolved {
    /// `address:port` for a policy with `host_header = "upstream"`, the only reader; empty
    /// for every other request, which then formats nothing.
    pub fn authority(&self, policy: &Policy) -> String {
        match policy.host_header {
            crate::policy::HostHeader::Upstream => {
                format!("{}:{}", self.vm.address, self.upstream_port)
            }
            crate::policy::HostHeader::Preserve => String::new(),
        }
    }
}

impl Generation {
    /// `admin` (the admin-API registrations) is asked where `[registry] sources` puts
    /// `"admin"`; `None` leaves it out (e.g. `explain` without a state file).
    pub fn new(config: Config, admin: Option<Arc<dyn Registry>>) -> Generation {
        Generation::build(config, admin, None)
    }

    /// Like [`Generation::new`], reusing `previous`'s asking sources where their settings
    /// are equal.
    fn build(
        config: Config,
        admin: Option<Arc<dyn Registry>>,
        previous: Option<&Generation>,
    ) -> Generation {
        let (registry, asking) = build_registry(&config, admin, previous);
        let access = Access::new(config.access.as_ref()).unwrap_or_else(|e| {
            // `Config::parse` decoded every key already; should one fail now, fail closed.
            tracing::error!("[access]: {e}; every private preview is refused");
            Access::closed()
        });
        Generation {
            config,
            registry,
            asking,
            dns: DnsCache::new(),
            access,
        }
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

    /// Whether `id` is answered without asking anyone (a local source, the registry's cache,
    /// the DNS cache): `unknown_ids_per_ip` lets these through.
    pub fn knows(&self, id: &str) -> bool {
        match self.registry.peek(id) {
            None => false,
            Some(Ok(Some(vm))) => match &vm.address {
                Address::Ip(_) => true,
                Address::Name(name) => self.dns.peek(name).is_some(),
            },
            Some(_) => true,
        }
    }

    /// Asks the registry; unknown ids are 404, an unavailable registry 503.
    pub async fn resolve(&self, id: &str, port: u16) -> Result<Resolved, Refusal> {
        let answer = self.registry.lookup(id).resolve().await;
        crate::metrics::METRICS.registry_lookup(crate::metrics::lookup_result(&answer));
        Self::resolved(id, port, answer)
    }

    /// [`Generation::resolve`] for `explain`: also names the source that answered.
    pub async fn resolve_named(
        &self,
        id: &str,
        port: u16,
    ) -> (&'static str, Result<Resolved, Refusal>) {
        let (source, answer) = self.registry.lookup_named(id).await;
        (source, Self::resolved(id, port, answer))
    }

    fn resolved(
        id: &str,
        port: u16,
        answer: crate::registry::LookupResult,
    ) -> Result<Resolved, Refusal> {
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
    /// The registry's address for this VM port, resolved once when it is a name, then
    /// checked by `[upstreams]` ([`crate::egress`]): 502 when it does not resolve (404 for a
    /// template source, whose names stand for ids), 504 when DNS takes longer than
    /// `[timeouts] connect` (both counted as upstream errors, like a failed connect), 502
    /// `upstream address not allowed` when refused. The address returned is the one dialled:
    /// nothing is looked up again.
    pub async fn upstream_addr(
        &self,
        id: &str,
        port: u16,
        resolved: &Resolved,
    ) -> Result<SocketAddr, Answer> {
        let vm = &resolved.vm;
        let unreachable = || {
            respond::upstream_failure(Refusal::Unreachable {
                id: id.to_owned(),
                port,
            })
        };
        let name = match &vm.address {
            Address::Ip(ip) => {
                let addr = SocketAddr::new(*ip, resolved.upstream_port);
                return self
                    .egress(id, vm, addr)
                    .map(|()| addr)
                    .map_err(Answer::from);
            }
            Address::Name(name) => name,
        };
        let lookup = self.dns.lookup(name, resolved.upstream_port);
        match tokio::time::timeout(self.config.timeouts.connect, lookup).await {
            Ok(Ok(addrs)) => {
                // Every address of the answer must pass, not only the one dialled: a name
                // that resolves to an allowed and a denied address is refused. Its owner
                // chose that answer (and its order, and may change it between lookups), so
                // letting the allowed half through would make the check depend on order and
                // caching the attacker controls; refusing keeps it a property of the name.
                let mut first = None;
                for addr in addrs {
                    self.egress(id, vm, addr)?;
                    first.get_or_insert(addr);
                }
                match first {
                    Some(a) => Ok(a),
                    None if vm.unresolvable_is_unknown => {
                        Err(Refusal::UnknownVm(id.to_owned()).into())
                    }
                    None => Err(unreachable()),
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(vm = %id, name = %name, error = %e, "upstream name does not resolve");
                if vm.unresolvable_is_unknown {
                    Err(Refusal::UnknownVm(id.to_owned()).into())
                } else {
                    Err(unreachable())
                }
            }
            Err(_) => Err(respond::upstream_failure(Refusal::Timeout {
                id: id.to_owned(),
                port,
            })),
        }
    }

    /// `[upstreams]` on one dialled address; a refusal is logged with the address and why
    /// (the client only learns the VM id).
    fn egress(&self, id: &str, vm: &Vm, addr: SocketAddr) -> Result<(), Refusal> {
        self.config
            .upstreams
            .check(addr, vm.self_reported)
            .map_err(|why| {
                tracing::warn!(vm = %id, address = %vm.address, upstream = %addr, reason = %why,
                    "upstream address not allowed");
                Refusal::Egress(id.to_owned())
            })
    }

    /// The TLS of an `https` VM, `None` for plain HTTP.
    pub fn upstream_tls(&self, vm: &Vm) -> Option<UpstreamTls> {
        match vm.scheme {
            Scheme::Http => None,
            Scheme::Https => Some(UpstreamTls {
                server_name: match (&vm.tls_server_name, &vm.address) {
                    (Some(n), _) => n.clone(),
                    (None, Address::Name(n)) => n.clone(),
                    (None, Address::Ip(ip)) => ip.to_string(),
                },
                verify: vm.tls_verify,
                ca: self.config.registry.tls_ca.clone(),
            }),
        }
    }
}

/// TLS to a VM (`scheme = "https"`). The server name is `tls_server_name`, else the address:
/// a DNS name is sent as SNI and must be in the certificate; an IP address sends no SNI
/// (RFC 6066 forbids it) and must be one of the certificate's IP SANs. The certificate chains
/// to `[registry] tls_ca` when set, else to the system roots. `verify = false` (a self-signed
/// dev server) accepts any certificate. Costs one `String` and an `Arc` clone per request.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub server_name: String,
    pub verify: bool,
    pub ca: Option<crate::config::UpstreamCa>,
}

impl UpstreamTls {
    /// The peer pingora dials: its rustls connector turns `server_name` into a rustls
    /// `ServerName` (DNS or IP) and checks it unless `verify_cert` is off.
    pub fn peer(tls: Option<&UpstreamTls>, addr: SocketAddr) -> HttpPeer {
        let Some(tls) = tls else {
            return HttpPeer::new(addr, false, String::new());
        };
        let mut peer = HttpPeer::new(addr, true, tls.server_name.clone());
        peer.options.verify_cert = tls.verify;
        peer.options.verify_hostname = tls.verify;
        if let Some(ca) = &tls.ca {
            peer.options.ca = Some(ca.certs.clone());
            // The pool key: a connection verified under another CA is not this peer's.
            peer.group_key = ca.fingerprint;
        }
        peer
    }
}

/// The configured sources in order. A source that cannot answer anything (no admin
/// registry, an empty static list) is left out so lookups skip it. `http` and `proxmox`
/// sources come from `previous` when their settings are equal.
fn build_registry(
    config: &Config,
    admin: Option<Arc<dyn Registry>>,
    previous: Option<&Generation>,
) -> (Arc<dyn Registry>, Asking) {
    let r = &config.registry;
    let mut sources: Vec<Arc<dyn Registry>> = Vec::with_capacity(r.sources.len());
    let mut admin = admin;
    let mut asking = Asking::default();
    let kept = |same: bool, source: Option<&Arc<dyn Registry>>| {
        source.filter(|_| same && previous.is_some()).cloned()
    };
    for kind in &r.sources {
        let source: Option<Arc<dyn Registry>> = match kind {
            SourceKind::Admin => admin.take(),
            SourceKind::Static if r.vms.is_empty() => None,
            SourceKind::Static => Some(Arc::new(StaticVms::new(r.vms.clone()))),
            SourceKind::Template => r
                .template
                .clone()
                .map(|t| Arc::new(TemplateSource::new(t)) as Arc<dyn Registry>),
            SourceKind::Http => {
                let same = previous.is_some_and(|p| p.config.registry.http == r.http);
                let old = previous.and_then(|p| p.asking.http.as_ref());
                asking.http = kept(same, old).or_else(|| {
                    r.http.clone().and_then(|h| match HttpSource::new(h) {
                        Ok(s) => Some(Arc::new(s) as Arc<dyn Registry>),
                        Err(e) => {
                            tracing::error!("{e}");
                            None
                        }
                    })
                });
                asking.http.clone()
            }
            SourceKind::File => r
                .file
                .clone()
                .map(|f| Arc::new(FileSource::new(f)) as Arc<dyn Registry>),
            SourceKind::Proxmox => {
                let same = previous.is_some_and(|p| p.config.registry.proxmox == r.proxmox);
                let old = previous.and_then(|p| p.asking.proxmox.as_ref());
                asking.proxmox = kept(same, old).or_else(|| {
                    r.proxmox.clone().and_then(|p| match ProxmoxSource::new(p) {
                        Ok(s) => Some(Arc::new(s) as Arc<dyn Registry>),
                        Err(e) => {
                            tracing::error!("{e}");
                            None
                        }
                    })
                });
                asking.proxmox.clone()
            }
        };
        sources.extend(source.map(|s| Arc::new(Counted::new(s)) as Arc<dyn Registry>));
    }
    if admin.is_some() {
        tracing::warn!(
            "[registry] sources does not list \"admin\": admin-API registrations are stored but not routed"
        );
    }
    let registry: Arc<dyn Registry> = match sources.len() {
        0 => Arc::new(StaticVms::default()),
        1 => sources.remove(0),
        _ => Arc::new(Layered::new(sources)),
    };
    (registry, asking)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, registry: &str) -> Config {
        let path = dir.join("routes.toml");
        let text = format!("[[domains]]\nname = \"example.com\"\n\n[registry]\n{registry}");
        Config::parse(&path, &text).unwrap()
    }

    fn edge(c: Config) -> Edge {
        let dir = c.path.parent().unwrap().join("state.json");
        Edge::new(c, Arc::new(AdminVms::open(dir).0))
    }

    const HTTP: &str = "sources = [\"http\"]\nurl = \"http://127.0.0.1:9/vms/{id}\"\n";
    const PVE: &str =
        "sources = [\"proxmox\"]\npve_url = \"https://127.0.0.1:9\"\npve_token = \"u@pve!t=s\"\n";

    #[test]
    fn a_reload_keeps_an_asking_source_whose_settings_did_not_change() {
        let dir = tempfile::tempdir().unwrap();
        for (before, changed) in [
            (HTTP.to_owned(), format!("{HTTP}cache_ttl = \"9s\"\n")),
            (PVE.to_owned(), format!("{PVE}cache_ttl = \"9s\"\n")),
        ] {
            let e = edge(config(dir.path(), &before));
            let first = e.current().asking.clone();
            let source = |a: &Asking| a.http.clone().or(a.proxmox.clone()).unwrap();
            e.swap(config(dir.path(), &before));
            let same = e.current().asking.clone();
            assert!(Arc::ptr_eq(&source(&first), &source(&same)), "{before}");
            e.swap(config(dir.path(), &changed));
            let other = e.current().asking.clone();
            assert!(!Arc::ptr_eq(&source(&first), &source(&other)), "{changed}");
        }
    }
}
