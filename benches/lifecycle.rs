//! What SPEC §13 adds to a request for a running VM when `[wake]` and activity tracking are
//! on: the wake check after the registry answered (`Wakes::until_running`, no wake in
//! flight), the activity record at request start (`Activity::admit`, two user-agent globs),
//! and the byte counts of one request body chunk and one response body chunk.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;
use pingora::http::RequestHeader;

use cmux_edge::config::Config;
use cmux_edge::edge::{Generation, Resolved, Target};
use cmux_edge::lifecycle::{Activity, Wakes};

const CONFIG: &str = r#"
[[domains]]
name = "example.com"

[[registry.vms]]
id = "vm4242"
address = "10.0.0.7"

[wake]
url = "http://control-plane:9779/vms/{id}/resume"
timeout = "60s"

[activity]
ignore_user_agents = ["kube-probe/*", "Uptime-Kuma/*"]
"#;

fn request() -> RequestHeader {
    let mut r = RequestHeader::build("GET", b"/assets/app.js?v=3", None).unwrap();
    for (k, v) in [
        ("Host", "port-5173-vm-vm4242.example.com"),
        (
            "User-Agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0",
        ),
        ("Accept", "*/*"),
    ] {
        r.append_header(k, v).unwrap();
    }
    r
}

fn bench(c: &mut Criterion) {
    let config = Config::parse(Path::new("bench.toml"), CONFIG).unwrap();
    let g = Arc::new(Generation::new(config, None));
    let wakes = Wakes::default();
    let activity = Activity::default();
    let req = request();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let vm = rt.block_on(g.resolve("vm4242", 5173)).expect("the VM").vm;
    let target = Target {
        port: 5173,
        id: "vm4242".into(),
        scope: None,
        label: "port-5173-vm-vm4242".into(),
        port_span: 5..9,
        domain: "example.com".into(),
        policy: g.policy(5173).clone(),
        addr: "10.0.0.7:5173".parse().unwrap(),
        tls: None,
        authority: "10.0.0.7:5173".into(),
    };
    // the first request of a VM creates its entry; measure the steady state
    drop(activity.admit(Some(&g), &req, &target));

    c.bench_function("lifecycle: running-VM wake check + activity record", |b| {
        b.iter(|| {
            let resolved = Resolved {
                vm: vm.clone(),
                upstream_port: 5173,
            };
            let r = wakes
                .until_running(&g, black_box(&req), "vm4242", 5173, resolved)
                .now_or_never();
            black_box(r);
            let h = activity.admit(Some(&g), black_box(&req), &target);
            if let Some(h) = &h {
                h.bytes(black_box(512), 0);
                h.bytes(0, black_box(4096));
            }
            black_box(h)
        })
    });
    c.bench_function("lifecycle: baseline (the Resolved clone alone)", |b| {
        b.iter(|| {
            black_box(Resolved {
                vm: vm.clone(),
                upstream_port: 5173,
            })
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
