//! Errors of the client library: what failed, on which path, and what to do.

use std::path::PathBuf;

/// Why the build context could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// A directory or file of the context could not be read.
    #[error("cannot read {path}: {source} — check that it exists and is readable by this user")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A path in the context is not valid UTF-8, which keys cannot name.
    #[error("{0}: the name is not valid UTF-8 — rename it or add it to .dockerignore")]
    NonUtf8(PathBuf),
    /// `.dockerignore` holds a bad pattern.
    #[error("{path}: {source}")]
    Ignore {
        /// The .dockerignore file.
        path: PathBuf,
        /// The pattern error.
        source: lcache_proto::errors::SelectError,
    },
}
