//! `cmux-edge` command line (SPEC §1): `run`, `check`, `explain`, and `vm` (the admin API).

mod cli_vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cmux_edge::config::Config;
use cmux_edge::edge::{Generation, HostDecision};
use cmux_edge::registry::{Registry, StaticVms, VmSpec};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "cmux-edge",
    version,
    about = "Edge proxy for sandbox preview URLs"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (default ./routes.toml; env CMUX_EDGE_CONFIG).
    #[arg(
        long,
        global = true,
        env = "CMUX_EDGE_CONFIG",
        default_value = "routes.toml"
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run {
        /// Take over the listening sockets of a running instance (zero-downtime upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate the config like `nginx -t`.
    Check,
    /// Print how a host would be routed.
    Explain { host: String },
    /// Register, remove and list VMs through the admin API: `vm add|rm|ls`.
    Vm(cli_vm::VmArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run { upgrade: false }) {
        Command::Check => match Config::load(&cli.config) {
            Ok(_) => {
                println!("config ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Explain { host } => explain(&cli.config, &host),
        Command::Vm(args) => cli_vm::run(&cli.config, args),
        Command::Run { upgrade } => {
            cmux_edge::logging::init();
            match cmux_edge::server::run(&cli.config, upgrade) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("cmux-edge: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn explain(path: &std::path::Path, host: &str) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Admin-API registrations, read without touching the file (no corrupt-file handling here).
    let overlay = std::fs::read_to_string(&config.admin.state_file)
        .ok()
        .and_then(|t| serde_json::from_str::<std::collections::BTreeMap<String, VmSpec>>(&t).ok())
        .map(|m| {
            let vms = m.iter().filter_map(|(id, s)| s.to_vm(id).ok()).collect();
            Arc::new(StaticVms::new(vms)) as Arc<dyn Registry>
        });
    let generation = Generation::new(config, overlay);
    println!("host:      {host}");
    match generation.decide_host(host) {
        Err(r) => {
            println!("rejected:  {} {}", r.status().as_u16(), r.body().trim_end());
            ExitCode::FAILURE
        }
        Ok(HostDecision::Apex { status, body }) => {
            println!("apex:      {status} {body:?}");
            ExitCode::SUCCESS
        }
        Ok(HostDecision::Preview {
            port,
            id,
            scope,
            domain,
            pattern,
            ..
        }) => {
            let p = generation.policy(port);
            if let Err(r) = generation.check_port(port) {
                println!("rejected:  {} {}", r.status().as_u16(), r.body().trim_end());
                return ExitCode::FAILURE;
            }
            println!("domain:    {domain}");
            println!(
                "pattern:   {} (route {})",
                generation.config.router.patterns()[pattern],
                pattern + 1
            );
            println!("port:      {port}");
            println!("id:        {id}");
            println!("scope:     {}", scope.as_deref().unwrap_or("-"));
            println!(
                "policy:    port {} cors={:?} allow_origins={:?} embed={} rewrite_redirects={} inject_shim={} cookies={:?} service_workers={:?} host_header={:?} pass_client_headers={:?}",
                p.port, p.cors, p.allow_origins.as_ref().map_or(&[][..], |o| &o.listed[..]), p.embed,
                p.rewrite_redirects, p.inject_shim, p.cookies, p.service_workers, p.host_header,
                p.pass_client_headers.iter().map(|h| h.as_str()).collect::<Vec<_>>()
            );
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let order: Vec<&str> = generation
                .config
                .registry
                .sources
                .iter()
                .map(|k| k.name())
                .collect();
            println!("sources:   {} (first answer wins)", order.join(", "));
            match rt.block_on(generation.resolve(&id, port)) {
                Ok(r) => {
                    println!(
                        "registry:  {} -> {}:{} ({:?})",
                        generation.registry.kind(),
                        r.vm.address,
                        r.upstream_port,
                        r.vm.scheme
                    );
                    ExitCode::SUCCESS
                }
                Err(r) => {
                    println!(
                        "registry:  {} -> {} {}",
                        generation.registry.kind(),
                        r.status().as_u16(),
                        r.body().trim_end()
                    );
                    ExitCode::FAILURE
                }
            }
        }
    }
}
