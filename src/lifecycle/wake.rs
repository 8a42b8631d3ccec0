//! Wake on request (SPEC §13): a request for a `paused` or `stopped` VM starts one wake per VM,
//! however many requests arrive, and waits for it; a browser navigation gets the waiting page
//! at once instead.
//!
//! Cost for a running VM: one comparison of the registry's `state`, one path comparison for
//! [`STATUS_PATH`], and one atomic load (a map read only while some wake is in flight, so that
//! requests arriving after the control plane said `running` but before the port is up wait
//! for the wake too). Everything else happens only for VMs that are not
//! running. The wakes in flight live on `Edge` ([`Wakes`]), so a reload neither forgets nor
//! repeats one; each wake finishes on the generation that started it.
//!
//! One VM's wake, as the table the style guide asks for:
//!
//! | state            | event                                   | next             | the client sees                         |
//! |------------------|-----------------------------------------|------------------|-----------------------------------------|
//! | idle             | request for a paused/stopped VM          | hooking          | held; a navigation: the waiting page    |
//! | idle             | connect refused, `on_connect_error`      | hooking          | held (pingora retries the connect)      |
//! | hooking/probing  | another request                          | unchanged        | held with the others (≤ `max_waiting`)  |
//! | hooking/probing  | request beyond `max_waiting`             | unchanged        | 503 + Retry-After                       |
//! | hooking          | hook answers 2xx / exits 0               | probing          | still held                              |
//! | hooking          | hook fails                               | idle (failed)    | 502 `wake failed: vm <id>: <reason>`    |
//! | probing          | registry asked again, port accepts TCP   | idle (awake)     | every held request proxied              |
//! | probing          | port refuses: wait 50 ms, doubling to 1 s| probing          | still held                              |
//! | hooking/probing  | `timeout` since the wake began           | idle (timed out) | 503 `vm <id> is waking up` + Retry-After|
//!
//! A held request waits at most `timeout` itself. The wake runs as its own task, so it ends
//! (and is counted) even when every client gave up. The hook carries an `Idempotency-Key`
//! unique per wake, so replicas that wake the same VM at once can be deduplicated by the
//! control plane.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::FutureExt;
use http::header;
use pingora::http::RequestHeader;
use pingora::{Error, ErrorType};

use crate::edge::{Generation, Resolved, Target};
use crate::flight::{Flight, Flights};
use crate::metrics::{Open, METRICS};
use crate::registry::Vm;
use crate::respond::{Answer, Refusal, Reply};

/// The edge endpoint the waiting page polls, on the preview host itself.
pub const STATUS_PATH: &str = "/.cmux-edge/wake-status";

/// How long a finished wake's outcome is remembered for the waiting page.
const REMEMBER: Duration = Duration::from_secs(60);
/// Bound on remembered outcomes; past it the oldest half is forgotten.
const MAX_REMEMBERED: usize = 10_000;

/// `[wake]`.
#[derive(Debug, Clone)]
pub struct WakeSettings {
    pub hook: WakeHook,
    /// How long a request is held, and how long one wake may take.
    pub timeout: Duration,
    /// Requests held per VM; more answer 503 + Retry-After.
    pub max_waiting: usize,
    /// Also wake a `running` VM whose port refuses connections.
    pub on_connect_error: bool,
}

/// What wakes a VM.
#[derive(Clone)]
pub enum WakeHook {
    /// `POST` to the URL (`{id}` substituted), `Idempotency-Key` per wake, Bearer token.
    Url { url: String, token: Option<String> },
    /// Executed directly (no shell), `{id}` substituted in each argument.
    Command(Vec<String>),
    /// PVE `status/start` or `status/resume` with the `proxmox` source's token.
    Proxmox,
}

impl std::fmt::Debug for WakeHook {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WakeHook::Url { url, token } => f
                .debug_struct("Url")
                .field("url", url)
                .field("token", &token.as_ref().map(|_| ".."))
                .finish(),
            WakeHook::Command(argv) => f.debug_tuple("Command").field(argv).finish(),
            WakeHook::Proxmox => f.write_str("Proxmox"),
        }
    }
}

/// Why a wake failed: the `<reason>` of the 502.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WakeError {
    #[error("the hook answered {0}")]
    Status(u16),
    #[error("the hook is unreachable: {0}")]
    Unreachable(String),
    #[error("the command {0}")]
    Command(String),
    #[error("proxmox: {0}")]
    Proxmox(String),
    #[error("the registry no longer knows it")]
    Vanished,
}

/// How one wake ended, shared by everyone who waited for it.
#[derive(Debug, Clone)]
enum Outcome {
    Awake(Arc<Vm>),
    Failed(WakeError),
    TimedOut,
}

/// The wakes in flight and their waiters, on `Edge`.
pub struct Wakes {
    flights: Flights<Outcome>,
    waiting: Arc<DashMap<String, usize>>,
    last: Arc<DashMap<String, (Instant, Outcome)>>,
    /// Wakes in flight: while 0, a running VM costs one atomic load.
    in_flight: Arc<AtomicUsize>,
    client: reqwest::Client,
}

impl std::fmt::Debug for Wakes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wakes")
            .field("flights", &self.flights)
            .finish_non_exhaustive()
    }
}

impl Default for Wakes {
    fn default() -> Self {
        Wakes {
            flights: Flights::default(),
            waiting: Arc::default(),
            last: Arc::default(),
            in_flight: Arc::default(),
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap_or_default(),
        }
    }
}

/// `on_connect_error`'s progress through one request.
#[derive(Debug, Default)]
pub enum Rewake {
    #[default]
    No,
    /// The connect was refused: wake, then connect again.
    Due,
    /// Done once; a second refusal is answered as usual.
    Done,
    /// The wake answered instead (waiting page, 502, 503), for `fail_to_proxy` to write.
    Answered(Answer),
}

impl Rewake {
    /// `fail_to_connect`: with `on_connect_error`, a refused connection asks for one wake
    /// and one more try (safe: nothing of the request was sent).
    pub fn after_connect_error(&mut self, g: Option<&Generation>, e: &mut Error) {
        let on = g
            .and_then(|g| g.config.wake.as_ref())
            .is_some_and(|w| w.on_connect_error);
        let refused = matches!(
            e.etype(),
            ErrorType::ConnectRefused | ErrorType::ConnectTimedout | ErrorType::ConnectNoRoute
        );
        if on && refused && matches!(self, Rewake::No) {
            *self = Rewake::Due;
            e.set_retry(true);
        }
    }

    /// The answer the wake gave instead of proxying, if any.
    pub fn take_answer(&mut self) -> Option<Answer> {
        match std::mem::replace(self, Rewake::Done) {
            Rewake::Answered(a) => Some(a),
            _ => None,
        }
    }
}

/// A browser loading a page: it gets the waiting page rather than a held request.
pub fn is_navigation(req: &RequestHeader) -> bool {
    if req.headers.contains_key(header::UPGRADE) {
        return false;
    }
    let h = |name| req.headers.get(name).and_then(|v| v.to_str().ok());
    if h("sec-fetch-mode").is_some_and(|m| m.eq_ignore_ascii_case("navigate")) {
        return true;
    }
    // `Accept` whose first (most preferred, as browsers send it) type is HTML.
    req.method == http::Method::GET
        && h("accept").is_some_and(|a| {
            a.split(',')
                .next()
                .is_some_and(|t| t.trim().starts_with("text/html"))
        })
}

/// Holds one place in a VM's queue (and the gauge) while a request waits.
struct Waiting {
    map: Arc<DashMap<String, usize>>,
    id: String,
    _gauge: Open,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.map.remove_if_mut(&self.id, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

impl Wakes {
    /// After the registry answered: a running VM passes at once; otherwise the request waits
    /// for the VM's one wake (a navigation gets the waiting page). Answers
    /// [`STATUS_PATH`] for the waiting page.
    pub async fn until_running(
        &self,
        g: &Arc<Generation>,
        req: &RequestHeader,
        id: &str,
        port: u16,
        resolved: Resolved,
    ) -> Result<Resolved, Answer> {
        let Some(settings) = &g.config.wake else {
            return Ok(resolved);
        };
        if req.uri.path() == STATUS_PATH {
            return Err(self.status(id, &resolved.vm).into());
        }
        let flight = if resolved.vm.state.is_running() {
            // A control plane may report `running` before the port is up: requests that
            // arrive while its wake is still in flight wait for it too.
            if self.in_flight.load(Ordering::Relaxed) == 0 {
                return Ok(resolved);
            }
            match self.flights.get(id) {
                Some(flight) => flight,
                None => return Ok(resolved),
            }
        } else {
            self.start(g, id, port)
        };
        if is_navigation(req) {
            return Err(waiting_page(id).into());
        }
        self.hold(settings, id, port, flight).await
    }

    /// `upstream_peer` after a refused connect (`on_connect_error`): waits for a wake, then
    /// points `target` at the VM's (maybe new) address for pingora's next try.
    pub async fn after_refusal(
        &self,
        rewake: &mut Rewake,
        g: &Arc<Generation>,
        req: &RequestHeader,
        target: &mut Target,
    ) -> pingora::Result<()> {
        if !matches!(rewake, Rewake::Due) {
            return Ok(());
        }
        *rewake = Rewake::Done;
        let Some(settings) = &g.config.wake else {
            return Ok(());
        };
        let flight = self.start(g, &target.id, target.port);
        let woken = if is_navigation(req) {
            Err(waiting_page(&target.id).into())
        } else {
            self.hold(settings, &target.id, target.port, flight).await
        };
        let answer = match woken {
            Ok(resolved) => match g.upstream_addr(&target.id, target.port, &resolved).await {
                Ok(addr) => {
                    target.addr = addr;
                    target.authority = resolved.authority(&target.policy);
                    return Ok(());
                }
                Err(answer) => answer,
            },
            Err(answer) => answer,
        };
        *rewake = Rewake::Answered(answer);
        Error::e_explain(ErrorType::Custom("wake"), "answered by the wake")
    }

    /// The wake in flight for `id`, or a new one, run as its own task.
    fn start(&self, g: &Arc<Generation>, id: &str, port: u16) -> Flight<Outcome> {
        let (flight, started) = self.flights.join(id, || {
            let job = Job {
                g: g.clone(),
                id: id.to_owned(),
                port,
                client: self.client.clone(),
                last: self.last.clone(),
                in_flight: self.in_flight.clone(),
            };
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            job.run().boxed()
        });
        if started {
            tokio::spawn(flight.clone());
        }
        flight
    }

    async fn hold(
        &self,
        settings: &WakeSettings,
        id: &str,
        port: u16,
        flight: Flight<Outcome>,
    ) -> Result<Resolved, Answer> {
        let _place = self.queue(id, settings.max_waiting)?;
        match tokio::time::timeout(settings.timeout, flight).await {
            Ok(Outcome::Awake(vm)) => Ok(Resolved {
                upstream_port: vm.upstream_port(port),
                vm,
            }),
            Ok(Outcome::Failed(reason)) => Err(Refusal::WakeFailed {
                id: id.to_owned(),
                reason,
            }
            .into()),
            Ok(Outcome::TimedOut) | Err(_) => Err(Refusal::Waking(id.to_owned()).into()),
        }
    }

    fn queue(&self, id: &str, max: usize) -> Result<Waiting, Refusal> {
        let mut n = self.waiting.entry(id.to_owned()).or_insert(0);
        if *n >= max {
            return Err(Refusal::WakeQueueFull(id.to_owned()));
        }
        *n += 1;
        drop(n);
        Ok(Waiting {
            map: self.waiting.clone(),
            id: id.to_owned(),
            _gauge: Open::new(&METRICS.waiting_requests),
        })
    }

    /// What the waiting page polls: `{"vm", "state", "reason"?}` with state `waking`,
    /// `running`, `failed`, `timeout`, or the registry's `paused`/`stopped`.
    fn status(&self, id: &str, vm: &Vm) -> Reply {
        let last = self
            .last
            .get(id)
            .filter(|e| e.0.elapsed() < REMEMBER)
            .map(|e| e.1.clone());
        let (state, reason) = if self.flights.get(id).is_some() {
            ("waking", None)
        } else {
            match last {
                Some(Outcome::Awake(_)) => ("running", None),
                Some(Outcome::Failed(e)) => ("failed", Some(e.to_string())),
                Some(Outcome::TimedOut) => ("timeout", None),
                None => (vm.state.as_str(), None),
            }
        };
        let body = serde_json::json!({"vm": id, "state": state, "reason": reason});
        Reply::body(
            200,
            "application/json",
            body.to_string().into(),
            "wake_status",
        )
    }
}

/// One wake: the hook, then probes until the port accepts, all within `timeout`.
struct Job {
    g: Arc<Generation>,
    id: String,
    port: u16,
    client: reqwest::Client,
    last: Arc<DashMap<String, (Instant, Outcome)>>,
    in_flight: Arc<AtomicUsize>,
}

impl Job {
    async fn run(self) -> Outcome {
        let started = Instant::now();
        let Some(settings) = self.g.config.wake.clone() else {
            return Outcome::Failed(WakeError::Unreachable("[wake] is not configured".into()));
        };
        let deadline = tokio::time::Instant::now() + settings.timeout;
        let outcome = match tokio::time::timeout_at(deadline, self.hook(&settings)).await {
            Err(_) => Outcome::TimedOut,
            Ok(Err(e)) => Outcome::Failed(e),
            Ok(Ok(())) => tokio::time::timeout_at(deadline, self.probe())
                .await
                .unwrap_or(Outcome::TimedOut),
        };
        let (result, level_fail) = match &outcome {
            Outcome::Awake(_) => (0, false),
            Outcome::Failed(_) => (1, true),
            Outcome::TimedOut => (2, true),
        };
        let secs = started.elapsed().as_secs_f64();
        METRICS.wake(result, secs);
        if level_fail {
            tracing::warn!(vm = %self.id, ?outcome, seconds = secs, "wake did not bring the VM up");
        } else {
            tracing::info!(vm = %self.id, seconds = secs, "VM woken");
        }
        if self.last.len() >= MAX_REMEMBERED {
            self.last.retain(|_, (at, _)| at.elapsed() < REMEMBER / 2);
        }
        self.last
            .insert(self.id.clone(), (Instant::now(), outcome.clone()));
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        outcome
    }

    async fn hook(&self, settings: &WakeSettings) -> Result<(), WakeError> {
        let id = self.id.as_str();
        match &settings.hook {
            WakeHook::Url { url, token } => {
                // The id is validated ([a-z0-9_-]) before it gets here: safe in a URL path.
                let url = url.replace("{id}", id);
                let mut req = self
                    .client
                    .post(&url)
                    .timeout(settings.timeout)
                    .header("idempotency-key", format!("{:032x}", fastrand::u128(..)))
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(serde_json::json!({ "id": id }).to_string());
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                let resp = req
                    .send()
                    .await
                    .map_err(|e| WakeError::Unreachable(e.without_url().to_string()))?;
                match resp.status() {
                    s if s.is_success() => Ok(()),
                    s => Err(WakeError::Status(s.as_u16())),
                }
            }
            WakeHook::Command(argv) => run_command(argv, id).await,
            WakeHook::Proxmox => match &self.g.config.registry.proxmox {
                Some(pve) => crate::registry::wake_container(pve, id)
                    .await
                    .map_err(WakeError::Proxmox),
                None => Err(WakeError::Proxmox("no proxmox source".into())),
            },
        }
    }

    /// Asks the registry again (the address may change on resume) and connects to the port,
    /// 50 ms apart at first, doubling to 1 s. Ends only when awake or gone; the caller's
    /// deadline bounds it.
    async fn probe(&self) -> Outcome {
        let mut interval = Duration::from_millis(50);
        loop {
            self.g.registry.forget(&self.id);
            match self.g.registry.lookup(&self.id).resolve().await {
                Ok(Some(vm)) => {
                    let resolved = Resolved {
                        upstream_port: vm.upstream_port(self.port),
                        vm,
                    };
                    if let Ok(addr) = self.g.upstream_addr(&self.id, self.port, &resolved).await {
                        // 0.0.0.0 is "no address yet" (a stopped container), never a target.
                        let connect = tokio::net::TcpStream::connect(addr);
                        let wait = interval.max(Duration::from_millis(250));
                        if !addr.ip().is_unspecified()
                            && matches!(tokio::time::timeout(wait, connect).await, Ok(Ok(_)))
                        {
                            return Outcome::Awake(resolved.vm);
                        }
                    }
                }
                Ok(None) => return Outcome::Failed(WakeError::Vanished),
                Err(e) => {
                    tracing::debug!(vm = %self.id, error = %e, "registry unavailable while waking")
                }
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_secs(1));
        }
    }
}

/// The variables a `[wake] command` gets besides `PATH` (its credentials, for instance).
pub const ENV_PREFIX: &str = "CMUX_EDGE_WAKE_";

/// The exec hook: `argv` with `{id}` substituted, no shell, a cleared environment
/// ([`crate::hook::env`]), killed if the wake times out.
async fn run_command(argv: &[String], id: &str) -> Result<(), WakeError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(WakeError::Command("is empty".into()));
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.env_clear()
        .envs(crate::hook::env(ENV_PREFIX, std::env::vars_os()))
        .args(args.iter().map(|a| a.replace("{id}", id)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = crate::hook::spawn(&mut cmd)
        .await
        .map_err(|e| WakeError::Command(format!("cannot start: {e}")))?;
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| WakeError::Command(format!("failed: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first: String = stderr
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    Err(WakeError::Command(format!("{}: {first}", out.status)))
}

/// The page a browser navigation gets while its VM wakes: self-contained (no external
/// asset), it polls [`STATUS_PATH`] on the same host and reloads once the VM is up.
fn waiting_page(id: &str) -> Reply {
    // The id is [a-z0-9_-] (validated routing), safe in HTML and JS as it is.
    let html = WAITING_PAGE.replace("{id}", id);
    let mut reply = Reply::body(503, "text/html; charset=utf-8", html.into(), "wake_page");
    let _ = reply.head.insert_header(header::RETRY_AFTER, 2);
    reply
}

const WAITING_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Waking up {id}…</title>
<style>
body{font:16px system-ui,sans-serif;display:flex;min-height:90vh;align-items:center;justify-content:center;color:#222;background:#fafafa}
main{max-width:28em;text-align:center}
.bar{height:6px;background:#e5e5e5;border-radius:3px;overflow:hidden;margin:1em 0}
.bar div{height:100%;width:0;background:#3b82f6;transition:width .5s}
#why{color:#b91c1c}
</style></head>
<body><main>
<h1>Waking up <code>{id}</code></h1>
<div class="bar"><div id="fill"></div></div>
<p id="msg">Starting the sandbox… <span id="secs">0</span> s</p>
<p id="why"></p>
<noscript>This page reloads itself when JavaScript runs; reload it in a few seconds.</noscript>
</main>
<script>
(function(){
  var t0 = Date.now(), done = false;
  function tick(){
    var s = (Date.now() - t0) / 1000;
    document.getElementById('secs').textContent = Math.floor(s);
    document.getElementById('fill').style.width = Math.min(95, 100 * (1 - Math.exp(-s / 8))) + '%';
  }
  function poll(){
    if (done) return;
    fetch('/.cmux-edge/wake-status', {cache: 'no-store'}).then(function(r){ return r.json(); }).then(function(st){
      if (st.state === 'running') {
        done = true;
        document.getElementById('fill').style.width = '100%';
        document.getElementById('msg').textContent = 'Ready. Loading…';
        location.reload();
      } else if (st.state === 'failed' || st.state === 'timeout') {
        done = true;
        document.getElementById('msg').textContent = 'The sandbox did not wake up.';
        document.getElementById('why').textContent = (st.reason || st.state) + ' (reload to try again)';
      } else if (st.state === 'paused' || st.state === 'stopped') {
        done = true;
        location.reload();
      }
    }).catch(function(){}).then(function(){ if (!done) setTimeout(poll, 700); });
  }
  setInterval(tick, 250);
  setTimeout(poll, 300);
})();
</script>
</body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, b"/", None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn navigations_are_told_apart_from_fetches_and_websockets() {
        assert!(is_navigation(&req(
            "GET",
            &[("sec-fetch-mode", "navigate")]
        )));
        let chrome = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(is_navigation(&req("GET", &[("accept", chrome)])));
        assert!(!is_navigation(&req("POST", &[("accept", chrome)])));
        assert!(!is_navigation(&req("GET", &[("accept", "*/*")])));
        assert!(!is_navigation(&req(
            "GET",
            &[("accept", "application/json, text/html")]
        )));
        assert!(!is_navigation(&req(
            "GET",
            &[("sec-fetch-mode", "navigate"), ("upgrade", "websocket")]
        )));
    }

    #[test]
    fn a_wake_failure_reads_as_one_line() {
        let r = Refusal::WakeFailed {
            id: "b1".into(),
            reason: WakeError::Status(500),
        };
        assert_eq!(r.body(), "wake failed: vm b1: the hook answered 500\n");
        assert_eq!(r.status().as_u16(), 502);
        assert!(r.retry_after().is_some());
        assert_eq!(Refusal::Waking("b1".into()).body(), "vm b1 is waking up\n");
    }
}
