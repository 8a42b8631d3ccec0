//! The caching shared by the sources that must ask someone (`http`, `proxmox`): positive and
//! negative TTL caches, one shared call per id at a time (coalescing), a bound on calls in
//! flight, and stale-on-error.
//!
//! A fresh answer is one map read and one `Arc` clone, with no await. N concurrent requests
//! for one id share one call. At most `concurrency` calls are in flight, so a cold cache
//! (start, reload) meeting thousands of ids reuses a few pooled connections instead of
//! opening one per id. When the far side fails, a VM seen within `stale_for` keeps routing.
//!
//! Under a spray of random ids (SPEC §11) the calls for ids never seen ("cold") may take only
//! three quarters of the `concurrency` turns (at least one): the rest stay free for ids the
//! cache knows, whose answer expired, so known VMs keep routing while the control plane is
//! saturated by misses. `peek` answers from the cache alone, for `[limits] unknown_ids_per_ip`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::future::FutureExt;
use tokio::sync::Semaphore;

use super::{Lookup, LookupResult, Registry, RegistryError, Vm};
use crate::flight::{Flight, Flights};

/// How answers are reused and how hard the far side is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// For one call, and for the wait for a turn to make it.
    pub timeout: Duration,
    /// How long a found VM is reused.
    pub cache_ttl: Duration,
    /// How long "unknown" is reused.
    pub negative_ttl: Duration,
    /// How long a found VM keeps routing while the far side fails.
    pub stale_for: Duration,
    /// Calls in flight at once; more wait (at most `timeout`) for a turn.
    pub concurrency: usize,
}

/// The uncached question: where does `id` live? `Ok(None)` is a definite "unknown"; `Err` is a
/// failure (unreachable, timeout, a bad answer) that stale-on-error may cover.
pub trait Ask: Send + Sync + 'static {
    /// The source's name for logs, metrics and `explain`.
    const KIND: &'static str;
    fn ask(&self, id: &str) -> impl Future<Output = Result<Option<Vm>, String>> + Send;
}

struct Cached {
    vm: Option<Arc<Vm>>,
    at: Instant,
}

type Fetch = Flight<Result<Option<Arc<Vm>>, String>>;

/// A source that asks `A`, with the caching above.
pub struct CachedSource<A> {
    asker: Arc<A>,
    policy: CachePolicy,
    cache: Arc<DashMap<String, Cached>>,
    inflight: Flights<Result<Option<Arc<Vm>>, String>>,
    turns: Arc<Semaphore>,
    /// The share of `turns` that calls for ids the cache has no VM for may use.
    cold_turns: Arc<Semaphore>,
}

impl<A: std::fmt::Debug> std::fmt::Debug for CachedSource<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.asker.fmt(f)
    }
}

impl<A: Ask> CachedSource<A> {
    pub fn with(asker: A, policy: CachePolicy) -> CachedSource<A> {
        CachedSource {
            asker: Arc::new(asker),
            turns: Arc::new(Semaphore::new(policy.concurrency.max(1))),
            cold_turns: Arc::new(Semaphore::new(cold_share(policy.concurrency))),
            policy,
            cache: Arc::default(),
            inflight: Flights::default(),
        }
    }

    fn fresh(&self, c: &Cached) -> bool {
        let ttl = if c.vm.is_some() {
            self.policy.cache_ttl
        } else {
            self.policy.negative_ttl
        };
        c.at.elapsed() < ttl
    }

    /// One shared fetch per id at a time.
    fn fetch(&self, id: &str) -> Fetch {
        let (flight, _) = self.inflight.join(id, || {
            // A fetch that finished between our cache miss and this call has already filled
            // the cache (it writes the cache before leaving the flights): use that.
            if let Some(c) = self.cache.get(id).filter(|c| self.fresh(c)) {
                return futures_util::future::ready(Ok(c.vm.clone())).boxed();
            }
            let policy = self.policy;
            let asker = self.asker.clone();
            let cache = self.cache.clone();
            let turns = self.turns.clone();
            // Ids never seen take only the cold share of the turns (see `cold_share`).
            let known = self.cache.get(id).is_some_and(|c| c.vm.is_some());
            let cold = (!known).then(|| self.cold_turns.clone());
            let key = id.to_owned();
            async move {
                let turn = async {
                    let cold = match &cold {
                        Some(c) => Some(c.acquire().await?),
                        None => None,
                    };
                    Ok::<_, tokio::sync::AcquireError>((cold, turns.acquire().await?))
                };
                let result = match tokio::time::timeout(policy.timeout, turn).await {
                    Ok(Ok(_turn)) => asker.ask(&key).await.map(|vm| vm.map(Arc::new)),
                    _ => Err(format!(
                        "over {} lookups already in flight for {:?}",
                        policy.concurrency, policy.timeout
                    )),
                };
                if let Ok(vm) = &result {
                    cache.insert(
                        key,
                        Cached {
                            vm: vm.clone(),
                            at: Instant::now(),
                        },
                    );
                }
                result
            }
            .boxed()
        });
        flight
    }
}

/// The turns a cold call may take out of `concurrency`: three quarters, at least one.
fn cold_share(concurrency: usize) -> usize {
    let all = concurrency.max(1);
    (all - all / 4).max(1)
}

impl<A: Ask + std::fmt::Debug> Registry for CachedSource<A> {
    fn kind(&self) -> &'static str {
        A::KIND
    }

    /// A fresh answer, or a VM whose answer expired (known, so not part of a spray).
    fn peek(&self, id: &str) -> Option<LookupResult> {
        let c = self.cache.get(id)?;
        (c.vm.is_some() || self.fresh(&c)).then(|| Ok(c.vm.clone()))
    }

    /// Drops answers that can no longer be used (not fresh, and not a VM still within
    /// `stale_for`), so ids probed once do not pile up in memory.
    fn refresh(&self) {
        let p = &self.policy;
        self.cache.retain(|_, c| {
            let keep_for = match c.vm {
                Some(_) => p.cache_ttl.max(p.stale_for),
                None => p.negative_ttl,
            };
            c.at.elapsed() < keep_for
        });
    }

    fn forget(&self, id: &str) {
        self.cache.remove(id);
    }

    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        // The hot path: a fresh answer is one map read and one Arc clone.
        let mut stale = None;
        if let Some(c) = self.cache.get(id) {
            if self.fresh(&c) {
                return Lookup::Ready(Ok(c.vm.clone()));
            }
            stale = c.vm.clone().map(|vm| (vm, c.at));
        }
        let fetch = self.fetch(id);
        let stale_for = self.policy.stale_for;
        Lookup::Pending(Box::pin(async move {
            match fetch.await {
                Ok(vm) => Ok(vm),
                Err(reason) => match stale {
                    // The far side is down: a VM seen recently keeps routing.
                    Some((vm, at)) if at.elapsed() < stale_for => {
                        tracing::warn!(vm = id, source = A::KIND, %reason, "registry unavailable; serving the last good answer");
                        Ok(Some(vm))
                    }
                    _ => Err(RegistryError::Unavailable {
                        source_kind: A::KIND,
                        reason,
                    }),
                },
            }
        })
            as std::pin::Pin<
                Box<dyn std::future::Future<Output = LookupResult> + Send + 'a>,
            >)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Knows nothing; never called in these tests.
    #[derive(Debug)]
    struct Nobody;

    impl Ask for Nobody {
        const KIND: &'static str = "test";
        async fn ask(&self, _id: &str) -> Result<Option<Vm>, String> {
            Err("not asked in this test".into())
        }
    }

    fn source(negative_ttl: Duration) -> CachedSource<Nobody> {
        CachedSource::with(
            Nobody,
            CachePolicy {
                timeout: Duration::from_secs(1),
                cache_ttl: Duration::from_secs(1),
                negative_ttl,
                stale_for: Duration::from_secs(5),
                concurrency: 4,
            },
        )
    }

    fn a_vm() -> Arc<Vm> {
        let spec: super::super::VmSpec =
            serde_json::from_str(r#"{"address": "10.0.0.1"}"#).unwrap();
        Arc::new(spec.to_vm("a").unwrap())
    }

    fn ago(secs: u64) -> Instant {
        Instant::now()
            .checked_sub(Duration::from_secs(secs))
            .unwrap()
    }

    #[test]
    fn the_sweep_drops_answers_that_can_no_longer_be_used() {
        let s = source(Duration::from_millis(10));
        let vm = a_vm();
        let long_ago = ago(10);
        for (id, vm, at) in [
            ("fresh-unknown", None, Instant::now()),
            ("old-unknown", None, long_ago),
            ("stale-vm", Some(vm.clone()), ago(2)),
            ("dead-vm", Some(vm), long_ago),
        ] {
            s.cache.insert(id.into(), Cached { vm, at });
        }
        s.refresh();
        let mut left: Vec<String> = s.cache.iter().map(|e| e.key().clone()).collect();
        left.sort();
        assert_eq!(left, ["fresh-unknown", "stale-vm"]);
        // a stale VM is not fresh: the next lookup asks again
        assert!(matches!(s.lookup("stale-vm"), Lookup::Pending(_)));
    }

    /// Answers every id at once, except ids starting with `c` (cold), which wait for `open`.
    #[derive(Debug)]
    struct Gated {
        open: Arc<Semaphore>,
        asked: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Ask for Gated {
        const KIND: &'static str = "test";
        async fn ask(&self, id: &str) -> Result<Option<Vm>, String> {
            self.asked.lock().unwrap().push(id.to_owned());
            if id.starts_with('c') {
                let _ = self.open.acquire().await;
            }
            Ok(None)
        }
    }

    #[tokio::test]
    async fn cold_misses_leave_a_quarter_of_the_turns_to_known_ids() {
        let open = Arc::new(Semaphore::new(0));
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = Arc::new(CachedSource::with(
            Gated {
                open: open.clone(),
                asked: asked.clone(),
            },
            CachePolicy {
                timeout: Duration::from_millis(300),
                cache_ttl: Duration::from_secs(1),
                negative_ttl: Duration::from_secs(1),
                stale_for: Duration::from_secs(60),
                concurrency: 4,
            },
        ));
        s.cache.insert(
            "known".into(),
            Cached {
                vm: Some(a_vm()),
                at: ago(10),
            },
        );
        let cold: Vec<_> = (0..3)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move { s.lookup(&format!("c{i}")).resolve().await.is_ok() })
            })
            .collect();
        while asked.lock().unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // the fourth turn is free for the known id: it is asked, not served stale
        assert!(s.lookup("known").resolve().await.is_ok());
        assert!(asked.lock().unwrap().iter().any(|id| id == "known"));
        // a fourth cold id finds no turn
        assert!(s.lookup("c9").resolve().await.is_err());
        assert_eq!(cold_share(4), 3);
        assert_eq!(cold_share(1), 1);
        open.add_permits(16);
        for c in cold {
            assert!(c.await.unwrap());
        }
    }

    #[tokio::test]
    async fn a_failure_serves_a_stale_vm_only_within_stale_for() {
        let s = source(Duration::from_millis(10));
        let vm = a_vm();
        s.cache.insert(
            "recent".into(),
            Cached {
                vm: Some(vm.clone()),
                at: ago(2),
            },
        );
        s.cache.insert(
            "too-old".into(),
            Cached {
                vm: Some(vm),
                at: ago(6),
            },
        );
        assert!(s.lookup("recent").resolve().await.unwrap().is_some());
        assert!(matches!(
            s.lookup("too-old").resolve().await,
            Err(RegistryError::Unavailable {
                source_kind: "test",
                ..
            })
        ));
    }
}
