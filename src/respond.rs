//! Answers cmux-edge gives itself instead of proxying: the statuses and one-line bodies of
//! SPEC §3–§5, always `text/plain; charset=utf-8` with an `X-Request-Id`.

use http::StatusCode;

use crate::route::RouteError;

/// Why a request was not (or could not be) proxied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 421: the host is under no configured domain.
    #[error("misdirected request: {0} is not served here")]
    Misdirected(String),
    /// 400: under a domain, but not a valid preview host.
    #[error("invalid preview host: {0}")]
    InvalidHost(String),
    /// 400: no Host header and no :authority.
    #[error("invalid preview host: no host in request")]
    NoHost,
    /// 508: the request already went through a cmux proxy.
    #[error("Loop detected in proxy")]
    Loop,
    /// 403: `[ports]` does not allow this VM port.
    #[error("port {0} is not reachable")]
    PortDenied(u16),
    /// 404: no registry knows the id.
    #[error("unknown vm {0}")]
    UnknownVm(String),
    /// 503: the registry could not answer (control plane down, no stale answer).
    #[error("registry unavailable for vm {0}")]
    RegistryUnavailable(String),
    /// 502: connect refused, reset, DNS failure, TLS failure.
    #[error("upstream unreachable: vm {id} port {port}")]
    Unreachable { id: String, port: u16 },
    /// 504: the upstream did not connect or answer in time.
    #[error("upstream timeout: vm {id} port {port}")]
    Timeout { id: String, port: u16 },
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            Refusal::InvalidHost(_) | Refusal::NoHost => StatusCode::BAD_REQUEST,
            Refusal::Loop => StatusCode::LOOP_DETECTED,
            Refusal::PortDenied(_) => StatusCode::FORBIDDEN,
            Refusal::UnknownVm(_) => StatusCode::NOT_FOUND,
            Refusal::RegistryUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            Refusal::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Short name for logs and metrics labels (bounded set).
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Misdirected(_) => "misdirected",
            Refusal::InvalidHost(_) | Refusal::NoHost => "invalid_host",
            Refusal::Loop => "loop",
            Refusal::PortDenied(_) => "port_denied",
            Refusal::UnknownVm(_) => "unknown_vm",
            Refusal::RegistryUnavailable(_) => "registry_unavailable",
            Refusal::Unreachable { .. } => "upstream_unreachable",
            Refusal::Timeout { .. } => "upstream_timeout",
        }
    }

    /// The body: one line. Control characters from the request never reach it.
    pub fn body(&self) -> String {
        let mut s: String = self
            .to_string()
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        s.push('\n');
        s
    }
}

impl From<RouteError> for Refusal {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NotServed(h) => Refusal::Misdirected(h),
            RouteError::Invalid(i) => Refusal::InvalidHost(i.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_the_spec_lines() {
        assert_eq!(Refusal::Loop.body(), "Loop detected in proxy\n");
        assert_eq!(Refusal::Loop.status().as_u16(), 508);
        assert_eq!(
            Refusal::Misdirected("a.org".into()).body(),
            "misdirected request: a.org is not served here\n"
        );
        assert_eq!(Refusal::PortDenied(22).body(), "port 22 is not reachable\n");
        assert_eq!(Refusal::UnknownVm("x".into()).body(), "unknown vm x\n");
        assert_eq!(
            Refusal::Unreachable {
                id: "x".into(),
                port: 1
            }
            .body(),
            "upstream unreachable: vm x port 1\n"
        );
    }

    #[test]
    fn bodies_stay_on_one_line() {
        let r = Refusal::Misdirected("a\r\nb".into());
        assert_eq!(r.body().lines().count(), 1);
    }
}
