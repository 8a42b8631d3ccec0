//! Answers cmux-edge gives itself instead of proxying: the statuses and one-line bodies of
//! SPEC §3–§5, always `text/plain; charset=utf-8` with an `X-Request-Id`, and the other
//! complete answers of the edge (apex, preflights, redirects, `/proxy-sw.js`).
//!
//! Gates decide and return an [`Answer`]; [`send`] is the one place that writes it.
//! `response_filter` does not run for answers written here, so everything they need is set
//! when they are built.

use std::num::NonZeroU32;

use bytes::Bytes;
use http::{header, StatusCode};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::access::DenyReason;
use crate::forward::X_REQUEST_ID;
use crate::limits::LimitKind;
use crate::metrics::METRICS;
use crate::route::RouteError;

/// What a gate answers instead of letting the request through.
#[derive(Debug)]
pub enum Answer {
    /// A refusal with its SPEC status and one-line body.
    Refuse(Refusal),
    /// Any other complete answer the edge writes itself.
    Reply(Reply),
}

/// A complete response: head, body, and the access log's `refusal` field.
#[derive(Debug)]
pub struct Reply {
    pub head: Box<ResponseHeader>,
    pub body: Option<Bytes>,
    /// Why the edge answered (bounded set, for the access log).
    pub kind: &'static str,
}

impl Reply {
    /// `status` with a body of `content_type`, `Content-Length`, `Cache-Control: no-store`.
    pub fn body(status: u16, content_type: &'static str, body: Bytes, kind: &'static str) -> Reply {
        let mut head = head(status);
        let _ = head.insert_header(header::CONTENT_TYPE, content_type);
        let _ = head.insert_header(header::CONTENT_LENGTH, body.len());
        let _ = head.insert_header(header::CACHE_CONTROL, "no-store");
        Reply {
            head: Box::new(head),
            body: Some(body),
            kind,
        }
    }

    /// A one-line `text/plain` answer.
    pub fn text(status: u16, body: impl Into<Bytes>, kind: &'static str) -> Reply {
        Reply::body(status, "text/plain; charset=utf-8", body.into(), kind)
    }

    /// A bodiless redirect (`308` keeps method and body, like Caddy's HTTP→HTTPS redirect).
    pub fn redirect(status: u16, location: &str, kind: &'static str) -> Reply {
        let mut head = head(status);
        let _ = head.insert_header(header::LOCATION, location);
        let _ = head.insert_header(header::CONTENT_LENGTH, 0);
        let _ = head.insert_header(header::CACHE_CONTROL, "no-store");
        Reply {
            head: Box::new(head),
            body: None,
            kind,
        }
    }

    /// A head built elsewhere (a CORS preflight), sent without a body.
    pub fn head(head: ResponseHeader, kind: &'static str) -> Reply {
        Reply {
            head: Box::new(head),
            body: None,
            kind,
        }
    }
}

fn head(status: u16) -> ResponseHeader {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    ResponseHeader::from(parts)
}

impl From<Refusal> for Answer {
    fn from(r: Refusal) -> Answer {
        Answer::Refuse(r)
    }
}

impl From<Reply> for Answer {
    fn from(r: Reply) -> Answer {
        Answer::Reply(r)
    }
}

impl Answer {
    /// The access log's `refusal` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Answer::Refuse(r) => r.kind(),
            Answer::Reply(r) => r.kind,
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Answer::Refuse(r) => r.status().as_u16(),
            Answer::Reply(r) => r.head.status.as_u16(),
        }
    }
}

/// Not a failure: the client's answer is complete, proxying stops (the HEAD → GET fallback once
/// its head is out). Nothing more is written.
pub const ANSWERED: pingora::ErrorType = pingora::ErrorType::Custom("answered");

/// What to answer when proxying failed (`fail_to_proxy`): 502/504 for the upstream (counted
/// in `upstream_errors`), 400 for a malformed request, 500 for anything else. `None` when the
/// client is gone or timed out: nobody to answer. `target` is the VM id and port, when routed.
pub fn for_error(e: &pingora::Error, target: Option<(&str, u16)>) -> Option<Answer> {
    use pingora::{ErrorSource, ErrorType};
    let refusal = match (e.esource(), e.etype(), target) {
        (_, etype, _) if *etype == ANSWERED => return None,
        (_, etype, _) if *etype == crate::rewrite::REWRITE_BUSY => {
            return Some(Refusal::RewriteBusy.into())
        }
        (_, etype, Some((id, port))) if *etype == crate::rewrite::REWRITE_LIMIT => {
            let id = id.to_owned();
            return Some(Refusal::RewriteLimit { id, port }.into());
        }
        (_, ErrorType::HTTPStatus(code), _) => {
            let reason = StatusCode::from_u16(*code)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error");
            return Some(Reply::text(*code, format!("{reason}\n"), "http_status").into());
        }
        (ErrorSource::Upstream, etype, Some((id, port))) => match etype {
            ErrorType::ConnectTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
            | ErrorType::TLSHandshakeTimedout => Refusal::Timeout {
                id: id.to_owned(),
                port,
            },
            _ => Refusal::Unreachable {
                id: id.to_owned(),
                port,
            },
        },
        (
            ErrorSource::Downstream,
            ErrorType::WriteError
            | ErrorType::ReadError
            | ErrorType::ConnectionClosed
            | ErrorType::ReadTimedout,
            _,
        ) => return None,
        (ErrorSource::Downstream, _, _) => {
            return Some(Reply::text(400, "bad request\n", "bad_request").into())
        }
        _ => {
            tracing::error!(error = %e, "internal error");
            return Some(Reply::text(500, "internal error\n", "internal_error").into());
        }
    };
    Some(upstream_failure(refusal))
}

/// The 502/504 for an upstream that cannot be reached (`Unreachable`, `Timeout`), whether
/// the connect failed or the VM's name did not resolve: counted in `upstream_errors`, not
/// in `refusals`, and logged as a preview request.
pub fn upstream_failure(refusal: Refusal) -> Answer {
    let metric = if matches!(refusal, Refusal::Timeout { .. }) {
        "timeout"
    } else {
        "connect"
    };
    METRICS.upstream_errors.with_label_values(&[metric]).inc();
    Reply::text(refusal.status().as_u16(), refusal.body(), refusal.kind()).into()
}

/// Whether an answer's kind is an [`upstream_failure`]: the request was routed to a VM.
pub fn is_upstream_failure(kind: &str) -> bool {
    matches!(kind, "upstream_unreachable" | "upstream_timeout")
}

/// Writes `answer` with the request id, counts a refusal, and returns its kind.
pub async fn send(session: &mut Session, answer: Answer, request_id: &str) -> &'static str {
    let kind = answer.kind();
    let reply = match answer {
        Answer::Refuse(r) => {
            METRICS.refusals.with_label_values(&[r.kind()]).inc();
            if r == Refusal::Loop {
                METRICS.loop_rejections.inc();
            }
            let mut reply =
                if matches!(r, Refusal::AccessDenied(_)) && navigation(session.req_header()) {
                    Reply::body(401, "text/html; charset=utf-8", denied_page(&r), kind)
                } else {
                    Reply::text(r.status().as_u16(), r.body(), kind)
                };
            if let Some(secs) = r.retry_after() {
                let _ = reply.head.insert_header(header::RETRY_AFTER, secs.get());
            }
            if matches!(r, Refusal::AccessDenied(_)) {
                // RFC 9110 §15.5.2: a 401 names the scheme that would work (not Basic: no
                // browser prompt).
                let _ = reply
                    .head
                    .insert_header(header::WWW_AUTHENTICATE, "Cmux-Token realm=\"preview\"");
            }
            reply
        }
        Answer::Reply(r) => r,
    };
    write(session, reply, request_id).await;
    kind
}

/// While the process drains (SIGTERM/SIGINT/SIGQUIT), every HTTP/1 answer says
/// `Connection: close` and the connection closes after it, as nginx does: pingora closes
/// idle keep-alive connections when the drain starts, and a client told `keep-alive` would
/// otherwise send its next request into a connection about to close. Costs one atomic load.
pub fn close_when_draining(session: &mut Session) {
    if session.is_process_shutting_down() {
        session.set_keepalive(None);
    }
}

/// A browser loading a page (not a script's fetch): `Sec-Fetch-Mode: navigate`, or an
/// `Accept` that names `text/html` first.
fn navigation(req: &pingora::http::RequestHeader) -> bool {
    let header = |name| req.headers.get(name).and_then(|v| v.to_str().ok());
    header("sec-fetch-mode").is_some_and(|m| m.eq_ignore_ascii_case("navigate"))
        || header("accept").is_some_and(|a| a.trim_start().starts_with("text/html"))
}

/// The 401 as a small page, saying the same as the one-line body (no request data in it).
fn denied_page(r: &Refusal) -> Bytes {
    let line = r.body();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Preview access denied</title>\
         </head><body><h1>Preview access denied</h1><p>{}</p><p>Open this preview from its \
         dashboard again to get a fresh link.</p></body></html>\n",
        line.trim_end()
    )
    .into()
}

/// Writes a reply; a HEAD gets the headers only.
pub async fn write(session: &mut Session, mut reply: Reply, request_id: &str) {
    close_when_draining(session);
    if let Ok(id) = crate::forward::request_id_value(request_id) {
        let _ = reply.head.insert_header(X_REQUEST_ID, id);
    }
    let head = session.req_header().method == http::Method::HEAD;
    if session
        .write_response_header(reply.head, false)
        .await
        .is_ok()
    {
        let body = if head { None } else { reply.body };
        let _ = session.write_response_body(body, true).await;
    }
}

/// Why a request was not (or could not be) proxied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 421: the host is under no configured domain.
    #[error("misdirected request: {0} is not served here")]
    Misdirected(String),
    /// 400: under a domain, but not a valid preview host.
    #[error("invalid preview host: {0}")]
    InvalidHost(String),
    /// 400: no Host header and no :authority.
    #[error("invalid preview host: no host in request")]
    NoHost,
    /// 508: the request already went through a cmux proxy.
    #[error("Loop detected in proxy")]
    Loop,
    /// 403: `[ports]` does not allow this VM port.
    #[error("port {0} is not reachable")]
    PortDenied(u16),
    /// 403: `Service-Worker: script` for a worker the policy does not let register (SPEC §10).
    #[error("service worker not allowed")]
    ServiceWorker,
    /// 404: no registry knows the id.
    #[error("unknown vm {0}")]
    UnknownVm(String),
    /// 503: the registry could not answer (control plane down, no stale answer).
    #[error("registry unavailable for vm {0}")]
    RegistryUnavailable(String),
    /// 502: connect refused, reset, DNS failure, TLS failure.
    #[error("upstream unreachable: vm {id} port {port}")]
    Unreachable { id: String, port: u16 },
    /// 502: the registry's address (after DNS) is refused by `[upstreams]` (SPEC §10): the
    /// body does not say which address or why, that goes to the log.
    #[error("upstream address not allowed: vm {0}")]
    Egress(String),
    /// 504: the upstream did not connect or answer in time.
    #[error("upstream timeout: vm {id} port {port}")]
    Timeout { id: String, port: u16 },
    /// 414: the request target is longer than the edge forwards.
    #[error("request URI too long")]
    UriTooLong,
    /// 431: the request head is larger than the edge forwards.
    #[error("request header fields too large")]
    HeadTooLarge,
    /// 400: framing a VM could read differently (the header named).
    #[error("ambiguous request framing: {0}")]
    BadFraming(&'static str),
    /// 502: the page decoded past `[limits] rewrite_max` or 100:1 before anything was sent.
    #[error("upstream page too large to rewrite: vm {id} port {port}")]
    RewriteLimit { id: String, port: u16 },
    /// 503: every `[limits] rewrites` slot is taken by HTML being rewritten.
    #[error("busy rewriting other pages, retry")]
    RewriteBusy,
    /// 429 (SPEC §11): over a `[limits]` limit. `retry_after` is never 0: `Retry-After: 0`
    /// invites the very retry the limit refuses.
    #[error("rate limited: {limit}")]
    RateLimited {
        limit: LimitKind,
        retry_after: NonZeroU32,
    },
    /// 401: no valid token or session for a private port (SPEC §12).
    #[error("preview access denied: {0}")]
    AccessDenied(DenyReason),
    /// 503: the VM is being woken and did not come up within `[wake] timeout` (SPEC §13).
    #[error("vm {0} is waking up")]
    Waking(String),
    /// 503: `[wake] max_waiting` requests already wait for this VM.
    #[error("too many requests waiting for vm {0} to wake")]
    WakeQueueFull(String),
    /// 502: the wake hook failed.
    #[error("wake failed: vm {id}: {reason}")]
    WakeFailed {
        id: String,
        reason: crate::lifecycle::WakeError,
    },
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            Refusal::InvalidHost(_) | Refusal::NoHost => StatusCode::BAD_REQUEST,
            Refusal::Loop => StatusCode::LOOP_DETECTED,
            Refusal::PortDenied(_) | Refusal::ServiceWorker => StatusCode::FORBIDDEN,
            Refusal::UnknownVm(_) => StatusCode::NOT_FOUND,
            Refusal::RegistryUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Unreachable { .. } | Refusal::Egress(_) => StatusCode::BAD_GATEWAY,
            Refusal::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Refusal::RewriteBusy => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UriTooLong => StatusCode::URI_TOO_LONG,
            Refusal::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::BadFraming(_) => StatusCode::BAD_REQUEST,
            Refusal::RewriteLimit { .. } => StatusCode::BAD_GATEWAY,
            Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::AccessDenied(_) => StatusCode::UNAUTHORIZED,
            Refusal::Waking(_) | Refusal::WakeQueueFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::WakeFailed { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// Seconds for `Retry-After`, for the refusals that are worth retrying soon. Never 0:
    /// `Retry-After: 0` invites the retry the refusal is about.
    pub fn retry_after(&self) -> Option<std::num::NonZeroU32> {
        let secs = match self {
            Refusal::Waking(_) | Refusal::WakeQueueFull(_) => 5,
            Refusal::WakeFailed { .. } => 10,
            Refusal::RateLimited { retry_after, .. } => return Some(*retry_after),
            _ => return None,
        };
        std::num::NonZeroU32::new(secs)
    }

    /// Short name for logs and metrics labels (bounded set).
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Misdirected(_) => "misdirected",
            Refusal::InvalidHost(_) | Refusal::NoHost => "invalid_host",
            Refusal::Loop => "loop",
            Refusal::PortDenied(_) => "port_denied",
            Refusal::ServiceWorker => "service_worker_refused",
            Refusal::UnknownVm(_) => "unknown_vm",
            Refusal::RegistryUnavailable(_) => "registry_unavailable",
            Refusal::Unreachable { .. } => "upstream_unreachable",
            Refusal::Timeout { .. } => "upstream_timeout",
            Refusal::Egress(_) => "egress",
            Refusal::RewriteBusy => "rewrite_busy",
            Refusal::UriTooLong => "uri_too_long",
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::BadFraming(_) => "bad_framing",
            Refusal::RewriteLimit { .. } => "rewrite_limit",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::AccessDenied(_) => "access_denied",
            Refusal::Waking(_) => "wake_timeout",
            Refusal::WakeQueueFull(_) => "wake_queue_full",
            Refusal::WakeFailed { .. } => "wake_failed",
        }
    }

    /// The body: one line. Control characters from the request never reach it.
    pub fn body(&self) -> String {
        let mut s: String = self
            .to_string()
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        s.push('\n');
        s
    }
}

impl From<RouteError> for Refusal {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NotServed(h) => Refusal::Misdirected(h),
            RouteError::Invalid(i) => Refusal::InvalidHost(i.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_the_spec_lines() {
        assert_eq!(Refusal::Loop.body(), "Loop detected in proxy\n");
        assert_eq!(Refusal::Loop.status().as_u16(), 508);
        assert_eq!(
            Refusal::Misdirected("a.org".into()).body(),
            "misdirected request: a.org is not served here\n"
        );
        assert_eq!(Refusal::PortDenied(22).body(), "port 22 is not reachable\n");
        assert_eq!(Refusal::UnknownVm("x".into()).body(), "unknown vm x\n");
        let denied = Refusal::AccessDenied(DenyReason::WrongPort);
        assert_eq!(denied.body(), "preview access denied: wrong port\n");
        assert_eq!(denied.status().as_u16(), 401);
        assert_eq!(
            Refusal::Unreachable {
                id: "x".into(),
                port: 1
            }
            .body(),
            "upstream unreachable: vm x port 1\n"
        );
        assert_eq!(
            Refusal::Egress("x".into()).body(),
            "upstream address not allowed: vm x\n"
        );
        assert_eq!(Refusal::Egress("x".into()).status().as_u16(), 502);
    }

    #[test]
    fn a_rate_limit_is_429_with_the_limit_named() {
        let r = Refusal::RateLimited {
            limit: LimitKind::RequestsPerIp,
            retry_after: NonZeroU32::MIN,
        };
        assert_eq!(r.status().as_u16(), 429);
        assert_eq!(r.body(), "rate limited: requests_per_ip\n");
        assert_eq!(r.kind(), "rate_limited");
    }

    #[test]
    fn bodies_stay_on_one_line() {
        let r = Refusal::Misdirected("a\r\nb".into());
        assert_eq!(r.body().lines().count(), 1);
    }
}
