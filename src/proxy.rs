//! The pingora `ProxyHttp` phases. Thin on purpose: each phase asks [`crate::edge`],
//! [`crate::forward`] or [`crate::respond`] and records what it learnt in [`RequestCtx`].
//!
//! | phase                     | does                                                        |
//! |---------------------------|-------------------------------------------------------------|
//! | `request_filter`          | host → 421/400, loop → 508, port → 403, apex, registry → 404, address |
//! | `upstream_peer`           | the resolved address with the configured timeouts           |
//! | `upstream_request_filter` | `forward::upstream_request`                                 |
//! | `upstream_response_filter`| the upstream status, for the access log; HEAD → GET retry   |
//! | `response_filter`         | hop-by-hop out, `X-Request-Id` in                           |
//! | `fail_to_proxy`           | 502/504 with the SPEC one-line bodies                       |
//! | `logging`                 | one access-log line (a WebSocket's at close), metrics       |

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};

use crate::config::Config;
use crate::edge::{Generation, HostDecision};
use crate::forward::{self, Forward, X_REQUEST_ID};
use crate::metrics::{Open, RouteKind, METRICS};
use crate::policy::cors;
use crate::policy::embed;
use crate::policy::redirect::{rewrite_location, PublicOrigin};
use crate::policy::Policy;
use crate::registry::{Address, AdminVms, Scheme};
use crate::respond::Refusal;
use crate::rewrite::{self, Encoding, HtmlShim, ShimConfig};
use crate::tls::acme::{challenge, Http01};

/// The internal "retry HEAD as GET" signal, never shown to anyone.
const HEAD_FALLBACK: ErrorType = ErrorType::Custom("head fallback");

/// Requests under way, for a shutdown that ends as soon as they are done.
pub static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// State shared by every request: the current config generation, and the admin-API VMs that
/// outlive every reload.
pub struct Edge {
    current: ArcSwap<Generation>,
    pub admin_vms: Arc<AdminVms>,
}

impl Edge {
    pub fn new(config: Config, admin_vms: Arc<AdminVms>) -> Edge {
        Edge {
            current: ArcSwap::from_pointee(Generation::new(config, Some(admin_vms.clone()))),
            admin_vms,
        }
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Installs a new config; requests under way keep the generation they started with.
    pub fn swap(&self, config: Config) {
        let generation = Generation::new(config, Some(self.admin_vms.clone()));
        self.current.store(Arc::new(generation));
    }
}

/// The routed preview, once `request_filter` accepted it.
pub struct Target {
    pub port: u16,
    pub id: String,
    pub scope: Option<String>,
    /// The host label and where its port sits, plus the domain: sibling-port URLs.
    pub label: String,
    pub port_span: std::ops::Range<usize>,
    pub domain: String,
    pub policy: Arc<Policy>,
    pub addr: SocketAddr,
    pub tls_sni: Option<String>,
    /// `address:port` as the registry names it, for `host_header = "upstream"`.
    pub authority: String,
}

pub struct RequestCtx {
    /// A trusted proxy's valid `X-Request-Id`, else ours; set first thing in `request_filter`
    /// (see [`RequestCtx::ensure_request_id`] for requests that never got there).
    pub request_id: String,
    started: Instant,
    generation: Option<Arc<Generation>>,
    pub target: Option<Target>,
    public_host: String,
    client_ip: Option<IpAddr>,
    /// The TCP peer, as `route` found it (the client unless a trusted proxy says otherwise).
    peer_ip: IpAddr,
    trusted_peer: bool,
    https: bool,
    upgrade: bool,
    /// The request's `Origin`, for CORS on the response.
    origin: Option<http::HeaderValue>,
    /// The upstream refused HEAD (405/501): ask again with GET, answer as HEAD (SPEC §5).
    head_as_get: bool,
    /// The streaming HTML rewrite of this response, when the shim applies. (A Mutex only to
    /// make the context Sync; one request never contends with itself.)
    shim: Option<std::sync::Mutex<HtmlShim>>,
    /// A 101 went out: counted in `active_websockets` until the request ends.
    websocket: Option<Open>,
    /// Why cmux-edge answered itself, for the access log.
    refusal: Option<&'static str>,
    /// The status the upstream answered (0: none), for the access log.
    upstream_status: u16,
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

/// A 128-bit random id as 32 hex digits.
pub fn new_request_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

impl RequestCtx {
    /// Makes the request id now if the request failed before `request_filter` named it.
    fn ensure_request_id(&mut self) {
        if self.request_id.is_empty() {
            self.request_id = new_request_id();
        }
    }
}

/// An optional value that logs as an empty string when absent, without formatting to a
/// `String` first.
struct OrEmpty<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrEmpty<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => Ok(()),
        }
    }
}

pub struct EdgeProxy {
    pub edge: Arc<Edge>,
    /// HTTP-01 challenge answers, when ACME validates by HTTP.
    pub http01: Option<Arc<Http01>>,
}

impl EdgeProxy {
    async fn refuse(&self, session: &mut Session, ctx: &mut RequestCtx, r: Refusal) -> bool {
        ctx.refusal = Some(r.kind());
        METRICS.refusals.with_label_values(&[r.kind()]).inc();
        if r == Refusal::Loop {
            METRICS.loop_rejections.inc();
        }
        let body = r.body();
        write_plain(session, r.status().as_u16(), body.into(), &ctx.request_id).await;
        true
    }

    /// Answers `/.well-known/acme-challenge/<token>` on plain HTTP while ACME uses HTTP-01.
    async fn answer_http01(&self, session: &mut Session, ctx: &mut RequestCtx) -> bool {
        let Some(http01) = &self.http01 else {
            return false;
        };
        let path = session.req_header().uri.path();
        if !path.starts_with(challenge::PREFIX) {
            return false;
        }
        ctx.refusal = Some("acme_challenge");
        match http01.answer(path).await {
            Some(key_auth) => {
                write_answer(
                    session,
                    200,
                    "application/octet-stream",
                    key_auth.into(),
                    &ctx.request_id,
                )
                .await
            }
            None => {
                write_plain(
                    session,
                    404,
                    "no such ACME challenge\n".into(),
                    &ctx.request_id,
                )
                .await
            }
        }
        true
    }

    /// Everything up to knowing the upstream address. `Err` carries the refusal to send.
    async fn route(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Target>, Refusal> {
        let generation = self.edge.current();
        ctx.generation = Some(generation.clone());

        // Who is asking, before any answer: every answer carries the request id, and every
        // access-log line the client as the trusted proxies reveal it.
        let peer_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let client = generation
            .config
            .trust
            .client(peer_ip, &session.req_header().headers);
        ctx.peer_ip = peer_ip;
        ctx.client_ip = Some(client.ip);
        ctx.trusted_peer = client.trusted_peer;
        ctx.https = tls || client.forwarded_https == Some(true);
        ctx.request_id =
            match forward::trusted_request_id(session.req_header(), client.trusted_peer) {
                Some(id) => id.to_owned(),
                None => new_request_id(),
            };
        // ACME validation requests may name hosts outside the preview domains.
        if !tls && self.answer_http01(session, ctx).await {
            return Ok(None);
        }
        let req = session.req_header();
        let raw_host = host_of(req).ok_or(Refusal::NoHost)?;
        ctx.public_host = raw_host.to_owned();
        let decision = generation.decide_host(raw_host)?;
        // `https` includes a trusted TLS-terminating proxy's word: redirecting it would loop.
        if !ctx.https && generation.config.tls.redirect_http {
            if let Some(https) = generation.config.listen.https {
                ctx.refusal = Some("https_redirect");
                let location = https_location(raw_host, https.port(), session.req_header());
                write_redirect(session, &location, &ctx.request_id).await;
                return Ok(None);
            }
        }

        // SPEC §4: right after host parsing, before any other answer or registry call.
        if forward::is_loop(req) {
            return Err(Refusal::Loop);
        }

        let (port, id, scope, label, port_span, domain) = match decision {
            HostDecision::Apex { status, body } => {
                ctx.refusal = Some("apex");
                write_plain(session, status, body.into(), &ctx.request_id).await;
                return Ok(None);
            }
            HostDecision::Preview {
                port,
                id,
                scope,
                label,
                port_span,
                domain,
                ..
            } => (port, id, scope, label, port_span, domain),
        };
        generation.check_port(port)?;

        // Preflights need no VM: answer them before asking the registry.
        let policy = generation.policy(port).clone();
        if let Some(mut resp) = cors::preflight(&policy, session.req_header()) {
            ctx.refusal = Some("preflight");
            let _ = resp.insert_header(X_REQUEST_ID, ctx.request_id.clone());
            send(session, resp, None).await;
            return Ok(None);
        }
        ctx.origin = session.req_header().headers.get(header::ORIGIN).cloned();

        if policy.inject_shim && session.req_header().uri.path() == "/proxy-sw.js" {
            let sw = ShimConfig {
                label: &label,
                port_span: port_span.clone(),
                domain: &domain,
                public_port: public_port(&ctx.public_host),
            }
            .service_worker();
            ctx.refusal = Some("service_worker");
            write_answer(
                session,
                200,
                "application/javascript; charset=utf-8",
                sw.into(),
                &ctx.request_id,
            )
            .await;
            return Ok(None);
        }

        let resolved = generation.resolve(&id, port).await?;
        let vm = &resolved.vm;
        let unreachable = || Refusal::Unreachable {
            id: id.clone(),
            port,
        };
        let addr = match &vm.address {
            Address::Ip(ip) => SocketAddr::new(*ip, resolved.upstream_port),
            Address::Name(name) => {
                let lookup = tokio::net::lookup_host((name.as_str(), resolved.upstream_port));
                let timeout = generation.config.timeouts.connect;
                match tokio::time::timeout(timeout, lookup).await {
                    Ok(Ok(mut addrs)) => match addrs.next() {
                        Some(a) => a,
                        None if vm.unresolvable_is_unknown => {
                            return Err(Refusal::UnknownVm(id.clone()))
                        }
                        None => return Err(unreachable()),
                    },
                    Ok(Err(e)) => {
                        tracing::debug!(vm = %id, name = %name, error = %e, "upstream name does not resolve");
                        if vm.unresolvable_is_unknown {
                            return Err(Refusal::UnknownVm(id.clone()));
                        }
                        return Err(unreachable());
                    }
                    Err(_) => {
                        return Err(Refusal::Timeout {
                            id: id.clone(),
                            port,
                        })
                    }
                }
            }
        };
        let tls_sni = match vm.scheme {
            Scheme::Http => None,
            Scheme::Https => Some(match &vm.address {
                Address::Name(n) => n.clone(),
                Address::Ip(_) => String::new(),
            }),
        };
        Ok(Some(Target {
            port,
            label,
            port_span,
            domain,
            policy,
            authority: format!("{}:{}", vm.address, resolved.upstream_port),
            id,
            scope,
            addr,
            tls_sni,
        }))
    }
}

/// Starts the HTML shim for this response when it is HTML in an encoding we can decode, and
/// fixes the headers a changed body invalidates.
fn start_shim(
    session: &Session,
    resp: &mut ResponseHeader,
    t: &Target,
    public_host: &str,
) -> Option<std::sync::Mutex<HtmlShim>> {
    let req = session.req_header();
    let bodiless = matches!(resp.status.as_u16(), 100..=199 | 204 | 304);
    if req.method == http::Method::HEAD || bodiless {
        return None;
    }
    let header_str = |n: header::HeaderName| resp.headers.get(n).and_then(|v| v.to_str().ok());
    if !rewrite::is_html(header_str(header::CONTENT_TYPE)) {
        return None;
    }
    let encoding = Encoding::from_header(header_str(header::CONTENT_ENCODING))?;
    let script = ShimConfig {
        label: &t.label,
        port_span: t.port_span.clone(),
        domain: &t.domain,
        public_port: public_port(public_host),
    }
    .script_tag();
    let shim = match HtmlShim::new(encoding, script, t.policy.embed) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start HTML rewriting; passing through");
            return None;
        }
    };
    for h in [
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::ETAG,
    ] {
        resp.remove_header(&h);
    }
    resp.remove_header("content-md5");
    // Keep HTTP/1.1 keep-alive: without a length the body would be close-delimited.
    if !session.is_http2() && req.version == http::Version::HTTP_11 {
        let _ = resp.insert_header(header::TRANSFER_ENCODING, "chunked");
    }
    Some(std::sync::Mutex::new(shim))
}

/// `https://<host without port>[:port]<path?query>`; the port is left out when it is 443.
fn https_location(raw_host: &str, https_port: u16, req: &RequestHeader) -> String {
    let host = crate::route::normalize_host(raw_host);
    let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{https_port}{path}")
    }
}

/// A 308 (method and body kept, like Caddy's HTTP→HTTPS redirect).
async fn write_redirect(session: &mut Session, location: &str, request_id: &str) {
    let Ok(mut resp) = ResponseHeader::build(308, Some(4)) else {
        return;
    };
    let _ = resp.insert_header(header::LOCATION, location);
    let _ = resp.insert_header(header::CONTENT_LENGTH, 0);
    let _ = resp.insert_header(header::CACHE_CONTROL, "no-store");
    let _ = resp.insert_header(X_REQUEST_ID, request_id.to_owned());
    send(session, resp, None).await
}

/// The port in the client's `Host`, if it named one.
fn public_port(host: &str) -> Option<u16> {
    let (_, port) = host.rsplit_once(':')?;
    port.parse().ok()
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

/// Writes a complete `text/plain` answer with `X-Request-Id`. `response_filter` does not run
/// for responses written here, so everything they need is set now.
pub async fn write_plain(session: &mut Session, status: u16, body: Bytes, request_id: &str) {
    write_answer(
        session,
        status,
        "text/plain; charset=utf-8",
        body,
        request_id,
    )
    .await
}

async fn write_answer(
    session: &mut Session,
    status: u16,
    content_type: &'static str,
    body: Bytes,
    request_id: &str,
) {
    let Ok(mut resp) = ResponseHeader::build(status, Some(4)) else {
        return;
    };
    let _ = resp.insert_header(header::CONTENT_TYPE, content_type);
    let _ = resp.insert_header(header::CONTENT_LENGTH, body.len());
    let _ = resp.insert_header(header::CACHE_CONTROL, "no-store");
    let _ = resp.insert_header(X_REQUEST_ID, request_id.to_owned());
    send(session, resp, Some(body)).await
}

/// Writes an answer cmux-edge made itself; a HEAD gets the headers only.
async fn send(session: &mut Session, resp: ResponseHeader, body: Option<Bytes>) {
    let head = session.req_header().method == http::Method::HEAD;
    if session
        .write_response_header(Box::new(resp), false)
        .await
        .is_ok()
    {
        let body = if head { None } else { body };
        let _ = session.write_response_body(body, true).await;
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            request_id: String::new(),
            started: Instant::now(),
            generation: None,
            target: None,
            public_host: String::new(),
            client_ip: None,
            peer_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            trusted_peer: false,
            https: false,
            upgrade: false,
            origin: None,
            head_as_get: false,
            shim: None,
            websocket: None,
            refusal: None,
            upstream_status: 0,
            _in_flight: InFlight::new(),
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        match self.route(session, ctx).await {
            Ok(Some(target)) => {
                ctx.upgrade = forward::is_upgrade(session.req_header());
                if ctx.upgrade {
                    // pingora's default 60 s downstream read timeout would cut quiet WebSockets.
                    let idle = ctx
                        .generation
                        .as_ref()
                        .map(|g| g.config.timeouts.websocket_idle);
                    session.set_read_timeout(idle);
                }
                ctx.target = Some(target);
                Ok(false)
            }
            Ok(None) => Ok(true),
            Err(r) => Ok(self.refuse(session, ctx, r).await),
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let (Some(t), Some(g)) = (&ctx.target, &ctx.generation) else {
            return Error::e_explain(ErrorType::HTTPStatus(500), "no target resolved");
        };
        let timeouts = g.config.timeouts;
        let mut peer = HttpPeer::new(
            t.addr,
            t.tls_sni.is_some(),
            t.tls_sni.clone().unwrap_or_default(),
        );
        peer.options.connection_timeout = Some(timeouts.connect);
        peer.options.total_connection_timeout = Some(timeouts.connect);
        peer.options.read_timeout = Some(if ctx.upgrade {
            timeouts.websocket_idle
        } else {
            timeouts.read
        });
        peer.options.write_timeout = Some(timeouts.write);
        peer.options.idle_timeout = Some(timeouts.idle);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let Some(t) = &ctx.target else {
            return Error::e_explain(ErrorType::HTTPStatus(500), "no target resolved");
        };
        if ctx.head_as_get {
            upstream_request.set_method(http::Method::GET);
        }
        forward::upstream_request(
            upstream_request,
            &Forward {
                port: t.port,
                id: &t.id,
                scope: t.scope.as_deref(),
                policy: &t.policy,
                client_ip: ctx.client_ip.unwrap_or(ctx.peer_ip),
                trusted_peer: ctx.trusted_peer,
                peer_ip: ctx.peer_ip,
                https: ctx.https,
                public_host: &ctx.public_host,
                upstream_authority: &t.authority,
                request_id: &ctx.request_id,
            },
        )
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        ctx.upstream_status = upstream_response.status.as_u16();
        let refused = matches!(ctx.upstream_status, 405 | 501);
        if refused && !ctx.head_as_get && session.req_header().method == http::Method::HEAD {
            // pingora's retry loop asks the upstream again; the GET body never reaches a
            // HEAD client (pingora writes no body for HEAD) but its real length does.
            ctx.head_as_get = true;
            let mut e = Error::explain(HEAD_FALLBACK, "upstream refused HEAD; retrying as GET");
            e.set_retry(true);
            return Err(e);
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<Duration>> {
        // The GET body behind a HEAD answer: pingora's h1 writer drops it, h2 would send it.
        if ctx.head_as_get {
            *body = None;
        }
        if let Some(shim) = &ctx.shim {
            let Ok(mut shim) = shim.lock() else {
                return Error::e_explain(ErrorType::InternalError, "shim lock poisoned");
            };
            let mut out = match body.as_deref() {
                Some(chunk) => shim.push(chunk),
                None => Ok(Bytes::new()),
            }
            .map_err(|e| Error::because(ErrorType::Custom("html rewrite"), "decoding body", e))?;
            if end_of_stream {
                let rest = shim.finish().map_err(|e| {
                    Error::because(ErrorType::Custom("html rewrite"), "ending body", e)
                })?;
                if out.is_empty() {
                    out = rest;
                } else if !rest.is_empty() {
                    let mut joined = Vec::with_capacity(out.len() + rest.len());
                    joined.extend_from_slice(&out);
                    joined.extend_from_slice(&rest);
                    out = joined.into();
                }
            }
            // An empty chunk would read as the end of a chunked body.
            *body = (!out.is_empty()).then_some(out);
        }
        Ok(None)
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        error.etype() == &HEAD_FALLBACK
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        forward::downstream_response(upstream_response);
        upstream_response.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
        let Some(t) = &ctx.target else { return Ok(()) };
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            ctx.websocket = Some(Open::new(&METRICS.active_websockets));
            return Ok(());
        }
        cors::response(&t.policy, ctx.origin.as_ref(), upstream_response);
        embed::response(&t.policy, upstream_response);
        if t.policy.inject_shim && !ctx.head_as_get {
            ctx.shim = start_shim(session, upstream_response, t, &ctx.public_host);
        }
        if t.policy.rewrite_redirects {
            let location = upstream_response
                .headers
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok());
            let origin = PublicOrigin {
                label: &t.label,
                port_span: t.port_span.clone(),
                domain: &t.domain,
                public_port: public_port(&ctx.public_host),
                https: ctx.https,
            };
            if let Some(new) = location.and_then(|l| rewrite_location(l, &origin)) {
                upstream_response.insert_header(header::LOCATION, new)?;
            }
        }
        Ok(())
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        // Upstream failures are answered 502/504 and show in the access log; one line is enough.
        error.esource() == &ErrorSource::Upstream
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        ctx.ensure_request_id();
        let refusal = match (e.esource(), e.etype(), &ctx.target) {
            (_, ErrorType::HTTPStatus(code), _) => {
                let code = *code;
                if session.response_written().is_none() {
                    let body = format!(
                        "{}\n",
                        http::StatusCode::from_u16(code)
                            .map(|s| s.canonical_reason().unwrap_or("error"))
                            .unwrap_or("error")
                    );
                    write_plain(session, code, body.into(), &ctx.request_id).await;
                }
                return FailToProxy {
                    error_code: code,
                    can_reuse_downstream: false,
                };
            }
            (ErrorSource::Upstream, etype, Some(t)) => match etype {
                ErrorType::ConnectTimedout
                | ErrorType::ReadTimedout
                | ErrorType::WriteTimedout
                | ErrorType::TLSHandshakeTimedout => Refusal::Timeout {
                    id: t.id.clone(),
                    port: t.port,
                },
                _ => Refusal::Unreachable {
                    id: t.id.clone(),
                    port: t.port,
                },
            },
            (
                ErrorSource::Downstream,
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
                _,
            ) => {
                // The client went away: nobody to answer.
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            (ErrorSource::Downstream, ErrorType::ReadTimedout, _) => {
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            (ErrorSource::Downstream, _, _) => {
                if session.response_written().is_none() {
                    write_plain(session, 400, "bad request\n".into(), &ctx.request_id).await;
                }
                return FailToProxy {
                    error_code: 400,
                    can_reuse_downstream: false,
                };
            }
            _ => {
                tracing::error!(request_id = %ctx.request_id, error = %e, "internal error");
                if session.response_written().is_none() {
                    write_plain(session, 500, "internal error\n".into(), &ctx.request_id).await;
                }
                return FailToProxy {
                    error_code: 500,
                    can_reuse_downstream: false,
                };
            }
        };
        let code = refusal.status().as_u16();
        ctx.refusal = Some(refusal.kind());
        let kind = if matches!(refusal, Refusal::Timeout { .. }) {
            "timeout"
        } else {
            "connect"
        };
        METRICS.upstream_errors.with_label_values(&[kind]).inc();
        // Once the upstream's header went out, the client sees a cut stream, not a second answer.
        if session.response_written().is_none() {
            write_plain(session, code, refusal.body().into(), &ctx.request_id).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// One line per request, written when it ends: for a WebSocket that is when the tunnel
    /// closes, so the duration and both byte counts cover the whole session.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        // Requests refused before `request_filter` ran have no resolved client: log the peer.
        let client = ctx.client_ip.or_else(|| {
            session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip())
        });
        ctx.ensure_request_id();
        let req = session.req_header();
        let (vm, port, upstream) = match &ctx.target {
            Some(t) => (t.id.as_str(), t.port, Some(t.addr)),
            None => ("", 0, None),
        };
        let elapsed: Duration = ctx.started.elapsed();
        let kind = match ctx.refusal {
            Some("apex") => RouteKind::Apex,
            None if ctx.target.is_some() => RouteKind::Preview,
            Some(r) if ctx.target.is_some() && r.starts_with("upstream_") => RouteKind::Preview,
            _ => RouteKind::Edge,
        };
        let (bytes_in, bytes_out) = (session.body_bytes_read(), session.body_bytes_sent());
        METRICS.request(kind, status, elapsed.as_secs_f64(), bytes_in, bytes_out);
        tracing::info!(
            target: "access",
            request_id = %ctx.request_id,
            client = %OrEmpty(client),
            method = %req.method,
            host = %ctx.public_host,
            // The path only: query strings carry tokens and personal data.
            path = %req.uri.path(),
            vm,
            port,
            status,
            upstream = %OrEmpty(upstream),
            upstream_status = ctx.upstream_status,
            bytes_in,
            bytes_out,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            websocket = ctx.websocket.is_some(),
            refusal = ctx.refusal.unwrap_or(""),
            error = %OrEmpty(e.map(|e| e.etype().as_str())),
        );
    }
}
