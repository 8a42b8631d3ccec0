//! `rewrite_redirects` (SPEC §5): a dev server that redirects to `http://localhost:5173/cb`
//! means "port 5173 of this same VM". Such a `Location` becomes that port's public preview URL,
//! built from the request's own host, so it works for any domain and any route pattern.

use std::net::Ipv4Addr;

/// The public side of the request: enough to build a sibling-port preview URL.
pub struct PublicOrigin<'a> {
    /// The host label, and where its port digits sit in it.
    pub label: &'a str,
    pub port_span: std::ops::Range<usize>,
    pub domain: &'a str,
    /// The port the client used, when it named one (e.g. `:8080` while testing locally).
    pub public_port: Option<u16>,
    /// `https` unless the request was plain HTTP end to end.
    pub https: bool,
}

/// `rewrite_redirects` on a response: a loopback `Location` becomes the preview URL.
pub fn response(origin: &PublicOrigin<'_>, resp: &mut pingora::http::ResponseHeader) {
    let location = resp
        .headers
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok());
    if let Some(new) = location.and_then(|l| rewrite_location(l, origin)) {
        let _ = resp.insert_header(http::header::LOCATION, new);
    }
}

/// `[tls] redirect_http`: a plain-HTTP request for a served host gets a 308 to
/// `https://<host>[:port]<path?query>` (the port left out when it is 443). `https` includes a
/// trusted TLS-terminating proxy's word: redirecting that would loop.
pub fn to_https(
    config: &crate::config::Config,
    raw_host: &str,
    https: bool,
    req: &pingora::http::RequestHeader,
) -> Result<(), crate::respond::Reply> {
    let Some(listener) = config.listen.https else {
        return Ok(());
    };
    if https || !config.tls.redirect_http {
        return Ok(());
    }
    let host = crate::route::normalize_host(raw_host);
    let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = match listener.port() {
        443 => format!("https://{host}{path}"),
        port => format!("https://{host}:{port}{path}"),
    };
    Err(crate::respond::Reply::redirect(
        308,
        &location,
        "https_redirect",
    ))
}

/// The rewritten location, or `None` when it is not a loopback URL with an explicit port.
pub fn rewrite_location(location: &str, origin: &PublicOrigin<'_>) -> Option<String> {
    let lower_scheme = location.get(..8).map(str::to_ascii_lowercase)?;
    let rest = if lower_scheme.starts_with("http://") {
        &location[7..]
    } else if lower_scheme.starts_with("https://") {
        &location[8..]
    } else {
        return None;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return None;
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        (h, after.strip_prefix(':')?)
    } else {
        authority.rsplit_once(':')?
    };
    let port = crate::route::parse_port(port).ok()?;
    if !is_loopback(host) {
        return None;
    }
    let label = format!(
        "{}{}{}",
        &origin.label[..origin.port_span.start],
        port,
        &origin.label[origin.port_span.end..]
    );
    let scheme = if origin.https { "https" } else { "http" };
    let public_port = origin
        .public_port
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let tail = if tail.is_empty() { "/" } else { tail };
    Some(format!(
        "{scheme}://{label}.{}{public_port}{tail}",
        origin.domain
    ))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host == "0.0.0.0"
        || host == "::1"
        || host
            .parse::<Ipv4Addr>()
            .is_ok_and(|ip| ip.octets()[0] == 127)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(https: bool, public_port: Option<u16>) -> PublicOrigin<'static> {
        PublicOrigin {
            label: "port-5173-vm-abc",
            port_span: 5..9,
            domain: "example.com",
            public_port,
            https,
        }
    }

    #[test]
    fn loopback_forms_become_the_sibling_preview_url() {
        let o = origin(true, None);
        for (from, to) in [
            (
                "http://localhost:3000/cb?x=1#h",
                "https://port-3000-vm-abc.example.com/cb?x=1#h",
            ),
            (
                "http://127.0.0.1:3000/cb",
                "https://port-3000-vm-abc.example.com/cb",
            ),
            (
                "http://127.9.8.7:3000",
                "https://port-3000-vm-abc.example.com/",
            ),
            (
                "https://0.0.0.0:9000/?q",
                "https://port-9000-vm-abc.example.com/?q",
            ),
            (
                "http://[::1]:5174/",
                "https://port-5174-vm-abc.example.com/",
            ),
            (
                "HTTP://LOCALHOST:3000/A",
                "https://port-3000-vm-abc.example.com/A",
            ),
        ] {
            assert_eq!(rewrite_location(from, &o).as_deref(), Some(to), "{from}");
        }
    }

    #[test]
    fn plain_http_requests_get_http_and_keep_the_public_port() {
        assert_eq!(
            rewrite_location("http://localhost:3000/x", &origin(false, Some(8080))).as_deref(),
            Some("http://port-3000-vm-abc.example.com:8080/x")
        );
    }

    #[test]
    fn other_locations_are_untouched() {
        let o = origin(true, None);
        for loc in [
            "/login",
            "login",
            "http://localhost/cb",
            "http://localhost:0/",
            "http://localhost:080/",
            "http://example.org:3000/",
            "http://128.0.0.1:3000/",
            "http://user@localhost:3000/",
            "ftp://localhost:21/",
            "//localhost:3000/",
        ] {
            assert_eq!(rewrite_location(loc, &o), None, "{loc}");
        }
    }
}
