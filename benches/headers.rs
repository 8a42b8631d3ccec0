//! Per-request header work on the hot path: the upstream request headers of `forward`
//! (strip, inject, X-Forwarded-*), the response-side hop-by-hop/CORS/embed rules, and policy
//! resolution (port reachability + per-port policy). Complements `routing.rs`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};

use cmux_edge::forward::{self, Forward};
use cmux_edge::policy::{cookies, cors, embed, AllowOrigins, Cors, Policies, PolicyPatch, PortSet};

/// What a browser sends for a typical preview sub-resource.
fn browser_request() -> RequestHeader {
    let mut r = RequestHeader::build("GET", b"/assets/app.js?v=3", None).unwrap();
    for (k, v) in [
        ("Host", "port-5173-vm-vm4242.example.com"),
        (
            "User-Agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0",
        ),
        ("Accept", "*/*"),
        ("Accept-Encoding", "gzip, deflate, br, zstd"),
        ("Accept-Language", "en-US,en;q=0.9"),
        ("Origin", "https://cmux.example.com"),
        ("Referer", "https://port-5173-vm-vm4242.example.com/"),
        ("Cookie", "session=abc123; theme=dark"),
        ("Connection", "keep-alive"),
        ("X-Cmux-Port-Internal", "1"),
    ] {
        r.append_header(k, v).unwrap();
    }
    r
}

/// What a dev server answers: the headers `embed` and `cors` act on.
fn upstream_response() -> ResponseHeader {
    let mut r = ResponseHeader::build(200, Some(12)).unwrap();
    for (k, v) in [
        ("Content-Type", "application/javascript"),
        ("Content-Length", "48213"),
        ("Cache-Control", "no-cache"),
        ("ETag", "W/\"bc55-19a3\""),
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Content-Security-Policy", "default-src 'self'"),
        ("X-Frame-Options", "DENY"),
        ("Access-Control-Allow-Origin", "*"),
        ("Vary", "Accept-Encoding"),
    ] {
        r.append_header(k, v).unwrap();
    }
    r
}

fn bench(c: &mut Criterion) {
    // The cmux preset (the built-in default no longer does CORS or embedding): the same work
    // as before issue 11, plus the listed-origin match.
    let preset = PolicyPatch {
        cors: Some(Cors::Permissive),
        allow_origins: Some(AllowOrigins::new(["https://cmux.example.com"]).unwrap()),
        embed: Some(true),
        inject_shim: Some(true),
        ..Default::default()
    };
    let policies = Policies::new(
        Some(&preset),
        &[(
            39378,
            PolicyPatch {
                cors: Some(Cors::Strip),
                frame_ancestors: Some(vec!["'self'".into(), "https://cmux.example.com".into()]),
                inject_shim: Some(false),
                ..Default::default()
            },
        )],
    );
    let ports = PortSet::new(&[(1, 65535)], &[(22, 22)]);
    let policy = policies.for_port(5173).clone();
    let origin = HeaderValue::from_static("https://cmux.example.com");

    c.bench_function("policy/resolve_port", |b| {
        b.iter(|| {
            let port = black_box(5173u16);
            ports.allows(port) && policies.for_port(port).embed
        })
    });
    c.bench_function("forward/upstream_request", |b| {
        b.iter_batched_ref(
            browser_request,
            |req| {
                forward::upstream_request(
                    req,
                    &Forward {
                        port: 5173,
                        id: "vm4242",
                        scope: None,
                        policy: &policy,
                        client_ip: "192.0.2.1".parse().unwrap(),
                        trusted_peer: false,
                        cloudflare: false,
                        peer_ip: "192.0.2.1".parse().unwrap(),
                        https: true,
                        public_host: "port-5173-vm-vm4242.example.com",
                        upstream_authority: "127.0.0.1:5173",
                        request_id: "0123456789abcdef0123456789abcdef",
                        upgrade: false,
                    },
                )
                .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("response/hop_cors_embed", |b| {
        b.iter_batched_ref(
            upstream_response,
            |resp| {
                forward::downstream_response(resp, "0123456789abcdef0123456789abcdef").unwrap();
                cookies::response(&policy, resp);
                cors::response(&policy, Some(&origin), resp);
                embed::response(&policy, resp);
            },
            BatchSize::SmallInput,
        )
    });
    // The cost of building the inputs above, to subtract by eye.
    c.bench_function("baseline/build_request_and_response", |b| {
        b.iter(|| (black_box(browser_request()), black_box(upstream_response())))
    });
}

/// pingora's header API against a bare `HeaderMap` (issue 15). pingora builds a request's map
/// with room for exactly the headers it read, plus a second map keeping their case, and
/// `insert_header` parses every name it is given. The same eight headers SPEC §4 adds
/// upstream, on a one-header request as `wrk` sends it: through `insert_header`, into a bare
/// `HeaderMap` by pre-parsed name, the same after one `reserve`, and what `forward` does: the
/// `RequestHeader` taken apart into `http` parts, edited, and rebuilt without the case map.
fn pingora_header_api(c: &mut Criterion) {
    use http::header::{HeaderMap, HeaderName};
    const NAMES: [&str; 8] = [
        "x-cmux-proxied",
        "x-cmux-port-internal",
        "x-cmux-vm-id",
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    ];
    let parsed: Vec<HeaderName> = NAMES.iter().map(|n| HeaderName::from_static(n)).collect();
    let value = HeaderValue::from_static("0123456789abcdef");
    let wrk_request = || {
        let mut r = RequestHeader::build("GET", b"/small", Some(1)).unwrap();
        r.append_header("Host", "port-18080-vm-bench.edge.test")
            .unwrap();
        r
    };
    c.bench_function("pingora_api/insert_header_x8", |b| {
        b.iter_batched_ref(
            wrk_request,
            |r| {
                for n in NAMES {
                    r.insert_header(n, value.clone()).unwrap();
                }
            },
            BatchSize::SmallInput,
        )
    });
    let bare = || {
        let mut m = HeaderMap::with_capacity(1);
        m.insert(
            http::header::HOST,
            HeaderValue::from_static("port-18080-vm-bench.edge.test"),
        );
        m
    };
    c.bench_function("pingora_api/headermap_parsed_names_x8", |b| {
        b.iter_batched_ref(
            bare,
            |m| {
                for n in &parsed {
                    m.insert(n.clone(), value.clone());
                }
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("pingora_api/headermap_parsed_names_reserved_x8", |b| {
        b.iter_batched_ref(
            bare,
            |m| {
                m.reserve(NAMES.len());
                for n in &parsed {
                    m.insert(n.clone(), value.clone());
                }
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("pingora_api/via_parts_reserved_x8", |b| {
        b.iter_batched_ref(
            wrk_request,
            |r| {
                let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
                let mut parts: http::request::Parts = std::mem::replace(r, empty).into();
                parts.headers.reserve(NAMES.len());
                for n in &parsed {
                    parts.headers.insert(n.clone(), value.clone());
                }
                *r = RequestHeader::from(parts);
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench, pingora_header_api
}
criterion_main!(benches);
