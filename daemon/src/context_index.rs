//! Per build context, what the daemon knows about its files: the entry list, each file's
//! digest with the stamp it was taken at (persisted in the record store, so a restart does
//! not re-read the tree), and a notify watcher that marks the context changed. With no change
//! a plan reads no file and stats nothing; after an edit only files whose stamp moved are
//! re-read. Where watching is impossible every plan re-stats the tree (a stat walk).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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

/// One indexed context.
pub struct IndexedContext {
    root: PathBuf,
    root_key: String,
    entries: Option<Vec<ContextEntry>>,
    digests: HashMap<String, CachedDigest>,
    changed: Arc<AtomicBool>,
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
        let changed = Arc::new(AtomicBool::new(true));
        let (watcher, mode) = if self.watch {
            match start_watcher(root, changed.clone()) {
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
            changed,
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
        self.records.update_context_digests(&ctx.root_key, upserts, removals)
    }
}

fn start_watcher(root: &Path, changed: Arc<AtomicBool>) -> Result<notify::RecommendedWatcher, String> {
    let mut w = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        // Any event, and any watcher error (an overflowed queue), means "look again".
        changed.store(true, Ordering::SeqCst);
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
        let must_walk = self.entries.is_none() || self.mode != WatchMode::Watching;
        // Clear the flag before walking: an event during the walk marks it again.
        if !self.changed.swap(false, Ordering::SeqCst) && !must_walk {
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

    /// Key sources over this context; `all_files` lists every selected file.
    pub fn sources(&mut self, all_files: bool) -> IndexSources<'_> {
        IndexSources {
            ctx: self,
            local: None,
            all_files,
        }
    }
}

/// [`StepSources`] over an indexed context: memoised digests first, then a
/// [`LocalContext`] that reuses every still-valid file digest.
pub struct IndexSources<'a> {
    ctx: &'a mut IndexedContext,
    local: Option<LocalContext>,
    all_files: bool,
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
        if !self.all_files {
            d.files.truncate(FILES_LISTED);
            ctx.memo.insert(key, d.clone());
        }
        Ok(d)
    }

    fn stage_sources(&mut self, _at: StepRef, _stage: usize, _def: &CopyDef) -> Option<SourcesDigest> {
        None
    }

    fn image_identity(&mut self, _reference: &str) -> Option<String> {
        None
    }
}
