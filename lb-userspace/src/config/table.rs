//! A TOML table being read key by key, knowing its own path, so that every
//! error names the exact key and every key left over is reported as unknown.

use std::fmt::Display;

use toml::{Table, Value};

use super::error::Problem;

/// One table of the file, with the path that leads to it.
pub struct Section {
    path: String,
    table: Table,
    /// Every key this section accepts, for "expected one of" in errors.
    known: &'static [&'static str],
}

type Result<T> = std::result::Result<T, Problem>;

impl Section {
    /// `path` is empty for the top level.
    pub fn new(path: impl Into<String>, table: Table, known: &'static [&'static str]) -> Self {
        Section { path: path.into(), table, known }
    }

    /// The full path of `key` in this section.
    pub fn key(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_owned() } else { format!("{}.{key}", self.path) }
    }

    /// A problem at `key` of this section.
    pub fn problem(&self, key: &str, reason: impl Display) -> Problem {
        Problem::new(self.key(key), reason.to_string())
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        debug_assert!(self.known.contains(&key), "{key} missing from the known keys");
        self.table.remove(key)
    }

    fn wrong_type(&self, key: &str, want: &str, got: &Value) -> Problem {
        self.problem(key, format!("expected {want}, found {}", describe(got)))
    }

    /// An optional string.
    pub fn string(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(key, "a string", &other)),
        }
    }

    /// A string that must be there.
    pub fn required_string(&mut self, key: &str) -> Result<String> {
        self.string(key)?.ok_or_else(|| self.problem(key, "missing (required)"))
    }

    /// An optional integer within `min..=max`.
    pub fn integer<T>(&mut self, key: &str, min: T, max: T) -> Result<Option<T>>
    where
        T: TryFrom<i64> + Into<i64> + Copy + Display,
    {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Integer(n)) => {
                let in_range = n >= min.into() && n <= max.into();
                match T::try_from(n) {
                    Ok(v) if in_range => Ok(Some(v)),
                    _ => Err(self.problem(key, format!("{n} is out of range ({min} to {max})"))),
                }
            }
            Some(other) => Err(self.wrong_type(key, "an integer", &other)),
        }
    }

    /// An optional boolean (`true` or `false`, not a string).
    pub fn boolean(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(b)),
            Some(other) => Err(self.wrong_type(key, "true or false", &other)),
        }
    }

    /// An optional array of strings.
    pub fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s),
                    other => Err(self.problem(
                        &format!("{key}[{}]", i + 1),
                        format!("expected a string, found {}", describe(&other)),
                    )),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => Err(self.wrong_type(key, "an array of strings", &other)),
        }
    }

    /// An optional sub-table, e.g. `[agent]` or `[vip.health_check]`.
    pub fn table(&mut self, key: &str, known: &'static [&'static str]) -> Result<Option<Section>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Table(t)) => Ok(Some(Section::new(self.key(key), t, known))),
            Some(other) => Err(self.wrong_type(key, "a table", &other)),
        }
    }

    /// An optional sub-table as TOML, for a caller that reads it more than
    /// once (a VIP's check is the base of its backends' own checks).
    pub fn raw_table(&mut self, key: &str) -> Result<Option<Table>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Table(t)) => Ok(Some(t)),
            Some(other) => Err(self.wrong_type(key, "a table", &other)),
        }
    }

    /// Whether `key` is set (and not yet taken).
    pub fn contains(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// An optional array of tables, e.g. `[[vip]]`; each is named `key[i]`, 1-based.
    pub fn tables(&mut self, key: &str, known: &'static [&'static str]) -> Result<Vec<Section>> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    let path = self.key(&format!("{key}[{}]", i + 1));
                    match item {
                        Value::Table(t) => Ok(Section::new(path, t, known)),
                        other => Err(Problem::new(path, format!("expected a table, found {}", describe(&other)))),
                    }
                })
                .collect(),
            Some(other) => Err(self.wrong_type(key, &format!("an array of tables ([[{key}]])"), &other)),
        }
    }

    /// Renames this section in later errors, e.g. to add the VIP's name.
    pub fn rename(&mut self, path: String) {
        self.path = path;
    }

    /// This section's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Fails on the first key nobody took: a typo must not be silently ignored.
    pub fn finish(self) -> Result<()> {
        match self.table.keys().next() {
            None => Ok(()),
            Some(unknown) => Err(self.problem(
                &quoted_if_needed(unknown),
                format!("unknown key; expected one of: {}", self.known.join(", ")),
            )),
        }
    }
}

/// A key from the file as TOML writes it: bare when it can be, else quoted,
/// so that `"" = 1` or `"a.b" = 1` is named unambiguously in an error.
fn quoted_if_needed(key: &str) -> String {
    let bare = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        return key.to_owned();
    }
    let mut quoted = String::from("\"");
    for c in key.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}
