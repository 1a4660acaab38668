//! Layers kept as their tar (`lcache build --layer-compression none`) gzipped where they
//! leave the machine: a push sends each such layer's gzip form, made once on every core,
//! checked against the tar's digest as it is read, stored as a blob of its own and kept by
//! the tar's digest, so a second push (to another registry, or after a retag) sends it
//! without compressing again. The image pushed then has a manifest of its own, naming the
//! gzip blobs; its config, and so its ID, is the image's.

use lcache_image::layer_gzip::gzip_tar;
use lcache_image::oci_image::{manifest_document, sha256_of};
use lcache_proto::wire::{ImageRecord, LayerCompression, LayerRef};

use crate::state::AppState;
use crate::store::BlobMeta;

/// Why a layer's gzip form could not be had.
#[derive(Debug, thiserror::Error)]
pub enum GzipFormError {
    /// The tar is not in the store.
    #[error("layer {0} is missing from the store; build the image again to store it")]
    Missing(String),
    /// The tar read is not the tar the image names.
    #[error("the stored layer {digest} is damaged (its bytes hash to {actual}); build the image again with --no-cache to store it afresh")]
    Damaged {
        /// The layer's digest.
        digest: String,
        /// What its bytes hash to now.
        actual: String,
    },
    /// Reading, compressing or storing failed.
    #[error("cannot gzip layer {digest}: {reason}")]
    Failed {
        /// The layer's digest.
        digest: String,
        /// What failed.
        reason: String,
    },
}

/// An image as a registry is to get it: its layers (gzip forms for those kept as tar) and
/// its manifest, and that manifest's digest.
pub struct PushedForm {
    /// Bottom first.
    pub layers: Vec<LayerRef>,
    /// The manifest's bytes.
    pub manifest: Vec<u8>,
    /// Its digest.
    pub manifest_digest: String,
}

/// Whether `layer` is kept as its tar.
pub fn is_tar(layer: &LayerRef) -> bool {
    LayerCompression::of_media_type(&layer.media_type) == Some(LayerCompression::None)
}

/// The gzip form of the tar layer `layer`: the one kept, or made now and kept.
pub async fn gzip_form(state: &AppState, layer: &LayerRef) -> Result<LayerRef, GzipFormError> {
    let failed = |reason: String| GzipFormError::Failed {
        digest: layer.digest.clone(),
        reason,
    };
    let as_layer = |meta: BlobMeta| LayerRef {
        digest: meta.digest,
        blake3: meta.blake3,
        size: meta.size,
        diff_id: layer.diff_id.clone(),
        media_type: LayerCompression::Gzip.media_type().into(),
    };
    let now = crate::api::now_ms();
    if let Ok(Some(kept)) = state.records.gzip_form(&layer.digest) {
        if state.blobs.exists(&kept.digest) {
            let _ = state.records.touch(&kept.digest, now);
            return Ok(as_layer(kept));
        }
    }
    let blob = state
        .blobs
        .open_blob(&layer.digest)
        .map_err(|e| failed(e.to_string()))?
        .ok_or_else(|| GzipFormError::Missing(layer.digest.clone()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let made = state
        .blobs
        .store_made(move |out| {
            let read = |buf: &mut [u8], at: u64| blob.read_exact_at(buf, at);
            let gzipped = gzip_tar(&read, blob.len(), out)?;
            let _ = tx.send(gzipped.tar_digest);
            Ok(())
        })
        .await;
    let read = rx.await.ok();
    if let Some(actual) = read.filter(|d| *d != layer.digest) {
        if let Ok(meta) = &made {
            // Not what a push may send under this layer's name.
            let _ = state.blobs.remove(&meta.digest);
        }
        return Err(GzipFormError::Damaged {
            digest: layer.digest.clone(),
            actual,
        });
    }
    let meta = made.map_err(|e| failed(e.to_string()))?;
    state
        .records
        .touch(&meta.digest, now)
        .and_then(|_| state.records.put_blob(&meta))
        .and_then(|_| state.records.put_gzip_form(&layer.digest, &meta))
        .map_err(|e| failed(e.to_string()))?;
    state.evict_wake.notify_one();
    Ok(as_layer(meta))
}

/// `image` as a registry is to get it: as stored when no layer is kept as tar (its own
/// manifest, byte for byte), else with those layers gzipped and a manifest naming them.
pub async fn pushed_form(state: &AppState, image: &ImageRecord) -> Result<PushedForm, String> {
    if !image.layers.iter().any(is_tar) {
        return Ok(PushedForm {
            layers: image.layers.clone(),
            manifest: stored(state, image, "manifest", &image.manifest_digest).await?,
            manifest_digest: image.manifest_digest.clone(),
        });
    }
    let mut layers = Vec::with_capacity(image.layers.len());
    for l in &image.layers {
        layers.push(match is_tar(l) {
            true => gzip_form(state, l).await.map_err(|e| e.to_string())?,
            false => l.clone(),
        });
    }
    let config = stored(state, image, "config", &image.config_digest).await?;
    let manifest = manifest_document(&config, &layers).map_err(|e| format!("cannot write the manifest: {e}"))?;
    Ok(PushedForm {
        layers,
        manifest_digest: sha256_of(&manifest),
        manifest,
    })
}

/// A small blob of `image` (its manifest or config) from the store.
async fn stored(state: &AppState, image: &ImageRecord, what: &str, digest: &str) -> Result<Vec<u8>, String> {
    state
        .blobs
        .read_small(digest)
        .await
        .map_err(|e| format!("cannot read the {what}: {e}"))?
        .ok_or_else(|| format!("the {what} of {} is missing from the store", image.name))
}
