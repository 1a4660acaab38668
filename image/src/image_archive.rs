//! Image files to import: a `docker save` tar, an OCI image layout (directory or tar) or a
//! plain root-filesystem tar checked into an image record and the blobs to store, without trusting the
//! file: blob paths come only from validated digests, every manifest, config and layer is
//! checked against its descriptor's digest and size (and layers against the config's
//! `diff_ids`), every layer is checked by safe extraction, and layers stay on disk (located by
//! offset) to be streamed to the cache, never held whole in memory.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use lcache_confine::Root;
use lcache_proto::digest::sha256_hex;
use lcache_proto::wire::{normalize_image_name, ImageRecord, LayerRef};
use serde_json::Value;

use crate::layer_diff::LAYER_MEDIA_TYPE;
use crate::layer_extract::{extract_into, is_root, max_layer_size, SizeLimit, Whiteouts};
use crate::oci_image::{config_document, manifest_document, sha256_of, RuntimeConfig};
use crate::read_tee::ReadTee;
use crate::sha256_stream::Sha256Stream;

/// The largest manifest, index or config document read (they are small JSON files).
const DOCUMENT_LIMIT: u64 = 16 << 20;

/// Why an image file cannot be imported: the file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", file.display())]
pub struct ArchiveError {
    /// The file given to `lcache image import`.
    pub file: PathBuf,
    /// What is wrong with it, and what to do.
    pub reason: String,
}

fn err(file: &Path, msg: impl std::fmt::Display) -> ArchiveError {
    ArchiveError {
        file: file.to_path_buf(),
        reason: msg.to_string(),
    }
}

/// Where the blobs of the file being imported are read from.
enum Source {
    /// An OCI layout directory.
    Dir(PathBuf),
    /// A tar on disk (the file itself, or its decompressed copy): members by name, as
    /// (offset, size) of their bytes.
    Tar {
        path: PathBuf,
        members: HashMap<String, (u64, u64)>,
    },
}

impl Source {
    /// Indexes the members of the tar at `path` (regular files only).
    fn tar(path: &Path) -> std::io::Result<Self> {
        let mut members = HashMap::new();
        let mut a = tar::Archive::new(std::fs::File::open(path)?);
        for e in a.entries()? {
            let e = e?;
            if e.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let name = e.path()?.to_string_lossy().trim_start_matches("./").to_string();
            members.insert(name, (e.raw_file_position(), e.size()));
        }
        Ok(Self::Tar {
            path: path.to_path_buf(),
            members,
        })
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Self::Dir(d) => d.join(name).is_file(),
            Self::Tar { members, .. } => members.contains_key(name),
        }
    }

    /// The file, offset and length of member `name`.
    fn locate(&self, name: &str) -> Option<(PathBuf, u64, u64)> {
        match self {
            Self::Dir(d) => {
                let p = d.join(name);
                let len = std::fs::metadata(&p).ok().filter(|m| m.is_file())?.len();
                Some((p, 0, len))
            }
            // "" is the whole tar: a root filesystem's one layer.
            Self::Tar { path, .. } if name.is_empty() => {
                let len = std::fs::metadata(path).ok()?.len();
                Some((path.clone(), 0, len))
            }
            Self::Tar { path, members } => members.get(name).map(|&(off, len)| (path.clone(), off, len)),
        }
    }

    /// A reader over member `name`.
    fn open(&self, name: &str) -> std::io::Result<(Box<dyn Read>, u64)> {
        let (path, off, len) = self
            .locate(name)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{name} is missing")))?;
        let mut f = std::fs::File::open(path)?;
        f.seek(SeekFrom::Start(off))?;
        Ok((Box::new(f.take(len)), len))
    }

    /// A small document, read whole (at most [`DOCUMENT_LIMIT`] bytes).
    fn read_doc(&self, name: &str) -> std::io::Result<Vec<u8>> {
        let (r, len) = self.open(name)?;
        if len > DOCUMENT_LIMIT {
            return Err(std::io::Error::other(format!(
                "{name} is {len} bytes, too large for a manifest or config"
            )));
        }
        let mut v = Vec::new();
        r.take(DOCUMENT_LIMIT).read_to_end(&mut v)?;
        Ok(v)
    }
}

/// An OCI descriptor's claims.
struct Descriptor {
    digest: String,
    size: Option<u64>,
}

impl Descriptor {
    fn of(file: &Path, v: &Value, what: &str) -> Result<Self, ArchiveError> {
        let digest = v["digest"].as_str().unwrap_or_default();
        if sha256_hex(digest).is_none() {
            return Err(err(
                file,
                format!("{what} has digest '{digest}', which is not sha256:<64 hex digits> — the file is corrupt or hostile"),
            ));
        }
        Ok(Self {
            digest: digest.to_string(),
            size: v["size"].as_u64(),
        })
    }

    /// The blob's path inside an OCI layout: made only from a validated digest.
    fn layout_path(&self) -> String {
        format!("blobs/sha256/{}", sha256_hex(&self.digest).unwrap_or_default())
    }

    /// Checks bytes that were read against this descriptor.
    fn check(&self, file: &Path, what: &str, actual_digest: &str, actual_size: u64) -> Result<(), ArchiveError> {
        if actual_digest != self.digest || self.size.is_some_and(|s| s != actual_size) {
            return Err(err(
                file,
                format!(
                    "{what} hashes to {actual_digest} ({actual_size} bytes) but its descriptor says {} ({} bytes) — \
                     the file is corrupt or was tampered with; nothing was imported",
                    self.digest,
                    self.size.map_or("?".into(), |s| s.to_string())
                ),
            ));
        }
        Ok(())
    }

    /// Reads and verifies a JSON document (manifest, index, config).
    fn read_json(&self, file: &Path, src: &Source, what: &str) -> Result<Value, ArchiveError> {
        let bytes = src
            .read_doc(&self.layout_path())
            .map_err(|e| err(file, format!("{what} {}: {e}", self.digest)))?;
        self.check(file, what, &sha256_of(&bytes), bytes.len() as u64)?;
        serde_json::from_slice(&bytes).map_err(|e| err(file, format!("{what} {} is not JSON: {e}", self.digest)))
    }
}

/// One layer to import: where its bytes are and what they must hash to.
struct LayerSource {
    member: String,
    descriptor: Option<Descriptor>,
    diff_id: Option<String>,
}

/// An image read from a file, before its layers are checked and stored.
struct Loaded {
    layers: Vec<LayerSource>,
    config: RuntimeConfig,
    name: Option<String>,
    format: &'static str,
}

/// The `config` section and `rootfs.diff_ids` of an image config document.
fn config_parts(file: &Path, config: &Value) -> Result<(RuntimeConfig, Vec<String>), ArchiveError> {
    let runtime = match config.get("config") {
        None | Some(Value::Null) => RuntimeConfig::default(),
        Some(c) => serde_json::from_value(c.clone())
            .map_err(|e| err(file, format!("the image config's `config` section is malformed: {e}")))?,
    };
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    Ok((runtime, diff_ids))
}

/// A config must name one diff_id per layer the manifest lists.
fn same_layer_count(file: &Path, diff_ids: usize, layers: usize, manifest: &str) -> Result<(), ArchiveError> {
    if diff_ids == layers {
        return Ok(());
    }
    Err(err(
        file,
        format!(
            "the config lists {diff_ids} layer digests (rootfs.diff_ids) but {manifest} {layers} layers — the file is corrupt"
        ),
    ))
}

fn json_doc(file: &Path, src: &Source, name: &str) -> Result<Value, ArchiveError> {
    let b = src.read_doc(name).map_err(|e| err(file, format!("{name}: {e}")))?;
    serde_json::from_slice(&b).map_err(|e| err(file, format!("{name} is not valid JSON: {e}")))
}

fn docker_save(file: &Path, src: &Source) -> Result<Loaded, ArchiveError> {
    let manifest = json_doc(file, src, "manifest.json")?;
    let first = manifest
        .get(0)
        .ok_or_else(|| err(file, "manifest.json lists no image"))?;
    let config_path = first["Config"]
        .as_str()
        .ok_or_else(|| err(file, "manifest.json has no Config"))?;
    let config = json_doc(file, src, config_path)?;
    let (runtime, diff_ids) = config_parts(file, &config)?;
    let paths: Vec<String> = first["Layers"]
        .as_array()
        .ok_or_else(|| err(file, "manifest.json has no Layers"))?
        .iter()
        .map(|l| l.as_str().unwrap_or_default().to_string())
        .collect();
    same_layer_count(file, diff_ids.len(), paths.len(), "manifest.json")?;
    Ok(Loaded {
        layers: paths
            .into_iter()
            .zip(diff_ids)
            .map(|(member, diff_id)| LayerSource {
                member,
                descriptor: None,
                diff_id: Some(diff_id),
            })
            .collect(),
        config: runtime,
        name: first["RepoTags"].get(0).and_then(Value::as_str).map(str::to_string),
        format: "docker save",
    })
}

fn oci_layout(file: &Path, src: &Source) -> Result<Loaded, ArchiveError> {
    let index = json_doc(file, src, "index.json")?;
    let mut desc = index["manifests"]
        .get(0)
        .cloned()
        .ok_or_else(|| err(file, "index.json lists no manifest"))?;
    let name = desc["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .map(str::to_string);
    // An index may point at indexes; a chain longer than this is a loop or an attack.
    for _ in 0..8 {
        let d = Descriptor::of(file, &desc, "a manifest")?;
        let doc = d.read_json(file, src, "manifest")?;
        if let Some(ms) = doc["manifests"].as_array() {
            // An index (multi-platform): take this machine's platform, else the first.
            let host = lcache_proto::platform::Platform::host();
            desc = ms
                .iter()
                .find(|m| m["platform"]["architecture"] == host.arch.as_str())
                .or(ms.first())
                .cloned()
                .ok_or_else(|| err(file, "an index lists no manifest"))?;
            continue;
        }
        let config = Descriptor::of(file, &doc["config"], "the config")?.read_json(file, src, "config")?;
        let (runtime, diff_ids) = config_parts(file, &config)?;
        let descs = doc["layers"].as_array().cloned().unwrap_or_default();
        same_layer_count(file, diff_ids.len(), descs.len(), "the manifest")?;
        let mut layers = Vec::new();
        for (l, diff_id) in descs.iter().zip(diff_ids) {
            let d = Descriptor::of(file, l, "a layer")?;
            layers.push(LayerSource {
                member: d.layout_path(),
                descriptor: Some(d),
                diff_id: Some(diff_id),
            });
        }
        return Ok(Loaded {
            layers,
            config: runtime,
            name,
            format: "OCI layout",
        });
    }
    Err(err(
        file,
        "its index nests deeper than 8 levels — it is corrupt or hostile",
    ))
}

/// Opens `file` as a source: a layout directory, or a tar (decompressed to a temp file
/// first if it is gzipped, within the layer size limit).
fn open_source(file: &Path, spool: &Path) -> Result<Source, ArchiveError> {
    if file.is_dir() {
        if !file.join("oci-layout").exists() {
            return Err(err(
                file,
                "is a directory but not an OCI image layout (no oci-layout file): pass a tar, or an OCI layout",
            ));
        }
        return Ok(Source::Dir(file.to_path_buf()));
    }
    let mut f = BufReader::new(std::fs::File::open(file).map_err(|e| err(file, format!("cannot read it: {e}")))?);
    let gz = f.fill_buf().map_err(|e| err(file, e))?.starts_with(&[0x1f, 0x8b]);
    let tar_path = if gz {
        let mut out = std::fs::File::create(spool).map_err(|e| err(file, e))?;
        let mut r = SizeLimit::new(flate2::read::MultiGzDecoder::new(f), max_layer_size());
        std::io::copy(&mut r, &mut out).map_err(|e| err(file, format!("not a readable gzip file: {e}")))?;
        spool.to_path_buf()
    } else {
        file.to_path_buf()
    };
    Source::tar(&tar_path).map_err(|e| err(file, format!("not a tar archive: {e}")))
}

fn load(file: &Path, src: &Source) -> Result<Loaded, ArchiveError> {
    if src.has("manifest.json") {
        return docker_save(file, src);
    }
    if src.has("oci-layout") {
        return oci_layout(file, src);
    }
    // A root filesystem: the whole tar (member "") is the one layer.
    Ok(Loaded {
        layers: vec![LayerSource {
            member: String::new(),
            descriptor: None,
            diff_id: None,
        }],
        config: RuntimeConfig::default(),
        name: None,
        format: "root filesystem tar",
    })
}

/// A checked layer and where its (gzip) blob bytes are, for the streamed upload.
struct CheckedLayer {
    layer: LayerRef,
    blob: (PathBuf, u64, u64),
}

/// Reads one layer once: hashes it as stored and as a tar, checks both against what the
/// image claims, extracts it safely into a scratch root, and gzips it to `work` if it was
/// not compressed. Nothing is held whole in memory.
fn check_layer(
    file: &Path,
    src: &Source,
    l: &LayerSource,
    i: usize,
    work: &Path,
) -> Result<CheckedLayer, ArchiveError> {
    let what = format!("layer {i}");
    let (reader, _) = src
        .open(&l.member)
        .map_err(|e| err(file, format!("{what} ({}): {e}", l.member)))?;
    let mut raw = BufReader::new(Sha256Stream::new(reader));
    let gz = raw.fill_buf().map_err(|e| err(file, e))?.starts_with(&[0x1f, 0x8b]);
    let decompressed: Box<dyn Read + '_> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(&mut raw))
    } else {
        Box::new(&mut raw)
    };
    let gz_path = work.join(format!("layer-{i}.tar.gz"));
    let gz_out = if gz {
        None
    } else {
        let f = std::fs::File::create(&gz_path).map_err(|e| err(file, e))?;
        let w = Sha256Stream::new(std::io::BufWriter::new(f));
        Some(flate2::GzBuilder::new().mtime(0).write(w, flate2::Compression::fast()))
    };
    // The gzip copy of a plain layer is made as it is read.
    let mut tar = ReadTee {
        inner: Sha256Stream::new(SizeLimit::new(decompressed, max_layer_size())),
        out: gz_out,
    };
    let check_dir = work.join(format!("check-{i}"));
    let check = Root::create(&check_dir).map_err(|e| err(file, e))?;
    extract_into(&mut tar, &check, Whiteouts::Apply, is_root()).map_err(|e| err(file, format!("{what}: {e}")))?;
    // The tar reader stops at the end-of-archive marker; the rest still counts.
    std::io::copy(&mut tar, &mut std::io::sink()).map_err(|e| err(file, format!("{what}: {e}")))?;
    drop(check);
    // The scratch root itself is ours; std's removal never follows the links inside it.
    let _ = std::fs::remove_dir_all(&check_dir);
    let diff_id = tar.inner.digest();
    if let Some(expected) = &l.diff_id {
        if *expected != diff_id {
            return Err(err(
                file,
                format!(
                    "{what} unpacks to {diff_id} but the config says {expected} — the file is corrupt or was tampered with; nothing was imported"
                ),
            ));
        }
    }
    let gz_out = tar.out.take();
    drop(tar);
    let stored = raw.into_inner();
    if let Some(d) = &l.descriptor {
        d.check(file, &what, &stored.digest(), stored.len())?;
    }
    let (digest, size, blob) = match gz_out {
        None => {
            let (path, off, len) = match src.locate(&l.member) {
                Some(loc) => loc,
                None => return Err(err(file, format!("{what} vanished while it was read"))),
            };
            (stored.digest(), stored.len(), (path, off, len))
        }
        Some(enc) => {
            let mut w = enc.finish().map_err(|e| err(file, e))?;
            w.flush().map_err(|e| err(file, e))?;
            (w.digest(), w.len(), (gz_path, 0, w.len()))
        }
    };
    Ok(CheckedLayer {
        layer: LayerRef {
            digest,
            blake3: String::new(),
            size,
            diff_id,
            media_type: LAYER_MEDIA_TYPE.into(),
        },
        blob,
    })
}

/// A blob of a checked image: where its bytes are on disk.
#[derive(Debug, Clone)]
pub struct BlobLocation {
    /// Its digest, verified.
    pub digest: String,
    /// The file holding it (the image file, or a spooled copy in the work directory).
    pub path: PathBuf,
    /// Where it starts in that file.
    pub offset: u64,
    /// Its length.
    pub len: u64,
}

/// An image file, every part verified, ready to be stored: the layer blobs where they lie,
/// the config and manifest documents lcache writes for it, and its record.
#[derive(Debug)]
pub struct CheckedImage {
    /// The record to store under the image's name.
    pub record: ImageRecord,
    /// Layer blobs, base first.
    pub layers: Vec<BlobLocation>,
    /// The image config document (its digest is the record's `config_digest`).
    pub config: Vec<u8>,
    /// The manifest document (its digest is the record's `manifest_digest`).
    pub manifest: Vec<u8>,
    /// The format recognised (`docker save tar`, `OCI layout`, `root filesystem tar`…).
    pub format: &'static str,
}

/// Reads and verifies `file` as an image named `name` (or the name the file carries).
/// Blobs that must be decompressed or recompressed are spooled into `work`, which must
/// outlive the result.
pub fn check_archive(
    file: &Path,
    name: Option<&str>,
    platform: &str,
    work: &Path,
) -> Result<CheckedImage, ArchiveError> {
    let src = open_source(file, &work.join("image.tar"))?;
    let loaded = load(file, &src)?;
    let name = name.map(str::to_string).or(loaded.name.clone()).ok_or_else(|| {
        err(
            file,
            "carries no image name: give one, as in `lcache image import FILE NAME:TAG`",
        )
    })?;
    let mut layers = Vec::new();
    let mut blobs = Vec::new();
    for (i, l) in loaded.layers.iter().enumerate() {
        let c = check_layer(file, &src, l, i, work)?;
        let (path, offset, len) = c.blob;
        blobs.push(BlobLocation {
            digest: c.layer.digest.clone(),
            path,
            offset,
            len,
        });
        layers.push(c.layer);
    }
    let config = config_document(platform, &loaded.config, &layers, &[]);
    let manifest = manifest_document(&config, &layers).map_err(|e| err(file, e))?;
    let record = ImageRecord {
        name: normalize_image_name(&name),
        manifest_digest: sha256_of(&manifest),
        config_digest: sha256_of(&config),
        layers,
        config: String::from_utf8_lossy(&config).into_owned(),
        created_at_ms: 0,
    };
    Ok(CheckedImage {
        record,
        layers: blobs,
        config,
        manifest,
        format: loaded.format,
    })
}
