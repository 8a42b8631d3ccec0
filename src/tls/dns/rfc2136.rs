//! The `rfc2136` provider: TSIG-signed dynamic updates (RFC 2136 + RFC 8945) to an
//! authoritative server, as BIND, Knot and PowerDNS accept them. The wire format is hickory's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hickory_client::client::{Client, ClientHandle};
use hickory_client::proto::dnssec::rdata::tsig::TsigAlgorithm as HickoryTsig;
use hickory_client::proto::dnssec::tsig::TSigner;
use hickory_client::proto::op::ResponseCode;
use hickory_client::proto::rr::rdata::TXT;
use hickory_client::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_client::proto::runtime::TokioRuntimeProvider;
use hickory_client::proto::tcp::TcpClientStream;

use super::{DnsError, DnsProvider};
use crate::tls::settings::TsigAlgorithm;

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Rfc2136 {
    server: SocketAddr,
    zone: Option<String>,
    key_name: String,
    key_secret: Vec<u8>,
    algorithm: TsigAlgorithm,
    ttl: u32,
}

impl Rfc2136 {
    pub fn new(
        server: SocketAddr,
        zone: Option<String>,
        key_name: &str,
        key_secret: Vec<u8>,
        algorithm: TsigAlgorithm,
        ttl: u32,
    ) -> Rfc2136 {
        Rfc2136 {
            server,
            zone,
            key_name: key_name.to_owned(),
            key_secret,
            algorithm,
            ttl,
        }
    }

    fn err(&self, reason: impl ToString) -> DnsError {
        DnsError::Update {
            server: self.server,
            reason: reason.to_string(),
        }
    }

    /// A TCP connection whose every message is TSIG-signed (and whose answers are verified).
    async fn client(&self) -> Result<Client, DnsError> {
        let algorithm = match self.algorithm {
            TsigAlgorithm::HmacSha256 => HickoryTsig::HmacSha256,
            TsigAlgorithm::HmacSha384 => HickoryTsig::HmacSha384,
            TsigAlgorithm::HmacSha512 => HickoryTsig::HmacSha512,
        };
        let key_name = Name::from_ascii(&self.key_name).map_err(|e| self.err(e))?;
        let signer = TSigner::new(self.key_secret.clone(), algorithm, key_name, 300)
            .map_err(|e| self.err(e))?;
        let (stream, sender) = TcpClientStream::new(
            self.server,
            None,
            Some(TIMEOUT),
            TokioRuntimeProvider::new(),
        );
        let (client, bg) = Client::with_timeout(stream, sender, TIMEOUT, Some(Arc::new(signer)))
            .await
            .map_err(|e| self.err(e))?;
        tokio::spawn(bg);
        Ok(client)
    }

    /// The configured zone, else the closest enclosing name the server has an SOA for.
    async fn zone(&self, client: &mut Client, fqdn: &str) -> Result<Name, DnsError> {
        if let Some(z) = &self.zone {
            return Name::from_ascii(format!("{z}.")).map_err(|e| self.err(e));
        }
        let mut candidate = fqdn.trim_end_matches('.');
        while let Some((_, parent)) = candidate.split_once('.') {
            candidate = parent;
            let name = Name::from_ascii(format!("{candidate}.")).map_err(|e| self.err(e))?;
            let resp = client
                .query(name.clone(), DNSClass::IN, RecordType::SOA)
                .await
                .map_err(|e| self.err(e))?;
            let is_apex = resp
                .answers()
                .iter()
                .any(|r| r.record_type() == RecordType::SOA && r.name() == &name);
            if is_apex {
                return Ok(name);
            }
        }
        Err(DnsError::NoZone(fqdn.to_owned()))
    }

    fn record(&self, fqdn: &str, value: &str) -> Result<Record, DnsError> {
        let name = Name::from_ascii(fqdn).map_err(|e| self.err(e))?;
        let mut record =
            Record::from_rdata(name, self.ttl, RData::TXT(TXT::new(vec![value.into()])));
        record.set_dns_class(DNSClass::IN);
        Ok(record)
    }

    fn check(&self, code: ResponseCode, what: &str) -> Result<(), DnsError> {
        if code == ResponseCode::NoError {
            Ok(())
        } else {
            Err(self.err(format!("{what} refused: {code}")))
        }
    }
}

#[async_trait]
impl DnsProvider for Rfc2136 {
    fn name(&self) -> &'static str {
        "rfc2136"
    }

    async fn present(&self, fqdn: &str, value: &str) -> Result<(), DnsError> {
        let mut client = self.client().await?;
        let zone = self.zone(&mut client, fqdn).await?;
        let resp = client
            .append(self.record(fqdn, value)?, zone, false)
            .await
            .map_err(|e| self.err(e))?;
        self.check(resp.response_code(), "update")
    }

    async fn cleanup(&self, fqdn: &str, value: &str) -> Result<(), DnsError> {
        let mut client = self.client().await?;
        let zone = self.zone(&mut client, fqdn).await?;
        let resp = client
            .delete_by_rdata(self.record(fqdn, value)?, zone)
            .await
            .map_err(|e| self.err(e))?;
        self.check(resp.response_code(), "delete")
    }

    fn authoritative(&self) -> Option<SocketAddr> {
        Some(self.server)
    }
}
