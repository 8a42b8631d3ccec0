//! The load generator for what wrk and h2load cannot do, used by `benches/compare`. One
//! thread (the harness pins it to the load core). Every mode prints one JSON line.
//!
//! - `ws-echo`: `--conns` WebSockets each doing back-to-back echo round trips (closed loop):
//!   round trips per second and latency percentiles.
//! - `ws-idle`: opens `--conns` WebSockets (each proves itself with one echo), prints
//!   `{"ready": n, ...}`, then holds them until stdin closes or `--secs` pass.
//! - `http-rate`: HTTP/1.1 GETs at a fixed total `--rate` over `--conns` keep-alive
//!   connections (open loop). Latency counts from the scheduled send time whenever the
//!   connection was still busy with the previous request, so a stall is not hidden
//!   (coordinated omission), but the timer's own slack is not charged to the server.
//! - `tls-new`: `--conns` loops of connect + full TLS handshake (`--resume`: resumed) + one
//!   `GET` + close: new TLS connections per second. The client skips certificate and
//!   signature verification: it drives the server's handshake without paying for the
//!   costlier ECDSA verify itself.
//!
//! usage: bench_load MODE --addr IP:PORT --host HOST [--path P] [--conns N] [--secs S]
//!        [--warmup S] [--rate R] [--size BYTES]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

struct Opts {
    addr: SocketAddr,
    host: String,
    path: String,
    conns: usize,
    secs: f64,
    warmup: f64,
    rate: f64,
    size: usize,
    /// `tls-new`: resume TLS sessions (tickets) instead of a full handshake each time.
    resume: bool,
}

/// What one run measured. `bad_status` is a wrong answer (the harness fails on it);
/// `errors` are connections that broke (reported, not fatal).
#[derive(Default)]
struct Outcome {
    ops: u64,
    errors: u64,
    bad_status: u64,
    latencies_us: Vec<u32>,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.ops += o.ops;
        self.errors += o.errors;
        self.bad_status += o.bad_status;
        self.latencies_us.extend(o.latencies_us);
    }

    fn print(mut self, secs: f64) {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> u32 {
            let v = &self.latencies_us;
            if v.is_empty() {
                return 0;
            }
            v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
        };
        println!(
            "{{\"ops\": {}, \"secs\": {:.3}, \"rate\": {:.1}, \"p50_us\": {}, \"p99_us\": {}, \"p999_us\": {}, \"max_us\": {}, \"errors\": {}, \"bad_status\": {}}}",
            self.ops,
            secs,
            self.ops as f64 / secs,
            pct(0.50),
            pct(0.99),
            pct(0.999),
            pct(1.0),
            self.errors,
            self.bad_status
        );
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

async fn ws_connect(o: &Opts) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let tcp = TcpStream::connect(o.addr).await?;
    tcp.set_nodelay(true)?;
    let req = format!("ws://{}{}", o.host, o.path).into_client_request()?;
    let (ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
    Ok(ws)
}

/// One echo round trip; `false` when the answer was not our message back.
async fn echo(ws: &mut WebSocketStream<TcpStream>, msg: &Message) -> anyhow::Result<bool> {
    ws.send(msg.clone()).await?;
    loop {
        match ws.next().await {
            Some(Ok(m)) if m.is_text() => return Ok(&m == msg),
            Some(Ok(m)) if m.is_ping() || m.is_pong() => continue,
            Some(Ok(_)) => return Ok(false),
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("closed"),
        }
    }
}

async fn ws_echo(o: Arc<Opts>) -> Outcome {
    let msg = Message::text("x".repeat(o.size));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(o.warmup);
    let end = measure_from + Duration::from_secs_f64(o.secs);
    let tasks: Vec<_> = (0..o.conns)
        .map(|_| {
            let (o, msg) = (o.clone(), msg.clone());
            tokio::spawn(async move {
                let mut out = Outcome::default();
                let mut ws = match ws_connect(&o).await {
                    Ok(ws) => ws,
                    Err(e) => {
                        eprintln!("ws connect: {e}");
                        out.errors += 1;
                        return out;
                    }
                };
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    match echo(&mut ws, &msg).await {
                        Ok(true) if t >= measure_from => {
                            out.ops += 1;
                            out.latencies_us.push(micros(t.elapsed()));
                        }
                        Ok(true) => {}
                        Ok(false) => {
                            out.bad_status += 1;
                            break;
                        }
                        Err(e) => {
                            eprintln!("ws echo: {e}");
                            out.errors += 1;
                            break;
                        }
                    }
                }
                let _ = ws.close(None).await;
                out
            })
        })
        .collect();
    let mut all = Outcome::default();
    for t in tasks {
        all.merge(t.await.unwrap_or_default());
    }
    all
}

async fn ws_idle(o: Arc<Opts>) -> anyhow::Result<()> {
    let msg = Message::text("x".repeat(o.size));
    let started = Instant::now();
    // Open at most 256 at a time: a SYN flood would measure the accept backlog instead.
    let mut opened = futures_util::stream::iter(0..o.conns)
        .map(|_| {
            let (o, msg) = (o.clone(), msg.clone());
            async move {
                let mut ws = ws_connect(&o).await?;
                anyhow::ensure!(echo(&mut ws, &msg).await?, "wrong echo");
                anyhow::Ok(ws)
            }
        })
        .buffer_unordered(256);
    let (mut held, mut failed, mut first_error) = (Vec::with_capacity(o.conns), 0, None);
    while let Some(r) = opened.next().await {
        match r {
            Ok(ws) => held.push(ws),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    println!(
        "{{\"ready\": {}, \"failed\": {}, \"open_secs\": {:.2}, \"first_error\": {:?}}}",
        held.len(),
        failed,
        started.elapsed().as_secs_f64(),
        first_error.unwrap_or_default()
    );
    // The harness reads the proxy's memory now, then closes our stdin.
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let hold = async { while stdin.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs_f64(o.secs), hold).await;
    drop(held);
    Ok(())
}

async fn http_rate(o: Arc<Opts>) -> anyhow::Result<Outcome> {
    let interval = Duration::from_secs_f64(o.conns as f64 / o.rate);
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + Duration::from_secs_f64(o.warmup);
    let end = measure_from + Duration::from_secs_f64(o.secs);
    let mut tasks = Vec::new();
    for i in 0..o.conns {
        let tcp = TcpStream::connect(o.addr).await?;
        tcp.set_nodelay(true)?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let o = o.clone();
        // Connections are staggered so the total rate is smooth.
        let first = start + interval.mul_f64(i as f64 / o.conns as f64);
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut k = 0u32;
            let mut busy_until = first;
            loop {
                let scheduled = first + interval * k;
                k += 1;
                if scheduled >= end {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                let sent = Instant::now();
                // A connection still busy past its slot: the wait is the server's doing.
                let from = if busy_until > scheduled {
                    scheduled
                } else {
                    sent
                };
                let req = http::Request::get(&o.path)
                    .header(http::header::HOST, &o.host)
                    .body(Empty::<Bytes>::new())
                    .expect("static request");
                let res = async {
                    let resp = send.send_request(req).await?;
                    let status = resp.status();
                    resp.into_body().collect().await?;
                    anyhow::Ok(status)
                }
                .await;
                busy_until = Instant::now();
                match res {
                    Ok(s) if s == http::StatusCode::OK => {
                        if scheduled >= measure_from {
                            out.ops += 1;
                            out.latencies_us.push(micros(busy_until - from));
                        }
                    }
                    Ok(s) => {
                        eprintln!("http-rate: status {s}");
                        out.bad_status += 1;
                    }
                    Err(e) => {
                        eprintln!("http-rate: {e}");
                        out.errors += 1;
                        break;
                    }
                }
            }
            out
        }));
    }
    let mut all = Outcome::default();
    for t in tasks {
        all.merge(t.await.unwrap_or_default());
    }
    Ok(all)
}

/// Accepts any certificate: the load generator measures the server, not itself.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Handshakes that resumed a session (`tls-new --resume`).
static RESUMED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn tls_new(o: Arc<Opts>) -> anyhow::Result<Outcome> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    if !o.resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let sni = rustls::pki_types::ServerName::try_from(o.host.clone())?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        o.path, o.host
    );
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(o.warmup);
    let end = measure_from + Duration::from_secs_f64(o.secs);
    let tasks: Vec<_> = (0..o.conns)
        .map(|_| {
            let (o, connector, sni, request) =
                (o.clone(), connector.clone(), sni.clone(), request.clone());
            tokio::spawn(async move {
                let mut out = Outcome::default();
                let mut buf = vec![0u8; 4096];
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    let res = async {
                        let tcp = TcpStream::connect(o.addr).await?;
                        tcp.set_nodelay(true)?;
                        let mut tls = connector.connect(sni.clone(), tcp).await?;
                        if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
                        {
                            RESUMED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        tls.write_all(request.as_bytes()).await?;
                        // The status line is enough; the connection is dropped after it.
                        let mut n = 0;
                        while n < 12 {
                            let r = tls.read(&mut buf[n..]).await?;
                            anyhow::ensure!(r > 0, "closed before the status line");
                            n += r;
                        }
                        anyhow::Ok(buf[..12] == *b"HTTP/1.1 200")
                    }
                    .await;
                    match res {
                        Ok(true) if t >= measure_from => {
                            out.ops += 1;
                            out.latencies_us.push(micros(t.elapsed()));
                        }
                        Ok(true) => {}
                        Ok(false) => {
                            eprintln!("tls-new: answer {:?}", String::from_utf8_lossy(&buf[..12]));
                            out.bad_status += 1;
                        }
                        Err(e) => {
                            eprintln!("tls-new: {e}");
                            out.errors += 1;
                            // Back off: a refused connection loops very fast.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut all = Outcome::default();
    for t in tasks {
        all.merge(t.await.unwrap_or_default());
    }
    if o.resume {
        // Said plainly, so a server that cannot resume is not mistaken for a fast one.
        let resumed = RESUMED.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "tls-new: {resumed} handshakes resumed (of {} measured)",
            all.ops
        );
        anyhow::ensure!(resumed > 0, "--resume: the server resumed no session");
    }
    Ok(all)
}

fn parse() -> anyhow::Result<(String, Opts)> {
    let usage = "usage: bench_load ws-echo|ws-idle|http-rate|tls-new --addr IP:PORT --host HOST \
                 [--path P] [--conns N] [--secs S] [--warmup S] [--rate R] [--size BYTES]";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!(usage))?;
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let num = |name: &str, default: f64| -> anyhow::Result<f64> {
        get(name).map_or(Ok(default), |v| {
            v.parse().map_err(|_| anyhow::anyhow!("{name}: {v:?}"))
        })
    };
    let o = Opts {
        addr: get("--addr")
            .ok_or_else(|| anyhow::anyhow!(usage))?
            .parse()?,
        host: get("--host").ok_or_else(|| anyhow::anyhow!(usage))?,
        path: get("--path").unwrap_or_else(|| "/".into()),
        conns: num("--conns", 10.0)? as usize,
        secs: num("--secs", 5.0)?,
        warmup: num("--warmup", 0.0)?,
        rate: num("--rate", 1000.0)?,
        size: num("--size", 64.0)? as usize,
        resume: args.iter().any(|a| a == "--resume"),
    };
    Ok((mode, o))
}

fn main() -> anyhow::Result<()> {
    let (mode, o) = parse()?;
    let o = Arc::new(o);
    let measured = o.secs;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let outcome = match mode.as_str() {
            "ws-echo" => ws_echo(o).await,
            "ws-idle" => return ws_idle(o).await,
            "http-rate" => http_rate(o).await?,
            "tls-new" => tls_new(o).await?,
            m => anyhow::bail!("unknown mode {m:?}"),
        };
        outcome.print(measured);
        Ok(())
    })
}
