//! Activity per VM and port (SPEC §13): last request, last time bytes moved either way
//! (WebSocket frames included), open WebSockets, requests and bytes, for a control plane that
//! pauses idle VMs (`/api/activity?idle_for=`, and the webhook).
//!
//! Cost per request: one map read at request start (an insert the first time a VM is seen),
//! then relaxed atomic adds per body chunk on the VM's own counters: no lock, no allocation.
//! Memory is bounded: at most `max_vms` VMs, [`PORT_SLOTS`] ports each (further ports share
//! the slot reported as port 0); when full, the sixteenth of VMs idle the longest without an
//! open WebSocket is evicted. Approximation: an evicted VM starts again from zero.
//!
//! Idle means no bytes moved (and no request) for `idle_for`. An open WebSocket does not keep
//! a VM active by being open: only its frames do, so an IDE tab left open is idle.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use serde::Serialize;

use super::webhook::WebhookSettings;

/// Distinct ports tracked per VM; more share one overflow slot (port 0).
pub const PORT_SLOTS: usize = 8;

/// `[activity]`.
#[derive(Debug, Clone)]
pub struct ActivitySettings {
    /// User agents (globs with `*` and `?`) whose requests are not activity.
    pub ignore_user_agents: Vec<String>,
    /// VMs tracked at once.
    pub max_vms: usize,
    pub webhook: Option<WebhookSettings>,
}

impl Default for ActivitySettings {
    fn default() -> Self {
        ActivitySettings {
            ignore_user_agents: Vec::new(),
            max_vms: 100_000,
            webhook: None,
        }
    }
}

impl ActivitySettings {
    fn ignores(&self, user_agent: &[u8]) -> bool {
        self.ignore_user_agents
            .iter()
            .any(|g| glob(g.as_bytes(), user_agent))
    }
}

/// `*` any run of bytes, `?` one byte, everything else itself (case-sensitive).
pub fn glob(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// One port's counters. Times are milliseconds since [`Activity`]'s start plus one (0: never).
#[derive(Default)]
struct PortActivity {
    /// The port + 1 (0: free slot).
    port: AtomicU32,
    last_request: AtomicU64,
    last_bytes: AtomicU64,
    open_websockets: AtomicI64,
    requests: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// One VM's counters: created once, then only atomics.
#[derive(Default)]
pub struct VmActivity {
    ports: [PortActivity; PORT_SLOTS + 1],
    /// Anything moved since the last webhook batch took it.
    changed: AtomicBool,
}

impl VmActivity {
    fn slot(&self, port: u16) -> usize {
        let want = u32::from(port) + 1;
        for (i, p) in self.ports[..PORT_SLOTS].iter().enumerate() {
            let have = p.port.load(Relaxed);
            if have == want {
                return i;
            }
            if have == 0 {
                match p.port.compare_exchange(0, want, Relaxed, Relaxed) {
                    Ok(_) => return i,
                    Err(now) if now == want => return i,
                    Err(_) => continue,
                }
            }
        }
        PORT_SLOTS
    }

    /// The latest of last request and last bytes, over every port.
    fn last_active(&self) -> u64 {
        self.ports
            .iter()
            .map(|p| p.last_request.load(Relaxed).max(p.last_bytes.load(Relaxed)))
            .max()
            .unwrap_or(0)
    }

    fn open_websockets(&self) -> i64 {
        self.ports
            .iter()
            .map(|p| p.open_websockets.load(Relaxed))
            .sum()
    }
}

/// Every VM's activity, on `Edge` so a reload keeps it.
pub struct Activity {
    vms: DashMap<String, Arc<VmActivity>>,
    started: Instant,
    started_at: SystemTime,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            vms: DashMap::new(),
            started: Instant::now(),
            started_at: SystemTime::now(),
        }
    }
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("vms", &self.vms.len())
            .finish()
    }
}

/// One request's view of its VM port's counters, kept in the request context.
pub struct Handle {
    vm: Arc<VmActivity>,
    slot: usize,
    started: Instant,
    websocket: bool,
}

impl Handle {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// Body bytes (or WebSocket frames) moved: `inbound` from the client, `outbound` to it.
    pub fn bytes(&self, inbound: usize, outbound: usize) {
        if inbound == 0 && outbound == 0 {
            return;
        }
        let p = &self.vm.ports[self.slot];
        if inbound > 0 {
            p.bytes_in.fetch_add(inbound as u64, Relaxed);
        }
        if outbound > 0 {
            p.bytes_out.fetch_add(outbound as u64, Relaxed);
        }
        p.last_bytes.store(self.now(), Relaxed);
        self.vm.changed.store(true, Relaxed);
    }

    /// The upstream answered 101: counted as an open WebSocket until the request ends.
    pub fn websocket_opened(&mut self) {
        if !self.websocket {
            self.websocket = true;
            self.vm.ports[self.slot]
                .open_websockets
                .fetch_add(1, Relaxed);
            self.vm.changed.store(true, Relaxed);
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.websocket {
            self.vm.ports[self.slot]
                .open_websockets
                .fetch_sub(1, Relaxed);
            self.vm.changed.store(true, Relaxed);
        }
    }
}

/// One port's activity, as the admin API and the webhook show it.
#[derive(Debug, Clone, Serialize)]
pub struct PortReport {
    pub port: u16,
    pub last_request: Option<String>,
    pub last_bytes: Option<String>,
    pub open_websockets: i64,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// One VM's activity: totals over its ports, and each port.
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub id: String,
    /// RFC 3339, or null when never.
    pub last_request: Option<String>,
    pub last_bytes: Option<String>,
    /// Seconds since the last request or byte moved.
    pub idle_seconds: u64,
    pub open_websockets: i64,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub ports: Vec<PortReport>,
}

impl Activity {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// A request passed every gate: counted for its VM port, unless its user agent is
    /// ignored.
    pub fn admit(
        &self,
        g: Option<&crate::edge::Generation>,
        req: &pingora::http::RequestHeader,
        target: &crate::edge::Target,
    ) -> Option<Handle> {
        let ua = req.headers.get(http::header::USER_AGENT);
        self.start(
            &g?.config.activity,
            &target.id,
            target.port,
            ua.map(|v| v.as_bytes()),
        )
    }

    /// A request was admitted to VM `id` port `port`: counted, unless its user agent is
    /// ignored (then `None`, and nothing it moves counts either).
    pub fn start(
        &self,
        settings: &ActivitySettings,
        id: &str,
        port: u16,
        user_agent: Option<&[u8]>,
    ) -> Option<Handle> {
        if !settings.ignore_user_agents.is_empty() && settings.ignores(user_agent.unwrap_or(b"")) {
            return None;
        }
        let vm = match self.vms.get(id) {
            Some(vm) => vm.clone(),
            None => self.insert(id, settings.max_vms),
        };
        let slot = vm.slot(port);
        let p = &vm.ports[slot];
        p.requests.fetch_add(1, Relaxed);
        p.last_request.store(self.now(), Relaxed);
        vm.changed.store(true, Relaxed);
        Some(Handle {
            vm,
            slot,
            started: self.started,
            websocket: false,
        })
    }

    fn insert(&self, id: &str, max_vms: usize) -> Arc<VmActivity> {
        if self.vms.len() >= max_vms.max(1) {
            self.evict(max_vms.max(16) / 16);
        }
        self.vms.entry(id.to_owned()).or_default().clone()
    }

    /// Drops the `n` VMs idle the longest, sparing those with an open WebSocket.
    fn evict(&self, n: usize) {
        let mut idle: Vec<(u64, String)> = self
            .vms
            .iter()
            .filter(|e| e.value().open_websockets() <= 0)
            .map(|e| (e.value().last_active(), e.key().clone()))
            .collect();
        if idle.len() > n {
            idle.select_nth_unstable(n);
            idle.truncate(n);
        }
        for (_, id) in idle {
            self.vms.remove(&id);
        }
    }

    fn time(&self, ms: u64) -> Option<String> {
        (ms > 0).then(|| {
            let at = self.started_at + Duration::from_millis(ms - 1);
            humantime::format_rfc3339_millis(at).to_string()
        })
    }

    fn report(&self, id: &str, vm: &VmActivity) -> VmReport {
        let now = self.now();
        let mut r = VmReport {
            id: id.to_owned(),
            last_request: None,
            last_bytes: None,
            idle_seconds: 0,
            open_websockets: 0,
            requests: 0,
            bytes_in: 0,
            bytes_out: 0,
            ports: Vec::new(),
        };
        let (mut last_request, mut last_bytes) = (0, 0);
        for (i, p) in vm.ports.iter().enumerate() {
            let port = p.port.load(Relaxed);
            if port == 0 && i < PORT_SLOTS {
                continue;
            }
            let pr = PortReport {
                port: port.saturating_sub(1) as u16,
                last_request: self.time(p.last_request.load(Relaxed)),
                last_bytes: self.time(p.last_bytes.load(Relaxed)),
                open_websockets: p.open_websockets.load(Relaxed),
                requests: p.requests.load(Relaxed),
                bytes_in: p.bytes_in.load(Relaxed),
                bytes_out: p.bytes_out.load(Relaxed),
            };
            if i == PORT_SLOTS && pr.requests == 0 {
                continue;
            }
            last_request = last_request.max(p.last_request.load(Relaxed));
            last_bytes = last_bytes.max(p.last_bytes.load(Relaxed));
            r.open_websockets += pr.open_websockets;
            r.requests += pr.requests;
            r.bytes_in += pr.bytes_in;
            r.bytes_out += pr.bytes_out;
            r.ports.push(pr);
        }
        r.last_request = self.time(last_request);
        r.last_bytes = self.time(last_bytes);
        r.idle_seconds = now.saturating_sub(last_request.max(last_bytes)) / 1000;
        r
    }

    /// One VM's activity, if any was seen since start (or since it was evicted).
    pub fn get(&self, id: &str) -> Option<VmReport> {
        self.vms.get(id).map(|vm| self.report(id, &vm))
    }

    /// VMs with no request and no byte moved for `idle_for` (every VM when `None`). A quiet
    /// open WebSocket does not make a VM active.
    pub fn list(&self, idle_for: Option<Duration>) -> Vec<VmReport> {
        let now = self.now();
        let mut out: Vec<VmReport> = self
            .vms
            .iter()
            .filter(|e| {
                idle_for.is_none_or(|d| {
                    now.saturating_sub(e.value().last_active()) >= d.as_millis() as u64
                })
            })
            .map(|e| self.report(e.key(), e.value()))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The VMs that changed since the last call, for the webhook.
    pub fn take_changed(&self) -> Vec<VmReport> {
        let mut out: Vec<VmReport> = self
            .vms
            .iter()
            .filter(|e| e.value().changed.swap(false, Relaxed))
            .map(|e| self.report(e.key(), e.value()))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_agent_globs() {
        assert!(glob(b"kube-probe/*", b"kube-probe/1.29"));
        assert!(glob(b"*Uptime*", b"Mozilla Uptime-Kuma/1.0"));
        assert!(glob(b"a?c", b"abc"));
        assert!(!glob(b"kube-probe/*", b"curl/8"));
        assert!(!glob(b"a?c", b"ac"));
        assert!(glob(b"*", b""));
    }

    #[test]
    fn requests_and_bytes_are_counted_per_port_and_idle_is_about_bytes_not_open_sockets() {
        let a = Activity::default();
        let s = ActivitySettings {
            ignore_user_agents: vec!["bot/*".into()],
            ..Default::default()
        };
        assert!(a.start(&s, "b1", 80, Some(b"bot/2")).is_none());
        let h = a.start(&s, "b1", 80, Some(b"curl/8")).unwrap();
        h.bytes(10, 20);
        let mut ws = a.start(&s, "b1", 3000, None).unwrap();
        ws.websocket_opened();
        let r = a.get("b1").unwrap();
        assert_eq!(
            (r.requests, r.bytes_in, r.bytes_out, r.open_websockets),
            (2, 10, 20, 1)
        );
        assert_eq!(r.ports.len(), 2);
        // just active: not idle for 1 s, but idle for 0 s
        assert!(a.list(Some(Duration::from_secs(1))).is_empty());
        assert_eq!(a.list(Some(Duration::ZERO)).len(), 1);
        drop(ws);
        assert_eq!(a.get("b1").unwrap().open_websockets, 0);
        assert_eq!(a.take_changed().len(), 1);
        assert!(a.take_changed().is_empty());
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_longest_idle() {
        let a = Activity::default();
        let s = ActivitySettings {
            max_vms: 32,
            ..Default::default()
        };
        let mut keep = a.start(&s, "ws", 1, None).unwrap();
        keep.websocket_opened();
        for i in 0..100 {
            a.start(&s, &format!("vm{i}"), 1, None);
        }
        assert!(a.vms.len() <= 32);
        assert!(a.get("ws").is_some(), "an open WebSocket is never evicted");
        for port in 1..=20 {
            a.start(&s, "many", port, None);
        }
        let r = a.get("many").unwrap();
        assert_eq!(r.ports.len(), PORT_SLOTS + 1);
        assert_eq!(r.requests, 20);
    }
}
