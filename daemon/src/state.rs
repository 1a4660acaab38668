//! What every request handler shares.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use crate::context_index::ContextIndex;
use crate::layer_naming::LayerNaming;
use crate::metrics::Metrics;
use crate::server::Limits;
use crate::store::blob_store::BlobStore;
use crate::store::RecordStore;
use crate::upstream::Upstream;
use lcache_proto::wire::StepRecord;

/// The daemon's shared state.
pub struct AppState {
    /// Step records, blob metadata, builds, context digests.
    pub records: Arc<dyn RecordStore>,
    /// Layer blobs.
    pub blobs: BlobStore,
    /// Context indexes.
    pub index: ContextIndex,
    /// Counters and histograms.
    pub metrics: Metrics,
    /// When the daemon started.
    pub started: Instant,
    /// Where it listens, as given.
    pub listen: Vec<String>,
    /// The store directory.
    pub store_dir: PathBuf,
    /// Disambiguates build ids made in the same millisecond.
    pub build_seq: AtomicU64,
    /// What one client may take.
    pub limits: Limits,
    /// The cache behind this one, if any.
    pub upstream: Option<Arc<Upstream>>,
    /// Wakes the eviction task (after an upload) when `--max-size` is set.
    pub evict_wake: tokio::sync::Notify,
    /// Diff_ids of layers stored by `POST /v1/layers`, being taken.
    pub layer_naming: LayerNaming,
    /// Layers answered with a provisional name and being named (`name_later`).
    pub provisional: crate::provisional_names::ProvisionalNames,
    /// Builds whose images are being named (`POST /v1/builds/deferred`).
    pub deferred: crate::deferred_naming::DeferredNaming,
    /// When the directory listings are next collected.
    pub listing_gc: crate::listing_gc::ListingCollector,
}

impl AppState {
    /// Queues a record stored here to be pushed to the upstream, if there is one.
    pub fn upstream_push(&self, scope: &str, rec: &StepRecord) {
        if let Some(u) = &self.upstream {
            u.push(scope, &rec.key, &self.metrics);
        }
    }
}
