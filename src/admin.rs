//! The admin listener (SPEC §7): `/healthz` and `/readyz`. Never served on the public
//! listeners, so no preview host can shadow or reach it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::tls::SniResolver;

/// What `/readyz` checks.
pub struct Readiness {
    /// Set once the proxy service is up.
    pub serving: AtomicBool,
    /// With an `https` listener: at least one certificate must be loaded.
    pub tls: Option<Arc<SniResolver>>,
}

impl Readiness {
    /// `None` when ready, else the reason.
    pub fn not_ready(&self) -> Option<String> {
        if !self.serving.load(Ordering::Acquire) {
            return Some("listeners not started".into());
        }
        if let Some(r) = &self.tls {
            if r.store().is_empty() {
                return Some("no TLS certificate loaded".into());
            }
        }
        None
    }
}

pub struct Admin {
    pub readiness: Arc<Readiness>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, body) = match session.req_header().uri.path() {
            "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
            "/readyz" => match self.readiness.not_ready() {
                None => (StatusCode::OK, "ready\n".to_owned()),
                Some(reason) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            },
            _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
        };
        let body = body.into_bytes();
        let len = body.len();
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CONTENT_LENGTH, len.into());
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        resp
    }
}
