//! `cmux-edge` command line (SPEC §1): `run`, `check`, `explain`, `vm` (the admin API), and
//! `token` (SPEC §12).

mod cli_vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cmux_edge::access::{Access, AllPorts, Claims, Ports};
use cmux_edge::config::Config;
use cmux_edge::edge::{Generation, HostDecision};
use cmux_edge::registry::{AdminVms, Registry};
use std::sync::Arc;

/// mimalloc: per-thread free lists and no arena lock. It paid on every workload of the
/// side-by-side harness (benches/RESULTS.md, issue 15); the proxy allocates a few dozen small
/// blocks per request, mostly inside pingora and the http crate. Its v2 line (Cargo feature
/// `v2`): 1.4% fewer instructions and ~2% less CPU per request than v3; jemalloc cost more
/// CPU and more memory per idle WebSocket than either.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Mint a preview access token (SPEC §12) with an HS256 key of the config's `[access]`.
    Token {
        /// The VM id the token is for.
        #[arg(long)]
        vm: String,
        /// A port it grants (repeat for several); none: every port ("*").
        #[arg(long = "port")]
        ports: Vec<u16>,
        /// Lifetime, e.g. "60s", "10m".
        #[arg(long, default_value = "60s")]
        ttl: String,
        /// Key id (default: the first HS256 key).
        #[arg(long)]
        key: Option<String>,
        /// The VM's `access_epoch` the token is issued under.
        #[arg(long)]
        epoch: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run { upgrade: false }) {
        Command::Check => match Config::load(&cli.config) {
            Ok(config) => {
                // Warnings do not fail the check: the config is valid, probably not meant.
                for w in &config.warnings {
                    eprintln!("warning: {w}");
                }
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
        Command::Token {
            vm,
            ports,
            ttl,
            key,
            epoch,
        } => token(&cli.config, vm, ports, &ttl, key.as_deref(), epoch),
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

fn token(
    path: &std::path::Path,
    vm: String,
    ports: Vec<u16>,
    ttl: &str,
    key: Option<&str>,
    epoch: Option<u64>,
) -> ExitCode {
    let fail = |e: String| {
        eprintln!("cmux-edge token: {e}");
        ExitCode::FAILURE
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let ttl = match cmux_edge::config::parse_duration(ttl) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let access = match Access::new(config.access.as_ref()) {
        Ok(a) if a.enabled() => a,
        Ok(_) => return fail(format!("{} has no [access] section", path.display())),
        Err(e) => return fail(e.to_string()),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = Claims {
        vm,
        ports: if ports.is_empty() {
            Ports::All(AllPorts)
        } else {
            Ports::List(ports)
        },
        exp: now.saturating_add(ttl.as_secs()),
        nbf: None,
        iat: Some(now),
        sub: None,
        epoch,
    };
    match access.mint(key, &claims) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.to_string()),
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
    // Admin-API registrations, read without touching the file; expired ones do not answer.
    let overlay = config.admin.state_file.exists().then(|| {
        Arc::new(AdminVms::read_only(config.admin.state_file.clone())) as Arc<dyn Registry>
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
            let (source, answer) = rt.block_on(generation.resolve_named(&id, port));
            match answer {
                Ok(r) => {
                    println!(
                        "registry:  {source} -> {}:{} ({:?})",
                        r.vm.address, r.upstream_port, r.vm.scheme
                    );
                    ExitCode::SUCCESS
                }
                Err(r) => {
                    println!(
                        "registry:  {source} -> {} {}",
                        r.status().as_u16(),
                        r.body().trim_end()
                    );
                    ExitCode::FAILURE
                }
            }
        }
    }
}
