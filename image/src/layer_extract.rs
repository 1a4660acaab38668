//! Safe extraction of OCI layer tars, ours, imported or from a shared cache: every write
//! goes through `lcache_confine::Root`, so no entry lands outside the root (`..` and absolute
//! names are refused; symlinks, in the layer or already there, resolve inside the root;
//! hardlinks join only regular files inside it), the expanded size is limited, and device
//! nodes are refused unless the process is root. Whiteouts become
//! overlayfs whiteouts (snapshots) or deletions (applying layers onto a directory).

use std::collections::HashSet;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use lcache_confine::{ConfineError, EntryType, Root};
use nix::sys::stat::SFlag;

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

/// The largest expanded layer accepted, from `LCACHE_MAX_LAYER_SIZE` (bytes; default 64 GiB):
/// a gzip bomb stops with a clear error instead of filling the disk.
pub fn max_layer_size() -> u64 {
    std::env::var("LCACHE_MAX_LAYER_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64 << 30)
}

/// A reader that fails once more than `limit` bytes came through it.
pub struct SizeLimit<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> SizeLimit<R> {
    /// Wraps `inner`, allowing `limit` bytes.
    pub fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            left: limit,
            limit,
        }
    }
}

impl<R: Read> Read for SizeLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::other(format!(
                "the layer expands to more than {} bytes (LCACHE_MAX_LAYER_SIZE) — it may be a decompression bomb; \
                 raise LCACHE_MAX_LAYER_SIZE if the image really is that large",
                self.limit
            ))
        })?;
        Ok(n)
    }
}

/// Extracts an uncompressed layer tar into the directory `root`; see [`extract_into`].
pub fn extract_layer(
    reader: impl Read,
    root: &Path,
    whiteouts: Whiteouts,
    privileged: bool,
) -> Result<usize, LayerError> {
    let root = Root::open(root).map_err(|e| LayerError::Io {
        entry: "(root)".into(),
        source: e.into(),
    })?;
    extract_into(reader, &root, whiteouts, privileged)
}

/// Extracts an uncompressed layer tar beneath `root`; `privileged` (root) allows device
/// nodes and ownership. Every write goes through [`Root`], so symlinks in the layer or
/// already in the root resolve inside it, never on the host.
pub fn extract_into(
    reader: impl Read,
    root: &Root,
    whiteouts: Whiteouts,
    privileged: bool,
) -> Result<usize, LayerError> {
    let mut archive = tar::Archive::new(SizeLimit::new(reader, max_layer_size()));
    let io = |entry: &str| {
        let entry = entry.to_string();
        move |source| LayerError::Io {
            entry: entry.clone(),
            source,
        }
    };
    let confined = |entry: &str| {
        let entry = entry.to_string();
        move |e: ConfineError| match e {
            ConfineError::Refused { reason, .. } => unsafe_entry(&entry, reason),
            other => LayerError::Io {
                entry: entry.clone(),
                source: other.into(),
            },
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
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        root.create_dir_all(&parent, 0o755).map_err(confined(&name))?;
        let file_name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let header = e.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let kind = header.entry_type();
        // Whiteouts: `.wh..wh..opq` marks the parent opaque, `.wh.NAME` hides NAME.
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            if hidden == ".wh..opq" {
                match whiteouts {
                    Whiteouts::Overlay => root
                        .set_dir_xattr(&parent, "trusted.overlay.opaque", b"y")
                        .map_err(confined(&name))?,
                    Whiteouts::Apply => {
                        for child in root.read_dir(&parent).map_err(confined(&name))? {
                            let child = parent.join(child);
                            if !created.contains(&child) {
                                root.remove_all(&child).map_err(confined(&name))?;
                            }
                        }
                    }
                }
            } else {
                if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                    return Err(unsafe_entry(&name, "is a malformed whiteout (it names no entry)"));
                }
                let target = parent.join(hidden);
                root.remove_all(&target).map_err(confined(&name))?;
                if whiteouts == Whiteouts::Overlay {
                    root.mknod(&target, SFlag::S_IFCHR, 0, 0).map_err(confined(&name))?;
                }
            }
            count += 1;
            continue;
        }
        match kind {
            tar::EntryType::Directory => {
                if root.stat(&rel).map_err(confined(&name))?.map(|s| s.kind) != Some(EntryType::Dir) {
                    root.remove_all(&rel).map_err(confined(&name))?;
                    root.create_dir(&rel, mode).map_err(confined(&name))?;
                }
                root.set_mode(&rel, mode).map_err(confined(&name))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                root.remove_all(&rel).map_err(confined(&name))?;
                let mut f = root.create_file(&rel, mode).map_err(confined(&name))?;
                std::io::copy(&mut e, &mut f).map_err(io(&name))?;
            }
            tar::EntryType::Symlink => {
                let target = header
                    .link_name()
                    .map_err(io(&name))?
                    .ok_or_else(|| unsafe_entry(&name, "is a symlink without a target"))?;
                root.remove_all(&rel).map_err(confined(&name))?;
                root.symlink(&target, &rel).map_err(confined(&name))?;
            }
            tar::EntryType::Link => {
                let target = header
                    .link_name()
                    .map_err(io(&name))?
                    .ok_or_else(|| unsafe_entry(&name, "is a hardlink without a target"))?;
                let target_rel =
                    clean(&target).ok_or_else(|| unsafe_entry(&name, "is a hardlink to a path outside the root"))?;
                if target_rel != rel {
                    root.hard_link_from(root, &target_rel, &rel).map_err(|e| match e {
                        ConfineError::Refused { .. } => unsafe_entry(
                            &name,
                            "is a hardlink to something that is not a file in this layer's root",
                        ),
                        other => confined(&name)(other),
                    })?;
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let node = match kind {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                if node != SFlag::S_IFIFO && !privileged {
                    return Err(unsafe_entry(&name, "is a device node, which only root may extract"));
                }
                let dev = nix::sys::stat::makedev(
                    u64::from(header.device_major().ok().flatten().unwrap_or(0)),
                    u64::from(header.device_minor().ok().flatten().unwrap_or(0)),
                );
                root.remove_all(&rel).map_err(confined(&name))?;
                root.mknod(&rel, node, mode, dev).map_err(confined(&name))?;
            }
            // PAX and GNU long-name headers are consumed by the tar reader; anything else
            // (sparse files, vendor types) is not layer content we can represent.
            other => return Err(unsafe_entry(&name, &format!("has unsupported type {other:?}"))),
        }
        if privileged && kind != tar::EntryType::Link {
            let uid = u32::try_from(header.uid().unwrap_or(0)).unwrap_or(0);
            let gid = u32::try_from(header.gid().unwrap_or(0)).unwrap_or(0);
            root.chown(&rel, uid, gid).map_err(confined(&name))?;
            // chown clears setuid/setgid bits; put the mode back (symlinks are skipped).
            root.set_mode(&rel, mode).map_err(confined(&name))?;
        }
        created.insert(rel);
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
    fn writing_through_a_symlink_lands_inside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let root = outside.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let data = tar_of(|b| {
            link(b, tar::EntryType::Symlink, "evil", "..");
            file(b, "evil/escaped", b"x");
            link(b, tar::EntryType::Symlink, "abs", outside.path().to_str().unwrap());
            link(b, tar::EntryType::Symlink, "abs/dir", "/");
        });
        extract_layer(&data[..], &root, Whiteouts::Apply, true).unwrap();
        assert!(!outside.path().join("escaped").exists());
        assert!(!outside.path().join("dir").exists());
        assert_eq!(
            std::fs::read(root.join("escaped")).unwrap(),
            b"x",
            "'..' from the root is the root"
        );
    }

    #[test]
    fn a_hardlink_to_outside_is_refused() {
        let (e, _) = refused(tar_of(|b| {
            link(b, tar::EntryType::Link, "passwd", "../../../etc/passwd")
        }));
        assert!(e.contains("'passwd'") && e.contains("outside the root"), "{e}");
    }

    #[test]
    fn a_hardlink_through_a_symlink_never_reaches_the_host() {
        let (e, _) = refused(tar_of(|b| {
            link(b, tar::EntryType::Symlink, "up", "/etc");
            link(b, tar::EntryType::Link, "passwd", "up/passwd");
        }));
        assert!(e.contains("'passwd'") && e.contains("No such file"), "{e}");
        let (e, _) = refused(tar_of(|b| {
            link(b, tar::EntryType::Symlink, "s", "/etc/passwd");
            link(b, tar::EntryType::Link, "passwd", "s");
        }));
        assert!(e.contains("not a file in this layer's root"), "{e}");
    }

    #[test]
    fn whiteouts_of_dot_and_dot_dot_are_refused_and_remove_nothing() {
        for w in ["dest/.wh...", "dest/.wh..", "dest/.wh."] {
            let outside = tempfile::tempdir().unwrap();
            let root = outside.path().join("root");
            std::fs::create_dir_all(root.join("dest")).unwrap();
            std::fs::write(outside.path().join("keep"), "x").unwrap();
            let e = extract_layer(&tar_of(|b| file(b, w, b""))[..], &root, Whiteouts::Apply, true)
                .unwrap_err()
                .to_string();
            assert!(e.contains("malformed whiteout"), "{w}: {e}");
            assert!(root.join("dest").is_dir() && outside.path().join("keep").exists());
        }
    }

    #[test]
    fn a_whiteout_through_a_symlinked_parent_removes_only_inside() {
        let outside = tempfile::tempdir().unwrap();
        let root = outside.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(outside.path().join("victim"), "x").unwrap();
        let data = tar_of(|b| {
            link(b, tar::EntryType::Symlink, "up", outside.path().to_str().unwrap());
            file(b, "up/.wh.victim", b"");
            link(b, tar::EntryType::Symlink, "dots", "../..");
            file(b, "dots/.wh..wh..opq", b"");
        });
        extract_layer(&data[..], &root, Whiteouts::Apply, true).unwrap();
        assert!(outside.path().join("victim").exists());
    }

    #[test]
    fn a_layer_larger_than_the_limit_stops_with_a_clear_error() {
        let data = tar_of(|b| file(b, "big", &vec![0u8; 64 * 1024]));
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        let mut r = SizeLimit::new(&data[..], 10_000);
        let mut sink = Vec::new();
        let e = std::io::copy(&mut r, &mut sink).unwrap_err().to_string();
        assert!(
            e.contains("decompression bomb") && e.contains("LCACHE_MAX_LAYER_SIZE"),
            "{e}"
        );
        // Within the default limit the same layer extracts.
        assert_eq!(extract_into(&data[..], &root, Whiteouts::Apply, true).unwrap(), 1);
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

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        fn cases() -> u32 {
            std::env::var("LCACHE_FUZZ_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(300)
        }

        fn name() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    Just("a"),
                    Just("b"),
                    Just(".."),
                    Just("."),
                    Just(".wh.a"),
                    Just(".wh.."),
                    Just(".wh..wh..opq"),
                    Just("")
                ],
                1..4,
            )
            .prop_map(|v| v.join("/"))
        }

        #[derive(Debug, Clone)]
        enum Entry {
            File(String),
            Dir(String),
            Symlink(String, String),
            Hardlink(String, String),
        }

        fn entry() -> impl Strategy<Value = Entry> {
            let target = prop_oneof![
                name(),
                name().prop_map(|n| format!("/{n}")),
                Just("OUTSIDE".to_string())
            ];
            prop_oneof![
                name().prop_map(Entry::File),
                name().prop_map(Entry::Dir),
                (name(), target.clone()).prop_map(|(n, t)| Entry::Symlink(n, t)),
                (name(), target).prop_map(|(n, t)| Entry::Hardlink(n, t)),
            ]
        }

        /// A link entry with its target written raw, as a hostile tar may.
        fn raw_link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
            let mut h = header(kind, 0);
            let t = target.as_bytes();
            let l = &mut h.as_old_mut().linkname;
            let n = t.len().min(l.len());
            l[..n].copy_from_slice(&t[..n]);
            raw_path(&mut h, path);
            b.append(&h, &[][..]).unwrap();
        }

        fn state(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
            let mut v = Vec::new();
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let data = std::fs::read(&p).unwrap_or_default();
                v.push((p, data));
            }
            v.sort();
            v
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(cases()))]

            /// Random bytes are an error or a layer, never a panic.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
                let d = tempfile::tempdir().unwrap();
                let _ = extract_layer(&bytes[..], d.path(), Whiteouts::Apply, true);
                let _ = extract_layer(&bytes[..], d.path(), Whiteouts::Overlay, true);
            }

            /// Whatever names, links and whiteouts a hostile layer combines, nothing beside
            /// the root changes.
            #[test]
            fn hostile_entries_never_reach_outside(entries in prop::collection::vec(entry(), 1..10)) {
                let outside = tempfile::tempdir().unwrap();
                std::fs::write(outside.path().join("a"), "keep").unwrap();
                let root = outside.path().join("root");
                std::fs::create_dir(&root).unwrap();
                let host = outside.path().display().to_string();
                let data = tar_of(|b| {
                    for e in &entries {
                        match e {
                            Entry::File(n) => file(b, n, b"pwned"),
                            Entry::Dir(n) => {
                                let mut h = header(tar::EntryType::Directory, 0);
                                raw_path(&mut h, n);
                                b.append(&h, &[][..]).unwrap();
                            }
                            Entry::Symlink(n, t) => raw_link(b, tar::EntryType::Symlink, n, &t.replace("OUTSIDE", &host)),
                            Entry::Hardlink(n, t) => raw_link(b, tar::EntryType::Link, n, &t.replace("OUTSIDE", &host)),
                        }
                    }
                });
                let before = state(outside.path());
                for mode in [Whiteouts::Apply, Whiteouts::Overlay] {
                    let _ = extract_layer(&data[..], &root, mode, true);
                }
                let after: Vec<_> = state(outside.path())
                    .into_iter()
                    .map(|(p, d)| if p == root { (p, vec![]) } else { (p, d) })
                    .collect();
                prop_assert_eq!(after, before);
            }
        }
    }
}
