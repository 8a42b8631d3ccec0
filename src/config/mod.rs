//! The configuration file (SPEC §2): schema, defaults and validation.
//!
//! [`Config::parse`] reads the whole file and either returns a fully compiled config (route
//! patterns compiled, port sets built, policies merged) or every problem found, each with
//! file:line:column and its key. Nothing is half-applied: reload swaps whole configs.

mod access;
mod activity;
mod limits;
mod policy;
mod reader;
mod registry;
mod routing;
mod server;
mod tls;
mod upstreams;
mod wake;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;

use crate::egress::EgressPolicy;
use crate::policy::{parse_port_range, Cors, HostHeader, Policies, PolicyPatch, PortSet};
use crate::registry::{
    Address, AddressTemplate, CachePolicy, HttpSourceSettings, ProxmoxSettings, Scheme, Vm, VmState,
};
use crate::route::{Domain, Pattern, Router};
pub use crate::tls::settings::TlsSettings;
use crate::trust::TrustedProxies;
use policy::{policies, trust};
pub use reader::{parse_duration, Problem};
use reader::{Ctx, Table, Val};
use registry::registry;
pub use registry::{RegistrySettings, SourceKind, UpstreamCa};
use routing::{domains, ports, routes};
use server::{admin, listen, server, timeouts};
pub use server::{AdminSettings, Listen, ServerSettings, Timeouts};

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
    /// `[upstreams]`, with the listeners it protects: checked on every dialled address.
    pub upstreams: EgressPolicy,
    /// What `check` prints as warnings (the config is still valid).
    pub warnings: Vec<Problem>,
    /// `[limits] rewrite_max` and `rewrites`.
    pub rewrite_limits: crate::rewrite::RewriteLimits,
    pub limits: crate::limits::LimitSettings,
    pub access: Option<crate::access::AccessSettings>,
    /// `[wake]`; `None`: VMs that are not running are proxied as they are.
    pub wake: Option<crate::lifecycle::WakeSettings>,
    pub activity: crate::lifecycle::ActivitySettings,
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
                "server",
                "listen",
                "domains",
                "routes",
                "registry",
                "ports",
                "policy",
                "trust",
                "admin",
                "tls",
                "timeouts",
                "upstreams",
                "limits",
                "access",
                "wake",
                "activity",
            ],
        );
        let base = path.parent().unwrap_or(Path::new("."));
        let listen = listen(&top);
        let upstreams = EgressPolicy::new(
            &upstreams::upstreams(&top),
            [listen.admin, listen.http, listen.https]
                .into_iter()
                .flatten(),
        );
        let mut registry = registry(&top, base);
        let wake = wake::wake(&top, &mut registry);
        upstreams::warnings(&top, &upstreams, &registry);
        let (limits, rewrite_limits) = limits::limits(&top);
        let ports = ports(&top);
        let config = Config {
            path: path.to_owned(),
            server: server(&top, base),
            tls: tls::tls(&top, base, &listen),
            listen,
            router: Router::new(domains(&top), routes(&top)),
            registry,
            policies: policies(&top, &ports),
            ports,
            trust: trust(&top),
            admin: admin(&top, base),
            timeouts: timeouts(&top),
            upstreams,
            warnings: ctx.take_warnings(),
            rewrite_limits,
            limits,
            access: access::access(&top, base),
            wake,
            activity: activity::activity(&top),
        };
        if ctx.has_problems() {
            return Err(ConfigError {
                problems: ctx.into_problems(),
            });
        }
        Ok(config)
    }
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
        assert_eq!(c.server.upgrade_sock, crate::upgrade_socket::default_path());
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
    fn a_short_or_placeholder_admin_token_is_an_error_at_its_position() {
        for token in [
            "s3cret",
            "replace-me",
            "changeme",
            "replace-me-with-a-long-random-token-please",
            "0123456789abcdef0123456789abcde",
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        ] {
            let err = parse(&format!("{MINIMAL}[admin]\ntoken = \"{token}\"\n")).unwrap_err();
            let line = err.problems[0].to_string();
            assert!(
                line.starts_with("t.toml:4:9: admin.token: the token "),
                "{line}"
            );
            assert!(
                !line.contains(token),
                "the message repeats the token: {line}"
            );
        }
        let c = parse(&format!(
            "{MINIMAL}[admin]\ntoken = \"0123456789abcdef0123456789abcdef\"\n\
             hosts = [\"Edge-Admin.cmux.svc\"]\n"
        ))
        .unwrap();
        assert_eq!(c.admin.hosts, ["edge-admin.cmux.svc"]);
        let err = parse(&format!("{MINIMAL}[admin]\nhosts = [\"evil:80\"]\n")).unwrap_err();
        assert_eq!(err.problems[0].key, "admin.hosts[1]", "{err}");
    }

    #[test]
    fn secrets_come_from_the_environment() {
        assert_eq!(resolve_secret("literal"), Ok("literal".into()));
        assert!(resolve_secret("env:CMUX_EDGE_SURELY_UNSET_VAR").is_err());
    }
}
