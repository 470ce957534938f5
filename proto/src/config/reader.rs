//! Reading the configuration's TOML document value by value: typed getters that refuse a
//! wrong type in plain words, unknown keys, and every error collected with the location of
//! the offending value (the `toml_edit` parser's spans) instead of stopping at the first.
//! Also [`SourceMap`]: where each key the parser read sits, for checks made after parsing.

use std::collections::BTreeMap;
use std::ops::Range;

use toml_edit::{ImDocument, Item, TableLike, Value};

use super::error::{ConfigError, ConfigErrors, Location};

/// One table of the document (a `[header]` table, an inline table, or one `[[entry]]`) and the
/// key that names it in errors (`host`, `peer "nas"`, `integrations.drbd[1]`; the root is "").
#[derive(Clone)]
pub(crate) struct Tbl<'d> {
    pub key: String,
    items: &'d dyn TableLike,
    span: Option<Range<usize>>,
}

impl<'d> Tbl<'d> {
    /// The key of `name` inside this table.
    pub fn child(&self, name: &str) -> String {
        if self.key.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.key)
        }
    }

    /// Whether the table has `name` at all (whatever its type).
    pub fn has(&self, name: &str) -> bool {
        self.items.contains_key(name)
    }

    /// The same table under another key (a peer named once its name is known).
    pub fn renamed(self, key: String) -> Tbl<'d> {
        Tbl { key, ..self }
    }

    /// Every `(key, item)` pair, in file order.
    pub fn entries(&self) -> Vec<(&'d str, &'d Item)> {
        self.items.iter().collect()
    }

    fn key_span(&self, name: &str) -> Option<Range<usize>> {
        self.items.key(name).and_then(|k| k.span())
    }
}

/// The key paths the parser read, each with its byte span in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceMap {
    file: String,
    text: String,
    spans: BTreeMap<String, Range<usize>>,
}

impl SourceMap {
    /// An error at `key` (or, when the file does not spell that key, at the nearest enclosing
    /// key it does: a default DRBD `check` points at its `[[integrations.drbd]]`).
    pub fn error(&self, key: &str, message: impl ToString) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            key: Some(key.to_string()),
            message: message.to_string(),
            location: self.locate(key),
        }
    }

    /// Where `key` (or its nearest enclosing key) is in the file.
    pub fn locate(&self, key: &str) -> Option<Location> {
        let mut k = key;
        loop {
            if let Some(span) = self.spans.get(k) {
                return Some(Location::of_span(&self.text, span));
            }
            k = parent(k)?;
        }
    }

    /// The file's name as errors show it.
    pub fn file(&self) -> &str {
        &self.file
    }
}

/// `peer "nas".allowed_ips[1]` -> `peer "nas".allowed_ips` -> `peer "nas"` -> none.
fn parent(key: &str) -> Option<&str> {
    if key.ends_with(']') {
        return key.rfind('[').map(|i| &key[..i]);
    }
    // A quoted peer name holds no dots (names are DNS labels).
    key.rfind('.').map(|i| &key[..i])
}

/// The collector: every error found so far and where each key read sits.
pub(crate) struct Reader<'t> {
    file: &'t str,
    text: &'t str,
    errors: Vec<ConfigError>,
    spans: BTreeMap<String, Range<usize>>,
}

/// What a value is, in the words of an error message.
fn found(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {:?}", s.value()),
        Value::Integer(i) => format!("the number {}", i.value()),
        Value::Float(x) => format!("the number {}", x.value()),
        Value::Boolean(b) => format!("{}", b.value()),
        Value::Datetime(_) => "a date".to_string(),
        Value::Array(_) => "a list".to_string(),
        Value::InlineTable(_) => "a table".to_string(),
    }
}

impl<'t> Reader<'t> {
    pub fn new(file: &'t str, text: &'t str) -> Self {
        Reader {
            file,
            text,
            errors: Vec::new(),
            spans: BTreeMap::new(),
        }
    }

    /// Parse `text` as TOML; a syntax error is the one error of the file, at its place.
    pub fn document(file: &str, text: &str) -> Result<ImDocument<String>, ConfigErrors> {
        ImDocument::parse(text.to_string()).map_err(|e| {
            let message: Vec<&str> = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let location = e.span().map(|s| Location::of_span(text, &s));
            ConfigErrors::one(ConfigError {
                file: file.to_string(),
                key: location
                    .as_ref()
                    .and_then(|l| super::locate_key(text, l.line)),
                message: format!("not valid TOML: {}", message.join("; ")),
                location,
            })
        })
    }

    /// The document's root table.
    pub fn root<'d>(&mut self, doc: &'d ImDocument<String>) -> Tbl<'d> {
        Tbl {
            key: String::new(),
            items: doc.as_table(),
            span: Some(0..0),
        }
    }

    fn note(&mut self, key: &str, span: Option<Range<usize>>) {
        if let Some(span) = span {
            self.spans.entry(key.to_string()).or_insert(span);
        }
    }

    /// Record that `key` sits where `other` does (a peer named once its name is read).
    pub fn alias(&mut self, key: &str, other: &str) {
        if let Some(span) = self.spans.get(other).cloned() {
            self.note(key, Some(span));
        }
    }

    /// Refuse `key` (located where the parser read it, or its nearest enclosing key).
    pub fn error(&mut self, key: impl Into<String>, message: impl ToString) {
        let key = key.into();
        let mut k = key.as_str();
        let location = loop {
            if let Some(span) = self.spans.get(k) {
                break Some(Location::of_span(self.text, span));
            }
            match parent(k) {
                Some(p) => k = p,
                None => break None,
            }
        };
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            key: Some(key),
            message: message.to_string(),
            location,
        });
    }

    /// The errors so far, in file order (errors without a place last), or the source map.
    pub fn finish(mut self) -> Result<SourceMap, ConfigErrors> {
        if self.errors.is_empty() {
            return Ok(SourceMap {
                file: self.file.to_string(),
                text: self.text.to_string(),
                spans: self.spans,
            });
        }
        self.errors.sort_by_key(|e| {
            e.location
                .as_ref()
                .map_or((usize::MAX, usize::MAX), |l| (l.line, l.column))
        });
        Err(ConfigErrors {
            file: self.file.to_string(),
            errors: self.errors,
        })
    }

    /// Refuse every key of `t` not in `known`, at the key.
    pub fn known_keys(&mut self, t: &Tbl<'_>, known: &[&str]) {
        #[cfg(test)]
        accepted::record(&t.key, known);
        for (k, _) in t.items.iter() {
            if known.contains(&k) {
                continue;
            }
            let key = t.child(k);
            self.note(&key, t.key_span(k));
            let place = if t.key.is_empty() {
                "at the top level".to_string()
            } else {
                format!("in {}", t.key)
            };
            self.error(
                key,
                format!(
                    "unknown key `{k}` {place}; the keys here are {}",
                    known.join(", ")
                ),
            );
        }
    }

    /// The item `name` of `t`, its span noted under its key.
    fn item<'d>(&mut self, t: &Tbl<'d>, name: &str) -> Option<(String, &'d Item)> {
        let item = t.items.get(name)?;
        let key = t.child(name);
        self.note(&key, item.span().or_else(|| t.key_span(name)));
        Some((key, item))
    }

    /// A sub-table (`[host]`, `host = { ... }`); `None` when absent or not a table.
    pub fn table<'d>(&mut self, t: &Tbl<'d>, name: &str) -> Option<Tbl<'d>> {
        let (key, item) = self.item(t, name)?;
        match item.as_table_like() {
            Some(items) => Some(Tbl {
                key,
                items,
                span: item.span(),
            }),
            None => {
                let what = item.as_value().map_or_else(|| "a list".into(), found);
                self.error(
                    &key,
                    format!("must be a table ([{key}] and its keys below it), not {what}"),
                );
                None
            }
        }
    }

    /// Entries of an array of tables (`[[peer]]`, or `peer = [{ ... }, ...]`), keyed `name[i]`.
    pub fn tables<'d>(&mut self, t: &Tbl<'d>, name: &str) -> Vec<Tbl<'d>> {
        let Some((key, item)) = self.item(t, name) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let refuse = |r: &mut Self, key: &str| {
            r.error(
                key,
                format!("must be a list of tables, each starting with a [[{key}]] line"),
            )
        };
        match item {
            Item::ArrayOfTables(a) => {
                for (i, table) in a.iter().enumerate() {
                    let k = format!("{key}[{i}]");
                    self.note(&k, table.span());
                    out.push(Tbl {
                        key: k,
                        items: table,
                        span: table.span(),
                    });
                }
            }
            Item::Value(Value::Array(a)) => {
                for (i, v) in a.iter().enumerate() {
                    let k = format!("{key}[{i}]");
                    self.note(&k, v.span());
                    match v {
                        Value::InlineTable(table) => out.push(Tbl {
                            key: k,
                            items: table,
                            span: table.span(),
                        }),
                        _ => refuse(self, &k),
                    }
                }
            }
            _ => refuse(self, &key),
        }
        out
    }

    /// A value (not a table) under `name`; a table there is refused.
    fn value<'d>(&mut self, t: &Tbl<'d>, name: &str) -> Option<(String, &'d Value)> {
        let (key, item) = self.item(t, name)?;
        match item.as_value() {
            Some(v) => Some((key, v)),
            None => {
                self.error(&key, "must be a value (name = value), not a table");
                None
            }
        }
    }

    /// A string; anything else is refused.
    pub fn string(&mut self, t: &Tbl<'_>, name: &str) -> Option<String> {
        let (key, v) = self.value(t, name)?;
        match v {
            Value::String(s) => Some(s.value().clone()),
            other => {
                let hint = match other {
                    Value::Array(_) => " (one value, not a list)",
                    _ => "",
                };
                self.error(
                    key,
                    format!(
                        "must be a string in double quotes{hint}, not {}",
                        found(other)
                    ),
                );
                None
            }
        }
    }

    /// A whole number.
    pub fn int(&mut self, t: &Tbl<'_>, name: &str) -> Option<i64> {
        let (key, v) = self.value(t, name)?;
        match v {
            Value::Integer(i) => Some(*i.value()),
            Value::String(s) if s.value().trim().parse::<i64>().is_ok() => {
                self.error(
                    key,
                    format!(
                        "must be a whole number without quotes: {} = {}",
                        name,
                        s.value().trim()
                    ),
                );
                None
            }
            other => {
                self.error(key, format!("must be a whole number, not {}", found(other)));
                None
            }
        }
    }

    /// `true` or `false`.
    pub fn bool(&mut self, t: &Tbl<'_>, name: &str) -> Option<bool> {
        let (key, v) = self.value(t, name)?;
        match v {
            Value::Boolean(b) => Some(*b.value()),
            Value::String(s) if matches!(s.value().as_str(), "true" | "false") => {
                self.error(
                    key,
                    format!(
                        "must be true or false without quotes: {name} = {}",
                        s.value()
                    ),
                );
                None
            }
            other => {
                self.error(key, format!("must be true or false, not {}", found(other)));
                None
            }
        }
    }

    /// A list of strings, each element's span noted under `key[i]`. `example` shows the form
    /// when the value is not a list and is no string either (a string is shown split into
    /// words: `reload = "systemctl restart k3s"` suggests `["systemctl", "restart", "k3s"]`).
    pub fn strings(&mut self, t: &Tbl<'_>, name: &str, example: &str) -> Option<Vec<String>> {
        let (key, v) = self.value(t, name)?;
        let Value::Array(a) = v else {
            let example = match v {
                Value::String(s) if !s.value().trim().is_empty() => {
                    let words: Vec<String> = s
                        .value()
                        .split_whitespace()
                        .map(|w| format!("{w:?}"))
                        .collect();
                    format!("[{}]", words.join(", "))
                }
                _ => example.to_string(),
            };
            self.error(
                key,
                format!(
                    "must be a list of strings, e.g. {name} = {example}, not {}",
                    found(v)
                ),
            );
            return None;
        };
        let mut out = Vec::with_capacity(a.len());
        let mut ok = true;
        for (i, element) in a.iter().enumerate() {
            let k = format!("{key}[{i}]");
            self.note(&k, element.span());
            match element {
                Value::String(s) => out.push(s.value().clone()),
                other => {
                    ok = false;
                    self.error(
                        k,
                        format!(
                            "must be a string in double quotes (every element of {name} is), \
                             not {}",
                            found(other)
                        ),
                    );
                }
            }
        }
        ok.then_some(out)
    }

    /// Refuse the absence of a required `name` in `t` (located at the table).
    pub fn missing(&mut self, t: &Tbl<'_>, name: &str, why: &str) {
        let key = t.child(name);
        self.note(&t.key, t.span.clone());
        self.error(key, format!("is missing; {why}"));
    }
}

/// Test builds: every table's accepted keys as the parser declares them (`known_keys`), for
/// the test that holds `config::keys::KNOWN_KEYS` to the parser.
#[cfg(test)]
pub(crate) mod accepted {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    thread_local! {
        static SEEN: RefCell<BTreeSet<(String, String)>> = const { RefCell::new(BTreeSet::new()) };
    }

    /// `peer "nas"`, `peer[0]`, `integrations.drbd[1]` -> `peer`, `peer`, `integrations.drbd`.
    fn table_name(key: &str) -> String {
        let mut out = String::new();
        let mut chars = key.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '[' => {
                    for c in chars.by_ref() {
                        if c == ']' {
                            break;
                        }
                    }
                }
                ' ' if chars.peek() == Some(&'"') => {
                    chars.next();
                    for c in chars.by_ref() {
                        if c == '"' {
                            break;
                        }
                    }
                }
                c => out.push(c),
            }
        }
        out
    }

    pub(crate) fn record(table: &str, known: &[&str]) {
        let table = table_name(table);
        SEEN.with(|s| {
            let mut s = s.borrow_mut();
            for k in known {
                s.insert((table.clone(), (*k).to_string()));
            }
        });
    }

    /// What was recorded on this thread since the last call, as (table, key) pairs.
    pub(crate) fn take() -> BTreeSet<(String, String)> {
        SEEN.with(|s| std::mem::take(&mut *s.borrow_mut()))
    }
}
