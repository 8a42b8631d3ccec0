//! Assembles the pingora server: the proxy service on the `http` (h2c) and `https` (TLS,
//! ALPN h2 + http/1.1, SNI) listeners, the admin service, the certificate watcher, and
//! signal handling (SIGTERM/SIGINT: stop accepting, drain, exit 0; SIGQUIT: hand the
//! listeners to a `run --upgrade` process through `[server] upgrade_sock`, then drain).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::apps::ServerApp;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::protocols::Stream;
use pingora::proxy::http_proxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::admin::{Admin, Readiness};
use crate::config::Config;
use crate::edge::{Edge, IN_FLIGHT};
use crate::metrics::METRICS;
use crate::proxy::EdgeProxy;
use crate::registry::AdminVms;
use crate::tls::acme::{Acme, Http01};
use crate::tls::{CertStore, SniResolver};

/// Runs until a shutdown signal; returns after the drain.
pub fn run(config_path: &Path, upgrade: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    pingora::tls::install_default_crypto_provider();
    if !upgrade {
        // pingora binds inside a task and only panics there; say it plainly up front instead.
        for addr in [config.listen.http, config.listen.https, config.listen.admin]
            .into_iter()
            .flatten()
        {
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr}"))?;
        }
    }

    let grace = config.server.shutdown_grace;
    let threads = config
        .server
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let conf = ServerConf {
        threads,
        // One worker has nobody to steal from: tokio's current-thread scheduler does the same
        // job with fewer atomics and cross-thread wakeups.
        work_stealing: threads > 1,
        grace_period_seconds: Some(grace.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: config.server.upgrade_sock.to_string_lossy().into_owned(),
        ..Default::default()
    };
    let opt = Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let resolver = config.listen.https.map(|_| {
        let (store, problems) = CertStore::load_dir(&config.tls.certs_dir);
        for p in problems {
            tracing::warn!("certificate skipped: {p}");
        }
        tracing::info!(dir = %config.tls.certs_dir.display(), certs = store.infos().len(), "certificates loaded");
        METRICS.certificates(store.infos());
        // Clients that send no SNI (an IP address in the URL) get the first domain's certificate.
        let default_sni = config.router.domains().first().map(|d| d.name.clone());
        Arc::new(SniResolver::new(store, default_sni))
    });
    let acme_domains = config
        .tls
        .acme
        .as_ref()
        .map(|a| a.domains.clone())
        .unwrap_or_default();
    let readiness = Arc::new(Readiness {
        serving: Default::default(),
        tls: resolver.clone(),
        acme_domains,
    });
    let http01 = Arc::new(Http01::new(&config.tls.certs_dir));
    let acme = match (&config.tls.acme, &resolver) {
        (Some(settings), Some(resolver)) => Some(Acme::new(
            settings.clone(),
            config.tls.certs_dir.clone(),
            resolver.clone(),
            http01.clone(),
        )),
        _ => None,
    };
    // HTTP-01 answers only where ACME is configured.
    let http01 = acme.as_ref().map(|_| http01);

    let listen = config.listen.clone();
    let certs_dir = config.tls.certs_dir.clone();
    let (admin_vms, state_problem) = AdminVms::open(config.admin.state_file.clone());
    if let Some(p) = state_problem {
        tracing::error!("{p}");
    }
    tracing::info!(state = %config.admin.state_file.display(), vms = admin_vms.list().len(), "admin registrations loaded");
    let edge = Arc::new(Edge::new(config, Arc::new(admin_vms)));
    server.add_service(background_service(
        "config reloader",
        Reloader {
            path: config_path.to_owned(),
            edge: edge.clone(),
        },
    ));

    let mut app = http_proxy(
        &server.configuration,
        EdgeProxy {
            edge: edge.clone(),
            http01,
        },
    );
    let mut opts = HttpServerOptions::default();
    opts.h2c = true;
    app.server_options = Some(opts);
    let mut proxy = Service::new(
        "cmux-edge".to_string(),
        CountedConnections {
            inner: Arc::new(app),
        },
    );
    if let Some(http) = listen.http {
        // No L4 read buffer: pingora's default is 64 KiB, zero-filled, per connection, and
        // HTTP/1 reads land in pingora's own header/body buffers anyway. It made an idle
        // WebSocket cost ~78 KiB of RSS (benches/RESULTS.md).
        proxy.add_listener(
            ListenerConfig::tcp(http.to_string()).l4_buffer(L4BufferSettings::default().read(0)),
        );
    }
    if let (Some(https), Some(resolver)) = (listen.https, &resolver) {
        let mut tls = TlsSettings::intermediate("", "").context("TLS settings")?;
        tls.set_cert_resolver(resolver.clone());
        tls.enable_h2();
        proxy.add_tls_with_settings(&https.to_string(), None, tls);
    }
    server.add_service(proxy);

    if let Some(admin_addr) = listen.admin {
        let mut admin = Service::new(
            "cmux-edge admin".to_string(),
            Admin {
                readiness: readiness.clone(),
                edge: edge.clone(),
            },
        );
        admin.add_tcp(&admin_addr.to_string());
        admin.threads = Some(1);
        server.add_service(admin);
    }
    if let Some(resolver) = resolver {
        server.add_service(background_service(
            "certificate watcher",
            CertWatcher {
                dir: certs_dir,
                resolver,
            },
        ));
    }
    if let Some(acme) = acme {
        server.add_service(background_service("acme", AcmeService(acme)));
    }
    // Idle until a config sets `[activity] webhook` (a reload may add one).
    server.add_service(background_service(
        "activity webhook",
        crate::lifecycle::Pusher { edge: edge.clone() },
    ));
    server.add_service(background_service(
        "readiness",
        ListenersUp {
            addrs: [listen.http, listen.https].into_iter().flatten().collect(),
            readiness,
        },
    ));
    tracing::info!(http = ?listen.http, https = ?listen.https, admin = ?listen.admin, "cmux-edge starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals { grace }),
    });
    tracing::info!("cmux-edge stopped");
    Ok(())
}

/// Counts open downstream connections (`cmux_edge_active_connections`) around pingora's own
/// app. It serves a connection's requests in the same loop pingora's listener would, so the
/// gauge drops exactly when the connection is done, whatever the protocol.
struct CountedConnections<A> {
    inner: Arc<A>,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for CountedConnections<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _open = crate::metrics::Open::new(&METRICS.active_connections);
        let mut next = self.inner.process_new(stream, shutdown).await;
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// SIGTERM and SIGINT both drain gracefully (pingora's default makes SIGINT a hard stop).
/// The process exits as soon as the last request finishes, or when the grace runs out.
struct Signals {
    grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term), Ok(mut quit)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        let upgrade = tokio::select! {
            _ = int.recv() => false,
            _ = term.recv() => false,
            _ = quit.recv() => true,
        };
        tracing::info!(grace = ?self.grace, in_flight = IN_FLIGHT.load(Ordering::Relaxed), upgrade, "shutting down: draining");
        tokio::spawn(async move {
            // pingora sleeps the whole grace period even when idle; leave once drained.
            if upgrade {
                // The new process needs a moment to take the sockets over.
                tokio::time::sleep(Duration::from_secs(6)).await;
            }
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if IN_FLIGHT.load(Ordering::Relaxed) == 0 {
                    tracing::info!("drained; exiting");
                    std::process::exit(0);
                }
            }
        });
        if upgrade {
            ShutdownSignal::GracefulUpgrade
        } else {
            ShutdownSignal::GracefulTerminate
        }
    }
}

/// Reloads the config on SIGHUP and when the file changes (polled each second). A file that
/// does not validate is refused with every problem logged; the old config keeps serving.
/// Requests and WebSockets already under way finish on the generation they started with.
struct Reloader {
    path: std::path::PathBuf,
    edge: Arc<Edge>,
}

impl Reloader {
    fn stamp(&self) -> Option<(std::time::SystemTime, u64)> {
        let md = std::fs::metadata(&self.path).ok()?;
        Some((md.modified().ok()?, md.len()))
    }

    fn reload(&self, why: &str) {
        let old = self.edge.current();
        match Config::load(&self.path) {
            Err(e) => {
                tracing::error!(
                    reason = why,
                    "config reload refused, the old config keeps serving:\n{e}"
                );
            }
            Ok(new) => {
                if new.listen != old.config.listen {
                    tracing::warn!("listener addresses changed: they take effect after a restart");
                }
                if new.tls.certs_dir != old.config.tls.certs_dir {
                    tracing::warn!("tls.certs_dir changed: it takes effect after a restart");
                }
                if new.tls.acme != old.config.tls.acme {
                    tracing::warn!("tls.acme changed: it takes effect after a restart");
                }
                self.edge.swap(new);
                METRICS.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(reason = why, "config reloaded");
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("cannot watch SIGHUP: {e}");
                None
            }
        };
        let mut seen = self.stamp();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = hangup => {
                    seen = self.stamp();
                    self.reload("SIGHUP");
                }
                _ = tick.tick() => {
                    let now = self.stamp();
                    if now.is_some() && now != seen {
                        seen = now;
                        self.reload("file changed");
                    }
                    // Sources that watch files re-read them here, never on a request.
                    let registry = self.edge.current().registry.clone();
                    let _ = tokio::task::spawn_blocking(move || registry.refresh()).await;
                }
            }
        }
    }
}

/// Polls `certs_dir` and swaps in a fresh store when anything in it changed. Polling works
/// on every filesystem, Kubernetes Secret volumes (symlink swaps) included.
struct CertWatcher {
    dir: std::path::PathBuf,
    resolver: Arc<SniResolver>,
}

#[async_trait]
impl BackgroundService for CertWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut seen = crate::tls::dir_fingerprint(&self.dir);
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            let dir = self.dir.clone();
            let Ok(now) =
                tokio::task::spawn_blocking(move || crate::tls::dir_fingerprint(&dir)).await
            else {
                continue;
            };
            if now == seen {
                continue;
            }
            seen = now;
            crate::tls::reload_store(&self.dir, &self.resolver).await;
        }
    }
}

/// Keeps the ACME certificate ordered and renewed (see [`crate::tls::acme`]).
struct AcmeService(Acme);

#[async_trait]
impl BackgroundService for AcmeService {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.run(shutdown).await
    }
}

/// Marks the process ready once every public listener accepts connections: pingora binds
/// them in its own tasks, so only a connection proves they are up.
struct ListenersUp {
    addrs: Vec<std::net::SocketAddr>,
    readiness: Arc<Readiness>,
}

#[async_trait]
impl BackgroundService for ListenersUp {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        for addr in &self.addrs {
            // A wildcard address is reached through loopback.
            let mut target = *addr;
            if target.ip().is_unspecified() {
                target.set_ip(match target {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            let connect = || {
                tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(target),
                )
            };
            while !matches!(connect().await, Ok(Ok(_))) {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
        self.readiness.serving.store(true, Ordering::Release);
        tracing::info!("cmux-edge serving");
    }
}
