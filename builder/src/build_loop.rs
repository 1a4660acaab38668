//! `lcache build`: replay a Dockerfile step by step through the daemon. Each step's key is
//! derived (context digests come from the daemon's index, `COPY --from` digests from the
//! built stage's files); a hit reuses the stored layer, a miss runs the step (RUN in the OCI
//! runtime, COPY/ADD/WORKDIR here), uploads the layer and only then records the step.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use lcache_context::context_walk::walk;
use lcache_context::local_context::LocalContext;
use lcache_image::layer_segments::{SegmentIndex, TailDigests};
use lcache_proto::build_plan::{Base, BindDef, BuildPlan, CopyDef, CopyFrom, PlannedStage, StepDef};
use lcache_proto::cache_key::{key_inputs, KeyInputs};
use lcache_proto::dockerignore::IgnoreMatcher;
use lcache_proto::explain::{cascades, root_after, CascadeRoot, MissCause};
use lcache_proto::key_encoding::{hex, Encoder};
use lcache_proto::source_select::{select, ContextEntry, EntryKind, SelectedRoot};
use lcache_proto::sources_digest::binds_digest;
use lcache_proto::step_keys::{is_remote, StepKey, StepRef};
use lcache_proto::wire::{
    is_provisional, BlobPart, BlobParts, BuildFailure, BuildRecord, BuildStep, ImageRecord, LayerParts, LayerRef,
    LayerTail, NamedLayer, PlanInputs, StepRecord,
};

use crate::build_control::BuildControl;
use crate::build_events::{BuildObserver, StepEvent, StepPhases, SummaryEvent};
use crate::cache_dir::CacheDir;
use crate::copy_changes::source_changes;
use crate::copy_pack::{pack_copy, pack_copy_over};
use crate::copy_seed::{
    fill_blob_states, keep_pending_segments, keep_segments, save_entries, save_segments, DeltaUnit, Seed,
};
use crate::copy_step::{
    build_copy_changes, build_copy_layer, build_workdir_layer, changes_from, parse_chmod, ChangeJob, CopyAttrs,
    CopyError, CopyJob, CopyLayer, DELTA_REBASE_AT,
};
use crate::errors::{BuildError, CacheError};
use crate::miss_causes::{dockerignore_digest, CauseFinder, StepAt};
use crate::overlay_mount::OverlayMount;
use crate::provisional_snapshots;
use crate::run_mounts::{prepare as prepare_mounts, MountInputs};
use crate::run_step::{argv_with_heredocs, run_step, PreparedMount, RunError, RunSpec};
use crate::snapshot_prune::{hold_for_build, mark_used};
use crate::snapshots::{delta_snapshot, ensure_snapshot, lowers, Snapshot};
use crate::squash::squash;
use crate::step_cache::{BlobSource, Metered, StepCache};
use crate::url_download::{download, place};
use crate::user_lookup::resolve_user;
use lcache_image::image_draft::{DeferredBuild, DeferredLayer, ImageDraft};
use lcache_image::image_history::{base_history, extend, Contribution, HistoryEntry};
use lcache_image::layer_diff::{pack_layer, remove_runtime_mountpoints, LayerCompression};
use lcache_image::layer_links::{pack_layer_linked, take_name};
use lcache_image::oci_image::RuntimeConfig;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// Dockerfile, context, args, target, platform.
    pub inputs: PlanInputs,
    /// Names to record the image under.
    pub tags: Vec<String>,
    /// Run every step even when the cache has it (results are still stored).
    pub no_cache: bool,
    /// The OCI runtime binary.
    pub runtime: String,
    /// The client cache directory.
    pub cache_dir: PathBuf,
    /// Secrets for `RUN --mount=type=secret`, by id (`lcache build --secret`).
    pub secrets: std::collections::BTreeMap<String, Vec<u8>>,
    /// SSH agent sockets for `RUN --mount=type=ssh`, by id (`lcache build --ssh`).
    pub ssh: std::collections::BTreeMap<String, PathBuf>,
    /// Merge the target stage's own layers into one (`--squash`).
    pub squash: bool,
    /// End the build once every step has run and is cached, leaving lcached to name the
    /// image when it is still taking diff_ids (`lcache build --name-image later`; not with
    /// `squash`).
    pub name_later: bool,
    /// `SOURCE_DATE_EPOCH`: the time the image's history and config say it was made.
    /// Without it they give no time, so that a rebuild is the same image, byte for byte.
    pub source_date_epoch: Option<u64>,
    /// How the layers this build makes are kept (`--layer-compression`): not part of any
    /// key, as the tar, and so the image's config, is the same either way.
    pub layer_compression: LayerCompression,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// The image (its `name` is the first tag, or empty).
    pub image: ImageRecord,
    /// Snapshot directories of the image's layers, bottom first (a delta's above its base).
    pub snapshots: Vec<PathBuf>,
    /// Every step, in order.
    pub steps: Vec<StepEvent>,
    /// The build as recorded in the history (causes, cascades).
    pub record: BuildRecord,
    /// Blob bytes fetched from the cache (layers of hits not yet extracted here).
    pub bytes_fetched: u64,
    /// Blob bytes stored into the cache (layers of rebuilt steps, config, manifest).
    pub bytes_stored: u64,
}

/// A built (or being built) stage.
#[derive(Debug, Clone)]
struct StageState {
    /// The state id the next step's key chains from.
    parent: String,
    layers: Vec<LayerRef>,
    snapshots: Vec<Snapshot>,
    config: RuntimeConfig,
    /// The root of the cascade that produced this state, if its last step rebuilt.
    rebuilt: Option<CascadeRoot>,
    /// The image config's `history` so far: one entry with a layer per layer.
    history: Vec<HistoryEntry>,
    /// How many of `layers` (and `snapshots`) the stage's base brought.
    base_layers: usize,
}

struct Builder<'a> {
    client: &'a dyn BuildControl,
    /// Step records and blobs: every cache read and write of the replay goes here.
    steps: &'a dyn StepCache,
    req: &'a BuildRequest,
    cache: CacheDir,
    /// The Dockerfile's name, for `file:line` in messages.
    dockerfile: String,
    /// The plan lcached derived the keys from: the one this build executes.
    plan: BuildPlan,
    /// Every step's key as lcached derived it, by where the step stands in the plan.
    daemon_keys: HashMap<StepRef, StepKey>,
    /// The context walk, made once by the first COPY that misses.
    context: Mutex<Option<LocalContext>>,
    progress: Mutex<&'a mut dyn BuildObserver>,
    finder: CauseFinder<'a>,
    /// Build step number of each stage's first step (stages run concurrently).
    first_step: HashMap<usize, usize>,
    /// Whether the cache names a re-run COPY's layer from its own copy of the last one
    /// (`StepCache::put_layer`); false once it said it does not.
    cache_names_layers: std::sync::atomic::AtomicBool,
    /// Whether the cache holds a tar layer by reference to the snapshot's files
    /// (`StepCache::put_linked`); false once it said it does not.
    cache_takes_links: std::sync::atomic::AtomicBool,
    /// The target stage's records whose diff_ids lcached is taking, left to it to store
    /// (with `name_later`) instead of waited for.
    deferred: Mutex<Vec<(usize, PendingRecord)>>,
    /// The provisional names lcached gave this build's layers.
    given: GivenNames,
}

/// The provisional layer names a build's snapshots bear: listed for the next build to
/// resolve (`provisional_snapshots`) once this one is over, however it ends.
struct GivenNames {
    cache: CacheDir,
    names: Mutex<Vec<String>>,
}

impl GivenNames {
    fn push(&self, name: String) {
        self.names.lock().unwrap_or_else(|p| p.into_inner()).push(name);
    }
}

impl Drop for GivenNames {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.names.lock().unwrap_or_else(|p| p.into_inner()));
        provisional_snapshots::list(&self.cache, &names);
    }
}

/// One finished step: what progress showed, and what the history keeps.
type Finished = (StepEvent, BuildStep);

/// The stages built, by index, and their steps; or why they stopped.
type Built = Result<(HashMap<usize, StageState>, Vec<Finished>), Box<Stopped>>;

/// One stage built, and its steps; or why it stopped.
type StageBuilt = Result<(StageState, Vec<Finished>), Box<Stopped>>;

/// Why stages stopped: the error, the steps that finished before it, and the step it
/// failed at (when a step's own run failed). The history keeps the failed build with them.
struct Stopped {
    error: BuildError,
    finished: Vec<Finished>,
    step: Option<Box<BuildStep>>,
}

impl From<BuildError> for Box<Stopped> {
    fn from(error: BuildError) -> Self {
        Box::new(Stopped {
            error,
            finished: Vec::new(),
            step: None,
        })
    }
}

/// A rebuilt COPY whose diff_id is being hashed on a thread of its own: its record is
/// stored, and its segment index kept, once the diff_id is known.
struct PendingRecord {
    /// The record, its layer's diff_id still empty.
    record: StepRecord,
    /// The layer's blob digest.
    digest: String,
    line: usize,
    instruction: String,
    /// The diff_id and the complete segment index, being taken.
    hashing: DiffIdPending,
}

/// Where a rebuilt COPY's diff_id comes from while the build goes on.
enum DiffIdPending {
    /// A thread of this process, following the pack.
    Here(lcache_image::layer_segments::PendingDiffId),
    /// The cache that named the layer (`StepCache::layer_diff_id`), from `tail`; `index`
    /// lacks the tar's states after the change until it answers.
    Cache { tail: LayerTail, index: SegmentIndex },
}

impl DiffIdPending {
    /// Waits for the diff_id of the layer `digest`: it and the complete segment index.
    fn finish(self, steps: &dyn StepCache, digest: &str) -> Result<(String, SegmentIndex), String> {
        match self {
            Self::Here(p) => p.finish().map_err(|e| e.to_string()),
            Self::Cache { tail, mut index } => {
                let named = steps.layer_diff_id(digest, &tail).map_err(|e| e.to_string())?;
                let (n, k) = (index.segments.len(), named.tar_states.len());
                if k != tail.members.len() || k > n {
                    return Err(format!(
                        "the cache gave {k} states for the {} members after the change",
                        tail.members.len()
                    ));
                }
                for (seg, state) in index.segments[n - k..].iter_mut().zip(named.tar_states) {
                    seg.tar_state = state;
                }
                Ok((named.diff_id, index))
            }
        }
    }
}

/// A step cache whose blobs cannot be read: packs a layer without its seed's blob.
struct WithoutBlobs<'a>(&'a dyn StepCache);

impl StepCache for WithoutBlobs<'_> {
    fn get_step(&self, key: &str) -> Result<Option<StepRecord>, CacheError> {
        self.0.get_step(key)
    }

    fn upstream_unavailable(&self, key: &str) -> Option<String> {
        self.0.upstream_unavailable(key)
    }

    fn put_step(&self, record: &StepRecord) -> Result<(), CacheError> {
        self.0.put_step(record)
    }

    fn has_blob(&self, _: &str) -> Result<bool, CacheError> {
        Ok(false)
    }

    fn get_blob(&self, digest: &str, _: &mut dyn std::io::Write) -> Result<u64, CacheError> {
        Err(CacheError::UnusableBlob {
            digest: digest.to_string(),
            reason: "is not to be reused".into(),
        })
    }

    fn get_blob_from(&self, digest: &str, _: u64, out: &mut dyn std::io::Write) -> Result<u64, CacheError> {
        self.get_blob(digest, out)
    }

    fn put_blob(&self, digest: &str, source: BlobSource<'_>) -> Result<(), CacheError> {
        self.0.put_blob(digest, source)
    }
}

/// The image a COPY or WORKDIR goes on, mounted read-only in its work directory.
fn image_view(lowers: &[PathBuf], work: &Path) -> Result<OverlayMount, CopyError> {
    OverlayMount::mount(lowers, None, &work.join("view"), &work.join("empty-view")).map_err(CopyError::ImageView)
}

/// A fresh directory for a step's layer in its work directory.
fn layer_dir(work: &Path) -> Result<PathBuf, BuildError> {
    let layer = work.join("layer");
    std::fs::create_dir(&layer).map_err(|source| BuildError::Io {
        action: "create",
        path: layer.clone(),
        source,
    })?;
    Ok(layer)
}

fn internal(what: &'static str) -> BuildError {
    BuildError::Internal(what)
}

/// Builds the image `req` describes: plans through `client`, replays against `steps`.
pub fn build(
    client: &dyn BuildControl,
    steps: &dyn StepCache,
    req: &BuildRequest,
    progress: &mut dyn BuildObserver,
) -> Result<BuildOutcome, BuildError> {
    let metered = Metered::new(steps);
    let steps: &dyn StepCache = &metered;
    let started = Instant::now();
    // One plan: lcached parses and plans the Dockerfile once and derives every key it can
    // (its index gives context digests without re-reading an unchanged tree); the build
    // executes that plan and derives only the keys that were pending on a built result.
    let resp = client.plan(&req.inputs)?;
    let plan = resp.plan.ok_or_else(|| {
        BuildError::Cache(crate::errors::CacheError::Protocol(
            "lcached answered the plan without the plan itself".into(),
        ))
    })?;
    for w in &plan.warnings {
        progress.note(&format!("warning: {w}"));
    }
    let dockerfile = resp.report.dockerfile.clone();
    let evicted = resp.evicted;
    let daemon_keys = resp.report.steps.into_iter().map(|k| (k.at(), k)).collect();
    let cache = CacheDir::open(&req.cache_dir).map_err(|source| BuildError::Io {
        action: "use the cache directory",
        path: req.cache_dir.clone(),
        source,
    })?;
    // Held until the build returns: no prune removes a snapshot it uses meanwhile.
    let _lock = hold_for_build(&cache).map_err(|source| BuildError::Io {
        action: "lock the cache directory",
        path: req.cache_dir.clone(),
        source,
    })?;
    // Snapshots earlier builds left under provisional names take their digests' now, before
    // a step looks one up.
    provisional_snapshots::resolve(&cache, steps);
    let mut first_step = HashMap::new();
    let mut n = 1;
    for st in plan.needed_stages() {
        first_step.insert(st.index, n);
        n += st.steps.len();
    }
    let given = GivenNames {
        cache: cache.clone(),
        names: Mutex::new(Vec::new()),
    };
    let b = Builder {
        client,
        steps,
        req,
        cache,
        dockerfile,
        plan,
        daemon_keys,
        context: Mutex::new(None),
        progress: Mutex::new(progress),
        finder: CauseFinder::new(client, &req.inputs, req.no_cache).with_evicted(&evicted),
        first_step,
        cache_names_layers: std::sync::atomic::AtomicBool::new(true),
        cache_takes_links: std::sync::atomic::AtomicBool::new(steps.takes_linked()),
        deferred: Mutex::new(Vec::new()),
        given,
    };
    let (mut states, finished) = match b.build_stages() {
        Ok(built) => built,
        Err(stopped) => return Err(b.record_failure(*stopped, started)),
    };
    let (events, history) = in_order(finished);
    let mut target = states
        .remove(&b.plan.target)
        .ok_or_else(|| internal("the target stage was not built"))?;
    if req.squash && target.layers.len() > target.base_layers + 1 {
        let own = target.layers.split_off(target.base_layers);
        let merged = squash(
            &b.cache,
            steps,
            &target.snapshots[..target.base_layers],
            &own,
            req.layer_compression,
        )?;
        target.layers.push(merged);
        // Docker's --squash keeps every entry, marks the merged ones empty and adds one for
        // the merged layer.
        let mut seen = 0;
        let keep = target.history.iter().filter(|h| !h.empty_layer).count() - own.len();
        for h in target.history.iter_mut().filter(|h| !h.empty_layer) {
            seen += 1;
            if seen > keep {
                h.empty_layer = true;
            }
        }
        target.history.push(HistoryEntry {
            created: target.history.last().and_then(|h| h.created.clone()),
            created_by: None,
            comment: Some(format!("merge of {} layers (lcache build --squash)", own.len())),
            empty_layer: false,
        });
    }
    let draft = ImageDraft {
        platform: b.plan.stages[b.plan.target].platform.clone(),
        config: target.config.clone(),
        layers: target.layers.clone(),
        history: target.history.clone(),
    };
    let deferred = std::mem::take(&mut *b.deferred.lock().unwrap_or_else(|p| p.into_inner()));
    let elapsed = started.elapsed().as_millis() as u64;
    let mut record = b.record(&events, history, elapsed);
    let (image, record) = match b.name_later(draft, record.clone(), deferred)? {
        Named::Later(record) => (
            ImageRecord {
                name: String::new(),
                manifest_digest: String::new(),
                config_digest: String::new(),
                layers: target.layers.clone(),
                config: String::new(),
                created_at_ms: 0,
            },
            *record,
        ),
        Named::Now(draft) => {
            let docs = draft.documents()?;
            let mut image = docs.image;
            steps.put_blob(&image.config_digest, BlobSource::Bytes(&docs.config))?;
            steps.put_blob(&image.manifest_digest, BlobSource::Bytes(&docs.manifest))?;
            for t in &req.tags {
                image.name = lcache_proto::wire::normalize_image_name(t);
                client.put_image(&image)?;
            }
            record.image = image.manifest_digest.clone();
            (image, client.post_build(&record)?)
        }
    };
    let mut image = image;
    if let Some(t) = req.tags.first() {
        image.name = lcache_proto::wire::normalize_image_name(t);
    }
    let cached = events.iter().filter(|e| e.cached).count();
    b.progress().summary(&SummaryEvent {
        event: "summary",
        steps: events.len(),
        cached,
        built: events.len() - cached,
        duration_ms: elapsed,
        image: image.manifest_digest.clone(),
        tags: req.tags.clone(),
        cascades: record.cascades.clone(),
        build: record.id.clone(),
    });
    Ok(BuildOutcome {
        image,
        snapshots: target.snapshots.iter().flat_map(|s| s.dirs().to_vec()).collect(),
        steps: events,
        record,
        bytes_fetched: metered.fetched(),
        bytes_stored: metered.stored(),
    })
}

/// The steps that finished, in build order: what progress showed, and what the history keeps.
fn in_order(mut finished: Vec<Finished>) -> (Vec<StepEvent>, Vec<BuildStep>) {
    finished.sort_by_key(|(e, _)| e.n);
    finished.into_iter().unzip()
}

impl Builder<'_> {
    /// The build as the history keeps it, from the steps that finished (`events` and
    /// `steps`, in order), without its image or failure.
    fn record(&self, events: &[StepEvent], steps: Vec<BuildStep>, elapsed_ms: u64) -> BuildRecord {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let misses: Vec<(usize, usize, String, MissCause, u64)> = events
            .iter()
            .zip(&steps)
            .filter_map(|(e, h)| {
                h.cause
                    .clone()
                    .map(|c| (e.n, e.line, e.instruction.clone(), c, e.duration_ms))
            })
            .collect();
        let inputs = &self.req.inputs;
        BuildRecord {
            id: String::new(),
            started_at_ms: now.saturating_sub(elapsed_ms),
            finished_at_ms: now,
            dockerfile: inputs.dockerfile_name.clone(),
            context: inputs.context.clone(),
            target: inputs.target.clone(),
            steps,
            dockerfile_path: inputs.dockerfile_path.clone(),
            dockerignore: dockerignore_digest(Path::new(&inputs.context)),
            cascades: cascades(&misses),
            image: String::new(),
            failure: None,
        }
    }

    /// Keeps a build that failed in the history, with the steps that finished and the one it
    /// failed at: the next build compares its steps with them (and re-runs a COPY from the
    /// snapshot this one made), and `lcache explain` shows it. Returns the build's error.
    fn record_failure(&self, stopped: Stopped, started: Instant) -> BuildError {
        // Records lcached would have stored once it named the image (none unless the
        // target stage finished): stored here, as every finished step's record is.
        let deferred = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|p| p.into_inner()));
        let _ = self.settle(&mut [], deferred);
        let (events, steps) = in_order(stopped.finished);
        let mut record = self.record(&events, steps, started.elapsed().as_millis() as u64);
        record.failure = Some(BuildFailure {
            step: stopped.step.map(|s| *s),
            message: stopped.error.to_string(),
        });
        if let Err(e) = self.client.post_build(&record) {
            self.progress().note(&format!(
                "warning: the failed build could not be kept in the history: {e}"
            ));
        }
        stopped.error
    }
}

/// Who names a build's image.
enum Named {
    /// This build, now: every diff_id is known.
    Now(Box<ImageDraft>),
    /// lcached, once the diff_ids it takes are known: the build as it recorded it.
    Later(Box<BuildRecord>),
}

impl Builder<'_> {
    /// Hands the image to lcached to name, if it is taking diff_ids of it (`deferred`);
    /// otherwise (or if it cannot) waits for them, and the build names the image itself.
    fn name_later(
        &self,
        mut draft: ImageDraft,
        build: BuildRecord,
        deferred: Vec<(usize, PendingRecord)>,
    ) -> Result<Named, BuildError> {
        if deferred.is_empty() {
            return Ok(Named::Now(Box::new(draft)));
        }
        let mut layers = Vec::new();
        for (at, p) in &deferred {
            if let DiffIdPending::Cache { tail, .. } = &p.hashing {
                layers.push(DeferredLayer {
                    at: *at,
                    tail: tail.clone(),
                    record: p.record.clone(),
                });
            }
        }
        let handed = DeferredBuild {
            build,
            draft: draft.clone(),
            tags: self
                .req
                .tags
                .iter()
                .map(|t| lcache_proto::wire::normalize_image_name(t))
                .collect(),
            layers,
            scope: String::new(),
        };
        if let Some(record) = self.client.defer_build(&handed)? {
            for (_, p) in deferred {
                if let DiffIdPending::Cache { tail, index } = p.hashing {
                    // Only a speed-up for the next build of this step.
                    let _ = keep_pending_segments(&self.cache, &p.digest, &index, &tail);
                }
            }
            return Ok(Named::Later(Box::new(record)));
        }
        // An lcached that does not name images: wait for the diff_ids here.
        self.settle(&mut draft.layers, deferred)?;
        Ok(Named::Now(Box::new(draft)))
    }
}

impl<'a> Builder<'a> {
    fn at(&self, line: usize) -> String {
        format!("{}:{line}", self.dockerfile)
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, &'a mut dyn BuildObserver> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds every needed stage, each once the stages it uses are built; stages whose
    /// dependencies are all built run at the same time.
    fn build_stages(&self) -> Built {
        let deps = |s: &PlannedStage| -> Vec<usize> {
            let mut d: Vec<usize> = s
                .steps
                .iter()
                .flat_map(|st| match &st.def {
                    StepDef::Copy(CopyDef {
                        from: CopyFrom::Stage { index },
                        ..
                    }) => vec![*index],
                    StepDef::Run(r) => r
                        .binds
                        .iter()
                        .filter_map(|b| match b.from {
                            CopyFrom::Stage { index } => Some(index),
                            _ => None,
                        })
                        .collect(),
                    _ => vec![],
                })
                .collect();
            if let Base::Stage { index } = s.base {
                d.push(index);
            }
            d
        };
        let mut remaining: Vec<&PlannedStage> = self.plan.needed_stages().collect();
        let mut states: HashMap<usize, StageState> = HashMap::new();
        let mut finished = Vec::new();
        while !remaining.is_empty() {
            let (ready, later): (Vec<&PlannedStage>, Vec<&PlannedStage>) = remaining
                .into_iter()
                .partition(|s| deps(s).iter().all(|d| states.contains_key(d)));
            if ready.is_empty() {
                let mut stopped: Box<Stopped> = internal("stages depend on each other in a cycle").into();
                stopped.finished = finished;
                return Err(stopped);
            }
            let done = &states;
            let results: Vec<StageBuilt> = std::thread::scope(|scope| {
                let handles: Vec<_> = ready
                    .iter()
                    .map(|s| scope.spawn(move || self.build_stage(s.index, done)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(internal("a build thread panicked").into()))
                    })
                    .collect()
            });
            // The first stage that failed stops the build; what the others finished is kept.
            let mut stopped: Option<Box<Stopped>> = None;
            for (s, r) in ready.iter().zip(results) {
                match r {
                    Ok((st, steps)) => {
                        states.insert(s.index, st);
                        finished.extend(steps);
                    }
                    Err(mut e) => match stopped.as_mut() {
                        Some(first) => first.finished.append(&mut e.finished),
                        None => stopped = Some(e),
                    },
                }
            }
            if let Some(mut stopped) = stopped {
                stopped.finished.append(&mut finished);
                return Err(stopped);
            }
            remaining = later;
        }
        Ok((states, finished))
    }

    fn base_state(&self, stage: &PlannedStage, states: &HashMap<usize, StageState>) -> Result<StageState, BuildError> {
        match &stage.base {
            Base::Scratch => Ok(StageState {
                parent: "scratch".into(),
                layers: vec![],
                snapshots: vec![],
                config: RuntimeConfig::default().for_new_stage(),
                rebuilt: None,
                history: Vec::new(),
                base_layers: 0,
            }),
            Base::Stage { index } => {
                let s = states
                    .get(index)
                    .ok_or_else(|| internal("a base stage was not built first"))?;
                // A stage's image config starts from its base stage's final config.
                Ok(s.clone())
            }
            Base::Image { reference } => {
                let img = self.client.image(reference)?.ok_or_else(|| BuildError::Unbuildable {
                    location: self.at(stage.line),
                    message: format!(
                        "base image {reference} is not known to lcached — import it first: `lcache image import FILE {reference}` (a `docker save` tar, an OCI layout or a rootfs tar)"
                    ),
                })?;
                let mut snapshots = Vec::new();
                for l in &img.layers {
                    snapshots.push(ensure_snapshot(&self.cache, self.steps, l)?);
                }
                Ok(StageState {
                    parent: img.manifest_digest.clone(),
                    layers: img.layers.clone(),
                    snapshots,
                    config: RuntimeConfig::of_document(img.config.as_bytes())
                        .map_err(|e| BuildError::Unbuildable {
                            location: self.at(stage.line),
                            message: format!("base image {reference}: {e} — import it again"),
                        })?
                        .for_new_stage(),
                    rebuilt: None,
                    history: base_history(img.config.as_bytes(), img.layers.len()),
                    base_layers: img.layers.len(),
                })
            }
        }
    }

    fn build_stage(&self, i: usize, states: &HashMap<usize, StageState>) -> StageBuilt {
        let stage = self.plan.stages[i].clone();
        let mut st = self.base_state(&stage, states)?;
        st.base_layers = st.layers.len();
        let base_env = st.config.env().to_vec();
        let label_name = stage.name.clone().unwrap_or_else(|| format!("stage-{i}"));
        let mut finished = Vec::new();
        let mut pending = Vec::new();
        let mut failed_step = None;
        let ran = self.build_steps(
            (i, &stage, &label_name),
            states,
            &base_env,
            &mut st,
            (&mut finished, &mut failed_step),
            &mut pending,
        );
        // The target's layers named by lcached may be left to it: nothing after this stage
        // reads their diff_ids but the image's documents (a squash reads the layers).
        if self.req.name_later && !self.req.squash && i == self.plan.target && ran.is_ok() {
            let (later, now): (Vec<_>, Vec<_>) = pending
                .into_iter()
                .partition(|(_, p)| matches!(p.hashing, DiffIdPending::Cache { .. }));
            pending = now;
            self.deferred.lock().unwrap_or_else(|p| p.into_inner()).extend(later);
        }
        // Records still waiting for their diff_id are stored even when a later step failed,
        // as every step's record is stored once it is built.
        let settled = self.settle(&mut st.layers, pending);
        if let Err(error) = ran.and(settled) {
            return Err(Box::new(Stopped {
                error,
                finished,
                step: failed_step,
            }));
        }
        st.config.apply(&stage.config);
        let contributions = self.history_of(&stage);
        extend(&mut st.history, &contributions, self.req.source_date_epoch);
        Ok((st, finished))
    }

    /// Builds the steps of stage `i` onto `st`, adding each to `finished`, or a step whose
    /// run failed to `failed`.
    fn build_steps(
        &self,
        (i, stage, label_name): (usize, &PlannedStage, &str),
        states: &HashMap<usize, StageState>,
        base_env: &[String],
        st: &mut StageState,
        (finished, failed): (&mut Vec<Finished>, &mut Option<Box<BuildStep>>),
        pending: &mut Vec<(usize, PendingRecord)>,
    ) -> Result<(), BuildError> {
        for (n, step) in stage.steps.iter().enumerate() {
            let number = self.first_step.get(&i).copied().unwrap_or(1) + n;
            let label = format!("{label_name} {}/{}", n + 1, stage.steps.len());
            self.progress().started(number, &label, &step.instruction);
            let t = Instant::now();
            let (digest, from_roots) = self.sources_digest(i, n, &step.def, states)?;
            let inputs = self.key_inputs(i, n, &step.def, &stage.platform, &st.parent, &digest);
            let key = inputs.key();
            let mut hit = if self.req.no_cache {
                None
            } else {
                self.steps.get_step(&key)?
            };
            // A record whose layer is gone or corrupt is a miss: the step reruns and its blob
            // is stored again, instead of the build failing.
            let mut restored = None;
            let mut unusable = false;
            if let Some(l) = hit.as_ref().and_then(|r| r.layer.clone()) {
                match ensure_snapshot(&self.cache, self.steps, &l) {
                    Ok(snap) => restored = Some((l, snap)),
                    Err(e) if e.is_unusable_blob() => {
                        self.progress().note(&format!(
                            "warning: {}: the cached layer is unusable ({e}); rebuilding the step",
                            self.at(step.line)
                        ));
                        hit = None;
                        unusable = true;
                    }
                    Err(e) => return Err(e),
                }
            }
            let cached = hit.is_some();
            let saved_ms = hit.as_ref().map_or(0, |r| r.duration_ms);
            let (cause, compared_with) = match cached {
                true => (None, None),
                false if unusable => (Some(MissCause::Evicted), None),
                false => {
                    let at = StepAt {
                        stage: i,
                        position: n,
                        instruction: &step.instruction,
                        inputs: &inputs,
                        key: &key,
                        rebuilt_parent: st.rebuilt.clone(),
                        upstream_unavailable: self.steps.upstream_unavailable(&key),
                    };
                    let (c, k) = self.finder.cause(&at);
                    (Some(c), k)
                }
            };
            let this = CascadeRoot {
                step: number,
                line: step.line,
                instruction: step.instruction.clone(),
            };
            st.rebuilt = root_after(cause.as_ref(), this);
            let layer = match hit {
                Some(_) => restored.map(|(l, s)| (l, s, None, None)),
                None => match self.execute(
                    number,
                    step.line,
                    &step.instruction,
                    &step.def,
                    st,
                    base_env,
                    from_roots,
                    inputs.clone(),
                    &key,
                    t,
                    compared_with.as_deref().and_then(|k| self.seed_from(k, &inputs)),
                    // Worth it only while a later step can use the time.
                    n + 1 < stage.steps.len(),
                    // Its record is handed to lcached with the image, which names the layer
                    // (its digest) too: nobody waits for the digest then.
                    self.req.name_later && !self.req.squash && i == self.plan.target,
                ) {
                    Ok(layer) => Some(layer),
                    Err(e) => {
                        *failed = Some(Box::new(BuildStep {
                            stage: i,
                            line: step.line,
                            instruction: step.instruction.clone(),
                            key,
                            cached: false,
                            duration_ms: t.elapsed().as_millis() as u64,
                            saved_ms: 0,
                            cause,
                            inputs: Some(inputs),
                            compared_with,
                        }));
                        return Err(e);
                    }
                },
            };
            let phases = layer.as_ref().and_then(|(_, _, p, _)| *p);
            if let Some((l, snap, _, waiting)) = layer {
                if let Some(w) = waiting {
                    pending.push((st.layers.len(), w));
                }
                st.layers.push(l);
                st.snapshots.push(snap);
            }
            st.parent = key.clone();
            let ev = StepEvent {
                event: "step",
                n: number,
                stage: i,
                stage_name: stage.name.clone(),
                line: step.line,
                instruction: step.instruction.clone(),
                cached,
                key: key.clone(),
                duration_ms: t.elapsed().as_millis() as u64,
                cause: cause.as_ref().map(MissCause::describe),
                phases,
            };
            self.progress().finished(&ev);
            let record = BuildStep {
                stage: i,
                line: step.line,
                instruction: step.instruction.clone(),
                key,
                cached,
                duration_ms: ev.duration_ms,
                saved_ms,
                cause,
                inputs: Some(inputs),
                compared_with,
            };
            finished.push((ev, record));
        }
        Ok(())
    }

    /// What the stage's instructions add to the image's history, in Dockerfile order, in
    /// BuildKit's words (the plan has them).
    fn history_of(&self, stage: &PlannedStage) -> Vec<Contribution> {
        stage
            .history
            .iter()
            .map(|h| match h.layer {
                true => Contribution::Layer {
                    created_by: h.created_by.clone(),
                },
                false => Contribution::Config {
                    created_by: h.created_by.clone(),
                },
            })
            .collect()
    }

    /// A step's key inputs: lcached's, when it derived the key from the same parent and
    /// sources; derived here only for keys that waited on a result this build produced
    /// (a `COPY --from`, or any step after one).
    fn key_inputs(
        &self,
        stage: usize,
        step: usize,
        def: &StepDef,
        platform: &str,
        parent: &str,
        sources_digest: &str,
    ) -> KeyInputs {
        let planned = self
            .daemon_keys
            .get(&StepRef { stage, step })
            .and_then(|k| k.inputs.as_ref())
            .filter(|i| {
                i.parent == parent && (sources_digest.is_empty() || i.sources_digest() == Some(sources_digest))
            });
        match planned {
            Some(i) => i.clone(),
            None => key_inputs(def, platform, parent, sources_digest),
        }
    }

    /// The sources digest a step's key needs, and what it selected: one stage selection for a
    /// `COPY --from`, one entry per bind mount of a RUN.
    fn sources_digest(
        &self,
        stage: usize,
        n: usize,
        def: &StepDef,
        states: &HashMap<usize, StageState>,
    ) -> Result<(String, Vec<Selected>), BuildError> {
        let line = self.plan.stages[stage].steps[n].line;
        let planned = self.daemon_keys.get(&StepRef { stage, step: n });
        let c = match def {
            StepDef::Copy(c) => c,
            StepDef::Run(r) if !r.binds.is_empty() => {
                let mut parts = Vec::new();
                let mut selections = Vec::new();
                for (i, b) in r.binds.iter().enumerate() {
                    let (digest, sel) = match &b.from {
                        CopyFrom::Context => {
                            let d = planned.and_then(|k| k.bind_digests.get(i)).filter(|d| !d.is_empty());
                            let d = d.ok_or_else(|| {
                                BuildError::Cache(CacheError::Protocol(
                                    "the daemon gave no digest for a RUN's bind mount".into(),
                                ))
                            })?;
                            (d.clone(), Selected::Context { digest: d.clone() })
                        }
                        other => {
                            let sel = self.stage_selection(line, other, &b.selection(), states)?;
                            (sel.digest.clone(), Selected::Stage(sel))
                        }
                    };
                    parts.push((b.target.clone(), digest));
                    selections.push(sel);
                }
                let parts: Vec<(&str, &str)> = parts.iter().map(|(t, d)| (t.as_str(), d.as_str())).collect();
                return Ok((binds_digest(&parts), selections));
            }
            _ => return Ok((String::new(), Vec::new())),
        };
        match &c.from {
            CopyFrom::Context if c.sources.is_empty() => Ok((String::new(), Vec::new())),
            CopyFrom::Context if c.add && c.sources.iter().any(|s| is_remote(s)) => {
                let d = self.download_sources(line, c)?;
                Ok((d.key_digest.clone(), vec![Selected::Download(Box::new(d))]))
            }
            CopyFrom::Context => {
                let d = planned.and_then(|k| k.sources_digest.clone());
                d.map(|d| (d, Vec::new())).ok_or_else(|| {
                    BuildError::Cache(crate::errors::CacheError::Protocol(
                        "the daemon gave no sources digest for a COPY".into(),
                    ))
                })
            }
            other => {
                let sel = self.stage_selection(line, other, c, states)?;
                Ok((sel.digest.clone(), vec![Selected::Stage(sel)]))
            }
        }
    }

    /// Downloads an `ADD <url>…`'s sources into a directory of their own, as a context its
    /// COPY reads from.
    fn download_sources(&self, line: usize, c: &CopyDef) -> Result<Downloaded, BuildError> {
        let refuse = |message: String| BuildError::Unbuildable {
            location: self.at(line),
            message,
        };
        if let Some(s) = c
            .sources
            .iter()
            .find(|s| !s.starts_with("http://") && !s.starts_with("https://"))
        {
            return Err(refuse(if is_remote(s) {
                format!("ADD of a git repository ({s}) is not supported yet — clone it in a RUN, or into the context and COPY it")
            } else {
                format!("ADD mixes URLs with the local source {s} — give the URLs and the local files an ADD each")
            }));
        }
        if !c.checksum.is_empty() && c.sources.len() != 1 {
            return Err(refuse("ADD --checksum needs exactly one URL".into()));
        }
        let dir = self.cache.work_dir().map_err(|source| BuildError::Io {
            action: "make a work directory in",
            path: self.cache.root().to_path_buf(),
            source,
        })?;
        let mut names = Vec::new();
        let mut key = Encoder::new();
        key.str("remote");
        for url in &c.sources {
            let d = download(url, &c.checksum, self.cache.root()).map_err(|e| refuse(e.to_string()))?;
            place(&d, dir.path()).map_err(|e| refuse(format!("cannot place the download of {url}: {e}")))?;
            key.str(&d.name)
                .str(&d.sha256)
                .str(d.last_modified.as_deref().unwrap_or_default());
            names.push(d.name);
        }
        // What lands is a plain COPY of the downloaded files: a URL's archive is never
        // unpacked.
        let mut def = c.clone();
        def.add = false;
        def.checksum.clear();
        def.sources = names;
        let mut local = LocalContext::walk(dir.path()).map_err(|e| refuse(e.to_string()))?;
        let copied_digest = local.digest_sources(&def).map_err(|e| refuse(e.to_string()))?.digest;
        key.str(&copied_digest);
        let entries = local.entries().to_vec();
        let excludes =
            IgnoreMatcher::from_patterns(def.excludes.iter().map(String::as_str)).map_err(|e| refuse(e.to_string()))?;
        let roots = select(&entries, &def.sources, &excludes).map_err(|e| refuse(e.to_string()))?;
        Ok(Downloaded {
            _dir: dir,
            root: local.root().to_path_buf(),
            def,
            entries,
            roots,
            copied_digest,
            key_digest: hex(&key.finish()),
        })
    }

    /// What `c` selects in a built stage's files (an image's are not supported yet).
    fn stage_selection(
        &self,
        line: usize,
        from: &CopyFrom,
        c: &CopyDef,
        states: &HashMap<usize, StageState>,
    ) -> Result<StageSelection, BuildError> {
        let index = match from {
            CopyFrom::Stage { index } => index,
            CopyFrom::Image { reference } => {
                return Err(BuildError::Unbuildable {
                    location: self.at(line),
                    message: format!(
                        "--from={reference} (an image) is not supported yet — add a stage `FROM {reference} AS src` and use --from=src"
                    ),
                })
            }
            CopyFrom::Context => return Err(internal("the context is not a stage")),
        };
        let from = states
            .get(index)
            .ok_or_else(|| internal("a --from stage was not built first"))?;
        StageSelection::make(&self.cache, from, c).map_err(|e| BuildError::Unbuildable {
            location: self.at(line),
            message: e.to_string(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn execute(
        &self,
        number: usize,
        line: usize,
        instruction: &str,
        def: &StepDef,
        st: &StageState,
        base_env: &[String],
        selected: Vec<Selected>,
        inputs: KeyInputs,
        key: &str,
        started: Instant,
        mut seed: Option<Seed>,
        defer_hashing: bool,
        name_later: bool,
    ) -> Result<(LayerRef, Snapshot, Option<StepPhases>, Option<PendingRecord>), BuildError> {
        let location = format!("{}:{line}", self.dockerfile);
        let fail = |message: String, last_output: Vec<String>| BuildError::StepFailed {
            location: location.clone(),
            instruction: instruction.to_string(),
            message,
            last_output,
        };
        let work = self.cache.work_dir().map_err(|source| BuildError::Io {
            action: "make a work directory in",
            path: self.cache.root().to_path_buf(),
            source,
        })?;
        let lowers = lowers(&st.snapshots);
        // A re-run COPY's layer directory may hold only what changed: then the whole
        // layer is its base's snapshot with it above.
        let mut copied = None;
        let tree = match def {
            StepDef::Run(r) => {
                let mut env: Vec<String> = base_env.to_vec();
                for (k, v) in &r.env {
                    env.retain(|e| !e.starts_with(&format!("{k}=")));
                    env.push(format!("{k}={v}"));
                }
                let mut prepared = prepare_mounts(
                    &r.mounts,
                    &MountInputs {
                        cache_root: &self.cache.root().join("run-cache"),
                        work: work.path(),
                        workdir: &r.workdir,
                        secrets: &self.req.secrets,
                        ssh: &self.req.ssh,
                    },
                )
                .map_err(|e| fail(e.to_string(), vec![]))?;
                for extra in &prepared.env {
                    let name = extra.split('=').next().unwrap_or_default();
                    let set = env.iter().any(|e| e.split('=').next() == Some(name));
                    // BuildKit points SSH_AUTH_SOCK at the agent only when the RUN has none;
                    // a secret asked for as a variable replaces one.
                    if set && name == "SSH_AUTH_SOCK" {
                        continue;
                    }
                    env.retain(|e| e.split('=').next() != Some(name));
                    env.push(extra.clone());
                }
                for (i, (b, sel)) in r.binds.iter().zip(&selected).enumerate() {
                    let mount = self
                        .materialize_bind(b, sel, &work.path().join(format!("bind-{i}")))
                        .map_err(|e| fail(format!("RUN --mount=type=bind,target={}: {e}", b.target), vec![]))?;
                    prepared.mounts.push(mount);
                }
                let heredocs: Vec<(String, String)> =
                    r.heredocs.iter().map(|h| (h.name.clone(), h.content.clone())).collect();
                let spec = RunSpec {
                    runtime: self.req.runtime.clone(),
                    lowers: lowers.clone(),
                    argv: argv_with_heredocs(&r.argv, &heredocs),
                    env,
                    cwd: r.workdir.clone(),
                    user: r.user.clone(),
                    network_none: r.network == "none",
                    mounts: prepared.mounts.clone(),
                };
                let upper =
                    run_step(&spec, work.path(), &mut |l| self.progress().output(number, l)).map_err(|e| match e {
                        RunError::Exit { code, last_output } => fail(
                            format!("the command exited with code {code}; nothing was cached"),
                            last_output,
                        ),
                        RunError::Setup(m) => fail(m, vec![]),
                    })?;
                let file_mounts: Vec<&str> = prepared
                    .mounts
                    .iter()
                    .filter_map(|m| match m {
                        // Files, sockets: the runtime made an empty file to mount each over.
                        PreparedMount::Bind { source, target, .. } if !source.is_dir() => Some(target.as_str()),
                        _ => None,
                    })
                    .collect();
                remove_runtime_mountpoints(&upper, &lowers, &file_mounts);
                upper
            }
            StepDef::Copy(c) => {
                let layer = layer_dir(work.path())?;
                let view = image_view(&lowers, work.path()).map_err(|e| fail(e.to_string(), vec![]))?;
                let attrs = self
                    .copy_attrs(c, view.path())
                    .map_err(|e| fail(e.to_string(), vec![]))?;
                let keyed_digest = inputs.sources_digest().unwrap_or_default().to_string();
                // Copies the sources as read from the context, over `seed`'s snapshot if given.
                let copy_from_context = |seed: Option<&Seed>| -> Result<Result<CopyLayer, CopyError>, BuildError> {
                    let (entries, roots, root) = self.context_selection(c).map_err(|e| fail(e.to_string(), vec![]))?;
                    let job = CopyJob {
                        def: c,
                        src_root: &root,
                        entries: &entries,
                        roots: &roots,
                        attrs,
                        keyed_digest: &keyed_digest,
                        image: Some(view.path()),
                    };
                    Ok(build_copy_layer(&layer, &job, seed))
                };
                let built = match selected.first() {
                    Some(Selected::Download(d)) => build_copy_layer(
                        &layer,
                        &CopyJob {
                            def: &d.def,
                            src_root: &d.root,
                            entries: &d.entries,
                            roots: &d.roots,
                            attrs,
                            keyed_digest: &d.copied_digest,
                            image: Some(view.path()),
                        },
                        None,
                    ),
                    Some(Selected::Stage(sel)) => build_copy_layer(
                        &layer,
                        &CopyJob {
                            def: c,
                            src_root: sel.mount.path(),
                            entries: &sel.entries,
                            roots: &sel.roots,
                            attrs,
                            keyed_digest: &keyed_digest,
                            image: Some(view.path()),
                        },
                        None,
                    ),
                    _ => {
                        // A re-run of the same COPY: lcached knows what changed since its
                        // seed, so only that is read, without walking the context.
                        let changes = seed.as_ref().and_then(|s| {
                            let old = changes_from(c, s)?;
                            Some((s, source_changes(self.client, old, &keyed_digest, DELTA_REBASE_AT)?))
                        });
                        let quick = changes.and_then(|(s, changes)| {
                            let job = ChangeJob {
                                def: c,
                                context: Path::new(&self.req.inputs.context),
                                changes: &changes,
                                attrs,
                                image: Some(view.path()),
                            };
                            build_copy_changes(&layer, &job, s).transpose()
                        });
                        match quick {
                            Some(built) => built,
                            None => copy_from_context(seed.as_ref())?,
                        }
                    }
                };
                let built = match built {
                    // The entries kept beside the seed's snapshot were damaged on disk (each
                    // chunk is checked as it is read): copy the sources whole instead.
                    Err(e @ CopyError::DamagedSeed(_)) => {
                        self.progress()
                            .note(&format!("warning: {}: {e}; copying the sources whole", self.at(line)));
                        lcache_confine::Root::open(work.path())
                            .and_then(|w| w.remove_all(Path::new("layer")))
                            .map_err(|e| fail(format!("cannot clear the layer's directory: {e}"), vec![]))?;
                        layer_dir(work.path())?;
                        seed = None;
                        copy_from_context(None)?
                    }
                    other => other,
                };
                copied = Some(built.map_err(|e| fail(e.to_string(), vec![]))?);
                layer
            }
            StepDef::Workdir { path, user } => {
                let layer = layer_dir(work.path())?;
                let view = image_view(&lowers, work.path()).map_err(|e| fail(e.to_string(), vec![]))?;
                let owner = if user.is_empty() {
                    (0, 0)
                } else {
                    let ids = resolve_user(view.path(), user).map_err(|e| fail(format!("USER {user}: {e}"), vec![]))?;
                    (ids.uid, ids.gid)
                };
                build_workdir_layer(&layer, path, Some(view.path()), owner).map_err(|e| fail(e.to_string(), vec![]))?;
                layer
            }
        };
        let mut phases = StepPhases {
            execute_ms: started.elapsed().as_millis() as u64,
            ..StepPhases::default()
        };
        let packing = Instant::now();
        let dest = work.path().join("layer.tgz");
        // The digests after a reused front are taken by the cache, from its own copy of the
        // seed's blob, when it can; else the diff_id is hashed on its own thread while the
        // build goes on, when a later step of the stage can use the time.
        let own = if defer_hashing {
            TailDigests::Thread
        } else {
            TailDigests::Here
        };
        let first_try = if self.cache_names_layers.load(std::sync::atomic::Ordering::Relaxed) {
            TailDigests::Cache
        } else {
            own
        };
        let compression = self.req.layer_compression;
        // Only the cache that said it takes them (not the fallback that reads no blob).
        let links = |steps: &dyn StepCache| {
            steps.takes_linked() && self.cache_takes_links.load(std::sync::atomic::Ordering::Relaxed)
        };
        let pack_with = |steps: &dyn StepCache, defer: TailDigests| match (&copied, seed.as_ref()) {
            (
                Some(
                    c @ CopyLayer {
                        entries: Some(entries), ..
                    },
                ),
                _,
            ) => Some((
                c,
                pack_copy(steps, c, entries, &tree, &dest, defer, compression, links(steps)),
            )),
            (Some(c @ CopyLayer { over_seed: true, .. }), s) => Some((
                c,
                match s {
                    Some(s) => pack_copy_over(steps, c, s, &tree, &dest, defer, compression, links(steps)),
                    // Its directory holds only the delta: never packed as a whole layer.
                    None => Err(std::io::Error::other("a layer made over a seed lost its seed")),
                },
            )),
            _ => None,
        };
        let packed_with = |steps: &dyn StepCache, tail: TailDigests| match pack_with(steps, tail) {
            Some((c, packed)) => packed.map(|p| {
                // The seed's blob the unchanged members were taken from: the cache need
                // only be sent the others.
                let base = c
                    .reuse
                    .as_ref()
                    .map(|(digest, _)| digest.as_str())
                    .filter(|_| !p.parts.is_empty());
                (
                    p.layer,
                    Some(p.index),
                    p.pending.map(DiffIdPending::Here),
                    base.map(|b| (b, p.parts, p.unwritten)),
                    (p.tail, p.links),
                )
            }),
            // A RUN's (or WORKDIR's) tree is kept as the step's snapshot: a cache that holds
            // tar layers by reference is named its files.
            None if links(steps) && compression == LayerCompression::None => pack_layer_linked(&tree, &dest)
                .map(|(p, linked)| (p, None, None, None, (None, Some(linked))))
                .or_else(|_| pack_layer(&tree, &dest, compression).map(|p| (p, None, None, None, (None, None)))),
            None => pack_layer(&tree, &dest, compression).map(|p| (p, None, None, None, (None, None))),
        };
        // `hashing`: the diff_id, hashed on its own thread since the pack reached the first
        // change, beside the upload and the steps after this one.
        let (mut packed, mut segments, mut hashing, mut parts, (tail, mut linked)) =
            packed_with(self.steps, first_try).map_err(|e| fail(format!("cannot pack the layer: {e}"), vec![]))?;
        phases.pack_ms = packing.elapsed().as_millis() as u64;
        let storing = Instant::now();
        let mut stored = None;
        if let Some(tail) = tail {
            match self.layer_named_by_cache(&packed, segments.as_mut(), parts.as_ref(), &tail, name_later) {
                Ok(Some(digest)) => {
                    // Its diff_id is the cache's to take, while the build goes on.
                    packed.digest = digest;
                    hashing = segments.take().map(|index| DiffIdPending::Cache { tail, index });
                    stored = Some(Ok(()));
                }
                Ok(None) => {
                    // It does not: pack the layer again, naming it here (and from now on).
                    self.cache_names_layers
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    (packed, segments, hashing, parts, (_, linked)) = packed_with(self.steps, own)
                        .map_err(|e| fail(format!("cannot pack the layer: {e}"), vec![]))?;
                }
                Err(e) => stored = Some(Err(e)),
            }
        }
        if let Some(runs) = linked.take() {
            // The cache links the snapshot's files; the file packed holds only the tar's own
            // bytes, so a cache that does not take it so gets the layer packed whole.
            match self.steps.put_linked(&runs) {
                Ok(Some(named)) => {
                    // The cache hashed it (nothing here read the files): its name, and each
                    // segment's state for the next edit of the step to resume from.
                    if !take_name(&mut packed, segments.as_mut(), &named) {
                        segments = None;
                    }
                    stored = Some(Ok(()));
                }
                refused => {
                    if let Err(e) = refused {
                        self.progress().note(&format!(
                            "warning: {}: the cache could not link the layer's files ({e}); packing it whole",
                            self.at(line)
                        ));
                    }
                    self.cache_takes_links
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    (packed, segments, hashing, parts, _) = packed_with(self.steps, own)
                        .map_err(|e| fail(format!("cannot pack the layer: {e}"), vec![]))?;
                }
            }
        }
        let stored = stored.unwrap_or_else(|| match &parts {
            Some((base, parts, unwritten)) => self.steps.put_blob(
                &packed.digest,
                BlobSource::Parts {
                    path: &packed.path,
                    len: packed.size,
                    base,
                    parts,
                    unwritten: *unwritten,
                },
            ),
            None => BlobSource::file(&packed.path).and_then(|b| self.steps.put_blob(&packed.digest, b)),
        });
        if let (Err(e), Some(_)) = (&stored, &parts) {
            // The members taken unread from the seed's blob are not what the cache holds
            // (its copy is damaged, or went away): pack the layer again without the seed's
            // blob, and store it whole.
            self.progress().note(&format!(
                "warning: {}: the cache could not take the layer as changes over its last one ({e}); packing it whole",
                self.at(line)
            ));
            if let Some(DiffIdPending::Here(h)) = hashing.take() {
                // It reads the file the layer is packed into again.
                let _ = h.finish();
            }
            (packed, segments, hashing, _, _) = packed_with(&WithoutBlobs(self.steps), own)
                .map_err(|e| fail(format!("cannot pack the layer: {e}"), vec![]))?;
            self.steps.put_blob(&packed.digest, BlobSource::file(&packed.path)?)?;
        } else {
            stored?;
        }

        let layer = LayerRef {
            digest: packed.digest.clone(),
            blake3: String::new(),
            size: packed.size,
            diff_id: packed.diff_id.clone(),
            media_type: compression.media_type().into(),
        };
        let record = StepRecord {
            key: key.to_string(),
            layer: Some(layer.clone()),
            duration_ms: started.elapsed().as_millis() as u64,
            inputs: Some(inputs),
            created_at_ms: 0,
        };
        let (pending, segments) = match hashing {
            // The blob is durable in the daemon; only now may a record point to it.
            None => {
                self.put_record(&record, line)?;
                (None, segments)
            }
            Some(hashing) => {
                let pending = PendingRecord {
                    record,
                    digest: packed.digest.clone(),
                    line,
                    instruction: instruction.to_string(),
                    hashing,
                };
                (Some(pending), None)
            }
        };
        phases.store_ms = storing.elapsed().as_millis() as u64;
        let snap = self.keep_snapshot(&packed.digest, &tree, copied, segments, work.path())?;
        mark_used(&self.cache, &packed.digest);
        Ok((layer, snap, Some(phases), pending))
    }

    /// Stores a re-run COPY's layer packed for the cache to name (`tail`), and fills in the
    /// blob's states `index` lacks after the change from what the cache says. Returns its
    /// digest (with `later`, perhaps a provisional name: the states come when it is
    /// resolved); `None` when the cache does not name layers.
    fn layer_named_by_cache(
        &self,
        packed: &lcache_image::layer_diff::PackedLayer,
        index: Option<&mut SegmentIndex>,
        parts: Option<&(&str, Vec<BlobPart>, u64)>,
        tail: &LayerTail,
        later: bool,
    ) -> Result<Option<String>, CacheError> {
        let (Some(index), Some((base, parts, _))) = (index, parts) else {
            return Err(CacheError::Protocol(
                "a layer left to the cache to name has no base".into(),
            ));
        };
        let members = tail.members.len();
        let layer = LayerParts {
            blob: BlobParts {
                base: base.to_string(),
                parts: parts.clone(),
            },
            tail: tail.clone(),
            name_later: later,
        };
        let Some(named) = self.steps.put_layer(&packed.path, &layer)? else {
            return Ok(None);
        };
        let provisional = is_provisional(&named.digest);
        let states = if provisional { 0 } else { members };
        if named.size != packed.size || named.blob_states.len() != states || members > index.segments.len() {
            return Err(CacheError::Protocol(format!(
                "the cache named a layer of {} bytes with {} states for a layer of {} bytes with {members} members after its change",
                named.size,
                named.blob_states.len(),
                packed.size
            )));
        }
        if provisional {
            self.given.push(named.digest.clone());
        } else {
            fill_blob_states(index, named.blob_states);
        }
        Ok(Some(named.digest))
    }

    /// Stores a rebuilt step's record.
    fn put_record(&self, record: &StepRecord, line: usize) -> Result<(), BuildError> {
        match self.steps.put_step(record) {
            // The cache kept the layer another build stored for this key first (a step
            // that does not rebuild byte for byte): this build still uses its own.
            Err(CacheError::Refused { status: 409, error, .. }) => {
                self.progress().note(&format!("warning: {}: {error}", self.at(line)));
                Ok(())
            }
            other => Ok(other?),
        }
    }

    /// Waits for the diff_ids still being hashed (`layers[at]`'s), then stores each
    /// record and keeps each segment index; the first failure is returned once all are.
    fn settle(&self, layers: &mut [LayerRef], pending: Vec<(usize, PendingRecord)>) -> Result<(), BuildError> {
        let mut result = Ok(());
        for (at, p) in pending {
            let waited = Instant::now();
            // A layer lcached named provisionally: its digest (and the blob's states) first.
            let named = match is_provisional(&p.digest) {
                true => self.resolved(&p.digest).map(Some),
                false => Ok(None),
            };
            let digest = match &named {
                Ok(Some(n)) => n.digest.clone(),
                _ => p.digest.clone(),
            };
            let hashed = named.and_then(|named| {
                let (diff_id, mut index) = p.hashing.finish(self.steps, &digest)?;
                if let Some(named) = named {
                    fill_blob_states(&mut index, named.blob_states);
                }
                Ok((diff_id, index))
            });
            let ms = waited.elapsed().as_millis() as u64;
            let stored = match hashed {
                Ok((diff_id, index)) => {
                    let mut record = p.record;
                    if let Some(l) = record.layer.as_mut() {
                        l.diff_id.clone_from(&diff_id);
                        l.digest.clone_from(&digest);
                    }
                    record.duration_ms += ms;
                    if let Some(l) = layers.get_mut(at) {
                        l.diff_id = diff_id;
                        l.digest.clone_from(&digest);
                    }
                    // Only a speed-up for the next build of this step.
                    let _ = keep_segments(&self.cache, &p.digest, &index);
                    self.put_record(&record, p.line)
                }
                Err(e) => Err(BuildError::StepFailed {
                    location: self.at(p.line),
                    instruction: p.instruction,
                    message: format!("cannot hash the layer: {e}; nothing was cached"),
                    last_output: vec![],
                }),
            };
            if let (Ok(()), Err(e)) = (&result, stored) {
                result = Err(e);
            }
        }
        result
    }

    /// What the provisional name `name` came to, once lcached has named the layer.
    fn resolved(&self, name: &str) -> Result<NamedLayer, String> {
        match self.steps.resolve_layers(std::slice::from_ref(&name.to_string())) {
            Ok(mut layers) => layers
                .pop()
                .flatten()
                .ok_or_else(|| format!("lcached did not store layer {name}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Keeps a rebuilt step's layer directory as the snapshot of the layer `digest`: whole,
    /// or as a delta over its base; another build's snapshot of the same layer, if one
    /// appeared meanwhile, is as good.
    fn keep_snapshot(
        &self,
        digest: &str,
        tree: &Path,
        copied: Option<CopyLayer>,
        segments: Option<SegmentIndex>,
        work: &Path,
    ) -> Result<Snapshot, BuildError> {
        let snap = self.cache.snapshot(digest);
        if snap.is_dir() {
            return Ok(Snapshot::whole(snap));
        }
        if let Some(CopyLayer {
            seed_base: Some((base_digest, base_dir)),
            delta: Some(delta),
            ..
        }) = copied
        {
            let unit = DeltaUnit::of(&self.cache, digest);
            let staging = work.join("delta-unit");
            let stored = std::fs::create_dir(&staging)
                .and_then(|()| unit.store(&staging, tree, &base_digest, &delta, segments.as_ref()));
            return match stored {
                Ok(true) => Ok(Snapshot::delta(base_dir, unit.tree())),
                // Another build kept a delta of the same layer first, perhaps over another base.
                Ok(false) => delta_snapshot(&self.cache, digest).ok_or(BuildError::Io {
                    action: "use the snapshot",
                    path: unit.tree(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                }),
                Err(source) => Err(BuildError::Io {
                    action: "keep the snapshot",
                    path: unit.tree(),
                    source,
                }),
            };
        }
        if let Err(source) = std::fs::rename(tree, &snap) {
            if !snap.exists() {
                return Err(BuildError::Io {
                    action: "keep the snapshot",
                    path: snap,
                    source,
                });
            }
        }
        if let Some(CopyLayer {
            entries: Some(entries), ..
        }) = copied
        {
            // Only a speed-up for the next build of this step: failing to keep it is harmless.
            let _ = save_entries(&snap, &entries);
            if let Some(index) = segments {
                let _ = save_segments(&snap, &index);
            }
        }
        Ok(Snapshot::whole(snap))
    }

    /// Makes the files a bind mount shows in `dir` (a copy: the RUN can neither change
    /// the context nor see what `.dockerignore` leaves out) and says how to mount them.
    fn materialize_bind(&self, b: &BindDef, sel: &Selected, dir: &Path) -> Result<PreparedMount, BindError> {
        std::fs::create_dir(dir).map_err(|source| BindError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let def = b.selection();
        let context;
        let (src_root, entries, roots, keyed) = match sel {
            Selected::Stage(s) => (s.mount.path(), &s.entries[..], &s.roots[..], s.digest.as_str()),
            Selected::Download(d) => (&d.root as &Path, &d.entries[..], &d.roots[..], d.copied_digest.as_str()),
            Selected::Context { digest } => {
                context = self.context_selection(&def)?;
                (&context.2 as &Path, &context.0[..], &context.1[..], digest.as_str())
            }
        };
        let job = CopyJob {
            def: &def,
            src_root,
            entries,
            roots,
            attrs: CopyAttrs::default(),
            keyed_digest: keyed,
            image: None,
        };
        build_copy_layer(dir, &job, None)?;
        // A file source lands at /<its name>: the mount is that file, not the directory.
        let file = roots
            .first()
            .and_then(|r| r.entry.map(|i| (r, &entries[i])))
            .filter(|(_, e)| e.kind != EntryKind::Dir)
            .map(|(r, _)| r.path.rsplit('/').next().unwrap_or_default().to_string());
        Ok(PreparedMount::Bind {
            source: match file {
                Some(name) => dir.join(name),
                None => dir.to_path_buf(),
            },
            target: b.target.clone(),
            readonly: !b.readwrite,
        })
    }

    /// The snapshot of the earlier record `key` as a seed for re-building its COPY as
    /// `inputs` say; it knows the sources it was made from if only they differ.
    fn seed_from(&self, key: &str, inputs: &KeyInputs) -> Option<Seed> {
        let record = self.steps.get_step(key).ok()??;
        let mut seed = Seed::load(&self.cache, &record.layer?.digest)?;
        // The inputs are the key's own (it is their hash), so the diff starts from what
        // the record's layer was made of.
        seed.sources_before = record
            .inputs
            .filter(|old| old.key() == key && old.differs_only_in_sources(inputs))
            .and_then(|old| old.sources_digest().map(str::to_string));
        Some(seed)
    }

    /// `--chmod` and `--chown` of a COPY; names resolve through the image's own
    /// /etc/passwd and /etc/group, beneath `image`.
    fn copy_attrs(&self, c: &CopyDef, image: &Path) -> Result<CopyAttrs, CopyError> {
        let mode = parse_chmod(&c.chmod)?;
        let owner = if c.chown.is_empty() {
            None
        } else {
            let ids = resolve_user(image, &c.chown)?;
            Some((ids.uid, ids.gid))
        };
        Ok(CopyAttrs { owner, mode })
    }

    fn context_selection(
        &self,
        c: &CopyDef,
    ) -> Result<(Vec<ContextEntry>, Vec<SelectedRoot>, PathBuf), SelectionError> {
        let mut guard = self.context.lock().unwrap_or_else(|p| p.into_inner());
        let ctx: &LocalContext = match &mut *guard {
            Some(ctx) => ctx,
            slot => slot.insert(LocalContext::walk(Path::new(&self.req.inputs.context))?),
        };
        let excludes = IgnoreMatcher::from_patterns(c.excludes.iter().map(String::as_str))?;
        let roots = select(ctx.entries(), &c.sources, &excludes)?;
        Ok((ctx.entries().to_vec(), roots, ctx.root().to_path_buf()))
    }
}

/// Why the sources of a COPY could not be selected when the build reached it.
#[derive(Debug, thiserror::Error)]
enum SelectionError {
    /// The context or a stage's files could not be walked.
    #[error("cannot read the sources: {0}")]
    Read(#[from] lcache_context::errors::ContextError),
    /// A source or `--exclude` pattern does not select.
    #[error(transparent)]
    Select(#[from] lcache_proto::errors::SelectError),
    /// A stage's files could not be mounted to copy from.
    #[error("cannot mount the stage's files at {}: {source}", path.display())]
    Mount {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a bind mount's files could not be made.
#[derive(Debug, thiserror::Error)]
enum BindError {
    /// The directory for them.
    #[error("cannot make {}: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Selecting them.
    #[error(transparent)]
    Select(#[from] SelectionError),
    /// Copying them.
    #[error(transparent)]
    Copy(#[from] CopyError),
}

/// Files a step reads besides its parent, as its key was derived from them.
enum Selected {
    /// From the context, keyed by this digest (the daemon's).
    Context {
        /// The digest in the key.
        digest: String,
    },
    /// From a built stage.
    Stage(StageSelection),
    /// Downloaded for an `ADD <url>`.
    Download(Box<Downloaded>),
}

/// An `ADD <url>`'s files, downloaded into a directory of their own.
struct Downloaded {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// The COPY of them that makes the layer.
    def: CopyDef,
    entries: Vec<ContextEntry>,
    roots: Vec<SelectedRoot>,
    /// What that COPY must copy.
    copied_digest: String,
    /// The key's sources digest: names, SHA-256s and Last-Modified of the downloads, and
    /// the copy's digest (BuildKit's HTTP source keys on the same).
    key_digest: String,
}

/// What a `COPY --from=<stage>` selects in that stage's files, on a read-only mount.
struct StageSelection {
    mount: OverlayMount,
    _dir: tempfile::TempDir,
    entries: Vec<ContextEntry>,
    roots: Vec<SelectedRoot>,
    digest: String,
}

impl StageSelection {
    fn make(cache: &CacheDir, from: &StageState, c: &CopyDef) -> Result<Self, SelectionError> {
        let mount_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SelectionError::Mount { path, source }
        };
        let dir = cache.work_dir().map_err(mount_err(cache.root()))?;
        let lowers = lowers(&from.snapshots);
        let (root, empty) = (dir.path().join("root"), dir.path().join("empty"));
        std::fs::create_dir(&empty).map_err(mount_err(&empty))?;
        let mount = OverlayMount::mount(&lowers, None, &root, &empty).map_err(mount_err(&root))?;
        let entries = walk(mount.path(), &IgnoreMatcher::default())?;
        let excludes = IgnoreMatcher::from_patterns(c.excludes.iter().map(String::as_str))?;
        let roots = select(&entries, &c.sources, &excludes)?;
        let mut local = LocalContext::from_entries(mount.path(), entries.clone(), |_, _| None);
        let digest = local.digest_sources(c)?.digest;
        Ok(Self {
            mount,
            _dir: dir,
            entries,
            roots,
            digest,
        })
    }
}
