//! `source = "http"`: ask the cmux control plane, `GET {url with {id}}`.
//!
//! Contract: `200 {"address": "...", "ports": {"39378": 32768}, "scheme": "http"}` for a known
//! VM, `404` for an unknown one, anything else is an error. Caching, coalescing, the bound on
//! calls in flight and stale-on-error are [`CachedSource`]'s.

use std::time::Duration;

use super::cached::{Ask, CachePolicy, CachedSource};
use super::{Vm, VmSpec};

#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The control plane, uncached.
pub struct ControlPlane {
    url: String,
    token: Option<String>,
    client: reqwest::Client,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSource")
            .field("url", &self.url)
            .finish()
    }
}

pub type HttpSource = CachedSource<ControlPlane>;

impl CachedSource<ControlPlane> {
    pub fn new(s: HttpSourceSettings) -> Result<HttpSource, String> {
        let client = reqwest::Client::builder()
            .timeout(s.timeout)
            .connect_timeout(s.timeout)
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the registry HTTP client: {e}"))?;
        let policy = CachePolicy {
            timeout: s.timeout,
            cache_ttl: s.cache_ttl,
            negative_ttl: s.negative_ttl,
            stale_for: s.stale_for,
            concurrency: s.concurrency,
        };
        Ok(CachedSource::with(
            ControlPlane {
                url: s.url,
                token: s.token,
                client,
            },
            policy,
        ))
    }
}

impl Ask for ControlPlane {
    const KIND: &'static str = "http";

    async fn ask(&self, id: &str) -> Result<Option<Vm>, String> {
        // The id is validated ([a-z0-9_-]) before it gets here: safe in a URL path.
        let url = self.url.replace("{id}", id);
        let mut req = self.client.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| format!("GET {url}: {e}"))?;
        match resp.status().as_u16() {
            404 => Ok(None),
            200 => {
                let body = resp.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
                let spec: VmSpec = serde_json::from_slice(&body)
                    .map_err(|e| format!("GET {url}: bad JSON: {e}"))?;
                spec.to_vm(id)
                    .map(Some)
                    .map_err(|e| format!("GET {url}: {e}"))
            }
            other => Err(format!("GET {url}: status {other}")),
        }
    }
}
