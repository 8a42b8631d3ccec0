//! Host grammar: which preview, if any, a `Host` / `:authority` names (SPEC §3).
//!
//! A host is `<label>.<domain>` with exactly one label. The label is matched against the
//! configured patterns in order; `{port}`, `{id}` and `{scope}` are validated strictly after
//! the match, so nothing outside `[a-z0-9_-]` and a decimal port ever leaves this module.
//! The common shape `<prefix>{port}<middle>{id}` (the default `port-{port}-vm-{id}`) is
//! matched by hand without allocating; anything else goes through `regex`.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use regex::Regex;

/// DNS limit for one label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// A configured domain and what its bare name answers.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub apex_status: u16,
    pub apex_body: String,
}

/// One label grammar, compiled at config load.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    matcher: Matcher,
}

#[derive(Debug, Clone)]
enum Matcher {
    /// `<prefix>{port}<middle>{id}`: strip, scan digits, strip, rest is the id.
    PortThenId {
        prefix: String,
        middle: String,
    },
    Regex(Regex),
}

/// Why a pattern is not accepted at config load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("unknown placeholder {{{0}}} (use {{port}}, {{id}} or {{scope}})")]
    UnknownPlaceholder(String),
    #[error("unclosed '{{' in pattern")]
    Unclosed,
    #[error("placeholder {{{0}}} appears more than once")]
    Repeated(&'static str),
    #[error("pattern needs both {{port}} and {{id}}")]
    MissingPlaceholder,
    #[error("placeholders {{{0}}} and {{{1}}} need a literal between them")]
    Adjacent(&'static str, &'static str),
    #[error("literal {0:?} may only contain a-z, 0-9, '-' and '_'")]
    BadLiteral(String),
    #[error("invalid regex: {0}")]
    Regex(String),
    #[error("regex needs named groups (?P<port>...) and (?P<id>...)")]
    MissingGroup,
}

const ID_RE: &str = "[a-z0-9](?:[a-z0-9_-]*?[a-z0-9])?";

impl Pattern {
    /// Compiles a template such as `port-{port}-vm-{id}` or `cmux-{id}-{scope}-{port}`.
    pub fn template(source: &str) -> Result<Pattern, PatternError> {
        let tokens = tokenize(source)?;
        let names: Vec<&'static str> = tokens
            .iter()
            .filter_map(|t| match t {
                Token::Hole(n) => Some(*n),
                Token::Lit(_) => None,
            })
            .collect();
        for n in ["port", "id", "scope"] {
            if names.iter().filter(|&&x| x == n).count() > 1 {
                return Err(PatternError::Repeated(n));
            }
        }
        if !names.contains(&"port") || !names.contains(&"id") {
            return Err(PatternError::MissingPlaceholder);
        }
        for w in tokens.windows(2) {
            if let [Token::Hole(a), Token::Hole(b)] = w {
                return Err(PatternError::Adjacent(a, b));
            }
        }
        let matcher = match tokens.as_slice() {
            [Token::Hole("port"), Token::Lit(mid), Token::Hole("id")] if starts_non_digit(mid) => {
                Matcher::PortThenId {
                    prefix: String::new(),
                    middle: mid.clone(),
                }
            }
            [Token::Lit(pre), Token::Hole("port"), Token::Lit(mid), Token::Hole("id")]
                if starts_non_digit(mid) =>
            {
                Matcher::PortThenId {
                    prefix: pre.clone(),
                    middle: mid.clone(),
                }
            }
            _ => Matcher::Regex(template_regex(&tokens)?),
        };
        Ok(Pattern {
            source: source.to_owned(),
            matcher,
        })
    }

    /// Compiles a raw regex with named groups `port`, `id` and optionally `scope`. It is
    /// anchored at both ends whatever the author wrote: a partial match must never route.
    pub fn regex(source: &str) -> Result<Pattern, PatternError> {
        let re = Regex::new(&format!("^(?:{source})$"))
            .map_err(|e| PatternError::Regex(e.to_string()))?;
        let names: Vec<&str> = re.capture_names().flatten().collect();
        if !names.contains(&"port") || !names.contains(&"id") {
            return Err(PatternError::MissingGroup);
        }
        Ok(Pattern {
            source: source.to_owned(),
            matcher: Matcher::Regex(re),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Matches one label. `Ok(None)`: not this pattern's shape, try the next one.
    fn matches<'h>(&self, label: &'h str) -> Result<Option<Parts<'h>>, InvalidHost> {
        let (port, id, scope) = match &self.matcher {
            Matcher::PortThenId { prefix, middle } => {
                let Some(rest) = label.strip_prefix(prefix.as_str()) else {
                    return Ok(None);
                };
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                if digits == 0 {
                    return Ok(None);
                }
                let Some(id) = rest[digits..].strip_prefix(middle.as_str()) else {
                    return Ok(None);
                };
                let start = prefix.len();
                (start..start + digits, id, None)
            }
            Matcher::Regex(re) => {
                let Some(caps) = re.captures(label) else {
                    return Ok(None);
                };
                let (Some(port), Some(id)) = (caps.name("port"), caps.name("id")) else {
                    return Ok(None);
                };
                (
                    port.range(),
                    id.as_str(),
                    caps.name("scope").map(|m| m.as_str()),
                )
            }
        };
        let port_num = parse_port(&label[port.clone()])?;
        check_name(id, "id")?;
        if let Some(s) = scope {
            check_name(s, "scope")?;
        }
        Ok(Some(Parts {
            port: port_num,
            port_span: port,
            id,
            scope,
        }))
    }
}

struct Parts<'h> {
    port: u16,
    port_span: Range<usize>,
    id: &'h str,
    scope: Option<&'h str>,
}

enum Token {
    Lit(String),
    Hole(&'static str),
}

fn tokenize(source: &str) -> Result<Vec<Token>, PatternError> {
    let mut tokens = Vec::new();
    let mut rest = source;
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let end = rest.find('}').ok_or(PatternError::Unclosed)?;
                let name = match &rest[1..end] {
                    "port" => "port",
                    "id" => "id",
                    "scope" => "scope",
                    other => return Err(PatternError::UnknownPlaceholder(other.to_owned())),
                };
                tokens.push(Token::Hole(name));
                rest = &rest[end + 1..];
            }
            found => {
                let end = found.unwrap_or(rest.len());
                let lit = &rest[..end];
                if !lit.bytes().all(is_label_byte) {
                    return Err(PatternError::BadLiteral(lit.to_owned()));
                }
                tokens.push(Token::Lit(lit.to_owned()));
                rest = &rest[end..];
            }
        }
    }
    Ok(tokens)
}

fn starts_non_digit(s: &str) -> bool {
    s.bytes().next().is_some_and(|b| !b.is_ascii_digit())
}

/// `{id}` is lazy so that in `cmux-{id}-{scope}-{port}` the id is the first segment and the
/// scope takes the rest; `{scope}` is optional together with the literal before it.
fn template_regex(tokens: &[Token]) -> Result<Regex, PatternError> {
    let mut re = String::from("^");
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Lit(l) => {
                if let Some(Token::Hole("scope")) = tokens.get(i + 1) {
                    re.push_str(&format!("(?:{}(?P<scope>{ID_RE}))?", regex::escape(l)));
                    i += 2;
                    continue;
                }
                re.push_str(&regex::escape(l));
            }
            Token::Hole("port") => re.push_str("(?P<port>[0-9]+)"),
            Token::Hole("id") => re.push_str(&format!("(?P<id>{ID_RE})")),
            Token::Hole(_) => re.push_str(&format!("(?:(?P<scope>{ID_RE}))?")),
        }
        i += 1;
    }
    re.push('$');
    Regex::new(&re).map_err(|e| PatternError::Regex(e.to_string()))
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

/// `{port}`: decimal 1–65535, no sign, no leading zero.
pub fn parse_port(s: &str) -> Result<u16, InvalidHost> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidHost::Port(s.to_owned()));
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(InvalidHost::Port(s.to_owned()));
    }
    match s.parse::<u16>() {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(InvalidHost::Port(s.to_owned())),
    }
}

/// `{id}` and `{scope}`: `[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?`.
pub fn check_name(s: &str, what: &'static str) -> Result<(), InvalidHost> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_LABEL_LEN
        && b.iter().all(|&c| is_label_byte(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(InvalidHost::Name(what, s.to_owned()))
    }
}

/// Why a host under a served domain is not a valid preview host (→ 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHost {
    #[error("empty label")]
    EmptyLabel,
    #[error("{0:?} has more than one label before the domain")]
    TooManyLabels(String),
    #[error("label is {0} bytes, longer than 63")]
    LabelTooLong(usize),
    #[error("character {0:?} is not allowed in a host label")]
    BadChar(char),
    #[error("port {0:?} is not a decimal 1-65535 without leading zero")]
    Port(String),
    #[error("{0} {1:?} is not [a-z0-9]([a-z0-9_-]*[a-z0-9])? of at most 63 characters")]
    Name(&'static str, String),
    #[error("{0:?} matches no route pattern")]
    NoPattern(String),
}

/// Where a request goes, as far as the host alone can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed<'h> {
    /// The bare domain (index into the router's domains).
    Apex(usize),
    Preview(Preview<'h>),
}

/// A parsed preview host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview<'h> {
    /// Index into the router's domains.
    pub domain: usize,
    /// Index into the router's patterns.
    pub pattern: usize,
    pub label: &'h str,
    pub port: u16,
    /// Where the port digits sit in `label`, so a sibling-port host can be built for any
    /// pattern, regex ones included.
    pub port_span: Range<usize>,
    pub id: &'h str,
    pub scope: Option<&'h str>,
}

impl Preview<'_> {
    /// The same preview host with another port (for redirect rewriting).
    pub fn label_with_port(&self, port: u16) -> String {
        format!(
            "{}{}{}",
            &self.label[..self.port_span.start],
            port,
            &self.label[self.port_span.end..]
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Not under any configured domain (→ 421).
    #[error("misdirected request: {0} is not served here")]
    NotServed(String),
    /// Under a domain but not a valid preview host (→ 400).
    #[error("invalid preview host: {0}")]
    Invalid(#[from] InvalidHost),
}

/// Domains and patterns, compiled once per config.
#[derive(Debug, Clone)]
pub struct Router {
    /// Longest name first, so `a.example.com` wins over `example.com`.
    domains: Vec<Domain>,
    patterns: Vec<Pattern>,
}

impl Router {
    pub fn new(mut domains: Vec<Domain>, patterns: Vec<Pattern>) -> Router {
        domains.sort_by_key(|d| std::cmp::Reverse(d.name.len()));
        Router { domains, patterns }
    }

    pub fn domains(&self) -> &[Domain] {
        &self.domains
    }

    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Routes a normalized host (see [`normalize_host`]).
    pub fn route<'h>(&self, host: &'h str) -> Result<Routed<'h>, RouteError> {
        for (i, d) in self.domains.iter().enumerate() {
            if host == d.name {
                return Ok(Routed::Apex(i));
            }
            let Some(label) = host
                .strip_suffix(d.name.as_str())
                .and_then(|h| h.strip_suffix('.'))
            else {
                continue;
            };
            return self.preview(i, label).map(Routed::Preview);
        }
        Err(RouteError::NotServed(host.to_owned()))
    }

    fn preview<'h>(&self, domain: usize, label: &'h str) -> Result<Preview<'h>, RouteError> {
        if label.is_empty() {
            return Err(InvalidHost::EmptyLabel.into());
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(InvalidHost::LabelTooLong(label.len()).into());
        }
        if label.contains('.') {
            return Err(InvalidHost::TooManyLabels(label.to_owned()).into());
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !c.is_ascii() || !is_label_byte(c as u8))
        {
            return Err(InvalidHost::BadChar(c).into());
        }
        for (pattern, p) in self.patterns.iter().enumerate() {
            if let Some(parts) = p.matches(label)? {
                return Ok(Preview {
                    domain,
                    pattern,
                    label,
                    port: parts.port,
                    port_span: parts.port_span,
                    id: parts.id,
                    scope: parts.scope,
                });
            }
        }
        Err(InvalidHost::NoPattern(label.to_owned()).into())
    }
}

/// Lowercases, drops a `:port` and one trailing dot. Borrows unless the host has capitals.
/// The port in the client's `Host`, if it named one.
pub fn public_port(host: &str) -> Option<u16> {
    let (_, port) = host.rsplit_once(':')?;
    port.parse().ok()
}

pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let mut host = raw.trim();
    if host.starts_with('[') {
        // IPv6 literal: never a preview host, but keep it intact for the 421 message.
        if let Some(end) = host.find(']') {
            host = &host[..=end];
        }
    } else if let Some((h, port)) = host.rsplit_once(':') {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            host = h;
        }
    }
    host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(patterns: &[&str]) -> Router {
        Router::new(
            vec![Domain {
                name: "example.com".into(),
                apex_status: 200,
                apex_body: "cmux-edge".into(),
            }],
            patterns
                .iter()
                .map(|p| Pattern::template(p).unwrap())
                .collect(),
        )
    }

    fn preview<'h>(r: &Router, host: &'h str) -> Preview<'h> {
        match r.route(host) {
            Ok(Routed::Preview(p)) => p,
            other => panic!("{host}: {other:?}"),
        }
    }

    fn invalid(r: &Router, host: &str) -> InvalidHost {
        match r.route(host) {
            Err(RouteError::Invalid(e)) => e,
            other => panic!("{host}: {other:?}"),
        }
    }

    #[test]
    fn default_pattern_takes_the_fast_path() {
        let p = Pattern::template("port-{port}-vm-{id}").unwrap();
        assert!(matches!(p.matcher, Matcher::PortThenId { .. }));
        let p = Pattern::template("cmux-{id}-{scope}-{port}").unwrap();
        assert!(matches!(p.matcher, Matcher::Regex(_)));
    }

    #[test]
    fn port_vm_id_routes() {
        let r = router(&["port-{port}-vm-{id}"]);
        let p = preview(&r, "port-39378-vm-200.example.com");
        assert_eq!((p.port, p.id, p.scope), (39378, "200", None));
        let p = preview(&r, "port-5173-vm-pvelxc-abc_1.example.com");
        assert_eq!((p.port, p.id), (5173, "pvelxc-abc_1"));
        assert_eq!(p.label_with_port(3000), "port-3000-vm-pvelxc-abc_1");
    }

    #[test]
    fn apex_and_foreign_hosts() {
        let r = router(&["port-{port}-vm-{id}"]);
        assert_eq!(r.route("example.com"), Ok(Routed::Apex(0)));
        assert!(matches!(
            r.route("example.org"),
            Err(RouteError::NotServed(_))
        ));
        // a suffix match that is not at a label boundary is not under the domain
        assert!(matches!(
            r.route("badexample.com"),
            Err(RouteError::NotServed(_))
        ));
    }

    #[test]
    fn crafted_hosts_are_400_with_a_reason() {
        let r = router(&["port-{port}-vm-{id}"]);
        assert_eq!(
            invalid(&r, "port-80-vm-a@127.0.0.1:1.example.com"),
            InvalidHost::TooManyLabels("port-80-vm-a@127.0.0.1:1".into())
        );
        assert_eq!(
            invalid(&r, "port-80-vm-a@b.example.com"),
            InvalidHost::BadChar('@')
        );
        assert_eq!(
            invalid(&r, "port-0-vm-a.example.com"),
            InvalidHost::Port("0".into())
        );
        assert_eq!(
            invalid(&r, "port-65536-vm-a.example.com"),
            InvalidHost::Port("65536".into())
        );
        assert_eq!(
            invalid(&r, "port-080-vm-a.example.com"),
            InvalidHost::Port("080".into())
        );
        assert_eq!(
            invalid(&r, "a.b.example.com"),
            InvalidHost::TooManyLabels("a.b".into())
        );
        assert_eq!(invalid(&r, ".example.com"), InvalidHost::EmptyLabel);
        let long = format!("port-1-vm-{}.example.com", "a".repeat(54));
        assert_eq!(invalid(&r, &long), InvalidHost::LabelTooLong(64));
        assert!(matches!(
            invalid(&r, "port-80-vm--a.example.com"),
            InvalidHost::Name("id", _)
        ));
        assert!(matches!(
            invalid(&r, "port-80-vm-.example.com"),
            InvalidHost::Name("id", _)
        ));
        assert!(matches!(
            invalid(&r, "hello.example.com"),
            InvalidHost::NoPattern(_)
        ));
        assert_eq!(
            invalid(&r, "port-80-vm-a%2f.example.com"),
            InvalidHost::BadChar('%')
        );
    }

    #[test]
    fn scoped_form_takes_the_first_segment_as_id() {
        let r = router(&["cmux-{id}-{scope}-{port}"]);
        let p = preview(&r, "cmux-b1-feat-x-8000.example.com");
        assert_eq!((p.id, p.scope, p.port), ("b1", Some("feat-x"), 8000));
        let p = preview(&r, "cmux-b1-8000.example.com");
        assert_eq!((p.id, p.scope, p.port), ("b1", None, 8000));
        assert_eq!(p.label_with_port(3000), "cmux-b1-3000");
        assert!(matches!(
            invalid(&r, "cmux-b1-feat-x-080.example.com"),
            InvalidHost::Port(_)
        ));
    }

    #[test]
    fn patterns_are_tried_in_order() {
        let r = router(&["port-{port}-vm-{id}", "port-{port}-{id}"]);
        let p = preview(&r, "port-3000-vm-abc.example.com");
        assert_eq!((p.pattern, p.id), (0, "abc"));
        let p = preview(&r, "port-3000-morphvm-abc123.example.com");
        assert_eq!((p.pattern, p.id), (1, "morphvm-abc123"));
    }

    #[test]
    fn raw_regex_is_anchored_and_validated() {
        let r = Router::new(
            router(&[]).domains,
            vec![Pattern::regex(r"p(?P<port>\d+)\.?(?P<id>[a-z0-9]+)").unwrap()],
        );
        let p = preview(&r, "p8080abc.example.com");
        assert_eq!((p.port, p.id), (8080, "abc"));
        assert!(matches!(
            invalid(&r, "p0abc.example.com"),
            InvalidHost::Port(_)
        ));
        assert!(matches!(
            invalid(&r, "xp8080abc.example.com"),
            InvalidHost::NoPattern(_)
        ));
        assert_eq!(
            Pattern::regex("(?P<id>x)").unwrap_err(),
            PatternError::MissingGroup
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        assert!(matches!(
            Pattern::template("port-{port}"),
            Err(PatternError::MissingPlaceholder)
        ));
        assert!(matches!(
            Pattern::template("{port}{id}"),
            Err(PatternError::Adjacent("port", "id"))
        ));
        assert!(matches!(
            Pattern::template("x-{vm}-{port}-{id}"),
            Err(PatternError::UnknownPlaceholder(_))
        ));
        assert!(matches!(
            Pattern::template("Port-{port}-{id}"),
            Err(PatternError::BadLiteral(_))
        ));
        assert!(matches!(
            Pattern::template("port-{port"),
            Err(PatternError::Unclosed)
        ));
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(
            normalize_host("Port-1-VM-A.Example.COM."),
            "port-1-vm-a.example.com"
        );
        assert_eq!(normalize_host("example.com:8443"), "example.com");
        assert_eq!(normalize_host("example.com.:8443"), "example.com");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert!(matches!(normalize_host("example.com"), Cow::Borrowed(_)));
    }
}
