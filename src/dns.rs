//! A bounded cache of upstream name lookups (SPEC §11, "registry and DNS under spray"), for
//! VMs whose address is a name (a `template` source, or a registry that answers names).
//!
//! Without it every request for such a VM costs one resolver call, and a spray of random
//! template ids is one resolver call each. Found names are reused for [`POSITIVE_TTL`],
//! names that do not resolve for [`NEGATIVE_TTL`]; timeouts and resolver errors other than
//! "no such name" are not cached. At most [`CAPACITY`] names are kept (answers that can no
//! longer be used are swept when it fills; past that, new answers are simply not cached), so
//! memory stays under about `CAPACITY × (name + 64 bytes)`: ~1.3 MiB with 253-byte names.
//!
//! Cost per request: a cached answer is one sharded map read (no global lock, no await); a
//! miss is the resolver call it replaces plus one insert.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// How long a resolved name is reused.
pub const POSITIVE_TTL: Duration = Duration::from_secs(30);
/// How long "does not resolve" is reused.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// The most names kept.
pub const CAPACITY: usize = 4096;

struct Entry {
    ip: Option<IpAddr>,
    at: Instant,
}

impl Entry {
    fn fresh(&self, now: Instant) -> bool {
        let ttl = if self.ip.is_some() {
            POSITIVE_TTL
        } else {
            NEGATIVE_TTL
        };
        now.duration_since(self.at) < ttl
    }
}

#[derive(Default)]
pub struct DnsCache {
    names: DashMap<Box<str>, Entry>,
}

impl std::fmt::Debug for DnsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsCache")
            .field("names", &self.names.len())
            .finish()
    }
}

impl DnsCache {
    pub fn new() -> DnsCache {
        DnsCache::default()
    }

    /// The fresh cached answer for `name`: `Some(None)` is a cached "does not resolve".
    pub fn peek(&self, name: &str) -> Option<Option<IpAddr>> {
        let e = self.names.get(name)?;
        e.fresh(Instant::now()).then_some(e.ip)
    }

    /// `name:port` resolved, from the cache when fresh; shaped like `tokio::net::lookup_host`
    /// (an empty answer is "does not resolve").
    pub async fn lookup(
        &self,
        name: &str,
        port: u16,
    ) -> io::Result<std::option::IntoIter<SocketAddr>> {
        if let Some(ip) = self.peek(name) {
            return Ok(ip.map(|ip| SocketAddr::new(ip, port)).into_iter());
        }
        let answer = match tokio::net::lookup_host((name, port)).await {
            Ok(mut addrs) => addrs.next().map(|a| a.ip()),
            // getaddrinfo's "no such name" (EAI_NONAME/EAI_NODATA) arrives as an untyped error;
            // a failing resolver is not a negative answer, so only those are cached.
            Err(e) if not_found(&e) => None,
            Err(e) => return Err(e),
        };
        self.insert(name, answer);
        Ok(answer.map(|ip| SocketAddr::new(ip, port)).into_iter())
    }

    fn insert(&self, name: &str, ip: Option<IpAddr>) {
        let now = Instant::now();
        if self.names.len() >= CAPACITY {
            self.names.retain(|_, e| e.fresh(now));
            if self.names.len() >= CAPACITY {
                return;
            }
        }
        self.names.insert(name.into(), Entry { ip, at: now });
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

fn not_found(e: &io::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    [
        "not known",
        "no address",
        "not found",
        "no such host",
        "nodata",
    ]
    .iter()
    .any(|s| text.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_and_unknown_names_are_reused() {
        let c = DnsCache::new();
        let a = c.lookup("localhost", 80).await.unwrap().next();
        assert!(a.is_some_and(|a| a.ip().is_loopback()));
        assert!(c.peek("localhost").is_some_and(|ip| ip.is_some()));
        // the port comes from the request, not the cache
        let b = c.lookup("localhost", 81).await.unwrap().next().unwrap();
        assert_eq!(b.port(), 81);
        let none = c.lookup("no-such-name.invalid", 80).await;
        if let Ok(mut none) = none {
            assert!(none.next().is_none());
            assert_eq!(c.peek("no-such-name.invalid"), Some(None));
        }
    }

    #[test]
    fn the_cache_never_grows_past_its_capacity() {
        let c = DnsCache::new();
        for i in 0..CAPACITY + 100 {
            c.insert(&format!("n{i}.lan"), None);
        }
        assert_eq!(c.len(), CAPACITY);
        // stale entries make room
        for mut e in c.names.iter_mut() {
            e.at = Instant::now() - NEGATIVE_TTL;
        }
        c.insert("new.lan", None);
        assert_eq!(c.len(), 1);
    }
}
