//! Per build context, what the daemon knows about its files: the entry list, each file's
//! digest with the stamp it was taken at (persisted in the record store, so a restart does
//! not re-read the tree), and a notify watcher that marks the context changed. With no change
//! a plan reads no file and stats nothing; after an edit only files whose stamp moved are
//! re-read. Where watching is impossible every plan re-stats the tree (a stat walk).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lcache_context::context_walk::{
    entry_at, read_dockerignore, read_listing, walk, walk_beneath, walk_reads, BARRIER_PREFIX,
};
use lcache_context::errors::ContextError;
use lcache_context::local_context::{DigestSlots, LocalContext};
use lcache_proto::build_plan::CopyDef;
use lcache_proto::errors::SelectError;
use lcache_proto::key_encoding::hex;
use lcache_proto::source_select::{ContextEntry, EntryKind, FileStamp};
use lcache_proto::sources_digest::SourcesDigest;
use lcache_proto::step_keys::{StepRef, StepSources};
use lcache_proto::wire::{ContextIndexStatus, FILES_LISTED};

use crate::context_watcher::{start_watcher, ContextWatcher, Dirty, WatchSignals};
use crate::digest_persister::DigestPersister;
use crate::store::{CachedDigest, RecordStore, StoreError};

/// How a context is kept fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMode {
    /// Watching: changes are pushed to us.
    Watching,
    /// Not watching (and why): every plan re-stats the tree.
    StatWalk(String),
}

/// Why the index could not answer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Reading the context failed.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a COPY selects, for memoising its digest while the context does not change.
type MemoKey = (Vec<String>, Vec<String>);

/// A memoised sources digest, and the racily clean files (see [`racy`]) it was taken over:
/// a write to one in the tick it was read leaves its stamp, so it is read again before the
/// memo is used, until a read finds it old enough to trust.
struct Memo {
    digest: SourcesDigest,
    /// Path, size and content digest of each file to read again.
    recheck: Vec<(String, u64, [u8; 32])>,
}

/// A selection's directory node digests, by directory, with the generation each was taken at.
type Subtrees = HashMap<String, (u64, [u8; 32])>;

/// Whether the sorted `entries` hold a file at `path`.
fn is_file(entries: &[ContextEntry], path: &str) -> bool {
    entries
        .binary_search_by(|e| e.path.as_str().cmp(path))
        .is_ok_and(|i| entries[i].kind == EntryKind::File)
}

/// How many directories a refresh lists again one by one before it walks the whole tree.
const LISTINGS_AT_MOST: usize = 256;

/// How many racily clean files a memoised digest may be taken over: each is read again
/// before the memo is used (a checkout planned at once has more, and is not memoised).
const RECHECKS_AT_MOST: usize = 64;

/// How close to the moment it was read a file's ctime may be before its digest is not
/// trusted later (git's "racily clean" rule): a write in the same timestamp tick as an
/// earlier one leaves the stamp unchanged. ctime, not mtime: every write sets it from the
/// kernel's clock and nothing can set it back or ahead. Linux stamps files from a coarse
/// clock (one tick is at most 10 ms); filesystems with whole-second stamps get two seconds.
const RACY_WINDOW_NS: i64 = 50_000_000;
const RACY_WINDOW_COARSE_NS: i64 = 2_000_000_000;

/// Whether a file with `stamp` may still change without its stamp changing, as of `now_ns`.
fn racy(stamp: &FileStamp, now_ns: i64) -> bool {
    let window = if stamp.ctime_ns % 1_000_000_000 == 0 {
        RACY_WINDOW_COARSE_NS
    } else {
        RACY_WINDOW_NS
    };
    stamp.ctime_ns > now_ns - window
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// A file's content digest as last read, and whether it still holds: taken at the entry's
/// current stamp and size, and not racily (see [`racy`]). An invalid one is kept to tell a
/// re-read that found the same contents (a touch) from an edit.
#[derive(Debug, Clone, Copy)]
struct Known {
    digest: [u8; 32],
    valid: bool,
}

/// The index's digests lent to a plan's [`LocalContext`] (copying every valid one into a
/// list of its own was a quarter of a plan after an edit at 200,000 files): a digest is
/// used while valid; one read in the plan fills its slot, the slot's earlier value kept for
/// `finish` (which tells a touch from an edit, and marks racy reads invalid) or put back
/// when the plan fails.
struct KnownSlots {
    known: Vec<Option<Known>>,
    replaced: Vec<(usize, Option<Known>)>,
}

impl DigestSlots for KnownSlots {
    fn digest(&self, i: usize) -> Option<[u8; 32]> {
        self.known
            .get(i)
            .copied()
            .flatten()
            .filter(|k| k.valid)
            .map(|k| k.digest)
    }

    fn set(&mut self, i: usize, digest: [u8; 32]) {
        if let Some(slot) = self.known.get_mut(i) {
            self.replaced.push((i, *slot));
            *slot = Some(Known { digest, valid: true });
        }
    }
}

/// One indexed context. Paths are held once, in the entry list; each file's digest sits
/// beside its entry (`known`), so the index costs an entry and 33 bytes per file.
pub struct IndexedContext {
    root: PathBuf,
    root_key: String,
    /// The walked entries, sorted by path.
    entries: Option<Vec<ContextEntry>>,
    /// Aligned with `entries`: each file's last known content digest.
    known: Vec<Option<Known>>,
    /// Digests read from the store when the context was opened, until the first walk.
    stored: Option<HashMap<String, CachedDigest>>,
    signals: Arc<WatchSignals>,
    mode: WatchMode,
    _watcher: Option<ContextWatcher>,
    memo: HashMap<MemoKey, Memo>,
    /// Per selection, each selected directory's node digest and the generation of the
    /// directory it was taken at: reused while the generation holds.
    subtrees: HashMap<MemoKey, Subtrees>,
    /// Each directory's generation (0 until it moves): moved on by a refresh that read it,
    /// read beneath it, or read its parent (its own mode), so a digest taken before no
    /// longer matches. A whole walk forgets them all, with `subtrees`.
    generations: HashMap<String, u64>,
    /// The last generation given.
    clock: u64,
    /// When the current plan started (ns since the epoch).
    plan_started_ns: i64,
    /// The stamp of the entry changed last (by ctime), or a newer one: a refresh that
    /// lists a few directories again only raises it (a scan of every entry was a quarter of
    /// a plan after an edit at 200,000 files). If it is racy (see [`racy`]), so may others
    /// be, and a sources digest is memoised with its racy files to read again.
    newest_stamp: Option<FileStamp>,
    /// The files with other hard links (`ContextEntry::shared`), kept as the entry list
    /// changes: each plan states them, since the watcher cannot vouch for them.
    shared: BTreeSet<String>,
    /// The directory the watcher was started on (device, inode): another one at the path
    /// (a fresh checkout into the same workspace) is watched anew.
    watched_root: Option<(u64, u64)>,
}

/// `dir`'s identity: its device and inode.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// All indexed contexts.
pub struct ContextIndex {
    records: Arc<dyn RecordStore>,
    persister: DigestPersister,
    watch: bool,
    contexts: Mutex<HashMap<PathBuf, Arc<Mutex<IndexedContext>>>>,
    /// The sources digests plans computed lately, newest last: a build in flight refers to
    /// its plan's listings before its records do, even once a newer plan replaced its memo.
    planned: Mutex<VecDeque<(Instant, String)>>,
}

/// How many recently planned sources digests are remembered.
const PLANNED_KEPT: usize = 4096;

/// What a context index refers to in the store's summaries and listings: a collection of
/// listings keeps these (see `listing_gc`).
#[derive(Debug, Default)]
pub struct ListingRoots {
    /// Sources digests memoised, or planned within the time asked.
    pub sources: Vec<String>,
    /// Node digests of subtrees a later plan may reuse without storing their listings.
    pub nodes: Vec<String>,
}

impl ContextIndex {
    /// An empty index; `watch` false forces stat walks everywhere (`lcached --watch off`).
    pub fn new(records: Arc<dyn RecordStore>, watch: bool) -> Self {
        Self {
            persister: DigestPersister::start(records.clone()),
            records,
            watch,
            contexts: Mutex::new(HashMap::new()),
            planned: Mutex::new(VecDeque::new()),
        }
    }

    /// Remembers the sources digests a plan computed (see [`ContextIndex::listing_roots`]).
    pub fn note_planned<'a>(&self, digests: impl IntoIterator<Item = &'a str>) {
        let mut planned = self.planned.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        planned.extend(digests.into_iter().map(|d| (now, d.to_string())));
        let excess = planned.len().saturating_sub(PLANNED_KEPT);
        planned.drain(..excess);
    }

    /// The summaries and listings this index refers to: every context's memoised digests
    /// and reusable subtrees, and the digests planned within `recent`.
    pub fn listing_roots(&self, recent: Duration) -> ListingRoots {
        let mut roots = ListingRoots::default();
        {
            let planned = self.planned.lock().unwrap_or_else(|p| p.into_inner());
            roots.sources.extend(
                planned
                    .iter()
                    .filter(|(at, _)| at.elapsed() <= recent)
                    .map(|(_, d)| d.clone()),
            );
        }
        for c in self.all() {
            // Each context's lock is taken in turn: a plan holds it from its walk to its
            // memos, so what it stored is either seen here or noted by the store as put.
            let c = c.lock().unwrap_or_else(|p| p.into_inner());
            roots.sources.extend(c.memo.values().map(|m| m.digest.digest.clone()));
            roots
                .nodes
                .extend(c.subtrees.values().flat_map(|t| t.values().map(|(_, d)| hex(d))));
        }
        roots
    }

    /// The indexed context at `root` (created on first use, with its persisted digests).
    pub fn context(&self, root: &Path) -> Result<Arc<Mutex<IndexedContext>>, IndexError> {
        let mut all = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = all.get(root) {
            return Ok(c.clone());
        }
        let root_key = root.display().to_string();
        let stored = self.records.context_digests(&root_key)?.into_iter().collect();
        let signals = Arc::new(WatchSignals {
            changed: AtomicBool::new(true),
            ..WatchSignals::default()
        });
        let watched_root = identity(root);
        let (watcher, mode) = if let Some(fs) = network_filesystem(root) {
            (
                None,
                WatchMode::StatWalk(format!(
                    "{fs} is a network filesystem: edits made on other machines never reach a watcher"
                )),
            )
        } else if self.watch {
            match start_watcher(root, signals.clone()) {
                Ok(w) => (Some(w), WatchMode::Watching),
                Err(reason) => (None, WatchMode::StatWalk(reason.to_string())),
            }
        } else {
            (None, WatchMode::StatWalk("watching disabled (--watch off)".into()))
        };
        let c = Arc::new(Mutex::new(IndexedContext {
            root: root.to_path_buf(),
            root_key,
            entries: None,
            known: Vec::new(),
            stored: Some(stored),
            signals,
            mode,
            _watcher: watcher,
            memo: HashMap::new(),
            subtrees: HashMap::new(),
            generations: HashMap::new(),
            clock: 0,
            plan_started_ns: 0,
            newest_stamp: None,
            shared: BTreeSet::new(),
            watched_root,
        }));
        all.insert(root.to_path_buf(), c.clone());
        Ok(c)
    }

    /// Every indexed context, each to be locked in turn (never the map and a context at once).
    fn all(&self) -> Vec<Arc<Mutex<IndexedContext>>> {
        self.contexts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Every indexed context's status.
    pub fn statuses(&self) -> Vec<ContextIndexStatus> {
        let mut out: Vec<_> = self
            .all()
            .iter()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).status())
            .collect();
        out.sort_by(|a, b| a.root.cmp(&b.root));
        out
    }

    /// Persists what a plan learnt: new digests, and digests of files gone from the tree.
    /// Durable on return when the plan read new contents; stamps that merely moved are
    /// written behind (see [`DigestPersister`]).
    pub fn persist(&self, ctx: &IndexedContext, learnt: Learnt, removals: Vec<String>) -> Result<(), StoreError> {
        if learnt.upserts.is_empty() && removals.is_empty() {
            return Ok(());
        }
        self.persister.persist(
            &*self.records,
            &ctx.root_key,
            learnt.upserts,
            removals,
            learnt.new_contents,
        )
    }

    /// Waits until every digest queued for the store is written.
    pub fn drain(&self) -> Result<(), StoreError> {
        self.persister.drain(&*self.records)
    }
}

/// The name of the network filesystem `root` is on, if it is on one.
fn network_filesystem(root: &Path) -> Option<&'static str> {
    let fs = nix::sys::statfs::statfs(root).ok()?;
    // f_type magic numbers from statfs(2).
    match fs.filesystem_type().0 as u64 {
        0x6969 => Some("NFS"),
        0x517B => Some("SMB"),
        0xFF53_4D42 => Some("CIFS"),
        0xFE53_4D42 => Some("SMB2"),
        0x0102_1997 => Some("9P"),
        0x00C3_6400 => Some("CephFS"),
        0x6573_5546 => Some("FUSE"),
        _ => None,
    }
}

impl IndexedContext {
    /// This context's status.
    pub fn status(&self) -> ContextIndexStatus {
        let (mode, reason) = match &self.mode {
            WatchMode::Watching => ("watching".to_string(), None),
            WatchMode::StatWalk(r) => ("stat-walk".to_string(), Some(r.clone())),
        };
        ContextIndexStatus {
            root: self.root_key.clone(),
            mode,
            reason,
            entries: self.entries.as_ref().map_or(0, Vec::len),
            digests: self.known.iter().flatten().filter(|k| k.valid).count(),
        }
    }

    /// Brings the entry list up to date: no work when the watcher saw nothing. Returns the
    /// paths whose cached digests no longer exist in the tree.
    pub fn refresh(&mut self) -> Result<Vec<String>, IndexError> {
        self.plan_started_ns = now_ns();
        let _ = self.watch_again_if_stale();
        let failed = self.signals.failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(reason) = failed.filter(|_| self.mode == WatchMode::Watching) {
            self.mode = WatchMode::StatWalk(reason);
            self._watcher = None;
        }
        let must_walk = self.entries.is_none() || self.mode != WatchMode::Watching || !self.synced_or_watched_again();
        let relinked = if must_walk {
            Vec::new()
        } else {
            self.shared_files_moved()
        };
        // Clear the flag before walking: an event during the walk marks it again.
        if !self.signals.changed.swap(false, Ordering::SeqCst) && !must_walk && relinked.is_empty() {
            return Ok(Vec::new());
        }
        let mut dirty = self.signals.take_dirty();
        dirty.listings.extend(relinked);
        let mut dropped = Vec::new();
        // Past a few hundred directories (a checkout, a touch of everything) the whole walk,
        // which reads directories on every core, is the quicker way.
        if !must_walk && !dirty.everything && dirty.listings.len() + dirty.trees.len() <= LISTINGS_AT_MOST {
            // Only the directories the watcher named are read again: an edit in a tree of
            // 200,000 files costs a listing, not 200,000 stats.
            match self.refresh_dirs(&dirty) {
                Ok(removed) => return Ok(removed),
                // Something changed under the reads: the whole walk below settles it.
                Err((_, removed)) => dropped = removed,
            }
        }
        let ignore = read_dockerignore(&self.root)?;
        let entries = walk(&self.root, &ignore)?;
        if self.entries.as_ref() != Some(&entries) {
            self.memo.clear();
        }
        // A whole walk does not say where things changed.
        self.subtrees.clear();
        self.generations.clear();
        let (known, mut removed) = self.carry_digests(&entries);
        removed.extend(dropped.into_iter().filter(|p| !is_file(&entries, p)));
        self.newest_stamp = entries.iter().map(|e| e.stamp).max_by_key(|s| s.ctime_ns);
        self.shared = entries.iter().filter(|e| e.shared).map(|e| e.path.clone()).collect();
        let mut entries = entries;
        entries.shrink_to_fit();
        self.entries = Some(entries);
        self.known = known;
        Ok(removed)
    }

    /// [`Self::sync_watcher`]; when the barrier was not seen because the watcher's directory
    /// went meanwhile (its word came late), a new watcher, and its barrier.
    fn synced_or_watched_again(&mut self) -> bool {
        if self.sync_watcher() {
            return true;
        }
        self.watch_again_if_stale() && self.mode == WatchMode::Watching && self.sync_watcher()
    }

    /// Starts a new watcher when the directory at the context's path is no longer the one
    /// watched (moved away or removed, and made again: the old watcher sees nothing of the
    /// new tree, so each plan's barrier would wait out its limit and walk everything), or
    /// when the watcher lost events (its queue overflowed: it used to mean stat walks for as
    /// long as lcached ran). The
    /// whole walk that follows takes the new tree in (carrying digests by stamp, as after
    /// a restart).
    fn watch_again_if_stale(&mut self) -> bool {
        if self.mode != WatchMode::Watching {
            return false;
        }
        let now = identity(&self.root);
        // The inode number alone may be the old one's again once that was freed; the
        // watcher's word that the directory went (or that it lost events) says so.
        let stale = self.signals.stale.load(Ordering::SeqCst);
        if now.is_none() || (now == self.watched_root && !stale) {
            return false;
        }
        // Nothing the old tree's listings vouched for holds: the next refresh walks it whole.
        let signals = Arc::new(WatchSignals {
            changed: AtomicBool::new(true),
            dirty: Mutex::new(Dirty {
                everything: true,
                ..Dirty::default()
            }),
            ..WatchSignals::default()
        });
        // The old watcher stops first: both never note changes at once.
        self._watcher = None;
        match start_watcher(&self.root, signals.clone()) {
            Ok(w) => {
                self._watcher = Some(w);
                self.watched_root = now;
            }
            Err(reason) => self.mode = WatchMode::StatWalk(reason.to_string()),
        }
        self.signals = signals;
        true
    }

    /// The directories of the files with other hard links whose stamp or size moved: the
    /// watcher hears only of writes made through the context's own directories, so these
    /// are stated on every plan (a few stats; none in most trees).
    fn shared_files_moved(&self) -> Vec<PathBuf> {
        let entries = self.entries.as_deref().unwrap_or_default();
        self.shared
            .iter()
            .filter(|path| {
                let then = entries
                    .binary_search_by(|e| e.path.as_str().cmp(path))
                    .ok()
                    .map(|i| &entries[i]);
                let now = entry_at(&self.root, path).ok().flatten();
                !matches!((then, now), (Some(t), Some(n)) if t.stamp == n.stamp && t.size == n.size && n.shared)
            })
            .map(|path| self.root.join(path.rsplit_once('/').map_or("", |(dir, _)| dir)))
            .collect()
    }

    /// Reads again the listings of the directories in `dirty` (parents first) and walks the
    /// trees made in them, splicing what it finds into the entry list; digests are carried
    /// by path as a whole walk carries them. The result is the list a whole walk gives.
    /// On failure, the list as far as it got and the paths whose digests it dropped.
    fn refresh_dirs(&mut self, dirty: &Dirty) -> Result<Vec<String>, (IndexError, Vec<String>)> {
        let rel = |p: &PathBuf| {
            p.strip_prefix(&self.root)
                .ok()
                .and_then(|r| r.to_str())
                .map(str::to_string)
        };
        let trees: HashSet<String> = dirty.trees.iter().filter_map(rel).collect();
        let mut dirs: Vec<String> = dirty.listings.iter().filter_map(rel).collect();
        dirs.sort_by_key(|d| (d.split('/').filter(|p| !p.is_empty()).count(), d.clone()));
        let ignore = read_dockerignore(&self.root).map_err(|e| (e.into(), Vec::new()))?;
        let mut entries = self.entries.take().unwrap_or_default();
        let mut known = std::mem::take(&mut self.known);
        let mut dropped: Vec<String> = Vec::new();
        let mut changed = false;
        let mut newest = self.newest_stamp;
        let mut saw = |stamp: FileStamp| {
            if newest.is_none_or(|n| stamp.ctime_ns > n.ctime_ns) {
                newest = Some(stamp);
            }
        };
        let result = (|| -> Result<(), IndexError> {
            for d in &dirs {
                // Gone, beneath something no longer a directory, or never read by a walk.
                if !walk_reads(&self.root, d, &ignore) {
                    continue;
                }
                let (fresh, descended) = read_listing(&self.root, d, &ignore)?;
                // A directory's own stamp moves with its listing.
                if let Ok(i) = entries.binary_search_by(|e| e.path.as_str().cmp(d)) {
                    if let Some(e) = entry_at(&self.root, d)?.filter(|e| e.kind == EntryKind::Dir) {
                        saw(e.stamp);
                        changed |= entries[i] != e;
                        entries[i] = e;
                    }
                }
                let prefix = if d.is_empty() { String::new() } else { format!("{d}/") };
                let lo = entries.partition_point(|e| e.path.as_str() < prefix.as_str());
                let hi = lo + entries[lo..].partition_point(|e| e.path.starts_with(&prefix));
                // The entry directly in `d` that `path` is or is beneath.
                let child_of = |path: &str| -> usize {
                    let rest = &path[prefix.len()..];
                    prefix.len() + rest.find('/').unwrap_or(rest.len())
                };
                let was_dir = |path: &str| {
                    entries[lo..hi]
                        .binary_search_by(|e| e.path.as_str().cmp(path))
                        .is_ok_and(|i| entries[lo + i].kind == EntryKind::Dir)
                };
                let descended: HashSet<&str> = descended.iter().map(String::as_str).collect();
                let walk_again: HashSet<&str> = descended
                    .iter()
                    .copied()
                    .filter(|c| trees.contains(*c) || !was_dir(c))
                    .collect();
                let mut next: Vec<(ContextEntry, Option<Known>)> = Vec::with_capacity(hi - lo + fresh.len());
                // What is read again, by path: digests carry over as a whole walk carries them.
                let mut before: HashMap<&str, usize> = HashMap::new();
                for i in lo..hi {
                    let path = entries[i].path.as_str();
                    let child = &path[..child_of(path)];
                    if child != path && descended.contains(child) && !walk_again.contains(child) {
                        next.push((entries[i].clone(), known[i]));
                        continue;
                    }
                    before.insert(path, i);
                    if known[i].is_some() {
                        dropped.push(path.to_string());
                    }
                }
                let mut walked = Vec::new();
                for c in &walk_again {
                    walked.extend(walk_beneath(&self.root, c, &ignore)?);
                }
                // What a digest taken before may no longer match: `d` and every directory
                // above it, its subdirectories (their own entries were read again), and
                // everything walked again.
                let mut moved: Vec<&str> = vec![d.as_str()];
                let mut up = d.as_str();
                while let Some((parent, _)) = up.rsplit_once('/') {
                    moved.push(parent);
                    up = parent;
                }
                if !d.is_empty() {
                    moved.push("");
                }
                moved.extend(descended.iter().copied());
                moved.extend(
                    walked
                        .iter()
                        .filter(|e| e.kind == EntryKind::Dir)
                        .map(|e| e.path.as_str()),
                );
                for m in moved {
                    self.clock += 1;
                    self.generations.insert(m.to_string(), self.clock);
                }
                for e in fresh.into_iter().chain(walked) {
                    saw(e.stamp);
                    let carried = before.get(e.path.as_str()).and_then(|&i| {
                        let old = &entries[i];
                        let k = known[i].filter(|_| old.kind == EntryKind::File && e.kind == EntryKind::File)?;
                        Some(Known {
                            digest: k.digest,
                            valid: k.valid && old.stamp == e.stamp && old.size == e.size,
                        })
                    });
                    next.push((e, carried));
                }
                next.sort_unstable_by(|a, b| a.0.path.cmp(&b.0.path));
                if next.len() != hi - lo || next.iter().zip(&entries[lo..hi]).any(|(n, o)| n.0 != *o) {
                    changed = true;
                }
                let (e, k): (Vec<ContextEntry>, Vec<Option<Known>>) = next.into_iter().unzip();
                for gone in entries[lo..hi].iter().filter(|e| e.shared) {
                    self.shared.remove(&gone.path);
                }
                self.shared
                    .extend(e.iter().filter(|e| e.shared).map(|e| e.path.clone()));
                entries.splice(lo..hi, e);
                known.splice(lo..hi, k);
            }
            Ok(())
        })();
        let removed: Vec<String> = dropped.into_iter().filter(|p| !is_file(&entries, p)).collect();
        if let Err(e) = result {
            // The whole walk that follows carries digests from the list as it stands.
            self.entries = Some(entries);
            self.known = known;
            return Err((e, removed));
        }
        if changed {
            self.memo.clear();
        }
        self.newest_stamp = newest;
        self.entries = Some(entries);
        self.known = known;
        Ok(removed)
    }

    /// Each new entry's known digest, carried from the previous walk (or, after a restart,
    /// from the store) by path; and the paths that had a digest and are no longer files.
    fn carry_digests(&mut self, entries: &[ContextEntry]) -> (Vec<Option<Known>>, Vec<String>) {
        let old = self.entries.take().unwrap_or_default();
        let old_known = std::mem::take(&mut self.known);
        let mut stored = self.stored.take().unwrap_or_default();
        // Both walks are sorted by path: one pass over them side by side pairs each entry
        // with its earlier self (a binary search per entry cost 1.5 s of string compares on a
        // 200,000-file tree's first walk after a restart).
        let mut at = 0;
        let mut still_a_file = vec![false; old.len()];
        let known = entries
            .iter()
            .map(|e| {
                while old.get(at).is_some_and(|o| o.path.as_str() < e.path.as_str()) {
                    at += 1;
                }
                if e.kind != EntryKind::File {
                    return None;
                }
                let earlier = old
                    .get(at)
                    .filter(|o| o.path == e.path && o.kind == EntryKind::File)
                    .map(|_| at);
                if let Some(i) = earlier {
                    still_a_file[i] = true;
                }
                // Taken out as it is used: what is left is what is no longer a file.
                let from_store = stored.remove(&e.path).map(|c| {
                    (
                        Known {
                            digest: c.digest,
                            valid: true,
                        },
                        c.stamp,
                        c.size,
                    )
                });
                let from_walk = earlier.and_then(|i| old_known[i].map(|k| (k, old[i].stamp, old[i].size)));
                let (k, stamp, size) = from_walk.or(from_store)?;
                Some(Known {
                    digest: k.digest,
                    valid: k.valid && stamp == e.stamp && size == e.size,
                })
            })
            .collect();
        let mut removed: Vec<String> = old
            .iter()
            .zip(&old_known)
            .zip(&still_a_file)
            .filter(|((_, k), now)| k.is_some() && !**now)
            .map(|((o, _), _)| o.path.clone())
            .collect();
        removed.extend(stored.into_keys());
        (known, removed)
    }

    /// Waits until the watcher has delivered every event that happened before this call:
    /// inotify keeps order, so once a marker file created now is reported, so is any edit
    /// made before it. False when that cannot be known (read-only context, slow watcher).
    fn sync_watcher(&self) -> bool {
        // A fresh random name, created exclusively: a symlink or file planted in the context
        // under a guessable name can never make the daemon (root) write through it.
        let Ok(marker) = tempfile::Builder::new()
            .prefix(BARRIER_PREFIX)
            .rand_bytes(16)
            .tempfile_in(&self.root)
        else {
            return false;
        };
        let Some(name) = marker.path().file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            return false;
        };
        let cookies = self.signals.cookies.lock().unwrap_or_else(|p| p.into_inner());
        let (mut cookies, _) = self
            .signals
            .cookie_seen
            .wait_timeout_while(cookies, Duration::from_secs(2), |c| !c.contains(&name))
            .unwrap_or_else(|p| p.into_inner());
        let seen = cookies.remove(&name);
        drop(cookies);
        drop(marker);
        seen
    }

    /// Whether some file's stamp is too recent to trust a digest taken now.
    fn has_racy_files(&self) -> bool {
        self.newest_stamp.is_some_and(|s| racy(&s, self.plan_started_ns))
    }

    /// Whether the digest memoised for `key` may be used: its racy files, read again, hold
    /// the contents it was taken over. One that does not (or cannot be read) drops it.
    fn memo_holds(&mut self, key: &MemoKey) -> bool {
        let Some(m) = self.memo.get_mut(key) else {
            return false;
        };
        if m.recheck.is_empty() {
            return true;
        }
        let paths: Vec<(&str, u64)> = m.recheck.iter().map(|(p, size, _)| (p.as_str(), *size)).collect();
        let holds = lcache_context::content_hash::hash_files(&self.root, &paths)
            .is_ok_and(|now| now.iter().zip(&m.recheck).all(|(d, (_, _, was))| d == was));
        if !holds {
            self.memo.remove(key);
            return false;
        }
        // Read after its tick has passed, a file's contents are those of its stamp, and a
        // later write moves the stamp (which the refresh sees): its digest holds from now on.
        let entries = self.entries.as_deref().unwrap_or_default();
        let (started, known) = (self.plan_started_ns, &mut self.known);
        m.recheck.retain(|(p, _, digest)| {
            let Ok(i) = entries.binary_search_by(|e| e.path.as_str().cmp(p)) else {
                return true;
            };
            if racy(&entries[i].stamp, started) {
                return true;
            }
            if let Some(k) = known.get_mut(i) {
                *k = Some(Known {
                    digest: *digest,
                    valid: true,
                });
            }
            false
        });
        true
    }

    /// Key sources over this context; `all_files` lists every selected file; `images`
    /// gives a base image's manifest digest when the daemon knows the image.
    pub fn sources<'a>(&'a mut self, all_files: bool, images: &'a dyn Fn(&str) -> Option<String>) -> IndexSources<'a> {
        IndexSources {
            ctx: self,
            local: None,
            all_files,
            images,
            summaries: Vec::new(),
            dir_nodes: Vec::new(),
            taken: Vec::new(),
            memos: Vec::new(),
        }
    }
}

/// [`StepSources`] over an indexed context: memoised digests first, then a
/// [`LocalContext`] that reuses every still-valid file digest.
pub struct IndexSources<'a> {
    ctx: &'a mut IndexedContext,
    local: Option<LocalContext<KnownSlots>>,
    all_files: bool,
    images: &'a dyn Fn(&str) -> Option<String>,
    /// Summaries of digests computed in this plan, for `explain` to diff later.
    pub summaries: Vec<(String, Vec<lcache_proto::sources_digest::SummaryEntry>)>,
    /// Directory listings beneath them, by node digest.
    pub dir_nodes: Vec<(String, lcache_proto::sources_digest::DirNode)>,
    /// Subtree digests taken in this plan, kept by `finish` only: a failed plan may not
    /// have stored the listings they stand for, which explain and a COPY's changes read.
    taken: Vec<(MemoKey, Subtrees)>,
    /// Digests taken in this plan, with whether some file was racy then: memoised by
    /// `finish` only, for the same reason as `taken` (a memo hit stores no listings).
    memos: Vec<(MemoKey, SourcesDigest, bool)>,
}

impl IndexSources<'_> {
    /// Files read by this plan, with the digests to cache, and how many were read.
    pub fn finish(mut self) -> (Learnt, usize) {
        for (key, taken) in std::mem::take(&mut self.taken) {
            // Merged: a directory not visited this time (beneath a reused one) keeps its
            // digest for when only a sibling of it changes.
            self.ctx.subtrees.entry(key).or_default().extend(taken);
        }
        let Some(local) = self.local.take() else {
            return (Learnt::default(), 0);
        };
        let started = self.ctx.plan_started_ns;
        // Every selected racy file was read by this plan (a racy file's digest is never kept
        // valid), so these are all a memo could have taken unseen.
        let recheck: Vec<(String, u64, [u8; 32])> = local
            .newly_hashed()
            .filter(|(e, _)| racy(&e.stamp, started))
            .map(|(e, digest)| (e.path.clone(), e.size, digest))
            .take(RECHECKS_AT_MOST + 1)
            .collect();
        for (key, digest, racy_then) in std::mem::take(&mut self.memos) {
            if racy_then && recheck.len() > RECHECKS_AT_MOST {
                continue;
            }
            let recheck = if racy_then { recheck.clone() } else { Vec::new() };
            self.ctx.memo.insert(key, Memo { digest, recheck });
        }
        // A racily clean file was hashed correctly for this plan, but its digest is not kept:
        // the next plan reads it again.
        let fresh: Vec<(String, CachedDigest)> = local
            .newly_hashed()
            .filter(|(e, _)| !racy(&e.stamp, started))
            .map(|(e, digest)| {
                (
                    e.path.clone(),
                    CachedDigest {
                        stamp: e.stamp,
                        size: e.size,
                        digest,
                    },
                )
            })
            .collect();
        let n = local.hashed_files();
        let (entries, KnownSlots { mut known, replaced }) = local.into_parts();
        let mut new_contents = false;
        for (i, before) in replaced {
            let Some(now) = known[i].as_mut() else { continue };
            now.valid = !racy(&entries[i].stamp, started);
            new_contents |= before.is_none_or(|b| b.digest != now.digest);
        }
        self.ctx.entries = Some(entries);
        self.ctx.known = known;
        (
            Learnt {
                upserts: fresh,
                new_contents,
            },
            n,
        )
    }
}

impl Drop for IndexSources<'_> {
    fn drop(&mut self) {
        // A plan that failed before `finish` still gives the entries and digests back, as
        // they were before it: what it read is not kept (a racy read must not pass as valid).
        if let Some(local) = self.local.take() {
            let (entries, KnownSlots { mut known, replaced }) = local.into_parts();
            for (i, before) in replaced.into_iter().rev() {
                known[i] = before;
            }
            self.ctx.entries = Some(entries);
            self.ctx.known = known;
        }
    }
}

/// What a plan learnt about a context's files.
#[derive(Debug, Default)]
pub struct Learnt {
    /// Digests to keep, with the stamps they were taken at.
    pub upserts: Vec<(String, CachedDigest)>,
    /// Whether some file's contents were new (not only its stamp).
    pub new_contents: bool,
}

impl StepSources for IndexSources<'_> {
    fn context_sources(&mut self, _at: StepRef, def: &CopyDef) -> Result<SourcesDigest, SelectError> {
        let key = (def.sources.clone(), def.excludes.clone());
        if !self.all_files {
            if let Some((_, d, _)) = self.memos.iter().find(|(k, _, _)| *k == key) {
                return Ok(d.clone());
            }
            if self.ctx.memo_holds(&key) {
                if let Some(m) = self.ctx.memo.get(&key) {
                    return Ok(m.digest.clone());
                }
            }
        }
        let all_files = self.all_files;
        let ctx = &mut *self.ctx;
        let local = self.local.get_or_insert_with(|| {
            // Lent for the plan, not copied: `finish` (or dropping these sources) returns them.
            let entries = ctx.entries.take().unwrap_or_default();
            let slots = KnownSlots {
                known: std::mem::take(&mut ctx.known),
                replaced: Vec::new(),
            };
            let mut local = LocalContext::with_slots(&ctx.root, entries, slots);
            if !all_files {
                local.list_at_most(FILES_LISTED);
            }
            local
        });
        let (generations, subtrees) = (&ctx.generations, ctx.subtrees.get(&key));
        let generation = |path: &str| generations.get(path).copied().unwrap_or(0);
        let known = |path: &str| {
            let (taken, digest) = subtrees?.get(path)?;
            (*taken == generation(path)).then_some(*digest)
        };
        let mut d = local.digest_sources_reusing(def, &known)?;
        let taken: Subtrees = std::mem::take(&mut d.subtrees)
            .into_iter()
            .map(|(path, digest)| {
                let g = generation(&path);
                (path, (g, digest))
            })
            .collect();
        // Racy files need no care here (unlike the whole digest's memo): any write to one
        // moves its directory's generation, even when its stamp stays the same.
        self.taken.push((key.clone(), taken));
        self.summaries.push((d.digest.clone(), std::mem::take(&mut d.summary)));
        self.dir_nodes.append(&mut d.nodes);
        if !self.all_files {
            d.files.truncate(FILES_LISTED);
            // Kept for as long as the context is unchanged: not the capacity of every file.
            d.files.shrink_to_fit();
            self.memos.push((key, d.clone(), ctx.has_racy_files()));
        }
        Ok(d)
    }

    fn stage_sources(&mut self, _at: StepRef, _stage: usize, _def: &CopyDef) -> Option<SourcesDigest> {
        None
    }

    fn image_identity(&mut self, reference: &str) -> Option<String> {
        (self.images)(reference)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_records::SledRecords;

    fn copy_all() -> CopyDef {
        CopyDef::from_context(&["."], "/d/")
    }

    /// One plan's worth of work on `ctx`: refresh, digest `COPY . /d/`, keep what it learnt.
    fn plan(index: &ContextIndex, ctx: &Mutex<IndexedContext>) -> String {
        let mut ctx = ctx.lock().unwrap();
        let removed = ctx.refresh().unwrap();
        let no_images = |_: &str| None;
        let mut sources = ctx.sources(false, &no_images);
        let at = StepRef { stage: 0, step: 0 };
        let d = sources.context_sources(at, &copy_all()).unwrap().digest;
        let (learnt, _) = sources.finish();
        index.persist(&ctx, learnt, removed).unwrap();
        d
    }

    /// `path`'s ctime, in ns since the epoch.
    fn ctime_ns(path: &Path) -> i64 {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).unwrap();
        m.ctime() * 1_000_000_000 + m.ctime_nsec()
    }

    fn index(dir: &Path, watch: bool) -> ContextIndex {
        ContextIndex::new(Arc::new(SledRecords::open(&dir.join("db")).unwrap()), watch)
    }

    #[test]
    fn a_digest_taken_while_its_file_may_still_change_unseen_is_not_kept() {
        let store = tempfile::tempdir().unwrap();
        let context = tempfile::tempdir().unwrap();
        let file = context.path().join("a");
        std::fs::write(&file, "one").unwrap();
        let ctime = ctime_ns(&file);
        let index = index(store.path(), false);
        let ctx = index.context(context.path()).unwrap();
        {
            // A plan that starts in the same tick as the write, whatever the machine's load.
            let mut c = ctx.lock().unwrap();
            let removed = c.refresh().unwrap();
            c.plan_started_ns = ctime + 1_000_000;
            let no_images = |_: &str| None;
            let mut sources = c.sources(false, &no_images);
            sources
                .context_sources(StepRef { stage: 0, step: 0 }, &copy_all())
                .unwrap();
            let (learnt, hashed) = sources.finish();
            assert_eq!(
                (learnt.upserts.len(), hashed),
                (0, 1),
                "racily clean: read and used, not kept"
            );
            index.persist(&c, learnt, removed).unwrap();
            let memo: Vec<_> = c
                .memo
                .values()
                .flat_map(|m| &m.recheck)
                .map(|(p, _, _)| p.as_str())
                .collect();
            assert_eq!(memo, ["a"], "memoised with the file to read again");
        }
        assert_eq!(ctx.lock().unwrap().status().digests, 0);
        std::thread::sleep(Duration::from_millis(2 * (RACY_WINDOW_NS / 1_000_000) as u64));
        plan(&index, &ctx);
        assert_eq!(ctx.lock().unwrap().status().digests, 1, "old enough to trust now");
    }

    /// One plan's digest of `COPY . /d/` on `c` as it stands (no refresh: what the index
    /// has not seen), with the number of files it read.
    fn digest_unrefreshed(c: &mut IndexedContext) -> (String, usize) {
        let no_images = |_: &str| None;
        let mut sources = c.sources(false, &no_images);
        let d = sources
            .context_sources(StepRef { stage: 0, step: 0 }, &copy_all())
            .unwrap()
            .digest;
        (d, sources.finish().1)
    }

    #[test]
    fn a_digest_memoised_over_a_racy_file_is_used_only_while_the_file_reads_the_same() {
        let store = tempfile::tempdir().unwrap();
        let context = tempfile::tempdir().unwrap();
        std::fs::write(context.path().join("b"), "bee").unwrap();
        std::thread::sleep(Duration::from_millis(2 * (RACY_WINDOW_NS / 1_000_000) as u64));
        let file = context.path().join("a");
        std::fs::write(&file, "one").unwrap();
        let ctime = ctime_ns(&file);
        let idx = index(store.path(), false);
        let ctx = idx.context(context.path()).unwrap();
        let mut c = ctx.lock().unwrap();
        c.refresh().unwrap();
        // Planned in the tick of the write: `a` may still change unseen.
        c.plan_started_ns = ctime + 1_000_000;
        let (first, read) = digest_unrefreshed(&mut c);
        assert_eq!(read, 2);
        assert_eq!(
            digest_unrefreshed(&mut c),
            (first.clone(), 0),
            "the memo, its files read the same"
        );
        // A write in the same tick leaves the stamp: the index sees nothing, the recheck does.
        std::fs::write(&file, "two").unwrap();
        let (second, read) = digest_unrefreshed(&mut c);
        assert_ne!(second, first, "a memo over contents no longer there is not used");
        assert_eq!(read, 1, "the racy file read again, not the whole selection");
        // Once the tick is long past, a read that finds the same contents is the last.
        c.plan_started_ns = ctime + 10 * RACY_WINDOW_NS;
        assert_eq!(digest_unrefreshed(&mut c), (second.clone(), 0));
        assert!(
            c.memo.values().all(|m| m.recheck.is_empty()),
            "nothing left to read again"
        );
        drop(c);
        let fresh_store = tempfile::tempdir().unwrap();
        let fresh = index(fresh_store.path(), false);
        let fresh_ctx = fresh.context(context.path()).unwrap();
        assert_eq!(plan(&fresh, &fresh_ctx), second, "the digest a fresh index takes");
    }

    #[test]
    fn an_edit_the_watcher_saw_makes_the_newest_stamp_without_a_whole_walk() {
        let store = tempfile::tempdir().unwrap();
        let context = tempfile::tempdir().unwrap();
        std::fs::create_dir(context.path().join("d")).unwrap();
        std::fs::write(context.path().join("d/a"), "one").unwrap();
        std::thread::sleep(Duration::from_millis(2 * (RACY_WINDOW_NS / 1_000_000) as u64));
        let idx = index(store.path(), true);
        let ctx = idx.context(context.path()).unwrap();
        plan(&idx, &ctx);
        let old = ctx.lock().unwrap().newest_stamp.unwrap();
        std::fs::write(context.path().join("d/a"), "two").unwrap();
        let ctime = ctime_ns(&context.path().join("d/a"));
        assert!(ctime > old.ctime_ns);
        let mut c = ctx.lock().unwrap();
        c.refresh().unwrap();
        assert_eq!(c.mode, WatchMode::Watching, "listed again, not walked");
        assert_eq!(c.newest_stamp.map(|s| s.ctime_ns), Some(ctime));
    }

    #[test]
    fn a_touched_file_is_read_again_but_brings_no_new_contents() {
        let store = tempfile::tempdir().unwrap();
        let context = tempfile::tempdir().unwrap();
        let file = context.path().join("a");
        std::fs::write(&file, "one").unwrap();
        std::thread::sleep(Duration::from_millis(2 * (RACY_WINDOW_NS / 1_000_000) as u64));
        let index = index(store.path(), false);
        let ctx = index.context(context.path()).unwrap();
        let learn = |touch: &dyn Fn()| {
            touch();
            let mut c = ctx.lock().unwrap();
            c.refresh().unwrap();
            c.plan_started_ns += 10 * RACY_WINDOW_NS; // as if the plan ran well after the write
            let no_images = |_: &str| None;
            let mut sources = c.sources(false, &no_images);
            sources
                .context_sources(StepRef { stage: 0, step: 0 }, &copy_all())
                .unwrap();
            sources.finish()
        };
        let (first, _) = learn(&|| {});
        assert!(first.new_contents && first.upserts.len() == 1);
        let t = nix::sys::time::TimeSpec::new(1_700_000_000, 0);
        let touch = || {
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &file,
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap()
        };
        let (touched, hashed) = learn(&touch);
        assert_eq!(
            (touched.upserts.len(), hashed, touched.new_contents),
            (1, 1, false),
            "written behind"
        );
        let (edited, _) = learn(&|| std::fs::write(&file, "two").unwrap());
        assert!(edited.new_contents, "waited for");
    }

    #[test]
    fn a_plan_that_fails_keeps_the_entries_and_digests_it_borrowed() {
        let store = tempfile::tempdir().unwrap();
        let context = tempfile::tempdir().unwrap();
        std::fs::write(context.path().join("a"), "one").unwrap();
        std::fs::write(context.path().join("b"), "bee").unwrap();
        let settle = || std::thread::sleep(Duration::from_millis(2 * (RACY_WINDOW_NS / 1_000_000) as u64));
        settle();
        let index = index(store.path(), false);
        let ctx = index.context(context.path()).unwrap();
        plan(&index, &ctx);
        std::fs::write(context.path().join("b"), "bee, edited").unwrap();
        settle();
        {
            let mut c = ctx.lock().unwrap();
            c.refresh().unwrap();
            let no_images = |_: &str| None;
            let mut sources = c.sources(false, &no_images);
            let at = StepRef { stage: 0, step: 0 };
            sources.context_sources(at, &copy_all()).unwrap();
            let missing = CopyDef::from_context(&["nope"], "/d/");
            assert!(sources.context_sources(at, &missing).is_err());
            // Dropped without `finish`, as a failed plan is.
        }
        assert!(
            ctx.lock().unwrap().memo.is_empty(),
            "a failed plan's listings may not be stored: nothing memoised"
        );
        let status = ctx.lock().unwrap().status();
        assert_eq!(
            (status.entries, status.digests),
            (2, 1),
            "`a` as it was; `b`, read by the failed plan, not kept"
        );
        let mut c = ctx.lock().unwrap();
        c.refresh().unwrap();
        let no_images = |_: &str| None;
        let mut sources = c.sources(true, &no_images);
        let d = sources
            .context_sources(StepRef { stage: 0, step: 0 }, &copy_all())
            .unwrap();
        assert_eq!((d.files.len(), d.total), (2, 2));
        assert_eq!(sources.finish().1, 1, "`b` read again, `a` not");
    }

    #[test]
    fn racy_means_changed_within_the_timestamp_granularity_of_the_read() {
        let at = |mtime_ns, ctime_ns| FileStamp {
            mtime_ns,
            ctime_ns,
            ino: 1,
            dev: 1,
        };
        let now = 100_000_000_123;
        assert!(racy(&at(0, now - 1_000_000), now), "same tick");
        assert!(
            !racy(&at(now + 3_600_000_000_000, now - 1_000_000_001), now),
            "mtime is the user's to set"
        );
        assert!(
            racy(&at(0, now - 1_000_000_000 - 123), now),
            "whole-second stamps get a wider window"
        );
    }

    #[test]
    fn a_watcher_error_switches_the_context_to_stat_walks_for_good() {
        let store = tempfile::tempdir().unwrap();
        let context = tempfile::tempdir().unwrap();
        let index = index(store.path(), true);
        let ctx = index.context(context.path()).unwrap();
        plan(&index, &ctx);
        assert_eq!(ctx.lock().unwrap().status().mode, "watching");
        *ctx.lock().unwrap().signals.failed.lock().unwrap() = Some("the file watcher failed (queue overflow)".into());
        plan(&index, &ctx);
        std::fs::write(context.path().join("later"), "x").unwrap();
        plan(&index, &ctx);
        let status = ctx.lock().unwrap().status();
        assert_eq!(status.mode, "stat-walk");
        assert!(status.reason.unwrap().contains("watcher failed"));
        assert_eq!(status.entries, 1, "the edit made after the switch is seen by the walk");
    }

    #[test]
    fn the_barrier_file_never_lands_in_the_tree_and_never_follows_a_planted_link() {
        let store = tempfile::tempdir().unwrap();
        let context = tempfile::tempdir().unwrap();
        let victim = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(victim.path(), "keep").unwrap();
        std::os::unix::fs::symlink(victim.path(), context.path().join(format!("{BARRIER_PREFIX}x"))).unwrap();
        let index = index(store.path(), true);
        let ctx = index.context(context.path()).unwrap();
        for _ in 0..3 {
            plan(&index, &ctx);
        }
        assert_eq!(std::fs::read_to_string(victim.path()).unwrap(), "keep");
        assert_eq!(ctx.lock().unwrap().status().entries, 0, "markers are never entries");
    }

    #[test]
    fn a_context_directory_replaced_by_a_fresh_checkout_is_watched_again() {
        // A CI workspace checked out afresh into the same path, or `rm -rf app && git clone`:
        // the watcher watched the old directory, so every plan's barrier used to wait out its
        // 2 s and then walk the whole tree, for good.
        let store = tempfile::tempdir().unwrap();
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("app");
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::fs::write(root.join("src/a"), "one").unwrap();
        let index = index(store.path(), true);
        let ctx = index.context(&root).unwrap();
        let first = plan(&index, &ctx);
        for (round, how) in ["moved away", "removed"].iter().enumerate() {
            match round {
                0 => std::fs::rename(&root, top.path().join("app.old")).unwrap(),
                _ => std::fs::remove_dir_all(&root).unwrap(),
            }
            std::fs::create_dir_all(root.join("src")).unwrap();
            std::fs::write(root.join("src/a"), format!("checkout {round}")).unwrap();
            let again = plan(&index, &ctx);
            assert_ne!(again, first, "{how}: the new tree's contents");
            let c = ctx.lock().unwrap();
            assert_eq!(c.status().mode, "watching", "{how}");
            assert!(c.sync_watcher(), "{how}: the new directory is watched");
            drop(c);
            // And an edit in it is seen.
            std::fs::write(root.join("src/a"), format!("edited {round}")).unwrap();
            assert_ne!(plan(&index, &ctx), again, "{how}: an edit after the checkout");
        }
    }

    #[test]
    fn after_the_watchers_queue_overflows_the_context_is_watched_again_not_stat_walked() {
        // A branch switch in a big tree can queue more events than inotify keeps (16,384 by
        // default); the context used to be stat-walked from then on, for as long as lcached
        // ran.
        let store = tempfile::tempdir().unwrap();
        let context = tempfile::tempdir().unwrap();
        let root = context.path();
        std::fs::write(root.join("a"), "one").unwrap();
        let index = index(store.path(), true);
        let ctx = index.context(root).unwrap();
        plan(&index, &ctx);
        let signals = ctx.lock().unwrap().signals.clone();
        // Three events a file (made, written, closed), past the queue and the watcher's
        // first read of 64 KiB.
        let queued: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(16384);
        if queued > 200_000 {
            eprintln!("skipped: this machine queues {queued} inotify events, too many to overflow in a test");
            return;
        }
        {
            // Held, the watcher stops at its first event while the kernel's queue overflows.
            let _held = signals.dirty.lock().unwrap();
            for i in 0..queued / 3 + 3000 {
                std::fs::write(root.join(format!("f{i}")), "x").unwrap();
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !signals.stale.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "the queue never overflowed");
            std::thread::sleep(Duration::from_millis(20));
        }
        // A directory made while events were lost is watched by the new watcher.
        std::fs::create_dir(root.join("made-meanwhile")).unwrap();
        let digest = plan(&index, &ctx);
        let whole = lcache_context::local_context::LocalContext::walk(root)
            .unwrap()
            .digest_sources(&copy_all())
            .unwrap();
        assert_eq!(digest, whole.digest, "the lost events' changes are in the plan");
        let c = ctx.lock().unwrap();
        assert_eq!(c.status().mode, "watching");
        assert!(c.sync_watcher());
        drop(c);
        std::fs::write(root.join("made-meanwhile/g"), "new").unwrap();
        assert_ne!(plan(&index, &ctx), digest, "an edit in it is seen");
    }

    /// Applies `op` (0..19) to the tree at `root`, with `n` to vary names and contents;
    /// `outside` holds other hard links to some of its files.
    fn mutate(root: &Path, outside: &Path, op: u64, n: u64) {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let p = |rel: &str| root.join(rel);
        // Some operations do not apply to the tree as it is (a file where a directory was):
        // they fail, and the tree stays as it is.
        let write = |rel: &str, body: String| {
            std::fs::create_dir_all(p(rel).parent().unwrap_or(root)).and_then(|()| std::fs::write(p(rel), body))
        };
        let d = n % 3;
        let _ = match op {
            0 => write(&format!("a/b{d}/f{}", n % 5), format!("edit {n}")),
            1 => write(&format!("new{n}/deep/x/f"), format!("{n}")),
            2 => std::fs::remove_file(p(&format!("a/b{d}/f{}", n % 5))),
            3 => std::fs::remove_dir_all(p(&format!("a/b{d}"))),
            4 => std::fs::set_permissions(
                p(&format!("a/b{d}")),
                std::fs::Permissions::from_mode(0o700 + (n % 2) as u32 * 0o55),
            ),
            5 => std::fs::set_permissions(
                p("top.txt"),
                std::fs::Permissions::from_mode(0o600 + (n % 2) as u32 * 0o44),
            ),
            6 => std::fs::remove_file(p("top.txt")).and_then(|()| std::fs::create_dir_all(p("top.txt/inner"))),
            7 => std::fs::remove_dir_all(p("top.txt")).and_then(|()| write("top.txt", format!("file again {n}"))),
            8 => symlink(format!("a/b{d}"), p(&format!("link{n}"))),
            9 => std::fs::rename(p(&format!("a/b{d}")), p(&format!("a/moved{n}"))),
            10 => std::fs::rename(p(&format!("a/b{d}/f0")), p(&format!("a/b{}/g{n}", (d + 1) % 3))),
            11 => write(&format!("ignored/f{n}"), format!("{n}")),
            12 => write(&format!("keep/in/f{}", n % 2), format!("kept {n}")),
            13 => write(&format!("keep/out{n}"), format!("{n}")),
            14 => write("top.txt", format!("top {n}")),
            // A file made with a second link outside the context, then written or unlinked
            // there: no event reaches the context's directories.
            16 => write(&format!("a/b{d}/h{n}"), format!("linked {n}"))
                .and_then(|()| std::fs::hard_link(p(&format!("a/b{d}/h{n}")), outside.join(format!("h{n}")))),
            17 | 18 => {
                let mut links: Vec<PathBuf> = std::fs::read_dir(outside)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .collect();
                links.sort();
                match links.get(n as usize % links.len().max(1)) {
                    Some(l) if op == 17 => std::fs::OpenOptions::new()
                        .append(true)
                        .open(l)
                        .and_then(|mut f| std::io::Write::write_all(&mut f, format!(" +{n}").as_bytes())),
                    Some(l) => std::fs::remove_file(l),
                    None => Ok(()),
                }
            }
            _ => std::fs::rename(p(&format!("a/moved{}", n.saturating_sub(1))), p(&format!("a/b{d}"))),
        };
    }

    #[test]
    fn after_any_edit_the_listings_read_again_give_what_a_whole_walk_gives() {
        use lcache_context::local_context::LocalContext;
        let store = tempfile::tempdir().unwrap();
        let context = tempfile::tempdir().unwrap();
        let root = context.path();
        let outside = tempfile::tempdir().unwrap();
        let mutate = |op, n| mutate(root, outside.path(), op, n);
        std::fs::write(root.join(".dockerignore"), "ignored\nkeep/*\n!keep/in\n").unwrap();
        for n in 0..15 {
            mutate(0, n);
        }
        mutate(12, 0);
        mutate(14, 0);
        mutate(16, 0);
        std::thread::sleep(Duration::from_millis(2 * (RACY_WINDOW_NS / 1_000_000) as u64));
        let index = index(store.path(), true);
        let ctx = index.context(root).unwrap();
        plan(&index, &ctx);
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..120 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            mutate(seed % 19, round);
            if round % 3 == 0 {
                mutate((seed >> 8) % 19, round + 1000);
            }
            let digest = plan(&index, &ctx);
            let c = ctx.lock().unwrap();
            assert_eq!(c.status().mode, "watching");
            let ignore = read_dockerignore(root).unwrap();
            assert_eq!(c.entries.as_ref(), Some(&walk(root, &ignore).unwrap()), "round {round}");
            let whole = LocalContext::walk(root).unwrap().digest_sources(&copy_all()).unwrap();
            assert_eq!(
                digest, whole.digest,
                "round {round}: digests carried as a whole walk carries them"
            );
        }
    }
}
