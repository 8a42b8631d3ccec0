//! Per-port behaviour (SPEC §2 `[[policy]]`, §5) and which VM ports may be reached at all
//! (`[ports]`).
//!
//! Both are resolved from the parsed port once per request: reachability is a 8 KiB bitmap,
//! the policy a small map lookup. Port policies inherit every key they do not set from the
//! `port = "*"` policy, merged at config load. What a policy does lives in one file per
//! rule: [`cors`], [`embed`], [`cookies`], [`redirect`], and [`gate`] for the requests a
//! policy refuses before the registry is asked.
//!
//! The built-in policy is the safe one of SPEC §10 (CORS and framing left to the app, no
//! shim, host-only cookies, no VM service workers); the cmux preset is opt-in.

pub mod cookies;
pub mod cors;
pub mod embed;
pub mod gate;
pub mod redirect;

pub use cors::{AllowOrigins, Grant};

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderName;

/// VM ports that may be reached: `allow` minus `deny`.
#[derive(Clone)]
pub struct PortSet {
    bits: Box<[u64; 1024]>,
}

impl PortSet {
    pub fn new(allow: &[(u16, u16)], deny: &[(u16, u16)]) -> PortSet {
        let mut set = PortSet {
            bits: Box::new([0; 1024]),
        };
        for &(lo, hi) in allow {
            for p in lo..=hi {
                set.bits[p as usize / 64] |= 1 << (p % 64);
            }
        }
        for &(lo, hi) in deny {
            for p in lo..=hi {
                set.bits[p as usize / 64] &= !(1 << (p % 64));
            }
        }
        set
    }

    pub fn allows(&self, port: u16) -> bool {
        self.bits[port as usize / 64] & (1 << (port % 64)) != 0
    }
}

impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n: u32 = self.bits.iter().map(|w| w.count_ones()).sum();
        write!(f, "PortSet({n} ports)")
    }
}

/// Parses `22`, `"22"` or `"8000-8999"` into an inclusive range.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let err = || format!("{s:?} is not a port (1-65535) or a range like \"8000-8999\"");
    let one = |p: &str| match p.trim().parse::<u16>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(err()),
    };
    match s.split_once('-') {
        Some((lo, hi)) => {
            let (lo, hi) = (one(lo)?, one(hi)?);
            if lo > hi {
                return Err(err());
            }
            Ok((lo, hi))
        }
        None => one(s).map(|p| (p, p)),
    }
}

/// How CORS is handled for a port (SPEC §5, §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cors {
    /// Answer preflights at the edge and grant the origins of `allow_origins`.
    Permissive,
    /// Answer OPTIONS 204 bare and remove every `Access-Control-*` header.
    Strip,
    /// Leave CORS entirely to the upstream (the built-in default).
    Passthrough,
}

/// Which `Host` the upstream sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostHeader {
    /// The public preview host (default): apps build absolute URLs from it.
    Preserve,
    /// The upstream authority `address:port`, for apps that check Host.
    Upstream,
}

/// What happens to the `Domain=` attribute of an upstream `Set-Cookie` (SPEC §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cookies {
    /// Removed: every cookie a VM sets is host-only (the built-in default).
    Host,
    /// Left alone.
    Passthrough,
}

/// Whether a VM's own service workers may register (SPEC §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceWorkers {
    /// Only the edge's `/proxy-sw.js` (the built-in default).
    EdgeOnly,
    /// Any script the VM serves.
    Allow,
}

/// The behaviour of one port, all keys resolved.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `"*"` or the port number, for `explain` and logs.
    pub port: String,
    pub cors: Cors,
    /// The origins `permissive` grants; required with it (checked at load).
    pub allow_origins: Option<AllowOrigins>,
    /// `Access-Control-Allow-Private-Network: true` on granted preflights that ask for it.
    pub allow_private_network: bool,
    pub embed: bool,
    /// `frame_ancestors` as configured (inherited like every key).
    pub frame_ancestors: Option<Vec<String>>,
    /// The one `Content-Security-Policy: frame-ancestors ...` value this port's responses
    /// carry, built once at load (see [`embed`]).
    pub csp: Option<http::HeaderValue>,
    pub rewrite_redirects: bool,
    pub inject_shim: bool,
    pub cookies: Cookies,
    pub service_workers: ServiceWorkers,
    /// Client `X-Cmux-*` headers let through to the upstream (lowercase names).
    pub pass_client_headers: Vec<HeaderName>,
    pub host_header: HostHeader,
    /// Who may reach the port once `[access]` exists (SPEC §12).
    pub access: crate::access::Visibility,
}

impl Default for Policy {
    /// The built-in policy (SPEC §10): safe for a VM nobody reviewed. The cmux preset
    /// (permissive CORS for the dashboard, embedding, the shim) is opt-in.
    fn default() -> Self {
        Policy {
            port: "*".into(),
            cors: Cors::Passthrough,
            allow_origins: None,
            allow_private_network: false,
            embed: false,
            frame_ancestors: None,
            csp: None,
            rewrite_redirects: true,
            inject_shim: false,
            cookies: Cookies::Host,
            service_workers: ServiceWorkers::EdgeOnly,
            pass_client_headers: Vec::new(),
            host_header: HostHeader::Preserve,
            access: crate::access::Visibility::Token,
        }
    }
}

impl Policy {
    pub fn passes_client_header(&self, name: &HeaderName) -> bool {
        self.pass_client_headers.iter().any(|h| h == name)
    }

    /// What `permissive` grants this Origin (bytes as sent). Nothing without `allow_origins`.
    pub fn grant(&self, origin: &[u8]) -> Grant {
        match &self.allow_origins {
            None => Grant::None,
            Some(list) => list.grant(origin),
        }
    }

    /// Recomputes what depends on other keys (the CSP); called after every merge.
    fn finish(mut self) -> Policy {
        self.csp = embed::frame_ancestors(&self);
        self
    }
}

/// The keys one `[[policy]]` table sets; unset keys inherit.
#[derive(Debug, Clone, Default)]
pub struct PolicyPatch {
    pub cors: Option<Cors>,
    pub allow_origins: Option<AllowOrigins>,
    pub allow_private_network: Option<bool>,
    pub embed: Option<bool>,
    pub frame_ancestors: Option<Vec<String>>,
    pub rewrite_redirects: Option<bool>,
    pub inject_shim: Option<bool>,
    pub cookies: Option<Cookies>,
    pub service_workers: Option<ServiceWorkers>,
    pub pass_client_headers: Option<Vec<HeaderName>>,
    pub host_header: Option<HostHeader>,
    pub access: Option<crate::access::Visibility>,
}

impl PolicyPatch {
    pub fn apply(&self, base: &Policy, port: String) -> Policy {
        Policy {
            port,
            cors: self.cors.unwrap_or(base.cors),
            allow_origins: self
                .allow_origins
                .clone()
                .or_else(|| base.allow_origins.clone()),
            allow_private_network: self
                .allow_private_network
                .unwrap_or(base.allow_private_network),
            embed: self.embed.unwrap_or(base.embed),
            frame_ancestors: self
                .frame_ancestors
                .clone()
                .or_else(|| base.frame_ancestors.clone()),
            csp: None,
            rewrite_redirects: self.rewrite_redirects.unwrap_or(base.rewrite_redirects),
            inject_shim: self.inject_shim.unwrap_or(base.inject_shim),
            cookies: self.cookies.unwrap_or(base.cookies),
            service_workers: self.service_workers.unwrap_or(base.service_workers),
            pass_client_headers: self
                .pass_client_headers
                .clone()
                .unwrap_or_else(|| base.pass_client_headers.clone()),
            host_header: self.host_header.unwrap_or(base.host_header),
            access: self.access.unwrap_or(base.access),
        }
        .finish()
    }
}

/// The default policy plus per-port overrides.
#[derive(Debug, Clone)]
pub struct Policies {
    default: Arc<Policy>,
    ports: HashMap<u16, Arc<Policy>>,
}

impl Policies {
    /// `default` is the `"*"` patch (if any), `ports` the per-port patches.
    pub fn new(default: Option<&PolicyPatch>, ports: &[(u16, PolicyPatch)]) -> Policies {
        let base = Policy::default();
        let default = Arc::new(match default {
            Some(p) => p.apply(&base, "*".into()),
            None => base.finish(),
        });
        let ports = ports
            .iter()
            .map(|(port, patch)| (*port, Arc::new(patch.apply(&default, port.to_string()))))
            .collect();
        Policies { default, ports }
    }

    pub fn for_port(&self, port: u16) -> &Arc<Policy> {
        self.ports.get(&port).unwrap_or(&self.default)
    }

    /// The `"*"` policy and every port policy, for checks at load.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Policy>> {
        std::iter::once(&self.default).chain(self.ports.values())
    }
}

impl Default for Policies {
    fn default() -> Self {
        Policies::new(None, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_over_allow() {
        let set = PortSet::new(&[(1, 65535)], &[(22, 22)]);
        assert!(set.allows(1));
        assert!(set.allows(65535));
        assert!(!set.allows(22));
        let set = PortSet::new(&[(3000, 3999)], &[]);
        assert!(!set.allows(80));
        assert!(set.allows(3000));
    }

    #[test]
    fn port_ranges_parse_strictly() {
        assert_eq!(parse_port_range("22"), Ok((22, 22)));
        assert_eq!(parse_port_range("1-65535"), Ok((1, 65535)));
        assert!(parse_port_range("0").is_err());
        assert!(parse_port_range("9-1").is_err());
        assert!(parse_port_range("x").is_err());
    }

    #[test]
    fn a_port_policy_inherits_what_it_does_not_set_from_star() {
        let star = PolicyPatch {
            cors: Some(Cors::Passthrough),
            host_header: Some(HostHeader::Upstream),
            ..Default::default()
        };
        let vscode = PolicyPatch {
            cors: Some(Cors::Strip),
            frame_ancestors: Some(vec!["'self'".into(), "https://a.example".into()]),
            ..Default::default()
        };
        let p = Policies::new(Some(&star), &[(39378, vscode)]);
        let vs = p.for_port(39378);
        assert_eq!(vs.cors, Cors::Strip);
        assert_eq!(vs.host_header, HostHeader::Upstream);
        assert_eq!(
            vs.csp.as_ref().map(|v| v.to_str().unwrap()),
            Some("frame-ancestors 'self' https://a.example")
        );
        assert_eq!(p.for_port(5173).cors, Cors::Passthrough);
    }

    #[test]
    fn the_built_in_policy_is_the_safe_one() {
        let p = Policies::default();
        let d = p.for_port(5173);
        assert_eq!(d.cors, Cors::Passthrough);
        assert!(!d.embed && !d.inject_shim && d.rewrite_redirects);
        assert_eq!(d.cookies, Cookies::Host);
        assert_eq!(d.service_workers, ServiceWorkers::EdgeOnly);
        assert!(!d.allow_private_network);
        assert!(d.csp.is_none());
    }
}
