//! Slow and idle clients (SPEC §11 `[timeouts]`): a request head trickled a byte at a time is
//! cut after `client_header`, for the first request of a connection and for a later one; a
//! kept-alive connection that sends nothing is closed after `client_idle`. The answers come from
//! the edge itself (a host under no domain: 421), so no backend is needed.

mod support;

use std::time::{Duration, Instant};

use support::Edge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Short deadlines so the tests are quick; every policy key the tests rely on is set.
const TIMEOUTS: &str = "[timeouts]\nclient_header = \"2s\"\nclient_idle = \"2s\"\n\n\
                        [[policy]]\nport = \"*\"\ninject_shim = false\n";

/// Longer than any deadline above, on a loaded machine.
const GIVE_UP: Duration = Duration::from_secs(20);

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: nope.example\r\n\r\n";

/// Reads one response with a `Content-Length` body; panics if the connection closes first.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(GIVE_UP, s.read(&mut chunk))
            .await
            .expect("response timed out")
            .expect("read");
        assert!(n > 0, "closed before a response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

/// Trickles `REQUEST` a byte every 300 ms until the edge closes; how long that took.
async fn trickle_until_closed(s: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut bytes = REQUEST.iter().cycle();
    let mut sink = [0u8; 1024];
    while start.elapsed() < GIVE_UP {
        let byte = [*bytes.next().unwrap()];
        if s.write_all(&byte).await.is_err() {
            return start.elapsed();
        }
        // Closed (EOF, reset, or an error answer followed by close)?
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    panic!("a trickled request head kept the connection open for {GIVE_UP:?}");
}

#[tokio::test]
async fn a_trickled_first_head_is_cut_after_client_header() {
    let edge = Edge::start(TIMEOUTS).await;
    let mut s = TcpStream::connect(edge.http).await.unwrap();
    let took = trickle_until_closed(&mut s).await;
    eprintln!("first head trickled: closed after {took:?}");
}

#[tokio::test]
async fn a_trickled_later_head_is_cut_after_client_header() {
    let edge = Edge::start(TIMEOUTS).await;
    let mut s = TcpStream::connect(edge.http).await.unwrap();
    s.write_all(REQUEST).await.unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 421"));
    let took = trickle_until_closed(&mut s).await;
    eprintln!("later head trickled: closed after {took:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_client_idle() {
    let edge = Edge::start(TIMEOUTS).await;
    let mut s = TcpStream::connect(edge.http).await.unwrap();
    // Requests that keep coming are served on the same connection, idle or not in between.
    for _ in 0..2 {
        s.write_all(REQUEST).await.unwrap();
        assert!(read_response(&mut s).await.starts_with("HTTP/1.1 421"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let start = Instant::now();
    let mut sink = [0u8; 64];
    let n = tokio::time::timeout(GIVE_UP, s.read(&mut sink))
        .await
        .expect("an idle keep-alive connection stayed open")
        .unwrap_or(0);
    assert_eq!(n, 0, "unexpected bytes on an idle connection");
    eprintln!("idle keep-alive: closed after {:?}", start.elapsed());
}
