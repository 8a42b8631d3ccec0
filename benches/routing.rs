//! Hot-path micro-benchmarks: host parsing (default fast path and a regex pattern) and the
//! static-registry lookup that follows it. Target (issue 2): parse + lookup under 150 ns.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

use cmux_edge::registry::{Address, Registry, Scheme, StaticVms, Vm};
use cmux_edge::route::{normalize_host, Domain, Pattern, Routed, Router};

fn router(pattern: Pattern) -> Router {
    Router::new(
        vec![Domain {
            name: "example.com".into(),
            apex_status: 200,
            apex_body: "cmux-edge".into(),
        }],
        vec![pattern],
    )
}

fn registry(n: usize) -> StaticVms {
    StaticVms::new(
        (0..n)
            .map(|i| Vm {
                id: format!("vm{i}"),
                address: Address::Ip("10.0.0.1".parse().unwrap()),
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
    )
}

fn bench(c: &mut Criterion) {
    let fast = router(Pattern::template("port-{port}-vm-{id}").unwrap());
    let scoped = router(Pattern::template("cmux-{id}-{scope}-{port}").unwrap());
    let regex = router(Pattern::regex(r"p(?P<port>\d+)-(?P<id>[a-z0-9]+)").unwrap());
    let vms = registry(10_000);

    // Every input must route: a benchmark of the rejection path would flatter the numbers.
    for (r, h) in [
        (&fast, "port-39378-vm-vm4242.example.com"),
        (&scoped, "cmux-vm4242-feat-x-5173.example.com"),
        (&regex, "p5173-vm4242.example.com"),
    ] {
        assert!(matches!(r.route(h), Ok(Routed::Preview(_))), "{h}");
    }
    c.bench_function("route/default_fast_path", |b| {
        b.iter(|| fast.route(black_box("port-39378-vm-vm4242.example.com")))
    });
    c.bench_function("route/scoped_template_regex", |b| {
        b.iter(|| scoped.route(black_box("cmux-vm4242-feat-x-5173.example.com")))
    });
    c.bench_function("route/raw_regex", |b| {
        b.iter(|| regex.route(black_box("p5173-vm4242.example.com")))
    });
    c.bench_function("normalize_host/lowercase_with_port", |b| {
        b.iter(|| normalize_host(black_box("port-39378-vm-vm4242.example.com:443")).len())
    });
    c.bench_function("registry/static_lookup_10k", |b| {
        b.iter(|| match vms.lookup(black_box("vm4242")) {
            cmux_edge::registry::Lookup::Ready(r) => r.ok().flatten().is_some(),
            _ => false,
        })
    });
    c.bench_function("parse_plus_lookup/default", |b| {
        b.iter(|| {
            let host = normalize_host(black_box("port-39378-vm-vm4242.example.com:443"));
            let found = match fast.route(&host) {
                Ok(Routed::Preview(p)) => match vms.lookup(p.id) {
                    cmux_edge::registry::Lookup::Ready(r) => r.ok().flatten().is_some(),
                    _ => false,
                },
                _ => false,
            };
            found
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
