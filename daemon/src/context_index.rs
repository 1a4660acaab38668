//! Per build context, what the daemon knows about its files: the entry list, each file's
//! digest with the stamp it was taken at (persisted in the record store, so a restart does
//! not re-read the tree), and a notify watcher that marks the context changed. With no change
//! a plan reads no file and stats nothing; after an edit only files whose stamp moved are
//! re-read. Where watching is impossible every plan re-stats the tree (a stat walk).

use std::collections::HashMap;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use lcache_context::context_walk::{read_dockerignore, walk};
use lcache_context::errors::ContextError;
use lcache_context::local_context::LocalContext;
use lcache_proto::build_plan::CopyDef;
use lcache_proto::errors::SelectError;
use lcache_proto::source_select::{ContextEntry, EntryKind};
use lcache_proto::sources_digest::SourcesDigest;
use lcache_proto::step_keys::{StepRef, StepSources};
use lcache_proto::wire::{ContextIndexStatus, FILES_LISTED};
use notify::Watcher;

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

/// Name prefix of the marker files that make watcher delivery a barrier.
const COOKIE_PREFIX: &str = ".lcache-cookie-";

/// What the watcher thread tells planners.
#[derive(Default)]
struct WatchSignals {
    changed: AtomicBool,
    cookies: Mutex<HashSet<String>>,
    cookie_seen: Condvar,
}

static COOKIE_SEQ: AtomicU64 = AtomicU64::new(0);

/// One indexed context.
pub struct IndexedContext {
    root: PathBuf,
    root_key: String,
    entries: Option<Vec<ContextEntry>>,
    digests: HashMap<String, CachedDigest>,
    signals: Arc<WatchSignals>,
    mode: WatchMode,
    _watcher: Option<notify::RecommendedWatcher>,
    memo: HashMap<MemoKey, SourcesDigest>,
}

/// All indexed contexts.
pub struct ContextIndex {
    records: Arc<dyn RecordStore>,
    watch: bool,
    contexts: Mutex<HashMap<PathBuf, Arc<Mutex<IndexedContext>>>>,
}

impl ContextIndex {
    /// An empty index; `watch` false forces stat walks everywhere (`lcached --watch off`).
    pub fn new(records: Arc<dyn RecordStore>, watch: bool) -> Self {
        Self {
            records,
            watch,
            contexts: Mutex::new(HashMap::new()),
        }
    }

    /// The indexed context at `root` (created on first use, with its persisted digests).
    pub fn context(&self, root: &Path) -> Result<Arc<Mutex<IndexedContext>>, IndexError> {
        let mut all = self.contexts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = all.get(root) {
            return Ok(c.clone());
        }
        let root_key = root.display().to_string();
        let digests = self.records.context_digests(&root_key)?.into_iter().collect();
        let signals = Arc::new(WatchSignals {
            changed: AtomicBool::new(true),
            ..WatchSignals::default()
        });
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
                Err(reason) => (None, WatchMode::StatWalk(reason)),
            }
        } else {
            (None, WatchMode::StatWalk("watching disabled (--watch off)".into()))
        };
        let c = Arc::new(Mutex::new(IndexedContext {
            root: root.to_path_buf(),
            root_key,
            entries: None,
            digests,
            signals,
            mode,
            _watcher: watcher,
            memo: HashMap::new(),
        }));
        all.insert(root.to_path_buf(), c.clone());
        Ok(c)
    }

    /// Every indexed context's status.
    pub fn statuses(&self) -> Vec<ContextIndexStatus> {
        let all: Vec<_> = self
            .contexts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut out: Vec<_> = all
            .iter()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).status())
            .collect();
        out.sort_by(|a, b| a.root.cmp(&b.root));
        out
    }

    /// Persists what a plan learnt: new digests, and digests of files gone from the tree.
    pub fn persist(
        &self,
        ctx: &IndexedContext,
        upserts: &[(String, CachedDigest)],
        removals: &[String],
    ) -> Result<(), StoreError> {
        if upserts.is_empty() && removals.is_empty() {
            return Ok(());
        }
        self.records.update_context_digests(&ctx.root_key, upserts, removals)?;
        // Hashing cost real reads; make it survive a crash so a restart does not repeat it.
        self.records.flush()
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

fn start_watcher(root: &Path, signals: Arc<WatchSignals>) -> Result<notify::RecommendedWatcher, String> {
    let mut w = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            // A watcher error (an overflowed queue) means "look again".
            signals.changed.store(true, Ordering::SeqCst);
            return;
        };
        if event.kind.is_access() {
            // Opening or reading a file changes nothing, and our own hashing causes these.
            return;
        }
        let mut other = event.paths.is_empty();
        for p in &event.paths {
            match p
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| n.starts_with(COOKIE_PREFIX))
            {
                Some(name) if event.kind.is_create() => {
                    signals
                        .cookies
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.to_string());
                    signals.cookie_seen.notify_all();
                }
                Some(_) => {}
                None => other = true,
            }
        }
        if other {
            signals.changed.store(true, Ordering::SeqCst);
        }
    })
    .map_err(|e| format!("cannot start a file watcher: {e}"))?;
    w.watch(root, notify::RecursiveMode::Recursive)
        .map_err(|e| match e.kind {
            notify::ErrorKind::MaxFilesWatch => {
                "too many directories to watch (raise fs.inotify.max_user_watches)".to_string()
            }
            _ => format!("cannot watch {}: {e}", root.display()),
        })?;
    Ok(w)
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
            digests: self.digests.len(),
        }
    }

    /// Brings the entry list up to date: no work when the watcher saw nothing. Returns the
    /// paths whose cached digests no longer exist in the tree.
    pub fn refresh(&mut self) -> Result<Vec<String>, IndexError> {
        let must_walk = self.entries.is_none() || self.mode != WatchMode::Watching || !self.sync_watcher();
        // Clear the flag before walking: an event during the walk marks it again.
        if !self.signals.changed.swap(false, Ordering::SeqCst) && !must_walk {
            return Ok(Vec::new());
        }
        let ignore = read_dockerignore(&self.root)?;
        let entries = walk(&self.root, &ignore)?;
        if self.entries.as_ref() != Some(&entries) {
            self.memo.clear();
        }
        let mut present = std::collections::HashSet::with_capacity(entries.len());
        for e in &entries {
            if e.kind == EntryKind::File {
                present.insert(e.path.as_str());
            }
        }
        let removed: Vec<String> = self
            .digests
            .keys()
            .filter(|p| !present.contains(p.as_str()))
            .cloned()
            .collect();
        for p in &removed {
            self.digests.remove(p);
        }
        self.entries = Some(entries);
        Ok(removed)
    }

    /// Waits until the watcher has delivered every event that happened before this call:
    /// inotify keeps order, so once a marker file created now is reported, so is any edit
    /// made before it. False when that cannot be known (read-only context, slow watcher).
    fn sync_watcher(&self) -> bool {
        let name = format!(
            "{COOKIE_PREFIX}{}-{}",
            std::process::id(),
            COOKIE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.root.join(&name);
        if std::fs::write(&path, b"").is_err() {
            return false;
        }
        let cookies = self.signals.cookies.lock().unwrap_or_else(|p| p.into_inner());
        let (mut cookies, _) = self
            .signals
            .cookie_seen
            .wait_timeout_while(cookies, Duration::from_secs(2), |c| !c.contains(&name))
            .unwrap_or_else(|p| p.into_inner());
        let seen = cookies.remove(&name);
        drop(cookies);
        let _ = std::fs::remove_file(&path);
        seen
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
        }
    }
}

/// [`StepSources`] over an indexed context: memoised digests first, then a
/// [`LocalContext`] that reuses every still-valid file digest.
pub struct IndexSources<'a> {
    ctx: &'a mut IndexedContext,
    local: Option<LocalContext>,
    all_files: bool,
    images: &'a dyn Fn(&str) -> Option<String>,
    /// Summaries of digests computed in this plan, for `explain` to diff later.
    pub summaries: Vec<(String, Vec<lcache_proto::sources_digest::SummaryEntry>)>,
}

impl IndexSources<'_> {
    /// Files read by this plan, with the digests to cache.
    pub fn finish(self) -> (Vec<(String, CachedDigest)>, usize) {
        let Some(local) = self.local else {
            return (Vec::new(), 0);
        };
        let fresh: Vec<(String, CachedDigest)> = local
            .newly_hashed()
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
        for (p, d) in &fresh {
            self.ctx.digests.insert(p.clone(), *d);
        }
        let n = local.hashed_files();
        (fresh, n)
    }
}

impl StepSources for IndexSources<'_> {
    fn context_sources(&mut self, _at: StepRef, def: &CopyDef) -> Result<SourcesDigest, SelectError> {
        let key = (def.sources.clone(), def.excludes.clone());
        if !self.all_files {
            if let Some(d) = self.ctx.memo.get(&key) {
                return Ok(d.clone());
            }
        }
        let ctx = &mut *self.ctx;
        let local = self.local.get_or_insert_with(|| {
            let entries = ctx.entries.clone().unwrap_or_default();
            let digests = &ctx.digests;
            LocalContext::from_entries(&ctx.root, entries, |e| {
                digests
                    .get(&e.path)
                    .filter(|c| c.stamp == e.stamp && c.size == e.size)
                    .map(|c| c.digest)
            })
        });
        let mut d = local.digest_sources(def)?;
        self.summaries.push((d.digest.clone(), std::mem::take(&mut d.summary)));
        if !self.all_files {
            d.files.truncate(FILES_LISTED);
            ctx.memo.insert(key, d.clone());
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
