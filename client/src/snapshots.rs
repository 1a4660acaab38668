//! Extracted layers on local disk, one directory per layer blob, made once: fetched from the
//! daemon, verified against the digest, extracted safely (overlay whiteouts kept) into a
//! temp directory and renamed into place.

use std::io::Read;
use std::path::PathBuf;

use lcache_proto::wire::LayerRef;

use crate::cache_dir::CacheDir;
use crate::daemon_client::DaemonClient;
use crate::errors::ClientError;
use crate::layer_extract::{extract_layer, is_root, Whiteouts};

/// A reader over a layer blob that is gzip-compressed or a plain tar.
pub fn layer_reader<'a>(blob: &'a [u8]) -> Box<dyn Read + 'a> {
    if blob.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(blob))
    } else {
        Box::new(blob)
    }
}

/// The snapshot directory of `layer`, extracting it first if needed.
pub fn ensure_snapshot(cache: &CacheDir, client: &DaemonClient, layer: &LayerRef) -> Result<PathBuf, ClientError> {
    let dest = cache.snapshot(&layer.digest);
    if dest.is_dir() {
        return Ok(dest);
    }
    // `blob` checks the digest.
    let blob = client.blob(&layer.digest)?;
    let tmp = cache
        .work_dir()
        .map_err(|e| ClientError::Local(format!("cannot make a work directory: {e}")))?;
    extract_layer(layer_reader(&blob), tmp.path(), Whiteouts::Overlay, is_root())
        .map_err(|e| ClientError::Local(format!("layer {}: {e}", layer.digest)))?;
    let staged = tmp.keep();
    if let Err(e) = std::fs::rename(&staged, &dest) {
        let _ = std::fs::remove_dir_all(&staged);
        // Another build extracted the same layer meanwhile: theirs is as good as ours.
        if !dest.is_dir() {
            return Err(ClientError::Local(format!(
                "cannot store snapshot {}: {e}",
                dest.display()
            )));
        }
    }
    Ok(dest)
}
