//! What a build reports while it runs: each step starting, its output, its result, notes
//! and the summary. The builder emits them to a [`BuildObserver`]; the CLI's progress
//! printer is one, a bench counting steps is another.

use serde::Serialize;

/// One step's result, as `--progress=json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct StepEvent {
    /// Always `step`.
    pub event: &'static str,
    /// 1-based step number in the build.
    pub n: usize,
    /// 0-based stage.
    pub stage: usize,
    /// The AS name, or null.
    pub stage_name: Option<String>,
    /// 1-based line where the instruction starts.
    pub line: usize,
    /// As written, continuations joined.
    pub instruction: String,
    /// Served from the cache.
    pub cached: bool,
    /// The step's key.
    pub key: String,
    /// Time taken, milliseconds.
    pub duration_ms: u64,
    /// Why it rebuilt (misses only).
    pub cause: Option<String>,
    /// Where a rebuilt step's time went (misses only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<StepPhases>,
}

/// Where a rebuilt step's time went, milliseconds: what `docs/benchmarks.md` breaks a cold
/// build down by.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StepPhases {
    /// Running the RUN, or copying (and hashing) what a COPY brings, into the layer tree.
    pub execute_ms: u64,
    /// The layer tree as an OCI tar: walk, read, gzip, both SHA-256s, fsync.
    pub pack_ms: u64,
    /// The blob uploaded to the cache, stored and fsynced there, and the step recorded.
    pub store_ms: u64,
}

/// The last event of a build.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryEvent {
    /// Always `summary`.
    pub event: &'static str,
    /// Steps in the build.
    pub steps: usize,
    /// Steps served from the cache.
    pub cached: usize,
    /// Steps executed.
    pub built: usize,
    /// Whole build, milliseconds.
    pub duration_ms: u64,
    /// The image's manifest digest.
    pub image: String,
    /// Names given with -t.
    pub tags: Vec<String>,
    /// Each root cause and the steps it rebuilt.
    pub cascades: Vec<lcache_proto::explain::Cascade>,
    /// The build's id in the history (`lcache explain ID`).
    pub build: String,
}

/// Receives a build's events as they happen (stages run concurrently; calls are serialised).
pub trait BuildObserver: Send {
    /// Step `n` begins; `label` is `stage i/n`.
    fn started(&mut self, n: usize, label: &str, instruction: &str);
    /// A line of step `n`'s output.
    fn output(&mut self, n: usize, line: &str);
    /// Step `n` finished, cached or built.
    fn finished(&mut self, event: &StepEvent);
    /// A warning or remark for the user.
    fn note(&mut self, text: &str);
    /// The build is done.
    fn summary(&mut self, summary: &SummaryEvent);
}
