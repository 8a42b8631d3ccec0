//! Where a VM lives: the `Registry` trait and its sources (SPEC §2 `[registry]`).
//!
//! The id parsed from the host is only ever a lookup key (or, for `template`, substituted
//! into an operator-written template after validation): the upstream address always comes
//! from here, never from the request.
//!
//! Lookups return [`Lookup`], which is either an answer already at hand (static lists,
//! templates, caches) or a future for sources that must ask someone. The hot path for the
//! former allocates nothing and never awaits.

mod admin;
mod cached;
mod file;
mod http;
mod proxmox;
mod static_vms;
mod template;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

pub use admin::{AdminVms, PutError, StateError, VmSpec};
pub use cached::{Ask, CachePolicy, CachedSource};
pub use file::FileSource;
pub use http::{HttpSource, HttpSourceSettings};
pub use proxmox::{wake_container, ProxmoxSettings, ProxmoxSource};
pub use static_vms::StaticVms;
pub use template::{AddressTemplate, TemplateSource};

/// Where a VM's ports are reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Ip(IpAddr),
    /// A DNS name, resolved when connecting.
    Name(String),
}

impl Address {
    /// An IP literal or a DNS name made of `[a-z0-9.-]` labels.
    pub fn parse(s: &str) -> Result<Address, String> {
        let bare = s
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Address::Ip(ip));
        }
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if ok {
            Ok(Address::Name(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is neither an IP address nor a lowercase DNS name"
            ))
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Address::Ip(ip) => write!(f, "{ip}"),
            Address::Name(n) => f.write_str(n),
        }
    }
}

/// How the upstream is spoken to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scheme {
    #[default]
    Http,
    /// TLS to the VM (e.g. Morph-style HTTPS endpoints), verified against the address (or
    /// `tls_server_name`) unless `tls_verify = false`; see `edge::UpstreamTls`.
    Https,
}

/// One VM as a registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    pub id: String,
    pub address: Address,
    /// VM port → reachable port (Docker-style publishing). Absent ports map to themselves.
    pub ports: BTreeMap<u16, u16>,
    pub scheme: Scheme,
    /// A DNS name that does not resolve means "no such VM" (404), not "unreachable" (502):
    /// true for template addresses, where the name is the only existence check there is.
    pub unresolvable_is_unknown: bool,
    /// `scheme = "https"`: the name sent as SNI and verified in the VM's certificate, when it
    /// is not the address (a DNS name, or an IP address checked against the IP SANs).
    pub tls_server_name: Option<String>,
    /// `false` accepts any certificate (self-signed dev servers); the connection is still TLS.
    pub tls_verify: bool,
    /// The address is what the VM reports about itself (`proxmox`): `[upstreams]` never
    /// excuses it for being loopback, and with `allow` set it must fall inside it.
    pub self_reported: bool,
    /// Raising it revokes every session and token issued for this VM before (SPEC §12).
    pub access_epoch: u64,
    /// Running, or paused/stopped until a wake (SPEC §13).
    pub state: VmState,
}

/// What the registry says a VM is doing (SPEC §13). Only `running` is proxied at once; the
/// others are woken first when `[wake]` is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    #[default]
    Running,
    Paused,
    Stopped,
}

impl VmState {
    pub fn is_running(&self) -> bool {
        *self == VmState::Running
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
        }
    }
}

impl Vm {
    pub fn upstream_port(&self, port: u16) -> u16 {
        self.ports.get(&port).copied().unwrap_or(port)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {source_kind} unavailable: {reason}")]
    Unavailable {
        source_kind: &'static str,
        reason: String,
    },
}

pub type LookupResult = Result<Option<Arc<Vm>>, RegistryError>;

/// A registry's answer: at hand, or to be awaited.
pub enum Lookup<'a> {
    Ready(LookupResult),
    Pending(Pin<Box<dyn Future<Output = LookupResult> + Send + 'a>>),
}

impl Lookup<'_> {
    pub async fn resolve(self) -> LookupResult {
        match self {
            Lookup::Ready(r) => r,
            Lookup::Pending(f) => f.await,
        }
    }
}

/// A source of VM addresses.
pub trait Registry: Send + Sync + fmt::Debug {
    /// Short name for logs, metrics and `explain` (`static`, `template`, ...).
    fn kind(&self) -> &'static str;
    /// Looks up an id that has already passed host validation.
    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a>;
    /// The answer when it is at hand without asking anyone (a local source, a cached or stale
    /// answer); `None` when answering would ask the far side. Never starts a call.
    fn peek(&self, id: &str) -> Option<LookupResult> {
        match self.lookup(id) {
            Lookup::Ready(r) => Some(r),
            Lookup::Pending(_) => None,
        }
    }
    /// Called about once a second off the request path, for sources that watch something.
    fn refresh(&self) {}
    /// For `explain`: the answer, and the name of the source that gave it (a found VM, or
    /// the failure); [`Layered`] names the source in its list, not itself.
    fn lookup_named<'a>(
        &'a self,
        id: &'a str,
    ) -> Pin<Box<dyn Future<Output = (&'static str, LookupResult)> + Send + 'a>> {
        Box::pin(async move { (self.kind(), self.lookup(id).resolve().await) })
    }
    /// Drops any cached answer for `id`, so the next lookup asks again (a wake just changed
    /// the VM's state, and maybe its address).
    fn forget(&self, _id: &str) {}
}

/// What [`Registry::lookup_named`] names when no source knows the id.
pub const NO_SOURCE: &str = "no source";

/// A source whose answers are counted in `cmux_edge_registry_source_lookups_total`, with
/// counters resolved once per config so counting takes no lock.
pub struct Counted {
    inner: Arc<dyn Registry>,
    counters: [prometheus::IntCounter; 3],
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Counted {
    pub fn new(inner: Arc<dyn Registry>) -> Counted {
        let counters = crate::metrics::METRICS.source_lookups(inner.kind());
        Counted { inner, counters }
    }
}

impl Registry for Counted {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn lookup_named<'a>(
        &'a self,
        id: &'a str,
    ) -> Pin<Box<dyn Future<Output = (&'static str, LookupResult)> + Send + 'a>> {
        self.inner.lookup_named(id)
    }

    fn refresh(&self) {
        self.inner.refresh()
    }

    fn peek(&self, id: &str) -> Option<LookupResult> {
        self.inner.peek(id)
    }

    fn forget(&self, id: &str) {
        self.inner.forget(id)
    }

    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        let count = |r: &LookupResult| {
            self.counters[crate::metrics::lookup_result(r)].inc();
        };
        match self.inner.lookup(id) {
            Lookup::Ready(r) => {
                count(&r);
                Lookup::Ready(r)
            }
            Lookup::Pending(f) => Lookup::Pending(Box::pin(async move {
                let r = f.await;
                count(&r);
                r
            })),
        }
    }
}

/// Several sources asked in order; the first that knows the id answers.
#[derive(Debug)]
pub struct Layered {
    sources: Vec<Arc<dyn Registry>>,
}

impl Layered {
    pub fn new(sources: Vec<Arc<dyn Registry>>) -> Layered {
        Layered { sources }
    }
}

impl Registry for Layered {
    fn kind(&self) -> &'static str {
        "layered"
    }

    /// The same order and fall-through as `lookup`, naming who answered.
    fn lookup_named<'a>(
        &'a self,
        id: &'a str,
    ) -> Pin<Box<dyn Future<Output = (&'static str, LookupResult)> + Send + 'a>> {
        Box::pin(async move {
            let mut failed = None;
            for s in &self.sources {
                match s.lookup_named(id).await {
                    (kind, Ok(Some(vm))) => return (kind, Ok(Some(vm))),
                    (_, Ok(None)) => {}
                    (kind, Err(e)) => {
                        failed.get_or_insert((kind, e));
                    }
                }
            }
            match failed {
                Some((kind, e)) => (kind, Err(e)),
                None => (NO_SOURCE, Ok(None)),
            }
        })
    }

    fn refresh(&self) {
        for s in &self.sources {
            s.refresh();
        }
    }

    fn peek(&self, id: &str) -> Option<LookupResult> {
        let mut failed = None;
        for s in &self.sources {
            match s.peek(id)? {
                Ok(None) => continue,
                Ok(Some(vm)) => return Some(Ok(Some(vm))),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        Some(failed.map_or(Ok(None), Err))
    }

    fn forget(&self, id: &str) {
        for s in &self.sources {
            s.forget(id);
        }
    }

    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        // A source that fails does not hide the ones after it: they may still know the id.
        // Without an answer the first failure is the result (503, not a 404 that may be
        // wrong), so `["http", "admin"]` keeps admin VMs routing through a control-plane outage.
        let mut failed = None;
        // Answer synchronously as long as every source so far did.
        for (i, s) in self.sources.iter().enumerate() {
            match s.lookup(id) {
                Lookup::Ready(Ok(None)) => continue,
                Lookup::Ready(Ok(Some(vm))) => return Lookup::Ready(Ok(Some(vm))),
                Lookup::Ready(Err(e)) => {
                    failed.get_or_insert(e);
                }
                Lookup::Pending(f) => {
                    let rest = &self.sources[i + 1..];
                    return Lookup::Pending(Box::pin(async move {
                        match f.await {
                            Ok(Some(vm)) => return Ok(Some(vm)),
                            Ok(None) => {}
                            Err(e) => {
                                failed.get_or_insert(e);
                            }
                        }
                        for s in rest {
                            match s.lookup(id).resolve().await {
                                Ok(Some(vm)) => return Ok(Some(vm)),
                                Ok(None) => {}
                                Err(e) => {
                                    failed.get_or_insert(e);
                                }
                            }
                        }
                        failed.map_or(Ok(None), Err)
                    }));
                }
            }
        }
        Lookup::Ready(failed.map_or(Ok(None), Err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_ips_or_lowercase_names() {
        assert_eq!(
            Address::parse("10.0.0.1"),
            Ok(Address::Ip("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            Address::parse("[::1]"),
            Ok(Address::Ip("::1".parse().unwrap()))
        );
        assert_eq!(
            Address::parse("cmux-b1.lan"),
            Ok(Address::Name("cmux-b1.lan".into()))
        );
        for bad in ["", "a..b", "a_b.lan", "x@y", "host:80", "-a.lan", "UPPER"] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn layered_sources_answer_first_known() {
        let a = StaticVms::new(vec![Vm {
            id: "a".into(),
            address: Address::parse("10.0.0.1").unwrap(),
            ports: BTreeMap::new(),
            scheme: Scheme::Http,
            unresolvable_is_unknown: false,
            tls_server_name: None,
            tls_verify: true,
            self_reported: false,
            access_epoch: 0,
            state: VmState::Running,
        }]);
        let t = TemplateSource::new(AddressTemplate::parse("10.1.0.{id}").unwrap());
        let l = Layered::new(vec![Arc::new(a), Arc::new(t)]);
        let vm = l.lookup("a").resolve().await.unwrap().unwrap();
        assert_eq!(vm.address.to_string(), "10.0.0.1");
        let vm = l.lookup("7").resolve().await.unwrap().unwrap();
        assert_eq!(vm.address.to_string(), "10.1.0.7");
        assert!(l.lookup("zz").resolve().await.unwrap().is_none());
        assert_eq!(l.lookup_named("a").await.0, "static");
        assert_eq!(l.lookup_named("7").await.0, "template");
        assert_eq!(l.lookup_named("zz").await.0, NO_SOURCE);
    }

    /// Fails every lookup, as a source whose far side is down.
    #[derive(Debug)]
    struct Down;

    impl Registry for Down {
        fn kind(&self) -> &'static str {
            "down"
        }
        fn lookup<'a>(&'a self, _id: &'a str) -> Lookup<'a> {
            Lookup::Pending(Box::pin(async {
                Err(RegistryError::Unavailable {
                    source_kind: "down",
                    reason: "far side down".into(),
                })
            }))
        }
    }

    #[tokio::test]
    async fn a_failing_source_does_not_hide_later_ones_but_is_not_a_404() {
        let a = StaticVms::new(vec![Vm {
            id: "a".into(),
            address: Address::parse("10.0.0.1").unwrap(),
            ports: BTreeMap::new(),
            scheme: Scheme::Http,
            unresolvable_is_unknown: false,
            tls_server_name: None,
            tls_verify: true,
            self_reported: false,
            access_epoch: 0,
            state: VmState::Running,
        }]);
        let l = Layered::new(vec![Arc::new(Down), Arc::new(a)]);
        let vm = l.lookup("a").resolve().await.unwrap().unwrap();
        assert_eq!(vm.address.to_string(), "10.0.0.1");
        assert!(matches!(
            l.lookup("zz").resolve().await,
            Err(RegistryError::Unavailable {
                source_kind: "down",
                ..
            })
        ));
    }
}
