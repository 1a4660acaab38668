//! An image whose documents are not written yet, and a build whose image lcached names
//! after the build ended (`POST /v1/builds/deferred`): a re-run COPY's diff_id is the tar
//! after its change hashed again, work that grows with the layer, so a build may hand it to
//! the daemon that is taking it anyway instead of waiting for it. Both sides write the
//! documents with [`ImageDraft::documents`], so an image named late is byte for byte the
//! one named at once.

use lcache_proto::wire::{BuildRecord, ImageRecord, LayerRef, LayerTail, StepRecord};
use serde::{Deserialize, Serialize};

use crate::image_history::HistoryEntry;
use crate::oci_image::{config_document, manifest_document, sha256_of, DocumentError, RuntimeConfig};

/// What an image's config and manifest are written from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDraft {
    /// `os/arch[/variant]`.
    pub platform: String,
    /// The runtime config (`Env`, `Cmd`…).
    pub config: RuntimeConfig,
    /// Layers, bottom first; a deferred layer's `diff_id` is empty until it is known.
    pub layers: Vec<LayerRef>,
    /// The config's `history`.
    pub history: Vec<HistoryEntry>,
}

/// An image's documents, and the record that names them.
#[derive(Debug, Clone)]
pub struct ImageDocuments {
    /// The record (its `name` empty).
    pub image: ImageRecord,
    /// The config blob.
    pub config: Vec<u8>,
    /// The manifest blob.
    pub manifest: Vec<u8>,
}

impl ImageDraft {
    /// The config and manifest of the image, once every layer's diff_id is known.
    pub fn documents(&self) -> Result<ImageDocuments, DocumentError> {
        let config = config_document(&self.platform, &self.config, &self.layers, &self.history);
        let manifest = manifest_document(&config, &self.layers)?;
        Ok(ImageDocuments {
            image: ImageRecord {
                name: String::new(),
                manifest_digest: sha256_of(&manifest),
                config_digest: sha256_of(&config),
                layers: self.layers.clone(),
                config: String::from_utf8_lossy(&config).into_owned(),
                created_at_ms: 0,
            },
            config,
            manifest,
        })
    }
}

/// A build that ended with some of its image's diff_ids still being taken by lcached,
/// which stores what waits for them once they are known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeferredBuild {
    /// The build, its `image` empty (lcached assigns the id and fills the image in).
    pub build: BuildRecord,
    /// The image, without the diff_ids of `layers`.
    pub draft: ImageDraft,
    /// The names to give the image (`lcache build -t`), normalised.
    pub tags: Vec<String>,
    /// The layers whose diff_ids lcached is taking.
    pub layers: Vec<DeferredLayer>,
    /// The scope the step records go to (empty: unscoped).
    #[serde(default)]
    pub scope: String,
}

/// A layer of a deferred build: named by lcached (`POST /v1/layers`), its diff_id still
/// being taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeferredLayer {
    /// Where it is in the draft's layers.
    pub at: usize,
    /// What the layer was named with.
    pub tail: LayerTail,
    /// The step record to store once the diff_id is known (its layer's `diff_id` empty).
    pub record: StepRecord,
}

impl DeferredBuild {
    /// Why lcached cannot finish this build as sent (`None`: it can).
    pub fn malformed(&self) -> Option<String> {
        if self.layers.is_empty() {
            return Some("it has no layer whose diff_id is being taken".into());
        }
        for l in &self.layers {
            let Some(layer) = self.draft.layers.get(l.at) else {
                return Some(format!(
                    "layer {} is past the image's {} layers",
                    l.at,
                    self.draft.layers.len()
                ));
            };
            if l.record.layer.as_ref().map(|r| &r.digest) != Some(&layer.digest) {
                return Some(format!(
                    "the record of layer {} points at another layer than {}",
                    l.at, layer.digest
                ));
            }
        }
        self.draft
            .layers
            .iter()
            .enumerate()
            .find(|(i, l)| l.diff_id.is_empty() && !self.layers.iter().any(|d| d.at == *i))
            .map(|(i, l)| format!("layer {i} ({}) has no diff_id and none is being taken", l.digest))
    }

    /// Gives the layers bearing the provisional name `provisional` (in the image and in the
    /// records) the digest it came to.
    pub fn resolve_layer(&mut self, provisional: &str, digest: &str) {
        let records = self.layers.iter_mut().filter_map(|d| d.record.layer.as_mut());
        for l in self.draft.layers.iter_mut().chain(records) {
            if l.digest == provisional {
                l.digest = digest.to_string();
            }
        }
    }

    /// Fills in the diff_id of the layer at `at` (in the image and in its record).
    pub fn name_layer(&mut self, at: usize, diff_id: &str) {
        if let Some(l) = self.draft.layers.get_mut(at) {
            l.diff_id = diff_id.to_string();
        }
        for d in self.layers.iter_mut().filter(|d| d.at == at) {
            if let Some(l) = d.record.layer.as_mut() {
                l.diff_id = diff_id.to_string();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8, diff_id: &str) -> LayerRef {
        LayerRef {
            digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            blake3: String::new(),
            size: 1,
            diff_id: diff_id.into(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }
    }

    fn deferred(layers: Vec<LayerRef>, at: usize, record_of: u8) -> DeferredBuild {
        DeferredBuild {
            build: BuildRecord {
                dockerfile: "Dockerfile".into(),
                context: "/c".into(),
                ..Default::default()
            },
            draft: ImageDraft {
                platform: "linux/amd64".into(),
                config: RuntimeConfig::default(),
                layers,
                history: vec![],
            },
            tags: vec![],
            layers: vec![DeferredLayer {
                at,
                tail: LayerTail {
                    tar_state: vec![0; 40],
                    first: 0,
                    blob_state: vec![],
                    members: vec![],
                    compression: Default::default(),
                },
                record: StepRecord {
                    key: "k".into(),
                    layer: Some(layer(record_of, "")),
                    duration_ms: 0,
                    inputs: None,
                    created_at_ms: 0,
                },
            }],
            scope: String::new(),
        }
    }

    #[test]
    fn a_deferred_build_names_its_image_as_one_named_at_once() {
        let known = format!("sha256:{}", "cd".repeat(32));
        let taken = format!("sha256:{}", "ef".repeat(32));
        let mut d = deferred(vec![layer(1, &known), layer(2, "")], 1, 2);
        assert_eq!(d.malformed(), None);
        d.name_layer(1, &taken);
        assert_eq!(d.layers[0].record.layer.as_ref().unwrap().diff_id, taken);
        let at_once = ImageDraft {
            layers: vec![layer(1, &known), layer(2, &taken)],
            ..d.draft.clone()
        };
        let (late, now) = (d.draft.documents().unwrap(), at_once.documents().unwrap());
        assert_eq!(late.manifest, now.manifest);
        assert_eq!(late.image.manifest_digest, now.image.manifest_digest);
    }

    #[test]
    fn a_deferred_build_that_leaves_a_diff_id_unknown_or_points_elsewhere_is_malformed() {
        let known = format!("sha256:{}", "cd".repeat(32));
        for (d, says) in [
            (deferred(vec![layer(1, ""), layer(2, "")], 1, 2), "layer 0"),
            (deferred(vec![layer(1, &known)], 1, 1), "past the image's 1 layers"),
            (deferred(vec![layer(1, "")], 0, 2), "points at another layer"),
        ] {
            let why = d.malformed().expect("malformed");
            assert!(why.contains(says), "{why}");
        }
        let mut none = deferred(vec![layer(1, &known)], 0, 1);
        none.layers.clear();
        assert!(none.malformed().unwrap().contains("no layer"));
    }
}
