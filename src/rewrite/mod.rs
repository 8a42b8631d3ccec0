//! The HTML shim (SPEC §5 `inject_shim`): one `<script>` at the start of `<head>` (or before the
//! first element when there is none) that rewrites loopback URLs used by the page, plus the
//! service worker served at `/proxy-sw.js`.
//!
//! Rewriting streams: each upstream chunk is decoded (gzip, deflate, br, zstd) and fed to
//! lol_html, and whatever it has produced so far goes out at once. Memory stays bounded by
//! lol_html's per-tag buffering, whatever the body size. The scripts are versioned assets in
//! `assets/`, embedded at build time.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header;
use lol_html::html_content::ContentType;
use lol_html::{element, HtmlRewriter, MemorySettings, Settings};

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

/// Starts the HTML shim for this response when it is HTML in an encoding we can decode, and
/// fixes the headers a changed body invalidates. `h1_chunked`: the client speaks HTTP/1.1,
/// so the rewritten body goes out chunked (without a length it would be close-delimited).
pub fn start(
    req: &pingora::http::RequestHeader,
    resp: &mut pingora::http::ResponseHeader,
    shim: &ShimConfig<'_>,
    embed: bool,
    h1_chunked: bool,
) -> Option<Mutex<HtmlShim>> {
    let bodiless = matches!(resp.status.as_u16(), 100..=199 | 204 | 304);
    if req.method == http::Method::HEAD || bodiless {
        return None;
    }
    let header_str = |n: header::HeaderName| resp.headers.get(n).and_then(|v| v.to_str().ok());
    if !is_html(header_str(header::CONTENT_TYPE)) {
        return None;
    }
    let encoding = Encoding::from_header(header_str(header::CONTENT_ENCODING))?;
    let rewriter = match HtmlShim::new(encoding, shim.script_tag(), embed) {
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
    if h1_chunked {
        let _ = resp.insert_header(header::TRANSFER_ENCODING, "chunked");
    }
    Some(Mutex::new(rewriter))
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

/// The end of the decoder chain: decoded HTML in, lol_html.
struct Feed {
    rewriter: Option<Rewriter>,
    out: Out,
}

impl Write for Feed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.rewriter.as_mut() {
            Some(r) => {
                if let Err(e) = r.write(buf) {
                    // Rewriting is a courtesy: keep the page flowing, unrewritten, from here.
                    tracing::warn!(error = %e, "HTML rewriting stopped; passing the rest through");
                    self.rewriter = None;
                    self.out.push(buf);
                }
            }
            None => self.out.push(buf),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Feed {
    fn end(&mut self) {
        if let Some(r) = self.rewriter.take() {
            if let Err(e) = r.end() {
                tracing::warn!(error = %e, "HTML rewriting failed at end of document");
            }
        }
    }
}

enum Chain {
    Plain(Feed),
    Gzip(flate2::write::MultiGzDecoder<Feed>),
    Deflate(flate2::write::ZlibDecoder<Feed>),
    Brotli(Box<brotli::DecompressorWriter<Feed>>),
    Zstd(zstd::stream::write::Decoder<'static, Feed>),
}

/// One response's streaming rewrite.
pub struct HtmlShim {
    chain: Option<Chain>,
    out: Out,
}

impl HtmlShim {
    /// `remove_meta_csp`: with `embed`, a `<meta http-equiv="content-security-policy">` would
    /// undo the header stripping.
    pub fn new(encoding: Encoding, script: String, remove_meta_csp: bool) -> io::Result<HtmlShim> {
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
        let feed = Feed {
            rewriter: Some(HtmlRewriter::new(settings, sink)),
            out: out.clone(),
        };
        let chain = match encoding {
            Encoding::Identity => Chain::Plain(feed),
            Encoding::Gzip => Chain::Gzip(flate2::write::MultiGzDecoder::new(feed)),
            Encoding::Deflate => Chain::Deflate(flate2::write::ZlibDecoder::new(feed)),
            Encoding::Brotli => {
                Chain::Brotli(Box::new(brotli::DecompressorWriter::new(feed, 4096)))
            }
            Encoding::Zstd => Chain::Zstd(zstd::stream::write::Decoder::new(feed)?),
        };
        Ok(HtmlShim {
            chain: Some(chain),
            out,
        })
    }

    /// Feeds one upstream chunk; returns what is ready to send.
    pub fn push(&mut self, chunk: &[u8]) -> io::Result<Bytes> {
        match self.chain.as_mut() {
            Some(Chain::Plain(f)) => f.write_all(chunk)?,
            Some(Chain::Gzip(d)) => d.write_all(chunk)?,
            Some(Chain::Deflate(d)) => d.write_all(chunk)?,
            Some(Chain::Brotli(d)) => d.write_all(chunk)?,
            Some(Chain::Zstd(d)) => d.write_all(chunk)?,
            None => {}
        }
        Ok(self.out.take())
    }

    /// One body-filter step: rewrites `chunk` and, at the end of the stream, flushes the
    /// rest. `None` when nothing is ready: an empty chunk would read as the end of a chunked
    /// body.
    pub fn filter(
        &mut self,
        chunk: Option<&[u8]>,
        end_of_stream: bool,
    ) -> io::Result<Option<Bytes>> {
        let mut out = match chunk {
            Some(chunk) => self.push(chunk)?,
            None => Bytes::new(),
        };
        if end_of_stream {
            let rest = self.finish()?;
            if out.is_empty() {
                out = rest;
            } else if !rest.is_empty() {
                let mut joined = Vec::with_capacity(out.len() + rest.len());
                joined.extend_from_slice(&out);
                joined.extend_from_slice(&rest);
                out = joined.into();
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }

    /// Ends the document; returns the rest.
    pub fn finish(&mut self) -> io::Result<Bytes> {
        let mut feed = match self.chain.take() {
            Some(Chain::Plain(f)) => f,
            Some(Chain::Gzip(d)) => d.finish()?,
            Some(Chain::Deflate(d)) => d.finish()?,
            Some(Chain::Brotli(d)) => d
                .into_inner()
                .map_err(|_| io::Error::other("truncated brotli stream"))?,
            Some(Chain::Zstd(mut d)) => {
                d.flush()?;
                d.into_inner()
            }
            None => return Ok(Bytes::new()),
        };
        feed.end();
        Ok(self.out.take())
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

    fn run(encoding: Encoding, body: &[u8], chunk: usize) -> String {
        let mut shim = HtmlShim::new(encoding, "<script>S</script>".into(), true).unwrap();
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
