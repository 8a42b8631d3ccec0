//! DNS-01 providers: one small trait (present / clean up one TXT value) and one file per
//! provider, plus the propagation check that runs before the CA is told to validate.
//!
//! Several values may share one name: `example.com` and `*.example.com` are both validated at
//! `_acme-challenge.example.com`, so providers add and remove single values, never whole sets.

mod cloudflare;
mod exec;
mod rfc2136;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hickory_client::client::{Client, ClientHandle};
use hickory_client::proto::rr::{DNSClass, Name, RData, RecordType};
use hickory_client::proto::runtime::TokioRuntimeProvider;
use hickory_client::proto::udp::UdpClientStream;

pub use cloudflare::Cloudflare;
pub use exec::Exec;
pub use rfc2136::Rfc2136;

use super::settings::{DnsProviderSettings, DnsSettings};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("dns hook {command}: {reason}")]
    Exec { command: String, reason: String },
    #[error("cloudflare API: {0}")]
    Cloudflare(String),
    #[error("dynamic update to {server}: {reason}")]
    Update { server: SocketAddr, reason: String },
    #[error("no zone found for {0}")]
    NoZone(String),
    #[error("TXT {fqdn} not visible at {servers} after {waited:?}")]
    NotPropagated {
        fqdn: String,
        servers: String,
        waited: Duration,
    },
    #[error("dns query to {server}: {reason}")]
    Query { server: SocketAddr, reason: String },
}

/// Sets and clears `_acme-challenge` TXT values. `fqdn` ends with a dot.
#[async_trait]
pub trait DnsProvider: Send + Sync {
    fn name(&self) -> &'static str;
    async fn present(&self, fqdn: &str, value: &str) -> Result<(), DnsError>;
    async fn cleanup(&self, fqdn: &str, value: &str) -> Result<(), DnsError>;
    /// The server that answers for the zone, when the provider talks to it directly.
    fn authoritative(&self) -> Option<SocketAddr> {
        None
    }
}

pub fn provider(settings: &DnsSettings) -> Arc<dyn DnsProvider> {
    match &settings.provider {
        DnsProviderSettings::Exec { command, timeout } => {
            Arc::new(Exec::new(command.clone(), *timeout))
        }
        DnsProviderSettings::Cloudflare {
            api_token,
            api_url,
            zone_id,
        } => Arc::new(Cloudflare::new(
            api_url.clone(),
            api_token.as_str().to_owned(),
            zone_id.clone(),
            settings.ttl,
        )),
        DnsProviderSettings::Rfc2136 {
            server,
            zone,
            key_name,
            key_secret,
            key_algorithm,
        } => Arc::new(Rfc2136::new(
            *server,
            zone.clone(),
            key_name,
            key_secret.0.clone(),
            *key_algorithm,
            settings.ttl,
        )),
    }
}

/// Where propagation is checked: the configured resolvers, else the provider's own server,
/// else the zone's authoritative servers as the system resolver names them.
pub async fn check_servers(
    settings: &DnsSettings,
    provider: &dyn DnsProvider,
    fqdn: &str,
) -> Result<Vec<SocketAddr>, DnsError> {
    if !settings.resolvers.is_empty() {
        return Ok(settings.resolvers.clone());
    }
    if let Some(s) = provider.authoritative() {
        return Ok(vec![s]);
    }
    authoritative_servers(fqdn).await
}

/// Polls every server until each shows every `(fqdn, value)`, or `timeout` passes.
pub async fn wait_visible(
    servers: &[SocketAddr],
    records: &[(String, String)],
    timeout: Duration,
) -> Result<(), DnsError> {
    let start = Instant::now();
    loop {
        let mut missing = None;
        'all: for server in servers {
            for (fqdn, value) in records {
                let seen = txt_values(*server, fqdn).await.unwrap_or_default();
                if !seen.iter().any(|v| v == value) {
                    missing = Some(fqdn.clone());
                    break 'all;
                }
            }
        }
        let Some(fqdn) = missing else {
            return Ok(());
        };
        if start.elapsed() >= timeout {
            return Err(DnsError::NotPropagated {
                fqdn,
                servers: servers
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                waited: start.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn udp_client(server: SocketAddr) -> Result<Client, DnsError> {
    let conn = UdpClientStream::builder(server, TokioRuntimeProvider::new())
        .with_timeout(Some(Duration::from_secs(3)))
        .build();
    let (client, bg) = Client::connect(conn).await.map_err(|e| DnsError::Query {
        server,
        reason: e.to_string(),
    })?;
    tokio::spawn(bg);
    Ok(client)
}

fn name(fqdn: &str) -> Result<Name, String> {
    Name::from_ascii(fqdn).map_err(|e| format!("{fqdn}: {e}"))
}

/// The TXT values at `fqdn` as `server` answers them (each record's strings joined).
pub async fn txt_values(server: SocketAddr, fqdn: &str) -> Result<Vec<String>, DnsError> {
    let query_err = |reason: String| DnsError::Query { server, reason };
    let mut client = udp_client(server).await?;
    let resp = client
        .query(
            name(fqdn).map_err(query_err)?,
            DNSClass::IN,
            RecordType::TXT,
        )
        .await
        .map_err(|e| query_err(e.to_string()))?;
    Ok(resp
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::TXT(txt) => Some(
                txt.txt_data()
                    .iter()
                    .map(|part| String::from_utf8_lossy(part))
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect())
}

/// The system's recursive resolvers, from `/etc/resolv.conf`.
fn system_resolvers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The addresses of the authoritative servers of the zone holding `fqdn`: the closest
/// enclosing name with NS records, asked of the system resolver. Checking them rather than a
/// recursive resolver avoids waiting out a cached NXDOMAIN.
async fn authoritative_servers(fqdn: &str) -> Result<Vec<SocketAddr>, DnsError> {
    let recursive = system_resolvers();
    let Some(&resolver) = recursive.first() else {
        return Err(DnsError::NoZone(format!(
            "{fqdn} (no nameserver in /etc/resolv.conf; set dns.resolvers)"
        )));
    };
    let query_err = |reason: String| DnsError::Query {
        server: resolver,
        reason,
    };
    let mut client = udp_client(resolver).await?;
    let mut zone = fqdn.trim_end_matches('.');
    while let Some((_, parent)) = zone.split_once('.') {
        zone = parent;
        let resp = client
            .query(
                name(&format!("{zone}.")).map_err(query_err)?,
                DNSClass::IN,
                RecordType::NS,
            )
            .await
            .map_err(|e| query_err(e.to_string()))?;
        let hosts: Vec<Name> = resp
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::NS(ns) => Some(ns.0.clone()),
                _ => None,
            })
            .collect();
        if hosts.is_empty() {
            continue;
        }
        let mut addrs = Vec::new();
        for host in hosts {
            let resp = client
                .query(host, DNSClass::IN, RecordType::A)
                .await
                .map_err(|e| query_err(e.to_string()))?;
            addrs.extend(resp.answers().iter().filter_map(|r| match r.data() {
                RData::A(a) => Some(SocketAddr::new(std::net::IpAddr::V4(a.0), 53)),
                _ => None,
            }));
        }
        if !addrs.is_empty() {
            return Ok(addrs);
        }
    }
    Err(DnsError::NoZone(fqdn.to_owned()))
}
