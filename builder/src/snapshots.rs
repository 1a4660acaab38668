//! Extracted layers on local disk, one directory per layer blob, made once: streamed from the
//! step cache to a work file, verified against the digest, extracted safely (overlay
//! whiteouts kept) into a temp directory and renamed into place.

use std::io::Read;
use std::path::PathBuf;

use lcache_proto::wire::LayerRef;

use crate::cache_dir::CacheDir;
use crate::copy_seed::DeltaUnit;
use crate::errors::BuildError;
use crate::snapshot_prune::mark_used;
use crate::step_cache::StepCache;
use lcache_image::layer_extract::{extract_layer, is_root, Whiteouts};

/// A reader over a layer blob file that is gzip-compressed or a plain tar.
pub fn layer_file_reader(file: std::fs::File) -> std::io::Result<Box<dyn Read>> {
    use std::io::BufRead;
    let mut r = std::io::BufReader::new(file);
    if r.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(r)))
    } else {
        Ok(Box::new(r))
    }
}

/// A layer's files on local disk: one directory, or a whole snapshot with a delta above it
/// (a re-run COPY's changed entries and whiteouts), mounted as consecutive overlay lowers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Bottom first.
    dirs: Vec<PathBuf>,
}

impl Snapshot {
    /// A snapshot that is one directory.
    pub fn whole(dir: PathBuf) -> Self {
        Self { dirs: vec![dir] }
    }

    /// A delta `tree` over the whole snapshot `base`.
    pub fn delta(base: PathBuf, tree: PathBuf) -> Self {
        Self { dirs: vec![base, tree] }
    }

    /// Its directories, bottom first.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

/// The overlay lowers of `snapshots` (bottom first), top first as overlayfs lists them.
pub fn lowers(snapshots: &[Snapshot]) -> Vec<PathBuf> {
    snapshots
        .iter()
        .rev()
        .flat_map(|s| s.dirs.iter().rev().cloned())
        .collect()
}

/// The delta snapshot of `digest`, if one is here and so is the whole snapshot it goes over.
pub fn delta_snapshot(cache: &CacheDir, digest: &str) -> Option<Snapshot> {
    let unit = DeltaUnit::of(cache, digest);
    let tree = unit.tree();
    let base_digest = unit.base_digest()?;
    let base = cache.snapshot(&base_digest);
    if !(tree.is_dir() && base.is_dir()) {
        return None;
    }
    mark_used(cache, digest);
    mark_used(cache, &base_digest);
    Some(Snapshot::delta(base, tree))
}

/// The snapshot of `layer`, extracting it first if needed: the blob is streamed to a work
/// file (verified against its digest on the way), then extracted from there. A delta whose
/// base is gone is not used: the layer is extracted whole instead.
pub fn ensure_snapshot(cache: &CacheDir, steps: &dyn StepCache, layer: &LayerRef) -> Result<Snapshot, BuildError> {
    let dest = cache.snapshot(&layer.digest);
    if dest.is_dir() {
        mark_used(cache, &layer.digest);
        return Ok(Snapshot::whole(dest));
    }
    if let Some(s) = delta_snapshot(cache, &layer.digest) {
        return Ok(s);
    }
    let work = |source| BuildError::Io {
        action: "use a work directory in",
        path: cache.root().to_path_buf(),
        source,
    };
    let download = cache.work_dir().map_err(work)?;
    let blob_path = download.path().join("layer");
    let mut blob = std::fs::File::create_new(&blob_path).map_err(work)?;
    steps.get_blob(&layer.digest, &mut blob)?;
    drop(blob);
    let tmp = cache.work_dir().map_err(work)?;
    let reader = layer_file_reader(std::fs::File::open(&blob_path).map_err(work)?).map_err(work)?;
    extract_layer(reader, tmp.path(), Whiteouts::Overlay, is_root()).map_err(|source| BuildError::Layer {
        digest: layer.digest.clone(),
        source,
    })?;
    let staged = tmp.keep();
    if let Err(e) = std::fs::rename(&staged, &dest) {
        let _ = std::fs::remove_dir_all(&staged);
        // Another build extracted the same layer meanwhile: theirs is as good as ours.
        if !dest.is_dir() {
            return Err(BuildError::Io {
                action: "store the snapshot",
                path: dest,
                source: e,
            });
        }
    }
    mark_used(cache, &layer.digest);
    Ok(Snapshot::whole(dest))
}
