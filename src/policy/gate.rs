//! What a port's policy refuses before the registry is asked (SPEC §10), as one gate:
//!
//! - `service_workers = "edge-only"` (the built-in default): a request with
//!   `Service-Worker: script` is 403 unless it is the edge's own `/proxy-sw.js` served by the
//!   shim, so a worker left by an earlier tenant of a reused id cannot take over the origin;
//! - a port named by a client header the policy passes (`X-Cmux-Port-Internal`, which the
//!   in-sandbox proxy dials) must be reachable by `[ports]`, like the host's own port.
//!
//! Cost per request: two header lookups, by names parsed once.

use pingora::http::RequestHeader;

use super::{Policy, PortSet, ServiceWorkers};
use crate::respond::Refusal;

/// Client headers whose value is a VM port that something inside the VM dials.
pub const PORT_HEADERS: &[&str] = &["x-cmux-port-internal"];

/// The path the shim's service worker is served from (`rewrite::serve_worker`).
pub const EDGE_WORKER: &str = "/proxy-sw.js";

/// Parsed once: a `&str` name is parsed again on every lookup.
static SERVICE_WORKER: http::HeaderName = http::HeaderName::from_static("service-worker");

pub fn check(policy: &Policy, ports: &PortSet, req: &RequestHeader) -> Result<(), Refusal> {
    if policy.service_workers == ServiceWorkers::EdgeOnly
        && req
            .headers
            .get(&SERVICE_WORKER)
            .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"script"))
        && !(policy.inject_shim && req.uri.path() == EDGE_WORKER)
    {
        return Err(Refusal::ServiceWorker);
    }
    for name in PORT_HEADERS {
        let name = http::HeaderName::from_static(name);
        if !policy.passes_client_header(&name) {
            continue;
        }
        for v in req.headers.get_all(&name) {
            // Read as the in-sandbox proxy reads it (trimmed, then a u16); anything it would
            // refuse by itself is its business.
            let port = std::str::from_utf8(v.as_bytes())
                .ok()
                .and_then(|s| s.trim().parse::<u16>().ok());
            if let Some(p) = port {
                if !ports.allows(p) {
                    return Err(Refusal::PortDenied(p));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    fn req(path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn service_worker_scripts_are_refused_except_the_edges_own() {
        let ports = PortSet::new(&[(1, 65535)], &[]);
        let sw = [("Service-Worker", "script")];
        let p = Policy::default();
        assert_eq!(
            check(&p, &ports, &req("/sw.js", &sw)),
            Err(Refusal::ServiceWorker)
        );
        // without the shim, /proxy-sw.js is the app's path like any other
        assert!(check(&p, &ports, &req(EDGE_WORKER, &sw)).is_err());
        let shim = Policy {
            inject_shim: true,
            ..Policy::default()
        };
        assert!(check(&shim, &ports, &req(EDGE_WORKER, &sw)).is_ok());
        assert!(check(
            &shim,
            &ports,
            &req("/sw.js", &[("service-worker", " SCRIPT ")])
        )
        .is_err());
        assert!(check(&p, &ports, &req("/sw.js", &[])).is_ok());
        let allow = Policy {
            service_workers: ServiceWorkers::Allow,
            ..Policy::default()
        };
        assert!(check(&allow, &ports, &req("/sw.js", &sw)).is_ok());
    }

    #[test]
    fn a_passed_port_header_must_name_a_reachable_port() {
        let ports = PortSet::new(&[(1, 65535)], &[(22, 22)]);
        let p = Policy {
            pass_client_headers: vec![HeaderName::from_static("x-cmux-port-internal")],
            ..Policy::default()
        };
        for bad in ["22", " 22 ", "+22", "0"] {
            let r = req("/", &[("X-Cmux-Port-Internal", bad)]);
            assert!(check(&p, &ports, &r).is_err(), "{bad:?}");
        }
        assert!(check(&p, &ports, &req("/", &[("X-Cmux-Port-Internal", "3000")])).is_ok());
        // not passed: the header is stripped anyway, nothing to check
        let r = req("/", &[("X-Cmux-Port-Internal", "22")]);
        assert!(check(&Policy::default(), &ports, &r).is_ok());
    }
}
