//! The bodies of the fuzz targets, shared with `tests/fuzz_regressions.rs` so that every input
//! a fuzzer ever found (`fuzz/regressions/<target>/`) is replayed by `cargo test` on stable.
//!
//! Each function takes arbitrary bytes and checks the invariants of one parser of hostile
//! input; a panic (or a failed invariant, which panics) is a finding.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use cmux_edge::config::Config;
use cmux_edge::policy::redirect::{rewrite_location, PublicOrigin};
use cmux_edge::registry::VmSpec;
use cmux_edge::rewrite::{Encoding, HtmlShim, Permit, RewriteLimits};
use cmux_edge::route::{check_name, normalize_host, Routed, Router};

/// Every route form the SPEC names: the default, Morph-style, scoped and a raw regex, over two
/// domains (one a suffix of the other's parent).
const ROUTES: &str = r#"
[[domains]]
name = "edge.test"
[[domains]]
name = "a.b.example.com"
[[routes]]
pattern = "port-{port}-vm-{id}"
[[routes]]
pattern = "port-{port}-{id}"
[[routes]]
pattern = "cmux-{id}-{scope}-{port}"
[[routes]]
regex = '^p(?P<port>\d+)\.?(?P<id>[a-z0-9]+)$'
"#;

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        Config::parse(Path::new("fuzz.toml"), ROUTES)
            .expect("the fuzz routes are valid")
            .router
    })
}

/// Host parser and router (SPEC §3): whatever the `Host`, a preview it accepts has a port in
/// 1–65535, an id and scope of the id grammar, and a label that is one DNS label of the host.
pub fn host(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let host = normalize_host(raw);
    match router().route(&host) {
        Ok(Routed::Preview(p)) => {
            assert_ne!(p.port, 0, "port 0 accepted from {raw:?}");
            assert!(
                check_name(p.id, "id").is_ok(),
                "bad id {:?} from {raw:?}",
                p.id
            );
            if let Some(scope) = p.scope {
                assert!(check_name(scope, "scope").is_ok(), "bad scope from {raw:?}");
            }
            assert!(!p.label.contains('.'), "label with a dot from {raw:?}");
            assert!(p.label.len() <= 63, "label over 63 bytes from {raw:?}");
            assert_eq!(
                &p.label[p.port_span.clone()],
                p.port.to_string(),
                "port span does not hold the port in {raw:?}"
            );
        }
        Ok(Routed::Apex(_)) | Err(_) => {}
    }
}

/// The config loader (SPEC §2): any text is either a config or a list of problems, each
/// pointing inside the text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(Path::new("/nonexistent/fuzz/routes.toml"), text) {
        assert!(!e.problems.is_empty(), "an error without a problem");
        let lines = text.split('\n').count().max(1);
        for p in &e.problems {
            assert!(
                p.line <= lines,
                "problem on line {} of {lines}: {p}",
                p.line
            );
        }
    }
}

/// `Location` rewriting (SPEC §5): a rewritten location is a preview URL of the same VM under
/// the request's domain, whatever the VM sent.
pub fn location(data: &[u8]) {
    let Ok(location) = std::str::from_utf8(data) else {
        return;
    };
    let origin = PublicOrigin {
        label: "port-3000-vm-x1",
        port_span: 5..9,
        domain: "edge.test",
        public_port: Some(8443),
        https: true,
    };
    let Some(out) = rewrite_location(location, &origin) else {
        return;
    };
    let rest = out
        .strip_prefix("https://port-")
        .unwrap_or_else(|| panic!("{location:?} became {out:?}"));
    let (port, rest) = rest
        .split_once("-vm-x1.edge.test:8443")
        .unwrap_or_else(|| panic!("{location:?} left the VM or domain: {out:?}"));
    assert!(port.parse::<u16>().is_ok_and(|p| p > 0), "port {port:?}");
    assert!(
        rest.is_empty() || rest.starts_with(['/', '?', '#']),
        "{location:?} became {out:?}: the authority was extended"
    );
}

/// The HTML shim (SPEC §5): any body, in any of the decodable encodings, split into any
/// chunks, is rewritten without a panic, and never grows by more than the script and a
/// bounded amount.
pub fn shim(data: &[u8]) {
    let [mode, split, body @ ..] = data else {
        return;
    };
    let encoding = match mode % 5 {
        0 => Encoding::Identity,
        1 => Encoding::Gzip,
        2 => Encoding::Deflate,
        3 => Encoding::Brotli,
        _ => Encoding::Zstd,
    };
    // Half the inputs are compressed properly (to reach the rewriter through the decoder),
    // half are fed raw (to exercise the decoder on garbage).
    let raw = mode & 0x80 != 0;
    let wire = if raw {
        body.to_vec()
    } else {
        encode(encoding, body)
    };
    let script = "<script>s()</script>".to_owned();
    // A low cap, so that the bounds are exercised too.
    let limits = RewriteLimits {
        max_decoded: 1 << 20,
        concurrent: usize::MAX,
    };
    let Some(permit) = Permit::try_acquire(usize::MAX) else {
        return;
    };
    let Ok(mut shim) = HtmlShim::new(encoding, script.clone(), mode & 0x40 != 0, limits, permit)
    else {
        return;
    };
    let step = usize::from(*split).max(1);
    let mut out = 0usize;
    for chunk in wire.chunks(step) {
        match shim.push(chunk) {
            Ok(b) => out += b.len(),
            Err(_) => return,
        }
    }
    if let Ok(b) = shim.finish() {
        out += b.len();
    }
    // What was decoded is the body when it was compressed here; raw bytes fed to a decoder
    // may decode to more (that is what compression is), but never past the decode cap and
    // the one 64 KiB step that reaches it.
    let decoded = if raw && encoding != Encoding::Identity {
        limits.max_decoded as usize + 64 * 1024
    } else {
        body.len()
    };
    assert!(
        out <= decoded + script.len() + 64,
        "{} bytes became {out}",
        body.len()
    );
}

fn encode(encoding: Encoding, body: &[u8]) -> Vec<u8> {
    match encoding {
        Encoding::Identity => body.to_vec(),
        Encoding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = e.write_all(body);
            e.finish().unwrap_or_default()
        }
        Encoding::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = e.write_all(body);
            e.finish().unwrap_or_default()
        }
        Encoding::Brotli => {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 1, 20);
                let _ = e.write_all(body);
            }
            out
        }
        Encoding::Zstd => zstd::encode_all(body, 1).unwrap_or_default(),
    }
}

/// The admin API's JSON body (SPEC §7): any bytes are a 400 with a reason or a valid VM.
pub fn admin_json(data: &[u8]) {
    let Ok(spec) = serde_json::from_slice::<VmSpec>(data) else {
        return;
    };
    let _ = spec.expiry();
    if let Ok(vm) = spec.to_vm("x1") {
        for port in [1u16, 80, 39378, 65535] {
            assert_ne!(vm.upstream_port(port), 0, "a VM port maps to port 0");
        }
    }
}

/// `cookies = "host"` (SPEC §10): whatever `Set-Cookie` a VM sends, what leaves the edge has
/// no `Domain` attribute, and its `name=value` is untouched.
pub fn set_cookie(data: &[u8]) {
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let out = cmux_edge::policy::cookies::strip_domain(&value);
    let out = out.as_bytes();
    let mut parts = out.split(|&b| b == b';');
    let first = parts.next().unwrap_or_default();
    assert_eq!(
        first,
        data.split(|&b| b == b';').next().unwrap_or_default(),
        "the cookie itself changed"
    );
    for attr in parts {
        let name = attr.split(|&b| b == b'=').next().unwrap_or_default();
        assert!(
            !name.trim_ascii().eq_ignore_ascii_case(b"domain"),
            "a Domain attribute survived in {:?}",
            String::from_utf8_lossy(out)
        );
    }
}
