//! `lcache build --squash`: the target stage's own layers merged into one on top of its base
//! — as `docker build --squash` does — by replaying them, whiteouts applied, onto an overlay
//! of the base with a fresh upper directory: what overlayfs records there (files written,
//! whiteouts for what was removed) is exactly the merged layer. Nothing is recorded as a
//! step: a squashed image is never a cache parent, and the steps that made it stay cached.

use std::path::Path;

use lcache_image::layer_diff::{pack_layer, LayerCompression};
use lcache_image::layer_extract::{extract_layer, is_root, Whiteouts};
use lcache_proto::wire::LayerRef;

use crate::cache_dir::CacheDir;
use crate::errors::BuildError;
use crate::overlay_mount::OverlayMount;
use crate::snapshots::{layer_file_reader, lowers, Snapshot};
use crate::step_cache::{BlobSource, StepCache};

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let path = path.to_path_buf();
    move |source| BuildError::Io { action, path, source }
}

/// Merges `layers` (bottom first) into one layer over the base whose snapshots are
/// `base_snapshots` (bottom first); stores its blob, compressed as `compression` says, and
/// returns it.
pub fn squash(
    cache: &CacheDir,
    steps: &dyn StepCache,
    base_snapshots: &[Snapshot],
    layers: &[LayerRef],
    compression: LayerCompression,
) -> Result<LayerRef, BuildError> {
    let work = cache.work_dir().map_err(io("make a work directory in", cache.root()))?;
    let (upper, ovl_work, root, empty) = (
        work.path().join("upper"),
        work.path().join("work"),
        work.path().join("root"),
        work.path().join("empty"),
    );
    for d in [&upper, &ovl_work] {
        std::fs::create_dir_all(d).map_err(io("make", d))?;
    }
    let lowers = lowers(base_snapshots);
    let mount = OverlayMount::mount(&lowers, Some((&upper, &ovl_work)), &root, &empty)
        .map_err(io("mount the base to squash onto at", &root))?;
    let blob = work.path().join("blob");
    for l in layers {
        let mut f = std::fs::File::create(&blob).map_err(io("write", &blob))?;
        steps.get_blob(&l.digest, &mut f)?;
        drop(f);
        let file = std::fs::File::open(&blob).map_err(io("read", &blob))?;
        let reader = layer_file_reader(file).map_err(io("read", &blob))?;
        extract_layer(reader, mount.path(), Whiteouts::Apply, is_root()).map_err(|source| BuildError::Layer {
            digest: l.digest.clone(),
            source,
        })?;
    }
    drop(mount);
    let packed = pack_layer(&upper, &work.path().join("layer.tgz"), compression)
        .map_err(io("pack the squashed layer from", &upper))?;
    steps.put_blob(&packed.digest, BlobSource::file(&packed.path)?)?;
    Ok(LayerRef {
        digest: packed.digest,
        blake3: String::new(),
        size: packed.size,
        diff_id: packed.diff_id,
        media_type: compression.media_type().into(),
    })
}
