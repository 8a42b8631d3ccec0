//! `cmux-edge vm add|rm|ls`: the admin API (`/api/vms`) from the command line.
//!
//! The admin address and token come from the config file, like `run` would use them, unless
//! `--admin` / `--token` say otherwise. Every failure is one line on stderr and exit 1.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use cmux_edge::config::Config;
use cmux_edge::registry::VmSpec;

#[derive(Args)]
pub struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
    /// Admin API base URL, e.g. http://127.0.0.1:9180 (default: [listen] admin of the config).
    #[arg(long, global = true, value_name = "URL")]
    admin: Option<String>,
    /// Bearer token (default: [admin] token of the config).
    #[arg(
        long,
        global = true,
        env = "CMUX_EDGE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Register a VM, or replace its registration.
    Add {
        /// The id in preview hosts, e.g. 200 in port-39378-vm-200.example.com.
        id: String,
        /// IP address or DNS name the VM's ports are reached at.
        address: String,
        /// A VM port published elsewhere, e.g. --port 39378=32768 (repeatable).
        #[arg(long = "port", value_name = "VM=PUBLIC", value_parser = port_mapping)]
        ports: Vec<(u16, u16)>,
        /// How the VM is spoken to.
        #[arg(long, value_parser = ["http", "https"])]
        scheme: Option<String>,
        /// A free-form label, e.g. --label task=t1 (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label)]
        labels: Vec<(String, String)>,
        /// RFC 3339 time after which the registration is gone.
        #[arg(long, value_name = "RFC3339")]
        expires_at: Option<String>,
    },
    /// Remove a VM's registration.
    Rm { id: String },
    /// List the registered VMs.
    Ls {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn port_mapping(s: &str) -> Result<(u16, u16), String> {
    let parse = |p: &str| p.parse::<u16>().ok().filter(|&n| n > 0);
    s.split_once('=')
        .and_then(|(from, to)| Some((parse(from)?, parse(to)?)))
        .ok_or_else(|| format!("{s:?} is not VM=PUBLIC with two ports 1-65535, e.g. 39378=32768"))
}

fn label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// A one-line failure for stderr.
struct Failure(String);

pub fn run(config_path: &Path, args: VmArgs) -> ExitCode {
    match run_inner(config_path, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(line)) => {
            eprintln!("cmux-edge: {line}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(config_path: &Path, args: VmArgs) -> Result<(), Failure> {
    let (base, token) = endpoint(config_path, args.admin, args.token)?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .map_err(|e| Failure(format!("cannot build an HTTP client: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(format!("cannot start a runtime: {e}")))?;
    let api = Api {
        client,
        base,
        token,
    };
    rt.block_on(async {
        match args.command {
            VmCommand::Add {
                id,
                address,
                ports,
                scheme,
                labels,
                expires_at,
            } => {
                let spec = VmSpec {
                    address,
                    ports: ports
                        .into_iter()
                        .map(|(from, to)| (from.to_string(), to))
                        .collect(),
                    scheme: scheme.unwrap_or_default(),
                    labels: labels.into_iter().collect(),
                    expires_at,
                    access_epoch: 0,
                    state: Default::default(),
                };
                let body = serde_json::to_vec(&spec)
                    .map_err(|e| Failure(format!("cannot encode the VM: {e}")))?;
                let (status, _) = api.call(reqwest::Method::PUT, &id, Some(body)).await?;
                let done = if status == 201 { "added" } else { "replaced" };
                println!("vm {id} {done}");
                Ok(())
            }
            VmCommand::Rm { id } => {
                api.call(reqwest::Method::DELETE, &id, None).await?;
                println!("vm {id} removed");
                Ok(())
            }
            VmCommand::Ls { json } => {
                let (_, body) = api.call(reqwest::Method::GET, "", None).await?;
                if json {
                    println!("{}", String::from_utf8_lossy(&body).trim_end());
                    return Ok(());
                }
                let vms: BTreeMap<String, VmSpec> = serde_json::from_slice(&body)
                    .map_err(|e| Failure(format!("the admin API answered unexpected JSON: {e}")))?;
                print!("{}", table(&vms));
                Ok(())
            }
        }
    })
}

/// The admin base URL and token: flags first, then the config file.
fn endpoint(
    config_path: &Path,
    admin: Option<String>,
    token: Option<String>,
) -> Result<(String, String), Failure> {
    let config = if admin.is_none() || token.is_none() {
        Some(Config::load(config_path).map_err(|e| {
            Failure(format!(
                "{e}\ncmux-edge: (the admin address and token come from this config; --admin and --token override it)"
            ))
        })?)
    } else {
        None
    };
    let base = match admin {
        Some(a) if a.contains("://") => a,
        Some(a) => format!("http://{a}"),
        None => {
            let addr = config
                .as_ref()
                .and_then(|c| c.listen.admin)
                .ok_or_else(|| {
                    Failure(format!(
                        "{} has no [listen] admin address; pass --admin URL",
                        config_path.display()
                    ))
                })?;
            // A wildcard listener is reached on loopback.
            let ip = match addr.ip() {
                std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
                    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
                }
                std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
                    std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
                }
                ip => ip,
            };
            format!("http://{}", std::net::SocketAddr::new(ip, addr.port()))
        }
    };
    let token = match token {
        Some(t) => t,
        None => config.and_then(|c| c.admin.token).ok_or_else(|| {
            Failure(format!(
                "{} has no [admin] token, so the admin API is closed; set one or pass --token",
                config_path.display()
            ))
        })?,
    };
    Ok((base.trim_end_matches('/').to_owned(), token))
}

struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    /// `/api/vms/{id}` (or `/api/vms` for an empty id). A 2xx gives status and body; anything
    /// else is a [`Failure`] that says what the API said.
    async fn call(
        &self,
        method: reqwest::Method,
        id: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), Failure> {
        let url = if id.is_empty() {
            format!("{}/api/vms", self.base)
        } else {
            format!("{}/api/vms/{id}", self.base)
        };
        let mut req = self.client.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.map_err(|e| {
            Failure(format!(
                "cannot reach the admin API at {}: {}",
                self.base,
                root_cause(&e)
            ))
        })?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| {
                Failure(format!(
                    "reading the admin API's answer: {}",
                    root_cause(&e)
                ))
            })?
            .to_vec();
        if status.is_success() {
            return Ok((status.as_u16(), body));
        }
        let said = String::from_utf8_lossy(&body);
        let said = said.lines().next().unwrap_or("").trim();
        Err(Failure(match status.as_u16() {
            401 => format!(
                "the admin API at {} refused the token (401): {said}",
                self.base
            ),
            404 if !id.is_empty() => format!("unknown vm {id} (404)"),
            code => format!("the admin API answered {code}: {said}"),
        }))
    }
}

/// The innermost error, e.g. "Connection refused (os error 111)" rather than reqwest's
/// "error sending request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The `vm ls` table: one row per VM, columns padded to their widest cell.
fn table(vms: &BTreeMap<String, VmSpec>) -> String {
    if vms.is_empty() {
        return "no VMs registered\n".into();
    }
    let join = |m: &BTreeMap<String, String>| {
        if m.is_empty() {
            "-".to_owned()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    let mut rows = vec![[
        "ID".to_owned(),
        "ADDRESS".to_owned(),
        "PORTS".to_owned(),
        "SCHEME".to_owned(),
        "EXPIRES".to_owned(),
        "LABELS".to_owned(),
    ]];
    for (id, s) in vms {
        let ports: BTreeMap<String, String> = s
            .ports
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        rows.push([
            id.clone(),
            s.address.clone(),
            join(&ports),
            if s.scheme.is_empty() {
                "http".into()
            } else {
                s.scheme.clone()
            },
            s.expires_at.clone().unwrap_or_else(|| "-".into()),
            join(&s.labels),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mappings_and_labels_parse_strictly() {
        assert_eq!(port_mapping("39378=32768"), Ok((39378, 32768)));
        for bad in ["39378", "0=80", "80=70000", "=80", "a=b"] {
            assert!(port_mapping(bad).is_err(), "{bad}");
        }
        assert_eq!(label("task=t1"), Ok(("task".into(), "t1".into())));
        assert_eq!(label("empty="), Ok(("empty".into(), String::new())));
        assert!(label("=v").is_err() && label("novalue").is_err());
    }

    #[test]
    fn the_endpoint_comes_from_the_config_and_a_wildcard_admin_is_reached_on_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(
            &path,
            "[listen]\nadmin = \"0.0.0.0:9999\"\n[[domains]]\nname = \"example.com\"\n\
             [admin]\ntoken = \"from-config-0123456789abcdef012345\"\n",
        )
        .unwrap();
        let got = |admin: Option<&str>, token: Option<&str>| {
            endpoint(&path, admin.map(Into::into), token.map(Into::into))
                .map_err(|Failure(e)| e)
                .unwrap()
        };
        assert_eq!(
            got(None, None),
            (
                "http://127.0.0.1:9999".into(),
                "from-config-0123456789abcdef012345".into()
            )
        );
        assert_eq!(
            got(Some("https://edge.lan:9180/"), Some("flag")),
            ("https://edge.lan:9180".into(), "flag".into())
        );
        std::fs::write(
            &path,
            "[listen]\nadmin = \"[::]:9180\"\n[[domains]]\nname = \"example.com\"\n",
        )
        .unwrap();
        assert_eq!(got(None, Some("t")).0, "http://[::1]:9180");
    }

    #[test]
    fn the_table_pads_columns_and_marks_absent_values() {
        let spec = |address: &str| VmSpec {
            address: address.into(),
            ports: BTreeMap::new(),
            scheme: String::new(),
            labels: BTreeMap::new(),
            expires_at: None,
            access_epoch: 0,
            state: Default::default(),
        };
        let mut long = spec("10.100.0.200");
        long.ports.insert("39378".into(), 32768);
        long.labels.insert("task".into(), "t1".into());
        let vms = BTreeMap::from([("200".to_owned(), long), ("b".to_owned(), spec("::1"))]);
        assert_eq!(
            table(&vms),
            "ID   ADDRESS       PORTS        SCHEME  EXPIRES  LABELS\n\
             200  10.100.0.200  39378=32768  http    -        task=t1\n\
             b    ::1           -            http    -        -\n"
        );
        assert_eq!(table(&BTreeMap::new()), "no VMs registered\n");
    }
}
