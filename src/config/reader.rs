//! A schema-driven reader over toml's spanned document tree.
//!
//! serde stops at the first error; `cmux-edge check` must report every problem, each with
//! file:line:column and the dotted key, the way `nginx -t` points at a line. So the config is
//! read by walking [`toml::de::DeTable`] by hand: every accessor records what is wrong and
//! carries on, and a table is opened with the list of keys it knows, so unknown keys are
//! reported where they stand.

use std::cell::RefCell;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `routes[1].pattern`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        } else {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file, self.line, self.column, self.key, self.message
            )
        }
    }
}

/// The file being read and the problems found so far.
pub struct Ctx<'i> {
    file: String,
    text: &'i str,
    line_starts: Vec<usize>,
    problems: RefCell<Vec<Problem>>,
    /// Not wrong, but probably not meant: printed by `check`, which still succeeds.
    warnings: RefCell<Vec<Problem>>,
}

impl<'i> Ctx<'i> {
    pub fn new(file: &str, text: &'i str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Ctx {
            file: file.to_owned(),
            text,
            line_starts,
            problems: RefCell::new(Vec::new()),
            warnings: RefCell::new(Vec::new()),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        let column = self.text[start..offset].chars().count() + 1;
        (line, column)
    }

    pub fn report(&self, span: &Range<usize>, key: &str, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.problems.borrow_mut().push(Problem {
            file: self.file.clone(),
            line,
            column,
            key: key.to_owned(),
            message: message.into(),
        });
    }

    pub fn warn(&self, span: &Range<usize>, key: &str, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.warnings.borrow_mut().push(Problem {
            file: self.file.clone(),
            line,
            column,
            key: key.to_owned(),
            message: message.into(),
        });
    }

    /// The warnings so far, in file order.
    pub fn take_warnings(&self) -> Vec<Problem> {
        let mut warnings = self.warnings.take();
        warnings.sort_by_key(|p| (p.line, p.column));
        warnings
    }

    pub fn has_problems(&self) -> bool {
        !self.problems.borrow().is_empty()
    }

    pub fn into_problems(self) -> Vec<Problem> {
        let mut problems = self.problems.into_inner();
        problems.sort_by_key(|p| (p.line, p.column));
        problems
    }

    /// Parses the document, reporting every syntax error. Returns the root table.
    pub fn parse(&self) -> Spanned<DeTable<'i>> {
        let (root, errors) = DeTable::parse_recoverable(self.text);
        for e in errors {
            let span = e.span().unwrap_or(0..0);
            self.report(&span, "", e.message().trim().to_owned());
        }
        root
    }
}

/// A table opened with the keys it accepts.
pub struct Table<'r, 'i> {
    ctx: &'r Ctx<'i>,
    path: String,
    span: Range<usize>,
    table: &'r DeTable<'i>,
}

impl<'r, 'i> Table<'r, 'i> {
    /// Opens `table`; every key not in `known` is reported as unknown.
    pub fn open(
        ctx: &'r Ctx<'i>,
        path: String,
        span: Range<usize>,
        table: &'r DeTable<'i>,
        known: &[&str],
    ) -> Self {
        for (key, _) in table.iter() {
            if !known.contains(&key.get_ref().as_ref()) {
                let full = join(&path, key.get_ref());
                let hint = if known.is_empty() {
                    String::new()
                } else {
                    format!(" (expected one of: {})", known.join(", "))
                };
                ctx.report(&key.span(), &full, format!("unknown key{hint}"));
            }
        }
        Table {
            ctx,
            path,
            span,
            table,
        }
    }

    pub fn ctx(&self) -> &'r Ctx<'i> {
        self.ctx
    }

    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    pub fn get(&self, key: &str) -> Option<Val<'r, 'i>> {
        self.table.get(key).map(|v| Val {
            ctx: self.ctx,
            path: join(&self.path, key),
            v,
        })
    }

    /// Reports `key` as missing at the table itself.
    pub fn missing(&self, key: &str) {
        self.ctx.report(
            &self.span,
            &join(&self.path, key),
            "required key is missing",
        );
    }

    /// A required value: reports it missing when absent.
    pub fn require(&self, key: &str) -> Option<Val<'r, 'i>> {
        let v = self.get(key);
        if v.is_none() {
            self.missing(key);
        }
        v
    }

    pub fn str(&self, key: &str) -> Option<&'r str> {
        self.get(key).and_then(|v| v.str())
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.bool())
    }

    pub fn duration(&self, key: &str) -> Option<Duration> {
        self.get(key).and_then(|v| v.duration())
    }

    /// A sub-table (`[a.b]` or an inline table), opened with its known keys.
    pub fn table(&self, key: &str, known: &[&str]) -> Option<Table<'r, 'i>> {
        self.get(key).and_then(|v| v.table(known))
    }

    /// An array of tables (`[[routes]]`), each opened with the known keys.
    pub fn tables(&self, key: &str, known: &[&str]) -> Vec<Table<'r, 'i>> {
        match self.get(key) {
            None => Vec::new(),
            Some(v) => v
                .array()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|item| item.table(known))
                .collect(),
        }
    }
}

/// One value, with its position and dotted path.
#[derive(Clone)]
pub struct Val<'r, 'i> {
    ctx: &'r Ctx<'i>,
    path: String,
    v: &'r Spanned<DeValue<'i>>,
}

impl<'r, 'i> Val<'r, 'i> {
    pub fn value(&self) -> &'r DeValue<'i> {
        self.v.get_ref()
    }

    pub fn error(&self, message: impl Into<String>) {
        self.ctx.report(&self.v.span(), &self.path, message);
    }

    /// A warning at this value (see [`Ctx::warn`]).
    pub fn warn(&self, message: impl Into<String>) {
        self.ctx.warn(&self.v.span(), &self.path, message);
    }

    /// A second look at a value another section validated: the child `key` of a table,
    /// without reporting anything.
    pub fn peek(&self, key: &str) -> Option<Val<'r, 'i>> {
        match self.v.get_ref() {
            DeValue::Table(t) => t.get(key).map(|v| Val {
                ctx: self.ctx,
                path: join(&self.path, key),
                v,
            }),
            _ => None,
        }
    }

    /// A second look at an array's items, without reporting anything.
    pub fn peek_items(&self) -> Vec<Val<'r, 'i>> {
        match self.v.get_ref() {
            DeValue::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| Val {
                    ctx: self.ctx,
                    path: format!("{}[{}]", self.path, i + 1),
                    v,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The string, if it is one, without reporting anything.
    pub fn peek_str(&self) -> Option<&'r str> {
        match self.v.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => None,
        }
    }

    /// Reports a problem at another span under this value's key (e.g. a table key).
    pub fn ctx_report(&self, span: &Range<usize>, message: impl Into<String>) {
        self.ctx.report(span, &self.path, message);
    }

    fn kind(&self) -> &'static str {
        match self.v.get_ref() {
            DeValue::String(_) => "a string",
            DeValue::Integer(_) => "an integer",
            DeValue::Float(_) => "a float",
            DeValue::Boolean(_) => "a boolean",
            DeValue::Datetime(_) => "a datetime",
            DeValue::Array(_) => "an array",
            DeValue::Table(_) => "a table",
        }
    }

    fn expected(&self, what: &str) {
        self.error(format!("expected {what}, found {}", self.kind()));
    }

    pub fn str(&self) -> Option<&'r str> {
        match self.v.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => {
                self.expected("a string");
                None
            }
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self.v.get_ref() {
            DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.error("integer out of range");
                    None
                }
            },
            _ => {
                self.expected("an integer");
                None
            }
        }
    }

    pub fn bool(&self) -> Option<bool> {
        match self.v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.expected("a boolean (true or false)");
                None
            }
        }
    }

    /// A duration string such as `"30s"`, `"1h"`, `"500ms"` or `"1m30s"`.
    pub fn duration(&self) -> Option<Duration> {
        self.parse_str(parse_duration)
    }

    /// A string parsed by `f`; `f`'s error message is reported at the value.
    pub fn parse_str<T>(&self, f: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let s = self.str()?;
        match f(s) {
            Ok(v) => Some(v),
            Err(msg) => {
                self.error(msg);
                None
            }
        }
    }

    pub fn array(&self) -> Option<Vec<Val<'r, 'i>>> {
        match self.v.get_ref() {
            DeValue::Array(items) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Val {
                        ctx: self.ctx,
                        path: format!("{}[{}]", self.path, i + 1),
                        v,
                    })
                    .collect(),
            ),
            _ => {
                self.expected("an array");
                None
            }
        }
    }

    pub fn table(&self, known: &[&str]) -> Option<Table<'r, 'i>> {
        match self.v.get_ref() {
            DeValue::Table(t) => Some(Table::open(
                self.ctx,
                self.path.clone(),
                self.v.span(),
                t,
                known,
            )),
            _ => {
                self.expected("a table");
                None
            }
        }
    }

    /// The entries of a table whose keys are data (e.g. `ports = { 39378 = 32768 }`).
    pub fn entries(&self) -> Option<Vec<(&'r str, Range<usize>, Val<'r, 'i>)>> {
        match self.v.get_ref() {
            DeValue::Table(t) => Some(
                t.iter()
                    .map(|(k, v)| {
                        let key: &'r str = k.get_ref().as_ref();
                        (
                            key,
                            k.span(),
                            Val {
                                ctx: self.ctx,
                                path: join(&self.path, key),
                                v,
                            },
                        )
                    })
                    .collect(),
            ),
            _ => {
                self.expected("a table");
                None
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Parses `"30s"`, `"1h"`, `"500ms"`, `"1m30s"`, `"2d"`. A bare number is refused: the unit is
/// the part people get wrong.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err =
        || format!("invalid duration {s:?} (expected e.g. \"500ms\", \"30s\", \"5m\", \"1h\")");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            _ => return Err(err()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn positions_are_one_based_lines_and_character_columns() {
        let ctx = Ctx::new("f.toml", "a = 1\nbé = 2\n");
        assert_eq!(ctx.position(0), (1, 1));
        assert_eq!(ctx.position(6), (2, 1));
        // "bé = " is 6 bytes but 5 characters
        assert_eq!(ctx.position(12), (2, 6));
    }

    #[test]
    fn unknown_keys_are_all_reported_with_their_position() {
        let text = "[server]\nthreads = 2\nthreadz = 3\n[bogus]\nx = 1\n";
        let ctx = Ctx::new("f.toml", text);
        let root = ctx.parse();
        let top = Table::open(
            &ctx,
            String::new(),
            root.span(),
            root.get_ref(),
            &["server"],
        );
        top.table("server", &["threads"]);
        let problems = ctx.into_problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!((problems[0].line, problems[0].column), (3, 1));
        assert_eq!(problems[0].key, "server.threadz");
        assert_eq!((problems[1].line, problems[1].column), (4, 2));
        assert_eq!(problems[1].key, "bogus");
    }
}
