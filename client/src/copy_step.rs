//! COPY, ADD and WORKDIR without a container: the step's layer is a directory tree built
//! here (the files at their destination, with --chmod/--chown applied), packed like any
//! other layer.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use lcache_proto::build_plan::CopyDef;
use lcache_proto::source_select::{ContextEntry, EntryKind, SelectedRoot};

use crate::layer_extract::{extract_layer, Whiteouts};
use crate::snapshots::layer_reader;

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

fn place(src_root: &Path, e: &ContextEntry, dest: &Path, attrs: CopyAttrs, add: bool) -> std::io::Result<()> {
    let src = src_root.join(&e.path);
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
            if add && is_archive(&src) {
                // ADD unpacks a local tar into the destination directory.
                std::fs::create_dir_all(dest.parent().unwrap_or(dest))?;
                let data = std::fs::read(&src)?;
                let target = dest.parent().unwrap_or(dest);
                return extract_layer(layer_reader(&data), target, Whiteouts::Apply, false)
                    .map(|_| ())
                    .map_err(|e| std::io::Error::other(e.to_string()));
            }
            std::fs::copy(&src, dest)?;
            finish(dest, e.mode, attrs, false)
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
/// `src_root`.
pub fn build_copy_layer(
    layer: &Path,
    def: &CopyDef,
    src_root: &Path,
    entries: &[ContextEntry],
    roots: &[SelectedRoot],
    attrs: CopyAttrs,
) -> std::io::Result<()> {
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
                place(src_root, &entries[i], &target, attrs, def.add)?;
            }
            _ => {
                for (i, rel) in &r.members {
                    place(src_root, &entries[*i], &layer.join(&dest).join(rel), attrs, def.add)?;
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
    Ok(())
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
