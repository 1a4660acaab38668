//! The client library's errors: what failed, where, and what to do.

use std::path::PathBuf;

use lcache_builder::errors::{BuildError, CacheError};
use lcache_context::local_context::SourcesError;
use lcache_proto::errors::DockerfileError;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The Dockerfile could not be read.
    #[error(
        "cannot read the Dockerfile {path}: {source} — pass its path with -f, or run from the directory that holds it"
    )]
    ReadDockerfile {
        /// Where we looked.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The Dockerfile is wrong.
    #[error(transparent)]
    Dockerfile(#[from] DockerfileError),
    /// The context could not be read or a source not selected.
    #[error(transparent)]
    Sources(#[from] SourcesError),
    /// The build context is not a directory.
    #[error("the build context {0} is not a directory — pass the directory to build from, e.g. `.`")]
    NotADirectory(PathBuf),
    /// lcached (or a cache behind it) failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The build failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// An image file to import is unusable.
    #[error(transparent)]
    Import(#[from] lcache_image::image_archive::ArchiveError),
    /// The token file could not be read.
    #[error("cannot read the token file {}: {source} — create a token with `lcache token create NAME` on the daemon's machine and save it there", path.display())]
    TokenFile {
        /// The file given with --token-file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A command-line value is malformed; the message says what to write.
    #[error("{0}")]
    Usage(String),
}
