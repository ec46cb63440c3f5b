//! What a rejected config says: always the file, then where, then why.

use std::{fmt, path::PathBuf};

/// Why a config file was rejected. Each variant prints as one line that
/// starts with the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    ///
    /// The I/O error is part of the message and deliberately not a
    /// `source()`: the CLI prints the whole chain (`{:#}`), which would
    /// otherwise repeat it.
    #[error("{}: cannot read: {error}", file.display())]
    Read { file: PathBuf, error: std::io::Error },
    /// The file is not valid TOML.
    #[error("{}:{}: {message}", file.display(), position)]
    Syntax {
        file: PathBuf,
        position: Position,
        /// The TOML parser's message, its lines joined with "; " so the
        /// error stays on one line.
        message: String,
    },
    /// A key is missing, unknown, of the wrong type, or has a value out of bounds.
    #[error("{}: {key}: {reason}", file.display())]
    Invalid {
        file: PathBuf,
        /// Dotted path in the file's own terms, e.g. `vip[2] (web).backend[1].weight`.
        key: String,
        reason: String,
    },
}

/// A 1-based line and column in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    /// The position of byte `offset` in `text`.
    pub fn of(text: &str, offset: usize) -> Self {
        let before = text.get(..offset).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Position { line, column }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A problem found at a key, before the file name is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Problem { key: key.into(), reason: reason.into() }
    }
}
