//! Preview access control (SPEC §12): control-plane tokens checked locally, turned into a
//! host-only session cookie of the edge's own; per-port visibility; revocation by epoch.
//!
//! The gate runs after the registry answered (revocation needs the VM's `access_epoch`) and
//! before anything is proxied, so a WebSocket is refused before its 101. In order:
//!
//! 1. no `[access]`, or the port's policy says `access = "public"`: let through;
//! 2. `?cmux_token=<jws>`: verify it; **302** to the same URL without it (and without
//!    `cmux_embed`), with `Set-Cookie` for the session;
//! 3. `X-Cmux-Token: <jws>` (automation): verify it, no cookie;
//! 4. the session cookie: verify its MAC, VM, port, expiry and epoch.
//!
//! Otherwise **401** `preview access denied: <reason>`.
//!
//! Cost per request: on the common path (a cookie) one HMAC-SHA256 over ~40 bytes and a scan
//! of the `Cookie` header, no allocation ([`session`]); a token costs one signature
//! verification and a small JSON parse ([`token`]). [`Access::strip`] then removes the edge's
//! credentials from what the VM receives, touching nothing else.

pub mod session;
pub mod token;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderValue};
use pingora::http::RequestHeader;

use crate::metrics::METRICS;
use crate::policy::Policy;
use crate::registry::Vm;
use crate::respond::{Answer, Refusal, Reply};
use crate::tls::settings::Secret;
use session::{Granted, SessionKey};
pub use token::{AllPorts, Claims, KeyError, Ports};

/// The query parameter that carries a token to exchange.
pub const TOKEN_PARAM: &str = "cmux_token";
/// The query parameter that asks for an iframe-ready (`SameSite=None; Partitioned`) cookie.
pub const EMBED_PARAM: &str = "cmux_embed";
/// The header automation sends a token in.
pub const TOKEN_HEADER: &str = "x-cmux-token";
/// The session cookie's default name.
pub const DEFAULT_COOKIE: &str = "cmux_edge_session";
/// The prefix browsers enforce as `Secure`, `Path=/`, no `Domain` (RFC 6265bis §4.1.3.2).
const HOST_PREFIX: &str = "__Host-";

/// `[access]` (SPEC §12).
#[derive(Debug, Clone)]
pub struct AccessSettings {
    pub keys: Vec<KeySettings>,
    /// Lifetime of the edge's session cookie.
    pub session: Duration,
    /// Cookie name; `__Host-` is prefixed on HTTPS.
    pub cookie: String,
    /// The key sessions are signed with; default: derived from the first HS256 key.
    pub session_secret: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct KeySettings {
    pub id: String,
    pub source: KeySource,
}

#[derive(Debug, Clone)]
pub enum KeySource {
    /// HS256.
    Secret(Secret),
    /// EdDSA: an Ed25519 public key, PEM (SubjectPublicKeyInfo).
    Ed25519Pem(Vec<u8>),
}

/// Decodes one key as the gate will, for config validation.
pub fn check_key(k: &KeySettings) -> Result<(), String> {
    token::Key::new(k).map(|_| ()).map_err(|e| e.to_string())
}

/// Per-port visibility (`[[policy]] access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Visibility {
    /// A token or the edge's session is needed (the default once `[access]` exists).
    #[default]
    Token,
    /// Anyone may reach the port.
    Public,
}

/// Why access was denied: the `<reason>` of the 401 (SPEC §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    Missing,
    Expired,
    WrongVm,
    WrongPort,
    BadSignature,
    Revoked,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Missing => "missing",
            DenyReason::Expired => "expired",
            DenyReason::WrongVm => "wrong vm",
            DenyReason::WrongPort => "wrong port",
            DenyReason::BadSignature => "bad signature",
            DenyReason::Revoked => "revoked",
        }
    }

    /// The index of this reason in the metric's outcome list.
    fn outcome(self) -> usize {
        4 + self as usize
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a request that passed was let through (indexes `cmux_edge_access_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Passed {
    Session = 0,
    Header = 1,
    Public = 3,
}

/// The gate of one config generation: nothing without `[access]`.
pub struct Access(Option<Active>);

struct Active {
    keys: Vec<token::Key>,
    session_key: SessionKey,
    session: Duration,
    /// The cookie's name on plain HTTP and on HTTPS (`__Host-` prefixed).
    cookie_http: String,
    cookie_https: String,
}

/// Where the request stands, as the gate needs it.
struct Preview<'a> {
    vm: &'a Vm,
    port: u16,
    /// Over our TLS, or a trusted proxy says so.
    https: bool,
    /// The configured domain the host is under (`localhost` development is plain HTTP).
    domain: &'a str,
}

impl Access {
    /// Everything public: no `[access]`.
    pub fn off() -> Access {
        Access(None)
    }

    /// Decodes the keys once per generation. `check` has validated them already; a key that
    /// still fails here fails the build, never opens the gate.
    pub fn new(settings: Option<&AccessSettings>) -> Result<Access, KeyError> {
        let Some(s) = settings else {
            return Ok(Access(None));
        };
        let keys = s
            .keys
            .iter()
            .map(token::Key::new)
            .collect::<Result<Vec<_>, _>>()?;
        let secret = match &s.session_secret {
            Some(secret) => secret.0.as_slice(),
            None => keys.iter().find_map(|k| k.secret()).ok_or_else(|| {
                KeyError::Invalid(
                    "session_secret".into(),
                    "needed when no HS256 key is listed".into(),
                )
            })?,
        };
        Ok(Access(Some(Active {
            session_key: SessionKey::derive(secret),
            keys,
            session: s.session,
            cookie_https: format!("{HOST_PREFIX}{}", s.cookie),
            cookie_http: s.cookie.clone(),
        })))
    }

    /// Every private port refused: no key, and a session key nobody knows.
    pub fn closed() -> Access {
        let secret: [u8; 32] = std::array::from_fn(|_| fastrand::u8(..));
        Access(Some(Active {
            keys: Vec::new(),
            session_key: SessionKey::derive(&secret),
            session: Duration::from_secs(1),
            cookie_http: DEFAULT_COOKIE.to_owned(),
            cookie_https: format!("{HOST_PREFIX}{DEFAULT_COOKIE}"),
        }))
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// The gate (SPEC §12): `Ok` lets the request through; otherwise a 401, or the
    /// exchange's 302 with the session cookie. `https`: over our TLS or a trusted proxy's;
    /// `domain`: the configured domain of the host (plain-HTTP `localhost` is development).
    pub fn check(
        &self,
        req: &RequestHeader,
        policy: &Policy,
        vm: &Vm,
        port: u16,
        https: bool,
        domain: &str,
    ) -> Result<(), Answer> {
        let Some(a) = &self.0 else { return Ok(()) };
        let at = &Preview {
            vm,
            port,
            https,
            domain,
        };
        let result = if policy.access == Visibility::Public {
            Ok(Passed::Public)
        } else {
            a.decide(req, at, unix_now())
        };
        match result {
            Ok(passed) => {
                METRICS.access(passed as usize);
                Ok(())
            }
            Err(Decision::Exchange(reply)) => {
                METRICS.access(2);
                Err(Answer::Reply(reply))
            }
            Err(Decision::Deny(reason)) => {
                METRICS.access(reason.outcome());
                Err(Answer::Refuse(Refusal::AccessDenied(reason)))
            }
        }
    }

    /// Removes the edge's credentials from the upstream request: its cookie (the VM's own
    /// cookies stay byte for byte), `X-Cmux-Token`, and the `cmux_token` / `cmux_embed`
    /// query parameters. The VM's own `Authorization` is never looked at.
    pub fn strip(&self, req: &mut RequestHeader) {
        let Some(a) = &self.0 else { return };
        req.remove_header(TOKEN_HEADER);
        let ours = |name: &str| name == a.cookie_http || name == a.cookie_https;
        let needle = a.cookie_http.as_bytes();
        let mentions = !needle.is_empty()
            && req
                .headers
                .get_all(header::COOKIE)
                .iter()
                .any(|v| v.as_bytes().windows(needle.len()).any(|w| w == needle));
        if mentions {
            let values: Vec<HeaderValue> = req
                .headers
                .get_all(header::COOKIE)
                .iter()
                .cloned()
                .collect();
            req.remove_header(&header::COOKIE);
            for v in values {
                match without_cookie(v.as_bytes(), &ours) {
                    Some(kept) if kept.is_empty() => {}
                    Some(kept) => {
                        if let Ok(kept) = HeaderValue::from_bytes(&kept) {
                            let _ = req.append_header(header::COOKIE, kept);
                        }
                    }
                    None => {
                        let _ = req.append_header(header::COOKIE, v);
                    }
                }
            }
        }
        if let Some(query) = req.uri.query() {
            if has_param(query, TOKEN_PARAM) || has_param(query, EMBED_PARAM) {
                let target = without_params(req.uri.path(), query);
                if let Ok(uri) = target.parse::<http::Uri>() {
                    req.set_uri(uri);
                }
            }
        }
    }

    /// A token for `cmux-edge token`, signed with HS256 key `kid` (default: the first).
    pub fn mint(&self, kid: Option<&str>, claims: &Claims) -> Result<String, KeyError> {
        match &self.0 {
            Some(a) => token::sign(&a.keys, kid, claims),
            None => Err(KeyError::Unknown(kid.unwrap_or("(no [access])").to_owned())),
        }
    }

    /// Checks a session cookie value now (benchmarks); `Ok` when the gate would accept it.
    pub fn check_session_value(
        &self,
        value: &str,
        vm: &str,
        port: u16,
        epoch: u64,
    ) -> Result<(), DenyReason> {
        let a = self.0.as_ref().ok_or(DenyReason::Missing)?;
        session::check(&a.session_key, value, vm, port, epoch, unix_now())
    }

    /// A session cookie value, as the exchange would set it (benchmarks, tests).
    pub fn session_value(&self, vm: &str, port: u16, expires: u64, epoch: u64) -> Option<String> {
        let a = self.0.as_ref()?;
        Some(session::mint(
            &a.session_key,
            vm,
            Granted::Port(port),
            expires,
            epoch,
        ))
    }
}

/// Not let through as is.
enum Decision {
    Exchange(Reply),
    Deny(DenyReason),
}

impl From<DenyReason> for Decision {
    fn from(r: DenyReason) -> Decision {
        Decision::Deny(r)
    }
}

impl Active {
    fn decide(&self, req: &RequestHeader, at: &Preview<'_>, now: u64) -> Result<Passed, Decision> {
        let (vm, port, epoch) = (at.vm.id.as_str(), at.port, at.vm.access_epoch);
        if let Some(query) = req.uri.query() {
            if let Some(jws) = param(query, TOKEN_PARAM) {
                let claims = token::verify(&self.keys, jws)?;
                admit_claims(&claims, vm, port, epoch)?;
                return Err(Decision::Exchange(self.exchange(req, at, &claims, now)));
            }
        }
        if let Some(jws) = req.headers.get(TOKEN_HEADER) {
            let jws = jws.to_str().map_err(|_| DenyReason::BadSignature)?;
            let claims = token::verify(&self.keys, jws.trim())?;
            admit_claims(&claims, vm, port, epoch)?;
            return Ok(Passed::Header);
        }
        let name = if at.https {
            &self.cookie_https
        } else {
            &self.cookie_http
        };
        // Several cookies of our name (one planted by a sibling host over plain HTTP): any
        // valid one will do; otherwise the first one's reason.
        let mut first_error = None;
        for value in cookies(req, name) {
            match session::check(&self.session_key, value, vm, port, epoch, now) {
                Ok(()) => return Ok(Passed::Session),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(DenyReason::Missing).into())
    }

    /// The 302 to the URL without the token, setting the session.
    fn exchange(&self, req: &RequestHeader, at: &Preview<'_>, claims: &Claims, now: u64) -> Reply {
        let query = req.uri.query().unwrap_or("");
        let embed = param(query, EMBED_PARAM).is_some_and(|v| v == "1" || v == "true");
        let granted = match claims.ports {
            Ports::All(_) => Granted::Every,
            Ports::List(_) => Granted::Port(at.port),
        };
        let epoch = claims.epoch.unwrap_or(0).max(at.vm.access_epoch);
        let expires = now.saturating_add(self.session.as_secs());
        let value = session::mint(&self.session_key, &at.vm.id, granted, expires, epoch);
        let localhost_dev =
            !at.https && (at.domain == "localhost" || at.domain.ends_with(".localhost"));
        let name = if at.https {
            &self.cookie_https
        } else {
            &self.cookie_http
        };
        let mut cookie = format!(
            "{name}={value}; Max-Age={}; Path=/; HttpOnly",
            self.session.as_secs()
        );
        if embed {
            // SameSite=None is only accepted with Secure; Partitioned (CHIPS) keeps it usable
            // in the dashboard's iframe when third-party cookies are blocked.
            cookie.push_str("; Secure; SameSite=None; Partitioned");
        } else if localhost_dev {
            cookie.push_str("; SameSite=Lax");
        } else {
            cookie.push_str("; Secure; SameSite=Lax");
        }
        let location = without_params(req.uri.path(), query);
        let mut reply = Reply::redirect(302, &location, "access_exchange");
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            let _ = reply.head.insert_header(header::SET_COOKIE, v);
        }
        let _ = reply.head.insert_header("referrer-policy", "no-referrer");
        reply
    }
}

/// A token is for this VM, this port, and not older than the VM's epoch.
fn admit_claims(c: &Claims, vm: &str, port: u16, epoch: u64) -> Result<(), DenyReason> {
    if c.vm != vm {
        return Err(DenyReason::WrongVm);
    }
    if c.epoch.unwrap_or(0) < epoch {
        return Err(DenyReason::Revoked);
    }
    if !c.ports.allows(port) {
        return Err(DenyReason::WrongPort);
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The values of every cookie named `name`, from every `Cookie` header.
fn cookies<'r>(req: &'r RequestHeader, name: &'r str) -> impl Iterator<Item = &'r str> + 'r {
    req.headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (n, v) = pair.trim().split_once('=')?;
            (n.trim() == name).then(|| v.trim().trim_matches('"'))
        })
}

/// A `Cookie` header value without the pairs `ours` names; `None` when it had none of them.
/// The other pairs keep their bytes and their separators.
fn without_cookie(value: &[u8], ours: &dyn Fn(&str) -> bool) -> Option<Vec<u8>> {
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut removed = false;
    for pair in value.split(|&b| b == b';') {
        let name = pair.split(|&b| b == b'=').next().unwrap_or_default();
        match std::str::from_utf8(name) {
            Ok(n) if ours(n.trim()) => removed = true,
            _ => kept.push(pair),
        }
    }
    if !removed {
        return None;
    }
    let mut out = kept.join(&b';');
    let lead = out.iter().take_while(|b| b.is_ascii_whitespace()).count();
    out.drain(..lead);
    Some(out)
}

/// The value of query parameter `name` (raw, as sent).
fn param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|p| {
        let (n, v) = p.split_once('=').unwrap_or((p, ""));
        (n == name).then_some(v)
    })
}

fn has_param(query: &str, name: &str) -> bool {
    query.contains(name) && param(query, name).is_some()
}

/// `path?query` without the edge's parameters; the others keep their order and bytes.
fn without_params(path: &str, query: &str) -> String {
    let mut out = String::with_capacity(path.len() + query.len() + 1);
    out.push_str(if path.is_empty() { "/" } else { path });
    let mut first = true;
    for p in query.split('&') {
        let n = p.split_once('=').map_or(p, |(n, _)| n);
        if n == TOKEN_PARAM || n == EMBED_PARAM || p.is_empty() {
            continue;
        }
        out.push(if first { '?' } else { '&' });
        out.push_str(p);
        first = false;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edge_parameters_leave_the_url_and_the_others_keep_their_order() {
        assert_eq!(
            without_params("/a/b", "x=1&cmux_token=abc.def.ghi&y=2&cmux_embed=1&z"),
            "/a/b?x=1&y=2&z"
        );
        assert_eq!(without_params("/", "cmux_token=t"), "/");
        assert_eq!(without_params("/p", "cmux_tokenx=1"), "/p?cmux_tokenx=1");
    }

    #[test]
    fn only_the_edge_cookie_leaves_the_cookie_header() {
        let ours = |n: &str| n == "cmux_edge_session" || n == "__Host-cmux_edge_session";
        assert_eq!(
            without_cookie(b"a=1; cmux_edge_session=x; b=\"2\";c=3", &ours).unwrap(),
            b"a=1; b=\"2\";c=3"
        );
        assert_eq!(
            without_cookie(b"__Host-cmux_edge_session=x; a=1", &ours).unwrap(),
            b"a=1"
        );
        assert_eq!(without_cookie(b"cmux_edge_session=x", &ours).unwrap(), b"");
        assert_eq!(without_cookie(b"a=1; cmux_edge_sessionx=2", &ours), None);
    }

    #[test]
    fn a_token_must_name_this_vm_this_port_and_a_current_epoch() {
        let c = Claims {
            vm: "b1".into(),
            ports: Ports::List(vec![3000]),
            exp: 0,
            nbf: None,
            iat: None,
            sub: None,
            epoch: Some(1),
        };
        assert_eq!(admit_claims(&c, "b1", 3000, 1), Ok(()));
        assert_eq!(admit_claims(&c, "b2", 3000, 1), Err(DenyReason::WrongVm));
        assert_eq!(admit_claims(&c, "b1", 3001, 1), Err(DenyReason::WrongPort));
        assert_eq!(admit_claims(&c, "b1", 3000, 2), Err(DenyReason::Revoked));
        let all = Claims {
            ports: Ports::All(AllPorts),
            ..c
        };
        assert_eq!(admit_claims(&all, "b1", 1, 0), Ok(()));
    }

    #[test]
    fn a_closed_gate_refuses_and_strips_without_panicking() {
        let closed = Access::closed();
        let mut req = RequestHeader::build("GET", b"/?cmux_token=x", None).unwrap();
        req.append_header("cookie", "cmux_edge_session=x; a=1")
            .unwrap();
        let vm = Vm {
            id: "b1".into(),
            address: crate::registry::Address::Ip([10, 0, 0, 1].into()),
            ports: Default::default(),
            scheme: crate::registry::Scheme::Http,
            unresolvable_is_unknown: false,
            tls_server_name: None,
            tls_verify: true,
            self_reported: false,
            access_epoch: 0,
            state: Default::default(),
        };
        let r = closed.check(&req, &Policy::default(), &vm, 80, false, "example.com");
        assert!(matches!(r, Err(Answer::Refuse(Refusal::AccessDenied(_)))));
        closed.strip(&mut req);
        assert_eq!(req.headers.get("cookie").unwrap(), "a=1");
        assert_eq!(req.uri, "/");
    }

    #[test]
    fn ports_are_a_list_or_a_star() {
        let p: Ports = serde_json::from_str("\"*\"").unwrap();
        assert_eq!(p, Ports::All(AllPorts));
        let p: Ports = serde_json::from_str("[1, 2]").unwrap();
        assert_eq!(p, Ports::List(vec![1, 2]));
        assert!(serde_json::from_str::<Ports>("\"all\"").is_err());
    }
}
