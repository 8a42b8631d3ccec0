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
use crate::slow::{Deadlines, Guarded};
use crate::tls::acme::{Acme, Http01};
use crate::tls::{CertStore, SniResolver};

/// Runs until a shutdown signal; returns after the drain.
pub fn run(config_path: &Path, upgrade: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    pingora::tls::install_default_crypto_provider();
    for w in &config.warnings {
        tracing::warn!("config: {w}");
    }
    // The upgrade socket's directory must be private (crate::upgrade_socket): an upgrading
    // process refuses to start otherwise, and so does any process when others can write to
    // it. A running one only warns when the directory cannot be created (e.g. no /run access)
    // or others can merely open it: it cannot be upgraded until that is fixed.
    let upgrade_sock = config.server.upgrade_sock.clone();
    match crate::upgrade_socket::prepare(&upgrade_sock) {
        Ok(()) => {}
        Err(
            e @ (crate::upgrade_socket::SocketError::Create { .. }
            | crate::upgrade_socket::SocketError::Shared {
                writable: false, ..
            }),
        ) if !upgrade => {
            tracing::warn!("{e}; zero-downtime upgrade is unavailable");
        }
        Err(e) => return Err(e.into()),
    }
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
        // pingora counts whole seconds: round up, and [`Signals`] ends the drain at `grace` itself.
        grace_period_seconds: Some(whole_seconds_at_least(grace)),
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
    // HTTP-01 answers only where ACME validates over HTTP: with DNS-01 a preview's own
    // `/.well-known/acme-challenge/` paths reach its VM.
    let http01 = acme
        .as_ref()
        .and(intercepts_http01(&config).then_some(http01));

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
    let timeouts = edge.current().config.timeouts;
    let mut opts = HttpServerOptions::default();
    opts.h2c = true;
    opts.keepalive_request_limit = Some(timeouts.keepalive_requests);
    opts.h2_idle_timeout = Some(timeouts.h2_idle);
    app.server_options = Some(opts);
    let mut proxy = Service::new(
        "cmux-edge".to_string(),
        CountedConnections {
            inner: Arc::new(app),
            deadlines: Deadlines {
                client_header: timeouts.client_header,
                client_idle: timeouts.client_idle,
            },
            edge: edge.clone(),
        },
    );
    proxy.set_connection_filter(Arc::new(ConnectionLimit(edge.clone())));
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
        shutdown_signal: Box::new(Signals {
            grace,
            upgrade_sock,
        }),
    });
    crate::access_log::flush();
    tracing::info!("cmux-edge stopped");
    Ok(())
}

/// Counts open downstream connections (`cmux_edge_active_connections`, and `[limits]
/// connections_per_ip`) around pingora's own app, and puts each under the head and idle
/// deadlines ([`crate::slow`]). It serves a connection's requests in the same loop pingora's
/// listener would, so the gauge and the slot drop exactly when the connection is done,
/// whatever the protocol. On the TLS listener pingora has already done the handshake here:
/// [`ConnectionLimit`] refuses a full client before that, and this is the exact count (taken
/// atomically) that may still close a connection that raced past it.
struct CountedConnections<A> {
    inner: Arc<A>,
    deadlines: Deadlines,
    edge: Arc<Edge>,
}

/// `[limits] connections_per_ip` at accept, before TLS: pingora's connection filter can
/// refuse but never sees a connection end, so it only reads the count `CountedConnections`
/// keeps. Keyed by the TCP peer (a trusted proxy counts as one client: nothing has been read
/// that could name the client behind it).
struct ConnectionLimit(Arc<Edge>);

impl std::fmt::Debug for ConnectionLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionLimit")
    }
}

#[async_trait]
impl pingora::listeners::ConnectionFilter for ConnectionLimit {
    async fn should_accept(&self, addr: Option<&std::net::SocketAddr>) -> bool {
        let Some(addr) = addr else { return true };
        let g = self.0.current();
        !self.0.limits.connections_full(&g.config.limits, addr.ip())
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for CountedConnections<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let limits = self.edge.current().config.limits;
        let _slot = self.edge.limits.connection(&limits, peer)?; // over: closed
        let _open = crate::metrics::Open::new(&METRICS.active_connections);
        let stream: Stream = Box::new(Guarded::new(stream, self.deadlines));
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

/// Whether the edge answers `/.well-known/acme-challenge/*` itself: only while ACME validates
/// by HTTP-01 (configured, and no DNS-01 provider).
fn intercepts_http01(config: &Config) -> bool {
    config.tls.acme.as_ref().is_some_and(|a| a.dns.is_none())
}

/// pingora's grace is whole seconds: the smallest that is not shorter than `grace` (at least 1).
fn whole_seconds_at_least(grace: Duration) -> u64 {
    let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    secs.max(1)
}

/// SIGTERM and SIGINT both drain gracefully (pingora's default makes SIGINT a hard stop).
/// The process exits as soon as the last request finishes, or when the grace runs out.
struct Signals {
    grace: Duration,
    upgrade_sock: std::path::PathBuf,
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
        let upgrade = loop {
            let upgrade = tokio::select! {
                _ = int.recv() => false,
                _ = term.recv() => false,
                _ = quit.recv() => true,
            };
            // pingora connects and sends the listeners itself: check who bound the socket first.
            match crate::upgrade_socket::check_peer(&self.upgrade_sock) {
                Err(e) if upgrade => {
                    tracing::error!("SIGQUIT ignored, the listeners stay here: {e}");
                }
                _ => break upgrade,
            }
        };
        tracing::info!(grace = ?self.grace, in_flight = IN_FLIGHT.load(Ordering::Relaxed), upgrade, "shutting down: draining");
        let grace = self.grace;
        tokio::spawn(async move {
            // pingora sleeps the whole grace period even when idle, in whole seconds; leave
            // once drained, and at `grace` to the millisecond when not.
            let deadline = tokio::time::Instant::now() + grace;
            if upgrade {
                // The new process needs a moment to take the sockets over.
                tokio::time::sleep(Duration::from_secs(6)).await;
            }
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if IN_FLIGHT.load(Ordering::Relaxed) == 0 {
                    tracing::info!("drained; exiting");
                    crate::access_log::flush();
                    std::process::exit(0);
                }
                if !upgrade && tokio::time::Instant::now() >= deadline {
                    tracing::warn!(
                        in_flight = IN_FLIGHT.load(Ordering::Relaxed),
                        "shutdown_grace over; exiting"
                    );
                    crate::access_log::flush();
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
                METRICS.config_reloads.with_label_values(&["error"]).inc();
                tracing::error!(
                    reason = why,
                    "config reload refused, the old config keeps serving:\n{e}"
                );
            }
            Ok(mut new) => {
                for w in &new.warnings {
                    tracing::warn!("config: {w}");
                }
                for what in restart_only_changes(&old.config, &new) {
                    tracing::warn!("{what} changed: it takes effect after a restart");
                }
                if new.listen != old.config.listen {
                    // The sockets actually bound stay protected from egress.
                    let l = &old.config.listen;
                    new.upstreams = new
                        .upstreams
                        .for_listeners([l.admin, l.http, l.https].into_iter().flatten());
                    new.listen = old.config.listen.clone();
                }
                self.edge.swap(new);
                METRICS.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(reason = why, "config reloaded");
            }
        }
    }

    /// Sources that watch files re-read them, and expired admin registrations leave memory
    /// and the state file whether or not `sources` routes them. Never on a request.
    async fn refresh(&self) {
        let registry = self.edge.current().registry.clone();
        let admin = self.edge.admin_vms.clone();
        let _ = tokio::task::spawn_blocking(move || {
            registry.refresh();
            crate::registry::Registry::refresh(admin.as_ref());
        })
        .await;
    }
}

/// The settings a reload reads but cannot apply: pingora binds the listeners, sizes the
/// runtime and installs the certificate resolver once, and the admin state file is opened
/// at start. Each one that changed is named in a warning.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if new.listen != old.listen {
        changed.push("listener addresses");
    }
    if new.server.threads != old.server.threads {
        changed.push("server.threads");
    }
    if new.server.shutdown_grace != old.server.shutdown_grace {
        changed.push("server.shutdown_grace");
    }
    if new.server.upgrade_sock != old.server.upgrade_sock {
        changed.push("server.upgrade_sock");
    }
    if new.admin.state_file != old.admin.state_file {
        changed.push("admin.state_file");
    }
    if new.tls.certs_dir != old.tls.certs_dir {
        changed.push("tls.certs_dir");
    }
    if new.tls.acme != old.tls.acme {
        changed.push("tls.acme");
    }
    changed
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
                    self.refresh().await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config_in(dir: &Path, text: &str) -> Config {
        let path = dir.join("routes.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap()
    }

    const BASE: &str = "[[domains]]\nname = \"edge.test\"\n";

    #[test]
    fn grace_keeps_its_milliseconds() {
        let dir = tempfile::tempdir().unwrap();
        let c = config_in(
            dir.path(),
            &format!("[server]\nshutdown_grace = \"1500ms\"\n{BASE}"),
        );
        assert_eq!(c.server.shutdown_grace, Duration::from_millis(1500));
        // pingora's own timer never ends the drain before ours does.
        assert_eq!(whole_seconds_at_least(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds_at_least(Duration::from_secs(5)), 5);
        assert_eq!(whole_seconds_at_least(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_at_least(Duration::ZERO), 1);
    }

    #[test]
    fn restart_only_settings_are_named_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let old = config_in(dir.path(), BASE);
        assert!(restart_only_changes(&old, &old.clone()).is_empty());
        let new = config_in(
            dir.path(),
            &format!(
                "[server]\nthreads = 3\nshutdown_grace = \"9s\"\nupgrade_sock = \"u.sock\"\n\
                 [admin]\nstate_file = \"other.json\"\n{BASE}"
            ),
        );
        assert_eq!(
            restart_only_changes(&old, &new),
            [
                "server.threads",
                "server.shutdown_grace",
                "server.upgrade_sock",
                "admin.state_file"
            ]
        );
    }

    fn reloader(dir: &Path, text: &str) -> Reloader {
        let config = config_in(dir, text);
        let (admin, problem) = AdminVms::open(config.admin.state_file.clone());
        assert!(problem.is_none(), "{problem:?}");
        Reloader {
            path: config.path.clone(),
            edge: Arc::new(Edge::new(config, Arc::new(admin))),
        }
    }

    #[test]
    fn a_refused_reload_is_counted_as_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let r = reloader(dir.path(), BASE);
        let errors = || METRICS.config_reloads.with_label_values(&["error"]).get();
        let oks = || METRICS.config_reloads.with_label_values(&["ok"]).get();
        let (e0, o0) = (errors(), oks());
        std::fs::write(&r.path, "[[domains]]\nname = 7\n").unwrap();
        r.reload("test");
        assert_eq!((errors(), oks()), (e0 + 1, o0));
        std::fs::write(&r.path, BASE).unwrap();
        r.reload("test");
        assert_eq!((errors(), oks()), (e0 + 1, o0 + 1));
    }

    #[tokio::test]
    async fn expired_admin_registrations_are_swept_without_admin_in_sources() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("cmux-edge-state.json");
        std::fs::write(
            &state,
            r#"{"gone": {"address": "10.0.0.1", "expires_at": "2001-01-01T00:00:00Z"},
                "kept": {"address": "10.0.0.2"}}"#,
        )
        .unwrap();
        let r = reloader(
            dir.path(),
            &format!("{BASE}[registry]\nsources = [\"static\"]\n"),
        );
        r.refresh().await;
        let text = std::fs::read_to_string(&state).unwrap();
        assert!(!text.contains("gone"), "{text}");
        assert!(text.contains("kept"), "{text}");
    }
}
