//! Errors of the front end: each says what is wrong, where, and what to do.

use std::fmt;

/// A location in a Dockerfile, 1-based.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Location {
    /// The Dockerfile's name as the user gave it.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Why a Dockerfile could not be understood or planned.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{location}: {message} — {hint}")]
pub struct DockerfileError {
    /// Where the problem is.
    pub location: Location,
    /// What is wrong.
    pub message: String,
    /// What the user can do about it.
    pub hint: String,
}

impl DockerfileError {
    /// Builds an error at `line:column` of `file`.
    pub fn new(file: &str, line: usize, column: usize, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            location: Location {
                file: file.to_string(),
                line,
                column,
            },
            message: message.into(),
            hint: hint.into(),
        }
    }
}

/// Why a COPY/ADD source could not be selected from the build context.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    /// The source path leaves the build context.
    #[error("source \"{0}\" points outside the build context — COPY and ADD can only read files inside the context directory; move the file into the context")]
    EscapesContext(String),
    /// Nothing in the context matches the source.
    #[error("source \"{0}\" was not found in the build context — check the path, and that .dockerignore does not exclude it")]
    NotFound(String),
    /// A selected file could not be read.
    #[error("cannot read {path}: {reason} — check that it exists and is readable by this user")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A glob or exclude pattern is malformed.
    #[error("pattern \"{pattern}\" is not a valid pattern: {reason}")]
    BadPattern {
        /// The pattern as written.
        pattern: String,
        /// The matcher's reason.
        reason: String,
    },
}
