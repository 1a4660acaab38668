//! `--output`: an OCI image layout (`type=oci`), a tar `docker load` accepts (`type=docker`,
//! which is also an OCI layout), or the final filesystem (`type=local`).

use std::path::{Path, PathBuf};

use lcache_proto::digest::sha256_hex;
use lcache_proto::wire::ImageRecord;
use serde_json::json;

use crate::errors::BuildError;
use crate::snapshots::layer_file_reader;
use crate::step_cache::StepCache;
use lcache_image::layer_extract::{extract_layer, is_root, Whiteouts};
use lcache_image::oci_image::index_document;

/// Where and how to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    /// `oci`, `docker` or `local`.
    pub kind: String,
    /// Destination path.
    pub dest: PathBuf,
}

/// Why an `--output` value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputSpecError {
    /// A part that is not `type=` or `dest=`.
    #[error("'{0}' in --output: write type=oci|docker|local,dest=PATH")]
    UnknownPart(String),
    /// No `type=`.
    #[error("--output needs type=oci|docker|local")]
    NoType,
    /// A type lcache cannot export.
    #[error("--output type={0} is not one of oci, docker, local")]
    UnknownType(String),
    /// No `dest=`.
    #[error("--output needs dest=PATH")]
    NoDest,
}

impl std::str::FromStr for OutputSpec {
    type Err = OutputSpecError;

    fn from_str(s: &str) -> Result<Self, OutputSpecError> {
        let mut kind = None;
        let mut dest = None;
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("type", v)) => kind = Some(v.to_string()),
                Some(("dest", v)) => dest = Some(PathBuf::from(v)),
                _ => return Err(OutputSpecError::UnknownPart(kv.into())),
            }
        }
        let kind = kind.ok_or(OutputSpecError::NoType)?;
        if !matches!(kind.as_str(), "oci" | "docker" | "local") {
            return Err(OutputSpecError::UnknownType(kind));
        }
        Ok(Self {
            kind,
            dest: dest.ok_or(OutputSpecError::NoDest)?,
        })
    }
}

fn io(dest: &Path) -> impl Fn(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        action: "write",
        path: dest.to_path_buf(),
        source,
    }
}

/// The digests of an image's blobs: layers, config, manifest; each checked to be a sha256
/// digest, since each names a file in the export.
fn blob_digests(image: &ImageRecord) -> Result<Vec<&str>, BuildError> {
    let all: Vec<&str> = image.blobs().collect();
    if let Some(bad) = all.iter().find(|d| sha256_hex(d).is_none()) {
        return Err(BuildError::CorruptImage {
            image: image.name.clone(),
            digest: bad.to_string(),
        });
    }
    Ok(all)
}

/// Streams blob `digest` into a new file at `path`; returns its size.
fn fetch_to(steps: &dyn StepCache, digest: &str, path: &Path) -> Result<u64, BuildError> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    Ok(steps.get_blob(digest, &mut f)?)
}

/// Writes the export, streaming every blob from the step cache (none is held in memory).
pub fn export(steps: &dyn StepCache, image: &ImageRecord, out: &OutputSpec, tags: &[String]) -> Result<(), BuildError> {
    let dest = &out.dest;
    let digests = blob_digests(image)?;
    match out.kind.as_str() {
        "local" => {
            std::fs::create_dir_all(dest).map_err(io(dest))?;
            let work = tempfile::tempdir().map_err(io(dest))?;
            let blob = work.path().join("layer");
            for l in &image.layers {
                fetch_to(steps, &l.digest, &blob)?;
                let reader = layer_file_reader(std::fs::File::open(&blob).map_err(io(&blob))?).map_err(io(&blob))?;
                extract_layer(reader, dest, Whiteouts::Apply, is_root()).map_err(|source| BuildError::Layer {
                    digest: l.digest.clone(),
                    source,
                })?;
            }
            Ok(())
        }
        "oci" => {
            let dir = dest.join("blobs/sha256");
            std::fs::create_dir_all(&dir).map_err(io(dest))?;
            let mut manifest_size = 0;
            for d in digests {
                let size = fetch_to(steps, d, &dir.join(d.trim_start_matches("sha256:")))?;
                if d == image.manifest_digest {
                    manifest_size = size;
                }
            }
            std::fs::write(dest.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(dest))?;
            let index = index_document(&image.manifest_digest, manifest_size, tags.first().map(String::as_str))?;
            std::fs::write(dest.join("index.json"), index).map_err(io(dest))?;
            Ok(())
        }
        _ => {
            // docker load reads manifest.json; newer versions also read the OCI layout.
            let file = std::fs::File::create(dest).map_err(io(dest))?;
            let mut t = tar::Builder::new(file);
            let header = |size: u64| {
                let mut h = tar::Header::new_ustar();
                h.set_size(size);
                h.set_mode(0o644);
                h.set_mtime(0);
                h.set_entry_type(tar::EntryType::Regular);
                h
            };
            let work = tempfile::tempdir().map_err(io(dest))?;
            let blob = work.path().join("blob");
            let mut manifest_size = 0;
            for d in digests {
                let size = fetch_to(steps, d, &blob)?;
                if d == image.manifest_digest {
                    manifest_size = size;
                }
                let f = std::fs::File::open(&blob).map_err(io(&blob))?;
                t.append_data(
                    &mut header(size),
                    format!("blobs/sha256/{}", d.trim_start_matches("sha256:")),
                    f,
                )
                .map_err(io(dest))?;
            }
            let path_of = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
            let manifest = json!([{
                "Config": path_of(&image.config_digest),
                "RepoTags": tags,
                "Layers": image.layers.iter().map(|l| path_of(&l.digest)).collect::<Vec<_>>(),
            }]);
            let mut add = |name: &str, data: &[u8]| -> Result<(), BuildError> {
                t.append_data(&mut header(data.len() as u64), name, data)
                    .map_err(io(dest))
            };
            add("manifest.json", &serde_json::to_vec(&manifest).unwrap_or_default())?;
            add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            add(
                "index.json",
                &index_document(&image.manifest_digest, manifest_size, tags.first().map(String::as_str))?,
            )?;
            t.into_inner().map_err(io(dest))?;
            Ok(())
        }
    }
}
