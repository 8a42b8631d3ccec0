//! tracing setup: human lines by default, JSON with `CMUX_EDGE_LOG_FORMAT=json`, filtered by
//! `RUST_LOG`. pingora logs through `log`; the subscriber bridges it (tracing-log).

use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::EnvFilter;

/// The log is JSON (set once by [`init`]).
static JSON: AtomicBool = AtomicBool::new(false);

/// Whether the log is JSON (`CMUX_EDGE_LOG_FORMAT=json`), for the access log's own lines.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("CMUX_EDGE_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    JSON.store(json, Ordering::Relaxed);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
