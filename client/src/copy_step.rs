//! COPY, ADD and WORKDIR without a container: the step's layer is a directory tree built
//! here (the files at their destination, with --chmod/--chown applied), packed like any
//! other layer.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use lcache_proto::build_plan::CopyDef;
use lcache_proto::source_select::{ContextEntry, EntryKind, SelectedRoot};

use crate::layer_extract::{extract_layer, Whiteouts};
use crate::snapshots::layer_reader;

/// What a copied file was made from. A later build of the same COPY hard-links the file
/// from the previous layer's snapshot instead of copying it again when all of this is
/// unchanged: the source's device and inode, ctime (which every write moves, even one that restores
/// mtime), mtime and size, and the resulting mode and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CopiedFrom {
    dev: u64,
    ino: u64,
    ctime_ns: i64,
    mtime_ns: i64,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// A COPY layer's copied files, by path inside the layer; kept beside its snapshot.
pub type CopyManifest = HashMap<String, CopiedFrom>;

/// An earlier layer of the same step whose unchanged files can be linked, not copied.
#[derive(Debug)]
pub struct Seed {
    dir: PathBuf,
    manifest: CopyManifest,
}

fn manifest_path(snapshot: &Path) -> PathBuf {
    snapshot.with_extension("copied")
}

/// The seed a snapshot offers, if it was made by a COPY and still has its manifest.
pub fn load_seed(snapshot: &Path) -> Option<Seed> {
    let manifest = serde_json::from_slice(&std::fs::read(manifest_path(snapshot)).ok()?).ok()?;
    Some(Seed {
        dir: snapshot.to_path_buf(),
        manifest,
    })
}

/// Keeps a COPY layer's manifest beside its snapshot.
pub fn save_manifest(snapshot: &Path, manifest: &CopyManifest) -> std::io::Result<()> {
    std::fs::write(
        manifest_path(snapshot),
        serde_json::to_vec(manifest).map_err(std::io::Error::other)?,
    )
}

/// Where a COPY's files come from and go, for `place`.
struct Placement<'a> {
    src_root: &'a Path,
    layer: &'a Path,
    attrs: CopyAttrs,
    add: bool,
    seed: Option<&'a Seed>,
    manifest: CopyManifest,
}

/// Ownership and mode overrides of a COPY.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyAttrs {
    /// `--chown`, resolved.
    pub owner: Option<(u32, u32)>,
    /// `--chmod`, parsed.
    pub mode: Option<u32>,
}

fn rel_dest(dest: &str) -> PathBuf {
    PathBuf::from(dest.trim_start_matches('/'))
}

/// Creates `dir` and its missing parents inside `layer` (mode 0755).
fn make_dirs(layer: &Path, dir: &Path) -> std::io::Result<()> {
    let mut cur = layer.to_path_buf();
    for c in dir.components() {
        cur.push(c);
        if !cur.is_dir() {
            std::fs::create_dir(&cur)?;
            std::fs::set_permissions(&cur, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

fn finish(p: &Path, mode: u32, attrs: CopyAttrs, symlink: bool) -> std::io::Result<()> {
    let (uid, gid) = attrs.owner.unwrap_or((0, 0));
    if crate::layer_extract::is_root() {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
    }
    if !symlink {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(attrs.mode.unwrap_or(mode)))?;
    }
    Ok(())
}

impl Placement<'_> {
    fn place(&mut self, e: &ContextEntry, dest: &Path) -> std::io::Result<()> {
        let attrs = self.attrs;
        let src = self.src_root.join(&e.path);
        match e.kind {
            EntryKind::Dir => {
                if !dest.is_dir() {
                    std::fs::create_dir(dest)?;
                }
                finish(dest, e.mode, attrs, false)
            }
            EntryKind::Symlink => {
                let _ = std::fs::remove_file(dest);
                std::os::unix::fs::symlink(e.link_target.as_deref().unwrap_or_default(), dest)?;
                finish(dest, e.mode, attrs, true)
            }
            EntryKind::File => {
                if self.add && is_archive(&src) {
                    // ADD unpacks a local tar into the destination directory.
                    std::fs::create_dir_all(dest.parent().unwrap_or(dest))?;
                    let data = std::fs::read(&src)?;
                    let target = dest.parent().unwrap_or(dest);
                    return extract_layer(layer_reader(&data), target, Whiteouts::Apply, false)
                        .map(|_| ())
                        .map_err(|e| std::io::Error::other(e.to_string()));
                }
                let rel = dest.strip_prefix(self.layer).unwrap_or(dest).display().to_string();
                let (uid, gid) = attrs.owner.unwrap_or((0, 0));
                let from = CopiedFrom {
                    dev: e.stamp.dev,
                    ino: e.stamp.ino,
                    ctime_ns: e.stamp.ctime_ns,
                    mtime_ns: e.stamp.mtime_ns,
                    size: e.size,
                    mode: attrs.mode.unwrap_or(e.mode),
                    uid,
                    gid,
                };
                // Linking shares the inode with the earlier snapshot, which nothing ever
                // writes in place; mode and owner already match, so nothing is changed here.
                let linked = self.seed.is_some_and(|s| {
                    s.manifest.get(&rel) == Some(&from) && std::fs::hard_link(s.dir.join(&rel), dest).is_ok()
                });
                if !linked {
                    std::fs::copy(&src, dest)?;
                    finish(dest, e.mode, attrs, false)?;
                }
                self.manifest.insert(rel, from);
                Ok(())
            }
        }
    }
}

fn is_archive(p: &Path) -> bool {
    let Ok(data) = std::fs::read(p) else { return false };
    let tar_magic = |b: &[u8]| b.len() > 262 && &b[257..262] == b"ustar";
    if data.starts_with(&[0x1f, 0x8b]) {
        let mut head = Vec::new();
        use std::io::Read;
        let _ = flate2::read::GzDecoder::new(&data[..]).take(512).read_to_end(&mut head);
        return tar_magic(&head);
    }
    tar_magic(&data)
}

/// Builds the layer of a COPY/ADD into `layer` from selected `roots` of `entries` under
/// `src_root`, linking unchanged files from `seed`; returns the layer's manifest.
pub fn build_copy_layer(
    layer: &Path,
    def: &CopyDef,
    src_root: &Path,
    entries: &[ContextEntry],
    roots: &[SelectedRoot],
    attrs: CopyAttrs,
    seed: Option<&Seed>,
) -> std::io::Result<CopyManifest> {
    let mut p = Placement {
        src_root,
        layer,
        attrs,
        add: def.add,
        seed,
        manifest: HashMap::new(),
    };
    if def.parents {
        return Err(std::io::Error::other(
            "COPY --parents is not supported yet: copy each directory with its own COPY",
        ));
    }
    let dest = rel_dest(&def.dest);
    let sources = roots.len() + def.inline.len();
    let into_dir = def.dest.ends_with('/')
        || sources > 1
        || roots
            .iter()
            .any(|r| r.entry.is_none_or(|i| entries[i].kind == EntryKind::Dir));
    if into_dir {
        make_dirs(layer, &dest)?;
    } else if let Some(parent) = dest.parent() {
        make_dirs(layer, parent)?;
    }
    for r in roots {
        match r.entry {
            Some(i) if entries[i].kind != EntryKind::Dir => {
                let name = Path::new(&entries[i].path)
                    .file_name()
                    .map(PathBuf::from)
                    .unwrap_or_default();
                let target = if into_dir {
                    layer.join(&dest).join(name)
                } else {
                    layer.join(&dest)
                };
                p.place(&entries[i], &target)?;
            }
            _ => {
                for (i, rel) in &r.members {
                    p.place(&entries[*i], &layer.join(&dest).join(rel))?;
                }
            }
        }
    }
    for f in &def.inline {
        let target = if into_dir {
            layer.join(&dest).join(&f.name)
        } else {
            layer.join(&dest)
        };
        std::fs::write(&target, &f.content)?;
        finish(&target, 0o644, attrs, false)?;
    }
    Ok(p.manifest)
}

/// Builds the layer of a WORKDIR: the directory itself.
pub fn build_workdir_layer(layer: &Path, path: &str) -> std::io::Result<()> {
    make_dirs(layer, &rel_dest(path))
}

/// Parses a `--chmod` value (octal).
pub fn parse_chmod(v: &str) -> Result<Option<u32>, String> {
    if v.is_empty() {
        return Ok(None);
    }
    u32::from_str_radix(v, 8)
        .map(Some)
        .map_err(|_| format!("--chmod={v} is not an octal mode: write e.g. --chmod=755"))
}
