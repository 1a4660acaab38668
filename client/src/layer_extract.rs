//! Safe extraction of OCI layer tars, ours, imported or from a shared cache: no entry may
//! write outside the root (`..`, absolute paths, paths through a symlink, hardlinks to
//! outside), and device nodes are refused unless the process is root. Whiteouts become
//! overlayfs whiteouts (snapshots) or deletions (applying layers onto a directory).

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// What to do with whiteouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Keep them as overlayfs expects: `0:0` character devices and the opaque xattr.
    Overlay,
    /// Apply them: delete what they hide (the directory holds the layers below).
    Apply,
}

/// Why a layer was refused or could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// An entry would write outside the root or is not allowed.
    #[error("layer entry '{entry}' {reason} — the layer is refused; it may be hostile or corrupt")]
    Unsafe {
        /// The entry's name as written in the tar.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading the tar or writing files failed.
    #[error("cannot extract layer entry '{entry}': {source}")]
    Io {
        /// The entry, or `(archive)`.
        entry: String,
        /// Why.
        source: std::io::Error,
    },
}

fn unsafe_entry(entry: &str, reason: &str) -> LayerError {
    LayerError::Unsafe {
        entry: entry.to_string(),
        reason: reason.to_string(),
    }
}

/// Whether this process may create devices and set owners.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A tar path made relative and clean; `None` if it climbs out or is absolute.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Refuses a path whose parent directories inside `root` include a symlink (writing
/// through it could land anywhere), creating missing parents as directories.
fn prepare_parents(root: &Path, rel: &Path, entry: &str) -> Result<(), LayerError> {
    let mut cur = root.to_path_buf();
    let parent = rel.parent().unwrap_or(Path::new(""));
    for c in parent.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(unsafe_entry(
                    entry,
                    "goes through a symlink, so it could write outside the root",
                ))
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(unsafe_entry(entry, "has a parent that is not a directory")),
            Err(_) => std::fs::create_dir(&cur).map_err(|source| LayerError::Io {
                entry: entry.to_string(),
                source,
            })?,
        }
    }
    Ok(())
}

/// Removes whatever is at `p` (not following symlinks).
fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Extracts an uncompressed layer tar into `root`; `privileged` (root) allows device nodes
/// and ownership.
pub fn extract_layer(
    reader: impl Read,
    root: &Path,
    whiteouts: Whiteouts,
    privileged: bool,
) -> Result<usize, LayerError> {
    let root_user = privileged;
    let mut archive = tar::Archive::new(reader);
    let io = |entry: &str| {
        let entry = entry.to_string();
        move |source| LayerError::Io {
            entry: entry.clone(),
            source,
        }
    };
    let mut created: HashSet<PathBuf> = HashSet::new();
    let mut count = 0;
    for e in archive.entries().map_err(io("(archive)"))? {
        let mut e = e.map_err(io("(archive)"))?;
        let raw = e.path().map_err(io("(archive)"))?.into_owned();
        let name = raw.display().to_string();
        let rel = clean(&raw).ok_or_else(|| unsafe_entry(&name, "is absolute or climbs out with '..'"))?;
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        prepare_parents(root, &rel, &name)?;
        let dest = root.join(&rel);
        let file_name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let header = e.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let kind = header.entry_type();
        // Whiteouts: `.wh..wh..opq` marks the parent opaque, `.wh.NAME` hides NAME.
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            let dir = dest.parent().unwrap_or(root);
            if hidden == ".wh..opq" {
                match whiteouts {
                    Whiteouts::Overlay => xattr::set(dir, "trusted.overlay.opaque", b"y").map_err(io(&name))?,
                    Whiteouts::Apply => {
                        for child in std::fs::read_dir(dir).map_err(io(&name))? {
                            let child = child.map_err(io(&name))?.path();
                            if !created.contains(&child) {
                                remove_any(&child).map_err(io(&name))?;
                            }
                        }
                    }
                }
            } else {
                if hidden.is_empty() || hidden.contains('/') {
                    return Err(unsafe_entry(&name, "is a malformed whiteout"));
                }
                let target = dir.join(hidden);
                remove_any(&target).map_err(io(&name))?;
                if whiteouts == Whiteouts::Overlay {
                    nix::sys::stat::mknod(
                        &target,
                        nix::sys::stat::SFlag::S_IFCHR,
                        nix::sys::stat::Mode::empty(),
                        0,
                    )
                    .map_err(|e| LayerError::Io {
                        entry: name.clone(),
                        source: e.into(),
                    })?;
                }
            }
            count += 1;
            continue;
        }
        match kind {
            tar::EntryType::Directory => {
                if !std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
                    remove_any(&dest).map_err(io(&name))?;
                    std::fs::create_dir(&dest).map_err(io(&name))?;
                }
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).map_err(io(&name))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_any(&dest).map_err(io(&name))?;
                let mut f = std::fs::File::options()
                    .write(true)
                    .create_new(true)
                    .open(&dest)
                    .map_err(io(&name))?;
                std::io::copy(&mut e, &mut f).map_err(io(&name))?;
                f.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(io(&name))?;
            }
            tar::EntryType::Symlink => {
                let target = header
                    .link_name()
                    .map_err(io(&name))?
                    .ok_or_else(|| unsafe_entry(&name, "is a symlink without a target"))?;
                remove_any(&dest).map_err(io(&name))?;
                std::os::unix::fs::symlink(&*target, &dest).map_err(io(&name))?;
            }
            tar::EntryType::Link => {
                let target = header
                    .link_name()
                    .map_err(io(&name))?
                    .ok_or_else(|| unsafe_entry(&name, "is a hardlink without a target"))?;
                let target_rel =
                    clean(&target).ok_or_else(|| unsafe_entry(&name, "is a hardlink to a path outside the root"))?;
                prepare_parents(root, &target_rel, &name)?;
                let src = root.join(&target_rel);
                if !std::fs::symlink_metadata(&src).is_ok_and(|m| m.is_file()) {
                    return Err(unsafe_entry(
                        &name,
                        "is a hardlink to something that is not a file in this layer's root",
                    ));
                }
                remove_any(&dest).map_err(io(&name))?;
                std::fs::hard_link(&src, &dest).map_err(io(&name))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                if !root_user {
                    return Err(unsafe_entry(&name, "is a device node, which only root may extract"));
                }
                let dev = nix::sys::stat::makedev(
                    u64::from(header.device_major().ok().flatten().unwrap_or(0)),
                    u64::from(header.device_minor().ok().flatten().unwrap_or(0)),
                );
                let kind = if kind == tar::EntryType::Char {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                remove_any(&dest).map_err(io(&name))?;
                nix::sys::stat::mknod(&dest, kind, nix::sys::stat::Mode::from_bits_truncate(mode), dev).map_err(
                    |e| LayerError::Io {
                        entry: name.clone(),
                        source: e.into(),
                    },
                )?;
            }
            tar::EntryType::Fifo => {
                remove_any(&dest).map_err(io(&name))?;
                nix::unistd::mkfifo(&dest, nix::sys::stat::Mode::from_bits_truncate(mode)).map_err(|e| {
                    LayerError::Io {
                        entry: name.clone(),
                        source: e.into(),
                    }
                })?;
            }
            // PAX and GNU long-name headers are consumed by the tar reader; anything else
            // (sparse files, vendor types) is not layer content we can represent.
            other => return Err(unsafe_entry(&name, &format!("has unsupported type {other:?}"))),
        }
        if root_user && kind != tar::EntryType::Link {
            let uid = header.uid().unwrap_or(0) as u32;
            let gid = header.gid().unwrap_or(0) as u32;
            std::os::unix::fs::lchown(&dest, Some(uid), Some(gid)).map_err(io(&name))?;
            if kind != tar::EntryType::Symlink {
                // chown clears setuid/setgid bits; put the mode back.
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).map_err(io(&name))?;
            }
        }
        created.insert(dest);
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    /// Writes a raw path into the header, bypassing the tar crate's own path checks, as a
    /// hostile tar would.
    fn raw_path(h: &mut tar::Header, p: &str) {
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..p.len()].copy_from_slice(p.as_bytes());
        h.set_cksum();
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = header(tar::EntryType::Regular, data.len() as u64);
        raw_path(&mut h, path);
        b.append(&h, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = header(kind, 0);
        h.set_link_name(target).unwrap();
        raw_path(&mut h, path);
        b.append(&h, &[][..]).unwrap();
    }

    fn refused(data: Vec<u8>) -> (String, tempfile::TempDir) {
        let outside = tempfile::tempdir().unwrap();
        let root = outside.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let e = extract_layer(&data[..], &root, Whiteouts::Apply, true).unwrap_err();
        (e.to_string(), outside)
    }

    #[test]
    fn files_dirs_symlinks_and_hardlinks_land_inside() {
        let d = tempfile::tempdir().unwrap();
        let data = tar_of(|b| {
            file(b, "./etc/app.conf", b"x=1");
            link(b, tar::EntryType::Symlink, "etc/link", "/etc/app.conf");
            link(b, tar::EntryType::Link, "etc/hard", "etc/app.conf");
        });
        extract_layer(&data[..], d.path(), Whiteouts::Apply, true).unwrap();
        assert_eq!(std::fs::read(d.path().join("etc/hard")).unwrap(), b"x=1");
        assert_eq!(
            std::fs::read_link(d.path().join("etc/link")).unwrap(),
            Path::new("/etc/app.conf")
        );
    }

    #[test]
    fn dot_dot_is_refused_with_the_entry_name() {
        let (e, outside) = refused(tar_of(|b| file(b, "../escaped", b"x")));
        assert!(e.contains("'../escaped'") && e.contains("climbs out"), "{e}");
        assert!(!outside.path().join("escaped").exists());
    }

    #[test]
    fn absolute_paths_are_refused() {
        let (e, _) = refused(tar_of(|b| file(b, "/tmp/lcache-abs-escape", b"x")));
        assert!(e.contains("is absolute"), "{e}");
        assert!(!Path::new("/tmp/lcache-abs-escape").exists());
    }

    #[test]
    fn writing_through_a_symlink_is_refused() {
        let (e, outside) = refused(tar_of(|b| {
            link(b, tar::EntryType::Symlink, "evil", "..");
            file(b, "evil/escaped", b"x");
        }));
        assert!(e.contains("'evil/escaped'") && e.contains("through a symlink"), "{e}");
        assert!(!outside.path().join("escaped").exists());
    }

    #[test]
    fn a_hardlink_to_outside_is_refused() {
        let (e, _) = refused(tar_of(|b| {
            link(b, tar::EntryType::Link, "passwd", "../../../etc/passwd")
        }));
        assert!(e.contains("'passwd'") && e.contains("outside the root"), "{e}");
    }

    #[test]
    fn a_hardlink_through_a_symlink_is_refused() {
        let (e, _) = refused(tar_of(|b| {
            link(b, tar::EntryType::Symlink, "up", "/etc");
            link(b, tar::EntryType::Link, "passwd", "up/passwd");
        }));
        assert!(e.contains("through a symlink"), "{e}");
    }

    #[test]
    fn device_nodes_are_refused_without_privilege() {
        let d = tempfile::tempdir().unwrap();
        let data = tar_of(|b| {
            let mut h = header(tar::EntryType::Char, 0);
            raw_path(&mut h, "dev/kmsg");
            b.append(&h, &[][..]).unwrap();
        });
        let e = extract_layer(&data[..], d.path(), Whiteouts::Apply, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'dev/kmsg'") && e.contains("device node"), "{e}");
    }

    #[test]
    fn whiteouts_delete_in_apply_mode() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/keep")).unwrap();
        std::fs::write(d.path().join("a/gone"), "x").unwrap();
        std::fs::write(d.path().join("old"), "x").unwrap();
        let data = tar_of(|b| {
            file(b, "a/.wh.gone", b"");
            file(b, "a/new", b"n");
            file(b, "a/.wh..wh..opq", b"");
        });
        extract_layer(&data[..], d.path(), Whiteouts::Apply, true).unwrap();
        assert!(!d.path().join("a/gone").exists());
        assert!(!d.path().join("a/keep").exists(), "opaque dir hides what was below");
        assert!(d.path().join("a/new").exists(), "but not what this layer added");
        assert!(d.path().join("old").exists());
    }
}
