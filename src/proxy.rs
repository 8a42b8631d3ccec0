//! The pingora `ProxyHttp` phases. Thin on purpose: each phase is a fixed-order list of calls
//! into the module that owns the decision, and records what it learnt in [`RequestCtx`].
//!
//! | phase                     | does                                                        |
//! |---------------------------|-------------------------------------------------------------|
//! | `request_filter`          | head in (`slow`); [`EdgeProxy::admit`]: every gate in SPEC order, or an answer; |
//! |                           | a 404 counts against `unknown_ids_per_ip`; preview access after the registry; activity |
//! | `upstream_peer`           | the checked address with the configured timeouts (a wake after a refused connect) |
//! | `fail_to_connect`         | `on_connect_error`: a refused connect asks for a wake and a retry |
//! | `request_body_filter`     | activity: bytes in (WebSocket frames too)                   |
//! | `upstream_request_filter` | `forward::upstream_request`, then the edge's credentials out |
//! | `upstream_response_filter`| the upstream status, for the access log; HEAD → GET retry   |
//! | `response_filter`         | hop-by-hop out, `X-Request-Id` in, the port's policy (cookies, CORS, embed, shim, |
//! |                           | redirects); after a 101 `websocket_idle`; `Connection: close` while draining |
//! | `response_body_filter`    | the HTML shim; activity: bytes out                          |
//! | `fail_to_proxy`           | 502/504 with the SPEC one-line bodies, or the wake's answer |
//! | `logging`                 | one access-log line (a WebSocket's at close), metrics; idle clock (`slow`) |

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};

use crate::edge::{Edge, Generation, HostDecision, Target, UpstreamTls, IN_FLIGHT};
use crate::forward::{self, Forward};
use crate::lifecycle;
use crate::metrics::{Open, RouteKind, METRICS};
use crate::policy::{cookies, cors, embed, gate, redirect};
use crate::respond::{self, Answer, Refusal, Reply};
use crate::rewrite::{self, HtmlShim, ShimConfig};
use crate::route::public_port;
use crate::slow;
use crate::tls::acme::{challenge, Http01};

/// The internal "retry HEAD as GET" signal, never shown to anyone.
const HEAD_FALLBACK: ErrorType = ErrorType::Custom("head fallback");

/// Who is asking, as far as the TCP peer and the trusted proxies reveal it.
struct Downstream {
    /// The TCP peer.
    peer_ip: IpAddr,
    /// The client: the peer, or what a trusted proxy reports.
    ip: Option<IpAddr>,
    trusted_peer: bool,
    /// `CF-Connecting-IP` is believed (the peer is Cloudflare, or Cloudflare's trusted chain).
    cloudflare: bool,
    /// Over our TLS, or a trusted proxy says the original request was HTTPS.
    https: bool,
    /// The `Host` / `:authority` as sent (with its port), for sibling URLs and the log.
    host: String,
}

/// What the response phases carry from one to the next.
#[derive(Default)]
struct ResponseState {
    /// The request asked for an upgrade (WebSocket).
    upgrade: bool,
    /// The request's `Origin`, for CORS on the response.
    origin: Option<http::HeaderValue>,
    /// The upstream refused HEAD (405/501): ask again with GET, answer as HEAD (SPEC §5).
    head_as_get: bool,
    /// The streaming HTML rewrite of this response, when the shim applies. (A Mutex only to
    /// make the context Sync; one request never contends with itself.) Boxed: the rewriter is
    /// over a kilobyte, and pingora moves the context with its request future.
    shim: Option<Box<Mutex<HtmlShim>>>,
    /// A 101 went out: counted in `active_websockets` until the request ends.
    websocket: Option<Open>,
    /// This request's activity counters (none for ignored user agents).
    activity: Option<lifecycle::Handle>,
    /// `[wake] on_connect_error` for this request.
    rewake: lifecycle::Rewake,
    /// The status the upstream answered (0: none), for the access log.
    upstream_status: u16,
}

pub struct RequestCtx {
    /// A trusted proxy's valid `X-Request-Id`, else ours; set first thing in `request_filter`
    /// (see [`RequestCtx::ensure_request_id`] for requests that never got there).
    pub request_id: String,
    started: Instant,
    generation: Option<Arc<Generation>>,
    client: Downstream,
    pub target: Option<Target>,
    response: ResponseState,
    /// Why cmux-edge answered itself, for the access log.
    refusal: Option<&'static str>,
    /// Slots held against `[limits]` per-VM limits until the request ends.
    held: crate::limits::Held,
    _in_flight: InFlight,
}

struct InFlight {
    _gauge: Open,
}

impl InFlight {
    fn new() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        InFlight {
            _gauge: Open::new(&METRICS.active_requests),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A 128-bit random id as 32 hex digits (by hand: `format!` costs ten times more).
pub fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut id = [0u8; 32];
    for d in id.iter_mut().rev() {
        *d = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    id.iter().map(|&d| char::from(d)).collect()
}

impl RequestCtx {
    /// Makes the request id now if the request failed before `request_filter` named it.
    fn ensure_request_id(&mut self) {
        if self.request_id.is_empty() {
            self.request_id = new_request_id();
        }
    }
}

pub struct EdgeProxy {
    pub edge: Arc<Edge>,
    /// HTTP-01 challenge answers, when ACME validates by HTTP.
    pub http01: Option<Arc<Http01>>,
}

impl EdgeProxy {
    /// Every gate a request passes, in the order the SPEC fixes; the first that answers ends
    /// the request. The comment on each line is what it may answer.
    async fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Result<Target, Answer> {
        let g = self.edge.current();
        ctx.generation = Some(g.clone());
        let req = session.req_header();
        ctx.client = identify(session, &g);
        ctx.request_id = match forward::trusted_request_id(req, ctx.client.trusted_peer) {
            Some(id) => id.to_owned(),
            None => new_request_id(),
        };
        forward::check_framing(req)?; //                         414 431 400
        self.acme_challenge(session).await?; //                 200/404 HTTP-01
        ctx.client.host = host_of(req).ok_or(Refusal::NoHost)?.to_owned();
        let host = g.decide_host(&ctx.client.host)?; //           421 400
        forward::check_loop(req)?; //                             508 (SPEC §4: right after the host)
        self.edge.limits.admit(&g.config.limits, ctx.client.ip)?; // 429 requests_per_ip
        redirect::to_https(&g.config, &ctx.client.host, ctx.client.https, req)?; // 308
        let HostDecision::Preview {
            port,
            id,
            scope,
            label,
            port_span,
            domain,
            ..
        } = host
        else {
            return Err(g.apex(&host).into()); //                  apex
        };
        g.check_port(port)?; //                                   403
        let policy = g.policy(port).clone();
        gate::check(&policy, &g.config.ports, req)?; //           403 service worker, passed port
        cors::answer_preflight(&policy, req)?; //                 204 preflight
        ctx.response.origin = req.headers.get(header::ORIGIN).cloned();
        let shim = ShimConfig {
            label: &label,
            port_span: port_span.clone(),
            domain: &domain,
            public_port: public_port(&ctx.client.host),
        };
        rewrite::serve_worker(&policy, req, &shim)?; //           /proxy-sw.js
        let limits = &g.config.limits;
        self.edge
            .limits
            .unknown_ids(limits, ctx.client.ip, || g.knows(&id))?; // 429
        let resolved = g.resolve(&id, port).await?; //            404 503
        g.access
            .check(req, &policy, &resolved.vm, port, ctx.client.https, &domain)?; // 401 302
        ctx.response.upgrade = forward::is_upgrade(req);
        ctx.held = self.edge.limits.vm(limits, &id, ctx.response.upgrade)?; // 429 per VM
        let resolved = self
            .edge
            .wakes
            .until_running(&g, req, &id, port, resolved)
            .await?; // held, 503 page, 502
        let addr = g.upstream_addr(&id, port, &resolved).await?; // 502 504
        Ok(Target {
            port,
            authority: resolved.authority(&policy),
            tls: g.upstream_tls(&resolved.vm),
            label,
            port_span,
            domain,
            policy,
            id,
            scope,
            addr,
        })
    }

    /// Answers `/.well-known/acme-challenge/<token>` on plain HTTP while ACME uses HTTP-01;
    /// ACME validation requests may name hosts outside the preview domains.
    async fn acme_challenge(&self, session: &Session) -> Result<(), Reply> {
        let Some(http01) = &self.http01 else {
            return Ok(());
        };
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let path = session.req_header().uri.path();
        if tls || !path.starts_with(challenge::PREFIX) {
            return Ok(());
        }
        Err(match http01.answer(path).await {
            Some(key_auth) => Reply::body(
                200,
                "application/octet-stream",
                key_auth.into(),
                "acme_challenge",
            ),
            None => Reply::text(404, "no such ACME challenge\n", "acme_challenge"),
        })
    }
}

/// The client as the TCP peer and the trusted proxies reveal it: every answer carries the
/// request id, and every access-log line the client.
fn identify(session: &Session, g: &Generation) -> Downstream {
    let peer_ip = peer_of(session).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    let client = g
        .config
        .trust
        .client(peer_ip, &session.req_header().headers);
    Downstream {
        peer_ip,
        ip: Some(client.ip),
        trusted_peer: client.trusted_peer,
        cloudflare: client.cloudflare,
        https: tls || client.forwarded_https == Some(true),
        host: String::new(),
    }
}

fn peer_of(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// `:authority` (HTTP/2, or an absolute-form HTTP/1.1 target) else `Host`.
/// `X-Forwarded-Host` from a client is never used for routing.
fn host_of(req: &RequestHeader) -> Option<&str> {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(header::HOST).and_then(|v| v.to_str().ok()))
        .filter(|h| !h.trim().is_empty())
}

/// HEAD → GET fallback (SPEC §5, §11): once the head is out, the client's HEAD is answered.
/// An HTTP/2 stream is ended here (pingora would keep it open until the GET body ends), and the
/// error stops reading the GET body, closing that upstream connection.
fn end_head_fallback(session: &mut Session) -> pingora::Result<()> {
    if session.response_written().is_none() {
        return Ok(());
    }
    if let pingora::protocols::http::ServerSession::H2(h2) = session.as_downstream_mut() {
        h2.finish()?;
    }
    Error::e_explain(respond::ANSWERED, "HEAD answered; the GET body is not read")
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            request_id: String::new(),
            started: Instant::now(),
            generation: None,
            client: Downstream {
                peer_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                ip: None,
                trusted_peer: false,
                cloudflare: false,
                https: false,
                host: String::new(),
            },
            target: None,
            response: ResponseState::default(),
            refusal: None,
            held: Default::default(),
            _in_flight: InFlight::new(),
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        slow::head_received(session);
        match self.admit(session, ctx).await {
            Ok(target) => {
                let (g, req) = (ctx.generation.as_deref(), session.req_header());
                ctx.response.activity = self.edge.activity.admit(g, req, &target);
                ctx.target = Some(target);
                Ok(false)
            }
            Err(answer) => {
                let limits = ctx.generation.as_ref().map(|g| &g.config.limits);
                self.edge.limits.missed(limits, ctx.client.ip, &answer); // unknown_ids_per_ip
                ctx.ensure_request_id();
                ctx.refusal = Some(respond::send(session, answer, &ctx.request_id).await);
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let (Some(t), Some(g)) = (&mut ctx.target, &ctx.generation) else {
            return Error::e_explain(ErrorType::HTTPStatus(500), "no target resolved");
        };
        let rewake = &mut ctx.response.rewake;
        self.edge
            .wakes
            .after_refusal(rewake, g, session.req_header(), t)
            .await?;
        let timeouts = g.config.timeouts;
        let mut peer = UpstreamTls::peer(t.tls.as_ref(), t.addr);
        peer.options.connection_timeout = Some(timeouts.connect);
        peer.options.total_connection_timeout = Some(timeouts.connect);
        peer.options.read_timeout = Some(if ctx.response.upgrade {
            timeouts.websocket_idle
        } else {
            timeouts.read
        });
        peer.options.write_timeout = Some(timeouts.write);
        peer.options.idle_timeout = Some(timeouts.idle);
        peer.options.http_upstream_request_policy = forward::pingora_request_policy();
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let (Some(t), Some(g)) = (&ctx.target, &ctx.generation) else {
            return Error::e_explain(ErrorType::HTTPStatus(500), "no target resolved");
        };
        if ctx.response.head_as_get {
            upstream_request.set_method(http::Method::GET);
        }
        forward::upstream_request(
            upstream_request,
            &Forward {
                port: t.port,
                id: &t.id,
                scope: t.scope.as_deref(),
                policy: &t.policy,
                client_ip: ctx.client.ip.unwrap_or(ctx.client.peer_ip),
                trusted_peer: ctx.client.trusted_peer,
                cloudflare: ctx.client.cloudflare,
                peer_ip: ctx.client.peer_ip,
                https: ctx.client.https,
                public_host: &ctx.client.host,
                upstream_authority: &t.authority,
                request_id: &ctx.request_id,
                upgrade: ctx.response.upgrade,
            },
        )?;
        g.access.strip(upstream_request); // the edge's cookie, X-Cmux-Token, cmux_token
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let r = &mut ctx.response;
        r.upstream_status = upstream_response.status.as_u16();
        let refused = matches!(r.upstream_status, 405 | 501);
        if refused && !r.head_as_get && session.req_header().method == http::Method::HEAD {
            // pingora's retry loop asks the upstream again; the GET body never reaches a
            // HEAD client (pingora writes no body for HEAD) but its real length does.
            r.head_as_get = true;
            let mut e = Error::explain(HEAD_FALLBACK, "upstream refused HEAD; retrying as GET");
            e.set_retry(true);
            return Err(e);
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<Duration>> {
        // The GET body behind a HEAD answer: never sent, and no longer read once the head is out.
        if ctx.response.head_as_get {
            *body = None;
            end_head_fallback(session)?;
        }
        if let Some(shim) = &ctx.response.shim {
            let Ok(mut shim) = shim.lock() else {
                return Error::e_explain(ErrorType::InternalError, "shim lock poisoned");
            };
            *body = shim
                .filter(body.as_deref(), end_of_stream)
                .map_err(rewrite::to_pingora)?;
        }
        if let (Some(a), Some(b)) = (&ctx.response.activity, body) {
            a.bytes(0, b.len());
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let g = ctx.generation.as_deref();
        ctx.response.rewake.after_connect_error(g, &mut e);
        e
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let (Some(a), Some(b)) = (&ctx.response.activity, body) {
            a.bytes(b.len(), 0);
        }
        Ok(())
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        error.etype() == &HEAD_FALLBACK || error.etype() == &respond::ANSWERED
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        forward::downstream_response(upstream_response, &ctx.request_id)?;
        respond::close_when_draining(session);
        let Some(t) = &ctx.target else { return Ok(()) };
        let policy = &t.policy;
        // Before the 101 return: a handshake answer can set cookies too.
        cookies::response(policy, upstream_response);
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            // Only now: pingora's default 60 s downstream read timeout would cut quiet WebSockets.
            let idle = ctx
                .generation
                .as_ref()
                .map(|g| g.config.timeouts.websocket_idle);
            session.set_read_timeout(idle);
            ctx.response.websocket = Some(Open::new(&METRICS.active_websockets));
            if let Some(a) = &mut ctx.response.activity {
                a.websocket_opened();
            }
            return Ok(());
        }
        let public_port = public_port(&ctx.client.host);
        cors::response(policy, ctx.response.origin.as_ref(), upstream_response);
        embed::response(policy, upstream_response);
        if policy.inject_shim && !ctx.response.head_as_get {
            let req = session.req_header();
            let h1_chunked = !session.is_http2() && req.version == http::Version::HTTP_11;
            let shim = ShimConfig {
                label: &t.label,
                port_span: t.port_span.clone(),
                domain: &t.domain,
                public_port,
            };
            let limits = ctx.generation.as_ref().map(|g| g.config.rewrite_limits);
            ctx.response.shim = rewrite::start(
                req,
                upstream_response,
                &shim,
                policy.embed,
                h1_chunked,
                limits.unwrap_or_default(),
            )?;
        }
        if policy.rewrite_redirects {
            let origin = redirect::PublicOrigin {
                label: &t.label,
                port_span: t.port_span.clone(),
                domain: &t.domain,
                public_port,
                https: ctx.client.https,
            };
            redirect::response(&origin, upstream_response);
        }
        Ok(())
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        // Upstream failures are answered 502/504 and show in the access log; one line is enough.
        error.esource() == &ErrorSource::Upstream || error.etype() == &respond::ANSWERED
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        ctx.ensure_request_id();
        let target = ctx.target.as_ref().map(|t| (t.id.as_str(), t.port));
        let answer = ctx
            .response
            .rewake
            .take_answer()
            .or_else(|| respond::for_error(e, target));
        let code = answer.as_ref().map_or(0, |a| a.status());
        // Once the upstream's header went out, the client sees a cut stream, not a second answer.
        if let Some(answer) = answer {
            if session.response_written().is_none() {
                ctx.refusal = Some(respond::send(session, answer, &ctx.request_id).await);
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// One line per request, written when it ends: for a WebSocket that is when the tunnel
    /// closes, so the duration and both byte counts cover the whole session.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        slow::request_done(session);
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        // Requests refused before `request_filter` ran have no resolved client: log the peer.
        let client = ctx.client.ip.or_else(|| peer_of(session));
        ctx.ensure_request_id();
        let req = session.req_header();
        let (vm, port, upstream) = match &ctx.target {
            Some(t) => (t.id.as_str(), t.port, Some(t.addr)),
            None => ("", 0, None),
        };
        let elapsed: Duration = ctx.started.elapsed();
        // A target is set only once every gate passed: whatever happens after, it was a preview.
        // So was a VM whose name did not resolve: no target, but an upstream failure.
        let kind = match (&ctx.target, ctx.refusal) {
            (Some(_), _) => RouteKind::Preview,
            (None, Some(k)) if respond::is_upstream_failure(k) => RouteKind::Preview,
            (None, Some("apex")) => RouteKind::Apex,
            (None, _) => RouteKind::Edge,
        };
        let (bytes_in, bytes_out) = (session.body_bytes_read(), session.body_bytes_sent());
        METRICS.request(kind, status, elapsed.as_secs_f64(), bytes_in, bytes_out);
        crate::access_log::write(&crate::access_log::Entry {
            request_id: &ctx.request_id,
            client,
            method: req.method.as_str(),
            host: &crate::route::normalize_host(&ctx.client.host),
            path: req.uri.path(),
            vm,
            port,
            status,
            upstream,
            upstream_status: ctx.response.upstream_status,
            bytes_in,
            bytes_out,
            duration: elapsed,
            websocket: ctx.response.websocket.is_some(),
            refusal: ctx.refusal.unwrap_or(""),
            error: e.map_or("", |e| e.etype().as_str()),
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_new_request_id_is_32_lowercase_hex_digits_and_fresh() {
        let (a, b) = (super::new_request_id(), super::new_request_id());
        for id in [&a, &b] {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
        }
        assert_ne!(a, b);
    }
}
