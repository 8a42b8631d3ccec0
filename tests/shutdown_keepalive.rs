//! SIGTERM with keep-alive clients, as nginx does it: idle keep-alive connections are closed
//! cleanly (FIN, never a reset), in-flight requests finish. A keep-alive client that sends its
//! next request during the grace period gets it served or a clean close.

mod support;

use std::time::Duration;

use support::{echo_backend, Edge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const POLICY: &str = "[[policy]]\nport = \"*\"\ninject_shim = false\nembed = false\n";

/// Reads one response with a `Content-Length` body off a keep-alive connection.
async fn read_one(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .expect("content-length");
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn a_keep_alive_client_gets_its_next_request_served_or_a_clean_close() {
    let backend = echo_backend().await;
    let edge = Edge::start(&format!(
        "[[registry.vms]]\nid = \"a\"\naddress = \"127.0.0.1\"\n\n{POLICY}\n"
    ))
    .await;
    let host = Edge::host(backend.port(), "a");
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");

    let mut idle = TcpStream::connect(edge.http).await.unwrap();
    idle.write_all(request("/first").as_bytes()).await.unwrap();
    let first = read_one(&mut idle).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    // A slow request keeps the process in its grace period.
    let mut slow = TcpStream::connect(edge.http).await.unwrap();
    slow.write_all(request("/slow?ms=2500").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    edge.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The idle connection's next request, during the grace period.
    let sent = idle.write_all(request("/second").as_bytes()).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), idle.read_to_end(&mut rest))
        .await
        .expect("an answer or a close in time");
    match (sent, read) {
        (Ok(()), Ok(_)) if rest.is_empty() => {} // a clean close: the client retries elsewhere
        (Ok(()), Ok(_)) => {
            let text = String::from_utf8_lossy(&rest);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        }
        (sent, read) => panic!("not a clean close: write {sent:?}, read {read:?}"),
    }

    // The in-flight request finishes, with a close.
    let done = read_one(&mut slow).await;
    assert!(done.starts_with("HTTP/1.1 200"), "{done}");
    assert!(
        done.to_ascii_lowercase().contains("connection: close"),
        "a draining edge does not offer keep-alive: {done}"
    );
}
