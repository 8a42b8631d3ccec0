//! Upstream egress (SPEC §10 `[upstreams]`): which addresses a registry answer may send a
//! request to.
//!
//! A VM's address is attacker input (a Proxmox container reports its own, a control plane
//! or the admin API may be fooled), and a DNS name is whatever its owner makes it resolve to.
//! So the check runs on the `SocketAddr` that is actually dialled: `Generation::upstream_addr`
//! resolves a name once, checks every address the lookup returned, and hands the first one
//! to `upstream_peer`; nothing is looked up again between the check and the connect.
//!
//! Always refused: unspecified (`0.0.0.0/8`, `::`), link-local (`169.254.0.0/16`,
//! `fe80::/10`: cloud metadata), multicast, broadcast, the deprecated IPv4-compatible
//! `::a.b.c.d`, loopback unless `allow_loopback`, and the edge's own listeners (admin, http,
//! https) even with `allow_loopback`. IPv4-mapped IPv6 (`::ffff:127.0.0.1`) is checked as the
//! IPv4 address it is; a NAT64 address (`64:ff9b::/96`) is checked against the built-in set
//! as the IPv4 address it embeds. Then `deny`, then `allow` (when set, only those CIDRs, plus
//! loopback with `allow_loopback`). An address the VM reports about itself (`proxmox`) never
//! gets the loopback exception: with `allow` set it must fall inside it.
//!
//! Cost per request: one canonicalisation and a few comparisons (the built-in set, up to
//! three listeners, the configured CIDRs); no allocation, no lock. Everything is precomputed
//! at config load. Approximation: a listener on `0.0.0.0`/`::` is matched against loopback
//! and the host's interface addresses as they were when the config was loaded.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// `[upstreams]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressSettings {
    /// When set, only these networks (plus loopback with `allow_loopback`).
    pub allow: Option<Vec<IpNet>>,
    /// Added to the built-in deny set.
    pub deny: Vec<IpNet>,
    pub allow_loopback: bool,
}

/// Why an address is refused (bounded, for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    Unspecified,
    LinkLocal,
    Multicast,
    Broadcast,
    /// `::a.b.c.d` (RFC 4291 §2.5.5.1, deprecated): never a real upstream.
    Ipv4Compatible,
    Loopback,
    /// One of the edge's own listening sockets.
    Listener,
    /// `[upstreams] deny`.
    Denied,
    /// Outside `[upstreams] allow`.
    NotAllowed,
}

impl Denial {
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::Unspecified => "unspecified address",
            Denial::LinkLocal => "link-local address",
            Denial::Multicast => "multicast address",
            Denial::Broadcast => "broadcast address",
            Denial::Ipv4Compatible => "IPv4-compatible IPv6 address",
            Denial::Loopback => "loopback address (set [upstreams] allow_loopback)",
            Denial::Listener => "one of the edge's own listeners",
            Denial::Denied => "listed in [upstreams] deny",
            Denial::NotAllowed => "outside [upstreams] allow",
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The policy of one config generation, precomputed for the per-request check.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    settings: EgressSettings,
    allow: Option<Box<[IpNet]>>,
    deny: Box<[IpNet]>,
    allow_loopback: bool,
    /// Listeners bound to one address, canonical.
    listeners: Box<[SocketAddr]>,
    /// Ports of listeners bound to `0.0.0.0` or `::`.
    wildcard_ports: Box<[u16]>,
    /// The host's own addresses (only gathered when a listener is a wildcard).
    local: Box<[IpAddr]>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        EgressPolicy::new(&EgressSettings::default(), [])
    }
}

impl EgressPolicy {
    /// `listeners`: the edge's own sockets (admin, http, https).
    pub fn new(
        settings: &EgressSettings,
        listeners: impl IntoIterator<Item = SocketAddr>,
    ) -> EgressPolicy {
        let (wild, fixed): (Vec<SocketAddr>, Vec<SocketAddr>) =
            listeners.into_iter().partition(|l| l.ip().is_unspecified());
        let local = if wild.is_empty() {
            Vec::new()
        } else {
            local_addresses()
        };
        EgressPolicy::with_local(settings, fixed, wild, local)
    }

    fn with_local(
        settings: &EgressSettings,
        fixed: Vec<SocketAddr>,
        wild: Vec<SocketAddr>,
        local: Vec<IpAddr>,
    ) -> EgressPolicy {
        let canon = |n: &IpNet| canonical_net(*n);
        EgressPolicy {
            settings: settings.clone(),
            allow: settings
                .allow
                .as_ref()
                .map(|a| a.iter().map(canon).collect()),
            deny: settings.deny.iter().map(canon).collect(),
            allow_loopback: settings.allow_loopback,
            listeners: fixed
                .into_iter()
                .map(|l| SocketAddr::new(l.ip().to_canonical(), l.port()))
                .collect(),
            wildcard_ports: wild.iter().map(SocketAddr::port).collect(),
            local: local.into_iter().map(|ip| ip.to_canonical()).collect(),
        }
    }

    /// The same settings protecting other listeners: a reload that changes `[listen]` keeps
    /// the sockets actually bound until a restart, so those are what must stay refused.
    pub fn for_listeners(&self, listeners: impl IntoIterator<Item = SocketAddr>) -> EgressPolicy {
        EgressPolicy::new(&self.settings, listeners)
    }

    pub fn allow_is_set(&self) -> bool {
        self.allow.is_some()
    }

    /// May the edge dial `addr`? `self_reported`: the address comes from the VM itself
    /// (`proxmox`), so loopback is never excused. Port 0 matches no listener (for `check`,
    /// which judges an address for every port at once).
    pub fn check(&self, addr: SocketAddr, self_reported: bool) -> Result<(), Denial> {
        let ip = addr.ip().to_canonical();
        let port = addr.port();
        if port != 0
            && (self.listeners.contains(&SocketAddr::new(ip, port))
                || (self.wildcard_ports.contains(&port)
                    && (ip.is_loopback() || self.local.contains(&ip))))
        {
            return Err(Denial::Listener);
        }
        builtin(ip)?;
        let loopback_ok = self.allow_loopback && !self_reported;
        if ip.is_loopback() && !loopback_ok {
            return Err(Denial::Loopback);
        }
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Err(Denial::Denied);
        }
        let excused = ip.is_loopback() && loopback_ok;
        match &self.allow {
            Some(allow) if !excused && !allow.iter().any(|n| n.contains(&ip)) => {
                Err(Denial::NotAllowed)
            }
            _ => Ok(()),
        }
    }
}

/// The built-in deny set, loopback aside. `ip` is canonical (no IPv4-mapped form).
fn builtin(ip: IpAddr) -> Result<(), Denial> {
    match ip {
        IpAddr::V4(v4) => builtin_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_unspecified() {
                Err(Denial::Unspecified)
            } else if v6.is_multicast() {
                Err(Denial::Multicast)
            } else if s[0] & 0xffc0 == 0xfe80 {
                Err(Denial::LinkLocal)
            } else if s[..6] == [0; 6] && !v6.is_loopback() {
                Err(Denial::Ipv4Compatible)
            } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                builtin_v4(Ipv4Addr::new(a, b, c, d))
            } else {
                Ok(())
            }
        }
    }
}

fn builtin_v4(v4: Ipv4Addr) -> Result<(), Denial> {
    if v4.octets()[0] == 0 {
        // 0.0.0.0/8: "this network"; Linux connects 0.0.0.0 to the host itself.
        Err(Denial::Unspecified)
    } else if v4.is_link_local() {
        Err(Denial::LinkLocal)
    } else if v4.is_multicast() {
        Err(Denial::Multicast)
    } else if v4.is_broadcast() {
        Err(Denial::Broadcast)
    } else {
        Ok(())
    }
}

/// `::ffff:10.0.0.0/104` is `10.0.0.0/8`.
fn canonical_net(n: IpNet) -> IpNet {
    match n {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(n),
            None => n,
        },
        _ => n.trunc(),
    }
    .trunc()
}

/// Parses a CIDR or a bare address (a /32 or /128).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        Ok(canonical_net(net))
    } else if let Ok(ip) = s.parse::<IpAddr>() {
        Ok(IpNet::from(ip.to_canonical()))
    } else {
        Err(format!(
            "{s:?} is not a CIDR like \"10.0.0.0/8\" or an IP address"
        ))
    }
}

/// The host's interface addresses, for listeners on `0.0.0.0` / `::`.
fn local_addresses() -> Vec<IpAddr> {
    let mut out = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => {
            for a in addrs {
                let Some(addr) = a.address else { continue };
                let ip = if let Some(v4) = addr.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    IpAddr::V6(v6.ip())
                } else {
                    continue;
                };
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list interface addresses for [upstreams]"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn settings(allow: Option<&[&str]>, deny: &[&str], allow_loopback: bool) -> EgressSettings {
        EgressSettings {
            allow: allow.map(|a| a.iter().map(|s| parse_net(s).unwrap()).collect()),
            deny: deny.iter().map(|s| parse_net(s).unwrap()).collect(),
            allow_loopback,
        }
    }

    fn policy(s: &EgressSettings) -> EgressPolicy {
        EgressPolicy::with_local(
            s,
            vec![addr("127.0.0.1:9180"), addr("10.0.0.1:443")],
            vec![addr("0.0.0.0:8080")],
            vec![addr("10.0.0.1:0").ip(), addr("[fd00::1]:0").ip()],
        )
    }

    #[test]
    fn an_ipv4_mapped_loopback_address_is_refused() {
        let p = policy(&settings(None, &[], false));
        assert_eq!(
            p.check(addr("[::ffff:127.0.0.1]:80"), false),
            Err(Denial::Loopback)
        );
        assert_eq!(p.check(addr("127.0.0.1:80"), false), Err(Denial::Loopback));
        assert_eq!(p.check(addr("[::1]:80"), false), Err(Denial::Loopback));
        assert_eq!(
            p.check(addr("[::ffff:169.254.169.254]:80"), false),
            Err(Denial::LinkLocal)
        );
    }

    #[test]
    fn the_built_in_set_is_refused_whatever_the_config() {
        let p = policy(&settings(Some(&["0.0.0.0/0", "::/0"]), &[], true));
        for (a, why) in [
            ("0.0.0.0:80", Denial::Unspecified),
            ("0.1.2.3:80", Denial::Unspecified),
            ("[::]:80", Denial::Unspecified),
            ("169.254.169.254:80", Denial::LinkLocal),
            ("[fe80::1]:80", Denial::LinkLocal),
            ("224.0.0.1:80", Denial::Multicast),
            ("[ff02::1]:80", Denial::Multicast),
            ("255.255.255.255:80", Denial::Broadcast),
            ("[::127.0.0.1]:80", Denial::Ipv4Compatible),
            ("[64:ff9b::a9fe:a9fe]:80", Denial::LinkLocal),
        ] {
            assert_eq!(p.check(addr(a), false), Err(why), "{a}");
        }
        assert_eq!(p.check(addr("10.1.2.3:80"), false), Ok(()));
        assert_eq!(p.check(addr("[2001:db8::1]:80"), false), Ok(()));
    }

    #[test]
    fn allow_loopback_permits_loopback_but_never_the_edges_listeners() {
        let p = policy(&settings(None, &[], true));
        assert_eq!(p.check(addr("127.0.0.1:3000"), false), Ok(()));
        assert_eq!(p.check(addr("[::ffff:127.0.0.1]:3000"), false), Ok(()));
        assert_eq!(
            p.check(addr("127.0.0.1:9180"), false),
            Err(Denial::Listener)
        );
        assert_eq!(
            p.check(addr("[::ffff:127.0.0.1]:9180"), false),
            Err(Denial::Listener)
        );
        // 0.0.0.0:8080 listens on every local address
        for a in [
            "127.0.0.1:8080",
            "127.0.0.2:8080",
            "10.0.0.1:8080",
            "[fd00::1]:8080",
        ] {
            assert_eq!(p.check(addr(a), false), Err(Denial::Listener), "{a}");
        }
        assert_eq!(p.check(addr("10.0.0.2:8080"), false), Ok(()));
        assert_eq!(p.check(addr("10.0.0.1:443"), false), Err(Denial::Listener));
        assert_eq!(p.check(addr("10.0.0.1:444"), false), Ok(()));
        // port 0: judged for every port at once, no listener matches
        assert_eq!(p.check(addr("127.0.0.1:0"), false), Ok(()));
    }

    #[test]
    fn allow_limits_to_its_networks_plus_loopback_when_allowed() {
        let p = policy(&settings(Some(&["10.100.0.0/16"]), &[], false));
        assert_eq!(p.check(addr("10.100.3.4:80"), false), Ok(()));
        assert_eq!(p.check(addr("[::ffff:10.100.3.4]:80"), false), Ok(()));
        assert_eq!(
            p.check(addr("10.101.0.1:80"), false),
            Err(Denial::NotAllowed)
        );
        assert_eq!(p.check(addr("127.0.0.1:80"), false), Err(Denial::Loopback));
        let p = policy(&settings(Some(&["10.100.0.0/16"]), &[], true));
        assert_eq!(p.check(addr("127.0.0.1:80"), false), Ok(()));
    }

    #[test]
    fn a_self_reported_address_never_gets_the_loopback_exception() {
        let p = policy(&settings(Some(&["10.100.0.0/16"]), &[], true));
        assert_eq!(p.check(addr("127.0.0.1:80"), true), Err(Denial::Loopback));
        assert_eq!(p.check(addr("10.100.0.9:80"), true), Ok(()));
        let p = policy(&settings(None, &[], true));
        assert_eq!(p.check(addr("127.0.0.1:80"), true), Err(Denial::Loopback));
    }

    #[test]
    fn deny_adds_to_the_built_in_set_and_wins_over_allow() {
        let p = policy(&settings(
            Some(&["10.0.0.0/8"]),
            &["10.9.0.0/16", "::ffff:192.0.2.0/120"],
            false,
        ));
        assert_eq!(p.check(addr("10.9.1.1:80"), false), Err(Denial::Denied));
        assert_eq!(p.check(addr("10.8.1.1:80"), false), Ok(()));
        let p = policy(&settings(None, &["192.0.2.0/24"], false));
        assert_eq!(p.check(addr("192.0.2.7:80"), false), Err(Denial::Denied));
        assert_eq!(
            p.check(addr("[::ffff:192.0.2.7]:80"), false),
            Err(Denial::Denied)
        );
    }

    #[test]
    fn mapped_networks_are_canonicalised_at_load() {
        assert_eq!(
            parse_net("::ffff:10.0.0.0/104").unwrap(),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_net("::ffff:127.0.0.1").unwrap(),
            "127.0.0.1/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_net("10.1.2.3/8").unwrap(),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("example.com").is_err());
    }
}
