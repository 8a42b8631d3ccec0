//! tracing setup: human lines by default, JSON with `CMUX_EDGE_LOG_FORMAT=json`, filtered by
//! `RUST_LOG`. pingora logs through `log`; the subscriber bridges it (tracing-log).

use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::EnvFilter;

/// The log is JSON (set once by [`init`]).
static JSON: AtomicBool = AtomicBool::new(false);

/// A value the client chose (the `Host`), for a log field. The text format writes it quoted,
/// with `"`, `\` and control characters escaped, so it cannot forge `key=value` fields or
/// lines; JSON escapes strings itself, so there it is written as is. No allocation.
pub struct Untrusted<'a>(pub &'a str);

impl std::fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if JSON.load(Ordering::Relaxed) {
            f.write_str(self.0)
        } else {
            write!(f, "{:?}", self.0)
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untrusted_value_cannot_forge_text_fields() {
        // JSON stays false in unit tests: the text format
        let forged = Untrusted("a.test status=200 vm=other\nfake=1 \"x\"").to_string();
        assert_eq!(forged, r#""a.test status=200 vm=other\nfake=1 \"x\"""#);
        assert!(!forged.contains('\n'));
        assert_eq!(Untrusted("edge.test").to_string(), "\"edge.test\"");
    }
}
