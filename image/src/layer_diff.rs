//! A directory of changes (an overlayfs upper dir, or a tree COPY built) as an OCI layer:
//! overlay whiteouts become `.wh.` entries, opaque directories `.wh..wh..opq`, entries are
//! sorted and timestamps zeroed so equal trees give equal bytes; then gzip with a fixed
//! header (or no compression: the blob is the tar), and both digests the image needs (blob
//! sha256, uncompressed diff_id).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::sha256_stream::Sha256Stream;

/// Files a RUN's runtime bind-mounts over (BuildKit's `/etc/hosts` and `/etc/resolv.conf`).
/// Where the image lacks them the runtime leaves an empty stub in the upper dir, which is not
/// content. The directories it makes for its mounts (`/proc`, `/sys`, `/dev`, `/etc`) are
/// kept, as Docker 20.10's BuildKit keeps them.
const RUNTIME_FILE_MOUNTPOINTS: [&str; 2] = ["etc/hosts", "etc/resolv.conf"];

/// A packed layer: the blob on disk and its digests.
#[derive(Debug, Clone)]
pub struct PackedLayer {
    /// The tar, gzip-compressed or not.
    pub path: PathBuf,
    /// `sha256:` of the blob.
    pub digest: String,
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
    /// Blob size in bytes.
    pub size: u64,
}

/// The OCI media type of gzip layers.
pub const LAYER_MEDIA_TYPE: &str = lcache_proto::wire::GZIP_LAYER_MEDIA_TYPE;

pub use lcache_proto::wire::LayerCompression;

fn collect(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for n in names {
        let r = rel.join(&n);
        let p = dir.join(&n);
        out.push(r.clone());
        if std::fs::symlink_metadata(&p)?.is_dir() {
            collect(&p, &r, out)?;
        }
    }
    Ok(())
}

/// Whether `rel` is a stub the runtime made to mount a file over: empty, absent below.
fn is_runtime_stub(upper: &Path, rel: &Path, lowers: &[PathBuf]) -> bool {
    std::fs::symlink_metadata(upper.join(rel)).is_ok_and(|m| m.is_file() && m.len() == 0)
        && !lowers.iter().any(|l| std::fs::symlink_metadata(l.join(rel)).is_ok())
}

/// Removes the runtime's mount stubs from a RUN's `upper` (before it becomes a snapshot and
/// a layer) so both hold exactly what the step made: those of `/etc/hosts` and
/// `/etc/resolv.conf`, and of the step's own file mounts (`file_mounts`: secrets), as
/// BuildKit removes them.
pub fn remove_runtime_mountpoints(upper: &Path, lowers: &[PathBuf], file_mounts: &[&str]) {
    let Ok(root) = lcache_confine::Root::open(upper) else {
        return;
    };
    let targets = RUNTIME_FILE_MOUNTPOINTS
        .iter()
        .copied()
        .chain(file_mounts.iter().map(|t| t.trim_start_matches('/')));
    for m in targets {
        if is_runtime_stub(upper, Path::new(m), lowers) {
            let _ = root.remove_all(Path::new(m));
        }
    }
}

fn header_for(meta: &std::fs::Metadata, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_mtime(0);
    h.set_size(size);
    h
}

/// Where a layer's tar goes, piece by piece: its own bytes (each entry's header, as the tar
/// crate writes it), each regular file's bytes, and the zeros that pad them and end it. A
/// writer takes them all as bytes; a tar packed by reference (`layer_links`) names the
/// files instead of copying them.
pub trait TarOut {
    /// The tar's own bytes.
    fn own(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// The bytes of `file`, which is at `path` and must be `size` bytes long.
    fn file(&mut self, file: std::fs::File, path: &Path, size: u64) -> std::io::Result<()>;
    /// `n` zero bytes.
    fn zeros(&mut self, n: u64) -> std::io::Result<()>;
}

/// A tar written out whole.
pub struct TarBytes<W>(pub W);

impl<W: Write> TarOut for TarBytes<W> {
    fn own(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all(bytes)
    }

    fn file(&mut self, file: std::fs::File, path: &Path, size: u64) -> std::io::Result<()> {
        use std::io::Read;
        let copied = std::io::copy(&mut file.take(size), &mut self.0)?;
        if copied != size {
            return Err(std::io::Error::other(format!(
                "{} is shorter than it was when listed: it changed while the layer was packed",
                path.display()
            )));
        }
        Ok(())
    }

    fn zeros(&mut self, n: u64) -> std::io::Result<()> {
        use std::io::Read;
        std::io::copy(&mut std::io::repeat(0).take(n), &mut self.0).map(|_| ())
    }
}

/// Headers as the tar crate writes them (long names as GNU extension entries): each entry
/// is appended with no data, so only its header is written, and handed on as own bytes.
pub(crate) struct Headers(tar::Builder<Vec<u8>>);

impl Headers {
    pub(crate) fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    /// An entry without data (a directory, a marker, a device, a FIFO).
    pub(crate) fn empty(&mut self, out: &mut dyn TarOut, h: &mut tar::Header, path: &Path) -> std::io::Result<()> {
        self.0.append_data(h, path, std::io::empty())?;
        out.own(&std::mem::take(self.0.get_mut()))
    }

    /// A link (symbolic or hard) to `target`.
    pub(crate) fn link(
        &mut self,
        out: &mut dyn TarOut,
        h: &mut tar::Header,
        path: &Path,
        target: &Path,
    ) -> std::io::Result<()> {
        self.0.append_link(h, path, target)?;
        out.own(&std::mem::take(self.0.get_mut()))
    }

    /// A regular file's header, its bytes and their padding.
    pub(crate) fn file(
        &mut self,
        out: &mut dyn TarOut,
        h: &mut tar::Header,
        path: &Path,
        (file, at): (std::fs::File, &Path),
        size: u64,
    ) -> std::io::Result<()> {
        self.0.append_data(h, path, std::io::empty())?;
        out.own(&std::mem::take(self.0.get_mut()))?;
        if size > 0 {
            out.file(file, at, size)?;
            out.zeros((512 - size % 512) % 512)?;
        }
        Ok(())
    }
}

/// The zeros that end a tar.
pub(crate) const TAR_END: u64 = 1024;

/// Writes the layer tar of `upper` (uncompressed) to `out`; a RUN's upper has had its
/// runtime stubs removed first ([`remove_runtime_mountpoints`]).
pub fn write_layer_tar(upper: &Path, out: impl Write) -> std::io::Result<()> {
    let mut out = TarBytes(out);
    put_layer_tar(upper, &mut out)?;
    out.0.flush()
}

/// Puts the layer tar of `upper` into `out`, piece by piece.
pub fn put_layer_tar(upper: &Path, out: &mut dyn TarOut) -> std::io::Result<()> {
    let mut paths = Vec::new();
    collect(upper, Path::new(""), &mut paths)?;
    let mut b = Headers::new();
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for rel in paths {
        let full = upper.join(&rel);
        let meta = std::fs::symlink_metadata(&full)?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            // An overlay whiteout: the file below was deleted.
            let name = rel
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let wh = rel.with_file_name(format!(".wh.{name}"));
            let mut h = header_for(&meta, tar::EntryType::Regular, 0);
            h.set_mode(0o644);
            b.empty(out, &mut h, &wh)?;
            continue;
        }
        if ft.is_dir() {
            let mut h = header_for(&meta, tar::EntryType::Directory, 0);
            b.empty(out, &mut h, &rel)?;
            if xattr::get(&full, "trusted.overlay.opaque").ok().flatten().as_deref() == Some(b"y") {
                let mut h = header_for(&meta, tar::EntryType::Regular, 0);
                h.set_mode(0o644);
                b.empty(out, &mut h, &rel.join(".wh..wh..opq"))?;
            }
        } else if ft.is_symlink() {
            let mut h = header_for(&meta, tar::EntryType::Symlink, 0);
            b.link(out, &mut h, &rel, &std::fs::read_link(&full)?)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = inodes.get(&(meta.dev(), meta.ino())) {
                    let mut h = header_for(&meta, tar::EntryType::Link, 0);
                    b.link(out, &mut h, &rel, first)?;
                    continue;
                }
                inodes.insert((meta.dev(), meta.ino()), rel.clone());
            }
            let mut h = header_for(&meta, tar::EntryType::Regular, meta.len());
            b.file(out, &mut h, &rel, (std::fs::File::open(&full)?, &full), meta.len())?;
        } else if ft.is_fifo() {
            let mut h = header_for(&meta, tar::EntryType::Fifo, 0);
            b.empty(out, &mut h, &rel)?;
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            };
            let mut h = header_for(&meta, kind, 0);
            let rdev = meta.rdev();
            h.set_device_major(nix::sys::stat::major(rdev) as u32)?;
            h.set_device_minor(nix::sys::stat::minor(rdev) as u32)?;
            b.empty(out, &mut h, &rel)?;
        }
    }
    out.zeros(TAR_END)
}

/// Packs `upper` into a layer blob at `dest`, compressed as `compression` says.
pub fn pack_layer(upper: &Path, dest: &Path, compression: LayerCompression) -> std::io::Result<PackedLayer> {
    let file = std::fs::File::create(dest)?;
    let blob = Sha256Stream::new(std::io::BufWriter::new(file));
    if compression == LayerCompression::None {
        let mut blob = blob;
        write_layer_tar(upper, &mut blob)?;
        blob.flush()?;
        let (digest, size) = (blob.digest(), blob.len());
        blob.into_inner().into_inner().map_err(|e| e.into_error())?;
        return Ok(PackedLayer {
            path: dest.to_path_buf(),
            diff_id: digest.clone(),
            digest,
            size,
        });
    }
    // A fixed header (no name, mtime 0) keeps equal layers byte-identical.
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(blob, flate2::Compression::fast());
    let mut tar_hash = Sha256Stream::new(gz);
    write_layer_tar(upper, &mut tar_hash)?;
    let diff_id = tar_hash.digest();
    let mut blob = tar_hash.into_inner().finish()?;
    blob.flush()?;
    let (digest, size) = (blob.digest(), blob.len());
    // Not synced: the blob is a work file, streamed to the cache (which makes its own copy
    // durable) and removed; syncing it only wrote it to disk once more.
    blob.into_inner().into_inner().map_err(|e| e.into_error())?;
    Ok(PackedLayer {
        path: dest.to_path_buf(),
        digest,
        diff_id,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer_extract::{extract_layer, Whiteouts};

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("app/bin")).unwrap();
        std::fs::write(root.join("app/bin/run"), "#!/bin/sh\n").unwrap();
        std::fs::write(root.join("app/z"), "z").unwrap();
        std::os::unix::fs::symlink("bin/run", root.join("app/entry")).unwrap();
        std::fs::hard_link(root.join("app/z"), root.join("app/z2")).unwrap();
    }

    #[test]
    fn equal_trees_give_byte_identical_layers_whatever_their_mtimes() {
        let (a, b, out) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        tree(a.path());
        std::thread::sleep(std::time::Duration::from_millis(20));
        tree(b.path());
        let la = pack_layer(a.path(), &out.path().join("a.tgz"), LayerCompression::Gzip).unwrap();
        let lb = pack_layer(b.path(), &out.path().join("b.tgz"), LayerCompression::Gzip).unwrap();
        assert_eq!(la.digest, lb.digest);
        assert_eq!(std::fs::read(&la.path).unwrap(), std::fs::read(&lb.path).unwrap());
    }

    #[test]
    fn an_uncompressed_layer_is_the_tar_the_gzip_one_holds_named_by_its_diff_id() {
        let (a, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        tree(a.path());
        let gz = pack_layer(a.path(), &out.path().join("a.tgz"), LayerCompression::Gzip).unwrap();
        let tar = pack_layer(a.path(), &out.path().join("a.tar"), LayerCompression::None).unwrap();
        assert_eq!((&tar.digest, &tar.diff_id), (&gz.diff_id, &gz.diff_id));
        let mut inflated = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(std::fs::File::open(&gz.path).unwrap()),
            &mut inflated,
        )
        .unwrap();
        assert!(std::fs::read(&tar.path).unwrap() == inflated);
        assert_eq!(tar.size, inflated.len() as u64);
    }

    #[test]
    fn a_layer_round_trips_through_safe_extraction() {
        let (a, out, x) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        tree(a.path());
        let l = pack_layer(a.path(), &out.path().join("a.tgz"), LayerCompression::Gzip).unwrap();
        let gz = flate2::read::MultiGzDecoder::new(std::fs::File::open(&l.path).unwrap());
        extract_layer(gz, x.path(), Whiteouts::Apply, true).unwrap();
        assert_eq!(std::fs::read(x.path().join("app/z2")).unwrap(), b"z");
        assert_eq!(
            std::fs::read_link(x.path().join("app/entry")).unwrap(),
            Path::new("bin/run")
        );
    }

    #[test]
    fn only_the_runtime_file_stubs_absent_below_are_removed() {
        let (up, low) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for d in ["proc", "etc"] {
            std::fs::create_dir(up.path().join(d)).unwrap();
        }
        std::fs::write(up.path().join("etc/hosts"), "").unwrap();
        std::fs::write(up.path().join("etc/resolv.conf"), "").unwrap();
        std::fs::create_dir(low.path().join("etc")).unwrap();
        std::fs::write(low.path().join("etc/resolv.conf"), "nameserver 1.1.1.1\n").unwrap();
        remove_runtime_mountpoints(up.path(), &[low.path().to_path_buf()], &[]);
        assert!(
            !up.path().join("etc/hosts").exists(),
            "a stub over nothing is not content"
        );
        assert!(
            up.path().join("etc/resolv.conf").exists(),
            "an emptied file the image had is the step's change"
        );
        assert!(up.path().join("proc").is_dir(), "Docker keeps the mount directories");
    }

    #[test]
    fn overlay_whiteouts_and_opaque_dirs_become_oci_markers() {
        if !crate::layer_extract::is_root() {
            return; // making 0:0 char devices and trusted xattrs needs root
        }
        let up = tempfile::tempdir().unwrap();
        std::fs::create_dir(up.path().join("etc")).unwrap();
        nix::sys::stat::mknod(
            &up.path().join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        std::fs::create_dir(up.path().join("var")).unwrap();
        xattr::set(up.path().join("var"), "trusted.overlay.opaque", b"y").unwrap();
        let mut tar = Vec::new();
        write_layer_tar(up.path(), &mut tar).unwrap();
        let mut a = tar::Archive::new(&tar[..]);
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["etc", "etc/.wh.gone", "var", "var/.wh..wh..opq"]);
    }

    #[test]
    fn the_tar_put_piece_by_piece_is_the_one_the_tar_crate_writes_whole() {
        let up = tempfile::tempdir().unwrap();
        let long = "l".repeat(150);
        std::fs::create_dir_all(up.path().join("d")).unwrap();
        std::fs::write(up.path().join("d").join(&long), vec![5u8; 1234]).unwrap();
        std::fs::write(up.path().join("d/empty"), b"").unwrap();
        std::fs::write(up.path().join("d/a"), b"x").unwrap();
        std::fs::hard_link(up.path().join("d/a"), up.path().join("d/b")).unwrap();
        std::os::unix::fs::symlink("a", up.path().join("d/s")).unwrap();
        let mut piecewise = Vec::new();
        write_layer_tar(up.path(), &mut piecewise).unwrap();
        // What the tar crate writes for the same entries, each appended whole.
        let mut b = tar::Builder::new(Vec::new());
        let meta = |p: &str| std::fs::symlink_metadata(up.path().join(p)).unwrap();
        let mut h = header_for(&meta("d"), tar::EntryType::Directory, 0);
        b.append_data(&mut h, "d", &[][..]).unwrap();
        let mut h = header_for(&meta("d/a"), tar::EntryType::Regular, 1);
        b.append_data(&mut h, "d/a", &b"x"[..]).unwrap();
        let mut h = header_for(&meta("d/b"), tar::EntryType::Link, 0);
        b.append_link(&mut h, "d/b", "d/a").unwrap();
        let mut h = header_for(&meta("d/empty"), tar::EntryType::Regular, 0);
        b.append_data(&mut h, "d/empty", &[][..]).unwrap();
        let path = format!("d/{long}");
        let mut h = header_for(&meta(&path), tar::EntryType::Regular, 1234);
        b.append_data(&mut h, &path, &vec![5u8; 1234][..]).unwrap();
        let mut h = header_for(&meta("d/s"), tar::EntryType::Symlink, 0);
        b.append_link(&mut h, "d/s", "a").unwrap();
        assert_eq!(piecewise, b.into_inner().unwrap());
    }
}
