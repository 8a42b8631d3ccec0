//! The `cloudflare` provider: TXT records through Cloudflare's v4 API with a scoped API token
//! (`Zone:Read` + `DNS:Edit`).
//!
//! Calls, as documented by Cloudflare: `GET /zones?name=<zone>` to find the zone (walking up
//! from the record name), `POST /zones/{zone}/dns_records` to add one value, and
//! `GET /zones/{zone}/dns_records?type=TXT&name=…&content=…` then
//! `DELETE /zones/{zone}/dns_records/{id}` to remove exactly that value.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::{DnsError, DnsProvider};

pub struct Cloudflare {
    api: String,
    token: String,
    zone_id: Option<String>,
    ttl: u32,
    http: reqwest::Client,
}

/// Every v4 answer: `{"success": bool, "errors": [{code, message}], "result": …}`.
#[derive(Deserialize)]
struct Envelope<T> {
    success: bool,
    #[serde(default)]
    errors: Vec<ApiError>,
    result: Option<T>,
}

#[derive(Deserialize)]
struct ApiError {
    code: i64,
    message: String,
}

#[derive(Deserialize)]
struct Id {
    id: String,
}

impl Cloudflare {
    pub fn new(api: String, token: String, zone_id: Option<String>, ttl: u32) -> Cloudflare {
        Cloudflare {
            api,
            token,
            zone_id,
            // Cloudflare's TXT minimum is 60 s (1 means "automatic").
            ttl: if ttl < 60 { 60 } else { ttl },
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
        }
    }

    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, DnsError> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.api))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| DnsError::Cloudflare(format!("{method} {path}: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| DnsError::Cloudflare(format!("{method} {path}: {e}")))?;
        let env: Envelope<T> = serde_json::from_slice(&bytes).map_err(|e| {
            DnsError::Cloudflare(format!("{method} {path}: {status}, unexpected answer: {e}"))
        })?;
        match (env.success, env.result) {
            (true, Some(r)) => Ok(r),
            _ => {
                let why = env
                    .errors
                    .iter()
                    .map(|e| format!("{} ({})", e.message, e.code))
                    .collect::<Vec<_>>()
                    .join("; ");
                Err(DnsError::Cloudflare(format!(
                    "{method} {path}: {status} {why}"
                )))
            }
        }
    }

    /// The configured zone id, else the closest enclosing zone the token can see.
    async fn zone(&self, fqdn: &str) -> Result<String, DnsError> {
        if let Some(z) = &self.zone_id {
            return Ok(z.clone());
        }
        let mut candidate = fqdn.trim_end_matches('.');
        while let Some((_, parent)) = candidate.split_once('.') {
            candidate = parent;
            if !candidate.contains('.') {
                break;
            }
            let zones: Vec<Id> = self
                .call(
                    reqwest::Method::GET,
                    &format!("/zones?name={}", enc(candidate)),
                    None,
                )
                .await?;
            if let Some(z) = zones.into_iter().next() {
                return Ok(z.id);
            }
        }
        Err(DnsError::NoZone(fqdn.to_owned()))
    }
}

/// Percent-encodes a query value (record names and ACME values are URL-safe except `=`).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[async_trait]
impl DnsProvider for Cloudflare {
    fn name(&self) -> &'static str {
        "cloudflare"
    }

    async fn present(&self, fqdn: &str, value: &str) -> Result<(), DnsError> {
        let zone = self.zone(fqdn).await?;
        let _: Id = self
            .call(
                reqwest::Method::POST,
                &format!("/zones/{zone}/dns_records"),
                Some(serde_json::json!({
                    "type": "TXT",
                    "name": fqdn.trim_end_matches('.'),
                    "content": value,
                    "ttl": self.ttl,
                })),
            )
            .await?;
        Ok(())
    }

    async fn cleanup(&self, fqdn: &str, value: &str) -> Result<(), DnsError> {
        let zone = self.zone(fqdn).await?;
        let records: Vec<Id> = self
            .call(
                reqwest::Method::GET,
                &format!(
                    "/zones/{zone}/dns_records?type=TXT&name={}&content={}",
                    enc(fqdn.trim_end_matches('.')),
                    enc(value)
                ),
                None,
            )
            .await?;
        for r in records {
            let _: Id = self
                .call(
                    reqwest::Method::DELETE,
                    &format!("/zones/{zone}/dns_records/{}", r.id),
                    None,
                )
                .await?;
        }
        Ok(())
    }
}
