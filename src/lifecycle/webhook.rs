//! The activity push (SPEC §13): every `interval`, the VMs whose activity changed go to the
//! control plane as one signed JSON batch, delivered at least once, in order.
//!
//! Not on the request path: a background service reads the counters of
//! [`Activity`](super::Activity). A failed delivery is retried with exponential backoff (1 s
//! doubling to 60 s) while new batches queue behind it, at most [`BACKLOG`] of them; past that
//! the oldest is dropped and counted (`cmux_edge_activity_batches_total{result="dropped"}`).
//! Each batch carries cumulative counters, so a receiver that sees one twice (a retry after a
//! lost answer) loses nothing by keeping the last.
//!
//! Signature: `X-Cmux-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;

use super::activity::VmReport;
use crate::edge::Edge;
use crate::metrics::METRICS;

/// Batches kept while the receiver is down.
pub const BACKLOG: usize = 100;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// `[activity] webhook = { url, secret, interval }`.
#[derive(Clone)]
pub struct WebhookSettings {
    pub url: String,
    pub secret: String,
    pub interval: Duration,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.url)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// The JSON body of one POST.
#[derive(Debug, Serialize)]
pub struct Batch<'a> {
    /// `[server] replica`: which edge saw this.
    pub replica: &'a str,
    /// Counts up from 1 per process; a gap means batches were dropped.
    pub sequence: u64,
    /// When the batch was taken (RFC 3339).
    pub taken_at: String,
    pub vms: Vec<VmReport>,
}

/// `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn signature(secret: &[u8], unix: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(unix.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut hex = String::with_capacity(64);
    for b in tag.as_ref() {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("t={unix},v1={hex}")
}

/// The background service that pushes batches.
pub struct Pusher {
    pub edge: Arc<Edge>,
}

#[async_trait]
impl BackgroundService for Pusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("activity webhook disabled: cannot build its HTTP client: {e}");
                return;
            }
        };
        let mut backlog: VecDeque<Vec<u8>> = VecDeque::new();
        let mut sequence = 0u64;
        let mut next_batch = tokio::time::Instant::now();
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let wake_at = retry_at.map_or(next_batch, |r| r.min(next_batch));
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep_until(wake_at) => {}
            }
            let g = self.edge.current();
            let Some(hook) = g.config.activity.webhook.clone() else {
                next_batch = tokio::time::Instant::now() + Duration::from_secs(1);
                continue;
            };
            let now = tokio::time::Instant::now();
            if now >= next_batch {
                next_batch = now + hook.interval;
                let vms = self.edge.activity.take_changed();
                if !vms.is_empty() {
                    sequence += 1;
                    let batch = Batch {
                        replica: &g.config.server.replica,
                        sequence,
                        taken_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                        vms,
                    };
                    if let Ok(body) = serde_json::to_vec(&batch) {
                        if backlog.len() >= BACKLOG {
                            backlog.pop_front();
                            METRICS.activity_batch(2);
                        }
                        backlog.push_back(body);
                    }
                }
            }
            if retry_at.is_some_and(|r| now < r) {
                continue;
            }
            while let Some(body) = backlog.front() {
                match deliver(&client, &hook, body).await {
                    Ok(()) => {
                        METRICS.activity_batch(0);
                        backlog.pop_front();
                        backoff = FIRST_BACKOFF;
                    }
                    Err(e) => {
                        METRICS.activity_batch(1);
                        tracing::warn!(url = %hook.url, queued = backlog.len(), retry_in = ?backoff, "activity webhook: {e}");
                        retry_at = Some(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        break;
                    }
                }
            }
            if backlog.is_empty() {
                retry_at = None;
            }
        }
    }
}

async fn deliver(
    client: &reqwest::Client,
    hook: &WebhookSettings,
    body: &[u8],
) -> Result<(), String> {
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let resp = client
        .post(&hook.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(
            "x-cmux-signature",
            signature(hook.secret.as_bytes(), unix, body),
        )
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("status {}", resp.status().as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body() {
        // The vector from Python: hmac.new(b"secret", b"1700000000.{}", sha256).hexdigest()
        let sig = signature(b"secret", 1700000000, b"{}");
        assert!(sig.starts_with("t=1700000000,v1="));
        assert_eq!(sig.len(), "t=1700000000,v1=".len() + 64);
        assert_eq!(
            sig,
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
    }
}
