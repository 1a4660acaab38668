//! The builder's errors: a cache that failed ([`CacheError`]), and a build that failed
//! ([`BuildError`]), each saying what failed, where, and what to do.

use std::path::PathBuf;

use lcache_context::local_context::SourcesError;
use lcache_proto::errors::DockerfileError;

/// Why a cache (lcached, or a tier behind it) could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Nothing answers at the cache's address.
    #[error("no lcached answers at {endpoint} ({reason}) — start it with `lcached`, or pass --offline")]
    Unreachable {
        /// The address tried.
        endpoint: String,
        /// The connection error.
        reason: String,
    },
    /// A cache over the network took the connection, then went silent.
    #[error("the lcached at {endpoint} stopped answering: nothing came or went for {secs} s — is it overloaded, or is a firewall dropping packets? Check it with `lcache status`, or pass --offline")]
    Stalled {
        /// The address.
        endpoint: String,
        /// How long nothing moved.
        secs: u64,
    },
    /// A TLS connection could not be set up.
    #[error("cannot connect to {endpoint} over TLS: {reason}")]
    Tls {
        /// The address.
        endpoint: String,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// The cache refused the request.
    #[error("{error}{}", if hint.is_empty() { String::new() } else { format!(" — {hint}") })]
    Refused {
        /// HTTP status.
        status: u16,
        /// What the cache says went wrong.
        error: String,
        /// What it says to do.
        hint: String,
    },
    /// The cache answered something this client does not understand.
    #[error("lcached answered something unexpected: {0} — check that lcache and lcached are the same version")]
    Protocol(String),
    /// A request could not be encoded.
    #[error("cannot encode the request: {0}")]
    Encode(String),
    /// The async runtime the client talks through could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// A blob the cache holds is missing or does not match its digest.
    #[error("blob {digest} {reason} — it is treated as not cached; the step that made it reruns")]
    UnusableBlob {
        /// The blob's digest.
        digest: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A local file to send, or to receive into, could not be used.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl CacheError {
    /// Whether a cached blob is gone or corrupt (a reason to rebuild, not to fail).
    pub fn is_unusable_blob(&self) -> bool {
        matches!(self, Self::UnusableBlob { .. })
    }
}

/// Why a build, or a step of it, failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The Dockerfile is wrong.
    #[error(transparent)]
    Dockerfile(#[from] DockerfileError),
    /// The context could not be read or a source not selected.
    #[error(transparent)]
    Sources(#[from] SourcesError),
    /// A build step failed.
    #[error("{location}: {instruction}: {message}{}", if last_output.is_empty() { String::new() } else { format!("\n  last output:\n    {}", last_output.join("\n    ")) })]
    StepFailed {
        /// `Dockerfile:LINE`.
        location: String,
        /// The instruction as written.
        instruction: String,
        /// What went wrong.
        message: String,
        /// The step's last output lines.
        last_output: Vec<String>,
    },
    /// A step of the Dockerfile cannot be built as written.
    #[error("{location}: {message}")]
    Unbuildable {
        /// `Dockerfile:LINE`.
        location: String,
        /// Why, and what to do instead.
        message: String,
    },
    /// A file or directory of the builder's own could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done (`write`, `use the cache directory`…).
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A layer could not be extracted.
    #[error("layer {digest}: {source}")]
    Layer {
        /// The layer's blob digest.
        digest: String,
        /// What is wrong with it.
        source: lcache_image::layer_extract::LayerError,
    },
    /// An image record names a blob by something that is not a sha256 digest.
    #[error("image {image} names blob '{digest}', which is not a sha256 digest — its record is corrupt; import or build it again")]
    CorruptImage {
        /// The image's name.
        image: String,
        /// What it names.
        digest: String,
    },
    /// An image document could not be written.
    #[error(transparent)]
    Document(#[from] lcache_image::oci_image::DocumentError),
    /// lcache itself went wrong (a bug), not the build.
    #[error("internal error: {0} — please report this bug")]
    Internal(&'static str),
}

impl BuildError {
    /// Whether a cached blob is gone or corrupt (a reason to rebuild, not to fail).
    pub fn is_unusable_blob(&self) -> bool {
        matches!(self, Self::Cache(e) if e.is_unusable_blob())
    }
}
