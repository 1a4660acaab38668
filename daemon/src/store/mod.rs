//! The daemon's storage: small records behind the [`RecordStore`] trait (sled today) and
//! layer blobs as content-addressed files ([`blob_store`]).

pub mod blob_file;
pub mod blob_parts;
pub mod blob_states;
pub mod blob_store;
pub mod linked_blobs;
pub mod sled_records;
pub mod value_log;

use std::collections::HashSet;

use lcache_image::image_draft::DeferredBuild;
use lcache_proto::source_select::FileStamp;
use lcache_proto::wire::{BuildRecord, ImageRecord, StepRecord};
use serde::{Deserialize, Serialize};

use crate::codec::CodecError;

/// Why the record store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (I/O error, corruption).
    #[error("record store error: {0} — check the disk holding the store (space, permissions)")]
    Db(String),
    /// The disk holding the store is full (or the owner's quota spent).
    #[error("the store's disk is full: {0}")]
    Full(String),
    /// A stored value could not be decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Whether `e` says the store's disk (or its owner's quota) has no room left: the one test
/// behind every "disk full" answer (507), for blobs and records alike.
pub fn is_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(nix::libc::ENOSPC | nix::libc::EDQUOT))
}

/// What a provisional layer name (`POST /v1/layers` with `name_later`) came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProvisionalOutcome {
    /// The layer as stored, under its digest.
    Named(lcache_proto::wire::NamedLayer),
    /// Why nothing was stored.
    Failed(String),
}

/// What the blob store knows about a stored blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    /// `sha256:…`.
    pub digest: String,
    /// BLAKE3 of the same bytes, hex.
    pub blake3: String,
    /// Size in bytes.
    pub size: u64,
}

/// A context file's cached digest, valid while its stamp and size are unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedDigest {
    /// The file's stamp when it was hashed.
    pub stamp: FileStamp,
    /// Its size then.
    pub size: u64,
    /// Its content BLAKE3.
    pub digest: [u8; 32],
}

/// An access token: only its hash is kept; the token itself is shown once, at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its name (`ci-runners`, `alice`).
    pub name: String,
    /// SHA-256 of the token, hex.
    pub hash: String,
    /// What it may do.
    pub access: Access,
    /// When it was made.
    pub created_at_ms: u64,
    /// For a write token: the scopes it may write records into (`*` for any run of
    /// characters); such a token stores step records and blobs only.
    pub scope: Option<String>,
}

/// What a token may do over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    /// Look up step records and download blobs, images and builds.
    Read,
    /// Also store step records, blobs, images and builds.
    Write,
}

/// What a collection of listings dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ListingsDropped {
    /// Summaries of sources digests.
    pub summaries: usize,
    /// Directory listings.
    pub listings: usize,
}

/// The id a step record is stored under: its key, or `scope NUL key` in a scope.
pub fn step_id(scope: &str, key: &str) -> Vec<u8> {
    if scope.is_empty() {
        return key.as_bytes().to_vec();
    }
    let mut id = Vec::with_capacity(scope.len() + key.len() + 1);
    id.extend_from_slice(scope.as_bytes());
    id.push(0);
    id.extend_from_slice(key.as_bytes());
    id
}

/// Small records: step results, blob metadata, build history, the context index, access
/// times. One trait so the database behind it can be replaced without touching callers.
pub trait RecordStore: Send + Sync {
    /// The step record for `key` in `scope` (`""`: unscoped), if any.
    fn get_step(&self, scope: &str, key: &str) -> Result<Option<StepRecord>, StoreError>;
    /// Stores a step record in `scope` (never removing the previous one for another key).
    fn put_step(&self, scope: &str, record: &StepRecord) -> Result<(), StoreError>;
    /// Stores a step record in `scope` only if its key has none there, atomically;
    /// otherwise returns the record already there (the first writer wins).
    fn put_step_first(&self, scope: &str, record: &StepRecord) -> Result<Option<StepRecord>, StoreError>;
    /// Metadata of a stored blob.
    fn get_blob(&self, digest: &str) -> Result<Option<BlobMeta>, StoreError>;
    /// Records a blob as stored; call only once the blob file is durable.
    fn put_blob(&self, meta: &BlobMeta) -> Result<(), StoreError>;
    /// The blob of the layer kept as the tar `tar` gzipped (made for a push), if one was.
    fn gzip_form(&self, tar: &str) -> Result<Option<BlobMeta>, StoreError>;
    /// Records `gzip` as the layer `tar` gzipped; call once its blob is durable.
    fn put_gzip_form(&self, tar: &str, gzip: &BlobMeta) -> Result<(), StoreError>;
    /// Every blob's metadata.
    fn blobs(&self) -> Result<Vec<BlobMeta>, StoreError>;
    /// Every step record, with the id it is stored under (for [`RecordStore::evict_blob`]).
    fn step_entries(&self) -> Result<Vec<(Vec<u8>, StepRecord)>, StoreError>;
    /// Marks a blob as used now (for least-recently-used eviction).
    fn touch(&self, digest: &str, now_ms: u64) -> Result<(), StoreError>;
    /// Appends a build to the history (or replaces it, by id), then removes the oldest
    /// builds past the newest `keep`.
    fn put_build(&self, build: &BuildRecord, keep: usize) -> Result<(), StoreError>;
    /// A build by id.
    fn get_build(&self, id: &str) -> Result<Option<BuildRecord>, StoreError>;
    /// The newest `limit` builds (of the context `context` only, if given), newest first.
    fn recent_builds(&self, limit: usize, context: Option<&str>) -> Result<Vec<BuildRecord>, StoreError>;
    /// Hands every build to `visit`, newest first, one at a time.
    fn each_build(&self, visit: &mut dyn FnMut(BuildRecord)) -> Result<(), StoreError>;
    /// Keeps a build lcached is naming the image of, by the build's id, until it is named.
    fn put_deferred(&self, build: &DeferredBuild) -> Result<(), StoreError>;
    /// The builds whose images were being named when the daemon stopped, oldest first.
    fn deferred(&self) -> Result<Vec<DeferredBuild>, StoreError>;
    /// Forgets a deferred build, once its image is named (or cannot be).
    fn remove_deferred(&self, id: &str) -> Result<(), StoreError>;
    /// Keeps what a provisional layer name came to; past the newest `keep` names, the
    /// oldest are forgotten (names sort by the time they were given).
    fn put_provisional(&self, name: &str, outcome: &ProvisionalOutcome, keep: usize) -> Result<(), StoreError>;
    /// What a provisional layer name came to, if it is kept.
    fn get_provisional(&self, name: &str) -> Result<Option<ProvisionalOutcome>, StoreError>;
    /// Counts: (steps, blobs, blob bytes, builds).
    fn counts(&self) -> Result<(u64, u64, u64, u64), StoreError>;
    /// The cached digests of a context's files, by path.
    fn context_digests(&self, root: &str) -> Result<Vec<(String, CachedDigest)>, StoreError>;
    /// Updates a context's cached digests: `upserts` replace, `removals` drop.
    fn update_context_digests(
        &self,
        root: &str,
        upserts: &[(String, CachedDigest)],
        removals: &[String],
    ) -> Result<(), StoreError>;
    /// An image by normalised name.
    fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError>;
    /// Records (or replaces) an image name.
    fn put_image(&self, image: &ImageRecord) -> Result<(), StoreError>;
    /// Forgets an image name; true if it existed. Its blobs stay (steps may use them).
    fn remove_image(&self, name: &str) -> Result<bool, StoreError>;
    /// Images in name order, the first `limit` after `after` ("" for the start).
    fn images(&self, after: &str, limit: usize) -> Result<Vec<ImageRecord>, StoreError>;
    /// Stores the summary of a sources digest (content-addressed: written once).
    fn put_summary(
        &self,
        digest: &str,
        summary: &[lcache_proto::sources_digest::SummaryEntry],
    ) -> Result<(), StoreError>;
    /// The summary of a sources digest, if known.
    fn get_summary(&self, digest: &str) -> Result<Option<Vec<lcache_proto::sources_digest::SummaryEntry>>, StoreError>;
    /// Stores directory listings by node digest, each once (content-addressed).
    fn put_dir_nodes(&self, nodes: &[(String, lcache_proto::sources_digest::DirNode)]) -> Result<(), StoreError>;
    /// A directory listing by node digest, if known.
    fn get_dir_node(&self, digest: &str) -> Result<Option<lcache_proto::sources_digest::DirNode>, StoreError>;
    /// The bytes the directory listings take on disk.
    fn listing_bytes(&self) -> u64;
    /// Starts a collection of summaries and listings: until it ends, every one put (stored
    /// then, or found stored) is kept by it, whatever it was told to keep.
    fn begin_listing_collection(&self);
    /// Ends the collection begun: with `keep` = (sources digests, node digests), keeps
    /// their summaries and listings and what was put since it began, and drops every
    /// other; with `None` (a collection given up), drops nothing.
    fn end_listing_collection(
        &self,
        keep: Option<(&HashSet<String>, &HashSet<String>)>,
    ) -> Result<ListingsDropped, StoreError>;
    /// When each blob was last used (`touch`), by digest; blobs never touched are absent.
    fn access_times(&self) -> Result<Vec<(String, u64)>, StoreError>;
    /// Evicts a blob and the step records that need it: the records go first (so none
    /// ever points at a missing blob), each leaving a tombstone; then the metadata.
    fn evict_blob(&self, digest: &str, ids: &[Vec<u8>], now_ms: u64) -> Result<(), StoreError>;
    /// Whether `key`'s record in `scope` was evicted (and not stored again since).
    fn was_evicted(&self, scope: &str, key: &str) -> Result<bool, StoreError>;
    /// Stores (or replaces) a token by name.
    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// Every token, in name order.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Forgets a token; true if it existed.
    fn remove_token(&self, name: &str) -> Result<bool, StoreError>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}
