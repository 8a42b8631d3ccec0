//! `proxmox`: a numeric id is a Proxmox VE container (LXC) vmid, and its address is what the
//! container reports for its interfaces, read through the PVE API with an API token.
//!
//! `GET /api2/json/cluster/resources?type=vm` says which node runs a vmid (and that it is a
//! running container), then `GET /api2/json/nodes/{node}/lxc/{vmid}/interfaces` gives its
//! addresses. The first IPv4 address off loopback wins, else the first global IPv6 address.
//! Answers are cached like the `http` source's ([`CachedSource`]).
//!
//! The cluster listing is one call for every container, so it is shared: lookups reuse it for
//! `negative_ttl`, and concurrent cold lookups wait for one listing instead of each making
//! their own. A vmid missing from a listing older than a second asks for a new one, so a
//! container created a moment ago is found without waiting out the whole TTL.
//!
//! A vmid PVE does not list or a QEMU VM (its addresses need the guest agent) is unknown
//! (404). A stopped container is unknown too, unless `[wake] proxmox = true`: then it is found
//! with state `stopped` (`paused` when PVE locks it `suspended`) and no address yet, and
//! [`wake_container`] starts (or resumes) it. A running container with no usable address is an error, so
//! stale-on-error can cover a DHCP renewal.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

use super::cached::{Ask, CachePolicy, CachedSource};
use super::{Address, Scheme, Vm, VmState};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxmoxSettings {
    /// The API base, e.g. `https://pve.lan:8006` (no `/api2/json`).
    pub url: String,
    /// `USER@REALM!TOKENID=SECRET`, sent as `Authorization: PVEAPIToken=...`.
    pub token: String,
    /// PEM roots to trust instead of the system's (PVE's self-signed `pve-root-ca.pem`).
    pub ca_pem: Option<Vec<u8>>,
    pub policy: CachePolicy,
    /// `[wake] proxmox = true`: stopped containers are found (state `stopped`), to be woken.
    pub find_stopped: bool,
}

/// The PVE API; only the cluster listing is kept (see the module notes).
pub struct Pve {
    base: String,
    authorization: String,
    client: reqwest::Client,
    /// How long a cluster listing is reused (`negative_ttl`).
    listing_ttl: Duration,
    /// The async lock is held while a new listing is fetched, which is what makes
    /// concurrent cold lookups share one.
    listing: Mutex<Listing>,
    find_stopped: bool,
}

#[derive(Default)]
struct Listing {
    /// The last listing, vmid → where and what it is.
    last: Option<(Instant, Arc<HashMap<u64, Placement>>)>,
    /// The last failure: lookups that waited while it happened share it rather than each
    /// trying again in turn (which would make the last of N wait N timeouts).
    failed: Option<(Instant, String)>,
}

/// What the cluster listing says about one vmid.
struct Placement {
    node: String,
    kind: String,
    state: VmState,
}

/// A listing younger than this is trusted even about a vmid it lacks.
const LISTING_MIN_AGE: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Pve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxmoxSource")
            .field("url", &self.base)
            .finish()
    }
}

pub type ProxmoxSource = CachedSource<Pve>;

impl CachedSource<Pve> {
    pub fn new(s: ProxmoxSettings) -> Result<ProxmoxSource, String> {
        Ok(CachedSource::with(Pve::new(&s)?, s.policy))
    }
}

impl Pve {
    fn new(s: &ProxmoxSettings) -> Result<Pve, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(s.policy.timeout)
            .connect_timeout(s.policy.timeout)
            .no_proxy();
        if let Some(pem) = &s.ca_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("the Proxmox CA bundle does not parse: {e}"))?;
            builder = builder.tls_certs_only(roots);
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the Proxmox HTTP client: {e}"))?;
        let token = s.token.strip_prefix("PVEAPIToken=").unwrap_or(&s.token);
        Ok(Pve {
            base: s.url.trim_end_matches('/').to_owned(),
            authorization: format!("PVEAPIToken={token}"),
            client,
            listing_ttl: s.policy.negative_ttl,
            listing: Mutex::default(),
            find_stopped: s.find_stopped,
        })
    }

    /// A PVE task call (`POST`, no body); PVE answers `{"data": "UPID:..."}`.
    async fn post(&self, path: &str) -> Result<(), String> {
        let url = format!("{}/api2/json{path}", self.base);
        let resp = self
            .client
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, &self.authorization)
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        match resp.status().as_u16() {
            200 => Ok(()),
            401 => Err(format!("POST {url}: the PVE API refused the token (401)")),
            other => Err(format!("POST {url}: status {other}")),
        }
    }
}

/// `[wake] proxmox = true`: `status/start` for a stopped container, `status/resume` for a
/// suspended one, nothing for one already running. The node comes from a fresh cluster
/// listing (one call: wakes are rare, and the cached listing is what said "stopped").
pub async fn wake_container(s: &ProxmoxSettings, id: &str) -> Result<(), String> {
    let vmid = vmid(id).ok_or_else(|| format!("{id:?} is not a PVE vmid"))?;
    let pve = Pve::new(s)?;
    let resources: Vec<Resource> = pve.get("/cluster/resources?type=vm").await?;
    let r = resources
        .iter()
        .find(|r| r.vmid == Some(vmid))
        .ok_or_else(|| format!("PVE does not list {vmid}"))?;
    let node = r.node.as_deref().unwrap_or("");
    if r.kind != "lxc" || !safe_node(node) {
        return Err(format!("{vmid} is not a container on a usable node"));
    }
    let action = match r.state() {
        VmState::Running => return Ok(()),
        VmState::Paused => "resume",
        VmState::Stopped => "start",
    };
    pve.post(&format!("/nodes/{node}/lxc/{vmid}/status/{action}"))
        .await
}

/// Every PVE API answer is `{"data": ...}`.
#[derive(Deserialize)]
struct Data<T> {
    data: T,
}

/// One entry of `/cluster/resources?type=vm` (only the fields used).
#[derive(Deserialize)]
struct Resource {
    #[serde(default)]
    vmid: Option<u64>,
    #[serde(default)]
    node: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    status: Option<String>,
    /// `suspended` for a container suspended to disk.
    #[serde(default)]
    lock: Option<String>,
}

impl Resource {
    fn state(&self) -> VmState {
        match (self.status.as_deref(), self.lock.as_deref()) {
            (_, Some("suspended")) | (Some("paused" | "suspended"), _) => VmState::Paused,
            (Some("running"), _) => VmState::Running,
            _ => VmState::Stopped,
        }
    }
}

/// One entry of `/nodes/{node}/lxc/{vmid}/interfaces`.
#[derive(Deserialize)]
struct Interface {
    name: String,
    /// `"10.100.0.200/24"`.
    #[serde(default)]
    inet: Option<String>,
    #[serde(default)]
    inet6: Option<String>,
}

/// A PVE vmid: 100–999999999, decimal, no leading zero.
fn vmid(id: &str) -> Option<u64> {
    let ok = (3..=9).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_digit())
        && !id.starts_with('0');
    ok.then(|| id.parse().ok()).flatten()
}

/// Node names go into a URL path: only what PVE itself allows.
fn safe_node(node: &str) -> bool {
    !node.is_empty()
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The address to route to: the first IPv4 off loopback and link-local, else the first
/// global IPv6. Addresses may carry a prefix length and come comma-separated.
fn pick_address(interfaces: &[Interface]) -> Option<IpAddr> {
    let addrs = |field: fn(&Interface) -> Option<&str>| {
        interfaces
            .iter()
            .filter(|i| i.name != "lo")
            .filter_map(field)
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().split('/').next()?.parse::<IpAddr>().ok())
            .collect::<Vec<_>>()
    };
    let usable_v4 =
        |ip: &Ipv4Addr| !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified();
    let usable_v6 = |ip: &Ipv6Addr| {
        !ip.is_loopback() && !ip.is_unspecified() && (ip.segments()[0] & 0xffc0) != 0xfe80
    };
    addrs(|i| i.inet.as_deref())
        .into_iter()
        .find(|ip| matches!(ip, IpAddr::V4(v4) if usable_v4(v4)))
        .or_else(|| {
            addrs(|i| i.inet6.as_deref())
                .into_iter()
                .find(|ip| matches!(ip, IpAddr::V6(v6) if usable_v6(v6)))
        })
}

impl Pve {
    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let url = format!("{}/api2/json{path}", self.base);
        let resp = self
            .client
            .get(&url)
            .header(reqwest::header::AUTHORIZATION, &self.authorization)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        match resp.status().as_u16() {
            200 => {}
            401 => return Err(format!("GET {url}: the PVE API refused the token (401)")),
            other => return Err(format!("GET {url}: status {other}")),
        }
        let body = resp.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
        serde_json::from_slice::<Data<T>>(&body)
            .map(|d| d.data)
            .map_err(|e| format!("GET {url}: unexpected JSON: {e}"))
    }
}

impl Pve {
    /// Where `vmid` is, from a shared cluster listing (fetched again when too old, or when it
    /// lacks the vmid and is older than [`LISTING_MIN_AGE`]).
    async fn placement(&self, vmid: u64) -> Result<Option<(String, String, VmState)>, String> {
        let waited_since = Instant::now();
        let mut listing = self.listing.lock().await;
        if let Some((at, reason)) = &listing.failed {
            if *at >= waited_since {
                return Err(reason.clone());
            }
        }
        let usable = listing.last.as_ref().filter(|(at, map)| {
            let age = at.elapsed();
            age < self.listing_ttl && (map.contains_key(&vmid) || age < LISTING_MIN_AGE)
        });
        let map = match usable {
            Some((_, map)) => map.clone(),
            None => {
                let resources: Vec<Resource> = match self.get("/cluster/resources?type=vm").await {
                    Ok(r) => r,
                    Err(reason) => {
                        listing.failed = Some((Instant::now(), reason.clone()));
                        return Err(reason);
                    }
                };
                let map: HashMap<u64, Placement> = resources
                    .into_iter()
                    .filter_map(|r| {
                        let state = r.state();
                        Some((
                            r.vmid?,
                            Placement {
                                node: r.node?,
                                state,
                                kind: r.kind,
                            },
                        ))
                    })
                    .collect();
                let map = Arc::new(map);
                listing.last = Some((Instant::now(), map.clone()));
                map
            }
        };
        drop(listing);
        Ok(map
            .get(&vmid)
            .map(|p| (p.node.clone(), p.kind.clone(), p.state)))
    }
}

impl Ask for Pve {
    const KIND: &'static str = "proxmox";

    async fn ask(&self, id: &str) -> Result<Option<Vm>, String> {
        let Some(vmid) = vmid(id) else {
            return Ok(None);
        };
        let Some((node, kind, state)) = self.placement(vmid).await? else {
            return Ok(None);
        };
        if kind != "lxc" || !(state.is_running() || self.find_stopped) {
            tracing::debug!(vmid, %kind, ?state, "not a running container: unknown");
            return Ok(None);
        }
        if !state.is_running() {
            // No interfaces to read yet: the address is asked for again once it is woken.
            return Ok(Some(Vm {
                id: id.to_owned(),
                address: Address::Ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                ports: Default::default(),
                scheme: Scheme::Http,
                unresolvable_is_unknown: false,
                tls_server_name: None,
                tls_verify: true,
                self_reported: true,
                access_epoch: 0,
                state,
            }));
        }
        let node = node.as_str();
        if !safe_node(node) {
            return Err(format!("vmid {vmid}: PVE names its node {node:?}"));
        }
        let interfaces: Vec<Interface> = self
            .get(&format!("/nodes/{node}/lxc/{vmid}/interfaces"))
            .await?;
        let ip = pick_address(&interfaces)
            .ok_or_else(|| format!("container {vmid} on {node} reports no usable address yet"))?;
        Ok(Some(Vm {
            id: id.to_owned(),
            address: Address::Ip(ip),
            ports: Default::default(),
            scheme: Scheme::Http,
            unresolvable_is_unknown: false,
            tls_server_name: None,
            tls_verify: true,
            self_reported: true,
            access_epoch: 0,
            state: VmState::Running,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pve_vmids_are_looked_up() {
        assert_eq!(vmid("200"), Some(200));
        assert_eq!(vmid("999999999"), Some(999_999_999));
        for not in ["99", "0200", "1000000000", "pvelxc-abc", "2a0", ""] {
            assert_eq!(vmid(not), None, "{not}");
        }
    }

    #[test]
    fn the_first_ipv4_off_loopback_wins_then_global_ipv6() {
        let parse = |json: &str| {
            serde_json::from_str::<Data<Vec<Interface>>>(json)
                .unwrap()
                .data
        };
        // The shape PVE answers for a running container.
        let ifaces = parse(
            r#"{"data":[
              {"name":"lo","hwaddr":"00:00:00:00:00:00","inet":"127.0.0.1/8","inet6":"::1/128"},
              {"name":"eth0","hwaddr":"bc:24:11:2c:69:f0","inet":"10.100.0.200/24","inet6":"fe80::be24:11ff:fe2c:69f0/64"}
            ]}"#,
        );
        assert_eq!(pick_address(&ifaces), Some("10.100.0.200".parse().unwrap()));
        let v6_only = parse(
            r#"{"data":[
              {"name":"lo","inet":"127.0.0.1/8"},
              {"name":"eth0","inet6":"fe80::1/64,2001:db8::200/64"}
            ]}"#,
        );
        assert_eq!(
            pick_address(&v6_only),
            Some("2001:db8::200".parse().unwrap())
        );
        let none = parse(r#"{"data":[{"name":"lo","inet":"127.0.0.1/8"},{"name":"eth0"}]}"#);
        assert_eq!(pick_address(&none), None);
    }

    #[test]
    fn node_names_are_checked_before_they_reach_a_url() {
        assert!(safe_node("pve1") && safe_node("pve-2.lan"));
        assert!(!safe_node("") && !safe_node("../x") && !safe_node("a/b") && !safe_node("a?b"));
    }
}
