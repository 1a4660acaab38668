//! A stored blob opened for reading. A blob is stored whole (one file) or, when it was
//! uploaded as parts or as links, as a directory: a `recipe` naming runs of the files beside
//! it, each a hard link to the file it was taken from (an earlier blob, or the bytes that
//! upload sent), and runs of packs. A pack (`blobs/packs/<id>/`) holds a tar layer by
//! reference: hard links to the client's snapshot files and to the file of its headers
//! (`linked_blobs`), listed with each file's size and modification time, which are checked
//! as each file is opened. The links make the file system count the references: removing a
//! blob never takes bytes another blob still reads; a blob that reads a pack holds a link
//! to the pack's manifest, so the manifest's link count says whether any blob still does.
//!
//! A blob's own files are few (`blob_parts::MAX_FILES`) and opened at once: they stay
//! readable whatever happens to their names meanwhile. A pack's files are as many as the
//! layer's (50,000 and more), so they are opened as they are read, one or two at a time.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lcache_proto::wire::BlobParts;
use serde::{Deserialize, Serialize};

/// The file a composed blob's runs are listed in.
pub(crate) const RECIPE: &str = "recipe";

/// The file a pack's files and runs are listed in; blobs that read the pack link it.
pub(crate) const PACK_MANIFEST: &str = "pack";

/// The directory packs are kept in, beside `sha256/`.
pub(crate) const PACKS: &str = "packs";

const CHUNK: u64 = 256 * 1024;

/// What a pack's reader thread reads ahead at a time.
const READ_AHEAD: u64 = 1 << 20;

/// A composed blob's directory listing of runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Recipe {
    /// The runs, in blob order.
    pub runs: Vec<RecipeRun>,
    /// The parts the blob was uploaded as: a tier that holds the same base can be sent
    /// the same parts.
    #[serde(default)]
    pub origin: Option<BlobParts>,
}

/// `len` bytes of the file `file` (beside the recipe) from `offset`; or, with `pack`, of
/// the tar the pack `file` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecipeRun {
    /// A name in the blob's directory, or a pack's id.
    pub file: String,
    /// Where the run starts in it.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
    /// Whether `file` names a pack.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pack: bool,
}

/// What a pack holds: the files linked into it (named by their index) and the runs of them
/// its tar is made of, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PackManifest {
    /// Each file's size and modification time when it was linked.
    pub files: Vec<Stamp>,
    /// The tar, front to back.
    pub runs: Vec<PackRun>,
}

/// A linked file as it was when linked: any write to it since (by whoever holds its other
/// names) changes one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    /// Its size.
    pub size: u64,
    /// Its modification time, seconds.
    pub mtime: i64,
    /// And nanoseconds.
    pub mtime_nsec: i64,
}

impl Stamp {
    /// The stamp of `meta`.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            size: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// A pack run's `file` when it is `len` zero bytes (`LinkedRun::ZEROS`).
pub(crate) const ZEROS: u32 = u32::MAX;

/// `len` bytes of the pack's file `file` from `offset` (zeros with [`ZEROS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PackRun {
    /// The file's index.
    pub file: u32,
    /// Where the run starts in it.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
}

/// Names the store itself gives the files of a composed blob: nothing a recipe says may
/// lead out of its directory.
pub(crate) fn plain_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 16 && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The name of a blob's link to pack `id`'s manifest.
pub(crate) fn pack_link_name(id: &str) -> String {
    format!("p.{id}")
}

/// Where the packs of the blob directory `dir` (in `sha256/`, `tmp/` or `provisional/`)
/// are kept.
pub(crate) fn packs_of(dir: &Path) -> PathBuf {
    dir.parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from(PACKS), |blobs| blobs.join(PACKS))
}

fn damaged(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Opens a file for reading without following a link at its name, without blocking on a
/// FIFO found there (`O_NONBLOCK` changes nothing for a regular file), and without updating
/// its access time where the file system allows it.
pub(crate) fn open_nofollow(path: &Path) -> io::Result<std::fs::File> {
    let open = |flags| std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path);
    let flags = nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK;
    match open(flags | nix::libc::O_NOATIME) {
        // O_NOATIME is for the file's owner (or root) only.
        Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => open(flags),
        other => other,
    }
}

/// A pack, loaded: its directory and manifest, and where each run starts in its tar.
#[derive(Debug)]
pub(crate) struct Pack {
    /// Its id (a plain name).
    pub id: String,
    dir: PathBuf,
    /// The directory, open: its files are opened relative to it (no path walk for each).
    dir_fd: std::fs::File,
    manifest: PackManifest,
    starts: Vec<u64>,
    len: u64,
}

impl Pack {
    /// Loads pack `id` from `packs`; its runs must lie within its files.
    pub fn load(packs: &Path, id: &str) -> io::Result<Self> {
        if !plain_name(id) {
            return Err(damaged(format!("a recipe names the pack '{id}'")));
        }
        let dir = packs.join(id);
        let bytes = std::fs::read(dir.join(PACK_MANIFEST))?;
        let (manifest, _): (PackManifest, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                .map_err(|e| damaged(format!("{}: {e}", dir.join(PACK_MANIFEST).display())))?;
        Self::from_manifest(id, dir, manifest)
    }

    /// A pack of `manifest`, its files in `dir`.
    pub fn from_manifest(id: &str, dir: PathBuf, manifest: PackManifest) -> io::Result<Self> {
        let mut starts = Vec::with_capacity(manifest.runs.len());
        let mut len = 0u64;
        for r in &manifest.runs {
            let size = match r.file {
                ZEROS => Some(u64::MAX),
                k => manifest.files.get(k as usize).map(|s| s.size),
            };
            if size.is_none_or(|size| r.offset.checked_add(r.len).is_none_or(|end| end > size)) {
                return Err(damaged(format!("{}: a run lies outside its file", dir.display())));
            }
            starts.push(len);
            len = len
                .checked_add(r.len)
                .ok_or_else(|| damaged(format!("{}: the runs overflow", dir.display())))?;
        }
        let dir_fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY)
            .open(&dir)?;
        Ok(Self {
            id: id.to_string(),
            dir,
            dir_fd,
            manifest,
            starts,
            len,
        })
    }

    /// Its manifest, which each blob reading the pack links.
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(PACK_MANIFEST)
    }

    /// The tar's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The pack's files' bytes (each counted once, however many runs read it).
    pub fn bytes(&self) -> u64 {
        self.manifest.files.iter().map(|s| s.size).sum()
    }

    /// File `k` opened, checked to be as it was when linked.
    fn open_file(&self, k: u32) -> io::Result<std::fs::File> {
        use nix::fcntl::OFlag;
        let open = |noatime: OFlag| {
            nix::fcntl::openat(
                &self.dir_fd,
                k.to_string().as_str(),
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | noatime,
                nix::sys::stat::Mode::empty(),
            )
        };
        let fd = match open(OFlag::O_NOATIME) {
            // O_NOATIME is for the file's owner (or root) only.
            Err(nix::errno::Errno::EPERM) => open(OFlag::empty()),
            other => other,
        }
        .map_err(io::Error::from)?;
        let file = std::fs::File::from(fd);
        let meta = file.metadata()?;
        let stamp = self.manifest.files.get(k as usize);
        if !meta.is_file() || stamp != Some(&Stamp::of(&meta)) {
            return Err(damaged(format!(
                "{} was changed after it was linked into the store (another name of the file was written)",
                self.dir.join(k.to_string()).display()
            )));
        }
        Ok(file)
    }
}

/// Where a run's bytes are.
#[derive(Clone)]
pub(crate) enum Source {
    /// A file opened with the blob.
    Open {
        /// Where it was opened (for links made from it).
        path: PathBuf,
        /// The open file: it stays readable whatever happens to its name meanwhile.
        file: Arc<std::fs::File>,
    },
    /// A pack's file, opened as it is read; `at` is where the run starts in the pack's tar.
    Linked {
        /// The pack.
        pack: Arc<Pack>,
        /// The file's index in it.
        file: u32,
        /// Where the run starts in the pack's tar.
        at: u64,
    },
}

/// One run of a blob.
#[derive(Clone)]
pub(crate) struct Run {
    /// Its bytes' file.
    pub source: Source,
    /// Where the run starts in it.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
}

/// The pack files opened last, so that reading on through a run does not open it again.
#[derive(Default)]
struct OpenedLinks(Vec<(usize, u32, Arc<std::fs::File>)>);

/// A stored blob's bytes, as runs of files.
pub struct BlobFile {
    pub(crate) runs: Vec<Run>,
    /// Where each run starts in the blob.
    starts: Vec<u64>,
    len: u64,
    /// How it was uploaded, when as parts.
    pub origin: Option<BlobParts>,
    opened: Mutex<OpenedLinks>,
}

impl BlobFile {
    fn of_runs(runs: Vec<Run>, origin: Option<BlobParts>) -> io::Result<Self> {
        let mut starts = Vec::with_capacity(runs.len());
        let mut len = 0u64;
        for r in &runs {
            starts.push(len);
            len = len
                .checked_add(r.len)
                .ok_or_else(|| damaged("a blob's runs overflow".into()))?;
        }
        Ok(Self {
            runs,
            starts,
            len,
            origin,
            opened: Mutex::default(),
        })
    }

    /// Opens what is at `path`: a whole blob's file or a composed blob's directory. `None`
    /// when nothing is there.
    pub(crate) fn open(path: &Path) -> io::Result<Option<Self>> {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if meta.is_file() {
            let file = std::fs::File::open(path)?;
            let len = file.metadata()?.len();
            let run = Run {
                source: Source::Open {
                    path: path.to_path_buf(),
                    file: Arc::new(file),
                },
                offset: 0,
                len,
            };
            return Self::of_runs(vec![run], None).map(Some);
        }
        if !meta.is_dir() {
            return Ok(None);
        }
        let recipe: Recipe = serde_json::from_slice(&std::fs::read(path.join(RECIPE))?)
            .map_err(|e| damaged(format!("{}: {e}", path.join(RECIPE).display())))?;
        Self::from_recipe(path, &recipe).map(Some)
    }

    /// Opens the runs `recipe` lists, in `dir` (a pack's runs as they are read); each must
    /// lie within its file.
    pub(crate) fn from_recipe(dir: &Path, recipe: &Recipe) -> io::Result<Self> {
        let mut opened: HashMap<&str, (Arc<std::fs::File>, u64)> = HashMap::new();
        let mut packs: HashMap<&str, Arc<Pack>> = HashMap::new();
        let mut runs = Vec::with_capacity(recipe.runs.len());
        for r in &recipe.runs {
            if !plain_name(&r.file) {
                return Err(damaged(format!("{}: a run names '{}'", dir.display(), r.file)));
            }
            if r.pack {
                let pack = match packs.get(r.file.as_str()) {
                    Some(p) => p.clone(),
                    None => {
                        let p = Arc::new(Pack::load(&packs_of(dir), &r.file)?);
                        packs.insert(&r.file, p.clone());
                        p
                    }
                };
                if r.offset.checked_add(r.len).is_none_or(|end| end > pack.len()) {
                    return Err(damaged(format!(
                        "{}: a run ends past the end of pack {}",
                        dir.display(),
                        r.file
                    )));
                }
                push_pack_range(&mut runs, &pack, r.offset, r.len);
                continue;
            }
            let (file, size) = match opened.get(r.file.as_str()) {
                Some((f, size)) => (f.clone(), *size),
                None => {
                    let f = std::fs::File::open(dir.join(&r.file))?;
                    let size = f.metadata()?.len();
                    let f = Arc::new(f);
                    opened.insert(&r.file, (f.clone(), size));
                    (f, size)
                }
            };
            if r.offset.checked_add(r.len).is_none_or(|end| end > size) {
                return Err(damaged(format!(
                    "{}: a run ends past the end of {} ({size} bytes)",
                    dir.display(),
                    r.file
                )));
            }
            runs.push(Run {
                source: Source::Open {
                    path: dir.join(&r.file),
                    file,
                },
                offset: r.offset,
                len: r.len,
            });
        }
        Self::of_runs(runs, recipe.origin.clone())
    }

    /// The whole of pack `pack`, as a blob (checked as a linked upload is, before it is
    /// named).
    pub(crate) fn of_pack(pack: Arc<Pack>) -> io::Result<Self> {
        let mut runs = Vec::new();
        let len = pack.len();
        push_pack_range(&mut runs, &pack, 0, len);
        Self::of_runs(runs, None)
    }

    /// The index of the run holding byte `pos` (< the blob's length).
    fn run_at(&self, pos: u64) -> usize {
        self.starts.partition_point(|s| *s <= pos).saturating_sub(1)
    }

    /// Run `i`'s file, open.
    fn file_of(&self, i: usize) -> io::Result<Arc<std::fs::File>> {
        match &self.runs[i].source {
            Source::Open { file, .. } => Ok(file.clone()),
            Source::Linked { pack, file, .. } => {
                let key = Arc::as_ptr(pack) as usize;
                let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(at) = opened.0.iter().position(|(p, k, _)| *p == key && k == file) {
                    // Most recently used last: a tar's headers' file, read between each
                    // member's, stays open however many readers alternate.
                    let hit = opened.0.remove(at);
                    let f = hit.2.clone();
                    opened.0.push(hit);
                    return Ok(f);
                }
                let f = Arc::new(pack.open_file(*file)?);
                if opened.0.len() >= 4 {
                    opened.0.remove(0);
                }
                opened.0.push((key, *file, f.clone()));
                Ok(f)
            }
        }
    }

    /// Reads what follows `pos` into `buf`, up to the end of the run that holds `pos`;
    /// 0 at the blob's end.
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        if pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let i = self.run_at(pos);
        let run = &self.runs[i];
        let within = pos - self.starts[i];
        let n = buf.len().min((run.len - within) as usize);
        if matches!(run.source, Source::Linked { file: ZEROS, .. }) {
            buf[..n].fill(0);
            return Ok(n);
        }
        let read = self.file_of(i)?.read_at(&mut buf[..n], run.offset + within)?;
        if read == 0 {
            // A file shorter than its run: never a short blob that looks whole.
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(read)
    }

    /// Only the bytes at `ranges` (offset, length; in order, within the blob) of the blob.
    pub fn select(&self, ranges: &[(u64, u64)]) -> io::Result<Self> {
        let mut runs = Vec::new();
        for &(offset, n) in ranges {
            let end = offset
                .checked_add(n)
                .filter(|e| *e <= self.len)
                .ok_or_else(|| damaged(format!("a range ends past the blob's {} bytes", self.len)))?;
            if n == 0 {
                continue;
            }
            for i in self.run_at(offset)..self.runs.len() {
                let (run, run_start) = (&self.runs[i], self.starts[i]);
                let run_end = run_start + run.len;
                let (from, to) = (offset.max(run_start), end.min(run_end));
                if from < to {
                    runs.push(run.cut(from - run_start, to - from));
                }
                if run_end >= end {
                    break;
                }
            }
        }
        Self::of_runs(runs, None)
    }

    /// The blob's size.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the blob has no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `buf` with the blob's bytes from `offset` (blocking reads).
    pub fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.read_at(buf, offset)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf = &mut buf[n..];
            offset += n as u64;
        }
        Ok(())
    }

    /// Copies every byte to `out` (blocking reads).
    pub fn copy_to(&self, out: &mut dyn Write) -> io::Result<u64> {
        self.copy_from_to(0, out)
    }

    /// Copies the bytes from `first` on to `out` (blocking reads); returns the blob's length.
    /// A pack's many small files are read on a thread of their own, ahead of `out` (a
    /// hash, mostly): the opens and reads then cost no time beside it.
    pub fn copy_from_to(&self, first: u64, out: &mut dyn Write) -> io::Result<u64> {
        let linked = self.runs.iter().any(|r| matches!(r.source, Source::Linked { .. }));
        if !linked || self.len.saturating_sub(first) < 4 * READ_AHEAD {
            let mut buf = vec![0u8; CHUNK as usize];
            let mut at = first;
            while at < self.len {
                let want = (self.len - at).min(CHUNK) as usize;
                let n = self.fill(&mut buf[..want], at)?;
                out.write_all(&buf[..n])?;
                at += n as u64;
            }
            return Ok(self.len);
        }
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
            // Buffers come back to the reader once written: none is zeroed again.
            let (back, returned) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
            s.spawn(move || {
                let mut at = first;
                while at < self.len {
                    let want = (self.len - at).min(READ_AHEAD) as usize;
                    let mut buf = returned.try_recv().unwrap_or_default();
                    buf.resize(want, 0);
                    let read = self.fill(&mut buf, at).map(|n| {
                        buf.truncate(n);
                        buf
                    });
                    let failed = read.is_err();
                    at += read.as_ref().map_or(0, |b| b.len() as u64);
                    // The receiver gone (`out` failed) or a read failed: stop.
                    if tx.send(read).is_err() || failed {
                        return;
                    }
                }
            });
            for chunk in rx {
                let chunk = chunk?;
                out.write_all(&chunk)?;
                let _ = back.try_send(chunk);
            }
            Ok(self.len)
        })
    }

    /// Fills as much of `buf` as the blob has from `pos` on, across runs; how much.
    fn fill(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], pos + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// The bytes as a stream of chunks, read on the blocking pool. A file shorter than its
    /// run, or a pack's file changed since it was linked, ends the stream with an error
    /// (never a short or wrong blob that looks whole).
    pub fn chunks(self) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
        let blob = Arc::new(self);
        futures_util::stream::unfold(Some(0u64), move |at| {
            let blob = blob.clone();
            async move {
                let pos = at?;
                if pos >= blob.len {
                    return None;
                }
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; (blob.len - pos).min(CHUNK) as usize];
                    let n = blob.fill(&mut buf, pos)?;
                    buf.truncate(n);
                    Ok(Bytes::from(buf))
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
                match read {
                    Ok(b) => {
                        let next = pos + b.len() as u64;
                        Some((Ok(b), Some(next)))
                    }
                    Err(e) => Some((Err(e), None)),
                }
            }
        })
    }
}

impl Run {
    /// `len` bytes of the run from `skip`.
    fn cut(&self, skip: u64, len: u64) -> Run {
        let source = match &self.source {
            Source::Linked { pack, file, at } => Source::Linked {
                pack: pack.clone(),
                file: *file,
                at: at + skip,
            },
            open => open.clone(),
        };
        Run {
            source,
            offset: self.offset + skip,
            len,
        }
    }
}

/// Pushes the runs of `pack` that `[offset, offset + len)` of its tar covers (within it).
fn push_pack_range(runs: &mut Vec<Run>, pack: &Arc<Pack>, offset: u64, len: u64) {
    let end = offset + len;
    let first = pack.starts.partition_point(|s| *s <= offset).saturating_sub(1);
    for (r, start) in pack.manifest.runs.iter().zip(&pack.starts).skip(first) {
        if *start >= end {
            break;
        }
        let (from, to) = (offset.max(*start), end.min(start + r.len));
        if from < to {
            runs.push(Run {
                source: Source::Linked {
                    pack: pack.clone(),
                    file: r.file,
                    at: from,
                },
                offset: r.offset + (from - start),
                len: to - from,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn recipe(runs: &[(&str, u64, u64)]) -> Recipe {
        Recipe {
            runs: runs
                .iter()
                .map(|(f, o, l)| RecipeRun {
                    file: f.to_string(),
                    offset: *o,
                    len: *l,
                    pack: false,
                })
                .collect(),
            origin: None,
        }
    }

    #[tokio::test]
    async fn runs_read_as_one_blob_both_ways() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"0123456789").unwrap();
        std::fs::write(d.path().join("b"), vec![b'x'; 600_000]).unwrap();
        let r = recipe(&[("a", 2, 3), ("b", 0, 600_000), ("a", 9, 1)]);
        std::fs::write(d.path().join(RECIPE), serde_json::to_vec(&r).unwrap()).unwrap();
        let blob = BlobFile::open(d.path()).unwrap().unwrap();
        assert_eq!(blob.len(), 600_004);
        let mut copied = Vec::new();
        blob.copy_to(&mut copied).unwrap();
        let mut expected = b"234".to_vec();
        expected.extend(vec![b'x'; 600_000]);
        expected.push(b'9');
        assert_eq!(copied, expected);
        let streamed: Vec<u8> = blob.chunks().map(|c| c.unwrap().to_vec()).concat().await;
        assert_eq!(streamed, expected);

        let blob = BlobFile::open(d.path()).unwrap().unwrap();
        let picked = blob.select(&[(1, 4), (600_002, 2)]).unwrap();
        let mut out = Vec::new();
        picked.copy_to(&mut out).unwrap();
        assert_eq!(out, b"34xxx9");
        let blob = BlobFile::open(d.path()).unwrap().unwrap();
        // Read at any offset, across runs.
        for (offset, n) in [
            (0usize, 600_004usize),
            (1, 3),
            (2, 5),
            (599_999, 5),
            (600_003, 1),
            (600_004, 0),
        ] {
            let mut buf = vec![0u8; n];
            blob.read_exact_at(&mut buf, offset as u64).unwrap();
            assert_eq!(buf, expected[offset..offset + n], "{offset}+{n}");
        }
        assert!(blob.read_exact_at(&mut [0u8; 2], 600_003).is_err(), "past the end");
        assert!(blob.select(&[(600_000, 5)]).is_err());
    }

    #[tokio::test]
    async fn a_recipe_that_leads_out_or_past_its_files_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"0123").unwrap();
        for bad in [
            recipe(&[("../a", 0, 1)]),
            recipe(&[("a", 3, 2)]),
            recipe(&[("a", u64::MAX, 2)]),
        ] {
            assert!(BlobFile::from_recipe(d.path(), &bad).is_err(), "{bad:?}");
        }
        // A file cut short behind the store's back ends the stream with an error.
        let blob = BlobFile::from_recipe(d.path(), &recipe(&[("a", 0, 4)])).unwrap();
        std::fs::write(d.path().join("a"), b"01").unwrap();
        let chunks: Vec<io::Result<Bytes>> = blob.chunks().collect().await;
        assert!(chunks.iter().any(|c| c.is_err()));
        assert!(BlobFile::open(&d.path().join("missing")).unwrap().is_none());
    }

    /// A pack in `blobs/packs/<id>` of the files `contents`, whose tar is `runs` of them.
    fn make_pack(blobs: &Path, id: &str, contents: &[Vec<u8>], runs: &[(u32, u64, u64)]) {
        let dir = blobs.join(PACKS).join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let mut files = Vec::new();
        for (k, c) in contents.iter().enumerate() {
            let p = dir.join(k.to_string());
            std::fs::write(&p, c).unwrap();
            files.push(Stamp::of(&std::fs::metadata(&p).unwrap()));
        }
        let manifest = PackManifest {
            files,
            runs: runs
                .iter()
                .map(|&(file, offset, len)| PackRun { file, offset, len })
                .collect(),
        };
        let bytes = bincode::serde::encode_to_vec(&manifest, bincode::config::standard()).unwrap();
        std::fs::write(dir.join(PACK_MANIFEST), bytes).unwrap();
    }

    #[tokio::test]
    async fn a_pack_of_thousands_of_files_reads_as_one_blob_opening_them_as_it_goes() {
        // More files than a process may usually hold open at once.
        let blobs = tempfile::tempdir().unwrap();
        let n = 3000u32;
        let mut contents = vec![b"HEADERS!".repeat(n as usize)];
        let mut runs = Vec::new();
        let mut expected = Vec::new();
        for k in 1..=n {
            contents.push(format!("file {k};").into_bytes());
            runs.push((0, u64::from(k - 1) * 8, 8));
            runs.push((k, 0, contents[k as usize].len() as u64));
            expected.extend_from_slice(b"HEADERS!");
            expected.extend_from_slice(&contents[k as usize]);
        }
        make_pack(blobs.path(), "p1", &contents, &runs);
        let dir = blobs.path().join("sha256").join("abc");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("s"), b"<own>").unwrap();
        let total = expected.len() as u64;
        let r = Recipe {
            runs: vec![
                RecipeRun {
                    file: "p1".into(),
                    offset: 0,
                    len: 20,
                    pack: true,
                },
                RecipeRun {
                    file: "s".into(),
                    offset: 0,
                    len: 5,
                    pack: false,
                },
                RecipeRun {
                    file: "p1".into(),
                    offset: 20,
                    len: total - 20,
                    pack: true,
                },
            ],
            origin: None,
        };
        std::fs::write(dir.join(RECIPE), serde_json::to_vec(&r).unwrap()).unwrap();
        let mut want = expected[..20].to_vec();
        want.extend_from_slice(b"<own>");
        want.extend_from_slice(&expected[20..]);

        let blob = BlobFile::open(&dir).unwrap().unwrap();
        assert_eq!(blob.len(), want.len() as u64);
        let mut copied = Vec::new();
        blob.copy_to(&mut copied).unwrap();
        assert_eq!(copied, want);
        let mut mid = vec![0u8; 100];
        blob.read_exact_at(&mut mid, 12_345).unwrap();
        assert_eq!(mid, want[12_345..12_445]);
        let picked = blob.select(&[(10, 30), (20_000, 7)]).unwrap();
        let mut out = Vec::new();
        picked.copy_to(&mut out).unwrap();
        assert_eq!(out, [&want[10..40], &want[20_000..20_007]].concat());
        let streamed: Vec<u8> = BlobFile::open(&dir)
            .unwrap()
            .unwrap()
            .chunks()
            .map(|c| c.unwrap().to_vec())
            .concat()
            .await;
        assert_eq!(streamed, want);
        let whole = BlobFile::of_pack(Arc::new(Pack::load(&blobs.path().join(PACKS), "p1").unwrap())).unwrap();
        let mut out = Vec::new();
        whole.copy_to(&mut out).unwrap();
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn a_pack_file_written_through_another_name_fails_the_read_rather_than_serving_it() {
        let blobs = tempfile::tempdir().unwrap();
        make_pack(
            blobs.path(),
            "p1",
            &[b"hhhh".to_vec(), b"data".to_vec()],
            &[(0, 0, 4), (1, 0, 4)],
        );
        let dir = blobs.path().join("sha256").join("abc");
        std::fs::create_dir_all(&dir).unwrap();
        let r = Recipe {
            runs: vec![RecipeRun {
                file: "p1".into(),
                offset: 0,
                len: 8,
                pack: true,
            }],
            origin: None,
        };
        std::fs::write(dir.join(RECIPE), serde_json::to_vec(&r).unwrap()).unwrap();
        let linked = blobs.path().join(PACKS).join("p1").join("1");
        // The same size, another time: as an editor writing the client's snapshot would.
        let f = std::fs::OpenOptions::new().write(true).open(&linked).unwrap();
        f.write_all_at(b"DATA", 0).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7))
            .unwrap();
        let blob = BlobFile::open(&dir).unwrap().unwrap();
        let e = blob.copy_to(&mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let chunks: Vec<io::Result<Bytes>> = BlobFile::open(&dir).unwrap().unwrap().chunks().collect().await;
        assert!(chunks.iter().any(|c| c.is_err()));
        // A run past the pack's end, or a pack named out of its directory, is refused.
        for bad in [
            RecipeRun {
                file: "p1".into(),
                offset: 4,
                len: 5,
                pack: true,
            },
            RecipeRun {
                file: "..".into(),
                offset: 0,
                len: 1,
                pack: true,
            },
        ] {
            let r = Recipe {
                runs: vec![bad.clone()],
                origin: None,
            };
            assert!(BlobFile::from_recipe(&dir, &r).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_big_pack_read_ahead_on_its_own_thread_is_the_same_bytes_and_stops_at_a_changed_file() {
        let blobs = tempfile::tempdir().unwrap();
        let contents: Vec<Vec<u8>> = (0..20u8).map(|k| vec![k; 512 * 1024 + usize::from(k)]).collect();
        let runs: Vec<(u32, u64, u64)> = (0..20u32).map(|k| (k, 0, contents[k as usize].len() as u64)).collect();
        make_pack(blobs.path(), "big", &contents, &runs);
        let pack = Arc::new(Pack::load(&blobs.path().join(PACKS), "big").unwrap());
        let blob = BlobFile::of_pack(pack.clone()).unwrap();
        assert!(blob.len() > 8 * READ_AHEAD);
        let mut out = Vec::new();
        blob.copy_from_to(3, &mut out).unwrap();
        assert_eq!(out, contents.concat()[3..]);
        // A file changed behind the store: the copy fails, and returns.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(blobs.path().join(PACKS).join("big").join("12"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        let blob = BlobFile::of_pack(Arc::new(Pack::load(&blobs.path().join(PACKS), "big").unwrap())).unwrap();
        let e = blob.copy_to(&mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // `out` failing stops the reader too.
        struct Refuses;
        impl Write for Refuses {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let whole = BlobFile::of_pack(pack).unwrap();
        assert!(whole.copy_to(&mut Refuses).is_err());
    }
}
