//! ACME (RFC 8555) through instant-acme: one certificate for `[tls.acme] domains`, validated
//! by DNS-01 (wildcards) or HTTP-01 (exact names), stored in `certs_dir` and renewed before
//! it expires.
//!
//! The certificate is an ordinary `NAME.crt` + `NAME.key` pair in `certs_dir`, so the store
//! that serves manual certificates serves it too, and replicas sharing the directory pick it
//! up through their file watch. The current certificate keeps serving until its successor is
//! installed; a failed order is retried with exponential backoff and jitter.

pub mod challenge;
mod lock;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType,
    ExternalAccountKey, HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use pingora::server::ShutdownWatch;
use rustls::pki_types::CertificateDer;

pub use challenge::Http01;
pub use lock::{DirLock, LockError};

use super::dns::{self, DnsError, DnsProvider};
use super::settings::AcmeSettings;
use super::{reload_store, CertInfo, CertStore, SniResolver};
use crate::metrics::METRICS;

/// No order may take longer than this (the lock's staleness is well above it).
const ORDER_TIMEOUT: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME server: {0}")]
    Protocol(#[from] instant_acme::Error),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("{path}: {source}")]
    Storage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Order(String),
    #[error("order did not finish within {0:?}")]
    Timeout(Duration),
}

/// What one look at the certificate led to.
#[derive(Debug)]
pub enum Step {
    /// Nothing to do for this long.
    NotDue(Duration),
    Renewed,
    /// Another process sharing `certs_dir` is ordering.
    Busy(String),
}

pub struct Acme {
    settings: AcmeSettings,
    certs_dir: PathBuf,
    resolver: Arc<SniResolver>,
    http01: Arc<Http01>,
    dns: Option<Arc<dyn DnsProvider>>,
}

impl Acme {
    pub fn new(
        settings: AcmeSettings,
        certs_dir: PathBuf,
        resolver: Arc<SniResolver>,
        http01: Arc<Http01>,
    ) -> Acme {
        let dns = settings.dns.as_ref().map(dns::provider);
        Acme {
            settings,
            certs_dir,
            resolver,
            http01,
            dns,
        }
    }

    /// Orders at start when needed, then whenever renewal is due, until shutdown.
    pub async fn run(&self, mut shutdown: ShutdownWatch) {
        let mut failures: u32 = 0;
        loop {
            let wait = match self.step().await {
                Ok(Step::Renewed) => {
                    failures = 0;
                    continue;
                }
                Ok(Step::NotDue(wait)) => {
                    failures = 0;
                    wait.min(self.settings.check_interval)
                }
                Ok(Step::Busy(holder)) => {
                    tracing::info!(%holder, "another process is ordering the certificate; waiting for its result");
                    self.settings.retry_after.min(Duration::from_secs(30))
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    METRICS.acme_orders.with_label_values(&["error"]).inc();
                    let wait = backoff(
                        self.settings.retry_after,
                        failures,
                        self.settings.check_interval,
                    );
                    let serving =
                        covering(&self.resolver.store(), &self.settings.domains).is_some();
                    tracing::error!(error = %e, retry_in = ?wait, failures, still_serving_a_certificate = serving, "ACME order failed");
                    wait
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Looks at the certificate and orders a new one when it is missing or due.
    pub async fn step(&self) -> Result<Step, AcmeError> {
        if let Some(wait) = self.wait_for(&self.resolver.store()) {
            return Ok(Step::NotDue(wait));
        }
        let dir = self.certs_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| AcmeError::Storage {
            path: dir.clone(),
            source,
        })?;
        let _lock = match DirLock::acquire(&dir) {
            Ok(l) => l,
            Err(LockError::Held { holder, .. }) => return Ok(Step::Busy(holder)),
            Err(LockError::Io { path, source }) => return Err(AcmeError::Storage { path, source }),
        };
        // A replica may have just finished: trust the directory, not our last view of it.
        reload_store(&dir, &self.resolver).await;
        if let Some(wait) = self.wait_for(&self.resolver.store()) {
            return Ok(Step::NotDue(wait));
        }
        tracing::info!(domains = ?self.settings.domains, directory = %self.settings.directory, "ordering a certificate");
        let (cert_pem, key_pem) = tokio::time::timeout(ORDER_TIMEOUT, self.order())
            .await
            .map_err(|_| AcmeError::Timeout(ORDER_TIMEOUT))??;
        self.install(&cert_pem, &key_pem)?;
        reload_store(&dir, &self.resolver).await;
        METRICS.acme_orders.with_label_values(&["ok"]).inc();
        tracing::info!(domains = ?self.settings.domains, "certificate installed");
        if self.wait_for(&self.resolver.store()).is_none() {
            // Ordering again at once would loop: say what to change instead.
            return Err(AcmeError::Order(
                "the new certificate is already due for renewal: renew_before is longer than the CA's certificate lifetime".into(),
            ));
        }
        Ok(Step::Renewed)
    }

    /// `None` when a certificate covering every domain is due for renewal (or missing),
    /// else how long until it is.
    fn wait_for(&self, store: &CertStore) -> Option<Duration> {
        let info = covering(store, &self.settings.domains)?;
        let lifetime = (info.not_after - info.not_before).max(0) as u64;
        let before = self
            .settings
            .renew_before
            .map(|d| d.as_secs())
            .unwrap_or(lifetime / 3);
        let renew_at = info.not_after.saturating_sub(before as i64);
        let now = unix_now();
        (renew_at > now).then(|| Duration::from_secs((renew_at - now) as u64))
    }

    /// The pair's base name: `acme-example.com` for `["example.com", "*.example.com"]`.
    fn base_name(&self) -> String {
        let first = self
            .settings
            .domains
            .first()
            .map(|d| d.replace("*.", "wildcard."))
            .unwrap_or_default();
        format!("acme-{first}")
    }

    fn install(&self, cert_pem: &str, key_pem: &str) -> Result<(), AcmeError> {
        let base = self.base_name();
        // Key first: until the new .crt lands, the store keeps serving the old pair.
        for (ext, data, mode) in [("key", key_pem, 0o600), ("crt", cert_pem, 0o644)] {
            let path = self.certs_dir.join(format!("{base}.{ext}"));
            crate::files::write_atomic(&path, data.as_bytes(), mode)
                .map_err(|source| AcmeError::Storage { path, source })?;
        }
        Ok(())
    }

    async fn account(&self) -> Result<Account, AcmeError> {
        let path = self.certs_dir.join(format!(
            "acme-account-{}.json",
            slug(&self.settings.directory)
        ));
        let builder = || -> Result<_, AcmeError> {
            Ok(Account::builder_with_http(http_client(
                &self.settings.ca_bundle,
            )?))
        };
        if let Ok(text) = std::fs::read_to_string(&path) {
            match serde_json::from_str::<AccountCredentials>(&text) {
                Ok(creds) => return Ok(builder()?.from_credentials(creds).await?),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "ACME account file unreadable; registering a new account")
                }
            }
        }
        let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let eab = self
            .settings
            .eab
            .as_ref()
            .map(|e| ExternalAccountKey::new(e.kid.clone(), &e.hmac_key.0));
        let (account, creds) = builder()?
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.settings.directory.clone(),
                eab.as_ref(),
            )
            .await?;
        let json =
            serde_json::to_vec_pretty(&creds).map_err(|e| AcmeError::Order(e.to_string()))?;
        crate::files::write_atomic(&path, &json, 0o600)
            .map_err(|source| AcmeError::Storage { path, source })?;
        tracing::info!(id = account.id(), "ACME account registered");
        Ok(account)
    }

    /// One order, from new-order to the issued chain. Returns (chain PEM, key PEM).
    async fn order(&self) -> Result<(String, String), AcmeError> {
        let account = self.account().await?;
        let ids: Vec<Identifier> = self
            .settings
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        let kind = match self.dns {
            Some(_) => ChallengeType::Dns01,
            None => ChallengeType::Http01,
        };
        let mut records: Vec<(String, String)> = Vec::new();
        let mut tokens: Vec<String> = Vec::new();
        let result = async {
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = authz?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => return Err(AcmeError::Order(format!("authorization is {other:?}"))),
                }
                let ch = authz.challenge(kind.clone()).ok_or_else(|| {
                    AcmeError::Order(format!("the CA offers no {kind:?} challenge"))
                })?;
                let ident = ch.identifier().to_string();
                match &self.dns {
                    Some(dns) => {
                        let base = ident.trim_start_matches("*.");
                        let fqdn = format!("_acme-challenge.{base}.");
                        let value = ch.key_authorization().dns_value();
                        dns.present(&fqdn, &value).await?;
                        tracing::info!(%fqdn, provider = dns.name(), "TXT record set");
                        records.push((fqdn, value));
                    }
                    None => {
                        // This process answers from memory either way; only replicas need the file.
                        if let Err(e) = self.http01.add(&ch.token, ch.key_authorization().as_str()) {
                            tracing::warn!(error = %e, "HTTP-01 token not shared with replicas: validation succeeds only if the CA reaches this process");
                        }
                        tokens.push(ch.token.clone());
                    }
                }
            }
            if let (Some(dns), Some(settings), Some((fqdn, _))) =
                (&self.dns, &self.settings.dns, records.first())
            {
                let servers = dns::check_servers(settings, dns.as_ref(), fqdn).await?;
                dns::wait_visible(&servers, &records, settings.propagation_timeout).await?;
                tracing::info!(servers = ?servers, "TXT records visible");
            }
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = authz?;
                if authz.status != AuthorizationStatus::Pending {
                    continue;
                }
                if let Some(mut ch) = authz.challenge(kind.clone()) {
                    ch.set_ready().await?;
                }
            }
            let retry = RetryPolicy::new()
                .initial_delay(Duration::from_millis(250))
                .timeout(Duration::from_secs(180));
            let status = order.poll_ready(&retry).await?;
            if status != OrderStatus::Ready {
                let why = order
                    .state()
                    .error
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "no reason given".into());
                return Err(AcmeError::Order(format!("order is {status:?}: {why}")));
            }
            let key_pem = order.finalize().await?;
            let chain_pem = order.poll_certificate(&retry).await?;
            Ok((chain_pem, key_pem))
        }
        .await;
        // Whatever happened, leave no challenge behind.
        if let Some(dns) = &self.dns {
            for (fqdn, value) in &records {
                if let Err(e) = dns.cleanup(fqdn, value).await {
                    tracing::warn!(%fqdn, error = %e, "TXT record cleanup failed");
                }
            }
        }
        for t in &tokens {
            self.http01.remove(t);
        }
        result
    }
}

/// The certificate (valid longest) whose names include every domain.
pub fn covering<'a>(store: &'a CertStore, domains: &[String]) -> Option<&'a CertInfo> {
    store
        .infos()
        .iter()
        .filter(|i| domains.iter().all(|d| i.names.contains(d)))
        .max_by_key(|i| i.not_after)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `base · 2^(failures-1)`, at most `cap`, ±20% jitter so replicas do not retry in step.
fn backoff(base: Duration, failures: u32, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let d = exp.min(cap);
    d.mul_f64(0.8 + fastrand::f64() * 0.4)
}

/// A file-name-safe form of the directory URL's host and port.
fn slug(url: &str) -> String {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The HTTP client for the ACME server: the system's roots plus `ca_bundle`.
fn http_client(ca_bundle: &[CertificateDer<'static>]) -> Result<Box<dyn HttpClient>, AcmeError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    // Unusable entries (not a CA certificate) are skipped like unusable system roots.
    let (_, refused) = roots.add_parsable_certificates(ca_bundle.iter().cloned());
    if refused > 0 {
        tracing::warn!(
            refused,
            "ca_bundle: certificates that cannot be trust anchors were skipped"
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AcmeError::Order(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client: hyper_util::client::legacy::Client<_, BodyWrapper<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    Ok(Box::new(client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let base = Duration::from_secs(60);
        let cap = Duration::from_secs(3600);
        for (failures, mid) in [(1, 60.0), (2, 120.0), (3, 240.0), (10, 3600.0)] {
            let d = backoff(base, failures, cap).as_secs_f64();
            assert!(d >= mid * 0.8 && d <= mid * 1.2, "{failures}: {d}");
        }
    }

    #[test]
    fn directory_slugs_are_file_names() {
        assert_eq!(
            slug("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org"
        );
        assert_eq!(slug("https://127.0.0.1:14000/dir"), "127.0.0.1_14000");
    }
}
