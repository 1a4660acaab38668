//! `lcache image history` and `lcache image inspect`: an image as `docker history` and
//! `docker inspect` show it — from its config's `history`, its layers' content sizes and its
//! config — plus what only lcache knows: the Dockerfile line, the step's key and whether
//! the build that made the image took the layer from the cache.

use std::collections::HashMap;

use anyhow::{Context, Result};
use lcache_builder::snapshots::layer_file_reader;
use lcache_image::image_history::HistoryEntry;
use lcache_proto::build_plan::NoBaseImages;
use lcache_proto::planned_build::PlannedBuild;
use lcache_proto::wire::{BuildRecord, ImageRecord, LayerRef, PlanInputs};
use serde::{Deserialize, Serialize};

use crate::daemon_client::DaemonClient;

/// How many recent builds are searched for the one that made an image.
const BUILDS_SEARCHED: usize = 200;

#[derive(Deserialize, Default)]
struct ConfigDoc {
    #[serde(default)]
    history: Vec<HistoryEntry>,
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: serde_json::Value,
}

/// One row of `lcache image history`, newest first; the first six fields are
/// `docker history --format json`'s.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct HistoryRow {
    /// The image's id on the newest row, `<missing>` below, as Docker shows it.
    pub id: String,
    /// When, if the image says.
    pub created_at: String,
    /// The instruction, in BuildKit's words.
    pub created_by: String,
    /// The layer's content size (0 for config-only instructions).
    pub size: String,
    /// Its size in bytes.
    #[serde(skip)]
    pub bytes: u64,
    /// The history's comment.
    pub comment: String,
    /// The Dockerfile line, when the build that made the image is in the history.
    pub line: Option<usize>,
    /// The step's key.
    pub key: Option<String>,
    /// Whether that build took the layer from the cache.
    pub cached: Option<bool>,
    /// Whether the row has a layer.
    #[serde(skip)]
    pub layer: bool,
}

/// Sizes as Docker prints them (`6B`, `1.98MB`).
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        return format!("{n}B");
    }
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{v:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[u])
}

/// A layer blob of the daemon's as a tar archive (fetched into a temporary file, verified
/// on the way, decompressed as it is read).
pub fn layer_archive(client: &DaemonClient, layer: &LayerRef) -> Result<tar::Archive<Box<dyn std::io::Read>>> {
    let mut tmp = tempfile::tempfile().context("cannot make a temporary file")?;
    client
        .blob_into(&layer.digest, &mut tmp)
        .with_context(|| format!("cannot read layer {}", layer.digest))?;
    use std::io::Seek;
    tmp.rewind()?;
    Ok(tar::Archive::new(layer_file_reader(tmp)?))
}

/// A layer's size as Docker counts it: its regular files' bytes and its links' targets.
fn content_size(client: &DaemonClient, layer: &LayerRef) -> Result<u64> {
    let mut archive = layer_archive(client, layer)?;
    let mut total = 0;
    for entry in archive.entries().context("the layer is not a tar")? {
        let entry = entry.context("the layer is not a tar")?;
        let kind = entry.header().entry_type();
        if kind.is_file() {
            total += entry.header().size().unwrap_or(0);
        } else if kind.is_symlink() {
            // Docker counts a link as the length of what it points to.
            total += entry.link_name_bytes().map_or(0, |l| l.len() as u64);
        }
    }
    Ok(total)
}

/// The build that made the image (its manifest), if it is among the recent ones.
fn build_of(client: &DaemonClient, image: &ImageRecord) -> Option<BuildRecord> {
    let builds = client.builds(BUILDS_SEARCHED).ok()?;
    let id = builds.into_iter().find(|b| b.image == image.manifest_digest)?.id;
    client.build_record(&id).ok()
}

fn parse_config(image: &ImageRecord) -> ConfigDoc {
    serde_json::from_str(&image.config).unwrap_or_default()
}

/// The rows of `lcache image history NAME`, newest first.
pub fn history(client: &DaemonClient, name: &str) -> Result<Vec<HistoryRow>> {
    let image = client
        .image(name)?
        .with_context(|| format!("no image {name} — `lcache image ls` lists them"))?;
    let doc = parse_config(&image);
    let build = build_of(client, &image);
    // The build's steps by the layer each one's record points to.
    let mut by_layer: HashMap<String, (usize, String, bool)> = HashMap::new();
    let mut config_lines: Vec<(usize, String)> = Vec::new();
    if let Some(b) = &build {
        for s in &b.steps {
            if let Ok(Some(rec)) = client.step(&s.key) {
                if let Some(l) = rec.layer {
                    by_layer.entry(l.digest).or_insert((s.line, s.key.clone(), s.cached));
                }
            }
        }
        // Config-only instructions have no record: their lines come from the Dockerfile as
        // it is now, planned again, and only where its history reads as the image's.
        let inputs = PlanInputs {
            dockerfile_name: b.dockerfile.clone(),
            dockerfile: std::fs::read_to_string(&b.dockerfile_path).unwrap_or_default(),
            dockerfile_path: b.dockerfile_path.clone(),
            context: b.context.clone(),
            build_args: Default::default(),
            target: b.target.clone(),
            platform: format!("{}/{}", doc.os, doc.architecture),
            all_files: false,
        };
        if let Ok(planned) = PlannedBuild::new(&inputs, &NoBaseImages) {
            config_lines = planned
                .plan
                .stages
                .iter()
                .flat_map(|s| s.history.iter())
                .filter(|h| !h.layer)
                .map(|h| (h.line, h.created_by.clone()))
                .collect();
        }
    }
    let mut layers = image.layers.iter();
    let entries: Vec<HistoryEntry> = if doc.history.iter().filter(|h| !h.empty_layer).count() == image.layers.len() {
        doc.history.clone()
    } else {
        vec![HistoryEntry::default(); image.layers.len()]
    };
    let mut rows = Vec::new();
    for h in &entries {
        let created_by = h.created_by.clone().unwrap_or_default();
        let (bytes, mut line, mut key, mut cached) = (0, None, None, None);
        let bytes = if h.empty_layer {
            // The first unused line whose text is this instruction's.
            if let Some(pos) = config_lines.iter().position(|(_, w)| *w == created_by) {
                line = Some(config_lines.remove(pos).0);
            }
            bytes
        } else {
            let layer = layers
                .next()
                .context("the history names more layers than the image has")?;
            if let Some((l, k, c)) = by_layer.get(&layer.digest) {
                (line, key, cached) = (Some(*l), Some(k.clone()), Some(*c));
            }
            content_size(client, layer)?
        };
        rows.push(HistoryRow {
            id: "<missing>".into(),
            created_at: h.created.clone().unwrap_or_default(),
            created_by,
            size: human_size(bytes),
            bytes,
            comment: h.comment.clone().unwrap_or_default(),
            line,
            key,
            cached,
            layer: !h.empty_layer,
        });
    }
    rows.reverse();
    if let Some(first) = rows.first_mut() {
        first.id = image.config_digest.clone();
    }
    Ok(rows)
}

/// `lcache image history` as a table.
pub fn history_table(rows: &[HistoryRow], no_trunc: bool) -> String {
    use std::fmt::Write;
    let cut = |s: &str, n: usize| -> String {
        if no_trunc || s.chars().count() <= n {
            s.to_string()
        } else {
            format!("{}…", s.chars().take(n - 1).collect::<String>())
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<46} {:>9}  {:>5}  {:<14} {:<8} COMMENT",
        "IMAGE", "CREATED BY", "SIZE", "LINE", "KEY", "BUILD"
    );
    for r in rows {
        let id = if r.id.starts_with("sha256:") && !no_trunc {
            r.id.trim_start_matches("sha256:")[..12].to_string()
        } else {
            r.id.clone()
        };
        let _ = writeln!(
            out,
            "{:<14} {:<46} {:>9}  {:>5}  {:<14} {:<8} {}",
            id,
            cut(&r.created_by, 45),
            r.size,
            r.line.map(|l| l.to_string()).unwrap_or_default(),
            r.key.as_deref().map(|k| cut(k, 12)).unwrap_or_default(),
            match r.cached {
                Some(true) => "CACHED",
                Some(false) => "rebuilt",
                None => "",
            },
            r.comment
        );
    }
    out
}

/// `lcache image inspect NAME`: the JSON `docker inspect` shows for the same image.
pub fn inspect(client: &DaemonClient, name: &str) -> Result<serde_json::Value> {
    let image = client
        .image(name)?
        .with_context(|| format!("no image {name} — `lcache image ls` lists them"))?;
    let doc = parse_config(&image);
    let tags: Vec<String> = client
        .images()?
        .into_iter()
        .filter(|i| i.manifest_digest == image.manifest_digest && !i.name.contains('@'))
        .map(|i| i.name)
        .collect();
    let mut size = 0;
    for l in &image.layers {
        size += content_size(client, l)?;
    }
    Ok(serde_json::json!([{
        "Id": image.config_digest,
        "RepoTags": tags,
        "RepoDigests": [],
        "Created": doc.created.unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
        "Config": doc.config,
        "Architecture": doc.architecture,
        "Os": doc.os,
        "Size": size,
        "RootFS": {
            "Type": "layers",
            "Layers": image.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "ManifestDigest": image.manifest_digest,
    }]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_docker_prints_them() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(6), "6B");
        assert_eq!(human_size(1_983_000), "1.98MB");
        assert_eq!(human_size(12_300), "12.3kB");
        assert_eq!(human_size(123_456_789), "123MB");
    }
}
