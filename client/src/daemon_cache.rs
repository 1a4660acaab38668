//! lcached's client as the builder's cache and control plane: the [`StepCache`] and
//! [`BuildControl`] implementations over [`DaemonClient`].

use std::io::Write;

use bytes::Bytes;
use lcache_builder::build_control::BuildControl;
use lcache_builder::errors::CacheError;
use lcache_builder::step_cache::{BlobSource, StepCache};
use lcache_image::image_draft::DeferredBuild;
use lcache_proto::sources_digest::{DirNode, SummaryEntry};
use lcache_proto::wire::{
    BuildRecord, ImageRecord, LayerDiffId, LayerParts, LayerRef, LayerTail, LinkedBlob, NamedLayer, PlanInputs,
    PlanResponse, StepRecord,
};

use crate::daemon_client::DaemonClient;

impl StepCache for DaemonClient {
    fn get_step(&self, key: &str) -> Result<Option<StepRecord>, CacheError> {
        self.step(key)
    }

    fn upstream_unavailable(&self, key: &str) -> Option<String> {
        DaemonClient::upstream_unavailable(self, key)
    }

    fn put_step(&self, record: &StepRecord) -> Result<(), CacheError> {
        DaemonClient::put_step(self, record).map(|_| ())
    }

    fn has_blob(&self, digest: &str) -> Result<bool, CacheError> {
        self.blob_present(digest)
    }

    fn get_blob(&self, digest: &str, out: &mut dyn Write) -> Result<u64, CacheError> {
        self.blob_into(digest, out)
    }

    fn get_blob_from(&self, digest: &str, first: u64, out: &mut dyn Write) -> Result<u64, CacheError> {
        self.blob_from(digest, first, out)
    }

    fn put_blob(&self, digest: &str, source: BlobSource<'_>) -> Result<(), CacheError> {
        match source {
            BlobSource::Bytes(b) => DaemonClient::put_blob(self, digest, Bytes::copy_from_slice(b)),
            BlobSource::File { path, offset, len } => self.put_blob_file(digest, path, offset, len),
            BlobSource::Parts {
                path,
                len,
                base,
                parts,
                unwritten,
            } => self.put_blob_parts(digest, path, len, (base, unwritten), parts),
        }
    }

    fn put_layer(&self, file: &std::path::Path, layer: &LayerParts) -> Result<Option<NamedLayer>, CacheError> {
        DaemonClient::put_layer(self, file, layer)
    }

    fn layer_diff_id(&self, digest: &str, tail: &LayerTail) -> Result<LayerDiffId, CacheError> {
        DaemonClient::layer_diff_id(self, digest, tail)
    }

    fn resolve_layers(&self, names: &[String]) -> Result<Vec<Option<NamedLayer>>, CacheError> {
        DaemonClient::resolve_layers(self, names)
    }

    fn gzip_form(&self, digest: &str) -> Result<LayerRef, CacheError> {
        DaemonClient::gzip_form(self, digest)
    }

    fn takes_linked(&self) -> bool {
        self.is_local()
    }

    fn put_linked(&self, linked: &LinkedBlob) -> Result<Option<NamedLayer>, CacheError> {
        DaemonClient::put_linked(self, linked)
    }
}

impl BuildControl for DaemonClient {
    fn plan(&self, inputs: &PlanInputs) -> Result<PlanResponse, CacheError> {
        DaemonClient::plan(self, inputs)
    }

    fn image(&self, name: &str) -> Result<Option<ImageRecord>, CacheError> {
        DaemonClient::image(self, name)
    }

    fn put_image(&self, image: &ImageRecord) -> Result<ImageRecord, CacheError> {
        DaemonClient::put_image(self, image)
    }

    fn builds(&self, limit: usize) -> Result<Vec<BuildRecord>, CacheError> {
        DaemonClient::builds(self, limit)
    }

    fn builds_of(&self, context: &str, limit: usize) -> Result<Vec<BuildRecord>, CacheError> {
        DaemonClient::builds_of(self, context, limit)
    }

    fn summary(&self, digest: &str) -> Result<Option<Vec<SummaryEntry>>, CacheError> {
        DaemonClient::summary(self, digest)
    }

    fn dir_node(&self, digest: &str) -> Result<Option<DirNode>, CacheError> {
        DaemonClient::dir_node(self, digest)
    }

    fn post_build(&self, build: &BuildRecord) -> Result<BuildRecord, CacheError> {
        DaemonClient::post_build(self, build)
    }

    fn defer_build(&self, build: &DeferredBuild) -> Result<Option<BuildRecord>, CacheError> {
        DaemonClient::defer_build(self, build)
    }
}
