//! `[registry]`: the sources asked for a VM, in order, and each source's settings.

use super::*;

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
    /// `tls_ca`: the CAs that sign VM certificates (`scheme = "https"`), instead of the system
    /// roots. Parsed once at load, shared by every TLS upstream connection.
    pub tls_ca: Option<UpstreamCa>,
}

/// CA certificates for VM TLS, in the form pingora's connector takes per peer.
#[derive(Clone)]
pub struct UpstreamCa {
    pub certs: std::sync::Arc<[pingora::utils::tls::WrappedX509]>,
    /// A hash of the certificates, for the connection pool: pingora's pool key leaves the CA
    /// out, so without it a connection verified under a CA since removed would be reused.
    pub fingerprint: u64,
}

impl std::fmt::Debug for UpstreamCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpstreamCa({} certificates)", self.certs.len())
    }
}

/// `[registry] tls_ca`: a PEM bundle whose certificates all parse as X.509 (pingora's wrapper
/// panics on one that does not, so it is checked here).
fn upstream_ca(base: &Path, file: &str) -> Result<UpstreamCa, String> {
    let (_, certs) = pem_bundle(base, file)?;
    let mut out = Vec::with_capacity(certs.len());
    let mut fingerprint = std::hash::DefaultHasher::new();
    for (i, der) in certs.iter().enumerate() {
        std::hash::Hash::hash(der.as_ref(), &mut fingerprint);
        if x509_parser::parse_x509_certificate(der.as_ref()).is_err() {
            return Err(format!("{file}: certificate {} is not valid X.509", i + 1));
        }
        out.push(pingora::utils::tls::WrappedX509::new(
            der.as_ref().to_vec(),
            pingora::utils::tls::parse_x509,
        ));
    }
    Ok(UpstreamCa {
        certs: out.into(),
        fingerprint: std::hash::Hasher::finish(&fingerprint),
    })
}

pub(super) fn registry(top: &Table, base: &Path) -> RegistrySettings {
    let mut r = RegistrySettings {
        sources: vec![SourceKind::Admin, SourceKind::Static],
        template: None,
        http: None,
        file: None,
        proxmox: None,
        vms: Vec::new(),
        tls_ca: None,
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
            "tls_ca",
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
    if let Some(v) = t.get("tls_ca") {
        r.tls_ca = v.parse_str(|f| upstream_ca(base, f));
    }
    let mut ids = HashSet::new();
    for vm in t.tables(
        "vms",
        &[
            "id",
            "address",
            "ports",
            "scheme",
            "tls_server_name",
            "tls_verify",
            "access_epoch",
            "state",
        ],
    ) {
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
        // A name the certificate must carry: a DNS name or an IP address, as rustls takes it.
        let tls_server_name = vm.get("tls_server_name").and_then(|v| {
            v.parse_str(|s| {
                rustls::pki_types::ServerName::try_from(s)
                    .map(|_| s.to_ascii_lowercase())
                    .map_err(|_| format!("{s:?} is not a DNS name or an IP address"))
            })
        });
        let tls_verify = vm.bool("tls_verify").unwrap_or(true);
        if scheme != Some(Scheme::Https) {
            for key in ["tls_server_name", "tls_verify"] {
                if let Some(v) = vm.get(key) {
                    v.error("only used with scheme = \"https\"");
                }
            }
        }
        let state = match vm.get("state") {
            None => Some(VmState::Running),
            Some(v) => v.parse_str(|s| {
                serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
                    format!("state {s:?} is not \"running\", \"paused\" or \"stopped\"")
                })
            }),
        };
        if let (Some(id), Some(address), Some(scheme), Some(state)) = (id, address, scheme, state) {
            r.vms.push(Vm {
                id,
                address,
                ports,
                scheme,
                unresolvable_is_unknown: false,
                tls_server_name,
                tls_verify,
                self_reported: false,
                access_epoch: vm.get("access_epoch").map_or(0, |v| {
                    let n = v.int().unwrap_or(0);
                    u64::try_from(n).unwrap_or_else(|_| {
                        v.error("access_epoch must be 0 or more");
                        0
                    })
                }),
                state,
            });
        }
    }
    r
}

/// `pve_url` / `pve_token` (default: the `PVE_API_URL` / `PVE_API_TOKEN` environment) and
/// the optional `pve_ca` bundle.
pub(super) fn proxmox(t: &Table, base: &Path, policy: CachePolicy) -> Option<ProxmoxSettings> {
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
        find_stopped: false,
    })
}

pub(super) fn port_map(v: &Val) -> BTreeMap<u16, u16> {
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

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    fn parse(vms: &str) -> Result<Config, String> {
        let text = format!("[[domains]]\nname = \"example.com\"\n\n{vms}");
        Config::parse(Path::new("t.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn upstream_tls_keys_are_checked_where_they_are_written() {
        let c = parse(
            "[[registry.vms]]\nid = \"a\"\naddress = \"10.0.0.1\"\nscheme = \"https\"\n\
             tls_server_name = \"VM.lan\"\ntls_verify = false\n",
        )
        .unwrap();
        let vm = &c.registry.vms[0];
        assert_eq!(vm.tls_server_name.as_deref(), Some("vm.lan"));
        assert!(!vm.tls_verify);
        let plain =
            parse("[[registry.vms]]\nid = \"a\"\naddress = \"10.0.0.1\"\nscheme = \"https\"\n")
                .unwrap();
        assert!(
            plain.registry.vms[0].tls_verify,
            "verification is on by default"
        );
        let err =
            parse("[[registry.vms]]\nid = \"a\"\naddress = \"10.0.0.1\"\ntls_verify = false\n")
                .unwrap_err();
        assert!(
            err.contains(
                "t.toml:7:14: registry.vms[1].tls_verify: only used with scheme = \"https\""
            ),
            "{err}"
        );
        let err = parse(
            "[[registry.vms]]\nid = \"a\"\naddress = \"10.0.0.1\"\nscheme = \"https\"\ntls_server_name = \"a b\"\n",
        )
        .unwrap_err();
        assert!(err.contains("tls_server_name"), "{err}");
        let err = parse("[registry]\ntls_ca = \"/nonexistent/ca.pem\"\n").unwrap_err();
        assert!(
            err.contains("registry.tls_ca") && err.contains("cannot read"),
            "{err}"
        );
    }
}
