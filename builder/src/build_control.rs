//! The control plane a build needs besides its [`StepCache`](crate::step_cache::StepCache):
//! planning (lcached derives the keys from its context index), base images by name, and the
//! build history that explains misses. lcached's client is the implementation; keeping it a
//! trait is what lets the builder crate sit below the client.

use lcache_proto::sources_digest::{DirNode, SummaryEntry};
use lcache_proto::wire::{BuildRecord, ImageRecord, PlanInputs, PlanResponse};

use lcache_image::image_draft::DeferredBuild;

use crate::errors::CacheError;

/// What a build asks lcached besides step records and blobs.
pub trait BuildControl: Send + Sync {
    /// Parses and plans the Dockerfile and derives every key it can.
    fn plan(&self, inputs: &PlanInputs) -> Result<PlanResponse, CacheError>;
    /// The image stored under `name`; `None` if there is none.
    fn image(&self, name: &str) -> Result<Option<ImageRecord>, CacheError>;
    /// Stores (or replaces) the image under its name.
    fn put_image(&self, image: &ImageRecord) -> Result<ImageRecord, CacheError>;
    /// The newest `limit` build records, newest first.
    fn builds(&self, limit: usize) -> Result<Vec<BuildRecord>, CacheError>;
    /// The newest `limit` build records of the context `context`, newest first: lcached
    /// picks them from the whole history (here, by default, from the newest `limit`).
    fn builds_of(&self, context: &str, limit: usize) -> Result<Vec<BuildRecord>, CacheError> {
        Ok(self
            .builds(limit)?
            .into_iter()
            .filter(|b| b.context == context)
            .collect())
    }
    /// The Merkle summary of a sources digest, if lcached still has it.
    fn summary(&self, digest: &str) -> Result<Option<Vec<SummaryEntry>>, CacheError>;
    /// A directory's listing by its node digest, if lcached still has it.
    fn dir_node(&self, digest: &str) -> Result<Option<DirNode>, CacheError>;
    /// Adds a build to the history; returns it with its id.
    fn post_build(&self, build: &BuildRecord) -> Result<BuildRecord, CacheError>;
    /// Hands a build whose image still waits for diff_ids lcached is taking to lcached,
    /// which stores its records and names and tags its image once they are known; returns
    /// the build as recorded. `None`: this lcached does not, so the build waits for them.
    fn defer_build(&self, build: &DeferredBuild) -> Result<Option<BuildRecord>, CacheError> {
        let _ = build;
        Ok(None)
    }
}
