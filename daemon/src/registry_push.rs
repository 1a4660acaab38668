//! `POST /v1/images/push`: a stored image to a registry. Blobs the repository already has
//! are skipped, blobs another repository of the same registry has (an image this daemon
//! pulled from there shares them) are mounted instead of uploaded, the rest stream from
//! the blob store; then the image's own manifest goes up byte for byte, so its digest on
//! the registry is the one lcache built. An image with layers kept as their tar goes up
//! with their gzip forms (`gzip_forms`) and a manifest naming them: its config, and so its
//! ID, is the one lcache built.

use futures_util::StreamExt;
use lcache_proto::wire::{normalize_image_name, ImageRecord, PushRequest, PushResponse};
use oci_client::errors::OciDistributionError;
use oci_client::{Reference, RegistryOperation};
use serde::Deserialize;

use crate::api::images::{resolve, Resolved};
use crate::registry_client::{auth_of, client_for, explain, parse_reference, RegistryError};
use crate::state::AppState;

#[derive(Deserialize)]
struct MediaTyped {
    #[serde(rename = "mediaType", default)]
    media_type: String,
}

/// Repositories of `registry` that hold `digest`, by the images this daemon has from there.
fn mount_sources(state: &AppState, registry: &str, digest: &str, exclude: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let Ok(page) = state.records.images(&after, 1000) else {
            return out;
        };
        let Some(last) = page.last() else { return out };
        after = last.name.clone();
        for image in &page {
            let Ok(r) = image.name.parse::<Reference>() else {
                continue;
            };
            if r.registry() == registry
                && r.repository() != exclude
                && image.layers.iter().any(|l| l.digest == digest)
                && !out.contains(&r.repository().to_string())
            {
                out.push(r.repository().to_string());
            }
        }
        if page.len() < 1000 {
            return out;
        }
    }
}

/// Pushes `req.image` to `req.reference`.
pub async fn push(state: &AppState, req: &PushRequest) -> Result<PushResponse, RegistryError> {
    let image: ImageRecord = match resolve(state.records.as_ref(), &req.image) {
        Ok(Resolved::Found(i)) => i,
        Ok(_) => return Err(RegistryError::NoLocalImage(normalize_image_name(&req.image))),
        Err(e) => return Err(RegistryError::Store(e.to_string())),
    };
    let reference = parse_reference(&req.reference)?;
    let client = client_for(&reference, &req.insecure_registries);
    let auth = auth_of(&req.credentials);
    client
        .auth(&reference, &auth, RegistryOperation::Push)
        .await
        .map_err(|e| explain(&reference, e))?;
    let whole = reference.whole();
    let invalid = |reason: String| RegistryError::Invalid {
        reference: whole.clone(),
        reason,
    };
    let (mut uploaded, mut skipped, mut mounted) = (0, 0, 0);
    let pushed = crate::gzip_forms::pushed_form(state, &image)
        .await
        .map_err(RegistryError::Store)?;
    // The manifest goes last, on its own, after everything it names.
    let blobs: Vec<String> = pushed
        .layers
        .iter()
        .map(|l| l.digest.clone())
        .chain([image.config_digest.clone()])
        .collect();
    for digest in blobs {
        if client
            .blob_exists(&reference, &digest)
            .await
            .map_err(|e| explain(&reference, e))?
        {
            skipped += 1;
            continue;
        }
        let mut done = false;
        for repo in mount_sources(state, reference.registry(), &digest, reference.repository()) {
            let source = Reference::with_tag(reference.registry().to_string(), repo, "latest".into());
            if client.mount_blob(&reference, &source, &digest).await.is_ok()
                && client.blob_exists(&reference, &digest).await.unwrap_or(false)
            {
                mounted += 1;
                done = true;
                break;
            }
        }
        if done {
            continue;
        }
        let blob = state
            .blobs
            .open_blob(&digest)
            .map_err(|e| RegistryError::Store(format!("cannot read blob {digest}: {e}")))?
            .ok_or_else(|| {
                RegistryError::Store(format!("blob {digest} of {} is missing from the store", image.name))
            })?;
        let size = blob.len();
        let chunks = blob.chunks().map(|r| r.map_err(OciDistributionError::IoError));
        client
            .push_blob_stream(&reference, chunks, &digest, Some(size))
            .await
            .map_err(|e| explain(&reference, e))?;
        uploaded += 1;
    }
    let manifest = pushed.manifest;
    let media_type = serde_json::from_slice::<MediaTyped>(&manifest)
        .map(|m| m.media_type)
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
    let content_type = media_type
        .parse()
        .map_err(|_| invalid(format!("the manifest's media type {media_type} is not a header value")))?;
    client
        .push_manifest_raw(&reference, manifest, content_type)
        .await
        .map_err(|e| explain(&reference, e))?;
    Ok(PushResponse {
        resolved: whole,
        manifest_digest: pushed.manifest_digest,
        uploaded_blobs: uploaded,
        skipped_blobs: skipped,
        mounted_blobs: mounted,
    })
}
