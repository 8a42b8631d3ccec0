//! Slow and idle clients (SPEC §11 `[timeouts]`): a connection must deliver each request head
//! within `client_header` (counted from the accept, or from the first byte after the previous
//! answer), and may sit idle between requests for at most `client_idle`. pingora only has a
//! per-read timeout (which a byte every few seconds defeats) and waits forever for a kept-alive
//! connection's next request, so the deadline lives in the stream itself: [`Guarded`] wraps
//! each accepted connection, and the proxy phases tell it when a head is in
//! ([`head_received`]) and when the answer is done ([`request_done`]). HTTP/2 connections
//! are left to pingora's `h2_idle_timeout` (`[timeouts] h2_idle`) once their preface is seen.
//!
//! Cost: one timer per connection and two atomic stores per request. The timer is not re-armed
//! per request: it fires at most `min(client_header, client_idle)` apart and, when it does,
//! compares the clock with the phase's real deadline. Re-arming tokio's timer for every new
//! head made it the earliest in the wheel each time, so every request woke the worker's
//! driver through its eventfd: one extra `write` and `epoll_wait` per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::proxy::Session;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Where the connection is, as the proxy reported it (low 2 bits) and a count of reports.
const IDLE: u32 = 0;
const HEAD: u32 = 1;
const BUSY: u32 = 2;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// The deadlines a connection gets.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub client_header: Duration,
    pub client_idle: Duration,
}

/// An accepted connection under the head and idle deadlines.
#[derive(Debug)]
pub struct Guarded {
    inner: Stream,
    deadlines: Deadlines,
    /// Written by the proxy phases: `count << 2 | phase`.
    state: Arc<AtomicU32>,
    /// The state `deadline` was computed for.
    armed: u32,
    /// When the current phase times out; `None` while a request is served (or HTTP/2).
    deadline: Option<Instant>,
    /// Fires at or before `deadline`, never later; at most `step` ahead of its last firing.
    timer: Pin<Box<Sleep>>,
    step: Duration,
    /// HTTP/2 (ALPN or the h2c preface): no head deadlines, pingora's `h2_idle` applies.
    h2: bool,
    first_read: bool,
}

impl Guarded {
    pub fn new(inner: Stream, deadlines: Deadlines) -> Guarded {
        let h2 = matches!(inner.selected_alpn_proto(), Some(ALPN::H2));
        let step =
            (deadlines.client_header.min(deadlines.client_idle)).max(Duration::from_millis(1));
        let mut g = Guarded {
            inner,
            deadlines,
            state: Arc::new(AtomicU32::new(HEAD)),
            armed: u32::MAX,
            deadline: None,
            timer: Box::pin(tokio::time::sleep(step)),
            step,
            h2,
            first_read: true,
        };
        g.rearm();
        g
    }

    /// Sets the deadline for the phase the proxy last reported, if it changed. The timer is
    /// left alone: it already fires no later than `now + step`, and every deadline is at
    /// least `step` away.
    fn rearm(&mut self) {
        let state = self.state.load(Ordering::Acquire);
        if state == self.armed {
            return;
        }
        self.armed = state;
        let wait = match state & 3 {
            _ if self.h2 => None,
            IDLE => Some(self.deadlines.client_idle),
            HEAD => Some(self.deadlines.client_header),
            _ => None,
        };
        self.deadline = wait.map(|d| Instant::now() + d);
    }

    /// Whether the current phase's deadline has passed; otherwise the timer will wake `cx`.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.deadline else {
            return false;
        };
        if self.timer.deadline() > deadline {
            self.timer.as_mut().reset(deadline);
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            // Early (a step) or on time: only the clock says which.
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            self.timer.as_mut().reset((now + self.step).min(deadline));
        }
        false
    }

    fn report(&self, phase: u32) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(((s >> 2).wrapping_add(1) << 2) | phase)
            });
    }

    fn timed_out(&self) -> std::io::Error {
        let what = if self.armed & 3 == IDLE {
            "idle between requests for longer than client_idle"
        } else {
            "request head not received within client_header"
        };
        std::io::Error::new(std::io::ErrorKind::TimedOut, what)
    }
}

fn guarded(session: &Session) -> Option<&Guarded> {
    session
        .as_downstream()
        .stream()
        .and_then(|s| s.as_any().downcast_ref::<Guarded>())
}

/// `request_filter`: the head is in; no deadline while the request is served.
pub fn head_received(session: &Session) {
    if let Some(g) = guarded(session) {
        g.report(BUSY);
    }
}

/// `logging`: the answer is done; the connection may now idle for `client_idle`.
pub fn request_done(session: &Session) {
    if let Some(g) = guarded(session) {
        g.report(IDLE);
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.rearm();
        if r.is_pending() {
            // Only a read that has to wait asks the clock: bytes already here are taken
            // whatever the time, and the next read that waits ends a head that is late.
            if this.expired(cx) {
                return Poll::Ready(Err(this.timed_out()));
            }
            return r;
        }
        let got = &buf.filled()[before..];
        if matches!(r, Poll::Ready(Ok(()))) && !got.is_empty() {
            if this.first_read {
                this.first_read = false;
                let n = got.len().min(H2_PREFACE.len());
                this.h2 |= got[..n] == H2_PREFACE[..n];
            }
            if this.h2 {
                this.deadline = None;
            } else if this.armed & 3 == IDLE {
                // The next request has begun: its head has client_header from here.
                this.report(HEAD);
                this.rearm();
            }
        }
        r
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Guarded {
    /// pingora peeks for the h2c preface before anything else: under the head deadline too.
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        let deadline = Instant::now() + self.deadlines.client_header;
        match tokio::time::timeout_at(deadline, self.inner.try_peek(buf)).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out()),
        }
    }
}
