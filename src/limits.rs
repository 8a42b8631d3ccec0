//! Per-client and per-VM limits: the `[limits]` section of SPEC §11.
//!
//! | key                  | counts                                   | over it                         |
//! |----------------------|------------------------------------------|---------------------------------|
//! | `connections_per_ip` | open connections from one TCP peer       | closed at accept (before TLS)   |
//! | `requests_per_ip`    | request rate, with `burst_per_ip`        | 429, `Retry-After` from the rate |
//! | `requests_per_vm`    | requests in flight to one VM             | 429, `Retry-After: 1`           |
//! | `websockets_per_vm`  | WebSockets open to one VM                | 429 before the 101              |
//! | `unknown_ids_per_ip` | registry misses (404 unknown vm)         | 429 for ids the cache does not know, before the registry is asked |
//!
//! Each limit is off unless set; `dry_run` counts and logs, refuses nothing. A client is its
//! address as `[trust] proxies` reveal it (`X-Forwarded-For` from a trusted proxy), an IPv6
//! client its /64 ([`ClientKey`]). `connections_per_ip` is the exception: a connection is
//! counted before any request is read, so it is keyed by the TCP peer, which behind a trusted
//! proxy (Cloudflare Tunnel's `cloudflared`) is the proxy itself.
//!
//! **Memory is fixed** whatever the number of distinct clients or VMs: every counter is a
//! count-min sketch of 4 rows × 8192 slots of 8-byte atomics (256 KiB), allocated the first
//! time a generation turns its limit on, and kept on [`Counters`] (on `Edge`) so a reload
//! neither resets nor forgets a count. Four sketches at most: 1 MiB with every limit on.
//! Concurrency limits use `pingora_limits::inflight::Inflight` (its `Guard` decrements on
//! drop: a request's guards live in its `RequestCtx`, a connection's in `server.rs`'s
//! `CountedConnections`). Rates use [`RateSketch`]: GCRA (a token bucket kept as one
//! "theoretical arrival time" per slot) in the same sketch shape; pingora-limits' `Rate`
//! counts fixed windows (twice the burst across a window edge, no `Retry-After`) and
//! governor's keyed store is a map that grows with every client until swept.
//!
//! **What a sketch gets wrong**: it only ever over-counts. Two keys that share a slot in all
//! four rows share one count, so a quiet client can be refused because busy ones hash where
//! it does. With `n` clients at their limit at once, another client shares all four slots
//! with one of them with probability about `(n / 8192)^4`: 1e-4 for n = 820, 0.4 % for
//! n = 2000. Under contention a few requests may pass beyond a limit (the check and the
//! update are separate atomic steps); never fewer than the limit.
//!
//! **Per-request cost** with every limit on: one `Instant` read, one hash and 4 atomic loads
//! plus 4 atomic updates for the rate, one hash and 8 atomic adds for the per-VM guards (and 8
//! subtractions when they drop), with no lock and no allocation (a VM is keyed by its id's
//! hash). With no limit set, one branch per gate. Measured in `benches/limits.rs`.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pingora_limits::inflight::{Guard, Inflight};

use crate::metrics::METRICS;
use crate::respond::{Answer, Refusal};

/// Which limit refused (the 429 body, the metric's `limit` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    ConnectionsPerIp,
    RequestsPerIp,
    RequestsPerVm,
    WebsocketsPerVm,
    UnknownIdsPerIp,
}

impl LimitKind {
    /// The config key, used as the bounded label and in the 429 body.
    pub const fn as_str(self) -> &'static str {
        match self {
            LimitKind::ConnectionsPerIp => "connections_per_ip",
            LimitKind::RequestsPerIp => "requests_per_ip",
            LimitKind::RequestsPerVm => "requests_per_vm",
            LimitKind::WebsocketsPerVm => "websockets_per_vm",
            LimitKind::UnknownIdsPerIp => "unknown_ids_per_ip",
        }
    }
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sustained rate such as `"50/s"` or `"10/min"`: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RatePer {
    pub count: u32,
    pub per: Duration,
}

impl RatePer {
    /// `"<count>/<unit>"` with unit `s`, `min`, `h`, or a duration (`"100/10s"`).
    pub fn parse(s: &str) -> Result<RatePer, String> {
        let usage = || format!("expected a rate such as \"50/s\" or \"10/min\", found {s:?}");
        let (count, unit) = s.split_once('/').ok_or_else(usage)?;
        let count: u32 = count.trim().parse().map_err(|_| usage())?;
        if count == 0 {
            return Err("the rate must allow at least one event".into());
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => crate::config::parse_duration(other).map_err(|_| usage())?,
        };
        if per.is_zero() {
            return Err(usage());
        }
        Ok(RatePer { count, per })
    }

    /// The time one event "costs" in the bucket, in nanoseconds (at least 1).
    pub fn emission_ns(self) -> u64 {
        let ns = self.per.as_nanos() / u128::from(self.count);
        u64::try_from(ns).unwrap_or(u64::MAX).max(1)
    }
}

/// `[limits]` (SPEC §11): the thresholds of one generation. `None` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitSettings {
    pub connections_per_ip: Option<u32>,
    pub requests_per_ip: Option<RatePer>,
    /// The burst over `requests_per_ip`; unset, the rate's own count (`"50/s"` → 50).
    pub burst_per_ip: Option<u32>,
    pub requests_per_vm: Option<u32>,
    pub websockets_per_vm: Option<u32>,
    pub unknown_ids_per_ip: Option<RatePer>,
    pub dry_run: bool,
}

/// A client as the limits see it: an IPv4 address, or an IPv6 /64 (one subscriber's
/// network: one host can use all of it). IPv4-mapped IPv6 addresses are their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(u128);

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey(u128::from(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(u128::from(v4.to_ipv6_mapped())),
                None => ClientKey(u128::from(v6) & !u128::from(u64::MAX)),
            },
        }
    }
}

const ROWS: usize = 4;
const SLOTS: usize = 8192;

/// GCRA in a count-min sketch: each slot holds the latest "theoretical arrival time" (ns
/// since the sketch's start) of the keys that hash there. A slot's time is never earlier
/// than any of its keys' own, so the earliest of a key's four slots over-estimates it least.
pub struct RateSketch {
    tat: Box<[AtomicU64]>,
    hasher: ahash::RandomState,
    start: Instant,
}

impl Default for RateSketch {
    fn default() -> Self {
        RateSketch::new()
    }
}

impl RateSketch {
    pub fn new() -> RateSketch {
        RateSketch {
            tat: (0..ROWS * SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: ahash::RandomState::new(),
            start: Instant::now(),
        }
    }

    /// The key's slot in each row, from one 64-bit hash (13 bits a row).
    fn slots(&self, key: impl Hash) -> [usize; ROWS] {
        let h = self.hasher.hash_one(key);
        std::array::from_fn(|r| r * SLOTS + ((h >> (r * 16)) as usize & (SLOTS - 1)))
    }

    pub fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// How long (ns) before one more event of `key` fits: 0 when it fits now.
    fn wait(&self, slots: &[usize; ROWS], now: u64, rate: RatePer, burst: u32) -> u64 {
        let emission = rate.emission_ns();
        let tat = slots
            .iter()
            .map(|&i| self.tat[i].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        let after = tat.max(now).saturating_add(emission);
        let tolerance = emission.saturating_mul(u64::from(burst.max(1)));
        (after - now).saturating_sub(tolerance)
    }

    fn add(&self, slots: &[usize; ROWS], now: u64, rate: RatePer) {
        let emission = rate.emission_ns();
        for &i in slots {
            let _ = self.tat[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.max(now).saturating_add(emission))
            });
        }
    }

    /// Takes one event if it fits (`Ok`), else the wait before it would (`Err`, ns).
    pub fn take(&self, key: impl Hash, now: u64, rate: RatePer, burst: u32) -> Result<(), u64> {
        let slots = self.slots(key);
        match self.wait(&slots, now, rate, burst) {
            0 => {
                self.add(&slots, now, rate);
                Ok(())
            }
            wait => Err(wait),
        }
    }

    /// Whether one more event would fit, without taking it.
    pub fn check(&self, key: impl Hash, now: u64, rate: RatePer, burst: u32) -> Result<(), u64> {
        match self.wait(&self.slots(key), now, rate, burst) {
            0 => Ok(()),
            wait => Err(wait),
        }
    }

    /// Records an event whether or not it fits (it already happened).
    pub fn record(&self, key: impl Hash, now: u64, rate: RatePer) {
        self.add(&self.slots(key), now, rate);
    }
}

/// Whole seconds to wait, rounded up, never 0 (`Retry-After: 0` invites the retry).
pub fn retry_after(wait_ns: u64) -> NonZeroU32 {
    let secs = wait_ns.div_ceil(1_000_000_000);
    NonZeroU32::new(u32::try_from(secs).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN)
}

/// What a request or a connection holds against a concurrency limit; dropping it gives the
/// slots back.
#[derive(Debug, Default)]
pub struct Held {
    _vm: Option<Guard>,
    _websocket: Option<Guard>,
}

/// A connection's place in `connections_per_ip`, given back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    _guard: Option<Guard>,
}

/// The counts of every limit. They live on `Edge`, so a reload keeps them; the thresholds come
/// from each call's [`LimitSettings`] (the request's generation).
#[derive(Default)]
pub struct Counters {
    connections: OnceLock<Inflight>,
    vms: OnceLock<Inflight>,
    requests: OnceLock<RateSketch>,
    misses: OnceLock<RateSketch>,
}

/// The per-VM sketch keys a WebSocket apart from a request with this tag.
const VM_REQUEST: u8 = 0;
const VM_WEBSOCKET: u8 = 1;
/// Over a concurrency limit there is no schedule to quote: ask again in a second.
const CONCURRENCY_RETRY: NonZeroU32 = NonZeroU32::MIN;

impl Counters {
    pub fn new() -> Counters {
        Counters::default()
    }

    /// The refusal for `limit` (or, under `dry_run`, only its count and a log line).
    fn over(s: &LimitSettings, limit: LimitKind, retry_after: NonZeroU32) -> Result<(), Refusal> {
        METRICS.limited(limit.as_str(), s.dry_run);
        if s.dry_run {
            tracing::info!(
                limit = limit.as_str(),
                "over a limit (dry run: not refused)"
            );
            return Ok(());
        }
        Err(Refusal::RateLimited { limit, retry_after })
    }

    /// `requests_per_ip` (with `burst_per_ip`), for every request.
    pub fn admit(&self, s: &LimitSettings, client: Option<IpAddr>) -> Result<(), Refusal> {
        let (Some(rate), Some(ip)) = (s.requests_per_ip, client) else {
            return Ok(());
        };
        let sketch = self.requests.get_or_init(RateSketch::new);
        let burst = s.burst_per_ip.unwrap_or(rate.count);
        match sketch.take(ClientKey::of(ip), sketch.now(), rate, burst) {
            Ok(()) => Ok(()),
            Err(wait) => Counters::over(s, LimitKind::RequestsPerIp, retry_after(wait)),
        }
    }

    /// `unknown_ids_per_ip`, before the registry is asked: a client over its budget of misses
    /// is refused ids that `known` says would have to be asked about (not cached, not local).
    pub fn unknown_ids(
        &self,
        s: &LimitSettings,
        client: Option<IpAddr>,
        known: impl FnOnce() -> bool,
    ) -> Result<(), Refusal> {
        let (Some(rate), Some(ip)) = (s.unknown_ids_per_ip, client) else {
            return Ok(());
        };
        let Some(sketch) = self.misses.get() else {
            return Ok(()); // no miss recorded yet
        };
        match sketch.check(ClientKey::of(ip), sketch.now(), rate, rate.count) {
            Ok(()) => Ok(()),
            Err(_) if known() => Ok(()),
            Err(wait) => Counters::over(s, LimitKind::UnknownIdsPerIp, retry_after(wait)),
        }
    }

    /// Counts a registry miss (404 unknown vm) against the client, for [`Counters::unknown_ids`].
    pub fn missed(&self, s: Option<&LimitSettings>, client: Option<IpAddr>, answer: &Answer) {
        let (Some(rate), Some(ip)) = (s.and_then(|s| s.unknown_ids_per_ip), client) else {
            return;
        };
        if let Answer::Refuse(Refusal::UnknownVm(_)) = answer {
            let sketch = self.misses.get_or_init(RateSketch::new);
            sketch.record(ClientKey::of(ip), sketch.now(), rate);
        }
    }

    /// `requests_per_vm` and, for an upgrade, `websockets_per_vm`, once the registry answered:
    /// the slots held until the request (or the WebSocket) ends.
    pub fn vm(&self, s: &LimitSettings, id: &str, websocket: bool) -> Result<Held, Refusal> {
        let mut held = Held::default();
        let ws_limit = s.websockets_per_vm.filter(|_| websocket);
        if s.requests_per_vm.is_none() && ws_limit.is_none() {
            return Ok(held);
        }
        let vms = self.vms.get_or_init(Inflight::new);
        if let Some(limit) = s.requests_per_vm {
            let (guard, n) = vms.incr((VM_REQUEST, id), 1);
            if n > limit as isize {
                drop(guard);
                Counters::over(s, LimitKind::RequestsPerVm, CONCURRENCY_RETRY)?;
                held._vm = Some(vms.incr((VM_REQUEST, id), 1).0);
            } else {
                held._vm = Some(guard);
            }
        }
        if let Some(limit) = ws_limit {
            let (guard, n) = vms.incr((VM_WEBSOCKET, id), 1);
            if n > limit as isize {
                drop(guard);
                Counters::over(s, LimitKind::WebsocketsPerVm, CONCURRENCY_RETRY)?;
                held._websocket = Some(vms.incr((VM_WEBSOCKET, id), 1).0);
            } else {
                held._websocket = Some(guard);
            }
        }
        Ok(held)
    }

    /// `connections_per_ip` at accept, before TLS (pingora's connection filter): whether
    /// `peer` already has its limit of open connections. Reads only; the count is taken by
    /// [`Counters::connection`]. Under `dry_run` always false.
    pub fn connections_full(&self, s: &LimitSettings, peer: IpAddr) -> bool {
        let (Some(limit), Some(conns), false) =
            (s.connections_per_ip, self.connections.get(), s.dry_run)
        else {
            return false;
        };
        let full = conns_estimate(conns, ClientKey::of(peer)) >= limit as isize;
        if full {
            METRICS.limited(LimitKind::ConnectionsPerIp.as_str(), false);
        }
        full
    }

    /// `connections_per_ip` for a connection pingora handed over: its slot, held as long as
    /// the connection, or `None` to close it (nothing can be answered before a request).
    pub fn connection(&self, s: &LimitSettings, peer: Option<IpAddr>) -> Option<ConnectionSlot> {
        let (Some(limit), Some(ip)) = (s.connections_per_ip, peer) else {
            return Some(ConnectionSlot { _guard: None });
        };
        let conns = self.connections.get_or_init(Inflight::new);
        let (guard, n) = conns.incr(ClientKey::of(ip), 1);
        if n <= limit as isize {
            return Some(ConnectionSlot {
                _guard: Some(guard),
            });
        }
        drop(guard);
        match Counters::over(s, LimitKind::ConnectionsPerIp, CONCURRENCY_RETRY) {
            Ok(()) => Some(ConnectionSlot {
                _guard: Some(conns.incr(ClientKey::of(ip), 1).0),
            }),
            Err(_) => None,
        }
    }
}

/// The estimated open connections of `key`, without counting one more.
fn conns_estimate(conns: &Inflight, key: ClientKey) -> isize {
    // Inflight has no read-only query: count one and give it back.
    let (guard, n) = conns.incr(key, 1);
    drop(guard);
    n - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> RatePer {
        RatePer::parse(s).unwrap()
    }

    #[test]
    fn rates_parse_with_units_and_durations() {
        assert_eq!(
            rate("50/s"),
            RatePer {
                count: 50,
                per: Duration::from_secs(1)
            }
        );
        assert_eq!(rate("10/min").per, Duration::from_secs(60));
        assert_eq!(rate("100/10s").per, Duration::from_secs(10));
        assert_eq!(rate("10/min").emission_ns(), 6_000_000_000);
        for bad in ["", "50", "0/s", "x/s", "5/fortnight", "-1/s", "5/0s"] {
            assert!(RatePer::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_is_the_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientKey::of(a), ClientKey::of(b));
        assert_ne!(ClientKey::of(a), ClientKey::of(other));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(ClientKey::of(v4), ClientKey::of(mapped));
        let v4b: IpAddr = "192.0.2.8".parse().unwrap();
        assert_ne!(ClientKey::of(v4), ClientKey::of(v4b));
    }

    #[test]
    fn the_bucket_allows_the_burst_then_the_rate() {
        let s = RateSketch::new();
        let r = rate("10/s"); // one event per 100 ms
        let t0 = 5_000_000_000;
        for i in 0..20 {
            assert_eq!(s.take(1u8, t0, r, 20), Ok(()), "burst event {i}");
        }
        let wait = s.take(1u8, t0, r, 20).unwrap_err();
        assert_eq!(wait, 100_000_000, "one emission interval");
        // another key is not affected
        assert_eq!(s.take(2u8, t0, r, 20), Ok(()));
        // 100 ms later exactly one more fits
        assert_eq!(s.take(1u8, t0 + 100_000_000, r, 20), Ok(()));
        assert!(s.take(1u8, t0 + 100_000_000, r, 20).is_err());
        // a refused event takes nothing: after a second, ten more
        let later = t0 + 1_100_000_000;
        for _ in 0..10 {
            assert_eq!(s.take(1u8, later, r, 20), Ok(()));
        }
        assert!(s.take(1u8, later, r, 20).is_err());
    }

    #[test]
    fn check_does_not_take_and_record_always_counts() {
        let s = RateSketch::new();
        let r = rate("2/min");
        let t0 = 1;
        assert_eq!(s.check(7u8, t0, r, 2), Ok(()));
        s.record(7u8, t0, r);
        s.record(7u8, t0, r);
        assert_eq!(s.check(7u8, t0, r, 2), Err(30_000_000_000));
        s.record(7u8, t0, r); // over, still recorded
        assert_eq!(s.check(7u8, t0, r, 2), Err(60_000_000_000));
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after(0).get(), 1);
        assert_eq!(retry_after(1).get(), 1);
        assert_eq!(retry_after(1_000_000_000).get(), 1);
        assert_eq!(retry_after(1_000_000_001).get(), 2);
        assert_eq!(retry_after(u64::MAX).get(), u32::MAX);
    }

    fn on() -> LimitSettings {
        LimitSettings {
            requests_per_vm: Some(2),
            websockets_per_vm: Some(1),
            connections_per_ip: Some(1),
            ..LimitSettings::default()
        }
    }

    #[test]
    fn per_vm_slots_are_released_on_drop() {
        let c = Counters::new();
        let s = on();
        let a = c.vm(&s, "vm-a", false).unwrap();
        let _b = c.vm(&s, "vm-a", false).unwrap();
        assert!(matches!(
            c.vm(&s, "vm-a", false),
            Err(Refusal::RateLimited {
                limit: LimitKind::RequestsPerVm,
                ..
            })
        ));
        // another VM has its own count
        let _other = c.vm(&s, "vm-b", false).unwrap();
        drop(a);
        let ws = c.vm(&s, "vm-a", true).unwrap();
        drop(_b);
        assert!(matches!(
            c.vm(&s, "vm-a", true),
            Err(Refusal::RateLimited {
                limit: LimitKind::WebsocketsPerVm,
                ..
            })
        ));
        drop(ws);
        assert!(c.vm(&s, "vm-a", true).is_ok());
    }

    #[test]
    fn dry_run_counts_but_refuses_nothing() {
        let c = Counters::new();
        let s = LimitSettings {
            dry_run: true,
            ..on()
        };
        let held: Vec<_> = (0..5).map(|_| c.vm(&s, "vm-a", true).unwrap()).collect();
        assert_eq!(held.len(), 5);
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let conns: Vec<_> = (0..3).map(|_| c.connection(&s, Some(peer))).collect();
        assert!(conns
            .iter()
            .all(|c| matches!(c, Some(ConnectionSlot { _guard: Some(_) }))));
        assert!(!c.connections_full(&s, peer));
    }

    #[test]
    fn a_connection_slot_is_held_until_dropped() {
        let c = Counters::new();
        let s = on();
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let first = c.connection(&s, Some(peer)).unwrap();
        assert!(c.connections_full(&s, peer));
        assert!(c.connection(&s, Some(peer)).is_none());
        assert!(!c.connections_full(&s, "192.0.2.2".parse().unwrap()));
        drop(first);
        assert!(!c.connections_full(&s, peer));
        assert!(c.connection(&s, Some(peer)).is_some());
    }
}
