//! `[server]`, `[listen]`, `[admin]` and `[timeouts]`: the process, its sockets and its clocks.

use super::*;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Worker threads; `None` = number of CPUs.
    pub threads: Option<usize>,
    pub shutdown_grace: Duration,
    /// The Unix socket through which a `run --upgrade` process takes the listeners over; its
    /// directory must be private ([`crate::upgrade_socket`]).
    pub upgrade_sock: PathBuf,
    /// This edge's name in activity batches (SPEC §13); default the host name.
    pub replica: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Bearer token for `/api/*`; `None` leaves the API closed.
    pub token: Option<String>,
    /// Where admin-API registrations are persisted.
    pub state_file: PathBuf,
    /// `Host` names the admin listener answers besides IP literals and `localhost`
    /// (lowercase, without port): DNS rebinding finds nothing else.
    pub hosts: Vec<String>,
}

/// Upstream timeouts. `read`/`write` bound one socket operation, like nginx's
/// `proxy_read_timeout`, so long streams that keep moving are never cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub idle: Duration,
    /// An upgraded (WebSocket) connection is closed once one direction has been quiet this long:
    /// it is the read timeout of each side (client and VM), so traffic the other way does not
    /// keep a quiet direction open. It applies from the 101 on.
    pub websocket_idle: Duration,
    /// Total time to receive one request head (the first and every later one).
    pub client_header: Duration,
    /// Idle time allowed between requests on a kept-alive HTTP/1 connection.
    pub client_idle: Duration,
    /// An HTTP/2 connection with no stream for this long is closed.
    pub h2_idle: Duration,
    /// Requests served on one HTTP/1 connection before it is closed.
    pub keepalive_requests: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            read: Duration::from_secs(300),
            write: Duration::from_secs(60),
            idle: Duration::from_secs(60),
            websocket_idle: Duration::from_secs(3600),
            client_header: Duration::from_secs(10),
            client_idle: Duration::from_secs(60),
            h2_idle: Duration::from_secs(300),
            keepalive_requests: 10_000,
        }
    }
}

pub(super) fn server(top: &Table, base: &Path) -> ServerSettings {
    let mut s = ServerSettings {
        threads: None,
        shutdown_grace: Duration::from_secs(5),
        upgrade_sock: crate::upgrade_socket::default_path(),
        replica: host_name(),
    };
    let keys = ["threads", "shutdown_grace", "upgrade_sock", "replica"];
    if let Some(t) = top.table("server", &keys) {
        s.replica = t.str("replica").map_or(s.replica, str::to_owned);
        if let Some(v) = t.get("upgrade_sock") {
            match v.str() {
                Some("") => v.error("upgrade_sock must not be empty"),
                Some(p) => s.upgrade_sock = base.join(p),
                None => {}
            }
        }
        if let Some(v) = t.get("threads") {
            match v.int() {
                Some(n) if (1..=1024).contains(&n) => s.threads = Some(n as usize),
                Some(_) => v.error("threads must be between 1 and 1024"),
                None => {}
            }
        }
        if let Some(d) = t.duration("shutdown_grace") {
            s.shutdown_grace = d;
        }
    }
    s
}

pub(super) fn listen(top: &Table) -> Listen {
    let mut l = Listen {
        http: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
        https: None,
        admin: Some(SocketAddr::from(([127, 0, 0, 1], 9180))),
    };
    let Some(t) = top.table("listen", &["http", "https", "admin"]) else {
        return l;
    };
    let addr = |key: &str| {
        t.get(key).map(|v| {
            v.parse_str(|s| {
                s.parse::<SocketAddr>()
                    .map_err(|_| format!("{s:?} is not an address like \"127.0.0.1:8080\""))
            })
        })
    };
    // A key present but invalid keeps the default out of the way: the error is reported.
    if let Some(a) = addr("http") {
        l.http = a;
    }
    l.https = addr("https").flatten();
    if let Some(a) = addr("admin") {
        l.admin = a;
    }
    // Naming only `https` means HTTPS only: a plain-HTTP port opens only when asked for.
    if t.get("http").is_none() && t.get("https").is_some() {
        l.http = None;
    }
    if l.http.is_none() && l.https.is_none() && !t.ctx().has_problems() {
        t.ctx().report(
            &t.span(),
            "listen",
            "at least one of http or https is needed",
        );
    }
    let all = [l.http, l.https, l.admin];
    let set: HashSet<_> = all.iter().flatten().collect();
    if set.len() < all.iter().flatten().count() {
        t.ctx()
            .report(&t.span(), "listen", "two listeners share one address");
    }
    l
}

pub(super) fn admin(top: &Table, base: &Path) -> AdminSettings {
    let mut a = AdminSettings {
        token: None,
        state_file: base.join("cmux-edge-state.json"),
        hosts: Vec::new(),
    };
    if let Some(t) = top.table("admin", &["token", "state_file", "hosts"]) {
        if let Some(v) = t.get("token") {
            a.token = v.parse_str(|s| resolve_secret(s).and_then(strong_token));
        }
        if let Some(v) = t.get("hosts") {
            for item in v.array().unwrap_or_default() {
                if let Some(h) = item.parse_str(admin_host) {
                    a.hosts.push(h);
                }
            }
        }
        if let Some(f) = t.str("state_file") {
            a.state_file = base.join(f);
        }
    }
    a
}

/// Shorter than this, a bearer token can be guessed or was typed by hand.
pub const MIN_TOKEN_LEN: usize = 32;

/// What example files and tutorials put where a token goes.
const PLACEHOLDERS: &[&str] = &[
    "replace-me",
    "replace_me",
    "replaceme",
    "change-me",
    "change_me",
    "changeme",
    "placeholder",
    "your-token",
    "your_token",
    "example",
];

/// `[admin] token`: at least 32 bytes, not a placeholder, not one repeated character. The
/// message never repeats the token (it may come from the environment).
pub(crate) fn strong_token(token: String) -> Result<String, String> {
    let lower = token.to_ascii_lowercase();
    let placeholder = PLACEHOLDERS.iter().any(|p| lower.contains(p))
        || ["secret", "token", "password", "admin", "test"].contains(&lower.trim());
    if placeholder {
        return Err("the token is a placeholder: generate one, e.g. `openssl rand -hex 32`".into());
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is {} bytes, at least {MIN_TOKEN_LEN} are needed: generate one, e.g. `openssl rand -hex 32`",
            token.len()
        ));
    }
    if token.bytes().all(|b| b == token.as_bytes()[0]) {
        return Err(
            "the token is one repeated character: generate one, e.g. `openssl rand -hex 32`".into(),
        );
    }
    Ok(token)
}

/// `[admin] hosts` entries: DNS names, compared without case and port.
fn admin_host(s: &str) -> Result<String, String> {
    let h = s.trim_end_matches('.').to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if ok {
        Ok(h)
    } else {
        Err(format!(
            "{s:?} is not a host name like \"cmux-edge-admin.cmux.svc\" (IP literals and localhost are always answered; no port)"
        ))
    }
}

pub(super) fn timeouts(top: &Table) -> Timeouts {
    let mut t = Timeouts::default();
    if let Some(tab) = top.table(
        "timeouts",
        &[
            "connect",
            "read",
            "write",
            "idle",
            "websocket_idle",
            "client_header",
            "client_idle",
            "h2_idle",
            "keepalive_requests",
        ],
    ) {
        for (key, slot) in [
            ("connect", &mut t.connect),
            ("read", &mut t.read),
            ("write", &mut t.write),
            ("idle", &mut t.idle),
            ("websocket_idle", &mut t.websocket_idle),
            ("client_header", &mut t.client_header),
            ("client_idle", &mut t.client_idle),
            ("h2_idle", &mut t.h2_idle),
        ] {
            if let Some(v) = tab.get(key) {
                match v.duration() {
                    Some(d) if d.is_zero() => v.error("must be longer than zero"),
                    Some(d) => *slot = d,
                    None => {}
                }
            }
        }
        if let Some(v) = tab.get("keepalive_requests") {
            match v.int() {
                Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => {
                    t.keepalive_requests = n as u32
                }
                Some(_) => v.error("keepalive_requests must be at least 1"),
                None => {}
            }
        }
    }
    t
}

/// The host name (Linux's `/proc/sys/kernel/hostname`, else `$HOSTNAME`), or "cmux-edge".
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "cmux-edge".to_owned())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    fn listen(section: &str) -> super::Listen {
        let text = format!("{section}\n[[domains]]\nname = \"example.com\"\n");
        Config::parse(Path::new("t.toml"), &text).unwrap().listen
    }

    /// The README's `[listen] http` row: the default, except when only `https` is named.
    #[test]
    fn naming_only_https_means_no_plain_http_listener() {
        let default = Some("127.0.0.1:8080".parse().unwrap());
        assert_eq!(listen("").http, default);
        assert_eq!(listen("[listen]\nadmin = \"127.0.0.1:9999\"").http, default);
        let only_https = listen("[listen]\nhttps = \"127.0.0.1:8443\"");
        assert_eq!(only_https.http, None);
        assert_eq!(only_https.https, Some("127.0.0.1:8443".parse().unwrap()));
        let both = listen("[listen]\nhttps = \"127.0.0.1:8443\"\nhttp = \"127.0.0.1:8081\"");
        assert_eq!(both.http, Some("127.0.0.1:8081".parse().unwrap()));
    }
}
