//! `lcache image analyze`: what each layer adds, modifies and removes, and the space wasted
//! on files a later layer overwrites or removes — with Dive's efficiency score and CI rules
//! (`.dive-ci`: `lowestEfficiency`, `highestWastedBytes`, `highestUserWastedPercent`) — each
//! attributed to the Dockerfile lines that caused it, with the fix where it is plain.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result};
use lcache_proto::wire::LayerRef;
use serde::Serialize;

use crate::daemon_client::DaemonClient;
use crate::image_views::{history, human_size, layer_archive};

/// One entry of a layer, as the layer's tar has it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    /// Path without a leading `/`.
    pub path: String,
    /// `file`, `dir`, `symlink`, `hardlink`, `other`.
    pub kind: &'static str,
    /// Bytes (files), target length (links), 0 otherwise.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
}

/// A layer's entries and the paths it removes (whiteouts; `dir/` for an opaque directory).
#[derive(Debug, Clone, Default)]
pub struct LayerTree {
    /// What it writes.
    pub entries: Vec<Entry>,
    /// What it removes.
    pub removed: Vec<String>,
    /// Directories it makes opaque (everything below them from earlier layers is gone).
    pub opaque: Vec<String>,
}

/// What one layer does to the image.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// 0-based, bottom first.
    pub index: usize,
    /// The instruction that made it.
    pub created_by: String,
    /// Its Dockerfile line, when the build is known.
    pub line: Option<usize>,
    /// Its size as Docker counts it.
    pub size: u64,
    /// Paths new in this layer.
    pub added: Vec<Entry>,
    /// Paths an earlier layer had, written again.
    pub modified: Vec<Entry>,
    /// Paths an earlier layer had, removed.
    pub removed: Vec<String>,
}

/// A path that costs more than once.
#[derive(Debug, Clone, Serialize)]
pub struct Inefficiency {
    /// The path.
    pub path: String,
    /// How many layers touch it.
    pub count: usize,
    /// The bytes all its versions (and removals) add up to.
    pub cumulative_size: u64,
    /// The layers that touch it, bottom first.
    pub layers: Vec<usize>,
    /// Their Dockerfile lines.
    pub lines: Vec<usize>,
}

/// The whole analysis.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    /// The image.
    pub image: String,
    /// Dive's efficiency: the smallest size each path had, over the bytes of all versions.
    pub efficiency: f64,
    /// Bytes of paths touched more than once (Dive's wasted bytes).
    pub wasted_bytes: u64,
    /// Those over the bytes of every layer but the first.
    pub user_wasted_percent: f64,
    /// Every layer.
    pub layers: Vec<LayerReport>,
    /// The costliest paths first.
    pub inefficiencies: Vec<Inefficiency>,
    /// What to change, where it is plain.
    pub fixes: Vec<String>,
}

impl Entry {
    /// A regular file (tests build layer trees by hand).
    #[cfg(test)]
    pub(crate) fn file(path: &str, size: u64) -> Self {
        Self {
            path: path.into(),
            kind: "file",
            size,
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }
}

fn clean(path: &str) -> String {
    path.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

/// Reads a layer blob's tar into a [`LayerTree`].
pub fn read_layer(client: &DaemonClient, layer: &LayerRef) -> Result<LayerTree> {
    let mut archive = layer_archive(client, layer)?;
    let mut tree = LayerTree::default();
    for entry in archive.entries().context("the layer is not a tar")? {
        let entry = entry.context("the layer is not a tar")?;
        let h = entry.header();
        let path = clean(&String::from_utf8_lossy(&entry.path_bytes()));
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n.to_string()),
            None => (String::new(), path.clone()),
        };
        if name == ".wh..wh..opq" {
            tree.opaque.push(dir.trim_end_matches('/').to_string());
            continue;
        }
        if let Some(gone) = name.strip_prefix(".wh.") {
            tree.removed.push(format!("{dir}{gone}"));
            continue;
        }
        let t = h.entry_type();
        let (kind, size) = if t.is_file() {
            ("file", h.size().unwrap_or(0))
        } else if t.is_dir() {
            ("dir", 0)
        } else if t.is_symlink() {
            ("symlink", entry.link_name_bytes().map_or(0, |l| l.len() as u64))
        } else if t.is_hard_link() {
            ("hardlink", 0)
        } else {
            ("other", 0)
        };
        if path.is_empty() {
            continue;
        }
        tree.entries.push(Entry {
            path,
            kind,
            size,
            mode: h.mode().unwrap_or(0) & 0o7777,
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
        });
    }
    Ok(tree)
}

/// Whether `path` is `dir` or below it.
fn under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// Analyses layers (bottom first) with what made each (`created_by`, line).
pub fn analyze(image: &str, trees: &[LayerTree], made_by: &[(String, Option<usize>)]) -> Analysis {
    // The stacked image so far: path → entry.
    let mut stacked: BTreeMap<String, Entry> = BTreeMap::new();
    let mut seen: HashMap<String, (u64, Option<u64>, Vec<usize>)> = HashMap::new();
    let mut layers = Vec::new();
    let note = |path: &str, size: u64, layer: usize, seen: &mut HashMap<String, (u64, Option<u64>, Vec<usize>)>| {
        let d = seen.entry(path.to_string()).or_insert((0, None, Vec::new()));
        d.0 += size;
        d.1 = Some(d.1.map_or(size, |m| m.min(size)));
        d.2.push(layer);
    };
    for (i, tree) in trees.iter().enumerate() {
        let mut report = LayerReport {
            index: i,
            created_by: made_by.get(i).map(|m| m.0.clone()).unwrap_or_default(),
            line: made_by.get(i).and_then(|m| m.1),
            size: tree.entries.iter().map(|e| e.size).sum(),
            added: Vec::new(),
            modified: Vec::new(),
            removed: Vec::new(),
        };
        // Removals first (a whiteout or opaque dir applies to what was below), each costing
        // what it removes, as Dive counts it.
        let mut gone: Vec<String> = Vec::new();
        for r in &tree.removed {
            gone.extend(stacked.keys().filter(|p| under(p, r)).cloned());
            let bytes: u64 = stacked.iter().filter(|(p, _)| under(p, r)).map(|(_, e)| e.size).sum();
            note(r, bytes, i, &mut seen);
            if stacked.keys().any(|p| under(p, r)) {
                report.removed.push(r.clone());
            }
        }
        for dir in &tree.opaque {
            let below: Vec<String> = stacked
                .keys()
                .filter(|p| under(p, dir) && p.as_str() != dir.as_str())
                .cloned()
                .collect();
            report.removed.extend(below.iter().cloned());
            gone.extend(below);
        }
        for p in gone {
            stacked.remove(&p);
        }
        let has_children = |path: &str| {
            tree.entries
                .iter()
                .any(|e| e.path.len() > path.len() && under(&e.path, path))
        };
        for e in &tree.entries {
            // Dive weighs leaves: files, links, and directories with nothing in them here.
            if e.kind != "dir" || !has_children(&e.path) {
                note(&e.path, e.size, i, &mut seen);
            }
            match stacked.insert(e.path.clone(), e.clone()) {
                None => report.added.push(e.clone()),
                Some(old) if e.kind == "dir" && old.kind == "dir" && old == *e => {}
                Some(_) => report.modified.push(e.clone()),
            }
        }
        layers.push(report);
    }
    let (mut minimum, mut discovered) = (0u64, 0u64);
    let mut inefficiencies = Vec::new();
    for (path, (cumulative, min, touched)) in &seen {
        minimum += min.unwrap_or(0);
        discovered += cumulative;
        if touched.len() >= 2 {
            inefficiencies.push(Inefficiency {
                path: path.clone(),
                count: touched.len(),
                cumulative_size: *cumulative,
                layers: touched.clone(),
                lines: touched
                    .iter()
                    .filter_map(|l| made_by.get(*l).and_then(|m| m.1))
                    .collect(),
            });
        }
    }
    inefficiencies.sort_by(|a, b| b.cumulative_size.cmp(&a.cumulative_size).then(a.path.cmp(&b.path)));
    let efficiency = if discovered == 0 {
        1.0
    } else {
        minimum as f64 / discovered as f64
    };
    let wasted_bytes: u64 = inefficiencies.iter().map(|i| i.cumulative_size).sum();
    let user_size: u64 = layers.iter().skip(1).map(|l| l.size).sum();
    let user_wasted_percent = if user_size == 0 {
        0.0
    } else {
        wasted_bytes as f64 / user_size as f64
    };
    let fixes = fixes(&layers, &inefficiencies);
    Analysis {
        image: image.to_string(),
        efficiency,
        wasted_bytes,
        user_wasted_percent,
        layers,
        inefficiencies,
        fixes,
    }
}

/// The plain fixes: a file one RUN writes and a later one removes still ships in the first
/// layer; doing both in one RUN (apt lists: `&& rm -rf /var/lib/apt/lists/*`) saves it.
fn fixes(layers: &[LayerReport], waste: &[Inefficiency]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let is_run = |i: usize| layers.get(i).is_some_and(|l| l.created_by.starts_with("RUN "));
    for w in waste.iter().filter(|w| w.cumulative_size > 0) {
        let (Some(&first), Some(&last)) = (w.layers.first(), w.layers.last()) else {
            continue;
        };
        let removed_later = layers
            .get(last)
            .is_some_and(|l| l.removed.iter().any(|r| under(&w.path, r) || r == &w.path));
        let at = |i: usize| match layers.get(i).and_then(|l| l.line) {
            Some(line) => format!("line {line}"),
            None => format!("layer {i}"),
        };
        let fix = if w.path.starts_with("var/lib/apt/lists") && is_run(first) {
            format!(
                "{}: end that RUN with `&& rm -rf /var/lib/apt/lists/*` (apt's lists ship in its layer otherwise)",
                at(first)
            )
        } else if removed_later && is_run(first) && is_run(last) {
            format!(
                "{}: remove what it writes in the same RUN, not in {} — a later layer cannot take bytes out of an earlier one",
                at(first),
                at(last)
            )
        } else {
            continue;
        };
        if !out.contains(&fix) {
            out.push(fix);
        }
    }
    out
}

/// Analyses the image `name` the daemon has; also returns its layers as read.
pub fn analyze_image(client: &DaemonClient, name: &str) -> Result<(Analysis, Vec<LayerTree>)> {
    let image = client
        .image(name)?
        .with_context(|| format!("no image {name} — `lcache image ls` lists them"))?;
    let rows = history(client, name)?;
    let made_by: Vec<(String, Option<usize>)> = rows
        .iter()
        .rev()
        .filter(|r| r.layer)
        .map(|r| (r.created_by.clone(), r.line))
        .collect();
    let mut trees = Vec::new();
    for l in &image.layers {
        trees.push(read_layer(client, l)?);
    }
    Ok((analyze(&image.name, &trees, &made_by), trees))
}

/// The analysis as text.
pub fn render(a: &Analysis) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{}", a.image);
    let _ = writeln!(
        out,
        "efficiency {:.2} %   wasted {} ({:.1} % of what the Dockerfile added)",
        a.efficiency * 100.0,
        human_size(a.wasted_bytes),
        a.user_wasted_percent * 100.0
    );
    let _ = writeln!(
        out,
        "\n{:>5}  {:>9}  {:>6} {:>6} {:>6}  INSTRUCTION",
        "LINE", "SIZE", "ADDED", "MODIF", "REMOV"
    );
    for l in &a.layers {
        let _ = writeln!(
            out,
            "{:>5}  {:>9}  {:>6} {:>6} {:>6}  {}",
            l.line.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            human_size(l.size),
            l.added.len(),
            l.modified.len(),
            l.removed.len(),
            if l.created_by.is_empty() {
                "(base)"
            } else {
                &l.created_by
            }
        );
    }
    let costly: Vec<&Inefficiency> = a
        .inefficiencies
        .iter()
        .filter(|i| i.cumulative_size > 0)
        .take(20)
        .collect();
    if !costly.is_empty() {
        let _ = writeln!(out, "\n{:>6}  {:>9}  {:<16} PATH", "COUNT", "WASTED", "LINES");
        for i in costly {
            let lines: Vec<String> = i.lines.iter().map(|l| l.to_string()).collect();
            let _ = writeln!(
                out,
                "{:>6}  {:>9}  {:<16} /{}",
                i.count,
                human_size(i.cumulative_size),
                lines.join(","),
                i.path
            );
        }
    }
    for f in &a.fixes {
        let _ = writeln!(out, "\nfix: {f}");
    }
    out
}

/// Dive's CI rules, from `.dive-ci` (YAML `rules:` with the three keys) or the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct CiRules {
    /// Fail below this efficiency (0–1); default 0.9.
    pub lowest_efficiency: Option<f64>,
    /// Fail above these wasted bytes; default disabled.
    pub highest_wasted_bytes: Option<u64>,
    /// Fail above this share of wasted user bytes (0–1); default 0.1.
    pub highest_user_wasted_percent: Option<f64>,
}

impl Default for CiRules {
    fn default() -> Self {
        Self {
            lowest_efficiency: Some(0.9),
            highest_wasted_bytes: None,
            highest_user_wasted_percent: Some(0.1),
        }
    }
}

/// `20MB`, `1.5GiB`, `1024` as bytes.
fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((n * mult) as u64)
}

/// Reads Dive's `.dive-ci`: a `rules:` map of `key: value` lines (`disabled` turns a rule off).
pub fn parse_ci_rules(text: &str) -> Result<CiRules> {
    let mut rules = CiRules::default();
    for raw in text.lines() {
        let line = raw.split('#').next().unwrap_or_default().trim();
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim().trim_matches('"').trim_matches('\'');
        let off = v.eq_ignore_ascii_case("disabled");
        let bad = || anyhow::anyhow!("{}: '{v}' is not a value for {k}", raw.trim());
        match k.trim() {
            "lowestEfficiency" => {
                rules.lowest_efficiency = if off { None } else { Some(v.parse().map_err(|_| bad())?) }
            }
            "highestWastedBytes" => {
                rules.highest_wasted_bytes = if off {
                    None
                } else {
                    Some(parse_bytes(v).ok_or_else(bad)?)
                }
            }
            "highestUserWastedPercent" => {
                rules.highest_user_wasted_percent = if off { None } else { Some(v.parse().map_err(|_| bad())?) }
            }
            _ => {}
        }
    }
    Ok(rules)
}

/// Each rule's verdict, as Dive prints them, and whether all passed.
pub fn check(a: &Analysis, rules: &CiRules) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    let mut verdict = |name: &str, pass: Option<bool>, detail: String| {
        let word = match pass {
            None => "SKIP",
            Some(true) => "PASS",
            Some(false) => {
                ok = false;
                "FAIL"
            }
        };
        lines.push(format!("  {word}: {name}: {detail}"));
    };
    verdict(
        "lowestEfficiency",
        rules.lowest_efficiency.map(|min| a.efficiency >= min),
        format!(
            "efficiency {:.4}{}",
            a.efficiency,
            rules
                .lowest_efficiency
                .map(|m| format!(", lowest allowed {m}"))
                .unwrap_or_default()
        ),
    );
    verdict(
        "highestWastedBytes",
        rules.highest_wasted_bytes.map(|max| a.wasted_bytes <= max),
        format!(
            "wasted {}{}",
            human_size(a.wasted_bytes),
            rules
                .highest_wasted_bytes
                .map(|m| format!(", highest allowed {}", human_size(m)))
                .unwrap_or_default()
        ),
    );
    verdict(
        "highestUserWastedPercent",
        rules
            .highest_user_wasted_percent
            .map(|max| a.user_wasted_percent <= max),
        format!(
            "user wasted {:.4}{}",
            a.user_wasted_percent,
            rules
                .highest_user_wasted_percent
                .map(|m| format!(", highest allowed {m}"))
                .unwrap_or_default()
        ),
    );
    (lines, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> Entry {
        Entry::file(path, size)
    }

    #[test]
    fn a_file_written_then_removed_is_wasted_and_attributed_to_both_lines() {
        let base = LayerTree {
            entries: vec![file("bin/sh", 1000)],
            ..Default::default()
        };
        let write = LayerTree {
            entries: vec![file("tmp/big", 5000), file("app", 100)],
            ..Default::default()
        };
        let remove = LayerTree {
            removed: vec!["tmp/big".into()],
            ..Default::default()
        };
        let made_by = [
            (String::new(), None),
            ("RUN /bin/sh -c make # buildkit".into(), Some(3)),
            ("RUN /bin/sh -c rm /tmp/big # buildkit".into(), Some(4)),
        ];
        let a = analyze("x", &[base, write, remove], &made_by);
        assert_eq!(
            a.wasted_bytes, 10_000,
            "the file's bytes and the removal's, as Dive counts them"
        );
        assert_eq!(a.inefficiencies[0].path, "tmp/big");
        assert_eq!(a.inefficiencies[0].lines, [3, 4]);
        // Minimum sizes 1000 + 100 + 5000 over 1000 + 100 + 5000 + 5000.
        assert!((a.efficiency - 6100.0 / 11100.0).abs() < 1e-9);
        assert_eq!(a.layers[2].removed, ["tmp/big"]);
        assert!(
            a.fixes[0].starts_with("line 3: remove what it writes in the same RUN"),
            "{:?}",
            a.fixes
        );
        let strict = parse_ci_rules("rules:\n  lowestEfficiency: 0.95\n  highestWastedBytes: 1KB\n").unwrap();
        assert!(!check(&a, &strict).1);
        let lax = parse_ci_rules(
            "rules:\n  lowestEfficiency: 0.5\n  highestWastedBytes: disabled\n  highestUserWastedPercent: disabled\n",
        )
        .unwrap();
        assert!(check(&a, &lax).1, "{:?}", check(&a, &lax).0);
        assert_eq!(parse_bytes("20MB"), Some(20_000_000));
    }
}
