//! Trusted proxies: whose `X-Forwarded-Proto`, `X-Forwarded-For` and `CF-Connecting-IP` are
//! believed (SPEC §4 `[trust] proxies`).
//!
//! A request from anyone else gets its client address from the TCP peer and its scheme from
//! the listener, whatever headers it sends.
//!
//! `CF-Connecting-IP` is Cloudflare's word, so it is believed only on Cloudflare's path
//! (SPEC §10): when `"cloudflare"` is listed and the peer is trusted, that is, a Cloudflare
//! edge address or (behind Cloudflare Tunnel, README) cloudflared, listed beside it. A
//! trusted load balancer in a config without `"cloudflare"` forwards whatever its clients
//! send, so there the header is never believed, and `forward` removes it.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// Cloudflare's published edge ranges (cloudflare.com/ips-v4 and /ips-v6). Behind Cloudflare
/// Tunnel the TCP peer is cloudflared, not these: trust cloudflared's address as well.
pub const CLOUDFLARE_RANGES: &[&str] = &[
    "173.245.48.0/20",
    "103.21.244.0/22",
    "103.22.200.0/22",
    "103.31.4.0/22",
    "141.101.64.0/18",
    "108.162.192.0/18",
    "190.93.240.0/20",
    "188.114.96.0/20",
    "197.234.240.0/22",
    "198.41.128.0/17",
    "162.158.0.0/15",
    "104.16.0.0/13",
    "104.24.0.0/14",
    "172.64.0.0/13",
    "131.0.72.0/22",
    "2400:cb00::/32",
    "2606:4700::/32",
    "2803:f800::/32",
    "2405:b500::/32",
    "2405:8100::/32",
    "2a06:98c0::/29",
    "2c0f:f248::/32",
];

#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    /// `"cloudflare"` is listed: the trusted peers are Cloudflare's delivery path.
    cloudflare: bool,
}

impl TrustedProxies {
    /// Parses `"cloudflare"`, a CIDR, or a bare address (a /32 or /128).
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut nets = Vec::new();
        let mut cloudflare = false;
        for e in entries {
            if e == "cloudflare" {
                cloudflare = true;
                nets.extend(
                    CLOUDFLARE_RANGES
                        .iter()
                        .filter_map(|r| r.parse::<IpNet>().ok()),
                );
            } else if let Ok(net) = e.parse::<IpNet>() {
                nets.push(net.trunc());
            } else if let Ok(ip) = e.parse::<IpAddr>() {
                nets.push(IpNet::from(ip));
            } else {
                return Err(format!(
                    "{e:?} is not \"cloudflare\", a CIDR like \"10.0.0.0/8\" or an IP address"
                ));
            }
        }
        Ok(TrustedProxies { nets, cloudflare })
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client as far as we can believe it, and whether a trusted proxy says the original
    /// request was HTTPS.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> Client {
        if !self.contains(peer) {
            return Client {
                ip: peer,
                trusted_peer: false,
                cloudflare: false,
                forwarded_https: None,
            };
        }
        let cloudflare = self.cloudflare;
        let forwarded_https = headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().eq_ignore_ascii_case("https"));
        let ip = headers
            .get("cf-connecting-ip")
            .filter(|_| cloudflare)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<IpAddr>().ok())
            .or_else(|| self.rightmost_untrusted(headers))
            .unwrap_or(peer);
        Client {
            ip,
            trusted_peer: true,
            cloudflare,
            forwarded_https,
        }
    }

    /// nginx's `real_ip_recursive on`: walk X-Forwarded-For from the right, skipping our own
    /// proxies; the first address we do not trust is the client.
    fn rightmost_untrusted(&self, headers: &HeaderMap) -> Option<IpAddr> {
        let mut last = None;
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(s) = value.to_str() else { return last };
            for part in s.rsplit(',') {
                let Ok(ip) = part.trim().parse::<IpAddr>() else {
                    return last;
                };
                if !self.contains(ip) {
                    return Some(ip);
                }
                last = Some(ip);
            }
        }
        last
    }
}

/// The downstream client after trusted-proxy resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    pub ip: IpAddr,
    /// The TCP peer is a trusted proxy: its X-Forwarded-For chain is kept and extended.
    pub trusted_peer: bool,
    /// The peer is on Cloudflare's path: its `CF-Connecting-IP` is believed and forwarded.
    pub cloudflare: bool,
    /// What a trusted proxy's `X-Forwarded-Proto` says, if anything.
    pub forwarded_https: Option<bool>,
}

/// `::ffff:10.0.0.1` is `10.0.0.1` for matching purposes.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cloudflare_keyword_expands_to_published_ranges() {
        let t = TrustedProxies::parse(["cloudflare"]).unwrap();
        assert!(t.contains("104.16.1.1".parse().unwrap()));
        assert!(t.contains("2606:4700::1".parse().unwrap()));
        assert!(!t.contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn untrusted_peers_are_taken_at_their_word_for_nothing() {
        let t = TrustedProxies::parse(["10.0.0.0/8"]).unwrap();
        let h = headers(&[
            ("cf-connecting-ip", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        let c = t.client("192.0.2.9".parse().unwrap(), &h);
        assert_eq!(c.ip, "192.0.2.9".parse::<IpAddr>().unwrap());
        assert_eq!(c.forwarded_https, None);
        assert!(!c.trusted_peer);
    }

    #[test]
    fn cf_connecting_ip_is_believed_only_on_cloudflares_path() {
        let h = headers(&[
            ("cf-connecting-ip", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
        ]);
        // a trusted load balancer without "cloudflare": its clients' CF-Connecting-IP is noise
        let lb = TrustedProxies::parse(["10.0.0.0/8"]).unwrap();
        let c = lb.client("10.0.0.2".parse().unwrap(), &h);
        assert!(c.trusted_peer && !c.cloudflare);
        assert_eq!(c.ip, "5.6.7.8".parse::<IpAddr>().unwrap());
        // a Cloudflare edge address
        let cf = TrustedProxies::parse(["cloudflare"]).unwrap();
        let c = cf.client("104.16.1.1".parse().unwrap(), &h);
        assert!(c.cloudflare);
        assert_eq!(c.ip, "1.2.3.4".parse::<IpAddr>().unwrap());
        // but not anyone else, even with "cloudflare" listed
        let c = cf.client("192.0.2.9".parse().unwrap(), &h);
        assert!(!c.cloudflare && !c.trusted_peer);
        // behind Cloudflare Tunnel: cloudflared, listed beside "cloudflare" (README)
        let tunnel = TrustedProxies::parse(["cloudflare", "127.0.0.1"]).unwrap();
        let c = tunnel.client("127.0.0.1".parse().unwrap(), &h);
        assert!(c.cloudflare);
        assert_eq!(c.ip, "1.2.3.4".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn trusted_peers_supply_client_and_proto() {
        let t = TrustedProxies::parse(["cloudflare", "127.0.0.1", "10.0.0.0/8"]).unwrap();
        let h = headers(&[
            ("cf-connecting-ip", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        let c = t.client("::ffff:127.0.0.1".parse().unwrap(), &h);
        assert_eq!(c.ip, "1.2.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(c.forwarded_https, Some(true));
        let h = headers(&[("x-forwarded-for", "5.6.7.8, 10.1.1.1")]);
        let c = t.client("10.0.0.2".parse().unwrap(), &h);
        assert_eq!(c.ip, "5.6.7.8".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn garbage_entries_are_refused() {
        assert!(TrustedProxies::parse(["everyone"]).is_err());
        assert!(TrustedProxies::parse(["10.0.0.0/33"]).is_err());
    }
}
