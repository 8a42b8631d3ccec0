//! Wake-to-first-byte (SPEC §13, issue 14's benchmark): a paused VM behind a control plane
//! whose resume hook takes 1 s, woken 20 times by a plain `GET`; prints each wake's time from
//! the request to the first response byte, and the distribution.
//!
//! `cargo build --release && cargo run --release --example wake_latency -- target/release/cmux-edge`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOOK: Duration = Duration::from_secs(1);
const WAKES: usize = 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The VM: answers every request `200 ok` until paused (its listener task aborted).
fn start_backend(port: u16) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    })
}

struct Vm {
    paused: bool,
    backend: Option<tokio::task::JoinHandle<()>>,
}

#[tokio::main]
async fn main() {
    let binary = std::env::args()
        .nth(1)
        .expect("usage: wake_latency <cmux-edge binary>");
    let backend_port = free_port();
    let vm = Arc::new(Mutex::new(Vm {
        paused: true,
        backend: None,
    }));
    let cp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_addr = cp.local_addr().unwrap();
    {
        let vm = vm.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = cp.accept().await else {
                    return;
                };
                let vm = vm.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| {
                            let vm = vm.clone();
                            async move {
                                if req.uri().path().ends_with("/resume") {
                                    // the 1 s hook: the VM is up when it answers
                                    tokio::time::sleep(HOOK).await;
                                    let mut v = vm.lock().unwrap();
                                    v.backend = Some(start_backend(backend_port));
                                    v.paused = false;
                                    return Ok::<_, Infallible>(Response::new(Full::new(
                                        Bytes::new(),
                                    )));
                                }
                                let state = if vm.lock().unwrap().paused {
                                    "paused"
                                } else {
                                    "running"
                                };
                                let body = format!(
                                    r#"{{"address":"127.0.0.1","ports":{{"80":{backend_port}}},"state":"{state}"}}"#
                                );
                                Ok(Response::new(Full::new(Bytes::from(body))))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nthreads = 1\n\n[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n\
             [[domains]]\nname = \"edge.test\"\n\n\
             [registry]\nsource = \"http\"\nurl = \"http://{cp_addr}/vms/{{id}}\"\ncache_ttl = \"50ms\"\nnegative_ttl = \"50ms\"\n\n\
             [wake]\nurl = \"http://{cp_addr}/vms/{{id}}/resume\"\ntimeout = \"30s\"\n\n\
             [[policy]]\nport = \"*\"\ninject_shim = false\n"
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(&binary)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "error")
        .spawn()
        .expect("start cmux-edge");
    while TcpStream::connect(http).await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut samples = Vec::with_capacity(WAKES);
    for i in 0..WAKES {
        // pause: the backend goes away and the registry says paused; let the cache expire
        {
            let mut v = vm.lock().unwrap();
            v.paused = true;
            if let Some(b) = v.backend.take() {
                b.abort();
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut s = TcpStream::connect(http).await.unwrap();
        let t0 = Instant::now();
        s.write_all(
            b"GET / HTTP/1.1\r\nHost: port-80-vm-b1.edge.test\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut first = [0u8; 1];
        s.read_exact(&mut first).await.unwrap();
        let took = t0.elapsed();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        let head = String::from_utf8_lossy(&rest);
        assert!(head.starts_with("TTP/1.1 200"), "wake {i}: {head}");
        println!("wake {:2}: {:7.1} ms", i + 1, took.as_secs_f64() * 1000.0);
        samples.push(took);
    }
    let _ = child.kill();
    let _ = child.wait();
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "hook {} ms, {WAKES} wakes: min {:.1} ms, p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms; over the hook: p50 {:.1} ms, max {:.1} ms",
        HOOK.as_millis(),
        ms(samples[0]),
        ms(pct(0.5)),
        ms(pct(0.9)),
        ms(samples[samples.len() - 1]),
        ms(pct(0.5)) - ms(HOOK),
        ms(samples[samples.len() - 1]) - ms(HOOK),
    );
}
