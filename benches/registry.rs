//! The `http` registry source (issue 4): a cached lookup (target under 200 ns), and a cold
//! source meeting 10,000 concurrent lookups, against a real control plane on 127.0.0.1.
//!
//! Control-plane hits are counted per iteration and checked: coalescing must make exactly one
//! call per distinct id (10,000 for 10,000 distinct ids, 1 for 10,000 lookups of one id).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::Full;
use hyper::{Request, Response};
use tokio::net::TcpListener;

use cmux_edge::registry::{
    Address, HttpSource, HttpSourceSettings, Lookup, Registry, Scheme, StaticVms, Vm,
};

const N: usize = 10_000;

/// A control plane that knows every id, counting the calls it gets.
async fn control_plane(hits: Arc<AtomicUsize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        hits.fetch_add(1, Ordering::Relaxed);
                        async {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(
                                    br#"{"address": "10.100.0.200", "ports": {"39378": 32768}}"#,
                                ),
                            )))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    format!("http://{addr}/vms/{{id}}")
}

fn source(url: &str) -> Arc<HttpSource> {
    Arc::new(
        HttpSource::new(HttpSourceSettings {
            url: url.to_owned(),
            token: None,
            // Generous: the benchmark measures throughput, not the failure path.
            timeout: Duration::from_secs(60),
            cache_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(5),
            stale_for: Duration::from_secs(300),
            concurrency: 64,
        })
        .expect("source"),
    )
}

/// `ids` looked up concurrently, one task each; panics on any failed lookup.
async fn look_up_all(src: &Arc<HttpSource>, ids: &Arc<Vec<String>>) {
    let tasks: Vec<_> = (0..ids.len())
        .map(|i| {
            let (src, ids) = (src.clone(), ids.clone());
            tokio::spawn(async move { src.lookup(&ids[i]).resolve().await })
        })
        .collect();
    for t in tasks {
        let vm = t.await.expect("task").expect("lookup");
        assert!(vm.is_some(), "the control plane knows every id");
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let hits = Arc::new(AtomicUsize::new(0));
    let url = rt.block_on(control_plane(hits.clone()));
    let distinct: Arc<Vec<String>> = Arc::new((0..N).map(|i| format!("vm{i}")).collect());
    let same: Arc<Vec<String>> = Arc::new(vec!["vm-hot".to_owned(); N]);

    let mut g = c.benchmark_group("http_source");

    // Warm caches: every answer is at hand, no await, no control-plane call.
    let warm = source(&url);
    rt.block_on(look_up_all(&warm, &distinct));
    let before = hits.load(Ordering::Relaxed);
    g.bench_function("cached_lookup", |b| {
        b.iter(|| match warm.lookup(black_box("vm42")) {
            Lookup::Ready(r) => r,
            Lookup::Pending(_) => panic!("a cached id must answer at once"),
        })
    });
    let mut i = 0;
    g.bench_function("cached_lookup_10k_ids", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            match warm.lookup(black_box(&distinct[i])) {
                Lookup::Ready(r) => r,
                Lookup::Pending(_) => panic!("a cached id must answer at once"),
            }
        })
    });
    assert_eq!(hits.load(Ordering::Relaxed), before, "cached lookups asked");
    // Baseline for the line above: the static source's plain map, same ids, same stride.
    let statics = StaticVms::new(
        distinct
            .iter()
            .map(|id| Vm {
                id: id.clone(),
                address: Address::Ip("10.0.0.1".parse().expect("ip")),
                ports: BTreeMap::new(),
                scheme: Scheme::Http,
                unresolvable_is_unknown: false,
                tls_server_name: None,
                tls_verify: true,
                self_reported: false,
                access_epoch: 0,
                state: cmux_edge::registry::VmState::Running,
            })
            .collect(),
    );
    let mut i = 0;
    g.bench_function("baseline_static_lookup_10k_ids", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            match statics.lookup(black_box(&distinct[i])) {
                Lookup::Ready(r) => r,
                Lookup::Pending(_) => panic!("static lookups answer at once"),
            }
        })
    });

    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    for (name, ids, want_hits) in [
        ("cold_10k_concurrent_distinct_ids", &distinct, N),
        ("cold_10k_concurrent_same_id", &same, 1),
    ] {
        let mut seen = Vec::new();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let cold = source(&url);
                    let before = hits.load(Ordering::Relaxed);
                    let start = Instant::now();
                    rt.block_on(look_up_all(&cold, ids));
                    total += start.elapsed();
                    seen.push(hits.load(Ordering::Relaxed) - before);
                }
                total
            })
        });
        assert!(
            seen.iter().all(|&h| h == want_hits),
            "{name}: control-plane hits per {N} lookups: {seen:?}, want {want_hits}"
        );
        if !seen.is_empty() {
            println!(
                "{name}: control-plane hits per {N} lookups = {want_hits} in each of {} runs",
                seen.len()
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
