//! `--output`: an OCI image layout (`type=oci`), a tar `docker load` accepts (`type=docker`,
//! which is also an OCI layout), or the final filesystem (`type=local`). Layers kept as
//! their tar (`--layer-compression none`) are exported gzipped, as BuildKit's exporters
//! compress, under a manifest naming them (`compression=uncompressed` keeps them as tar;
//! `compression=zstd`, for `type=oci`, compresses them with zstd as they are written).

use std::path::{Path, PathBuf};

use lcache_proto::digest::sha256_hex;
use lcache_proto::wire::{ImageRecord, LayerCompression, LayerRef, ZSTD_LAYER_MEDIA_TYPE};
use serde_json::json;

use crate::errors::BuildError;
use crate::snapshots::layer_file_reader;
use crate::step_cache::StepCache;
use lcache_image::layer_extract::{extract_layer, is_root, Whiteouts};
use lcache_image::layer_zstd::ZstdLayer;
use lcache_image::oci_image::{index_document, manifest_document, sha256_of};

/// Where and how to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    /// `oci`, `docker` or `local`.
    pub kind: String,
    /// Destination path.
    pub dest: PathBuf,
    /// How layers kept as their tar are written (`compression=`).
    pub tar_layers: TarLayersAs,
}

/// How an export writes the layers kept as their tar; layers kept as gzip (an imported or
/// pulled base's, a `--layer-compression gzip` build's) are written as they are whatever it
/// says, as BuildKit does without `force-compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarLayersAs {
    /// gzip (`compression=gzip`, the default): what every registry and `docker load` take.
    /// lcached makes each form once and keeps it.
    Gzip,
    /// As they are (`compression=uncompressed`).
    Uncompressed,
    /// zstd (`compression=zstd`): 7 % smaller than gzip on text (measured), for containerd
    /// and Docker 23 or later; made as the export is written, on every core, and not kept.
    Zstd,
}

/// Why an `--output` value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputSpecError {
    /// A part that is not `type=`, `dest=` or `compression=`.
    #[error("'{0}' in --output: write type=oci|docker|local,dest=PATH[,compression=gzip|uncompressed|zstd]")]
    UnknownPart(String),
    /// A compression lcache does not export.
    #[error("--output compression={0} is not one of gzip, uncompressed, zstd")]
    UnknownCompression(String),
    /// zstd into a tar for `docker load`, which Docker before 23 cannot read.
    #[error("--output type=docker,compression=zstd: `docker load` before Docker 23 cannot read zstd layers — write type=oci,compression=zstd, or compression=gzip for docker load")]
    ZstdForDocker,
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
        let mut tar_layers = TarLayersAs::Gzip;
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("type", v)) => kind = Some(v.to_string()),
                Some(("dest", v)) => dest = Some(PathBuf::from(v)),
                Some(("compression", "gzip")) => tar_layers = TarLayersAs::Gzip,
                Some(("compression", "uncompressed")) => tar_layers = TarLayersAs::Uncompressed,
                Some(("compression", "zstd")) => tar_layers = TarLayersAs::Zstd,
                Some(("compression", v)) => return Err(OutputSpecError::UnknownCompression(v.into())),
                _ => return Err(OutputSpecError::UnknownPart(kv.into())),
            }
        }
        let kind = kind.ok_or(OutputSpecError::NoType)?;
        if !matches!(kind.as_str(), "oci" | "docker" | "local") {
            return Err(OutputSpecError::UnknownType(kind));
        }
        if kind == "docker" && tar_layers == TarLayersAs::Zstd {
            return Err(OutputSpecError::ZstdForDocker);
        }
        Ok(Self {
            kind,
            dest: dest.ok_or(OutputSpecError::NoDest)?,
            tar_layers,
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

/// The image as exported: its layers, and its manifest when it is not the stored one (its
/// layers kept as tar gzipped), with the manifest's digest.
struct Exported {
    layers: Vec<LayerRef>,
    manifest: Option<Vec<u8>>,
    manifest_digest: String,
    /// Blobs already written into the export (zstd forms), not to fetch.
    written: Vec<String>,
}

/// `image` as `out` exports it: layers kept as their tar replaced by their gzip forms
/// (lcached makes each once) or zstd forms (written into the export now) unless they are to
/// stay as they are.
fn exported(steps: &dyn StepCache, image: &ImageRecord, out: &OutputSpec) -> Result<Exported, BuildError> {
    let is_tar = |l: &LayerRef| LayerCompression::of_media_type(&l.media_type) == Some(LayerCompression::None);
    if out.tar_layers == TarLayersAs::Uncompressed || !image.layers.iter().any(is_tar) {
        return Ok(Exported {
            layers: image.layers.clone(),
            manifest: None,
            manifest_digest: image.manifest_digest.clone(),
            written: Vec::new(),
        });
    }
    let mut layers = Vec::with_capacity(image.layers.len());
    let mut written = Vec::new();
    for l in &image.layers {
        layers.push(match (is_tar(l), out.tar_layers) {
            (true, TarLayersAs::Zstd) => {
                let z = zstd_layer(steps, l, &out.dest.join("blobs/sha256"))?;
                written.push(z.digest.clone());
                z
            }
            (true, _) => {
                let mut gz = steps.gzip_form(&l.digest)?;
                gz.diff_id = l.diff_id.clone();
                gz
            }
            (false, _) => l.clone(),
        });
    }
    let mut config = Vec::new();
    steps.get_blob(&image.config_digest, &mut config)?;
    let manifest = manifest_document(&config, &layers)?;
    Ok(Exported {
        layers,
        manifest_digest: sha256_of(&manifest),
        manifest: Some(manifest),
        written,
    })
}

/// Writes the tar layer `l` into `dir` compressed with zstd, named by the compressed bytes'
/// digest; the tar is checked against its own digest as it streams from the cache, and a
/// layer that fails it leaves nothing behind.
fn zstd_layer(steps: &dyn StepCache, l: &LayerRef, dir: &Path) -> Result<LayerRef, BuildError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let part = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    let file = std::io::BufWriter::with_capacity(1 << 20, part.as_file());
    let mut z = ZstdLayer::new(file).map_err(io(part.path()))?;
    steps.get_blob(&l.digest, &mut z)?;
    let (file, digest, size) = z.finish().map_err(io(part.path()))?;
    file.into_inner().map_err(|e| io(part.path())(e.into_error()))?;
    let path = dir.join(digest.trim_start_matches("sha256:"));
    part.persist(&path).map_err(|e| io(&path)(e.error))?;
    Ok(LayerRef {
        digest,
        blake3: String::new(),
        size,
        diff_id: l.diff_id.clone(),
        media_type: ZSTD_LAYER_MEDIA_TYPE.into(),
    })
}

/// Streams blob `digest` into a new file at `path`; returns its size.
fn fetch_to(steps: &dyn StepCache, digest: &str, path: &Path) -> Result<u64, BuildError> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    Ok(steps.get_blob(digest, &mut f)?)
}

/// Writes the export, streaming every blob from the step cache (none is held in memory).
pub fn export(steps: &dyn StepCache, image: &ImageRecord, out: &OutputSpec, tags: &[String]) -> Result<(), BuildError> {
    let dest = &out.dest;
    // Each blob names a file in the export.
    let corrupt = |bad: &str| BuildError::CorruptImage {
        image: image.name.clone(),
        digest: bad.to_string(),
    };
    if let Some(bad) = image.blobs().find(|d| sha256_hex(d).is_none()) {
        return Err(corrupt(bad));
    }
    let exported = match out.kind.as_str() {
        "local" => None,
        _ => Some(exported(steps, image, out)?),
    };
    // The exported image's blobs: layers, config, then the manifest (written from memory
    // when it is not the stored one).
    let digests: Vec<&str> = match &exported {
        Some(e) => e
            .layers
            .iter()
            .map(|l| l.digest.as_str())
            .chain([image.config_digest.as_str()])
            .chain(e.manifest.is_none().then_some(image.manifest_digest.as_str()))
            .collect(),
        None => Vec::new(),
    };
    if let Some(bad) = digests.iter().find(|d| sha256_hex(d).is_none()) {
        return Err(corrupt(bad));
    }
    let (manifest_digest, manifest_bytes) = exported
        .as_ref()
        .map(|e| (e.manifest_digest.as_str(), e.manifest.as_deref()))
        .unwrap_or((image.manifest_digest.as_str(), None));
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
            let written = exported.as_ref().map_or(&[][..], |e| &e.written[..]);
            for d in digests.into_iter().filter(|d| !written.iter().any(|w| w == d)) {
                let size = fetch_to(steps, d, &dir.join(d.trim_start_matches("sha256:")))?;
                if d == manifest_digest {
                    manifest_size = size;
                }
            }
            if let Some(bytes) = manifest_bytes {
                let path = dir.join(manifest_digest.trim_start_matches("sha256:"));
                std::fs::write(&path, bytes).map_err(io(&path))?;
                manifest_size = bytes.len() as u64;
            }
            std::fs::write(dest.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(dest))?;
            let index = index_document(manifest_digest, manifest_size, tags.first().map(String::as_str))?;
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
            let path_of = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
            for d in digests {
                let size = fetch_to(steps, d, &blob)?;
                if d == manifest_digest {
                    manifest_size = size;
                }
                let f = std::fs::File::open(&blob).map_err(io(&blob))?;
                t.append_data(&mut header(size), path_of(d), f).map_err(io(dest))?;
            }
            let layers = exported.as_ref().map_or(&image.layers, |e| &e.layers);
            let manifest = json!([{
                "Config": path_of(&image.config_digest),
                "RepoTags": tags,
                "Layers": layers.iter().map(|l| path_of(&l.digest)).collect::<Vec<_>>(),
            }]);
            let mut add = |name: &str, data: &[u8]| -> Result<(), BuildError> {
                t.append_data(&mut header(data.len() as u64), name, data)
                    .map_err(io(dest))
            };
            if let Some(bytes) = manifest_bytes {
                add(&path_of(manifest_digest), bytes)?;
                manifest_size = bytes.len() as u64;
            }
            add("manifest.json", &serde_json::to_vec(&manifest).unwrap_or_default())?;
            add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            add(
                "index.json",
                &index_document(manifest_digest, manifest_size, tags.first().map(String::as_str))?,
            )?;
            t.into_inner().map_err(io(dest))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_specs_read_as_buildkit_writes_them() {
        let spec: OutputSpec = "type=oci,dest=/x".parse().unwrap();
        assert_eq!((spec.kind.as_str(), spec.tar_layers), ("oci", TarLayersAs::Gzip));
        let spec: OutputSpec = "type=docker,dest=/x,compression=uncompressed".parse().unwrap();
        assert_eq!(spec.tar_layers, TarLayersAs::Uncompressed);
        let spec: OutputSpec = "compression=gzip,type=oci,dest=/x".parse().unwrap();
        assert_eq!(spec.tar_layers, TarLayersAs::Gzip);
        let spec: OutputSpec = "type=oci,dest=/x,compression=zstd".parse().unwrap();
        assert_eq!(spec.tar_layers, TarLayersAs::Zstd);
        assert_eq!(
            "type=docker,dest=/x,compression=zstd".parse::<OutputSpec>(),
            Err(OutputSpecError::ZstdForDocker)
        );
        assert_eq!(
            "type=oci,dest=/x,compression=brotli".parse::<OutputSpec>(),
            Err(OutputSpecError::UnknownCompression("brotli".into()))
        );
        assert_eq!(
            "type=oci,dest=/x,force=1".parse::<OutputSpec>(),
            Err(OutputSpecError::UnknownPart("force=1".into()))
        );
        assert_eq!("dest=/x".parse::<OutputSpec>(), Err(OutputSpecError::NoType));
    }
}
