//! `POST /v1/images/pull`: an image from a registry into the daemon, as a builder pulls it.
//! The reference resolves to a manifest (an index is narrowed to the build's platform
//! here), each of its blobs the store lacks streams into the blob store and is verified
//! against its digest on the way in (a blob that fails is discarded, never kept), and the
//! image is recorded under its name — with the manifest digest it resolved to, so the keys
//! of the steps built on it follow the image, not the tag.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{Full, StreamBody};
use hyper::body::Frame;
use lcache_proto::wire::{normalize_image_name, ImageRecord, LayerRef, PullRequest, PullResponse};
use oci_client::manifest::OciDescriptor;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::registry_client::{auth_of, client_for, explain, parse_reference, RegistryError};
use crate::state::AppState;

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// Layer types lcache can unpack (gzip or plain tar).
const LAYER_TYPES: [&str; 4] = [
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<PlatformSpec>,
}

#[derive(Deserialize)]
struct PlatformSpec {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Document {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ConfigRootfs {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

fn sha256_of(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// Which index entry is the build's platform (`linux/amd64`, `linux/arm64/v8`).
fn pick<'a>(entries: &'a [Descriptor], platform: &str) -> Option<&'a Descriptor> {
    let mut parts = platform.split('/');
    let (os, arch, variant) = (
        parts.next().unwrap_or("linux"),
        parts.next().unwrap_or("amd64"),
        parts.next(),
    );
    let matching = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == os && p.architecture == arch)
    };
    let mut candidates = entries.iter().filter(matching);
    match variant {
        Some(v) => entries
            .iter()
            .filter(matching)
            .find(|d| d.platform.as_ref().and_then(|p| p.variant.as_deref()) == Some(v))
            .or_else(|| candidates.next()),
        None => candidates.next(),
    }
}

/// Pulls `req.reference` into `state`.
pub async fn pull(state: &AppState, req: &PullRequest) -> Result<PullResponse, RegistryError> {
    let reference = parse_reference(&req.reference)?;
    let client = client_for(&reference, &req.insecure_registries);
    let auth = auth_of(&req.credentials);
    let whole = reference.whole();
    let invalid = |reason: String| RegistryError::Invalid {
        reference: whole.clone(),
        reason,
    };
    let accepted: Vec<&str> = INDEX_TYPES.iter().chain(MANIFEST_TYPES.iter()).copied().collect();
    let (mut bytes, _) = client
        .pull_manifest_raw(&reference, &auth, &accepted)
        .await
        .map_err(|e| explain(&reference, e))?;
    let mut digest = sha256_of(&bytes);
    if let Some(pinned) = reference.digest() {
        if pinned != digest {
            return Err(invalid(format!(
                "the registry sent a manifest whose digest is {digest}, not the pinned {pinned}"
            )));
        }
    }
    let mut doc: Document =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("the manifest is not valid JSON: {e}")))?;
    if let Some(entries) = doc.manifests.as_ref().filter(|_| doc.config.is_none()) {
        let entry = pick(entries, &req.platform).ok_or_else(|| RegistryError::WrongPlatform {
            reference: whole.clone(),
            platform: req.platform.clone(),
            available: entries
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let by_digest = reference.clone_with_digest(entry.digest.clone());
        let (b, _) = client
            .pull_manifest_raw(&by_digest, &auth, &MANIFEST_TYPES)
            .await
            .map_err(|e| explain(&reference, e))?;
        digest = sha256_of(&b);
        if digest != entry.digest {
            return Err(invalid(format!(
                "the index names manifest {}, the registry sent {digest}",
                entry.digest
            )));
        }
        doc = serde_json::from_slice(&b).map_err(|e| invalid(format!("the manifest is not valid JSON: {e}")))?;
        bytes = b;
    }
    let manifest_type = if doc.media_type.is_empty() {
        MANIFEST_TYPES[0].to_string()
    } else {
        doc.media_type.clone()
    };
    if !MANIFEST_TYPES.contains(&manifest_type.as_str()) {
        return Err(RegistryError::Unsupported {
            reference: whole.clone(),
            reason: format!("its manifest is a {manifest_type}, which lcache cannot build from"),
        });
    }
    let config = doc
        .config
        .ok_or_else(|| invalid("the manifest names no config".into()))?;
    if let Some(l) = doc
        .layers
        .iter()
        .find(|l| !LAYER_TYPES.contains(&l.media_type.as_str()))
    {
        return Err(RegistryError::Unsupported {
            reference: whole.clone(),
            reason: format!(
                "layer {} is {}, which lcache cannot unpack yet (gzip or plain tar layers only)",
                l.digest, l.media_type
            ),
        });
    }
    let by_digest = reference.clone_with_digest(digest.clone());
    let (mut fetched, mut fetched_bytes, mut reused) = (0, 0, 0);
    for d in std::iter::once(&config).chain(doc.layers.iter()) {
        if have(state, &d.digest) {
            reused += 1;
            continue;
        }
        let desc = OciDescriptor {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size: d.size as i64,
            urls: None,
            annotations: None,
            artifact_type: None,
        };
        let sized = client
            .pull_blob_stream(&by_digest, &desc)
            .await
            .map_err(|e| explain(&reference, e))?;
        let body = StreamBody::new(sized.stream.map(|r| r.map(Frame::data)));
        let meta = state
            .blobs
            .ingest(&d.digest, body, Some(d.size), &state.limits)
            .await
            .map_err(|e| invalid(format!("blob {}: {e}", d.digest)))?;
        state.metrics.bytes_in.fetch_add(meta.size, Ordering::Relaxed);
        // Touched first: an eviction pass never sees a pulled blob as never used before
        // the image that keeps it is recorded.
        state
            .records
            .touch(&meta.digest, crate::api::now_ms())
            .and_then(|_| state.records.put_blob(&meta))
            .map_err(|e| RegistryError::Store(e.to_string()))?;
        fetched += 1;
        fetched_bytes += meta.size;
    }
    let config_text = state
        .blobs
        .read_small(&config.digest)
        .await
        .map_err(|e| invalid(format!("the config blob is unreadable: {e}")))?
        .ok_or_else(|| invalid(format!("the config blob {} is not in the store", config.digest)))?;
    let config_text =
        String::from_utf8(config_text).map_err(|_| invalid("the config blob is not UTF-8 JSON".to_string()))?;
    let diff_ids = serde_json::from_str::<ConfigRootfs>(&config_text)
        .map_err(|e| invalid(format!("the image config has no rootfs.diff_ids: {e}")))?
        .rootfs
        .diff_ids;
    if diff_ids.len() != doc.layers.len() {
        return Err(invalid(format!(
            "the manifest has {} layers but the config {} diff_ids",
            doc.layers.len(),
            diff_ids.len()
        )));
    }
    if !have(state, &digest) {
        let meta = state
            .blobs
            .ingest(
                &digest,
                Full::new(Bytes::from(bytes.to_vec())),
                Some(bytes.len() as u64),
                &state.limits,
            )
            .await
            .map_err(|e| invalid(format!("manifest: {e}")))?;
        state
            .records
            .touch(&meta.digest, crate::api::now_ms())
            .and_then(|_| state.records.put_blob(&meta))
            .map_err(|e| RegistryError::Store(e.to_string()))?;
    }
    let image = ImageRecord {
        name: normalize_image_name(&req.reference),
        manifest_digest: digest,
        config_digest: config.digest.clone(),
        layers: doc
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(l, diff_id)| LayerRef {
                digest: l.digest.clone(),
                blake3: String::new(),
                size: l.size,
                diff_id,
                media_type: l.media_type.clone(),
            })
            .collect(),
        config: config_text,
        created_at_ms: crate::api::now_ms(),
    };
    let store = |e: crate::store::StoreError| RegistryError::Store(e.to_string());
    state.records.put_image(&image).map_err(store)?;
    state.records.flush().map_err(store)?;
    state.evict_wake.notify_one();
    Ok(PullResponse {
        image,
        resolved: whole,
        fetched_blobs: fetched,
        fetched_bytes,
        reused_blobs: reused,
    })
}

/// Whether the store has `digest`, recorded and on disk.
fn have(state: &AppState, digest: &str) -> bool {
    matches!(state.records.get_blob(digest), Ok(Some(_))) && state.blobs.exists(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(os: &str, arch: &str, variant: Option<&str>, digest: &str) -> Descriptor {
        Descriptor {
            media_type: MANIFEST_TYPES[0].into(),
            digest: digest.into(),
            size: 1,
            platform: Some(PlatformSpec {
                os: os.into(),
                architecture: arch.into(),
                variant: variant.map(str::to_string),
            }),
        }
    }

    #[test]
    fn an_index_is_narrowed_to_the_build_platform() {
        let entries = [
            entry("linux", "arm", Some("v7"), "a"),
            entry("linux", "arm64", Some("v8"), "b"),
            entry("linux", "amd64", None, "c"),
        ];
        assert_eq!(pick(&entries, "linux/amd64").unwrap().digest, "c");
        assert_eq!(pick(&entries, "linux/arm64").unwrap().digest, "b");
        assert_eq!(pick(&entries, "linux/arm/v7").unwrap().digest, "a");
        assert!(pick(&entries, "windows/amd64").is_none());
    }
}
