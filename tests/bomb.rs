//! Compression bombs against the HTML shim (SPEC §11): a 1 GiB page of zeros, compressed
//! (gzip, deflate, br, zstd), behind a port with `inject_shim = true`. The edge must end the
//! response (502 when nothing went out yet, else a chunked body without its terminating chunk),
//! its peak RSS must grow by less than 64 MiB, and a normal request sent meanwhile must still
//! be answered (within 10 s: generous, the old code made it wait for the whole bomb).

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use support::{raw, spawn_http, vm_hwm_kib, Edge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Decoded size of every bomb.
const DECODED: u64 = 1 << 30;

/// 1 GiB of zeros, compressed as `enc` in a streaming way (never 1 GiB in memory).
fn bomb(enc: &str) -> Vec<u8> {
    let mut zeros = std::io::Read::take(std::io::repeat(0), DECODED);
    match enc {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            std::io::copy(&mut zeros, &mut e).unwrap();
            e.finish().unwrap()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
            std::io::copy(&mut zeros, &mut e).unwrap();
            e.finish().unwrap()
        }
        "br" => {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 1 << 16, 5, 22);
                std::io::copy(&mut zeros, &mut e).unwrap();
                e.flush().unwrap();
            }
            out
        }
        "zstd" => {
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            std::io::copy(&mut zeros, &mut e).unwrap();
            e.finish().unwrap()
        }
        _ => unreachable!(),
    }
}

/// A backend: `/bomb` answers the bomb as HTML in `enc`, anything else a small page.
async fn backend(enc: &'static str) -> (u16, usize) {
    let body = Bytes::from(
        tokio::task::spawn_blocking(move || bomb(enc))
            .await
            .unwrap(),
    );
    let encoded = body.len();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    spawn_http(listener, move |req| {
        let body = body.clone();
        async move {
            if req.uri().path() == "/bomb" {
                Response::builder()
                    .header("content-type", "text/html")
                    .header("content-encoding", enc)
                    .body(Full::new(body))
                    .unwrap()
            } else {
                Response::builder()
                    .header("content-type", "text/plain")
                    .body(Full::new(Bytes::from_static(b"fine")))
                    .unwrap()
            }
        }
    });
    (port, encoded)
}

/// Reads a response to the end (or 128 MiB, or 120 s); returns the raw bytes read.
async fn read_all(mut s: TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(120);
    while buf.len() < 128 << 20 {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf
}

async fn bomb_is_cut(enc: &'static str) {
    support::install_crypto();
    let (b, encoded) = backend(enc).await;
    let edge = Edge::start(&format!(
        "[[registry.vms]]\nid = \"v\"\naddress = \"127.0.0.1\"\nports = {{ 39378 = {b} }}\n\n\
         [[policy]]\nport = 39378\ninject_shim = true\nembed = false\n"
    ))
    .await;
    let host = Edge::host(39378, "v");
    // Warm up, so the baseline includes what any request costs.
    let ok = raw(edge.http, &host, "GET", "/ok", &[], b"").await.unwrap();
    assert_eq!(ok.status, 200);
    let pid = edge.child.id();
    let before = vm_hwm_kib(pid);

    let mut s = TcpStream::connect(edge.http).await.unwrap();
    s.write_all(format!("GET /bomb HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let reader = tokio::spawn(read_all(s));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile, another client is served by the same (single) worker.
    let t = Instant::now();
    let other = tokio::time::timeout(
        Duration::from_secs(10),
        raw(edge.http, &host, "GET", "/ok", &[], b""),
    )
    .await;
    let other_ms = t.elapsed().as_millis();
    let got = reader.await.unwrap();
    let after = vm_hwm_kib(pid);
    let growth_mib = (after.saturating_sub(before)) as f64 / 1024.0;
    eprintln!(
        "bomb {enc}: {encoded} bytes encoded, VmHWM {before} -> {after} KiB (+{growth_mib:.1} MiB), \
         client got {} bytes, concurrent request answered in {other_ms} ms",
        got.len()
    );
    let other = other
        .expect("a normal request waited behind the bomb")
        .unwrap();
    assert_eq!(other.status, 200);
    assert!(
        growth_mib < 64.0,
        "{enc}: peak RSS grew by {growth_mib:.1} MiB"
    );
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    // Either the edge caught the bomb before the head went out (502), or the body is cut:
    // the connection closed without the terminating chunk. Never the bomb.
    if head.starts_with("http/1.1 502") {
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.ends_with("upstream page too large to rewrite: vm v port 39378\n"),
            "{text}"
        );
    } else {
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(!got.ends_with(b"0\r\n\r\n"), "{enc}: the bomb was not cut");
    }
    assert!(got.len() < 64 << 20, "{enc}: {} bytes sent", got.len());
}

#[tokio::test]
async fn gzip_bomb_is_cut() {
    bomb_is_cut("gzip").await;
}

#[tokio::test]
async fn deflate_bomb_is_cut() {
    bomb_is_cut("deflate").await;
}

#[tokio::test]
async fn br_bomb_is_cut() {
    bomb_is_cut("br").await;
}

#[tokio::test]
async fn zstd_bomb_is_cut() {
    bomb_is_cut("zstd").await;
}
