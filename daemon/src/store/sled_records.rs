//! [`RecordStore`] on sled: one tree per kind of record, values through the codec; a
//! context's file digests and the sources digests' directory listings in value logs beside
//! it (see [`super::value_log`]).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use lcache_image::image_draft::DeferredBuild;
use lcache_proto::wire::{BuildRecord, ImageRecord, StepRecord};

use super::value_log::ValueLog;
use super::{
    is_full, step_id, BlobMeta, CachedDigest, ListingsDropped, ProvisionalOutcome, RecordStore, StoreError, TokenRecord,
};
use crate::codec::{decode, encode, Stored};

/// sled-backed records.
pub struct SledRecords {
    db: sled::Db,
    steps: sled::Tree,
    blobs: sled::Tree,
    access: sled::Tree,
    builds: sled::Tree,
    /// How many builds `builds` holds: counted once at open, as sled counts by walking.
    build_count: std::sync::atomic::AtomicUsize,
    /// Each context directory's file digests, by root and directory.
    contexts: ValueLog,
    images: sled::Tree,
    summaries: sled::Tree,
    /// Directory listings by node digest.
    dir_nodes: ValueLog,
    tokens: sled::Tree,
    evicted: sled::Tree,
    deferred: sled::Tree,
    provisional: sled::Tree,
    /// How many names `provisional` holds, counted once at open.
    provisional_count: std::sync::atomic::AtomicUsize,
    /// Layers kept as their tar: the blob of each one gzipped for a push, by the tar's digest.
    gzip_forms: sled::Tree,
    /// While a collection of listings runs: the summaries and listings put since it began.
    collecting: std::sync::Mutex<Option<Collecting>>,
}

/// What a collection of listings keeps whatever it found: the summaries and listings put
/// (stored now, or found stored) since it began, which plans running meanwhile refer to.
#[derive(Default)]
struct Collecting {
    summaries: HashSet<String>,
    nodes: HashSet<String>,
}

/// The most memory sled's page cache may hold.
const SLED_CACHE_BYTES: u64 = 32 << 20;

fn db_err(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) if is_full(&io) => StoreError::Full(format!("sled: {io}")),
        e => StoreError::Db(e.to_string()),
    }
}

impl SledRecords {
    /// Opens (creating) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // sled's default cache is 1 GiB and keeps every page it touched: a bound keeps the
        // daemon's memory from growing with the contexts it indexes (the OS page cache still
        // holds the file).
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(db_err)?;
        // Digests were kept one value per file before (10x the bytes written, see
        // `DirDigests`); they are simply learnt again, once.
        let _ = db.drop_tree("context_files");
        let tree = |name: &str| db.open_tree(name).map_err(db_err);
        let contexts = moved_to_log(&db, "context_dirs", &dir.join("context_digests.log"))?;
        let dir_nodes = moved_to_log(&db, "dir_nodes", &dir.join("dir_nodes.log"))?;
        Ok(Self {
            steps: tree("steps")?,
            blobs: tree("blobs")?,
            access: tree("access")?,
            build_count: std::sync::atomic::AtomicUsize::new(tree("builds")?.len()),
            builds: tree("builds")?,
            contexts,
            images: tree("images")?,
            summaries: tree("summaries")?,
            dir_nodes,
            tokens: tree("tokens")?,
            evicted: tree("evicted")?,
            deferred: tree("deferred_builds")?,
            provisional_count: std::sync::atomic::AtomicUsize::new(tree("provisional_names")?.len()),
            provisional: tree("provisional_names")?,
            gzip_forms: tree("gzip_forms")?,
            collecting: std::sync::Mutex::new(None),
            db,
        })
    }
}

impl SledRecords {
    fn collecting(&self) -> std::sync::MutexGuard<'_, Option<Collecting>> {
        self.collecting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the summaries and listings neither kept (`sources`, `nodes`) nor put since the
    /// collection began.
    fn sweep_listings(
        &self,
        sources: &HashSet<String>,
        nodes: &HashSet<String>,
    ) -> Result<ListingsDropped, StoreError> {
        let mut dropped = ListingsDropped::default();
        {
            let collecting = self.collecting();
            let put = collecting.as_ref().map(|c| &c.summaries);
            for key in self.summaries.iter().keys() {
                let key = key.map_err(db_err)?;
                let digest = String::from_utf8_lossy(&key);
                if !sources.contains(digest.as_ref()) && !put.is_some_and(|p| p.contains(digest.as_ref())) {
                    self.summaries.remove(&key).map_err(db_err)?;
                    dropped.summaries += 1;
                }
            }
        }
        dropped.listings = self
            .dir_nodes
            .retain(|key| {
                let digest = String::from_utf8_lossy(key);
                nodes.contains(digest.as_ref())
                    || self
                        .collecting()
                        .as_ref()
                        .is_some_and(|c| c.nodes.contains(digest.as_ref()))
            })
            .map_err(log_err(&self.dir_nodes))?;
        self.db.flush().map_err(db_err)?;
        Ok(dropped)
    }
}

/// Opens the value log at `path`, first moving into it what the sled tree `name` holds (a
/// store written before the logs), then dropping the tree.
fn moved_to_log(db: &sled::Db, name: &str, path: &Path) -> Result<ValueLog, StoreError> {
    let path_err = |e: std::io::Error| StoreError::Db(format!("{}: {e}", path.display()));
    let log = ValueLog::open(path).map_err(path_err)?;
    if db.tree_names().iter().any(|t| t.as_ref() == name.as_bytes()) {
        let tree = db.open_tree(name).map_err(db_err)?;
        let values: Vec<(sled::IVec, sled::IVec)> = tree.iter().collect::<Result<_, _>>().map_err(db_err)?;
        log.put_many(values.iter().map(|(k, v)| (k.as_ref(), Some(v.as_ref()))))
            .map_err(path_err)?;
        log.sync().map_err(path_err)?;
        db.drop_tree(name).map_err(db_err)?;
    }
    Ok(log)
}

/// An I/O error of `log`, naming its file.
fn log_err(log: &ValueLog) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| match is_full(&e) {
        true => StoreError::Full(format!("{}: {e}", log.path().display())),
        false => StoreError::Db(format!("{}: {e}", log.path().display())),
    }
}

/// Inserts `key` into `tree`, whose keys sort oldest first and whose size `count` keeps,
/// then removes the oldest entries past the newest `keep`.
fn insert_keeping_newest(
    tree: &sled::Tree,
    count: &std::sync::atomic::AtomicUsize,
    key: &[u8],
    value: Vec<u8>,
    keep: usize,
) -> Result<(), StoreError> {
    use std::sync::atomic::Ordering::SeqCst;
    if tree.insert(key, value).map_err(db_err)?.is_none() {
        count.fetch_add(1, SeqCst);
    }
    while count.load(SeqCst) > keep {
        if tree.pop_min().map_err(db_err)?.is_none() {
            count.store(0, SeqCst);
            break;
        }
        count.fetch_sub(1, SeqCst);
    }
    Ok(())
}

/// A value of `tree` through the codec.
fn get<T: Stored>(tree: &sled::Tree, key: &str) -> Result<Option<T>, StoreError> {
    match tree.get(key).map_err(db_err)? {
        Some(v) => Ok(Some(decode(&v)?)),
        None => Ok(None),
    }
}

/// Stores a value in `tree` through the codec.
fn put<T: Stored>(tree: &sled::Tree, key: &[u8], value: &T) -> Result<(), StoreError> {
    tree.insert(key, encode(value)).map_err(db_err)?;
    Ok(())
}

/// The key under which a context file's digest lives: root, NUL, path.
/// One directory's cached file digests, by name, sorted: one sled value per directory, as a
/// value per file cost sled ten times the bytes (57 MiB written for 50,000 files, against
/// 16 MiB, and 7x the time, measured with sled's own settings here).
type DirDigests = Vec<(String, CachedDigest)>;

/// What one update does to one directory: digests put (by name), names gone.
type DirChange<'a> = (Vec<(&'a str, &'a CachedDigest)>, Vec<&'a str>);

/// A context path's directory and name (`""` for the context's top).
fn split_dir(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

fn context_key(root: &str, path: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(root.len() + path.len() + 1);
    k.extend_from_slice(root.as_bytes());
    k.push(0);
    k.extend_from_slice(path.as_bytes());
    k
}

impl RecordStore for SledRecords {
    fn get_step(&self, scope: &str, key: &str) -> Result<Option<StepRecord>, StoreError> {
        match self.steps.get(step_id(scope, key)).map_err(db_err)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    fn put_step(&self, scope: &str, record: &StepRecord) -> Result<(), StoreError> {
        let id = step_id(scope, &record.key);
        put(&self.steps, &id, record)?;
        self.evicted.remove(&id).map_err(db_err)?;
        Ok(())
    }

    fn put_step_first(&self, scope: &str, record: &StepRecord) -> Result<Option<StepRecord>, StoreError> {
        let id = step_id(scope, &record.key);
        let swapped = self
            .steps
            .compare_and_swap(&id, None as Option<&[u8]>, Some(encode(record)))
            .map_err(db_err)?;
        match swapped {
            Ok(()) => {
                self.evicted.remove(&id).map_err(db_err)?;
                Ok(None)
            }
            Err(e) => match e.current {
                Some(v) => Ok(Some(decode(&v)?)),
                // Removed between the two looks: nothing is there to win against.
                None => self.put_step(scope, record).map(|_| None),
            },
        }
    }

    fn get_blob(&self, digest: &str) -> Result<Option<BlobMeta>, StoreError> {
        get(&self.blobs, digest)
    }

    fn put_blob(&self, meta: &BlobMeta) -> Result<(), StoreError> {
        put(&self.blobs, meta.digest.as_bytes(), meta)
    }

    fn gzip_form(&self, tar: &str) -> Result<Option<BlobMeta>, StoreError> {
        get(&self.gzip_forms, tar)
    }

    fn put_gzip_form(&self, tar: &str, gzip: &BlobMeta) -> Result<(), StoreError> {
        put(&self.gzip_forms, tar.as_bytes(), gzip)
    }

    fn blobs(&self) -> Result<Vec<BlobMeta>, StoreError> {
        self.blobs
            .iter()
            .values()
            .map(|v| Ok(decode(&v.map_err(db_err)?)?))
            .collect()
    }

    fn step_entries(&self) -> Result<Vec<(Vec<u8>, StepRecord)>, StoreError> {
        self.steps
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(db_err)?;
                Ok((k.to_vec(), decode(&v)?))
            })
            .collect()
    }

    fn touch(&self, digest: &str, now_ms: u64) -> Result<(), StoreError> {
        self.access
            .insert(digest.as_bytes(), &now_ms.to_le_bytes())
            .map_err(db_err)?;
        Ok(())
    }

    fn put_build(&self, build: &BuildRecord, keep: usize) -> Result<(), StoreError> {
        // Ids sort by time: the oldest build is the tree's first.
        insert_keeping_newest(
            &self.builds,
            &self.build_count,
            build.id.as_bytes(),
            encode(build),
            keep,
        )
    }

    fn get_build(&self, id: &str) -> Result<Option<BuildRecord>, StoreError> {
        get(&self.builds, id)
    }

    fn recent_builds(&self, limit: usize, context: Option<&str>) -> Result<Vec<BuildRecord>, StoreError> {
        // Build ids sort by time, so the newest are at the end of the tree.
        let mut out = Vec::new();
        for v in self.builds.iter().values().rev() {
            if out.len() >= limit {
                break;
            }
            let b: BuildRecord = decode(&v.map_err(db_err)?)?;
            if context.is_none_or(|c| b.context == c) {
                out.push(b);
            }
        }
        Ok(out)
    }

    fn each_build(&self, visit: &mut dyn FnMut(BuildRecord)) -> Result<(), StoreError> {
        for v in self.builds.iter().values().rev() {
            visit(decode(&v.map_err(db_err)?)?);
        }
        Ok(())
    }

    // JSON, not the codec: an image config skips empty fields, which bincode cannot read
    // back. These live only until the image is named.
    fn put_deferred(&self, build: &DeferredBuild) -> Result<(), StoreError> {
        let value = serde_json::to_vec(build).map_err(|e| StoreError::Db(e.to_string()))?;
        self.deferred.insert(build.build.id.as_bytes(), value).map_err(db_err)?;
        Ok(())
    }

    fn deferred(&self) -> Result<Vec<DeferredBuild>, StoreError> {
        let mut builds = Vec::new();
        for kv in self.deferred.iter() {
            let (k, v) = kv.map_err(db_err)?;
            match serde_json::from_slice(&v) {
                Ok(b) => builds.push(b),
                // One that cannot be read is forgotten: its build's image is not named.
                Err(_) => {
                    self.deferred.remove(k).map_err(db_err)?;
                }
            }
        }
        Ok(builds)
    }

    fn remove_deferred(&self, id: &str) -> Result<(), StoreError> {
        self.deferred.remove(id.as_bytes()).map_err(db_err)?;
        Ok(())
    }

    fn put_provisional(&self, name: &str, outcome: &ProvisionalOutcome, keep: usize) -> Result<(), StoreError> {
        // JSON, as deferred builds are: read back only by this daemon, soon.
        let value = serde_json::to_vec(outcome).map_err(|e| StoreError::Db(e.to_string()))?;
        // Names sort by the time they were given.
        insert_keeping_newest(&self.provisional, &self.provisional_count, name.as_bytes(), value, keep)
    }

    fn get_provisional(&self, name: &str) -> Result<Option<ProvisionalOutcome>, StoreError> {
        match self.provisional.get(name.as_bytes()).map_err(db_err)? {
            // One that cannot be read is as good as forgotten.
            Some(v) => Ok(serde_json::from_slice(&v).ok()),
            None => Ok(None),
        }
    }

    fn counts(&self) -> Result<(u64, u64, u64, u64), StoreError> {
        let mut bytes = 0;
        for v in self.blobs.iter().values() {
            let m: BlobMeta = decode(&v.map_err(db_err)?)?;
            bytes += m.size;
        }
        Ok((
            self.steps.len() as u64,
            self.blobs.len() as u64,
            bytes,
            self.builds.len() as u64,
        ))
    }

    fn context_digests(&self, root: &str) -> Result<Vec<(String, CachedDigest)>, StoreError> {
        let prefix = context_key(root, "");
        let mut out = Vec::new();
        for (k, v) in self.contexts.scan_prefix(&prefix).map_err(log_err(&self.contexts))? {
            let dir = String::from_utf8_lossy(&k[prefix.len()..]).to_string();
            let files: DirDigests = decode(&v)?;
            out.extend(files.into_iter().map(|(name, d)| {
                let path = if dir.is_empty() { name } else { format!("{dir}/{name}") };
                (path, d)
            }));
        }
        Ok(out)
    }

    fn update_context_digests(
        &self,
        root: &str,
        upserts: &[(String, CachedDigest)],
        removals: &[String],
    ) -> Result<(), StoreError> {
        // Each directory's value stands alone (a stale digest is caught by its stamp), so
        // no batch is needed.
        let mut dirs: BTreeMap<&str, DirChange> = BTreeMap::new();
        for (path, d) in upserts {
            let (dir, name) = split_dir(path);
            dirs.entry(dir).or_default().0.push((name, d));
        }
        for path in removals {
            let (dir, name) = split_dir(path);
            dirs.entry(dir).or_default().1.push(name);
        }
        let mut changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::with_capacity(dirs.len());
        for (dir, (put, gone)) in dirs {
            let key = context_key(root, dir);
            let mut files: DirDigests = match self.contexts.get(&key).map_err(log_err(&self.contexts))? {
                // A value that does not decode is only a cache lost: it is learnt again.
                Some(v) => decode(&v).unwrap_or_default(),
                None => Vec::new(),
            };
            files.retain(|(name, _)| !gone.contains(&name.as_str()));
            for (name, d) in put {
                match files.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
                    Ok(i) => files[i].1 = *d,
                    Err(i) => files.insert(i, (name.to_string(), *d)),
                }
            }
            let value = (!files.is_empty()).then(|| encode(&files));
            changes.push((key, value));
        }
        // One append for the whole plan's changes.
        self.contexts
            .put_many(changes.iter().map(|(k, v)| (k.as_slice(), v.as_deref())))
            .map_err(log_err(&self.contexts))
    }

    fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        get(&self.images, name)
    }

    fn put_image(&self, image: &ImageRecord) -> Result<(), StoreError> {
        put(&self.images, image.name.as_bytes(), image)
    }

    fn remove_image(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.images.remove(name).map_err(db_err)?.is_some())
    }

    fn images(&self, after: &str, limit: usize) -> Result<Vec<ImageRecord>, StoreError> {
        use std::ops::Bound;
        self.images
            .range::<&[u8], _>((Bound::Excluded(after.as_bytes()), Bound::Unbounded))
            .values()
            .take(limit)
            .map(|v| Ok(decode(&v.map_err(db_err)?)?))
            .collect()
    }

    fn put_summary(
        &self,
        digest: &str,
        summary: &[lcache_proto::sources_digest::SummaryEntry],
    ) -> Result<(), StoreError> {
        // Held throughout, so a collection's sweep never removes a summary this found kept.
        let mut collecting = self.collecting();
        if let Some(c) = collecting.as_mut() {
            c.summaries.insert(digest.to_string());
        }
        if !self.summaries.contains_key(digest).map_err(db_err)? {
            self.summaries
                .insert(digest.as_bytes(), encode(&summary.to_vec()))
                .map_err(db_err)?;
        }
        Ok(())
    }

    fn get_summary(&self, digest: &str) -> Result<Option<Vec<lcache_proto::sources_digest::SummaryEntry>>, StoreError> {
        get(&self.summaries, digest)
    }

    fn put_dir_nodes(&self, nodes: &[(String, lcache_proto::sources_digest::DirNode)]) -> Result<(), StoreError> {
        // Noted before the log is asked: a collection's sweep either sees the note, or ran
        // wholly before and the listing is found missing below and put again.
        if let Some(c) = self.collecting().as_mut() {
            c.nodes.extend(nodes.iter().map(|(d, _)| d.clone()));
        }
        // Content-addressed: a listing already kept is the same listing.
        let fresh: Vec<(&[u8], Vec<u8>)> = nodes
            .iter()
            .filter(|(digest, _)| !self.dir_nodes.contains(digest.as_bytes()))
            .map(|(digest, node)| (digest.as_bytes(), encode(node)))
            .collect();
        self.dir_nodes
            .put_many(fresh.iter().map(|(k, v)| (*k, Some(v.as_slice()))))
            .map_err(log_err(&self.dir_nodes))
    }

    fn get_dir_node(&self, digest: &str) -> Result<Option<lcache_proto::sources_digest::DirNode>, StoreError> {
        match self
            .dir_nodes
            .get(digest.as_bytes())
            .map_err(log_err(&self.dir_nodes))?
        {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    fn listing_bytes(&self) -> u64 {
        self.dir_nodes.sizes().0
    }

    fn begin_listing_collection(&self) {
        *self.collecting() = Some(Collecting::default());
    }

    fn end_listing_collection(
        &self,
        keep: Option<(&HashSet<String>, &HashSet<String>)>,
    ) -> Result<ListingsDropped, StoreError> {
        let swept = keep.map(|(sources, nodes)| self.sweep_listings(sources, nodes));
        // Ended whatever the sweep met: the notes would otherwise grow with every plan.
        *self.collecting() = None;
        swept.unwrap_or(Ok(ListingsDropped::default()))
    }

    fn access_times(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.access
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(db_err)?;
                let ms = v.as_ref().try_into().map(u64::from_le_bytes).unwrap_or(0);
                Ok((String::from_utf8_lossy(&k).into_owned(), ms))
            })
            .collect()
    }

    fn evict_blob(&self, digest: &str, ids: &[Vec<u8>], now_ms: u64) -> Result<(), StoreError> {
        for id in ids {
            self.steps.remove(id).map_err(db_err)?;
            self.evicted
                .insert(id.as_slice(), &now_ms.to_le_bytes())
                .map_err(db_err)?;
        }
        self.blobs.remove(digest.as_bytes()).map_err(db_err)?;
        self.access.remove(digest.as_bytes()).map_err(db_err)?;
        // An evicted tar's gzip form is a blob of its own, evicted by its own age.
        self.gzip_forms.remove(digest.as_bytes()).map_err(db_err)?;
        self.flush()
    }

    fn was_evicted(&self, scope: &str, key: &str) -> Result<bool, StoreError> {
        self.evicted.contains_key(step_id(scope, key)).map_err(db_err)
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        put(&self.tokens, token.name.as_bytes(), token)?;
        self.flush()
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.tokens
            .iter()
            .values()
            .map(|v| Ok(decode(&v.map_err(db_err)?)?))
            .collect()
    }

    fn remove_token(&self, name: &str) -> Result<bool, StoreError> {
        let existed = self.tokens.remove(name).map_err(db_err)?.is_some();
        self.flush()?;
        Ok(existed)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.contexts.sync().map_err(log_err(&self.contexts))?;
        self.dir_nodes.sync().map_err(log_err(&self.dir_nodes))?;
        self.db.flush().map_err(db_err)?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use lcache_proto::source_select::FileStamp;
    use lcache_proto::wire::{ImageRecord, StepRecord};

    use super::*;
    use crate::store::{CachedDigest, RecordStore};

    fn step(key: &str, ms: u64) -> StepRecord {
        StepRecord {
            key: key.into(),
            layer: None,
            duration_ms: ms,
            inputs: None,
            created_at_ms: 0,
        }
    }

    fn image(name: &str) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            manifest_digest: format!("sha256:{name}"),
            config_digest: String::new(),
            layers: vec![],
            config: String::new(),
            created_at_ms: 0,
        }
    }

    /// Opens the store again once the dropped one's background thread has let go of the
    /// database's lock (it does so shortly after the drop, later on a busy machine).
    pub(crate) fn reopen(path: &Path) -> SledRecords {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match SledRecords::open(path) {
                Err(StoreError::Db(e)) if e.contains("lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                other => return other.unwrap(),
            }
        }
    }

    #[test]
    fn builds_being_named_are_there_after_a_reopen_until_forgotten() {
        use lcache_image::image_draft::{DeferredLayer, ImageDraft};
        use lcache_image::image_history::HistoryEntry;
        let d = tempfile::tempdir().unwrap();
        let mut config = lcache_image::oci_image::RuntimeConfig::default();
        config.apply(&[lcache_proto::build_plan::ConfigChange::Env {
            name: "A".into(),
            value: "b".into(),
        }]);
        let build = DeferredBuild {
            build: BuildRecord {
                id: "000000000001beef".into(),
                context: "/ctx".into(),
                ..Default::default()
            },
            draft: ImageDraft {
                platform: "linux/amd64".into(),
                config,
                layers: vec![],
                // Fields left out of the JSON when empty, which bincode could not read back.
                history: vec![HistoryEntry {
                    created_by: Some("COPY src /app # buildkit".into()),
                    ..Default::default()
                }],
            },
            tags: vec!["app:latest".into()],
            layers: vec![DeferredLayer {
                at: 0,
                tail: lcache_proto::wire::LayerTail {
                    tar_state: vec![1; 40],
                    first: 3,
                    blob_state: vec![2; 40],
                    members: vec![10, 20],
                    compression: Default::default(),
                },
                record: step("k", 1),
            }],
            scope: "main".into(),
        };
        {
            let s = SledRecords::open(d.path()).unwrap();
            s.put_deferred(&build).unwrap();
            s.flush().unwrap();
        }
        let s = reopen(d.path());
        // One that does not read back is forgotten, not retried at every start.
        s.deferred.insert("000000000002beef", b"not json".as_slice()).unwrap();
        assert_eq!(s.deferred().unwrap(), vec![build.clone()]);
        assert_eq!(s.deferred.len(), 1);
        s.remove_deferred(&build.build.id).unwrap();
        assert!(s.deferred().unwrap().is_empty());
    }

    #[test]
    fn what_was_flushed_is_there_after_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = SledRecords::open(d.path()).unwrap();
            s.put_step("", &step("k1", 5)).unwrap();
            s.put_image(&image("a:1")).unwrap();
            let digest = CachedDigest {
                stamp: FileStamp::default(),
                size: 3,
                digest: [9; 32],
            };
            s.update_context_digests("/ctx", &[("f".into(), digest), ("g".into(), digest)], &[])
                .unwrap();
            s.update_context_digests("/ctx", &[], &["g".into()]).unwrap();
            s.flush().unwrap();
        }
        let s = reopen(d.path());
        assert_eq!(s.get_step("", "k1").unwrap().unwrap().duration_ms, 5);
        assert!(s.get_step("", "k2").unwrap().is_none(), "a miss is None");
        assert!(s.get_step("pr-1", "k1").unwrap().is_none(), "scopes are apart");
        assert_eq!(s.get_image("a:1").unwrap().unwrap().manifest_digest, "sha256:a:1");
        let digests = s.context_digests("/ctx").unwrap();
        assert_eq!(digests.len(), 1);
        assert_eq!((digests[0].0.as_str(), digests[0].1.digest), ("f", [9; 32]));
        assert!(
            s.context_digests("/other").unwrap().is_empty(),
            "contexts are kept apart"
        );
    }

    #[test]
    fn context_digests_kept_by_directory_come_back_by_path_and_empty_directories_go() {
        let d = tempfile::tempdir().unwrap();
        let s = SledRecords::open(d.path()).unwrap();
        let at = |n: u8| CachedDigest {
            stamp: FileStamp::default(),
            size: u64::from(n),
            digest: [n; 32],
        };
        let paths = ["top", "a/x", "a/y", "a/b/z", "c/only"];
        let upserts: Vec<(String, CachedDigest)> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| (p.to_string(), at(i as u8)))
            .collect();
        s.update_context_digests("/ctx", &upserts, &[]).unwrap();
        s.update_context_digests("/ctx2", &[("a/x".into(), at(42))], &[])
            .unwrap();
        s.update_context_digests("/ctx", &[("a/x".into(), at(7))], &["c/only".into(), "a/y".into()])
            .unwrap();
        s.flush().unwrap();
        drop(s);
        let s = reopen(d.path());
        let mut got = s.context_digests("/ctx").unwrap();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let got: Vec<(&str, u64)> = got.iter().map(|(p, d)| (p.as_str(), d.size)).collect();
        assert_eq!(got, [("a/b/z", 3), ("a/x", 7), ("top", 0)]);
        assert_eq!(
            s.contexts.scan_prefix(b"").unwrap().len(),
            3 + 1,
            "c/ is gone; /ctx2 has its own"
        );
        assert_eq!(s.context_digests("/ctx2").unwrap()[0].1.size, 42);
    }

    #[test]
    fn images_page_in_name_order() {
        let d = tempfile::tempdir().unwrap();
        let s = SledRecords::open(d.path()).unwrap();
        for n in ["c:1", "a:1", "b:1", "d:1"] {
            s.put_image(&image(n)).unwrap();
        }
        let names = |v: Vec<ImageRecord>| v.into_iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(names(s.images("", 2).unwrap()), ["a:1", "b:1"]);
        assert_eq!(names(s.images("b:1", 2).unwrap()), ["c:1", "d:1"]);
        assert!(s.images("d:1", 2).unwrap().is_empty());
        assert!(s.remove_image("b:1").unwrap());
        assert!(!s.remove_image("b:1").unwrap());
        assert_eq!(names(s.images("", 10).unwrap()), ["a:1", "c:1", "d:1"]);
    }

    #[test]
    fn digests_and_listings_a_store_kept_in_sled_are_moved_to_the_logs_at_open() {
        use lcache_proto::source_select::EntryKind;
        use lcache_proto::sources_digest::{DirNode, SummaryEntry};
        let d = tempfile::tempdir().unwrap();
        let digest = CachedDigest {
            stamp: lcache_proto::source_select::FileStamp::default(),
            size: 3,
            digest: [7; 32],
        };
        let node = DirNode {
            entries: vec![SummaryEntry {
                path: "a.txt".into(),
                kind: EntryKind::File,
                mode: 0o644,
                digest: "ab".repeat(32),
                expanded: false,
            }],
        };
        {
            // As a store written before the logs held them.
            let db = sled::open(d.path()).unwrap();
            let files: DirDigests = vec![("a.txt".into(), digest)];
            db.open_tree("context_dirs")
                .unwrap()
                .insert(context_key("/ctx", "src"), encode(&files))
                .unwrap();
            db.open_tree("dir_nodes")
                .unwrap()
                .insert("cd".repeat(32), encode(&node))
                .unwrap();
            db.flush().unwrap();
        }
        let s = reopen(d.path());
        assert_eq!(s.context_digests("/ctx").unwrap(), [("src/a.txt".to_string(), digest)]);
        assert_eq!(s.get_dir_node(&"cd".repeat(32)).unwrap(), Some(node.clone()));
        assert!(
            !s.db.tree_names().iter().any(|t| t.as_ref() == b"dir_nodes"),
            "the tree is dropped"
        );
        // Changed and read back through the log, across a reopen.
        s.update_context_digests("/ctx", &[], &["src/a.txt".into()]).unwrap();
        s.put_dir_nodes(&[("ef".repeat(32), node.clone())]).unwrap();
        s.flush().unwrap();
        drop(s);
        let s = reopen(d.path());
        assert!(s.context_digests("/ctx").unwrap().is_empty());
        assert_eq!(s.get_dir_node(&"ef".repeat(32)).unwrap(), Some(node));
    }
}
