//! Prometheus metrics (SPEC §7), served as text on the admin listener's `/metrics`.
//!
//! Labels are a small fixed set (status class, route kind, reason, result): no VM id, host or
//! path, so cardinality is bounded whatever the traffic. The per-request series are resolved
//! to their children once at start, so recording is an atomic add with no lock.

use std::sync::LazyLock;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Who answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Proxied to a VM.
    Preview = 0,
    /// The bare domain.
    Apex = 1,
    /// cmux-edge itself: refusals, preflights, the service worker.
    Edge = 2,
}

const KINDS: [&str; 3] = ["preview", "apex", "edge"];
/// Registry lookup results, indexed by [`lookup_result`].
const LOOKUP_RESULTS: [&str; 3] = ["found", "unknown", "error"];

/// Preview access outcomes (SPEC §12): how a request passed, or why it was denied.
pub const ACCESS_OUTCOMES: [&str; 10] = [
    "session",
    "header",
    "exchange",
    "public",
    "missing",
    "expired",
    "wrong_vm",
    "wrong_port",
    "bad_signature",
    "revoked",
];

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// The index of a lookup's result in [`LOOKUP_RESULTS`].
pub fn lookup_result<T, E>(r: &Result<Option<T>, E>) -> usize {
    match r {
        Ok(Some(_)) => 0,
        Ok(None) => 1,
        Err(_) => 2,
    }
}

pub struct Metrics {
    registry: Registry,
    requests: [[IntCounter; 6]; 3],
    duration: [Histogram; 3],
    pub refusals: IntCounterVec,
    pub loop_rejections: IntCounter,
    pub upstream_errors: IntCounterVec,
    pub active_requests: IntGauge,
    pub active_connections: IntGauge,
    pub active_websockets: IntGauge,
    bytes_received: IntCounter,
    bytes_sent: IntCounter,
    /// Per request, by overall result: `found`, `unknown`, `error` (resolved once).
    registry_lookups: [IntCounter; 3],
    /// Per source asked, by source kind and result.
    registry_source_lookups: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub cert_expiry: GaugeVec,
    pub acme_orders: IntCounterVec,
    /// `[limits]` refusals by limit; `dry_run="true"` counts those a dry run let through.
    limited: IntCounterVec,
    /// Per gated request, by [`ACCESS_OUTCOMES`] (resolved once).
    access: [IntCounter; 10],
    /// Wakes by outcome (SPEC §13), indexed like [`WAKE_RESULTS`].
    wakes: [IntCounter; 3],
    wake_seconds: Histogram,
    /// Requests held for a waking VM.
    pub waiting_requests: IntGauge,
    /// Activity webhook batches by result, indexed like [`BATCH_RESULTS`].
    activity_batches: [IntCounter; 3],
}

/// Wake outcomes: the VM's port answered, the hook failed, or neither within the timeout.
pub const WAKE_RESULTS: [&str; 3] = ["awake", "failed", "timeout"];
/// Activity batches: delivered, a delivery attempt failed, dropped from a full backlog.
pub const BATCH_RESULTS: [&str; 3] = ["sent", "failed", "dropped"];

/// Holds a gauge one higher while it lives: whatever ends a request or connection (an
/// error, a panic unwinding, a client gone) brings the gauge back down.
pub struct Open(&'static IntGauge);

impl Open {
    pub fn new(gauge: &'static IntGauge) -> Open {
        gauge.inc();
        Open(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// 100 µs to 60 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let requests_vec = IntCounterVec::new(
            Opts::new(
                "cmux_edge_requests_total",
                "Requests by status class and route kind",
            ),
            &["class", "kind"],
        )
        .expect("valid metric");
        let duration_vec = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "cmux_edge_request_duration_seconds",
                "Time from request start to the end of the response, by route kind",
            )
            .buckets(BUCKETS.to_vec()),
            &["kind"],
        )
        .expect("valid metric");
        let requests = KINDS.map(|k| CLASSES.map(|c| requests_vec.with_label_values(&[c, k])));
        let duration = KINDS.map(|k| duration_vec.with_label_values(&[k]));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let lookups_vec = counter_vec(
            "cmux_edge_registry_lookups_total",
            "Registry lookups per request by result (found, unknown, error)",
            &["result"],
        );
        let access_vec = counter_vec(
            "cmux_edge_access_total",
            "Requests to private previews by outcome: how they passed, or why they were denied",
            &["outcome"],
        );
        let wakes_vec = counter_vec(
            "cmux_edge_wakes_total",
            "Wakes of paused or stopped VMs, by result (awake, failed, timeout)",
            &["result"],
        );
        let batches_vec = counter_vec(
            "cmux_edge_activity_batches_total",
            "Activity webhook batches: sent, failed (an attempt, retried) or dropped (backlog full)",
            &["result"],
        );
        let wake_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cmux_edge_wake_seconds",
                "Time from the start of a wake to the VM's port accepting connections",
            )
            .buckets(vec![
                0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
            ]),
        )
        .expect("valid metric");
        let m = Metrics {
            access: ACCESS_OUTCOMES.map(|o| access_vec.with_label_values(&[o])),
            wakes: WAKE_RESULTS.map(|r| wakes_vec.with_label_values(&[r])),
            wake_seconds,
            waiting_requests: IntGauge::new(
                "cmux_edge_waiting_requests",
                "Requests held while their VM wakes",
            )
            .expect("valid metric"),
            activity_batches: BATCH_RESULTS.map(|r| batches_vec.with_label_values(&[r])),
            requests,
            duration,
            refusals: counter_vec(
                "cmux_edge_refusals_total",
                "Requests answered by cmux-edge instead of a VM, by reason",
                &["reason"],
            ),
            loop_rejections: IntCounter::new(
                "cmux_edge_loop_rejections_total",
                "Requests refused with 508 because X-Cmux-Proxied was set",
            )
            .expect("valid metric"),
            upstream_errors: counter_vec(
                "cmux_edge_upstream_errors_total",
                "Upstream failures: connect (refused, unreachable) or timeout",
                &["kind"],
            ),
            active_requests: IntGauge::new("cmux_edge_active_requests", "Requests in flight")
                .expect("valid metric"),
            active_connections: IntGauge::new(
                "cmux_edge_active_connections",
                "Downstream connections open on the public listeners",
            )
            .expect("valid metric"),
            bytes_received: IntCounter::new(
                "cmux_edge_received_bytes_total",
                "Request body bytes read from clients (WebSocket frames included), counted when a request ends",
            )
            .expect("valid metric"),
            bytes_sent: IntCounter::new(
                "cmux_edge_sent_bytes_total",
                "Response body bytes written to clients (WebSocket frames included), counted when a request ends",
            )
            .expect("valid metric"),
            active_websockets: IntGauge::new(
                "cmux_edge_active_websockets",
                "Upgraded (WebSocket) connections open",
            )
            .expect("valid metric"),
            registry_lookups: LOOKUP_RESULTS.map(|r| lookups_vec.with_label_values(&[r])),
            registry_source_lookups: counter_vec(
                "cmux_edge_registry_source_lookups_total",
                "Lookups each registry source answered, by source and result (found, unknown, error)",
                &["source", "result"],
            ),
            config_reloads: counter_vec(
                "cmux_edge_config_reloads_total",
                "Config reloads by result (ok, error)",
                &["result"],
            ),
            cert_expiry: GaugeVec::new(
                Opts::new(
                    "cmux_edge_cert_expiry_timestamp_seconds",
                    "notAfter of each served certificate name, in Unix seconds",
                ),
                &["name"],
            )
            .expect("valid metric"),
            acme_orders: counter_vec(
                "cmux_edge_acme_orders_total",
                "ACME certificate orders by result (ok, error)",
                &["result"],
            ),
            limited: counter_vec(
                "cmux_edge_limited_total",
                "Requests and connections over a [limits] limit, by limit; dry_run=\"true\" ones were let through",
                &["limit", "dry_run"],
            ),
            registry: Registry::new(),
        };
        // Registration fails only for duplicate names, which a fixed list cannot have.
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            let _ = m.registry.register(c);
        };
        reg(Box::new(requests_vec));
        reg(Box::new(duration_vec));
        reg(Box::new(m.refusals.clone()));
        reg(Box::new(m.loop_rejections.clone()));
        reg(Box::new(m.upstream_errors.clone()));
        reg(Box::new(m.active_requests.clone()));
        reg(Box::new(m.active_connections.clone()));
        reg(Box::new(m.active_websockets.clone()));
        reg(Box::new(m.bytes_received.clone()));
        reg(Box::new(m.bytes_sent.clone()));
        reg(Box::new(lookups_vec));
        reg(Box::new(m.registry_source_lookups.clone()));
        reg(Box::new(m.config_reloads.clone()));
        reg(Box::new(m.cert_expiry.clone()));
        reg(Box::new(m.acme_orders.clone()));
        reg(Box::new(m.limited.clone()));
        reg(Box::new(access_vec));
        reg(Box::new(wakes_vec));
        reg(Box::new(m.wake_seconds.clone()));
        reg(Box::new(m.waiting_requests.clone()));
        reg(Box::new(batches_vec));
        m
    }

    /// One request or connection over `limit` (a `[limits]` key); `dry_run`: let through.
    pub fn limited(&self, limit: &'static str, dry_run: bool) {
        let mode = if dry_run { "true" } else { "false" };
        self.limited.with_label_values(&[limit, mode]).inc();
    }

    /// One finished request. `status` 0 means no response was written. Body bytes are those
    /// read from and written to the client.
    pub fn request(
        &self,
        kind: RouteKind,
        status: u16,
        seconds: f64,
        bytes_in: usize,
        bytes_out: usize,
    ) {
        self.bytes_received.inc_by(bytes_in as u64);
        self.bytes_sent.inc_by(bytes_out as u64);
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            500..=599 => 4,
            _ => 5,
        };
        self.requests[kind as usize][class].inc();
        self.duration[kind as usize].observe(seconds);
    }

    /// One request's registry answer; an atomic add, no lock.
    pub fn registry_lookup(&self, result: usize) {
        self.registry_lookups[result.min(2)].inc();
    }

    /// One access decision, by its index in [`ACCESS_OUTCOMES`]; an atomic add, no lock.
    pub fn access(&self, outcome: usize) {
        if let Some(c) = self.access.get(outcome) {
            c.inc();
        }
    }

    /// The per-result counters of one source, resolved once when a config is loaded.
    pub fn source_lookups(&self, source: &str) -> [IntCounter; 3] {
        LOOKUP_RESULTS.map(|r| self.registry_source_lookups.with_label_values(&[source, r]))
    }

    /// Replaces the certificate expiry series with the names now served.
    pub fn certificates(&self, infos: &[crate::tls::CertInfo]) {
        self.cert_expiry.reset();
        for info in infos {
            for name in &info.names {
                self.cert_expiry
                    .with_label_values(&[name.as_str()])
                    .set(info.not_after as f64);
            }
        }
    }

    /// A finished wake: `result` indexes [`WAKE_RESULTS`]; an awake VM's time is observed.
    pub fn wake(&self, result: usize, seconds: f64) {
        self.wakes[result.min(2)].inc();
        if result == 0 {
            self.wake_seconds.observe(seconds);
        }
    }

    /// One activity batch event; `result` indexes [`BATCH_RESULTS`].
    pub fn activity_batch(&self, result: usize) {
        self.activity_batches[result.min(2)].inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
