//! The admin listener (SPEC §7): `/healthz`, `/readyz`, `/metrics`, and behind a bearer
//! token `/api/vms` and the activity of SPEC §13 (`/api/vms/{id}/activity`,
//! `/api/activity?idle_for=`).
//! Never served on the public listeners, so no preview host can shadow or reach it.
//!
//! Only `Host` values that are an IP literal, `localhost`, or listed in `[admin] hosts` are
//! answered (SPEC §10): a page whose own name an attacker re-points at 127.0.0.1 (DNS
//! rebinding) still sends its own name as `Host`, and gets 421. A request without any `Host`
//! is not a browser's and is answered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::edge::Edge;
use crate::registry::{PutError, VmSpec};
use crate::tls::SniResolver;

/// Largest `PUT /api/vms/{id}` body accepted.
const MAX_BODY: usize = 64 * 1024;

/// What `/readyz` checks.
pub struct Readiness {
    /// Set once the proxy service is up.
    pub serving: AtomicBool,
    /// With an `https` listener: at least one certificate must be loaded.
    pub tls: Option<Arc<SniResolver>>,
    /// With `[tls.acme]`: every one of these names must have a certificate.
    pub acme_domains: Vec<String>,
}

impl Readiness {
    /// `None` when ready, else every reason why not, joined with "; ".
    pub fn not_ready(&self) -> Option<String> {
        let mut reasons = Vec::new();
        if !self.serving.load(Ordering::Acquire) {
            reasons.push("listeners not started".to_owned());
        }
        if let Some(r) = &self.tls {
            let store = r.store();
            if store.is_empty() {
                reasons.push("no TLS certificate loaded".to_owned());
            }
            let missing: Vec<&str> = self
                .acme_domains
                .iter()
                .filter(|d| !store.infos().iter().any(|i| i.names.contains(*d)))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                reasons.push(format!("no certificate yet for {}", missing.join(", ")));
            }
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }
}

pub struct Admin {
    pub readiness: Arc<Readiness>,
    pub edge: Arc<Edge>,
}

type Answer = (StatusCode, &'static str, Vec<u8>);

fn text(status: StatusCode, body: impl Into<String>) -> Answer {
    let mut b = body.into();
    b.push('\n');
    (status, "text/plain; charset=utf-8", b.into_bytes())
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Answer {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    (status, "application/json", body)
}

/// Compares the SHA-256 digests of both, every byte of them: the work is the same whatever
/// the lengths and wherever they differ, so response timing says nothing about the token
/// (hashing the given value costs time in its own length, which the client knows already).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (token_digest(a), token_digest(b));
    da.iter().zip(&db).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fixed-length stand-in for a token of any length.
fn token_digest(t: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, t).as_ref());
    out
}

impl Admin {
    fn authorized(&self, session: &ServerSession) -> Result<(), Answer> {
        let generation = self.edge.current();
        let Some(token) = generation.config.admin.token.as_deref() else {
            return Err(text(
                StatusCode::UNAUTHORIZED,
                "admin API disabled: set [admin] token",
            ));
        };
        let given = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // RFC 9110 §11.1: the scheme name is case-insensitive.
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, t)| t);
        if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(text(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token",
            ))
        }
    }

    async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Answer> {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    body.extend_from_slice(&chunk);
                    if body.len() > MAX_BODY {
                        return Err(text(StatusCode::PAYLOAD_TOO_LARGE, "body over 64 KiB"));
                    }
                }
                Ok(None) => return Ok(body),
                Err(e) => {
                    return Err(text(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read body: {e}"),
                    ))
                }
            }
        }
    }

    async fn api(&self, session: &mut ServerSession, path: &str) -> Answer {
        if let Err(a) = self.authorized(session) {
            return a;
        }
        if let Some(answer) = self.activity(session, path) {
            return answer;
        }
        let vms = &self.edge.admin_vms;
        let method = session.req_header().method.clone();
        let id = path.strip_prefix("/api/vms/").filter(|s| !s.is_empty());
        match (method, id) {
            (Method::GET, None) if path == "/api/vms" => json(StatusCode::OK, &vms.list()),
            (Method::GET, Some(id)) => match vms.get(id) {
                Some(spec) => json(StatusCode::OK, &spec),
                None => text(StatusCode::NOT_FOUND, format!("unknown vm {id}")),
            },
            (Method::PUT, Some(id)) => {
                let body = match Self::read_body(session).await {
                    Ok(b) => b,
                    Err(a) => return a,
                };
                let spec: VmSpec = match serde_json::from_slice(&body) {
                    Ok(s) => s,
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
                };
                match vms.put(id, spec.clone()) {
                    Ok(true) => json(StatusCode::CREATED, &spec),
                    Ok(false) => json(StatusCode::OK, &spec),
                    Err(PutError::Invalid(why)) => {
                        text(StatusCode::BAD_REQUEST, format!("invalid vm: {why}"))
                    }
                    Err(PutError::State(e)) => {
                        tracing::error!("{e}");
                        text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "cannot persist the change; nothing was applied",
                        )
                    }
                }
            }
            (Method::DELETE, Some(id)) => match vms.delete(id) {
                Ok(true) => (
                    StatusCode::NO_CONTENT,
                    "text/plain; charset=utf-8",
                    Vec::new(),
                ),
                Ok(false) => text(StatusCode::NOT_FOUND, format!("unknown vm {id}")),
                Err(e) => {
                    tracing::error!("{e}");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "cannot persist the change; nothing was applied",
                    )
                }
            },
            (_, _) if path == "/api/vms" || id.is_some() => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    }
}

/// The `Host` (or `:authority`) of an admin request: `None` when it has none.
fn host_of(session: &ServerSession) -> Option<&str> {
    let req = session.req_header();
    req.uri.authority().map(|a| a.as_str()).or_else(|| {
        req.headers
            .get(header::HOST)
            .map(|v| v.to_str().unwrap_or("\u{0}"))
    })
}

/// An IP literal (`10.0.0.1`, `[::1]`), `localhost`, or one of `hosts` (lowercase), each with
/// an optional port.
pub fn admin_host_allowed(host: &str, hosts: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        return ip.parse::<std::net::Ipv6Addr>().is_ok() && port_ok(after);
    } else {
        match host.split_once(':') {
            Some((name, port)) if port_ok(&host[name.len()..]) && !port.contains(':') => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Empty, or `:` and 1-5 digits.
fn port_ok(s: &str) -> bool {
    s.is_empty()
        || s.strip_prefix(':')
            .is_some_and(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

impl Admin {
    /// `GET /api/vms/{id}/activity` and `GET /api/activity[?idle_for=10m]`; `None` for any
    /// other path.
    fn activity(&self, session: &ServerSession, path: &str) -> Option<Answer> {
        let req = session.req_header();
        let one = path
            .strip_prefix("/api/vms/")
            .and_then(|p| p.strip_suffix("/activity"));
        if one.is_none() && path != "/api/activity" {
            return None;
        }
        if req.method != Method::GET {
            return Some(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"));
        }
        let activity = &self.edge.activity;
        if let Some(id) = one {
            return Some(match activity.get(id) {
                Some(report) => json(StatusCode::OK, &report),
                None => text(
                    StatusCode::NOT_FOUND,
                    format!("no activity recorded for vm {id}"),
                ),
            });
        }
        let idle_for = req
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("idle_for="));
        let idle_for = match idle_for.map(crate::config::parse_duration).transpose() {
            Ok(d) => d,
            Err(e) => return Some(text(StatusCode::BAD_REQUEST, format!("idle_for: {e}"))),
        };
        let vms = activity.list(idle_for);
        Some(json(
            StatusCode::OK,
            &serde_json::json!({
                "idle_for_seconds": idle_for.map(|d| d.as_secs()),
                "vms": vms,
            }),
        ))
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_owned();
        let hosts = &self.edge.current().config.admin.hosts;
        let host_ok = host_of(session).is_none_or(|h| admin_host_allowed(h, hosts));
        let (status, content_type, body) = match path.as_str() {
            _ if !host_ok => text(
                StatusCode::MISDIRECTED_REQUEST,
                "admin listener: Host not allowed (IP literal, localhost, or [admin] hosts)",
            ),
            "/healthz" => text(StatusCode::OK, "ok"),
            "/readyz" => match self.readiness.not_ready() {
                None => text(StatusCode::OK, "ready"),
                Some(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}"),
                ),
            },
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::METRICS.render(),
            ),
            p if p.starts_with("/api/") => self.api(session, p).await,
            _ => text(StatusCode::NOT_FOUND, "not found"),
        };
        let len = body.len();
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        h.insert(header::CONTENT_LENGTH, len.into());
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::{admin_host_allowed, constant_time_eq, token_digest};

    #[test]
    fn the_admin_listener_answers_ip_literals_localhost_and_listed_hosts_only() {
        let hosts = vec!["edge-admin.cmux.svc".to_owned()];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9180",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:9180",
            "[fe80::1]:1",
            "localhost",
            "LOCALHOST:9180",
            "localhost.",
            "edge-admin.cmux.svc",
            "Edge-Admin.cmux.svc:9180",
        ] {
            assert!(admin_host_allowed(ok, &hosts), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9180",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "::1",
            "[::1",
            "[::1]x",
            "[evil]:1",
            "127.0.0.1:",
            "127.0.0.1:123456",
            "127.0.0.1:80:80",
            "",
            "\u{0}",
            "cmux.svc",
        ] {
            assert!(!admin_host_allowed(bad, &hosts), "{bad}");
        }
    }

    #[test]
    fn token_compare_needs_every_byte_and_the_length() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"S3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret!", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
    }

    #[test]
    fn tokens_of_every_length_compare_as_the_same_fixed_size() {
        // No length check to return early on: both sides become 32 bytes first.
        let short = token_digest(b"");
        let long = token_digest(&[b'x'; 4096]);
        assert_eq!(short.len(), long.len());
        assert_ne!(short, long);
        assert!(constant_time_eq(&[b'x'; 4096], &[b'x'; 4096]));
    }
}
