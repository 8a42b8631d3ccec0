//! The HTML shim (SPEC §5 `inject_shim`): one `<script>` at the start of `<head>` (or before the
//! first element when there is none) that rewrites loopback URLs used by the page, plus the
//! service worker served at `/proxy-sw.js`.
//!
//! Rewriting streams: each upstream chunk is decoded (gzip, deflate, br, zstd) in steps of
//! 64 KiB ([`decode`]) and fed to lol_html, and whatever it has produced so far goes out at
//! once. A compressed body is cut (SPEC §11) past `[limits] rewrite_max` decoded bytes or a
//! 100:1 ratio, so one body-filter call decodes at most `100 × chunk + 1 MiB` (pingora's
//! chunks are at most 64 KiB: about 7.4 MiB). Memory per rewriting response: that call's
//! output, lol_html's buffer (4 MiB at most), one 64 KiB step and the decoder's window (32 KiB
//! gzip/deflate, ≤ 16 MiB br, ≤ 8 MiB zstd). At most `[limits] rewrites` responses are
//! rewritten at once; past that the answer is 503. The scripts are versioned assets in
//! `assets/`, embedded at build time.

mod decode;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header;
use lol_html::html_content::ContentType;
use lol_html::{element, HtmlRewriter, MemorySettings, Settings};

use decode::{Decoder, STEP};

pub const SHIM_JS: &str = include_str!("assets/shim.js");
pub const SW_JS: &str = include_str!("assets/sw.js");

/// lol_html may buffer at most this much of one construct (a huge attribute, say) before it
/// gives up; the page then streams through unrewritten from there on.
const MAX_REWRITER_MEMORY: usize = 4 * 1024 * 1024;

/// What the scripts need to build a sibling-port preview URL of this page's VM.
#[derive(Debug, Clone)]
pub struct ShimConfig<'a> {
    pub label: &'a str,
    pub port_span: std::ops::Range<usize>,
    pub domain: &'a str,
    pub public_port: Option<u16>,
}

impl ShimConfig<'_> {
    /// `{"label":…}` — only `[a-z0-9_.-]` and numbers, so it cannot break out of a script.
    fn json(&self) -> String {
        serde_json::json!({
            "label": self.label,
            "portStart": self.port_span.start,
            "portEnd": self.port_span.end,
            "domain": self.domain,
            "publicPort": self.public_port,
        })
        .to_string()
    }

    /// The `<script>` element inserted into pages.
    pub fn script_tag(&self) -> String {
        format!(
            "<script data-cmux-shim=\"1\">window.__cmuxPreview={};\n{SHIM_JS}</script>",
            self.json()
        )
    }

    /// The body of `/proxy-sw.js`.
    pub fn service_worker(&self) -> String {
        format!("self.__cmuxPreview={};\n{SW_JS}", self.json())
    }
}

/// `/proxy-sw.js` on a port with the shim: the edge's own service worker, answered before the
/// registry is asked.
pub fn serve_worker(
    policy: &crate::policy::Policy,
    req: &pingora::http::RequestHeader,
    shim: &ShimConfig<'_>,
) -> Result<(), crate::respond::Reply> {
    if !policy.inject_shim || req.uri.path() != "/proxy-sw.js" {
        return Ok(());
    }
    Err(crate::respond::Reply::body(
        200,
        "application/javascript; charset=utf-8",
        shim.service_worker().into(),
        "service_worker",
    ))
}

/// The pingora error type of a rewrite refused for want of a `rewrites` slot (answered 503 by
/// `respond::for_error`).
pub const REWRITE_BUSY: pingora::ErrorType = pingora::ErrorType::Custom("rewrite_busy");
/// The pingora error type of a response cut by the limits (the access log's `error`).
pub const REWRITE_LIMIT: pingora::ErrorType = pingora::ErrorType::Custom("rewrite_limit");

/// A rewrite error as pingora's: a limit ends the response (`rewrite_limit`).
pub fn to_pingora(e: RewriteError) -> Box<pingora::Error> {
    let etype = match e {
        RewriteError::Limit { .. } => REWRITE_LIMIT,
        RewriteError::Decode(_) => pingora::ErrorType::Custom("html rewrite"),
    };
    pingora::Error::because(etype, "rewriting", e)
}

/// Starts the HTML shim for this response when it is HTML in an encoding we can decode, and
/// fixes the headers a changed body invalidates. `h1_chunked`: the client speaks HTTP/1.1,
/// so the rewritten body goes out chunked (without a length it would be close-delimited).
/// Every `rewrites` slot taken: an error of type [`REWRITE_BUSY`] (the page is not sent
/// unrewritten: its loopback URLs would break in ways nobody sees in a log).
pub fn start(
    req: &pingora::http::RequestHeader,
    resp: &mut pingora::http::ResponseHeader,
    shim: &ShimConfig<'_>,
    embed: bool,
    h1_chunked: bool,
    limits: RewriteLimits,
) -> pingora::Result<Option<Box<Mutex<HtmlShim>>>> {
    let bodiless = matches!(resp.status.as_u16(), 100..=199 | 204 | 304);
    if req.method == http::Method::HEAD || bodiless {
        return Ok(None);
    }
    let header_str = |n: header::HeaderName| resp.headers.get(n).and_then(|v| v.to_str().ok());
    if !is_html(header_str(header::CONTENT_TYPE)) {
        return Ok(None);
    }
    let Some(encoding) = Encoding::from_header(header_str(header::CONTENT_ENCODING)) else {
        return Ok(None);
    };
    let Some(permit) = Permit::try_acquire(limits.concurrent) else {
        return pingora::Error::e_explain(REWRITE_BUSY, "every [limits] rewrites slot is taken");
    };
    let rewriter = match HtmlShim::new(encoding, shim.script_tag(), embed, limits, permit) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start HTML rewriting; passing through");
            return Ok(None);
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
    if h1_chunked {
        let _ = resp.insert_header(header::TRANSFER_ENCODING, "chunked");
    }
    Ok(Some(Box::new(Mutex::new(rewriter))))
}

/// A `Content-Encoding` the rewriter can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Encoding {
    /// `None` for encodings we cannot undo (or stacked ones): such bodies pass through as is.
    pub fn from_header(value: Option<&str>) -> Option<Encoding> {
        let Some(v) = value.map(str::trim) else {
            return Some(Encoding::Identity);
        };
        match v.to_ascii_lowercase().as_str() {
            "" | "identity" => Some(Encoding::Identity),
            "gzip" | "x-gzip" => Some(Encoding::Gzip),
            "deflate" => Some(Encoding::Deflate),
            "br" => Some(Encoding::Brotli),
            "zstd" => Some(Encoding::Zstd),
            _ => None,
        }
    }
}

/// Output of the rewriter, drained after every chunk.
#[derive(Clone, Default)]
struct Out(Arc<Mutex<Vec<u8>>>);

impl Out {
    fn push(&self, chunk: &[u8]) {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(chunk);
        }
    }

    fn take(&self) -> Bytes {
        self.0
            .lock()
            .map(|mut v| Bytes::from(std::mem::take(&mut *v)))
            .unwrap_or_default()
    }
}

/// Where lol_html writes its output.
type Sink = Box<dyn FnMut(&[u8]) + Send>;
type Rewriter = HtmlRewriter<'static, Sink, lol_html::send::SendHandlerTypes>;

/// Why a rewrite ended the response.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// `[limits] rewrite_max` or the ratio cap: the response is cut (SPEC §11).
    #[error("rewrite limit: {reason} ({decoded} bytes decoded from {encoded})")]
    Limit {
        reason: &'static str,
        decoded: u64,
        encoded: u64,
    },
    /// The compressed body does not decode.
    #[error("cannot decode the body: {0}")]
    Decode(#[from] io::Error),
}

/// One response's streaming rewrite: bounded decoding into lol_html.
pub struct HtmlShim {
    decoder: Decoder,
    rewriter: Option<Rewriter>,
    out: Out,
    /// One decoding step's output, allocated once per response.
    step: Box<[u8]>,
    /// Compressed bytes consumed, bytes decoded from them.
    encoded: u64,
    decoded: u64,
    /// The compressed stream ended: the rest is ignored.
    finished: bool,
    /// A limit was reached: what was decoded before it went out, the next call ends the response.
    cut: Option<RewriteError>,
    limits: RewriteLimits,
    _permit: Permit,
}

impl HtmlShim {
    /// `remove_meta_csp`: with `embed`, a `<meta http-equiv="content-security-policy">` would
    /// undo the header stripping.
    pub fn new(
        encoding: Encoding,
        script: String,
        remove_meta_csp: bool,
        limits: RewriteLimits,
        permit: Permit,
    ) -> io::Result<HtmlShim> {
        let out = Out::default();
        let sink_out = out.clone();
        let sink: Sink = Box::new(move |c: &[u8]| sink_out.push(c));
        let injected = Arc::new(AtomicBool::new(false));
        let (in_head, in_first) = (injected.clone(), injected);
        let script = Arc::new(script);
        let script2 = script.clone();
        let mut settings = Settings::new_send()
            .append_element_content_handler(element!("head", move |el| {
                if !in_head.swap(true, Ordering::Relaxed) {
                    el.prepend(&script, ContentType::Html);
                }
                Ok(())
            }))
            .append_element_content_handler(element!("*", move |el| {
                // No <head> before the first real element: insert in front of it.
                let tag = el.tag_name();
                if tag != "html" && tag != "head" && !in_first.swap(true, Ordering::Relaxed) {
                    el.before(&script2, ContentType::Html);
                }
                Ok(())
            }));
        if remove_meta_csp {
            settings =
                settings.append_element_content_handler(element!("meta[http-equiv]", |el| {
                    let csp = el.get_attribute("http-equiv").is_some_and(|v| {
                        let v = v.trim().to_ascii_lowercase();
                        v == "content-security-policy" || v == "content-security-policy-report-only"
                    });
                    if csp {
                        el.remove();
                    }
                    Ok(())
                }));
        }
        let settings = settings.with_memory_settings(
            MemorySettings::new().with_max_allowed_memory_usage(MAX_REWRITER_MEMORY),
        );
        Ok(HtmlShim {
            decoder: Decoder::new(encoding)?,
            rewriter: Some(HtmlRewriter::new(settings, sink)),
            out,
            step: vec![0; STEP].into_boxed_slice(),
            encoded: 0,
            decoded: 0,
            finished: false,
            cut: None,
            limits,
            _permit: permit,
        })
    }

    /// Hands decoded HTML to lol_html (or, once it gave up, straight out).
    fn feed(&mut self, len: usize) {
        let html = &self.step[..len];
        match self.rewriter.as_mut() {
            Some(r) => {
                if let Err(e) = r.write(html) {
                    // Rewriting is a courtesy: keep the page flowing, unrewritten, from here.
                    tracing::warn!(error = %e, "HTML rewriting stopped; passing the rest through");
                    self.rewriter = None;
                    self.out.push(html);
                }
            }
            None => self.out.push(html),
        }
    }

    /// Decodes `input` step by step, checking the limits after every step, so one call does
    /// at most `100 × input + allowance` of decoding work, and never more than `rewrite_max`.
    fn decode(&mut self, mut input: &[u8]) -> Result<(), RewriteError> {
        let compressed = !matches!(self.decoder, Decoder::Identity);
        while !self.finished {
            let s = self.decoder.step(input, &mut self.step)?;
            input = &input[s.consumed..];
            self.finished = s.finished;
            if compressed {
                self.encoded += s.consumed as u64;
                self.decoded += s.produced as u64;
                self.check()?;
            }
            self.feed(s.produced);
            // Done when the input is used up and the decoder has nothing more to give.
            if input.is_empty() && s.produced < self.step.len() {
                break;
            }
            if s.consumed == 0 && s.produced == 0 {
                break;
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), RewriteError> {
        let reason = if self.decoded > self.limits.max_decoded {
            "rewrite_max"
        } else if self.decoded > RATIO_ALLOWANCE + MAX_RATIO * self.encoded {
            "ratio"
        } else {
            return Ok(());
        };
        Err(RewriteError::Limit {
            reason,
            decoded: self.decoded,
            encoded: self.encoded,
        })
    }

    /// Feeds one upstream chunk; returns what is ready to send.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Bytes, RewriteError> {
        self.decode(chunk)?;
        Ok(self.out.take())
    }

    /// One body-filter step: rewrites `chunk` and, at the end of the stream, flushes the
    /// rest. `None` when nothing is ready: an empty chunk would read as the end of a chunked
    /// body. A [`RewriteError::Limit`] is logged here with reason `rewrite_limit`.
    pub fn filter(
        &mut self,
        chunk: Option<&[u8]>,
        end_of_stream: bool,
    ) -> Result<Option<Bytes>, RewriteError> {
        let result = self.filter_inner(chunk, end_of_stream);
        if let Err(e @ RewriteError::Limit { .. }) = &result {
            tracing::warn!(reason = "rewrite_limit", error = %e, "HTML rewrite over its limit: response cut");
        }
        result
    }

    /// At a limit, what was rewritten before it still goes out (so the client sees a cut
    /// body rather than an error page), and the next call (or the end of the stream) ends the
    /// response.
    fn filter_inner(
        &mut self,
        chunk: Option<&[u8]>,
        end_of_stream: bool,
    ) -> Result<Option<Bytes>, RewriteError> {
        if let Some(e) = self.cut.take() {
            return Err(e);
        }
        if let Some(chunk) = chunk {
            if let Err(e) = self.decode(chunk) {
                if end_of_stream || matches!(e, RewriteError::Decode(_)) {
                    return Err(e);
                }
                self.cut = Some(e);
            }
        }
        if end_of_stream {
            self.end();
        }
        let out = self.out.take();
        Ok((!out.is_empty()).then_some(out))
    }

    /// Ends the document; returns the rest.
    pub fn finish(&mut self) -> Result<Bytes, RewriteError> {
        self.end();
        Ok(self.out.take())
    }

    fn end(&mut self) {
        if let Some(r) = self.rewriter.take() {
            if let Err(e) = r.end() {
                tracing::warn!(error = %e, "HTML rewriting failed at end of document");
            }
        }
    }
}

/// `[limits] rewrite_max` and `rewrites` (SPEC §11): they always apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RewriteLimits {
    /// Decoded bytes of one compressed body past which the response is cut.
    pub max_decoded: u64,
    /// Responses rewritten at once; past that, 503.
    pub concurrent: usize,
}

impl Default for RewriteLimits {
    fn default() -> Self {
        RewriteLimits {
            max_decoded: 16 << 20,
            concurrent: 256,
        }
    }
}

/// Decoded/encoded above this is a bomb...
const MAX_RATIO: u64 = 100;
/// ...once this much is decoded (small pages compress far better than 100:1).
const RATIO_ALLOWANCE: u64 = 1 << 20;

/// Rewrites under way, all generations together.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// One of the `rewrites` slots, given back on drop.
#[derive(Debug)]
pub struct Permit(&'static AtomicUsize);

impl Permit {
    /// A slot when fewer than `max` rewrites are under way.
    pub fn try_acquire(max: usize) -> Option<Permit> {
        Permit::try_acquire_in(&ACTIVE, max)
    }

    fn try_acquire_in(active: &'static AtomicUsize, max: usize) -> Option<Permit> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(active))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a `Content-Type` is HTML (case-insensitive, parameters ignored).
pub fn is_html(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|c| c.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shim(encoding: Encoding, limits: RewriteLimits) -> HtmlShim {
        let permit = Permit::try_acquire(usize::MAX).unwrap();
        HtmlShim::new(encoding, "<script>S</script>".into(), true, limits, permit).unwrap()
    }

    fn run(encoding: Encoding, body: &[u8], chunk: usize) -> String {
        let mut shim = shim(encoding, RewriteLimits::default());
        let mut out = Vec::new();
        for c in body.chunks(chunk) {
            out.extend_from_slice(&shim.push(c).unwrap());
        }
        out.extend_from_slice(&shim.finish().unwrap());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn script_goes_at_the_start_of_head() {
        let html = "<!doctype html><html><head><title>t</title></head><body>x</body></html>";
        assert_eq!(
            run(Encoding::Identity, html.as_bytes(), 7),
            "<!doctype html><html><head><script>S</script><title>t</title></head><body>x</body></html>"
        );
    }

    #[test]
    fn without_head_it_goes_before_the_first_element() {
        assert_eq!(
            run(Encoding::Identity, b"<html><body><p>x</p></body></html>", 3),
            "<html><script>S</script><body><p>x</p></body></html>"
        );
        assert_eq!(
            run(Encoding::Identity, b"<div>x</div>", 100),
            "<script>S</script><div>x</div>"
        );
    }

    #[test]
    fn meta_csp_is_removed() {
        let html = "<head><meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'\"><meta charset=utf-8></head>";
        let out = run(Encoding::Identity, html.as_bytes(), 5);
        assert!(!out.contains("Content-Security-Policy"), "{out}");
        assert!(out.contains("charset"));
    }

    #[test]
    fn compressed_bodies_are_decoded() {
        let html = b"<html><head></head><body>hello</body></html>";
        let expect = "<html><head><script>S</script></head><body>hello</body></html>";
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(html).unwrap();
        assert_eq!(run(Encoding::Gzip, &gz.finish().unwrap(), 4), expect);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(html).unwrap();
        assert_eq!(run(Encoding::Deflate, &z.finish().unwrap(), 4), expect);
        let mut br = Vec::new();
        brotli::BrotliCompress(&mut &html[..], &mut br, &Default::default()).unwrap();
        assert_eq!(run(Encoding::Brotli, &br, 4), expect);
        let zs = zstd::encode_all(&html[..], 3).unwrap();
        assert_eq!(run(Encoding::Zstd, &zs, 4), expect);
    }

    /// Pushes `body` in `chunk`-byte pieces until the shim refuses; the output so far.
    fn until_cut(shim: &mut HtmlShim, body: &[u8], chunk: usize) -> (usize, Option<&'static str>) {
        let mut sent = 0;
        for c in body.chunks(chunk) {
            match shim.push(c) {
                Ok(out) => sent += out.len(),
                Err(RewriteError::Limit { reason, .. }) => return (sent, Some(reason)),
                Err(e) => panic!("{e}"),
            }
        }
        (sent, None)
    }

    #[test]
    fn a_bomb_is_cut_at_the_ratio_and_no_step_decodes_much() {
        // 64 MiB of zeros: about 64 KiB of gzip, a ratio of ~1000:1.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut zeros = io::Read::take(io::repeat(0), 64 << 20);
        io::copy(&mut zeros, &mut gz).unwrap();
        let bomb = gz.finish().unwrap();
        let mut s = shim(Encoding::Gzip, RewriteLimits::default());
        let (sent, reason) = until_cut(&mut s, &bomb, 1024);
        assert_eq!(reason, Some("ratio"));
        assert!(s.decoded <= RATIO_ALLOWANCE + MAX_RATIO * s.encoded + STEP as u64);
        assert!(sent < 4 << 20, "{sent}");
    }

    #[test]
    fn rewrite_max_cuts_a_large_compressible_page() {
        // Varied text (a few to one), beyond rewrite_max.
        let mut x: u32 = 1;
        let page: Vec<u8> = (0..400_000)
            .flat_map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                format!("<p>{}</p>", x >> 16).into_bytes()
            })
            .collect();
        let zs = zstd::encode_all(&page[..], 3).unwrap();
        let limits = RewriteLimits {
            max_decoded: 1 << 20,
            concurrent: 1,
        };
        let mut s = shim(Encoding::Zstd, limits);
        let (sent, reason) = until_cut(&mut s, &zs, 4096);
        assert_eq!(reason, Some("rewrite_max"));
        assert!(sent <= (1 << 20) + 1024, "{sent}");
        // Under the limit, the same page goes through whole.
        let mut s = shim(Encoding::Zstd, RewriteLimits::default());
        assert_eq!(until_cut(&mut s, &zs, 4096).1, None);
    }

    #[test]
    fn plain_html_is_not_capped() {
        let page = vec![b'x'; 3 << 20];
        let limits = RewriteLimits {
            max_decoded: 1 << 20,
            concurrent: 1,
        };
        let mut s = shim(Encoding::Identity, limits);
        let (sent, reason) = until_cut(&mut s, &page, 100_000);
        assert_eq!(reason, None);
        assert!(sent > 2 << 20);
    }

    #[test]
    fn rewrite_slots_are_bounded_and_given_back() {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let a = Permit::try_acquire_in(&COUNT, 2).unwrap();
        let _b = Permit::try_acquire_in(&COUNT, 2).unwrap();
        assert!(Permit::try_acquire_in(&COUNT, 2).is_none());
        drop(a);
        assert!(Permit::try_acquire_in(&COUNT, 2).is_some());
    }

    #[test]
    fn encodings_and_html_detection() {
        assert_eq!(Encoding::from_header(None), Some(Encoding::Identity));
        assert_eq!(Encoding::from_header(Some("GZIP")), Some(Encoding::Gzip));
        assert_eq!(Encoding::from_header(Some("gzip, br")), None);
        assert_eq!(Encoding::from_header(Some("compress")), None);
        assert!(is_html(Some("Text/HTML; charset=utf-8")));
        assert!(!is_html(Some("text/html-sandboxed")));
        assert!(!is_html(Some("application/json")));
        assert!(!is_html(None));
    }

    #[test]
    fn the_config_blob_cannot_close_the_script() {
        let c = ShimConfig {
            label: "port-3000-vm-a",
            port_span: 5..9,
            domain: "localhost",
            public_port: Some(8080),
        };
        let tag = c.script_tag();
        assert!(tag.starts_with("<script data-cmux-shim=\"1\">window.__cmuxPreview={"));
        assert_eq!(tag.matches("</script>").count(), 1);
        assert!(c.service_worker().contains("\"portStart\":5"));
    }
}
