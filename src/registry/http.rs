//! `source = "http"`: ask the cmux control plane, `GET {url with {id}}`.
//!
//! Contract: `200 {"address": "...", "ports": {"39378": 32768}, "scheme": "http"}` for a known
//! VM, `404` for an unknown one, anything else is an error. Answers are cached (positive and
//! negative TTLs) so the control plane sees one lookup per id per TTL, N concurrent requests
//! for one id share one upstream call, and when the control plane is down a VM seen recently
//! keeps routing for `stale_for`. At most `concurrency` calls are in flight at once, so a
//! cold cache (start, reload) meeting thousands of ids reuses a few pooled connections instead
//! of opening one per id.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;

use super::{Lookup, LookupResult, Registry, RegistryError, Vm, VmSpec};

#[derive(Debug, Clone)]
pub struct HttpSourceSettings {
    /// Contains `{id}`, e.g. `http://control-plane:9779/vms/{id}`.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    pub timeout: Duration,
    pub cache_ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_for: Duration,
    /// Control-plane calls in flight at once; more wait (at most `timeout`) for a turn.
    pub concurrency: usize,
}

#[derive(Clone)]
struct Cached {
    vm: Option<Arc<Vm>>,
    at: Instant,
}

type Fetch = Shared<BoxFuture<'static, Result<Option<Arc<Vm>>, String>>>;

pub struct HttpSource {
    settings: Arc<HttpSourceSettings>,
    client: reqwest::Client,
    cache: Arc<DashMap<String, Cached>>,
    inflight: Arc<DashMap<String, Fetch>>,
    turns: Arc<Semaphore>,
}

impl std::fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSource")
            .field("url", &self.settings.url)
            .finish()
    }
}

impl HttpSource {
    pub fn new(settings: HttpSourceSettings) -> Result<HttpSource, String> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the registry HTTP client: {e}"))?;
        Ok(HttpSource {
            turns: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            settings: Arc::new(settings),
            client,
            cache: Arc::default(),
            inflight: Arc::default(),
        })
    }

    fn fresh(&self, c: &Cached) -> bool {
        let ttl = if c.vm.is_some() {
            self.settings.cache_ttl
        } else {
            self.settings.negative_ttl
        };
        c.at.elapsed() < ttl
    }

    /// One shared fetch per id at a time.
    fn fetch(&self, id: &str) -> Fetch {
        if let Some(f) = self.inflight.get(id) {
            return f.clone();
        }
        let slot = match self.inflight.entry(id.to_owned()) {
            Entry::Occupied(e) => return e.get().clone(),
            Entry::Vacant(slot) => slot,
        };
        // A fetch that finished between our cache miss and taking this slot has already
        // filled the cache (it writes the cache before leaving `inflight`): use that.
        if let Some(c) = self.cache.get(id).filter(|c| self.fresh(c)) {
            return futures_util::future::ready(Ok(c.vm.clone()))
                .boxed()
                .shared();
        }
        let settings = self.settings.clone();
        let client = self.client.clone();
        let cache = self.cache.clone();
        let inflight = self.inflight.clone();
        let turns = self.turns.clone();
        let key = id.to_owned();
        let fut = async move {
            let result = match tokio::time::timeout(settings.timeout, turns.acquire()).await {
                Ok(Ok(_turn)) => ask(&client, &settings, &key).await,
                _ => Err(format!(
                    "over {} control-plane lookups already in flight for {:?}",
                    settings.concurrency, settings.timeout
                )),
            };
            if let Ok(vm) = &result {
                cache.insert(
                    key.clone(),
                    Cached {
                        vm: vm.clone(),
                        at: Instant::now(),
                    },
                );
            }
            inflight.remove(&key);
            result
        }
        .boxed()
        .shared();
        slot.insert(fut.clone());
        fut
    }
}

async fn ask(
    client: &reqwest::Client,
    s: &HttpSourceSettings,
    id: &str,
) -> Result<Option<Arc<Vm>>, String> {
    // The id is validated ([a-z0-9_-]) before it gets here: safe in a URL path.
    let url = s.url.replace("{id}", id);
    let mut req = client.get(&url);
    if let Some(t) = &s.token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| format!("GET {url}: {e}"))?;
    match resp.status().as_u16() {
        404 => Ok(None),
        200 => {
            let body = resp.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
            let spec: VmSpec =
                serde_json::from_slice(&body).map_err(|e| format!("GET {url}: bad JSON: {e}"))?;
            spec.to_vm(id)
                .map(|vm| Some(Arc::new(vm)))
                .map_err(|e| format!("GET {url}: {e}"))
        }
        other => Err(format!("GET {url}: status {other}")),
    }
}

impl Registry for HttpSource {
    fn kind(&self) -> &'static str {
        "http"
    }

    /// Drops answers that can no longer be used (not fresh, and not a VM still within
    /// `stale_for`), so ids probed once do not pile up in memory.
    fn refresh(&self) {
        let s = &self.settings;
        self.cache.retain(|_, c| {
            let keep_for = match c.vm {
                Some(_) => s.cache_ttl.max(s.stale_for),
                None => s.negative_ttl,
            };
            c.at.elapsed() < keep_for
        });
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
        let stale_for = self.settings.stale_for;
        Lookup::Pending(Box::pin(async move {
            match fetch.await {
                Ok(vm) => Ok(vm),
                Err(reason) => match stale {
                    // The control plane is down: a VM seen recently keeps routing.
                    Some((vm, at)) if at.elapsed() < stale_for => {
                        tracing::warn!(vm = id, %reason, "registry unavailable; serving the last good answer");
                        Ok(Some(vm))
                    }
                    _ => Err(RegistryError::Unavailable {
                        source_kind: "http",
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

    fn source(negative_ttl: Duration) -> HttpSource {
        HttpSource::new(HttpSourceSettings {
            url: "http://127.0.0.1:9/vms/{id}".into(),
            token: None,
            timeout: Duration::from_secs(1),
            cache_ttl: Duration::from_secs(1),
            negative_ttl,
            stale_for: Duration::from_secs(5),
            concurrency: 4,
        })
        .unwrap()
    }

    #[test]
    fn the_sweep_drops_answers_that_can_no_longer_be_used() {
        let s = source(Duration::from_millis(10));
        let spec: VmSpec = serde_json::from_str(r#"{"address": "10.0.0.1"}"#).unwrap();
        let vm = Arc::new(spec.to_vm("a").unwrap());
        let ago = |secs| {
            Instant::now()
                .checked_sub(Duration::from_secs(secs))
                .unwrap()
        };
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
}
