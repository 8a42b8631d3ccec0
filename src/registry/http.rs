//! `source = "http"`: ask the cmux control plane, `GET {url with {id}}`.
//!
//! Contract: `200 {"address": "...", "ports": {"39378": 32768}, "scheme": "http"}` for a known
//! VM, `404` for an unknown one, anything else is an error. Answers are cached (positive and
//! negative TTLs) so the control plane sees one lookup per id per TTL, N concurrent requests
//! for one id share one upstream call, and when the control plane is down a VM seen recently
//! keeps routing for `stale_for`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};

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
        let settings = self.settings.clone();
        let client = self.client.clone();
        let cache = self.cache.clone();
        let inflight = self.inflight.clone();
        let key = id.to_owned();
        let fut = async move {
            let result = ask(&client, &settings, &key).await;
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
        self.inflight.entry(id.to_owned()).or_insert(fut).clone()
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

    fn lookup<'a>(&'a self, id: &'a str) -> Lookup<'a> {
        let cached = self.cache.get(id).map(|c| c.clone());
        if let Some(c) = &cached {
            if self.fresh(c) {
                return Lookup::Ready(Ok(c.vm.clone()));
            }
        }
        let fetch = self.fetch(id);
        let stale_for = self.settings.stale_for;
        Lookup::Pending(Box::pin(async move {
            match fetch.await {
                Ok(vm) => Ok(vm),
                Err(reason) => match cached {
                    // The control plane is down: a VM seen recently keeps routing.
                    Some(Cached { vm: Some(vm), at }) if at.elapsed() < stale_for => {
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
