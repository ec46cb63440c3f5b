//! The config file: read, parsed and validated in one step, so the rest of
//! the agent only ever sees a valid [`Config`].
//!
//! The file is parsed into a TOML table and then read key by key
//! ([`table::Section`]), which gives every error its exact key path and
//! catches unknown keys (typos) anywhere. The first problem found is reported,
//! as one line: `FILE: KEY: REASON`, or `FILE:LINE:COLUMN: ...` for syntax.

mod error;
pub mod model;
mod parse;
mod passive;
mod table;

use std::path::Path;

pub use error::{ConfigError, Position};
pub use model::*;
pub use parse::{
    CONNTRACK_CAPACITY_RANGE, DEFAULT_ADMIN_LISTEN, DEFAULT_CONTROL_SOCKET, DEFAULT_EXPECT_STATUS, DEFAULT_FALL,
    DEFAULT_INTERVAL, DEFAULT_MAX_VIPS, DEFAULT_PIN_DIR, DEFAULT_RISE, DEFAULT_STATE_FILE, DEFAULT_TIMEOUT,
    DEFAULT_WITHDRAW_DELAY, MAX_WEIGHT, MIN_RING_SIZE,
};

impl Config {
    /// Reads, parses and validates the file at `path`.
    ///
    /// # Errors
    /// When the file cannot be read, is not TOML, or breaks a rule; the error
    /// names the file, the key and the reason.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { file: path.to_owned(), error })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `source` names it in errors.
    ///
    /// # Errors
    /// As [`Config::load`], without the read.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| syntax_error(text, source, &e))?;
        parse::config(table, source).map_err(|problem| ConfigError::Invalid {
            file: source.to_owned(),
            key: problem.key,
            reason: problem.reason,
        })
    }
}

/// A TOML error as one line: where it starts, and toml's message with its
/// lines (e.g. "invalid array" / "expected `]`") joined by "; ".
fn syntax_error(text: &str, source: &Path, e: &toml::de::Error) -> ConfigError {
    let start = e.span().map_or(0, |span| span.start);
    let mut message = e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    if message.is_empty() {
        // toml 0.8 says nothing about a value cut off by the end of the
        // file (`key =` as the last line) or a lone carriage return in a
        // comment; never print a bare position.
        message = match text.get(start..).and_then(|rest| rest.chars().next()) {
            _ if start >= text.trim_end().len() => "unexpected end of file".to_owned(),
            Some(c) if c.is_control() => format!("unexpected control character {c:?}"),
            Some(c) => format!("unexpected {c:?}"),
            None => "invalid TOML".to_owned(),
        };
    }
    ConfigError::Syntax { file: source.to_owned(), position: Position::of(text, start), message }
}

#[cfg(test)]
mod tests;
