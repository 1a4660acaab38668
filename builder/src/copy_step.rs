//! COPY, ADD and WORKDIR without a container: the step's layer is a directory tree built
//! here (the files at their destination, with --chmod/--chown applied), packed like any
//! other layer. Sources are read and the layer written only through `lcache_confine::Root`,
//! so no symlink, from the context or a stage, leads a read or a write outside; every file
//! is hashed as it is copied and the result checked against the key's sources digest.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use lcache_confine::{ConfineError, EntryType, Root};
use nix::sys::stat::SFlag;

use crate::copy_changes::{SourceChange, SourceChanges};
use crate::copy_seed::{CopiedFrom, Holder, LayerDelta, LayerEntries, Placed, Seed};
use lcache_context::context_walk::{entry_at, walk_reads};
use lcache_context::errors::ContextError;
use lcache_proto::build_plan::CopyDef;
use lcache_proto::dockerignore::IgnoreMatcher;
use lcache_proto::source_select::{ContextEntry, EntryKind, SelectedRoot};
use lcache_proto::sources_digest::{file_node_digest, sources_digest_listing};

use lcache_image::layer_extract::{extract_into, Whiteouts};

/// Where a COPY's files come from and go, for `place`.
struct Placement<'a> {
    src: &'a Root,
    layer: &'a Root,
    /// The image the layer goes on, if it can be looked at.
    image: Option<&'a Root>,
    attrs: CopyAttrs,
    add: bool,
    seed: Option<SeedRoots<'a>>,
    /// The layer directory holds only what differs from the seed's base (a delta).
    delta: bool,
    /// Every entry the new layer has, by path.
    entries: LayerEntries,
    /// An ADD unpacked an archive: `entries` does not list what it holds.
    unpacked: bool,
    /// The content BLAKE3 of every file placed, by entry index, as it was read.
    content: HashMap<usize, [u8; 32]>,
}

/// A seed with its directories opened.
struct SeedRoots<'a> {
    seed: &'a Seed,
    base: Root,
    delta: Option<Root>,
}

impl SeedRoots<'_> {
    fn root(&self, h: Holder) -> Option<&Root> {
        match h {
            Holder::Base => Some(&self.base),
            Holder::Delta => self.delta.as_ref(),
        }
    }
}

/// Ownership and mode overrides of a COPY.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyAttrs {
    /// `--chown`, resolved.
    pub owner: Option<(u32, u32)>,
    /// `--chmod`, parsed.
    pub mode: Option<u32>,
}

/// Why a COPY/ADD layer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A write beneath the layer, or a read beneath the source, failed or was refused.
    #[error(transparent)]
    Confined(#[from] ConfineError),
    /// Reading a source or writing the copy failed.
    #[error("cannot copy {path}: {source}")]
    Io {
        /// The source path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// An ADDed archive could not be unpacked.
    #[error("cannot unpack {path}: {source}")]
    Unpack {
        /// The archive's path in the context.
        path: String,
        /// Why.
        source: lcache_image::layer_extract::LayerError,
    },
    /// What was copied is not what the key was made from.
    #[error(
        "the sources changed while the build ran (copied {copied}, the key was made from {keyed}) — \
         nothing was cached; run the build again once the files stop changing"
    )]
    SourcesChanged {
        /// The digest of what was copied.
        copied: String,
        /// The digest in the step's key.
        keyed: String,
    },
    /// A source lcached listed as changed is not, as read, what the key was made from.
    #[error(
        "{path} changed while the build ran — nothing was cached; run the build again once the \
         files stop changing"
    )]
    SourceChanged {
        /// The source's path in the context.
        path: String,
    },
    /// A changed source could not be inspected.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// A COPY option that is not supported.
    #[error("{0}")]
    Unsupported(&'static str),
    /// A directory would go where the image or an earlier source has something else.
    #[error(
        "cannot copy to non-directory: {0} — the image or an earlier source of this COPY has a \
         file or symlink there, and BuildKit refuses to copy a directory onto it too; remove it \
         first (in the RUN that made it) or copy to another path"
    )]
    NotADirectory(String),
    /// `--chmod` is not an octal mode.
    #[error("--chmod={0} is not an octal mode: write e.g. --chmod=755")]
    BadChmod(String),
    /// `--chown` names a user or group the image does not have.
    #[error("--chown: {0}")]
    Owner(#[from] crate::user_lookup::UserError),
    /// The image's files could not be mounted (to resolve the destination and owners).
    #[error("cannot mount the image the step builds on: {0}")]
    ImageView(std::io::Error),
    /// A directory the step needs is a file (or a link to one) in the image.
    #[error(
        "mkdir {0}: not a directory — the image has a file there (or a link to one), and BuildKit \
         fails here too; remove it first (in the RUN that made it) or use another path"
    )]
    FileInTheWay(String),
    /// The entries kept beside an earlier snapshot of the step could not all be read.
    #[error(
        "the entries kept beside snapshot {0} in the client cache are damaged: build once with \
         --no-cache, or remove that snapshot from the client cache"
    )]
    DamagedSeed(String),
}

fn rel_dest(dest: &str) -> PathBuf {
    PathBuf::from(dest.trim_start_matches('/'))
}

/// Sets owner and mode of a placed entry; the owner first, as chown clears setuid bits.
fn finish(layer: &Root, p: &Path, mode: u32, attrs: CopyAttrs) -> Result<(), ConfineError> {
    let (uid, gid) = attrs.owner.unwrap_or((0, 0));
    if lcache_image::layer_extract::is_root() {
        layer.chown(p, uid, gid)?;
    }
    layer.set_mode(p, attrs.mode.unwrap_or(mode))
}

/// A reader that BLAKE3-hashes what passes through it.
struct Blake3Reader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Read for Blake3Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

thread_local! {
    /// The buffer files are copied through: one per thread, not one allocated (and zeroed)
    /// for each of a COPY's files.
    static COPY_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
}

/// Copies `from` into `to`, returning the BLAKE3 of the bytes that went through.
fn copy_hashing(from: impl Read, to: &mut impl Write) -> std::io::Result<[u8; 32]> {
    COPY_BUF.with(|buf| match buf.try_borrow_mut() {
        Ok(mut buf) => copy_hashing_through(from, to, &mut buf),
        // Not re-entered in practice; a buffer of its own then.
        Err(_) => copy_hashing_through(from, to, &mut vec![0u8; 256 * 1024]),
    })
}

fn copy_hashing_through(mut from: impl Read, to: &mut impl Write, buf: &mut [u8]) -> std::io::Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    loop {
        let n = match from.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
    Ok(*hasher.finalize().as_bytes())
}

impl Placement<'_> {
    fn place(&mut self, i: usize, e: &ContextEntry, dest: &Path) -> Result<(), CopyError> {
        let attrs = self.attrs;
        let io = |source| CopyError::Io {
            path: e.path.clone(),
            source,
        };
        match e.kind {
            EntryKind::Dir => {
                self.refuse_non_directory(dest)?;
                let (uid, gid) = attrs.owner.unwrap_or((0, 0));
                let placed = Placed::Dir {
                    mode: attrs.mode.unwrap_or(e.mode),
                    uid,
                    gid,
                };
                if !self.in_base(dest, &placed) {
                    self.delta_parents(dest)?;
                    self.layer.create_dir(dest, 0o755)?;
                    finish(self.layer, dest, e.mode, attrs)?;
                }
                self.entries.insert(key(dest), placed);
            }
            EntryKind::Symlink => {
                let (uid, gid) = attrs.owner.unwrap_or((0, 0));
                let target = e.link_target.clone().unwrap_or_default();
                let placed = Placed::Symlink {
                    target: target.clone(),
                    uid,
                    gid,
                };
                if !self.in_base(dest, &placed) {
                    self.delta_parents(dest)?;
                    self.layer.symlink(Path::new(&target), dest)?;
                    if lcache_image::layer_extract::is_root() {
                        self.layer.chown(dest, uid, gid)?;
                    }
                }
                self.entries.insert(key(dest), placed);
            }
            EntryKind::File => {
                let src = Path::new(&e.path);
                if self.add && is_archive(self.src.open_file(src, false)?) {
                    // ADD unpacks a local tar into the destination directory, confined there,
                    // streamed and hashed on the way (the hash is checked against the key).
                    let target = dest.parent().unwrap_or(Path::new(""));
                    self.layer.create_dir_all(target, 0o755)?;
                    let unpack_root = self.layer.subdir(target)?;
                    let mut hashing = Blake3Reader {
                        inner: self.src.open_file(src, false)?,
                        hasher: blake3::Hasher::new(),
                    };
                    let mut raw = std::io::BufReader::new(&mut hashing);
                    let gz = std::io::BufRead::fill_buf(&mut raw)
                        .map_err(io)?
                        .starts_with(&[0x1f, 0x8b]);
                    let unpacked = if gz {
                        extract_into(
                            flate2::read::MultiGzDecoder::new(&mut raw),
                            &unpack_root,
                            Whiteouts::Apply,
                            false,
                        )
                    } else {
                        extract_into(&mut raw, &unpack_root, Whiteouts::Apply, false)
                    };
                    unpacked.map_err(|source| CopyError::Unpack {
                        path: e.path.clone(),
                        source,
                    })?;
                    // What the tar reader left unread still counts toward the file's hash.
                    std::io::copy(&mut raw, &mut std::io::sink()).map_err(io)?;
                    drop(raw);
                    self.content.insert(i, *hashing.hasher.finalize().as_bytes());
                    self.unpacked = true;
                    return Ok(());
                }
                let rel = key(dest);
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
                    content: [0; 32],
                };
                let content = match self.kept(&rel, &from) {
                    Some((None, c)) => c,
                    kept => {
                        self.delta_parents(dest)?;
                        // Linking shares the inode with the earlier snapshot, which nothing
                        // ever writes in place; mode and owner already match.
                        let linked =
                            kept.and_then(|(root, c)| self.layer.hard_link_from(root?, dest, dest).ok().map(|()| c));
                        match linked {
                            Some(c) => c,
                            None => {
                                let mut out = self.layer.create_file(dest, 0o600)?;
                                let c = copy_hashing(self.src.open_file(src, false)?, &mut out).map_err(io)?;
                                finish(self.layer, dest, e.mode, attrs)?;
                                c
                            }
                        }
                    }
                };
                self.content.insert(i, content);
                self.entries.insert(rel, Placed::File(CopiedFrom { content, ..from }));
            }
        }
        Ok(())
    }

    /// BuildKit copies a directory only onto a directory or nothing: a file or symlink an
    /// earlier source placed at `dest`, or the image has there, fails the COPY.
    fn refuse_non_directory(&self, dest: &Path) -> Result<(), CopyError> {
        let in_image = || {
            self.image
                .and_then(|img| img.stat(dest).ok().flatten())
                .is_some_and(|st| st.kind != EntryType::Dir)
        };
        let other = match self.entries.get(&key(dest)) {
            Some(placed) => !matches!(placed, Placed::Dir { .. }),
            None => in_image(),
        };
        if other {
            return Err(CopyError::NotADirectory(format!("/{}", dest.display())));
        }
        Ok(())
    }

    /// Whether a delta layer need not hold `placed` at `dest`: its base has it already,
    /// and nothing placed earlier in this build (another source's entry at the same path,
    /// a destination directory) is in the delta to cover it.
    fn in_base(&self, dest: &Path, placed: &Placed) -> bool {
        let k = key(dest);
        self.delta
            && !self.entries.contains_key(&k)
            && self.seed.as_ref().and_then(|s| s.seed.base.get(&k)) == Some(placed)
    }

    /// The file the seed has at `rel`, if it was made from the same source with the same
    /// mode and owner: `None` for the root when a delta layer need not hold it (its base
    /// does), else the root to link it from. With its content digest.
    fn kept(&self, rel: &str, from: &CopiedFrom) -> Option<(Option<&Root>, [u8; 32])> {
        let seed = self.seed.as_ref()?;
        if self.delta && !self.entries.contains_key(rel) {
            if let Some(Placed::File(old)) = seed.seed.base.get(rel) {
                if from.same_source(old) {
                    return Some((None, old.content));
                }
            }
        }
        match seed.seed.lookup(rel)? {
            // A delta layer holds only what differs from the base: a file the seed's base
            // has, unchanged, was answered above.
            (Holder::Base, _) if self.delta => None,
            (h, Placed::File(old)) if from.same_source(old) => Some((Some(seed.root(h)?), old.content)),
            _ => None,
        }
    }

    /// In a delta layer, creates the directories above `dest` that the layer lacks, with
    /// the mode and owner the new layer gives them (its base has them already; the
    /// overlay shows the topmost directory's).
    fn delta_parents(&self, dest: &Path) -> Result<(), ConfineError> {
        if !self.delta {
            return Ok(());
        }
        let Some(parent) = dest.parent() else {
            return Ok(());
        };
        let mut at = PathBuf::new();
        for c in parent.components() {
            at.push(c);
            if self.layer.stat(&at)?.is_some() {
                continue;
            }
            let k = key(&at);
            let known = self
                .entries
                .get(&k)
                .or_else(|| self.seed.as_ref().and_then(|s| s.seed.lookup(&k)).map(|(_, p)| p));
            let (mode, uid, gid) = match known {
                Some(Placed::Dir { mode, uid, gid }) => (*mode, *uid, *gid),
                _ => (0o755, 0, 0),
            };
            self.layer.create_dir(&at, mode)?;
            if lcache_image::layer_extract::is_root() {
                self.layer.chown(&at, uid, gid)?;
            }
            self.layer.set_mode(&at, mode)?;
        }
        Ok(())
    }

    /// Whites out, in a delta layer, those of `candidates` the base has and the new layer
    /// (`entries`, whole) does not; returns those paths, sorted. A path beneath one that is
    /// whited out or replaced needs none.
    fn white_out_removed<'k>(&self, candidates: impl Iterator<Item = &'k String>) -> Result<Vec<String>, ConfineError> {
        self.white_out_removed_in(candidates, &|k| self.entries.get(k))
    }

    /// [`Placement::white_out_removed`], where the layer's entry at a path is what
    /// `layer` says (the placed entries are not all of them when the rest is the seed's).
    fn white_out_removed_in<'k, 'l>(
        &self,
        candidates: impl Iterator<Item = &'k String>,
        layer: &dyn Fn(&str) -> Option<&'l Placed>,
    ) -> Result<Vec<String>, ConfineError> {
        let Some(seed) = self.seed.as_ref().filter(|_| self.delta) else {
            return Ok(Vec::new());
        };
        let mut removed: Vec<String> = candidates
            .filter(|k| seed.seed.base.contains_key(k) && layer(k).is_none())
            .cloned()
            .collect();
        removed.sort();
        removed.dedup();
        for r in &removed {
            let path = Path::new(r);
            let under_dirs = path
                .ancestors()
                .skip(1)
                .filter(|a| !a.as_os_str().is_empty())
                .all(|a| matches!(layer(&key(a)), Some(Placed::Dir { .. })));
            if under_dirs {
                self.delta_parents(path)?;
                self.layer.mknod(path, SFlag::S_IFCHR, 0, 0)?;
            }
        }
        Ok(removed)
    }
}

impl Placement<'_> {
    /// Puts `placed`, an entry of the seed's own delta that this build leaves as it was,
    /// in the new delta: a file is linked from the seed's tree (copied if it cannot be).
    fn carry(&mut self, k: &str, placed: &Placed) -> Result<(), CopyError> {
        let path = Path::new(k);
        self.delta_parents(path)?;
        let root = is_root();
        match placed {
            Placed::File(f) => {
                let Some(from) = self.seed.as_ref().and_then(|s| s.delta.as_ref()) else {
                    return Err(CopyError::Unsupported("a carried file without the seed's delta"));
                };
                if self.layer.hard_link_from(from, path, path).is_err() {
                    let mut out = self.layer.create_file(path, 0o600)?;
                    std::io::copy(&mut from.open_file(path, false)?, &mut out).map_err(|source| CopyError::Io {
                        path: k.to_string(),
                        source,
                    })?;
                    if root {
                        self.layer.chown(path, f.uid, f.gid)?;
                    }
                    self.layer.set_mode(path, f.mode)?;
                }
            }
            Placed::Dir { mode, uid, gid } => {
                self.layer.create_dir(path, *mode)?;
                if root {
                    self.layer.chown(path, *uid, *gid)?;
                }
                self.layer.set_mode(path, *mode)?;
            }
            Placed::Symlink { target, uid, gid } => {
                self.layer.symlink(Path::new(target), path)?;
                if root {
                    self.layer.chown(path, *uid, *gid)?;
                }
            }
        }
        self.entries.insert(k.to_string(), placed.clone());
        Ok(())
    }
}

fn is_root() -> bool {
    lcache_image::layer_extract::is_root()
}

/// An entry's key in a layer's entries: its path inside the layer.
fn key(p: &Path) -> String {
    p.display().to_string()
}

fn is_archive(mut f: std::fs::File) -> bool {
    use std::io::{Seek, SeekFrom};
    let mut head = Vec::new();
    if (&mut f).take(512).read_to_end(&mut head).is_err() {
        return false;
    }
    let tar_magic = |b: &[u8]| b.len() > 262 && &b[257..262] == b"ustar";
    if head.starts_with(&[0x1f, 0x8b]) {
        let mut inner = Vec::new();
        if f.seek(SeekFrom::Start(0)).is_err() {
            return false;
        }
        let _ = flate2::read::MultiGzDecoder::new(f).take(512).read_to_end(&mut inner);
        return tar_magic(&inner);
    }
    tar_magic(&head)
}

/// A COPY to build: its definition, where its sources are, and what its key was made from.
pub struct CopyJob<'a> {
    /// The instruction.
    pub def: &'a CopyDef,
    /// The directory the sources are read beneath (the context or a stage's files).
    pub src_root: &'a Path,
    /// The entries selected from.
    pub entries: &'a [ContextEntry],
    /// What the sources selected.
    pub roots: &'a [SelectedRoot],
    /// `--chown`/`--chmod`.
    pub attrs: CopyAttrs,
    /// The sources digest in the step's key; what is copied must match it.
    pub keyed_digest: &'a str,
    /// The image the layer goes on (a read-only view): the destination is resolved through
    /// its symlinks, and the directories it has keep their mode and owner.
    pub image: Option<&'a Path>,
}

/// Creates `dir` and its missing parents in the layer: those the image has keep its mode
/// and owner (Docker leaves existing directories as they are, `/tmp`'s 1777 included); new
/// ones are 0755 and owned by `owner` (`--chown`'s, or WORKDIR's USER, as in BuildKit).
/// Returns what it created, as layer entries.
fn make_dirs(
    layer: &Root,
    image: Option<&Root>,
    dir: &Path,
    owner: (u32, u32),
) -> Result<Vec<(String, Placed)>, CopyError> {
    let mut made = Vec::new();
    let mut at = PathBuf::new();
    for c in dir.components() {
        at.push(c);
        if layer.stat(&at)?.is_some() {
            continue;
        }
        let existing = image.and_then(|img| img.stat(&at).ok().flatten());
        // BuildKit's mkdir fails on anything but a directory (`dir` is resolved through
        // the image's links already): no directory is made over an image's file.
        if existing.as_ref().is_some_and(|st| st.kind != EntryType::Dir) {
            return Err(CopyError::FileInTheWay(format!("/{}", key(&at))));
        }
        let existing = existing.filter(|st| st.kind == EntryType::Dir);
        let (mode, uid, gid) = existing.map_or((0o755, owner.0, owner.1), |st| (st.mode, st.uid, st.gid));
        layer.create_dir(&at, mode)?;
        if lcache_image::layer_extract::is_root() {
            layer.chown(&at, uid, gid)?;
        }
        layer.set_mode(&at, mode)?;
        made.push((key(&at), Placed::Dir { mode, uid, gid }));
    }
    Ok(made)
}

/// The destination as the image resolves it: through its symlinks (`/data/` where the
/// image has `/data -> /var/data` is `var/data`); a file's own name is never followed.
fn resolve_dest(image: Option<&Root>, dest: &Path, into_dir: bool) -> Result<PathBuf, ConfineError> {
    let Some(img) = image else {
        return Ok(dest.to_path_buf());
    };
    if into_dir {
        return img.resolve_path(dest);
    }
    match (dest.parent(), dest.file_name()) {
        (Some(parent), Some(name)) => Ok(img.resolve_path(parent)?.join(name)),
        _ => Ok(dest.to_path_buf()),
    }
}

/// What a COPY layer directory holds, as `build_copy_layer` made it.
#[derive(Debug)]
pub struct CopyLayer {
    /// Every entry of the layer, when all are known (not after an ADD unpacked an archive,
    /// nor with inline files: such a layer is packed from its directory and seeds nothing).
    pub entries: Option<LayerEntries>,
    /// The whole snapshot the seed is or goes over (blob digest, directory).
    pub seed_base: Option<(String, PathBuf)>,
    /// Set when the directory holds only what differs from `seed_base` (and whiteouts).
    pub delta: Option<LayerDelta>,
    /// The seed layer's blob digest and its segment index's path: the pack takes the
    /// unchanged segments from that blob.
    pub reuse: Option<(String, PathBuf)>,
    /// Set when the layer is its seed's base with `delta` applied, and `entries` is not
    /// kept (built from lcached's list of changes): see [`CopyLayer::entries_over`].
    pub over_seed: bool,
}

impl CopyLayer {
    /// Every entry of the layer: `entries`, or for a layer kept only as its delta over
    /// `seed`'s base, that base with the delta applied.
    pub fn entries_over(&self, seed: &Seed) -> Option<LayerEntries> {
        if let Some(e) = &self.entries {
            return Some(e.clone());
        }
        let d = self.delta.as_ref().filter(|_| self.over_seed)?;
        let mut all = seed.base.to_map();
        for r in &d.removed {
            all.remove(r);
        }
        all.extend(d.changed.iter().map(|(k, v)| (k.clone(), v.clone())));
        (!seed.base.damaged()).then_some(all)
    }

    /// Whether the layer's file at `path` is in the seed's whole snapshot, not in the
    /// layer's own directory (which, as a delta, holds only what changed).
    pub fn from_base(&self, path: &str) -> bool {
        matches!((&self.delta, &self.seed_base), (Some(d), Some(_)) if !d.changed.contains_key(path))
    }
}

/// A seed's delta past this many entries (and a quarter of its base) is not built on: the
/// next build makes the layer whole again, so deltas stay small and never stack.
pub const DELTA_REBASE_AT: usize = 1024;

/// Whether a delta may be made over `seed`'s base: only as root (whiteouts are device
/// nodes), and while the seed's own delta is small.
fn builds_on(seed: &Seed) -> bool {
    lcache_image::layer_extract::is_root() && seed.delta_len() <= DELTA_REBASE_AT.max(seed.base.len() / 4)
}

/// Builds the layer of a COPY/ADD into the directory `layer`. With a `seed` (an earlier
/// layer of the same step), unchanged files are not copied again: as root the layer is
/// made a delta over the seed's whole snapshot (only what changed, and whiteouts), else
/// unchanged files are linked from it. Fails, storing nothing, when what it read is not
/// what the key was made from.
pub fn build_copy_layer(layer: &Path, job: &CopyJob, seed: Option<&Seed>) -> Result<CopyLayer, CopyError> {
    let def = job.def;
    if def.parents {
        return Err(CopyError::Unsupported(
            "COPY --parents is not supported yet: copy each directory with its own COPY",
        ));
    }
    // An ADD may unpack an archive, whose entries are not tracked: it is never a delta.
    let complete = !def.add && def.inline.is_empty();
    let layer = Root::open(layer)?;
    let src = Root::open(job.src_root)?;
    let seed = match seed {
        Some(s) => Some(SeedRoots {
            seed: s,
            base: Root::open(&s.base_dir)?,
            delta: s.delta.as_ref().map(|(d, _)| Root::open(d)).transpose()?,
        }),
        None => None,
    };
    // Whiteouts are device nodes: only root makes them.
    let delta = complete && seed.as_ref().is_some_and(|s| builds_on(s.seed));
    let image = job.image.map(Root::open).transpose()?;
    let mut p = Placement {
        src: &src,
        layer: &layer,
        image: image.as_ref(),
        attrs: job.attrs,
        add: def.add,
        seed,
        delta,
        entries: HashMap::new(),
        unpacked: false,
        content: HashMap::new(),
    };
    let entries = job.entries;
    let roots = job.roots;
    let sources = roots.len() + def.inline.len();
    let into_dir = def.dest.ends_with('/')
        || sources > 1
        || roots
            .iter()
            .any(|r| r.entry.is_none_or(|i| entries[i].kind == EntryKind::Dir));
    let dest = resolve_dest(image.as_ref(), &rel_dest(&def.dest), into_dir)?;
    let new_owner = job.attrs.owner.unwrap_or((0, 0));
    let dir = if into_dir { Some(dest.as_path()) } else { dest.parent() };
    if let Some(dir) = dir {
        p.entries.extend(make_dirs(&layer, image.as_ref(), dir, new_owner)?);
    }
    for r in roots {
        match r.entry {
            Some(i) if entries[i].kind != EntryKind::Dir => {
                // Named as the source was written: a followed link keeps its own name.
                let name = Path::new(&r.path).file_name().map(PathBuf::from).unwrap_or_default();
                let target = if into_dir { dest.join(name) } else { dest.clone() };
                p.place(i, &entries[i], &target)?;
            }
            _ => {
                for (i, rel) in r.member_paths(entries) {
                    p.place(i, &entries[i], &dest.join(rel))?;
                }
            }
        }
    }
    if !roots.is_empty() {
        // Only the digest is compared: describing every file for a listing nobody reads
        // was a third of this check at 200,000 files.
        let content = |i| p.content.get(&i).copied().unwrap_or_default();
        let copied = sources_digest_listing(entries, roots, &content, 0).digest;
        if copied != job.keyed_digest {
            return Err(CopyError::SourcesChanged {
                copied,
                keyed: job.keyed_digest.to_string(),
            });
        }
    }
    for f in &def.inline {
        let target = if into_dir { dest.join(&f.name) } else { dest.clone() };
        layer.write_file(&target, f.content.as_bytes(), 0o644)?;
        finish(&layer, &target, 0o644, job.attrs)?;
    }
    let base = p.seed.as_ref().map(|s| s.seed);
    let removed = p.white_out_removed(base.iter().flat_map(|s| s.base.keys()))?;
    let seed_base = p
        .seed
        .as_ref()
        .map(|s| (s.seed.base_digest.clone(), s.seed.base_dir.clone()));
    let delta = match (&p.seed, p.delta) {
        (Some(s), true) => Some(LayerDelta {
            changed: p
                .entries
                .iter()
                .filter(|(k, v)| s.seed.base.get(k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            removed,
        }),
        _ => None,
    };
    if let Some(s) = p.seed.as_ref().filter(|s| s.seed.base.damaged()) {
        return Err(CopyError::DamagedSeed(s.seed.base_digest.clone()));
    }
    let reuse = p.seed.as_ref().map(|s| s.seed.blob.clone());
    Ok(CopyLayer {
        entries: (!p.unpacked && def.inline.is_empty()).then_some(p.entries),
        seed_base,
        delta,
        reuse,
        over_seed: false,
    })
}

/// A re-run COPY of one directory from the context, to build from its seed and the
/// changes since (`build_copy_changes`).
pub struct ChangeJob<'a> {
    /// The instruction.
    pub def: &'a CopyDef,
    /// The context.
    pub context: &'a Path,
    /// What differs between the seed's sources and this build's, as lcached lists it.
    pub changes: &'a SourceChanges,
    /// `--chown`/`--chmod`.
    pub attrs: CopyAttrs,
    /// The image the layer goes on (a read-only view).
    pub image: Option<&'a Path>,
}

/// The sources digest to ask lcached's changes from, when the COPY `def` may be built from
/// `seed` and those changes alone: a plain COPY of one source, over a seed of the same step
/// on the same parent that a delta may be made over.
pub fn changes_from<'s>(def: &CopyDef, seed: &'s Seed) -> Option<&'s str> {
    let plain = !def.add && !def.parents && def.inline.is_empty() && def.sources.len() == 1;
    if plain && builds_on(seed) {
        seed.sources_before.as_deref()
    } else {
        None
    }
}

/// Builds a re-run COPY's layer into `layer` from its `seed` and lcached's list of what
/// changed since (`job.changes`): only the changed entries are read, placed (a delta over
/// the seed's whole snapshot, as `build_copy_layer` makes one) and checked, each against the
/// digest lcached's listing gives it; the rest is the seed's, made from the same sources.
/// `None`, having written nothing, when the copied directory is not a directory here.
pub fn build_copy_changes(layer: &Path, job: &ChangeJob, seed: &Seed) -> Result<Option<CopyLayer>, CopyError> {
    let changes = job.changes;
    // Through a symlink (the source itself or a directory above it), the listed entries'
    // paths are not where they lie in the context: the whole way below handles that.
    let root = if changes.root == "." { "" } else { changes.root.as_str() };
    if !walk_reads(job.context, root, &IgnoreMatcher::default()) {
        return Ok(None);
    }
    let layer = Root::open(layer)?;
    let src = Root::open(job.context)?;
    let image = job.image.map(Root::open).transpose()?;
    let dest = resolve_dest(image.as_ref(), &rel_dest(&job.def.dest), true)?;
    let mut p = Placement {
        src: &src,
        layer: &layer,
        image: image.as_ref(),
        attrs: job.attrs,
        add: false,
        seed: Some(SeedRoots {
            seed,
            base: Root::open(&seed.base_dir)?,
            delta: seed.delta.as_ref().map(|(d, _)| Root::open(d)).transpose()?,
        }),
        delta: true,
        entries: HashMap::new(),
        unpacked: false,
        content: HashMap::new(),
    };
    p.entries.extend(make_dirs(
        &layer,
        image.as_ref(),
        &dest,
        job.attrs.owner.unwrap_or((0, 0)),
    )?);
    let at = |rel: &str| key(&dest.join(rel));
    let mut gone = HashSet::new();
    for (i, c) in changes.changes.iter().enumerate() {
        let want = match c {
            SourceChange::Gone(rel) => {
                gone.insert(at(rel));
                continue;
            }
            SourceChange::Put(want) => want,
        };
        let path = changes.context_path(&want.path);
        let changed = || CopyError::SourceChanged { path: path.clone() };
        let e = entry_at(job.context, &path)?.ok_or_else(changed)?;
        let as_listed = e.kind == want.kind
            && match e.kind {
                EntryKind::Symlink => e.link_target.as_deref() == Some(want.digest.as_str()),
                _ => e.mode == want.mode,
            };
        if !as_listed {
            return Err(changed());
        }
        p.place(i, &e, &dest.join(&want.path))?;
        if e.kind == EntryKind::File
            && p.content.get(&i).map(|c| file_node_digest(e.mode, c)) != Some(want.digest.clone())
        {
            return Err(changed());
        }
    }
    // What the seed's own delta holds and this build leaves as it was stays in the delta.
    if let Some((_, d)) = &seed.delta {
        let mut kept: Vec<(&String, &Placed)> = d
            .changed
            .iter()
            .filter(|(k, _)| !p.entries.contains_key(*k) && !gone.contains(*k))
            .collect();
        kept.sort_by(|a, b| a.0.cmp(b.0));
        for (k, placed) in kept {
            p.carry(k, placed)?;
        }
    }
    let changed: LayerEntries = p
        .entries
        .iter()
        .filter(|(k, v)| seed.base.get(k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // The layer is the seed's, less what is gone, with what was placed now: never made
    // whole here (at 200,000 files that alone took longer than the rest of the step).
    let seed_removed: HashSet<&str> = seed
        .delta
        .iter()
        .flat_map(|(_, d)| d.removed.iter().map(String::as_str))
        .collect();
    let placed = &p.entries;
    let in_layer = |k: &str| layer_entry(placed, &gone, &seed_removed, seed, k);
    let candidates: Vec<&String> = gone
        .iter()
        .chain(seed.delta.iter().flat_map(|(_, d)| &d.removed))
        .collect();
    let removed = p.white_out_removed_in(candidates.into_iter(), &in_layer)?;
    if seed.base.damaged() {
        return Err(CopyError::DamagedSeed(seed.base_digest.clone()));
    }
    Ok(Some(CopyLayer {
        entries: None,
        seed_base: Some((seed.base_digest.clone(), seed.base_dir.clone())),
        delta: Some(LayerDelta { changed, removed }),
        reuse: Some(seed.blob.clone()),
        over_seed: true,
    }))
}

/// The entry at `k` of a layer that is `seed`'s base with `placed` put over it and `gone`
/// and what the seed's own delta removed (`seed_removed`) taken away.
fn layer_entry<'l>(
    placed: &'l LayerEntries,
    gone: &HashSet<String>,
    seed_removed: &HashSet<&str>,
    seed: &'l Seed,
    k: &str,
) -> Option<&'l Placed> {
    match placed.get(k) {
        Some(e) => Some(e),
        None if gone.contains(k) || seed_removed.contains(k) => None,
        None => seed.base.get(k),
    }
}

/// Builds the layer of a WORKDIR on `image`: the directory (resolved through the image's
/// symlinks) and its missing parents, owned by `owner` (the USER in effect).
pub fn build_workdir_layer(layer: &Path, path: &str, image: Option<&Path>, owner: (u32, u32)) -> Result<(), CopyError> {
    let image = image.map(Root::open).transpose()?;
    let dir = resolve_dest(image.as_ref(), &rel_dest(path), true)?;
    make_dirs(&Root::open(layer)?, image.as_ref(), &dir, owner)?;
    Ok(())
}

/// Parses a `--chmod` value (octal).
pub fn parse_chmod(v: &str) -> Result<Option<u32>, CopyError> {
    if v.is_empty() {
        return Ok(None);
    }
    u32::from_str_radix(v, 8)
        .map(Some)
        .map_err(|_| CopyError::BadChmod(v.to_string()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use lcache_context::local_context::LocalContext;
    use lcache_proto::dockerignore::IgnoreMatcher;
    use lcache_proto::source_select::select;

    use super::*;

    fn context() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("src/sub")).unwrap();
        std::fs::write(d.path().join("src/a.txt"), "alpha").unwrap();
        std::fs::write(d.path().join("src/sub/run.sh"), "#!/bin/sh").unwrap();
        std::fs::set_permissions(d.path().join("src/sub/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a.txt", d.path().join("src/link")).unwrap();
        d
    }

    /// Builds `def` from `ctx` into a new layer directory; the key's digest is what the
    /// context holds now unless `keyed` says otherwise.
    fn copy(
        ctx: &Path,
        def: &CopyDef,
        attrs: CopyAttrs,
        keyed: Option<&str>,
        seed: Option<&Seed>,
    ) -> (tempfile::TempDir, Result<CopyLayer, CopyError>) {
        let mut local = LocalContext::walk(ctx).unwrap();
        let digest = local.digest_sources(def).unwrap().digest;
        let roots = select(local.entries(), &def.sources, &IgnoreMatcher::default()).unwrap();
        let layer = tempfile::tempdir().unwrap();
        let job = CopyJob {
            def,
            src_root: ctx,
            entries: local.entries(),
            roots: &roots,
            attrs,
            keyed_digest: keyed.unwrap_or(&digest),
            image: None,
        };
        let r = build_copy_layer(layer.path(), &job, seed);
        (layer, r)
    }

    #[test]
    fn a_directory_copies_its_contents_with_modes_and_links_kept() {
        let ctx = context();
        let (layer, r) = copy(
            ctx.path(),
            &CopyDef::from_context(&["src"], "/app/"),
            CopyAttrs::default(),
            None,
            None,
        );
        r.unwrap();
        let l = layer.path();
        assert_eq!(std::fs::read_to_string(l.join("app/a.txt")).unwrap(), "alpha");
        assert_eq!(
            std::fs::metadata(l.join("app/sub/run.sh")).unwrap().mode() & 0o777,
            0o755
        );
        assert_eq!(std::fs::read_link(l.join("app/link")).unwrap(), Path::new("a.txt"));
        assert!(!l.join("app/src").exists(), "a directory source copies its contents");
    }

    #[test]
    fn one_file_to_a_path_without_a_slash_is_named_by_the_destination_and_chmod_applies() {
        let ctx = context();
        let attrs = CopyAttrs {
            owner: None,
            mode: Some(0o600),
        };
        let (layer, r) = copy(
            ctx.path(),
            &CopyDef::from_context(&["src/a.txt"], "/etc/app.conf"),
            attrs,
            None,
            None,
        );
        r.unwrap();
        let m = std::fs::metadata(layer.path().join("etc/app.conf")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
    }

    #[test]
    fn content_that_differs_from_the_keyed_digest_fails_and_says_what_to_do() {
        let ctx = context();
        let def = CopyDef::from_context(&["src"], "/app/");
        let (_, r) = copy(ctx.path(), &def, CopyAttrs::default(), Some("not-what-was-keyed"), None);
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("sources changed while the build ran") && e.contains("run the build again"),
            "{e}"
        );
    }

    /// Keeps the layer built in `dir` as a whole snapshot in a new cache and loads it as a
    /// seed: (cache, its digest, the snapshot, the seed).
    fn seed_of(dir: tempfile::TempDir, entries: &LayerEntries) -> (tempfile::TempDir, String, PathBuf, Seed) {
        let cache_root = tempfile::tempdir().unwrap();
        let cache = crate::cache_dir::CacheDir::open(cache_root.path()).unwrap();
        let digest = format!("sha256:{}", "1".repeat(64));
        let snap = cache.snapshot(&digest);
        std::fs::rename(dir.path(), &snap).unwrap();
        crate::copy_seed::save_entries(&snap, entries).unwrap();
        let seed = Seed::load(&cache, &digest).unwrap();
        (cache_root, digest, snap, seed)
    }

    #[test]
    fn a_rebuild_from_listed_changes_reads_only_them_and_refuses_one_that_is_not_as_listed() {
        use lcache_proto::sources_digest::SummaryEntry;
        let ctx = context();
        let def = CopyDef::from_context(&["src"], "/app/");
        let (first, r) = copy(ctx.path(), &def, CopyAttrs::default(), None, None);
        let entries = r.unwrap().entries.unwrap();
        let (_cache, _, _, seed) = seed_of(first, &entries);
        std::fs::write(ctx.path().join("src/a.txt"), "edited").unwrap();
        let listed = |content: &str| SourceChanges {
            root: "src".into(),
            changes: vec![SourceChange::Put(SummaryEntry {
                path: "a.txt".into(),
                kind: EntryKind::File,
                mode: 0o644,
                digest: file_node_digest(0o644, blake3::hash(content.as_bytes()).as_bytes()),
                expanded: false,
            })],
        };
        let build = |changes: &SourceChanges| {
            let layer = tempfile::tempdir().unwrap();
            let job = ChangeJob {
                def: &def,
                context: ctx.path(),
                changes,
                attrs: CopyAttrs::default(),
                image: None,
            };
            let r = build_copy_changes(layer.path(), &job, &seed);
            (layer, r)
        };

        let (layer, r) = build(&listed("edited"));
        let built = r.unwrap().expect("src is a directory");
        let all = built.entries_over(&seed).expect("the layer over its seed");
        assert!(built.entries.is_none(), "the whole layer is not made, only its delta");
        let delta = built.delta.expect("a delta over the seed");
        assert_eq!(delta.changed.keys().collect::<Vec<_>>(), ["app/a.txt"]);
        assert_eq!(
            std::fs::read_to_string(layer.path().join("app/a.txt")).unwrap(),
            "edited"
        );
        assert!(
            !layer.path().join("app/sub/run.sh").exists(),
            "unchanged files are not read"
        );
        assert_eq!(all.len(), entries.len(), "the whole layer's entries");

        let (_, r) = build(&listed("what lcached saw before the edit"));
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("src/a.txt changed while the build ran") && e.contains("run the build again"),
            "{e}"
        );
    }

    #[test]
    fn a_directory_onto_a_file_or_symlink_fails_as_in_buildkit() {
        // An earlier source placed a symlink where the next one has a directory.
        let ctx = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(ctx.path().join("a")).unwrap();
        std::os::unix::fs::symlink("/etc", ctx.path().join("a/x")).unwrap();
        std::fs::create_dir_all(ctx.path().join("b/x")).unwrap();
        std::fs::write(ctx.path().join("b/x/f"), "f").unwrap();
        let (_, r) = copy(
            ctx.path(),
            &CopyDef::from_context(&["a", "b"], "/dst/"),
            CopyAttrs::default(),
            None,
            None,
        );
        let e = r.unwrap_err().to_string();
        assert!(e.starts_with("cannot copy to non-directory: /dst/x"), "{e}");

        // The image has a symlink where the source has a directory (a node_modules entry
        // an earlier RUN linked).
        let image = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(image.path().join("dst")).unwrap();
        std::os::unix::fs::symlink("../elsewhere", image.path().join("dst/x")).unwrap();
        let def = CopyDef::from_context(&["b"], "/dst/");
        let mut local = LocalContext::walk(ctx.path()).unwrap();
        let digest = local.digest_sources(&def).unwrap().digest;
        let roots = select(local.entries(), &def.sources, &IgnoreMatcher::default()).unwrap();
        let layer = tempfile::tempdir().unwrap();
        let job = CopyJob {
            def: &def,
            src_root: ctx.path(),
            entries: local.entries(),
            roots: &roots,
            attrs: CopyAttrs::default(),
            keyed_digest: &digest,
            image: Some(image.path()),
        };
        let e = build_copy_layer(layer.path(), &job, None).unwrap_err().to_string();
        assert!(e.starts_with("cannot copy to non-directory: /dst/x"), "{e}");
        // A directory there is merged into, as before.
        std::fs::remove_file(image.path().join("dst/x")).unwrap();
        std::fs::create_dir(image.path().join("dst/x")).unwrap();
        build_copy_layer(tempfile::tempdir().unwrap().path(), &job, None).unwrap();
    }

    #[test]
    fn a_rebuild_keeps_unchanged_files_from_the_previous_snapshot_and_copies_edited_ones() {
        let ctx = context();
        let def = CopyDef::from_context(&["src"], "/app/");
        let (first, r) = copy(ctx.path(), &def, CopyAttrs::default(), None, None);
        let CopyLayer {
            entries: Some(entries),
            delta: None,
            ..
        } = r.unwrap()
        else {
            panic!("a first COPY is whole and knows its entries")
        };
        let (_cache_root, digest, snap, seed) = seed_of(first, &entries);
        std::fs::write(ctx.path().join("src/a.txt"), "edited").unwrap();
        let (second, r) = copy(ctx.path(), &def, CopyAttrs::default(), None, Some(&seed));
        let ino = |root: &Path, p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
        let built = r.unwrap();
        assert_eq!(built.seed_base.as_ref().map(|(d, _)| d.as_str()), Some(digest.as_str()));
        match built.delta {
            Some(delta) => {
                assert!(!second.path().join("app/sub/run.sh").exists(), "only what changed");
                assert_eq!(delta.changed.keys().collect::<Vec<_>>(), ["app/a.txt"]);
                assert!(delta.removed.is_empty());
            }
            None => {
                assert_eq!(
                    ino(&snap, "app/sub/run.sh"),
                    ino(second.path(), "app/sub/run.sh"),
                    "linked"
                );
                assert_ne!(ino(&snap, "app/a.txt"), ino(second.path(), "app/a.txt"), "copied");
            }
        }
        assert_eq!(
            std::fs::read_to_string(second.path().join("app/a.txt")).unwrap(),
            "edited"
        );
        assert_eq!(
            std::fs::read_to_string(snap.join("app/a.txt")).unwrap(),
            "alpha",
            "seed untouched"
        );
    }
}
