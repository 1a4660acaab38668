//! `lcache image import`: a `docker save` tar, an OCI image layout (directory or tar) or a
//! plain root-filesystem tar becomes an image the daemon knows by name. Every layer is
//! checked by safe extraction before anything is stored.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

use bytes::Bytes;
use lcache_proto::wire::{normalize_image_name, ImageRecord, LayerRef};
use serde_json::{Map, Value};

use crate::daemon_client::DaemonClient;
use crate::errors::ClientError;
use crate::layer_diff::LAYER_MEDIA_TYPE;
use crate::layer_extract::{extract_layer, is_root, Whiteouts};
use crate::oci_image::{config_document, manifest_document, runtime_config, sha256_of};
use crate::snapshots::layer_reader;

/// An image read from a file, before it is stored.
struct Loaded {
    layers: Vec<Vec<u8>>,
    config: Map<String, Value>,
    name: Option<String>,
    format: &'static str,
}

fn err(file: &Path, msg: impl std::fmt::Display) -> ClientError {
    ClientError::Local(format!("{}: {msg}", file.display()))
}

fn gunzip_if_needed(b: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    layer_reader(b).read_to_end(&mut out)?;
    Ok(out)
}

/// Gzip with a fixed header, so equal tars give equal blobs.
pub fn gzip(b: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    gz.write_all(b)?;
    gz.finish()
}

/// Every file of a tar by name (for the small metadata-bearing formats).
fn tar_files(data: &[u8]) -> std::io::Result<HashMap<String, Vec<u8>>> {
    let mut out = HashMap::new();
    let mut a = tar::Archive::new(data);
    for e in a.entries()? {
        let mut e = e?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = e.path()?.to_string_lossy().trim_start_matches("./").to_string();
        let mut v = Vec::new();
        e.read_to_end(&mut v)?;
        out.insert(name, v);
    }
    Ok(out)
}

fn json_of(file: &Path, b: Option<&Vec<u8>>, what: &str) -> Result<Value, ClientError> {
    let b = b.ok_or_else(|| err(file, format!("{what} is missing")))?;
    serde_json::from_slice(b).map_err(|e| err(file, format!("{what} is not valid JSON: {e}")))
}

/// The runtime part (`config`) of an image config document.
fn runtime_section(config: &Value) -> Map<String, Value> {
    config
        .get("config")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn docker_save(file: &Path, files: &HashMap<String, Vec<u8>>) -> Result<Loaded, ClientError> {
    let manifest = json_of(file, files.get("manifest.json"), "manifest.json")?;
    let first = manifest
        .get(0)
        .ok_or_else(|| err(file, "manifest.json lists no image"))?;
    let config_path = first["Config"]
        .as_str()
        .ok_or_else(|| err(file, "manifest.json has no Config"))?;
    let config = json_of(file, files.get(config_path), config_path)?;
    let mut layers = Vec::new();
    for l in first["Layers"]
        .as_array()
        .ok_or_else(|| err(file, "manifest.json has no Layers"))?
    {
        let p = l.as_str().unwrap_or_default();
        layers.push(
            files
                .get(p)
                .ok_or_else(|| err(file, format!("layer {p} is missing")))?
                .clone(),
        );
    }
    Ok(Loaded {
        layers,
        config: runtime_section(&config),
        name: first["RepoTags"].get(0).and_then(Value::as_str).map(str::to_string),
        format: "docker save",
    })
}

fn oci_layout(file: &Path, blob: &dyn Fn(&str) -> Option<Vec<u8>>, index: Value) -> Result<Loaded, ClientError> {
    let mut desc = index["manifests"]
        .get(0)
        .cloned()
        .ok_or_else(|| err(file, "index.json lists no manifest"))?;
    let name = desc["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .map(str::to_string);
    loop {
        let digest = desc["digest"].as_str().unwrap_or_default().to_string();
        let doc: Value =
            serde_json::from_slice(&blob(&digest).ok_or_else(|| err(file, format!("blob {digest} is missing")))?)
                .map_err(|e| err(file, format!("{digest} is not JSON: {e}")))?;
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
        let cdigest = doc["config"]["digest"].as_str().unwrap_or_default();
        let config: Value =
            serde_json::from_slice(&blob(cdigest).ok_or_else(|| err(file, format!("config {cdigest} is missing")))?)
                .map_err(|e| err(file, format!("config is not JSON: {e}")))?;
        let mut layers = Vec::new();
        for l in doc["layers"].as_array().cloned().unwrap_or_default() {
            let d = l["digest"].as_str().unwrap_or_default();
            layers.push(blob(d).ok_or_else(|| err(file, format!("layer {d} is missing")))?);
        }
        return Ok(Loaded {
            layers,
            config: runtime_section(&config),
            name,
            format: "OCI layout",
        });
    }
}

fn load(file: &Path) -> Result<Loaded, ClientError> {
    if file.is_dir() {
        if !file.join("oci-layout").exists() {
            return Err(err(
                file,
                "is a directory but not an OCI image layout (no oci-layout file): pass a tar, or an OCI layout",
            ));
        }
        let index: Value = serde_json::from_slice(&std::fs::read(file.join("index.json")).map_err(|e| err(file, e))?)
            .map_err(|e| err(file, format!("index.json: {e}")))?;
        let blob = |d: &str| std::fs::read(file.join("blobs").join(d.replacen(':', "/", 1))).ok();
        return oci_layout(file, &blob, index);
    }
    let raw = std::fs::read(file).map_err(|e| err(file, format!("cannot read it: {e}")))?;
    let data = gunzip_if_needed(&raw).map_err(|e| err(file, format!("not a readable (gzip) tar: {e}")))?;
    let files = tar_files(&data).map_err(|e| err(file, format!("not a tar archive: {e}")))?;
    if files.contains_key("manifest.json") {
        return docker_save(file, &files);
    }
    if files.contains_key("oci-layout") {
        let index = json_of(file, files.get("index.json"), "index.json")?;
        let blob = |d: &str| files.get(&format!("blobs/{}", d.replacen(':', "/", 1))).cloned();
        return oci_layout(file, &blob, index);
    }
    Ok(Loaded {
        layers: vec![data],
        config: Map::new(),
        name: None,
        format: "root filesystem tar",
    })
}

/// Imports `file` under `name` (or the name the file carries); returns the stored record
/// and the format that was recognised.
pub fn import_image(
    client: &DaemonClient,
    file: &Path,
    name: Option<&str>,
    platform: &str,
) -> Result<(ImageRecord, &'static str), ClientError> {
    let loaded = load(file)?;
    let name = name.map(str::to_string).or(loaded.name.clone()).ok_or_else(|| {
        err(
            file,
            "carries no image name: give one, as in `lcache image import FILE NAME:TAG`",
        )
    })?;
    let mut layers = Vec::new();
    for (i, blob) in loaded.layers.iter().enumerate() {
        let tar = gunzip_if_needed(blob).map_err(|e| err(file, format!("layer {i}: {e}")))?;
        let check = tempfile::tempdir().map_err(|e| err(file, e))?;
        extract_layer(&tar[..], check.path(), Whiteouts::Apply, is_root())
            .map_err(|e| err(file, format!("layer {i}: {e}")))?;
        let gz = if blob.starts_with(&[0x1f, 0x8b]) {
            blob.clone()
        } else {
            gzip(&tar).map_err(|e| err(file, e))?
        };
        let layer = LayerRef {
            digest: sha256_of(&gz),
            blake3: String::new(),
            size: gz.len() as u64,
            diff_id: sha256_of(&tar),
            media_type: LAYER_MEDIA_TYPE.into(),
        };
        client.put_blob(&layer.digest, Bytes::from(gz))?;
        layers.push(layer);
    }
    let config = config_document(
        platform,
        &runtime_config(&serde_json::to_string(&serde_json::json!({"config": loaded.config})).unwrap_or_default()),
        &layers,
    );
    let manifest = manifest_document(&config, &layers);
    let record = ImageRecord {
        name: normalize_image_name(&name),
        manifest_digest: sha256_of(&manifest),
        config_digest: sha256_of(&config),
        layers,
        config: String::from_utf8_lossy(&config).into_owned(),
        created_at_ms: 0,
    };
    client.put_blob(&record.config_digest, Bytes::from(config))?;
    client.put_blob(&record.manifest_digest, Bytes::from(manifest))?;
    Ok((client.put_image(&record)?, loaded.format))
}
