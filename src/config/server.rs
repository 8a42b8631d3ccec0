//! `[server]`, `[listen]`, `[admin]` and `[timeouts]`: the process, its sockets and its clocks.

use super::*;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Worker threads; `None` = number of CPUs.
    pub threads: Option<usize>,
    pub shutdown_grace: Duration,
    /// The Unix socket through which a `run --upgrade` process takes the listeners over.
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
    /// An upgraded (WebSocket) connection with no traffic either way for this long is closed.
    pub websocket_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            read: Duration::from_secs(300),
            write: Duration::from_secs(60),
            idle: Duration::from_secs(60),
            websocket_idle: Duration::from_secs(3600),
        }
    }
}

/// pingora's conventional place; a systemd unit with `PrivateTmp` points it at its runtime dir.
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/cmux-edge-upgrade.sock";

pub(super) fn server(top: &Table, base: &Path) -> ServerSettings {
    let mut s = ServerSettings {
        threads: None,
        shutdown_grace: Duration::from_secs(5),
        upgrade_sock: PathBuf::from(DEFAULT_UPGRADE_SOCK),
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
    };
    if let Some(t) = top.table("admin", &["token", "state_file"]) {
        if let Some(v) = t.get("token") {
            a.token = v.parse_str(resolve_secret);
        }
        if let Some(f) = t.str("state_file") {
            a.state_file = base.join(f);
        }
    }
    a
}

pub(super) fn timeouts(top: &Table) -> Timeouts {
    let mut t = Timeouts::default();
    if let Some(tab) = top.table(
        "timeouts",
        &["connect", "read", "write", "idle", "websocket_idle"],
    ) {
        for (key, slot) in [
            ("connect", &mut t.connect),
            ("read", &mut t.read),
            ("write", &mut t.write),
            ("idle", &mut t.idle),
            ("websocket_idle", &mut t.websocket_idle),
        ] {
            if let Some(v) = tab.get(key) {
                match v.duration() {
                    Some(d) if d.is_zero() => v.error("must be longer than zero"),
                    Some(d) => *slot = d,
                    None => {}
                }
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
