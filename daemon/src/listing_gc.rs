//! Drops the directory listings and sources summaries nothing refers to any more. A plan
//! stores the listings of every directory an edit changed (the edited one and each above
//! it: ~46 KB an edit in a 500-directory `src/`, ~180 KB at 200,000 files), and each is
//! content-addressed, so none is ever replaced: without a collection they grow with every
//! edit, past `--max-size` (which bounds blobs) and `--max-builds`.
//!
//! Listings are read only while a build runs: its misses' causes and a re-run COPY's list
//! of changes diff its sources digests against those of the context's newest
//! [`HISTORY_COMPARED`] builds (a build's causes are stored with it, so `lcache explain`
//! reads no listing). Kept, then: what those builds refer to (a build whose image is being
//! named among them), what the context index may still hand out (memoised digests,
//! subtrees a plan reuses without storing their listings again) and what was planned in
//! the last 15 minutes (a build in flight). Everything beneath a kept summary or listing is
//! kept; the store keeps, besides, what plans put while the collection ran.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lcache_proto::source_select::EntryKind;
use lcache_proto::sources_digest::SummaryEntry;
use lcache_proto::wire::HISTORY_COMPARED;

use crate::context_index::ContextIndex;
use crate::state::AppState;
use crate::store::{ListingsDropped, RecordStore, StoreError};

/// Listings are not collected below this size.
const COLLECT_FROM: u64 = 64 << 20;

/// How long a planned digest is kept for the build that may follow it.
pub const PLANNED_WITHIN: Duration = Duration::from_secs(15 * 60);

/// When the next collection is due, and whether one runs.
pub struct ListingCollector {
    running: AtomicBool,
    next_at: AtomicU64,
    /// For the end-to-end tests: collect after every plan, counting plans of this long ago
    /// as in flight (`LCACHED_TEST_LISTINGS_PLANNED_WITHIN_MS`).
    every_plan: Option<Duration>,
}

/// The size the listings may grow to before the next collection: twice what is left.
fn due_at(bytes: u64) -> u64 {
    COLLECT_FROM.max(bytes.saturating_mul(2))
}

impl Default for ListingCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl ListingCollector {
    /// A collector whose first collection comes with the first plan once the listings are
    /// past [`COLLECT_FROM`]: a store written before collections, or grown since the last
    /// one before a restart, is not left to double first.
    pub fn new() -> Self {
        Self {
            running: AtomicBool::new(false),
            next_at: AtomicU64::new(COLLECT_FROM),
            every_plan: std::env::var("LCACHED_TEST_LISTINGS_PLANNED_WITHIN_MS")
                .ok()
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis),
        }
    }

    /// Starts a collection on a thread of its own if the listings outgrew the last one's
    /// result twice over (checked after each plan: plans are what store listings).
    pub fn maybe_start(state: &Arc<AppState>) {
        let me = &state.listing_gc;
        let due = me.every_plan.is_some() || state.records.listing_bytes() >= me.next_at.load(Ordering::Relaxed);
        if !due || me.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let planned_within = me.every_plan.unwrap_or(PLANNED_WITHIN);
        let state = state.clone();
        std::thread::spawn(move || {
            let records = state.records.as_ref();
            let (before, started) = (records.listing_bytes(), std::time::Instant::now());
            match collect(records, &state.index, planned_within) {
                Ok(d) => eprintln!(
                    "lcached: dropped {} directory listings and {} sources summaries nothing refers to ({} → {} MiB, {} ms)",
                    d.listings,
                    d.summaries,
                    before >> 20,
                    records.listing_bytes() >> 20,
                    started.elapsed().as_millis()
                ),
                Err(e) => eprintln!("lcached: collecting unused directory listings failed: {e}"),
            }
            let me = &state.listing_gc;
            me.next_at.store(due_at(records.listing_bytes()), Ordering::Relaxed);
            me.running.store(false, Ordering::Release);
        });
    }
}

/// One collection: the summaries and listings referred to are marked, the rest dropped.
pub fn collect(
    records: &dyn RecordStore,
    index: &ContextIndex,
    planned_within: Duration,
) -> Result<ListingsDropped, StoreError> {
    // Begun before any root is read: whatever a plan puts from here on is kept by the store.
    records.begin_listing_collection();
    let marked = marked(records, index, planned_within);
    match marked {
        Ok((sources, nodes)) => records.end_listing_collection(Some((&sources, &nodes))),
        Err(e) => {
            records.end_listing_collection(None)?;
            Err(e)
        }
    }
}

/// The sources digests referred to, and every listing beneath them.
fn marked(
    records: &dyn RecordStore,
    index: &ContextIndex,
    planned_within: Duration,
) -> Result<(HashSet<String>, HashSet<String>), StoreError> {
    let roots = index.listing_roots(planned_within);
    let mut sources: HashSet<String> = roots.sources.into_iter().collect();
    let inputs_digest = |inputs: &Option<lcache_proto::cache_key::KeyInputs>| {
        inputs.as_ref().and_then(|i| i.sources_digest()).map(str::to_string)
    };
    // Newest first: each context's first HISTORY_COMPARED are the ones a build may diff. A
    // build whose image is being named is in the history from the start.
    let mut per_context: HashMap<String, usize> = HashMap::new();
    records.each_build(&mut |build| {
        let seen = per_context.entry(build.context.clone()).or_default();
        *seen += 1;
        if *seen <= HISTORY_COMPARED {
            sources.extend(build.steps.iter().filter_map(|s| inputs_digest(&s.inputs)));
        }
    })?;
    let mut nodes: HashSet<String> = HashSet::new();
    let mut pending: Vec<String> = Vec::new();
    for digest in roots.nodes {
        if nodes.insert(digest.clone()) {
            pending.push(digest);
        }
    }
    for digest in &sources {
        if let Some(summary) = records.get_summary(digest)? {
            reach(&summary, &mut nodes, &mut pending);
        }
    }
    while let Some(digest) = pending.pop() {
        // A listing that cannot be read has nothing beneath it to keep.
        if let Ok(Some(node)) = records.get_dir_node(&digest) {
            reach(&node.entries, &mut nodes, &mut pending);
        }
    }
    Ok((sources, nodes))
}

/// Marks the directories among `entries`, queueing those not marked before.
fn reach(entries: &[SummaryEntry], nodes: &mut HashSet<String>, pending: &mut Vec<String>) {
    for e in entries.iter().filter(|e| e.kind == EntryKind::Dir) {
        if nodes.insert(e.digest.clone()) {
            pending.push(e.digest.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::plan_build;
    use crate::store::sled_records::SledRecords;
    use lcache_proto::wire::{BuildRecord, BuildStep, PlanInputs};

    struct Fixture {
        _store: tempfile::TempDir,
        context: tempfile::TempDir,
        records: Arc<dyn RecordStore>,
        index: ContextIndex,
        /// Builds recorded so far: ids sort by time, as lcached's do.
        builds: std::cell::Cell<usize>,
    }

    fn fixture() -> Fixture {
        let store = tempfile::tempdir().unwrap();
        let context = tempfile::tempdir().unwrap();
        for (dir, file) in [("a", "one.txt"), ("b", "two.txt")] {
            std::fs::create_dir_all(context.path().join("src").join(dir)).unwrap();
            std::fs::write(context.path().join("src").join(dir).join(file), dir).unwrap();
        }
        // More files than a plan lists before src/b: only a subtree no file of which is
        // listed may be reused.
        for i in 0..lcache_proto::wire::FILES_LISTED {
            std::fs::write(context.path().join(format!("src/a/more{i}")), "").unwrap();
        }
        let records: Arc<dyn RecordStore> = Arc::new(SledRecords::open(&store.path().join("db")).unwrap());
        // Watched, as lcached's contexts are: a stat walk forgets the subtrees at each plan.
        let index = ContextIndex::new(records.clone(), true);
        Fixture {
            _store: store,
            context,
            records,
            index,
            builds: Default::default(),
        }
    }

    impl Fixture {
        /// Edits `src/a/one.txt` (a new size: the stat walk sees it whatever the clock).
        fn edit(&self, text: &str) {
            std::fs::write(self.context.path().join("src/a/one.txt"), text).unwrap();
        }

        /// Plans `COPY src /src`: its step's key inputs.
        fn plan(&self) -> lcache_proto::cache_key::KeyInputs {
            self.plan_of("FROM scratch\nCOPY src /src\n").unwrap()
        }

        fn plan_of(&self, dockerfile: &str) -> Result<lcache_proto::cache_key::KeyInputs, crate::planner::PlanError> {
            let inputs = PlanInputs {
                dockerfile_name: "Dockerfile".into(),
                dockerfile: dockerfile.into(),
                dockerfile_path: String::new(),
                context: self.context.path().display().to_string(),
                build_args: Default::default(),
                target: None,
                platform: "linux/amd64".into(),
                all_files: false,
            };
            let resp = plan_build(&self.index, self.records.as_ref(), &inputs)?;
            Ok(resp.report.steps[0].inputs.clone().unwrap())
        }

        /// The listings beneath a sources digest's `src`: (src, src/a, src/b).
        fn listings(&self, inputs: &lcache_proto::cache_key::KeyInputs) -> [String; 3] {
            let summary = self
                .records
                .get_summary(inputs.sources_digest().unwrap())
                .unwrap()
                .unwrap();
            let src = summary[0].digest.clone();
            let node = self.records.get_dir_node(&src).unwrap().unwrap();
            let child = |name: &str| node.entries.iter().find(|e| e.path == name).unwrap().digest.clone();
            [child("a"), child("b"), src]
        }

        fn kept(&self, node: &str) -> bool {
            self.records.get_dir_node(node).unwrap().is_some()
        }

        fn context_key(&self) -> String {
            self.context.path().display().to_string()
        }

        /// A build of `context`, newer than those before, its one step keyed with `inputs`.
        fn record_build(&self, context: &str, inputs: &lcache_proto::cache_key::KeyInputs) {
            self.builds.set(self.builds.get() + 1);
            let build = BuildRecord {
                id: format!("{:06}", self.builds.get()),
                context: context.into(),
                steps: vec![BuildStep {
                    stage: 0,
                    line: 2,
                    instruction: "COPY src /src".into(),
                    key: "k".into(),
                    cached: false,
                    duration_ms: 1,
                    saved_ms: 0,
                    cause: None,
                    inputs: Some(inputs.clone()),
                    compared_with: None,
                }],
                ..Default::default()
            };
            self.records.put_build(&build, 1000).unwrap();
        }
    }

    #[test]
    fn listings_nothing_refers_to_are_dropped_and_the_rest_kept() {
        let f = fixture();
        let first = f.plan();
        f.record_build(&f.context_key(), &first);
        f.edit("edited once");
        let second = f.plan();
        f.edit("edited twice");
        let third = f.plan();
        let [a1, b1, src1] = f.listings(&first);
        let [a2, b2, src2] = f.listings(&second);
        let [a3, b3, src3] = f.listings(&third);
        assert_eq!(
            (b1.as_str(), b2.as_str()),
            (b3.as_str(), b3.as_str()),
            "src/b never changed"
        );
        assert!([&a1, &a2, &a3].iter().all(|a| f.kept(a)));

        // The second plan is referred to by nothing once the third replaced its memo (and
        // its minutes as a plan a build may follow are not counted here).
        let dropped = collect(f.records.as_ref(), &f.index, Duration::ZERO).unwrap();
        assert_eq!(
            dropped,
            ListingsDropped {
                summaries: 1,
                listings: 2
            }
        );
        assert!(!f.kept(&a2) && !f.kept(&src2), "the second plan's own listings");
        assert!(f
            .records
            .get_summary(second.sources_digest().unwrap())
            .unwrap()
            .is_none());
        for (what, node) in [
            ("the build's", &a1),
            ("the build's", &src1),
            ("shared", &b1),
            ("the memo's", &a3),
            ("the memo's", &src3),
        ] {
            assert!(f.kept(node), "{what} listing {node} kept");
        }
        assert!(f
            .records
            .get_summary(first.sources_digest().unwrap())
            .unwrap()
            .is_some());
        assert!(f
            .records
            .get_summary(third.sources_digest().unwrap())
            .unwrap()
            .is_some());

        // A no-op plan after the collection still answers from its memo, and a listing
        // beneath a reused subtree is still there for it.
        assert_eq!(f.plan(), third);
        assert!(f.kept(&b3));
    }

    #[test]
    fn after_a_failed_plan_the_subtrees_the_next_plan_reuses_keep_their_listings() {
        let f = fixture();
        let [_, b_first, _] = f.listings(&f.plan());
        f.edit("edited");
        // Fails after its walk (which forgot the memo): the index still holds the first
        // plan's subtrees, and the next plan reuses src/b's without storing its listing.
        assert!(f.plan_of("FROM scratch\nCOPY src /src\nCOPY missing /m\n").is_err());
        collect(f.records.as_ref(), &f.index, Duration::ZERO).unwrap();
        let next = f.plan();
        let [_, b, _] = f.listings(&next);
        assert_eq!(b, b_first);
        assert!(f.kept(&b), "src/b's listing, which the next plan did not store again");
    }

    #[test]
    fn only_the_builds_a_build_is_compared_with_keep_listings() {
        let f = fixture();
        let first = f.plan();
        f.record_build(&f.context_key(), &first);
        let kept = f.listings(&first);
        f.edit("edited");
        let second = f.plan();
        // Builds of another context do not push this one's out of its window.
        for _ in 0..HISTORY_COMPARED {
            f.record_build("/elsewhere", &second);
        }
        collect(f.records.as_ref(), &f.index, Duration::ZERO).unwrap();
        assert!(kept.iter().all(|n| f.kept(n)), "the context's only build");
        for _ in 1..HISTORY_COMPARED {
            f.record_build(&f.context_key(), &second);
        }
        collect(f.records.as_ref(), &f.index, Duration::ZERO).unwrap();
        assert!(
            kept.iter().all(|n| f.kept(n)),
            "still among the newest {HISTORY_COMPARED}"
        );
        f.record_build(&f.context_key(), &second);
        collect(f.records.as_ref(), &f.index, Duration::ZERO).unwrap();
        let [a1, _, src1] = kept;
        assert!(!f.kept(&a1) && !f.kept(&src1), "no build is compared with it any more");
    }

    #[test]
    fn a_plan_of_the_last_minutes_keeps_its_listings() {
        let f = fixture();
        let first = f.plan();
        f.edit("edited");
        f.plan();
        let [a1, _, src1] = f.listings(&first);
        let dropped = collect(f.records.as_ref(), &f.index, PLANNED_WITHIN).unwrap();
        assert_eq!(
            dropped,
            ListingsDropped::default(),
            "a build of the first plan may be running"
        );
        assert!(f.kept(&a1) && f.kept(&src1));
    }

    #[test]
    fn what_a_plan_puts_while_a_collection_runs_is_kept() {
        let f = fixture();
        f.plan();
        f.records.begin_listing_collection();
        f.edit("edited meanwhile");
        let during = f.plan();
        // Told to keep nothing: only what was put since it began stays (src/b, reused by
        // the plan and not put, is one of the index's roots in a real collection).
        let none = HashSet::new();
        let dropped = f.records.end_listing_collection(Some((&none, &none))).unwrap();
        assert_eq!(
            dropped,
            ListingsDropped {
                summaries: 1,
                listings: 3
            },
            "the first plan's src, src/a, src/b"
        );
        let [a, _, src] = f.listings(&during);
        assert!(f.kept(&a) && f.kept(&src), "put meanwhile");
    }

    #[test]
    fn a_plan_beside_collections_always_finds_every_listing_beneath_its_digest() {
        let f = fixture();
        let stop = AtomicBool::new(false);
        let collections = AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    collect(f.records.as_ref(), &f.index, Duration::ZERO).unwrap();
                    collections.fetch_add(1, Ordering::SeqCst);
                }
            });
            // Stops the collector however this thread ends, a failed assertion included.
            struct StopOnDrop<'a>(&'a AtomicBool);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _stop = StopOnDrop(&stop);
            for i in 0..60 {
                let dir = ["a", "b"][i % 2];
                std::fs::write(f.context.path().join(format!("src/{dir}/edit")), format!("edit {i}")).unwrap();
                let digest = f.plan().sources_digest().unwrap().to_string();
                // Collections ran beside the plan; one more, begun after it, runs whole.
                let (after, since) = (collections.load(Ordering::SeqCst) + 2, std::time::Instant::now());
                while collections.load(Ordering::SeqCst) < after {
                    assert!(since.elapsed() < Duration::from_secs(10), "the collector stopped");
                    std::thread::yield_now();
                }
                // Its memo keeps it.
                let summary = f.records.get_summary(&digest).unwrap();
                let mut pending: Vec<String> = summary
                    .expect("the plan's summary")
                    .iter()
                    .filter(|e| e.kind == EntryKind::Dir)
                    .map(|e| e.digest.clone())
                    .collect();
                while let Some(node) = pending.pop() {
                    let listing = f.records.get_dir_node(&node).unwrap();
                    let listing = listing.unwrap_or_else(|| panic!("plan {i}: listing {node} gone"));
                    pending.extend(
                        listing
                            .entries
                            .iter()
                            .filter(|e| e.kind == EntryKind::Dir)
                            .map(|e| e.digest.clone()),
                    );
                }
            }
        });
    }

    #[test]
    fn a_collection_given_up_drops_nothing() {
        let f = fixture();
        let first = f.plan();
        f.edit("edited");
        f.plan();
        f.records.begin_listing_collection();
        let dropped = f.records.end_listing_collection(None).unwrap();
        assert_eq!(dropped, ListingsDropped::default());
        assert!(f.listings(&first).iter().all(|n| f.kept(n)));
    }
}
