//! The access log (README "Access log"): one line per request on stderr, in the text or JSON
//! shape of the rest of the log, filtered like it by `RUST_LOG` (target `access`).
//!
//! Formatted here, not by tracing-subscriber: its formatter paints every field name through
//! `nu_ansi_term` and every value through `fmt::Debug`, about 24,000 instructions a request
//! (callgrind), a sixth of the edge's own work on a small response. This writes the same
//! line in about 5,000.
//!
//! Written by a thread of its own, like nginx's `access_log ... buffer= flush=`: a worker
//! appends the line to its own buffer (an uncontended lock) and the writer thread empties
//! every buffer to stderr each [`FLUSH_EVERY`], or sooner once one holds [`FLUSH_AT`] bytes.
//! One `write` a request cost the worker about 4 µs of kernel time on a file. Lines are
//! whole in each `write`, so they never interleave; a line shows at most 100 ms late; the
//! ones still buffered are written when the server stops. A stderr that does not keep up
//! costs lines, never memory or a blocked worker: past [`MAX_PENDING`] bytes a thread's
//! lines are dropped and counted, and the count is logged.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::Thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the writer thread empties the buffers.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A buffer this full wakes the writer thread at once.
pub const FLUSH_AT: usize = 64 * 1024;
/// A thread's unwritten lines past this are dropped (stderr is not keeping up).
pub const MAX_PENDING: usize = 4 * 1024 * 1024;

/// One request, as the access log records it.
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub client: Option<IpAddr>,
    pub method: &'a str,
    /// The normalised host: the client chose it, so it is escaped in both formats.
    pub host: &'a str,
    /// The path only: query strings carry tokens and personal data.
    pub path: &'a str,
    pub vm: &'a str,
    pub port: u16,
    pub status: u16,
    pub upstream: Option<SocketAddr>,
    pub upstream_status: u16,
    pub bytes_in: usize,
    pub bytes_out: usize,
    pub duration: Duration,
    pub websocket: bool,
    pub refusal: &'a str,
    pub error: &'a str,
}

/// Whether `RUST_LOG` keeps the access log (`access=info`).
pub fn enabled() -> bool {
    tracing::enabled!(target: "access", tracing::Level::INFO)
}

/// One worker thread's lines not yet written, and the formatted second of its last line.
#[derive(Default)]
struct Pending {
    lines: String,
    second: Second,
}

/// The writer thread and every worker thread's buffer.
struct Writer {
    buffers: Mutex<Vec<Arc<Mutex<Pending>>>>,
    thread: Thread,
}

static WRITER: OnceLock<Writer> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static MINE: Arc<Mutex<Pending>> = register();
}

fn writer() -> &'static Writer {
    WRITER.get_or_init(|| {
        let thread = std::thread::Builder::new()
            .name("access log".into())
            .spawn(|| loop {
                std::thread::park_timeout(FLUSH_EVERY);
                flush();
            })
            .map(|h| h.thread().clone())
            // No thread: lines are written only by `flush` when the server stops.
            .unwrap_or_else(|_| std::thread::current());
        Writer {
            buffers: Mutex::default(),
            thread,
        }
    })
}

fn register() -> Arc<Mutex<Pending>> {
    let mine = Arc::new(Mutex::new(Pending::default()));
    relock(&writer().buffers).push(mine.clone());
    mine
}

/// A lock whose holder panicked is still usable: the buffers hold whole lines or nothing.
fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Queues `e` as one line for stderr, if the filter keeps it.
pub fn write(e: &Entry<'_>) {
    if !enabled() {
        return;
    }
    let json = crate::logging::json();
    let wake = MINE.with(|mine| {
        let mut p = relock(mine);
        if p.lines.len() > MAX_PENDING {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let Pending { lines, second } = &mut *p;
        let before = lines.len();
        format(lines, second, SystemTime::now(), e, json);
        before < FLUSH_AT && lines.len() >= FLUSH_AT
    });
    if wake {
        writer().thread.unpark();
    }
}

/// Writes every buffered line to stderr: the writer thread's work, and the server's last act.
pub fn flush() {
    let Some(w) = WRITER.get() else { return };
    let buffers: Vec<_> = relock(&w.buffers).clone();
    let mut out = String::new();
    for b in buffers {
        // Swap, not copy: the worker's lock is held for a pointer exchange.
        std::mem::swap(&mut relock(&b).lines, &mut out);
        if !out.is_empty() {
            let _ = std::io::stderr().lock().write_all(out.as_bytes());
            out.clear();
        }
    }
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "access log: stderr is not keeping up; lines dropped"
        );
    }
}

/// The line for `e` at `now`, ending in `\n`. Literal text is pushed, numbers go through
/// `itoa`: `write!` with `Display` costs several times more per field.
fn format(out: &mut String, second: &mut Second, now: SystemTime, e: &Entry<'_>, json: bool) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut n = itoa::Buffer::new();
    let q = if json { "\"" } else { "" };
    // Each field: its separator and name, one literal per format.
    macro_rules! key {
        ($name:literal) => {
            out.push_str(if json {
                concat!(",\"", $name, "\":")
            } else {
                concat!(" ", $name, "=")
            })
        };
    }
    if json {
        out.push_str("{\"timestamp\":\"");
    }
    out.push_str(second.get(since.as_secs()));
    out.push('.');
    pad(out, &mut n, u64::from(since.subsec_micros()), 6);
    if json {
        out.push_str("Z\",\"level\":\"INFO\",\"target\":\"access\"");
    } else {
        out.push_str("Z  INFO access:");
    }
    let string = |out: &mut String, v: &str, untrusted: bool| {
        if json || untrusted {
            escaped(out, v);
        } else {
            plain(out, v);
        }
    };
    key!("request_id");
    string(out, e.request_id, false);
    key!("client");
    out.push_str(q);
    if let Some(ip) = e.client {
        push_ip(out, ip);
    }
    out.push_str(q);
    key!("method");
    string(out, e.method, false);
    key!("host");
    string(out, e.host, true);
    key!("path");
    string(out, e.path, false);
    key!("vm");
    string(out, e.vm, true);
    key!("port");
    out.push_str(n.format(e.port));
    key!("status");
    out.push_str(n.format(e.status));
    key!("upstream");
    out.push_str(q);
    if let Some(a) = e.upstream {
        if a.is_ipv6() {
            out.push('[');
            push_ip(out, a.ip());
            out.push(']');
        } else {
            push_ip(out, a.ip());
        }
        out.push(':');
        out.push_str(n.format(a.port()));
    }
    out.push_str(q);
    key!("upstream_status");
    out.push_str(n.format(e.upstream_status));
    key!("bytes_in");
    out.push_str(n.format(e.bytes_in));
    key!("bytes_out");
    out.push_str(n.format(e.bytes_out));
    let ns = e.duration.as_nanos().min(u128::from(u64::MAX)) as u64;
    key!("duration_ms");
    out.push_str(n.format(ns / 1_000_000));
    out.push('.');
    pad(out, &mut n, ns % 1_000_000, 6);
    key!("websocket");
    out.push_str(if e.websocket { "true" } else { "false" });
    key!("refusal");
    string(out, e.refusal, true);
    key!("error");
    string(out, e.error, false);
    out.push_str(if json { "}\n" } else { "\n" });
}

/// `v` in decimal, left-padded with zeros to `width` digits.
fn pad(out: &mut String, n: &mut itoa::Buffer, v: u64, width: usize) {
    let digits = n.format(v);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// An address as `Display` writes it; IPv4 without going through `fmt` (also used for the
/// `X-Forwarded-For` the VM gets, where `write!` was 1,300 instructions a request).
pub fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            // Into a stack buffer, then one copy: a push per octet and dot cost twice as much.
            let mut b = [0u8; 15];
            let mut len = 0;
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    b[len] = b'.';
                    len += 1;
                }
                if o >= 100 {
                    b[len] = b'0' + o / 100;
                    len += 1;
                }
                if o >= 10 {
                    b[len] = b'0' + o / 10 % 10;
                    len += 1;
                }
                b[len] = b'0' + o % 10;
                len += 1;
            }
            // Only ASCII digits and dots were written.
            out.push_str(std::str::from_utf8(&b[..len]).unwrap_or_default());
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A value of a known-safe grammar (ids, methods, paths: no spaces or quotes), bare in the
/// text format; quoted and escaped should it ever hold anything else.
fn plain(out: &mut String, v: &str) {
    if v.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        out.push_str(v);
    } else {
        escaped(out, v);
    }
}

/// `v` quoted, with `"`, `\` and control characters escaped as JSON escapes them: it cannot
/// forge `key=value` fields or lines in the text format, nor break a JSON line.
fn escaped(out: &mut String, v: &str) {
    out.push('"');
    // The common case, a host or an id: nothing to escape, one copy.
    if !v
        .bytes()
        .any(|b| b < 0x20 || b == 0x7f || b == b'"' || b == b'\\' || b >= 0x80)
    {
        out.push_str(v);
        out.push('"');
        return;
    }
    let mut run = 0;
    for (i, c) in v.char_indices() {
        let esc = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if c.is_control() => "",
            _ => continue,
        };
        out.push_str(&v[run..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push_str(esc);
        }
        run = i + c.len_utf8();
    }
    out.push_str(&v[run..]);
    out.push('"');
}

/// `YYYY-MM-DDTHH:MM:SS` of one UTC second, formatted once per second per thread.
#[derive(Default)]
struct Second {
    secs: u64,
    text: String,
}

impl Second {
    fn get(&mut self, secs: u64) -> &str {
        if self.secs != secs || self.text.is_empty() {
            self.secs = secs;
            self.text.clear();
            let (y, m, d) = civil_from_days((secs / 86_400) as i64);
            let t = secs % 86_400;
            let (hh, mm, ss) = (t / 3600, t / 60 % 60, t % 60);
            let _ = write!(self.text, "{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}");
        }
        &self.text
    }
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(host: &'a str, refusal: &'a str) -> Entry<'a> {
        Entry {
            request_id: "e3da64342a716fd9d914b053e0b53cad",
            client: Some("203.0.113.7".parse().unwrap()),
            method: "POST",
            host,
            path: "/status/418",
            vm: "local",
            port: 44139,
            status: 418,
            upstream: Some("127.0.0.1:44139".parse().unwrap()),
            upstream_status: 418,
            bytes_in: 5,
            bytes_out: 456,
            duration: Duration::from_micros(1950),
            websocket: false,
            refusal,
            error: "",
        }
    }

    fn line(e: &Entry<'_>, json: bool) -> String {
        let mut out = String::new();
        let at = UNIX_EPOCH + Duration::from_micros(1_795_933_694_402_692);
        format(&mut out, &mut Second::default(), at, e, json);
        out
    }

    #[test]
    fn an_address_is_written_as_display_writes_it() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = String::from(">");
            push_ip(&mut out, ip);
            assert_eq!(out, format!(">{ip}"));
        }
    }

    #[test]
    fn the_text_line_has_every_field_of_the_readme() {
        assert_eq!(
            line(&entry("port-44139-vm-local.edge.test", ""), false),
            "2026-11-29T06:28:14.402692Z  INFO access: request_id=e3da64342a716fd9d914b053e0b53cad \
             client=203.0.113.7 method=POST host=\"port-44139-vm-local.edge.test\" path=/status/418 \
             vm=\"local\" port=44139 status=418 upstream=127.0.0.1:44139 upstream_status=418 \
             bytes_in=5 bytes_out=456 duration_ms=1.950000 websocket=false refusal=\"\" error=\n"
        );
    }

    #[test]
    fn the_json_line_is_one_object_with_the_readme_fields() {
        let l = line(&entry("port-44139-vm-local.edge.test", "loop"), true);
        assert!(l.ends_with('\n') && !l.trim_end().contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["timestamp"], "2026-11-29T06:28:14.402692Z");
        assert_eq!(
            (v["level"].as_str(), v["target"].as_str()),
            (Some("INFO"), Some("access"))
        );
        assert_eq!(v["host"], "port-44139-vm-local.edge.test");
        assert_eq!(
            (v["port"].as_u64(), v["status"].as_u64()),
            (Some(44139), Some(418))
        );
        assert_eq!(v["upstream"], "127.0.0.1:44139");
        assert_eq!(v["duration_ms"].as_f64(), Some(1.95));
        assert_eq!(
            (v["websocket"].as_bool(), v["refusal"].as_str()),
            (Some(false), Some("loop"))
        );
    }

    #[test]
    fn a_crafted_host_cannot_forge_fields_or_lines() {
        let forged = "a.test status=200 vm=other\nfake=1 \"x\"\u{1}";
        let text = line(&entry(forged, ""), false);
        assert_eq!(text.matches('\n').count(), 1);
        assert!(
            text.contains(r#" host="a.test status=200 vm=other\nfake=1 \"x\"\u0001" "#),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&line(&entry(forged, ""), true)).unwrap();
        assert_eq!(v["host"], forged);
    }

    #[test]
    fn ipv6_addresses_are_written_as_display_writes_them() {
        let mut e = entry("h", "");
        e.client = Some("2001:db8::7".parse().unwrap());
        e.upstream = Some("[fd00::1]:8080".parse().unwrap());
        let text = line(&e, false);
        assert!(
            text.contains(" client=2001:db8::7 ") && text.contains(" upstream=[fd00::1]:8080 "),
            "{text}"
        );
    }

    #[test]
    fn absent_values_log_empty_and_dates_are_gregorian() {
        let mut e = entry("h", "");
        (e.client, e.upstream) = (None, None);
        let text = line(&e, false);
        assert!(
            text.contains(" client= method=") && text.contains(" upstream= "),
            "{text}"
        );
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
    }
}
