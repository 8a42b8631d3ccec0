//! Preview access (SPEC §12) on the hot path: checking the edge's session cookie, which every
//! request to a private port carries once the exchange is done. Target: ≤ 1.5 µs of CPU.
//!
//! `session_value_check` is the HMAC check alone; `gate_with_cookie` is the whole gate as
//! `EdgeProxy::admit` calls it (the `Cookie` scan among the app's own cookies, the clock, the
//! check and the metric); `strip_edge_cookie` is what `upstream_request_filter` then does.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use pingora::http::RequestHeader;

use cmux_edge::access::{Access, AccessSettings, KeySettings, KeySource};
use cmux_edge::policy::Policy;
use cmux_edge::registry::{Address, Scheme, Vm};
use cmux_edge::tls::settings::Secret;

fn access() -> Access {
    Access::new(Some(&AccessSettings {
        keys: vec![KeySettings {
            id: "k1".into(),
            source: KeySource::Secret(Secret(b"k1-secret-0123456789abcdef0123456789".to_vec())),
        }],
        session: Duration::from_secs(12 * 3600),
        cookie: "cmux_edge_session".into(),
        session_secret: None,
    }))
    .expect("access")
}

fn vm() -> Arc<Vm> {
    Arc::new(Vm {
        id: "vm4242".into(),
        address: Address::Ip("10.0.0.2".parse().unwrap()),
        ports: Default::default(),
        scheme: Scheme::Http,
        unresolvable_is_unknown: false,
        tls_server_name: None,
        tls_verify: true,
        self_reported: false,
        access_epoch: 3,
        state: Default::default(),
    })
}

fn bench(c: &mut Criterion) {
    let a = access();
    let vm = vm();
    let far = 4_000_000_000;
    let value = a.session_value("vm4242", 5173, far, 3).unwrap();
    let mut req = RequestHeader::build("GET", b"/assets/app.js?v=3", None).unwrap();
    req.append_header("Host", "port-5173-vm-vm4242.example.com")
        .unwrap();
    req.append_header(
        "Cookie",
        format!("theme=dark; __Host-cmux_edge_session={value}; app_session=abc123def456"),
    )
    .unwrap();
    let policy = Policy::default();
    let gate = |req: &RequestHeader| a.check(req, &policy, &vm, 5173, true, "example.com");
    assert!(gate(&req).is_ok());

    c.bench_function("access/session_value_check", |b| {
        b.iter(|| a.check_session_value(black_box(&value), "vm4242", 5173, 3))
    });
    c.bench_function("access/gate_with_cookie", |b| {
        b.iter(|| gate(black_box(&req)).is_ok())
    });
    c.bench_function("access/strip_edge_cookie", |b| {
        b.iter_batched(
            || req.clone(),
            |mut r| {
                a.strip(&mut r);
                r
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
