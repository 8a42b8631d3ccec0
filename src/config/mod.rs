//! The configuration file (SPEC §2): schema, defaults and validation.
//!
//! [`Config::parse`] reads the whole file and either returns a fully compiled config (route
//! patterns compiled, port sets built, policies merged) or every problem found, each with
//! file:line:column and its key. Nothing is half-applied: reload swaps whole configs.

mod reader;
mod tls;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;

use crate::policy::{parse_port_range, Cors, HostHeader, Policies, PolicyPatch, PortSet};
use crate::registry::{
    Address, AddressTemplate, CachePolicy, HttpSourceSettings, ProxmoxSettings, Scheme, Vm,
};
use crate::route::{Domain, Pattern, Router};
pub use crate::tls::settings::TlsSettings;
use crate::trust::TrustedProxies;
pub use reader::{parse_duration, Problem};
use reader::{Ctx, Table, Val};

/// The default pattern when no `[[routes]]` is given.
pub const DEFAULT_PATTERN: &str = "port-{port}-vm-{id}";

/// Every problem of one file, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn io(path: &Path, e: std::io::Error) -> ConfigError {
        ConfigError {
            problems: vec![Problem {
                file: path.display().to_string(),
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read config: {e}"),
            }],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from; relative paths in it are relative to its directory.
    pub path: PathBuf,
    pub server: ServerSettings,
    pub listen: Listen,
    pub router: Router,
    pub registry: RegistrySettings,
    pub ports: PortSet,
    pub policies: Policies,
    pub trust: TrustedProxies,
    pub admin: AdminSettings,
    pub tls: TlsSettings,
    pub timeouts: Timeouts,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Worker threads; `None` = number of CPUs.
    pub threads: Option<usize>,
    pub shutdown_grace: Duration,
    /// The Unix socket through which a `run --upgrade` process takes the listeners over.
    pub upgrade_sock: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// One registry source, as named in `[registry] source` / `sources`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Registrations made through the admin API (`PUT /api/vms/{id}`).
    Admin,
    /// `[[registry.vms]]`.
    Static,
    Template,
    Http,
    File,
    /// Proxmox VE containers, through the PVE API.
    Proxmox,
}

impl SourceKind {
    const NAMES: &'static str =
        "\"admin\", \"static\", \"template\", \"http\", \"file\" or \"proxmox\"";

    pub fn parse(s: &str) -> Result<SourceKind, String> {
        match s {
            "admin" => Ok(SourceKind::Admin),
            "static" => Ok(SourceKind::Static),
            "template" => Ok(SourceKind::Template),
            "http" => Ok(SourceKind::Http),
            "file" => Ok(SourceKind::File),
            "proxmox" => Ok(SourceKind::Proxmox),
            _ => Err(format!("unknown source {s:?} (expected {})", Self::NAMES)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Admin => "admin",
            SourceKind::Static => "static",
            SourceKind::Template => "template",
            SourceKind::Http => "http",
            SourceKind::File => "file",
            SourceKind::Proxmox => "proxmox",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Asked in this order; the first source that knows the id answers. `source = X` means
    /// `["admin", "static", X]`.
    pub sources: Vec<SourceKind>,
    pub template: Option<AddressTemplate>,
    pub http: Option<HttpSourceSettings>,
    /// `source = "file"`: the VM file, relative to the config.
    pub file: Option<PathBuf>,
    /// `proxmox` in the sources: the PVE API and its token.
    pub proxmox: Option<ProxmoxSettings>,
    pub vms: Vec<Vm>,
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

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let ctx = Ctx::new(&path.display().to_string(), text);
        let root = ctx.parse();
        let top = Table::open(
            &ctx,
            String::new(),
            root.span(),
            root.get_ref(),
            &[
                "server", "listen", "domains", "routes", "registry", "ports", "policy", "trust",
                "admin", "tls", "timeouts",
            ],
        );
        let base = path.parent().unwrap_or(Path::new("."));
        let listen = listen(&top);
        let config = Config {
            path: path.to_owned(),
            server: server(&top, base),
            tls: tls::tls(&top, base, &listen),
            listen,
            router: Router::new(domains(&top), routes(&top)),
            registry: registry(&top, base),
            ports: ports(&top),
            policies: policies(&top),
            trust: trust(&top),
            admin: admin(&top, base),
            timeouts: timeouts(&top),
        };
        if ctx.has_problems() {
            return Err(ConfigError {
                problems: ctx.into_problems(),
            });
        }
        Ok(config)
    }
}

/// pingora's conventional place; a systemd unit with `PrivateTmp` points it at its runtime dir.
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/cmux-edge-upgrade.sock";

fn server(top: &Table, base: &Path) -> ServerSettings {
    let mut s = ServerSettings {
        threads: None,
        shutdown_grace: Duration::from_secs(5),
        upgrade_sock: PathBuf::from(DEFAULT_UPGRADE_SOCK),
    };
    if let Some(t) = top.table("server", &["threads", "shutdown_grace", "upgrade_sock"]) {
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

fn listen(top: &Table) -> Listen {
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

fn domains(top: &Table) -> Vec<Domain> {
    let tables = top.tables("domains", &["name", "apex"]);
    if tables.is_empty() && top.get("domains").is_none() {
        top.ctx().report(
            &(0..0),
            "domains",
            "at least one [[domains]] entry is needed",
        );
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for t in tables {
        let Some(name_val) = t.require("name") else {
            continue;
        };
        let Some(name) = name_val.parse_str(parse_domain) else {
            continue;
        };
        if !seen.insert(name.clone()) {
            name_val.error(format!("domain {name:?} is listed twice"));
            continue;
        }
        let mut d = Domain {
            name,
            apex_status: 200,
            apex_body: "cmux-edge".into(),
        };
        if let Some(apex) = t.table("apex", &["status", "body"]) {
            if let Some(v) = apex.get("status") {
                match v.int() {
                    Some(n) if (200..=599).contains(&n) => d.apex_status = n as u16,
                    Some(_) => v.error("status must be between 200 and 599"),
                    None => {}
                }
            }
            if let Some(b) = apex.str("body") {
                d.apex_body = b.to_owned();
            }
        }
        out.push(d);
    }
    out
}

fn parse_domain(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a lowercase domain name like \"example.com\" (no wildcard, no dot at either end)"
        ))
    }
}

fn routes(top: &Table) -> Vec<Pattern> {
    let tables = top.tables("routes", &["pattern", "regex"]);
    if top.get("routes").is_none() {
        return Pattern::template(DEFAULT_PATTERN).into_iter().collect();
    }
    let mut out = Vec::new();
    for t in tables {
        let compiled = match (t.get("pattern"), t.get("regex")) {
            (Some(p), None) => p.parse_str(|s| Pattern::template(s).map_err(|e| e.to_string())),
            (None, Some(r)) => r.parse_str(|s| Pattern::regex(s).map_err(|e| e.to_string())),
            (Some(_), Some(r)) => {
                r.error("a route has either pattern or regex, not both");
                None
            }
            (None, None) => {
                t.missing("pattern");
                None
            }
        };
        out.extend(compiled);
    }
    out
}

fn registry(top: &Table, base: &Path) -> RegistrySettings {
    let mut r = RegistrySettings {
        sources: vec![SourceKind::Admin, SourceKind::Static],
        template: None,
        http: None,
        file: None,
        proxmox: None,
        vms: Vec::new(),
    };
    let Some(t) = top.table(
        "registry",
        &[
            "source",
            "sources",
            "template",
            "vms",
            "url",
            "token",
            "timeout",
            "cache_ttl",
            "negative_ttl",
            "stale_for",
            "concurrency",
            "file",
            "pve_url",
            "pve_token",
            "pve_ca",
        ],
    ) else {
        return r;
    };
    match (t.get("source"), t.get("sources")) {
        (Some(_), Some(list)) => list.error(
            "use either source (one source under admin and static) or sources (the whole order), not both",
        ),
        (Some(v), None) => {
            if let Some(kind) = v.parse_str(|s| match SourceKind::parse(s)? {
                SourceKind::Admin => Err(
                    "\"admin\" is always asked first with source = ...; use sources = [...] to order it"
                        .into(),
                ),
                k => Ok(k),
            }) {
                if kind != SourceKind::Static {
                    r.sources.push(kind);
                }
            }
        }
        (None, Some(list)) => {
            r.sources.clear();
            for item in list.array().unwrap_or_default() {
                let Some(kind) = item.parse_str(SourceKind::parse) else {
                    continue;
                };
                if r.sources.contains(&kind) {
                    item.error(format!("source {:?} is listed twice", kind.name()));
                } else {
                    r.sources.push(kind);
                }
            }
            if r.sources.is_empty() && !t.ctx().has_problems() {
                list.error("at least one source is needed");
            }
        }
        (None, None) => {}
    }
    let uses = |k: SourceKind| r.sources.contains(&k);
    let (uses_template, uses_http, uses_file, uses_static, uses_proxmox) = (
        uses(SourceKind::Template),
        uses(SourceKind::Http),
        uses(SourceKind::File),
        uses(SourceKind::Static),
        uses(SourceKind::Proxmox),
    );
    if let Some(v) = t.get("template") {
        r.template = v.parse_str(AddressTemplate::parse);
    }
    if uses_template && r.template.is_none() && t.get("template").is_none() {
        t.missing("template");
    }
    // Shared by the sources that ask someone (http, proxmox).
    let d = |key: &str, default: u64| t.duration(key).unwrap_or(Duration::from_secs(default));
    let mut concurrency = 64;
    if let Some(v) = t.get("concurrency") {
        match v.int() {
            Some(n) if (1..=4096).contains(&n) => concurrency = n as usize,
            Some(_) => v.error("concurrency must be between 1 and 4096"),
            None => {}
        }
    }
    let policy = CachePolicy {
        timeout: d("timeout", 2),
        cache_ttl: d("cache_ttl", 30),
        negative_ttl: d("negative_ttl", 5),
        stale_for: d("stale_for", 300),
        concurrency,
    };
    if let Some(v) = t.get("url") {
        let url = v.parse_str(|s| {
            let ok = (s.starts_with("http://") || s.starts_with("https://"))
                && s.matches("{id}").count() == 1;
            if ok {
                Ok(s.to_owned())
            } else {
                Err(format!(
                    "{s:?} must be an http(s) URL containing {{id}} once"
                ))
            }
        });
        r.http = url.map(|url| HttpSourceSettings {
            url,
            token: t.get("token").and_then(|v| v.parse_str(resolve_secret)),
            timeout: policy.timeout,
            cache_ttl: policy.cache_ttl,
            negative_ttl: policy.negative_ttl,
            stale_for: policy.stale_for,
            concurrency,
        });
    }
    if uses_proxmox {
        r.proxmox = proxmox(&t, base, policy);
    }
    if uses_http && t.get("url").is_none() {
        t.missing("url");
    }
    r.file = t.str("file").map(|f| base.join(f));
    if uses_file && t.get("file").is_none() {
        t.missing("file");
    }
    if let (Some(v), false) = (t.get("vms"), uses_static) {
        v.error("[[registry.vms]] would never be asked: sources does not list \"static\"");
    }
    let mut ids = HashSet::new();
    for vm in t.tables("vms", &["id", "address", "ports", "scheme"]) {
        let id = vm.require("id").and_then(|v| {
            let id = v.parse_str(|s| {
                crate::route::check_name(s, "id")
                    .map(|_| s.to_owned())
                    .map_err(|e| e.to_string())
            })?;
            if !ids.insert(id.clone()) {
                v.error(format!("vm {id:?} is listed twice"));
                return None;
            }
            Some(id)
        });
        let address = vm
            .require("address")
            .and_then(|v| v.parse_str(Address::parse));
        let ports = vm.get("ports").map(|v| port_map(&v)).unwrap_or_default();
        let scheme = match vm.get("scheme") {
            None => Some(Scheme::Http),
            Some(v) => v.parse_str(|s| match s {
                "http" => Ok(Scheme::Http),
                "https" => Ok(Scheme::Https),
                _ => Err(format!("scheme {s:?} is not \"http\" or \"https\"")),
            }),
        };
        if let (Some(id), Some(address), Some(scheme)) = (id, address, scheme) {
            r.vms.push(Vm {
                id,
                address,
                ports,
                scheme,
                unresolvable_is_unknown: false,
            });
        }
    }
    r
}

/// `pve_url` / `pve_token` (default: the `PVE_API_URL` / `PVE_API_TOKEN` environment) and
/// the optional `pve_ca` bundle.
fn proxmox(t: &Table, base: &Path, policy: CachePolicy) -> Option<ProxmoxSettings> {
    let from = |key: &str, env: &str, check: fn(String) -> Result<String, String>| match t.get(key)
    {
        Some(v) => v.parse_str(|s| resolve_secret(s).and_then(check)),
        None => match std::env::var(env) {
            Ok(value) => match check(value) {
                Ok(v) => Some(v),
                Err(e) => {
                    t.ctx()
                        .report(&t.span(), &format!("registry.{key}"), format!("{env}: {e}"));
                    None
                }
            },
            Err(_) => {
                t.ctx().report(
                    &t.span(),
                    &format!("registry.{key}"),
                    format!(
                        "required by the proxmox source: set it, or the {env} environment variable"
                    ),
                );
                None
            }
        },
    };
    let url = from("pve_url", "PVE_API_URL", |s| {
        if s.starts_with("http://") || s.starts_with("https://") {
            Ok(s.trim_end_matches('/')
                .trim_end_matches("/api2/json")
                .to_owned())
        } else {
            Err(format!(
                "{s:?} is not an http(s) URL like \"https://pve.lan:8006\""
            ))
        }
    });
    let token = from("pve_token", "PVE_API_TOKEN", |s| {
        let bare = s.strip_prefix("PVEAPIToken=").unwrap_or(&s);
        if bare.contains('!') && bare.contains('=') {
            Ok(s)
        } else {
            Err("a PVE API token looks like USER@REALM!TOKENID=SECRET".into())
        }
    });
    let ca_pem = match t.get("pve_ca") {
        None => Some(None),
        Some(v) => v.parse_str(|f| pem_bundle(base, f).map(|(pem, _)| Some(pem))),
    };
    Some(ProxmoxSettings {
        url: url?,
        token: token?,
        ca_pem: ca_pem?,
        policy,
    })
}

fn port_map(v: &Val) -> BTreeMap<u16, u16> {
    let mut map = BTreeMap::new();
    for (key, key_span, val) in v.entries().unwrap_or_default() {
        let from = match parse_port_range(key) {
            Ok((p, q)) if p == q => p,
            _ => {
                v.ctx_report(&key_span, format!("{key:?} is not a port 1-65535"));
                continue;
            }
        };
        match val.int() {
            Some(n) if (1..=65535).contains(&n) => {
                map.insert(from, n as u16);
            }
            Some(_) => val.error("port must be 1-65535"),
            None => {}
        }
    }
    map
}

fn port_list(v: Option<Val>) -> Option<Vec<(u16, u16)>> {
    let v = v?;
    let mut out = Vec::new();
    for item in v.array()? {
        let range = match item.value() {
            toml::de::DeValue::Integer(_) => item.int().and_then(|n| {
                u16::try_from(n)
                    .ok()
                    .filter(|&p| p >= 1)
                    .map(|p| (p, p))
                    .or_else(|| {
                        item.error("port must be 1-65535");
                        None
                    })
            }),
            _ => item.parse_str(parse_port_range),
        };
        out.extend(range);
    }
    Some(out)
}

fn ports(top: &Table) -> PortSet {
    let Some(t) = top.table("ports", &["allow", "deny"]) else {
        return PortSet::new(&[(1, 65535)], &[]);
    };
    let allow = port_list(t.get("allow")).unwrap_or_else(|| vec![(1, 65535)]);
    let deny = port_list(t.get("deny")).unwrap_or_default();
    PortSet::new(&allow, &deny)
}

const POLICY_KEYS: &[&str] = &[
    "port",
    "cors",
    "allow_origins",
    "embed",
    "frame_ancestors",
    "rewrite_redirects",
    "inject_shim",
    "pass_client_headers",
    "host_header",
];

fn policies(top: &Table) -> Policies {
    let mut default: Option<PolicyPatch> = None;
    let mut ports: Vec<(u16, PolicyPatch)> = Vec::new();
    for t in top.tables("policy", POLICY_KEYS) {
        let Some(port_val) = t.require("port") else {
            continue;
        };
        let port = match port_val.value() {
            toml::de::DeValue::String(s) if s == "*" => None,
            toml::de::DeValue::Integer(_) => match port_val.int() {
                Some(n) if (1..=65535).contains(&n) => Some(n as u16),
                _ => {
                    port_val.error("port must be 1-65535 or \"*\"");
                    continue;
                }
            },
            _ => {
                port_val.error("port must be a number 1-65535 or \"*\"");
                continue;
            }
        };
        let patch = policy_patch(&t);
        match port {
            None if default.is_some() => port_val.error("a second policy for port \"*\""),
            None => default = Some(patch),
            Some(p) if ports.iter().any(|(q, _)| *q == p) => {
                port_val.error(format!("a second policy for port {p}"))
            }
            Some(p) => ports.push((p, patch)),
        }
    }
    Policies::new(default.as_ref(), &ports)
}

fn string_list(v: &Val) -> Option<Vec<String>> {
    v.array()?
        .iter()
        .map(|i| i.str().map(str::to_owned))
        .collect()
}

fn policy_patch(t: &Table) -> PolicyPatch {
    let mut p = PolicyPatch::default();
    if let Some(v) = t.get("cors") {
        p.cors = v.parse_str(|s| match s {
            "permissive" => Ok(Cors::Permissive),
            "strip" => Ok(Cors::Strip),
            "passthrough" => Ok(Cors::Passthrough),
            _ => Err(format!(
                "cors {s:?} is not \"permissive\", \"strip\" or \"passthrough\""
            )),
        });
    }
    if let Some(v) = t.get("allow_origins") {
        p.allow_origins =
            string_list(&v).map(|l| l.iter().map(|o| o.to_ascii_lowercase()).collect());
    }
    p.embed = t.bool("embed");
    if let Some(v) = t.get("frame_ancestors") {
        p.frame_ancestors = string_list(&v).and_then(|list| {
            let bad = list
                .iter()
                .find(|s| s.is_empty() || s.contains([';', ',', ' ', '\n']));
            match bad {
                Some(b) => {
                    v.error(format!("{b:?} is not a CSP source expression"));
                    None
                }
                None => Some(list),
            }
        });
    }
    p.rewrite_redirects = t.bool("rewrite_redirects");
    p.inject_shim = t.bool("inject_shim");
    if let Some(v) = t.get("pass_client_headers") {
        p.pass_client_headers = v.array().map(|items| {
            items
                .iter()
                .filter_map(|i| {
                    i.parse_str(|s| {
                        let lower = s.to_ascii_lowercase();
                        if !lower.starts_with("x-cmux-") {
                            return Err(format!(
                                "{s:?} is not an X-Cmux-* header (other client headers pass anyway)"
                            ));
                        }
                        HeaderName::from_bytes(lower.as_bytes())
                            .map_err(|_| format!("{s:?} is not a header name"))
                    })
                })
                .collect()
        });
    }
    if let Some(v) = t.get("host_header") {
        p.host_header = v.parse_str(|s| match s {
            "preserve" => Ok(HostHeader::Preserve),
            "upstream" => Ok(HostHeader::Upstream),
            _ => Err(format!(
                "host_header {s:?} is not \"preserve\" or \"upstream\""
            )),
        });
    }
    p
}

fn trust(top: &Table) -> TrustedProxies {
    let Some(t) = top.table("trust", &["proxies"]) else {
        return TrustedProxies::default();
    };
    let Some(v) = t.get("proxies") else {
        return TrustedProxies::default();
    };
    let mut entries = Vec::new();
    for item in v.array().unwrap_or_default() {
        if let Some(s) = item.str() {
            match TrustedProxies::parse([s]) {
                Ok(_) => entries.push(s),
                Err(e) => item.error(e),
            }
        }
    }
    TrustedProxies::parse(entries).unwrap_or_default()
}

fn admin(top: &Table, base: &Path) -> AdminSettings {
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

/// A PEM file of CA certificates (`pve_ca`, `ca_bundle`), read and checked at load so that
/// `check` reports a missing or empty file where it is named: (the file, its certificates).
pub(crate) fn pem_bundle(
    base: &Path,
    file: &str,
) -> Result<(Vec<u8>, Vec<rustls::pki_types::CertificateDer<'static>>), String> {
    use rustls::pki_types::pem::PemObject;
    let path = base.join(file);
    let pem = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok((pem, certs))
}

/// `"env:NAME"` reads the environment, so tokens stay out of config files.
pub fn resolve_secret(s: &str) -> Result<String, String> {
    let value = match s.strip_prefix("env:") {
        Some(name) => {
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?
        }
        None => s.to_owned(),
    };
    if value.trim().is_empty() {
        return Err("the token is empty".into());
    }
    Ok(value)
}

fn timeouts(top: &Table) -> Timeouts {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text)
    }

    const MINIMAL: &str = "[[domains]]\nname = \"example.com\"\n";

    #[test]
    fn a_minimal_file_gets_the_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen.http, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.listen.admin, Some("127.0.0.1:9180".parse().unwrap()));
        assert_eq!(c.router.patterns()[0].source(), DEFAULT_PATTERN);
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(5));
        assert_eq!(c.server.upgrade_sock, Path::new(DEFAULT_UPGRADE_SOCK));
        assert!(c.ports.allows(22));
    }

    #[test]
    fn the_upgrade_socket_path_is_configurable() {
        let c = parse(&format!(
            "[server]\nupgrade_sock = \"/run/cmux-edge/upgrade.sock\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            c.server.upgrade_sock,
            Path::new("/run/cmux-edge/upgrade.sock")
        );
        let err = parse(&format!("[server]\nupgrade_sock = \"\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("server.upgrade_sock"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_line_column_and_key() {
        let text = r#"[server]
threads = "two"
bogus = 1

[[domains]]
name = "Example.com"

[[routes]]
pattern = "port-{port}"

[registry]
source = "static"
[[registry.vms]]
id = "a"
address = "x@y"

[[policy]]
port = "*"
cors = "sometimes"
"#;
        let err = parse(text).unwrap_err();
        let lines: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server.threads",
                "server.bogus",
                "domains[1].name",
                "routes[1].pattern",
                "registry.vms[1].address",
                "policy[1].cors"
            ],
            "{lines:#?}"
        );
        assert!(lines[0].starts_with("t.toml:2:11: server.threads: expected an integer"));
        assert!(lines[1].starts_with("t.toml:3:1: server.bogus: unknown key"));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse("[[domains]]\nname = \n").unwrap_err();
        assert_eq!(err.problems[0].line, 2, "{err}");
    }

    #[test]
    fn a_missing_domain_is_an_error() {
        let err = parse("[server]\nthreads = 1\n").unwrap_err();
        assert_eq!(err.problems[0].key, "domains");
    }

    #[test]
    fn template_source_needs_a_template() {
        let err = parse(&format!("{MINIMAL}[registry]\nsource = \"template\"\n")).unwrap_err();
        assert_eq!(err.problems[0].key, "registry.template");
        let c = parse(&format!(
            "{MINIMAL}[registry]\nsource = \"template\"\ntemplate = \"cmux-{{id}}.lan\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.registry.sources,
            [SourceKind::Admin, SourceKind::Static, SourceKind::Template]
        );
    }

    #[test]
    fn source_means_admin_then_static_then_that_source() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.registry.sources, [SourceKind::Admin, SourceKind::Static]);
        let c = parse(&format!(
            "{MINIMAL}[registry]\nsource = \"file\"\nfile = \"vms.json\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.registry.sources,
            [SourceKind::Admin, SourceKind::Static, SourceKind::File]
        );
    }

    #[test]
    fn sources_give_the_whole_order() {
        let c = parse(&format!(
            "{MINIMAL}[registry]\nsources = [\"http\", \"static\", \"admin\"]\n\
             url = \"http://cp/vms/{{id}}\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.registry.sources,
            [SourceKind::Http, SourceKind::Static, SourceKind::Admin]
        );
        // every listed source needs its settings
        let err = parse(&format!(
            "{MINIMAL}[registry]\nsources = [\"admin\", \"template\"]\n"
        ))
        .unwrap_err();
        assert_eq!(err.problems[0].key, "registry.template", "{err}");
    }

    #[test]
    fn source_and_sources_together_is_an_error_at_sources() {
        let err = parse(&format!(
            "{MINIMAL}[registry]\nsource = \"static\"\nsources = [\"admin\"]\n"
        ))
        .unwrap_err();
        let line = err.problems[0].to_string();
        assert!(
            line.starts_with("t.toml:5:11: registry.sources: use either source"),
            "{line}"
        );
    }

    #[test]
    fn bad_source_lists_are_refused_item_by_item() {
        let err = parse(&format!(
            "{MINIMAL}[registry]\nsources = [\"admin\", \"consul\", \"admin\"]\n"
        ))
        .unwrap_err();
        let lines: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0].starts_with("t.toml:4:21: registry.sources[2]: unknown source \"consul\""),
            "{lines:#?}"
        );
        assert!(
            lines[1]
                .starts_with("t.toml:4:31: registry.sources[3]: source \"admin\" is listed twice"),
            "{lines:#?}"
        );
        let err = parse(&format!("{MINIMAL}[registry]\nsources = []\n")).unwrap_err();
        assert!(err.to_string().contains("at least one source"), "{err}");
        let err = parse(&format!("{MINIMAL}[registry]\nsource = \"nope\"\n")).unwrap_err();
        assert!(err.to_string().contains("unknown source \"nope\""), "{err}");
    }

    #[test]
    fn listed_vms_without_the_static_source_are_an_error() {
        let err = parse(&format!(
            "{MINIMAL}[registry]\nsources = [\"admin\"]\n\
             [[registry.vms]]\nid = \"a\"\naddress = \"10.0.0.1\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.problems[0].key, "registry.vms", "{err}");
        assert!(
            err.to_string().contains("does not list \"static\""),
            "{err}"
        );
    }

    #[test]
    fn the_proxmox_source_needs_an_api_url_and_a_token() {
        let c = parse(&format!(
            "{MINIMAL}[registry]\nsources = [\"admin\", \"proxmox\"]\n\
             pve_url = \"https://pve.lan:8006/api2/json\"\npve_token = \"root@pam!cmux=s3cret\"\n\
             cache_ttl = \"1m\"\n"
        ))
        .unwrap();
        let p = c.registry.proxmox.unwrap();
        assert_eq!(p.url, "https://pve.lan:8006");
        assert_eq!(p.policy.cache_ttl, Duration::from_secs(60));
        let err = parse(&format!(
            "{MINIMAL}[registry]\nsources = [\"proxmox\"]\n\
             pve_url = \"pve.lan\"\npve_token = \"s3cret\"\n"
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["registry.pve_url", "registry.pve_token"], "{err}");
        if std::env::var_os("PVE_API_URL").is_none() {
            let err = parse(&format!(
                "{MINIMAL}[registry]\nsources = [\"proxmox\"]\npve_token = \"a@pam!t=s\"\n"
            ))
            .unwrap_err();
            assert!(err.to_string().contains("PVE_API_URL"), "{err}");
        }
    }

    #[test]
    fn vm_port_maps_and_port_lists_parse() {
        let c = parse(&format!(
            "{MINIMAL}[ports]\nallow = [\"1000-2000\", 39378]\ndeny = [1500]\n\
             [[registry.vms]]\nid = \"200\"\naddress = \"10.0.0.2\"\nports = {{ 39378 = 32768 }}\n"
        ))
        .unwrap();
        assert!(c.ports.allows(39378) && c.ports.allows(1000) && !c.ports.allows(1500));
        assert!(!c.ports.allows(22));
        assert_eq!(c.registry.vms[0].upstream_port(39378), 32768);
        assert_eq!(c.registry.vms[0].upstream_port(80), 80);
    }

    #[test]
    fn secrets_come_from_the_environment() {
        assert_eq!(resolve_secret("literal"), Ok("literal".into()));
        assert!(resolve_secret("env:CMUX_EDGE_SURELY_UNSET_VAR").is_err());
    }
}
