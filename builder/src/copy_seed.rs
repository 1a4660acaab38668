//! What a COPY's earlier build leaves for the next build of the same step: the entries its
//! layer holds (each file with the source stamp it was copied from), so the next build can
//! tell what changed without reading unchanged files. A snapshot is either whole (a
//! directory plus `<hex>.entries.bin`) or a delta over a whole one (a directory unit
//! `<hex>.delta/` holding `tree/`, the base's digest in `base` and `delta.bin`): the
//! changed entries and overlay whiteouts for the removed ones, mounted above the base.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lcache_image::layer_segments::SegmentIndex;
use lcache_proto::wire::LayerTail;

use crate::cache_dir::CacheDir;
use crate::entry_chunks::EntryChunks;
use crate::snapshot_prune::mark_used;
use crate::step_cache::StepCache;

/// What a copied file was made from. A later build of the same COPY keeps the file from
/// the earlier layer instead of copying it again when all of this is unchanged: the
/// source's device and inode, ctime (which every write moves, even one that restores
/// mtime), mtime and size, and the resulting mode and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CopiedFrom {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) ctime_ns: i64,
    pub(crate) mtime_ns: i64,
    pub(crate) size: u64,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// The BLAKE3 of the bytes copied, so a kept file still counts toward the check that
    /// what was copied is what was keyed.
    pub(crate) content: [u8; 32],
}

impl CopiedFrom {
    /// Whether `self` was made from the same source, with the same mode and owner, as
    /// `other` (whose content is then this file's too).
    pub fn same_source(&self, other: &CopiedFrom) -> bool {
        CopiedFrom {
            content: other.content,
            ..*self
        } == *other
    }
}

/// One entry of a COPY layer, as placed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Placed {
    /// A regular file.
    File(CopiedFrom),
    /// A directory, with its mode and owner.
    Dir {
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: String,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
}

/// Every entry of a COPY layer, by path inside the layer.
pub type LayerEntries = HashMap<String, Placed>;

/// A delta snapshot's difference from its base.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerDelta {
    /// Entries added or changed (present in the delta's tree).
    pub changed: LayerEntries,
    /// Paths of the base the layer no longer has (whited out in the tree, or beneath a
    /// path that is).
    pub removed: Vec<String>,
}

/// An earlier layer of the same step: what it holds, and where.
#[derive(Debug)]
pub struct Seed {
    /// The whole snapshot the seed is, or is a delta over.
    pub(crate) base_digest: String,
    pub(crate) base_dir: PathBuf,
    pub(crate) base: EntryChunks,
    /// The seed's own delta over `base`: its tree and what it changed.
    pub(crate) delta: Option<(PathBuf, LayerDelta)>,
    /// The seed layer's own blob digest and where its segment index is kept: the next
    /// pack takes the unchanged segments from that blob.
    pub(crate) blob: (String, PathBuf),
    /// The sources digest the seed's layer was made from, when it is the same step on the
    /// same parent as the one being built (only its sources differ): the layer can then be
    /// made from the seed and lcached's list of what changed.
    pub(crate) sources_before: Option<String>,
}

/// Where a seed's entry is: in the base snapshot or in the seed's delta tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The whole snapshot.
    Base,
    /// The delta's tree.
    Delta,
}

impl Seed {
    /// The seed layer's entry at `path` and which directory holds it.
    pub fn lookup(&self, path: &str) -> Option<(Holder, &Placed)> {
        if let Some((_, d)) = &self.delta {
            if let Some(p) = d.changed.get(path) {
                return Some((Holder::Delta, p));
            }
            if d.removed.binary_search_by(|r| r.as_str().cmp(path)).is_ok() {
                return None;
            }
        }
        self.base.get(path).map(|p| (Holder::Base, p))
    }

    /// How many entries the seed's own delta holds (0 for a whole snapshot).
    pub fn delta_len(&self) -> usize {
        self.delta
            .as_ref()
            .map_or(0, |(_, d)| d.changed.len() + d.removed.len())
    }

    /// The seed's layer with blob digest `digest`, if its snapshot is here and says what it
    /// holds (snapshots extracted from a pulled blob do not: those are copied once).
    pub fn load(cache: &CacheDir, digest: &str) -> Option<Seed> {
        let whole = cache.snapshot(digest);
        if whole.is_dir() {
            mark_used(cache, digest);
            return Some(Seed {
                base: EntryChunks::load(&entries_path(&whole))?,
                base_digest: digest.to_string(),
                blob: (digest.to_string(), segments_path(&whole)),
                base_dir: whole,
                delta: None,
                sources_before: None,
            });
        }
        let unit = DeltaUnit::of(cache, digest);
        let base_digest = unit.base_digest()?;
        let base_dir = cache.snapshot(&base_digest);
        if !base_dir.is_dir() {
            return None;
        }
        let delta: LayerDelta = read_bincode(&unit.manifest())?;
        mark_used(cache, digest);
        mark_used(cache, &base_digest);
        Some(Seed {
            base: EntryChunks::load(&entries_path(&base_dir))?,
            base_digest,
            base_dir,
            delta: Some((unit.tree(), delta)),
            blob: (digest.to_string(), unit.segments()),
            sources_before: None,
        })
    }
}

fn read_bincode<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
        .ok()
        .map(|(v, _)| v)
}

/// Written aside and renamed into place: a crash leaves the old file or none, never part
/// of one (a segment index that decoded wrong would give a wrong diff_id).
fn write_bincode<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(std::io::Error::other)?;
    let aside = path.with_extension("partial");
    std::fs::write(&aside, bytes)?;
    std::fs::rename(&aside, path)
}

/// Bincode, not JSON: at 50,000 files JSON took 275 bytes a file (a BLAKE3 as 32 numbers);
/// in sorted chunks (`entry_chunks`). Manifests of older formats (`.copied`, `.copied.bin`,
/// a bare map) are simply not read: the next build of the step copies instead of keeping,
/// once.
fn entries_path(snapshot: &Path) -> PathBuf {
    snapshot.with_extension("entries.bin")
}

/// Keeps a whole COPY snapshot's entries beside it.
pub fn save_entries(snapshot: &Path, entries: &LayerEntries) -> std::io::Result<()> {
    EntryChunks::save(&entries_path(snapshot), entries)
}

fn segments_path(snapshot: &Path) -> PathBuf {
    snapshot.with_extension("segments.bin")
}

/// Keeps the segment index of a whole COPY snapshot's blob beside it.
pub fn save_segments(snapshot: &Path, index: &SegmentIndex) -> std::io::Result<()> {
    write_bincode(&segments_path(snapshot), index)
}

/// Keeps the segment index of the layer `digest`'s blob beside its snapshot, whole or a
/// delta, once its last states are known (see `PendingDiffId`).
pub fn keep_segments(cache: &CacheDir, digest: &str, index: &SegmentIndex) -> std::io::Result<()> {
    let whole = cache.snapshot(digest);
    if whole.is_dir() {
        save_segments(&whole, index)
    } else {
        write_bincode(&DeltaUnit::of(cache, digest).segments(), index)
    }
}

/// The segment index kept at `path`, if the blob was packed in segments (older ones were
/// not, and indexes written before they said how their members are kept are not read:
/// their next layer is packed whole, once).
pub fn load_segments(path: &Path) -> Option<SegmentIndex> {
    read_bincode(path)
}

/// Where the index of a layer whose build ended before lcached took its diff_id waits,
/// with the tail it was named by, for the tar's states after the change.
fn pending_path(segments: &Path) -> PathBuf {
    segments.with_extension("pending")
}

/// Keeps the segment index of the layer `digest` that lcached is still naming: its tar's
/// states after the change are asked for (`tail`) by the next build that packs over it.
pub fn keep_pending_segments(
    cache: &CacheDir,
    digest: &str,
    index: &SegmentIndex,
    tail: &LayerTail,
) -> std::io::Result<()> {
    let whole = cache.snapshot(digest);
    let path = if whole.is_dir() {
        segments_path(&whole)
    } else {
        DeltaUnit::of(cache, digest).segments()
    };
    write_bincode(&pending_path(&path), &(index, tail))
}

/// Gives the last `states.len()` segments of `index` the blob's SHA-256 states after them
/// (as the cache that named the layer gives them); false, and `index` untouched, when the
/// index has fewer segments.
pub fn fill_blob_states(index: &mut SegmentIndex, states: Vec<Vec<u8>>) -> bool {
    let (n, k) = (index.segments.len(), states.len());
    if k > n {
        return false;
    }
    for (seg, state) in index.segments[n - k..].iter_mut().zip(states) {
        seg.blob_state = state;
    }
    true
}

/// Where the blob's states after the change wait beside an index kept pending (see
/// [`keep_blob_states`]).
fn states_path(segments: &Path) -> PathBuf {
    segments.with_extension("states")
}

/// Keeps, beside the index kept pending at `segments` (the index's path, see
/// [`keep_pending_segments`]), the blob's states after the change, which a layer named
/// provisionally learns only once lcached has named it: [`segments_of`] puts them in the
/// index when it completes it, so the build that learns them does not rewrite it.
pub fn keep_blob_states(segments: &Path, states: &[Vec<u8>]) -> std::io::Result<()> {
    if !pending_path(segments).exists() {
        return Ok(());
    }
    write_bincode(&states_path(segments), &states)
}

/// Where the segment index of the snapshot `snapshot` (whole) or `unit` (a delta) is kept.
pub fn segments_beside(snapshot: &Path, unit: &DeltaUnit) -> PathBuf {
    if snapshot.is_dir() {
        segments_path(snapshot)
    } else {
        unit.segments()
    }
}

/// The segment index of the blob `digest` kept at `path`; one kept while lcached was still
/// naming the layer is completed with the tar's states it took, and kept whole from then on.
/// `None` (the next layer is packed whole) when there is none, or lcached no longer has it.
pub fn segments_of(steps: &dyn StepCache, digest: &str, path: &Path) -> Option<SegmentIndex> {
    if let Some(index) = load_segments(path) {
        return Some(index);
    }
    let pending = pending_path(path);
    let (mut index, tail): (SegmentIndex, LayerTail) = read_bincode(&pending)?;
    let (n, k) = (index.segments.len(), tail.members.len());
    if k > n {
        return None;
    }
    // A layer named provisionally: the blob's states came when the name was resolved. An
    // index without them cannot resume the next blob's digest, and is not used.
    if index.segments[n - k..].iter().any(|s| s.blob_state.is_empty()) {
        let states: Vec<Vec<u8>> = read_bincode(&states_path(path))?;
        if states.len() != k || !fill_blob_states(&mut index, states) {
            return None;
        }
    }
    let named = steps.layer_diff_id(digest, &tail).ok()?;
    if named.tar_states.len() != k {
        return None;
    }
    for (seg, state) in index.segments[n - k..].iter_mut().zip(named.tar_states) {
        seg.tar_state = state;
    }
    write_bincode(path, &index).ok()?;
    let _ = std::fs::remove_file(&pending);
    let _ = std::fs::remove_file(states_path(path));
    Some(index)
}

/// The on-disk unit of a delta snapshot: made in a work directory and renamed into place
/// whole, so a tree is never seen without the base it goes over.
#[derive(Debug, Clone)]
pub struct DeltaUnit {
    dir: PathBuf,
}

impl DeltaUnit {
    /// The unit of the layer with blob digest `digest`.
    pub fn of(cache: &CacheDir, digest: &str) -> Self {
        Self {
            dir: cache.snapshot(digest).with_extension("delta"),
        }
    }

    /// The delta's tree: the overlay lower that goes above the base's.
    pub fn tree(&self) -> PathBuf {
        self.dir.join("tree")
    }

    fn manifest(&self) -> PathBuf {
        self.dir.join("delta.bin")
    }

    /// Where the segment index of the layer's blob is kept.
    pub fn segments(&self) -> PathBuf {
        self.dir.join("segments.bin")
    }

    /// The blob digest of the whole snapshot the delta goes over.
    pub fn base_digest(&self) -> Option<String> {
        let d = std::fs::read_to_string(self.dir.join("base")).ok()?;
        let d = d.trim();
        (d.starts_with("sha256:") && d.len() == 71 && d[7..].bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| d.to_string())
    }

    /// Stores `tree` (a delta over `base_digest`) as this unit, assembled in `staging`
    /// (a fresh directory on the same filesystem). Returns false when another build stored
    /// the unit first (theirs is as good).
    pub fn store(
        &self,
        staging: &Path,
        tree: &Path,
        base_digest: &str,
        delta: &LayerDelta,
        segments: Option<&SegmentIndex>,
    ) -> std::io::Result<bool> {
        std::fs::rename(tree, staging.join("tree"))?;
        std::fs::write(staging.join("base"), base_digest)?;
        write_bincode(&staging.join("delta.bin"), delta)?;
        if let Some(index) = segments {
            write_bincode(&staging.join("segments.bin"), index)?;
        }
        match std::fs::rename(staging, &self.dir) {
            Ok(()) => Ok(true),
            Err(_) if self.dir.is_dir() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> Placed {
        Placed::File(CopiedFrom {
            dev: 1,
            ino: 2,
            ctime_ns: 3,
            mtime_ns: 4,
            size,
            mode: 0o644,
            uid: 0,
            gid: 0,
            content: [7; 32],
        })
    }

    #[test]
    fn a_delta_seed_answers_from_its_delta_first_and_hides_what_it_removed() {
        let base: LayerEntries = [("a".to_string(), file(1)), ("b".to_string(), file(2))].into();
        let seed = Seed {
            base_digest: "sha256:00".into(),
            blob: ("sha256:00".into(), PathBuf::from("/nonexistent.segments.bin")),
            base_dir: PathBuf::from("/nonexistent"),
            base: EntryChunks::from_entries(&base),
            sources_before: None,
            delta: Some((
                PathBuf::from("/nonexistent-tree"),
                LayerDelta {
                    changed: [("a".to_string(), file(9))].into(),
                    removed: vec!["b".to_string()],
                },
            )),
        };
        assert_eq!(seed.lookup("a"), Some((Holder::Delta, &file(9))));
        assert_eq!(seed.lookup("b"), None);
        assert_eq!(seed.lookup("c"), None);
        assert_eq!(seed.delta_len(), 2);
    }

    #[test]
    fn a_unit_names_its_base_only_if_it_is_a_digest() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let unit = DeltaUnit::of(&cache, &format!("sha256:{}", "a".repeat(64)));
        let staging = dir.path().join("staging");
        let tree = dir.path().join("t");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(&tree).unwrap();
        let base = format!("sha256:{}", "b".repeat(64));
        assert!(unit
            .store(&staging, &tree, &base, &LayerDelta::default(), None)
            .unwrap());
        assert_eq!(unit.base_digest(), Some(base));
        std::fs::write(unit.dir.join("base"), "../../etc").unwrap();
        assert_eq!(unit.base_digest(), None);
    }
}
