//! `[limits]` (SPEC §11, issue 12): the per-request path of `proxy.rs` with every limit on,
//! and with none. Target: under 1 µs of CPU per request when configured, nothing when absent.
//!
//! One iteration is what one proxied request pays: `admit` (`requests_per_ip`), the
//! `unknown_ids_per_ip` check (its sketch already allocated by an earlier miss), the per-VM
//! guard (`requests_per_vm`) taken and dropped. Clients rotate over 4,096 addresses and VMs
//! over 1,024 ids, so the sketches' cache lines are not all hot; the rates are generous so
//! every request is admitted (the full path: check, then update).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};

use cmux_edge::limits::{Counters, LimitSettings, RatePer};
use cmux_edge::respond::{Answer, Refusal};

fn all_on() -> LimitSettings {
    LimitSettings {
        connections_per_ip: Some(256),
        requests_per_ip: Some(RatePer::parse("1000000000/s").expect("rate")),
        burst_per_ip: Some(1_000_000),
        requests_per_vm: Some(1_000_000),
        websockets_per_vm: Some(500),
        unknown_ids_per_ip: Some(RatePer::parse("10/min").expect("rate")),
        dry_run: false,
    }
}

fn bench(c: &mut Criterion) {
    let clients: Vec<IpAddr> = (0..4096u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
        .collect();
    let vms: Vec<String> = (0..1024).map(|i| format!("vm-{i:04}")).collect();
    let mut group = c.benchmark_group("limits");
    for (name, settings) in [("all_on", all_on()), ("off", LimitSettings::default())] {
        let counters = Counters::new();
        // One miss somewhere, so the unknown-ids sketch exists as it would in production.
        let miss = Answer::Refuse(Refusal::UnknownVm("x".into()));
        counters.missed(Some(&settings), Some(clients[0]), &miss);
        let mut i = 0usize;
        group.bench_function(format!("admit_and_vm_guard/{name}"), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let client = Some(clients[i % clients.len()]);
                let id = vms[i % vms.len()].as_str();
                let s = black_box(&settings);
                counters.admit(s, client).expect("admitted");
                counters
                    .unknown_ids(s, client, || true)
                    .expect("under budget");
                let held = counters.vm(s, id, false).expect("under the VM limit");
                drop(black_box(held));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
