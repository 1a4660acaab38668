//! Finds each missed step's root cause for `lcache build` and `lcache plan`: the nearest
//! earlier record of the same step is the same stage and position in the newest earlier
//! build of this context and Dockerfile that got that far (a failed build stops early), else
//! the same instruction text anywhere in it; file changes come from the daemon's Merkle
//! summaries of the two sources digests and the directory listings beneath them.

use std::path::Path;

use lcache_proto::build_plan::Base;
use lcache_proto::cache_key::KeyInputs;
use lcache_proto::explain::{
    diff_summaries, miss_cause, root_after, CascadeRoot, CauseContext, FileChange, MissCause, Previous,
};
use lcache_proto::step_keys::StepRef;
use lcache_proto::wire::{BuildRecord, BuildStep, PlanInputs, PlanResponse};

use crate::build_control::BuildControl;
use crate::errors::BuildError;

/// BLAKE3 of the context's .dockerignore, or empty.
pub fn dockerignore_digest(context: &Path) -> String {
    std::fs::read(context.join(".dockerignore"))
        .map(|b| blake3::hash(&b).to_hex().to_string())
        .unwrap_or_default()
}

/// Compares steps with the previous build.
pub struct CauseFinder<'a> {
    client: &'a dyn BuildControl,
    /// What the build is of: its context, Dockerfile and target pick the earlier builds.
    inputs: PlanInputs,
    /// Read at the first miss: a build that misses nothing never fetches the history.
    earlier: std::sync::OnceLock<Earlier>,
    no_cache: bool,
    /// Keys whose records lcached evicted: their misses are "evicted", whatever history says.
    evicted: std::collections::HashSet<String>,
}

/// The earlier builds a build is compared with.
struct Earlier {
    /// Those of the same context, Dockerfile and target, newest first.
    builds: Vec<BuildRecord>,
    /// The context's `.dockerignore` is not the newest one's.
    dockerignore_changed: bool,
}

/// A step being explained.
pub struct StepAt<'a> {
    /// 0-based stage.
    pub stage: usize,
    /// 0-based position among the stage's steps.
    pub position: usize,
    /// As written.
    pub instruction: &'a str,
    /// The key's inputs.
    pub inputs: &'a KeyInputs,
    /// The key.
    pub key: &'a str,
    /// The step that rebuilt and so changed this step's parent, if any.
    pub rebuilt_parent: Option<CascadeRoot>,
    /// The cache behind lcached that its lookup of this key could not ask, and why.
    pub upstream_unavailable: Option<String>,
}

impl<'a> CauseFinder<'a> {
    /// Compares with the earlier builds of the same context, Dockerfile and target.
    pub fn new(client: &'a dyn BuildControl, inputs: &PlanInputs, no_cache: bool) -> Self {
        Self {
            client,
            inputs: inputs.clone(),
            earlier: std::sync::OnceLock::new(),
            no_cache,
            evicted: Default::default(),
        }
    }

    /// The earlier builds, fetched the first time a miss asks.
    fn earlier(&self) -> &Earlier {
        self.earlier.get_or_init(|| {
            let inputs = &self.inputs;
            let same_dockerfile = |b: &BuildRecord| match inputs.dockerfile_path.as_str() {
                "" => b.dockerfile == inputs.dockerfile_name,
                path => b.dockerfile_path == path,
            };
            let builds: Vec<BuildRecord> = self
                .client
                .builds_of(&inputs.context, lcache_proto::wire::HISTORY_COMPARED)
                .map(|bs| {
                    bs.into_iter()
                        .filter(|b| b.context == inputs.context && b.target == inputs.target && same_dockerfile(b))
                        .collect()
                })
                .unwrap_or_default();
            let dockerignore_changed = builds
                .first()
                .is_some_and(|p| p.dockerignore != dockerignore_digest(Path::new(&inputs.context)));
            Earlier {
                builds,
                dockerignore_changed,
            }
        })
    }

    /// Names the keys lcached evicted (from the plan's answer).
    pub fn with_evicted(mut self, keys: &[String]) -> Self {
        self.evicted = keys.iter().cloned().collect();
        self
    }

    /// The step of an earlier build this one is compared with, and whether it failed there:
    /// from the newest build that started it (one that failed before it did not).
    fn previous_step(&self, at: &StepAt<'_>) -> Option<(&BuildStep, bool)> {
        self.earlier().builds.iter().find_map(|prev| {
            let same_position = prev.steps_tried().filter(|(s, _)| s.stage == at.stage).nth(at.position);
            same_position
                .filter(|(s, _)| s.inputs.as_ref().is_some_and(|i| i.kind == at.inputs.kind))
                .or_else(|| prev.steps_tried().find(|(s, _)| s.instruction == at.instruction))
        })
    }

    /// The root cause of a miss, and the key it was compared with.
    pub fn cause(&self, at: &StepAt<'_>) -> (MissCause, Option<String>) {
        let prev_step = self.previous_step(at);
        if !self.no_cache && self.evicted.contains(at.key) {
            return (MissCause::Evicted, prev_step.map(|(s, _)| s.key.clone()));
        }
        let prev = prev_step.and_then(|(s, failed)| {
            s.inputs.as_ref().map(|i| Previous {
                instruction: &s.instruction,
                inputs: i,
                key: &s.key,
                failed,
            })
        });
        let digest = |i: &KeyInputs| {
            i.field("sources_digest")
                .and_then(|v| v.first().cloned())
                .filter(|d| !d.is_empty())
        };
        let file_changes = match (&prev, digest(at.inputs)) {
            (Some(p), Some(n)) => digest(p.inputs).and_then(|o| file_changes(self.client, &o, &n)),
            _ => None,
        };
        let cx = CauseContext {
            no_cache: self.no_cache,
            rebuilt_parent: at.rebuilt_parent.clone(),
            first_in_stage: at.position == 0,
            file_changes,
            dockerignore_changed: self.earlier().dockerignore_changed,
        };
        let cause = match miss_cause(at.instruction, at.inputs, at.key, prev.as_ref(), &cx) {
            // Nothing here to compare with, and the shared cache, which may have held the
            // step, was not asked: that is the miss's cause, not a step never built.
            MissCause::NeverBuilt if at.upstream_unavailable.is_some() => MissCause::UpstreamUnavailable {
                upstream: at.upstream_unavailable.clone().unwrap_or_default(),
            },
            other => other,
        };
        (cause, prev_step.map(|(s, _)| s.key.clone()))
    }
}

/// What changed between the sources behind two sources digests, to the file (see
/// [`diff_summaries`]); `None` when lcached no longer has both summaries.
pub fn file_changes(client: &dyn BuildControl, old: &str, new: &str) -> Option<Vec<FileChange>> {
    let old = client.summary(old).ok().flatten()?;
    let new = client.summary(new).ok().flatten()?;
    Some(diff_summaries(&old, &new, &|d| client.dir_node(d).ok().flatten()))
}

/// Predicted causes for a plan's misses, walking the steps as a build would: a miss makes
/// the steps after it (and stages built on its stage) cascades of it.
pub fn plan_causes(
    client: &dyn BuildControl,
    inputs: &PlanInputs,
    resp: &PlanResponse,
) -> Result<Vec<Option<MissCause>>, BuildError> {
    let Some(plan) = &resp.plan else {
        // A plan made offline has no cache behind it, so no causes to predict.
        return Ok(vec![None; resp.report.steps.len()]);
    };
    let finder = CauseFinder::new(client, inputs, false).with_evicted(&resp.evicted);
    let by_place: std::collections::HashMap<_, _> = resp
        .report
        .steps
        .iter()
        .zip(&resp.cached)
        .enumerate()
        .map(|(n, (s, cached))| (s.at(), (n, s, cached)))
        .collect();
    let mut out = vec![None; resp.report.steps.len()];
    let mut stage_root: std::collections::HashMap<usize, Option<CascadeRoot>> = Default::default();
    for stage in plan.needed_stages() {
        let mut rebuilt = match stage.base {
            Base::Stage { index } => stage_root.get(&index).cloned().flatten(),
            _ => None,
        };
        for position in 0..stage.steps.len() {
            let at = StepRef {
                stage: stage.index,
                step: position,
            };
            let Some(&(n, s, cached)) = by_place.get(&at) else {
                continue;
            };
            let cause = match (cached, &s.inputs, s.known_key()) {
                (Some(false), Some(i), Some(key)) => {
                    let at = StepAt {
                        stage: stage.index,
                        position,
                        instruction: &s.instruction,
                        inputs: i,
                        key,
                        rebuilt_parent: rebuilt.clone(),
                        upstream_unavailable: None,
                    };
                    Some(finder.cause(&at).0)
                }
                _ => None,
            };
            let this = CascadeRoot {
                step: n + 1,
                line: s.line,
                instruction: s.instruction.clone(),
            };
            rebuilt = root_after(cause.as_ref(), this);
            out[n] = cause;
        }
        stage_root.insert(stage.index, rebuilt);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::CacheError;
    use lcache_proto::cache_key::KeyField;
    use lcache_proto::explain::ChangeKind;
    use lcache_proto::source_select::EntryKind;
    use lcache_proto::sources_digest::{DirNode, SummaryEntry};
    use lcache_proto::wire::ImageRecord;

    /// A history held in memory: what lcached's build history and summaries would answer.
    struct History {
        builds: Vec<BuildRecord>,
        summaries: std::collections::HashMap<String, Vec<SummaryEntry>>,
        nodes: std::collections::HashMap<String, DirNode>,
    }

    impl BuildControl for History {
        fn plan(&self, _: &PlanInputs) -> Result<PlanResponse, CacheError> {
            Err(CacheError::Protocol("not planned here".into()))
        }
        fn image(&self, _: &str) -> Result<Option<ImageRecord>, CacheError> {
            Ok(None)
        }
        fn put_image(&self, i: &ImageRecord) -> Result<ImageRecord, CacheError> {
            Ok(i.clone())
        }
        fn builds(&self, limit: usize) -> Result<Vec<BuildRecord>, CacheError> {
            Ok(self.builds.iter().take(limit).cloned().collect())
        }
        fn summary(&self, digest: &str) -> Result<Option<Vec<SummaryEntry>>, CacheError> {
            Ok(self.summaries.get(digest).cloned())
        }
        fn dir_node(&self, digest: &str) -> Result<Option<DirNode>, CacheError> {
            Ok(self.nodes.get(digest).cloned())
        }
        fn post_build(&self, b: &BuildRecord) -> Result<BuildRecord, CacheError> {
            Ok(b.clone())
        }
    }

    fn copy_inputs(sources_digest: &str) -> KeyInputs {
        KeyInputs {
            platform: "linux/amd64".into(),
            parent: "p".into(),
            kind: "COPY".into(),
            fields: vec![
                KeyField {
                    name: "sources".into(),
                    values: vec!["src".into()],
                },
                KeyField {
                    name: "sources_digest".into(),
                    values: vec![sources_digest.into()],
                },
            ],
        }
    }

    fn entry(path: &str, kind: EntryKind, digest: &str) -> SummaryEntry {
        SummaryEntry {
            path: path.into(),
            kind,
            mode: 0o644,
            digest: digest.into(),
            expanded: false,
        }
    }

    /// A step of stage 0 that ran, at `line`.
    fn step(line: usize, instruction: &str, inputs: KeyInputs) -> BuildStep {
        BuildStep {
            stage: 0,
            line,
            instruction: instruction.into(),
            key: inputs.key(),
            cached: false,
            duration_ms: 0,
            saved_ms: 0,
            cause: None,
            inputs: Some(inputs),
            compared_with: None,
        }
    }

    fn record(context: &str, instruction: &str, inputs: KeyInputs) -> BuildRecord {
        BuildRecord {
            id: "b".into(),
            started_at_ms: 0,
            finished_at_ms: 0,
            dockerfile: "Dockerfile".into(),
            context: context.into(),
            target: None,
            steps: vec![step(2, instruction, inputs)],
            dockerfile_path: String::new(),
            dockerignore: String::new(),
            cascades: vec![],
            image: String::new(),
            failure: None,
        }
    }

    fn inputs_for(context: &str) -> PlanInputs {
        PlanInputs {
            dockerfile_name: "Dockerfile".into(),
            dockerfile: String::new(),
            dockerfile_path: String::new(),
            context: context.into(),
            build_args: Default::default(),
            target: None,
            platform: "linux/amd64".into(),
            all_files: false,
        }
    }

    /// The cause of `COPY src /app`, first in its stage, whose sources digest is now `new`.
    fn cause_of_copy(finder: &CauseFinder<'_>) -> (MissCause, Option<String>) {
        cause_of_copy_missed_upstream(finder, None)
    }

    /// [`cause_of_copy`], its lookup having missed with lcached's upstream not asked (why).
    fn cause_of_copy_missed_upstream(
        finder: &CauseFinder<'_>,
        upstream_unavailable: Option<String>,
    ) -> (MissCause, Option<String>) {
        let now = copy_inputs("new");
        let key = now.key();
        finder.cause(&StepAt {
            stage: 0,
            position: 0,
            instruction: "COPY src /app",
            inputs: &now,
            key: &key,
            rebuilt_parent: None,
            upstream_unavailable,
        })
    }

    #[test]
    fn the_previous_build_of_the_same_context_names_the_changed_file() {
        let ctx = tempfile::tempdir().unwrap();
        let ctx = ctx.path().to_str().unwrap().to_string();
        let history = History {
            builds: vec![
                // Newest first: another context's build must not be compared with.
                record("/elsewhere", "COPY src /app", copy_inputs("zzz")),
                record(&ctx, "COPY src /app", copy_inputs("old")),
            ],
            summaries: [
                ("old".to_string(), vec![entry("src", EntryKind::Dir, "d1")]),
                ("new".to_string(), vec![entry("src", EntryKind::Dir, "d2")]),
            ]
            .into(),
            nodes: [
                (
                    "d1",
                    [entry("a", EntryKind::File, "1"), entry("b", EntryKind::File, "2")],
                ),
                (
                    "d2",
                    [entry("a", EntryKind::File, "1"), entry("b", EntryKind::File, "3")],
                ),
            ]
            .map(|(d, entries)| {
                (
                    d.to_string(),
                    DirNode {
                        entries: entries.into(),
                    },
                )
            })
            .into(),
        };
        let finder = CauseFinder::new(&history, &inputs_for(&ctx), false);
        let (cause, compared_with) = cause_of_copy(&finder);
        assert_eq!(
            cause,
            MissCause::FilesChanged {
                changes: vec![FileChange {
                    path: "src/b".into(),
                    change: ChangeKind::Modified
                }],
                more: 0
            }
        );
        assert_eq!(compared_with, Some(copy_inputs("old").key()));
    }

    #[test]
    fn a_key_lcached_evicted_is_evicted_even_without_history() {
        let history = History {
            builds: vec![],
            summaries: Default::default(),
            nodes: Default::default(),
        };
        let key = copy_inputs("new").key();
        let finder = CauseFinder::new(&history, &inputs_for("/c"), false).with_evicted(&[key]);
        assert_eq!(cause_of_copy(&finder).0, MissCause::Evicted);
    }

    #[test]
    fn without_history_a_step_was_never_built_and_no_cache_says_so() {
        let history = History {
            builds: vec![],
            summaries: Default::default(),
            nodes: Default::default(),
        };
        let (cause, compared) = cause_of_copy(&CauseFinder::new(&history, &inputs_for("/c"), false));
        assert_eq!((cause, compared), (MissCause::NeverBuilt, None));
        let (cause, _) = cause_of_copy(&CauseFinder::new(&history, &inputs_for("/c"), true));
        assert_eq!(cause, MissCause::NoCache);
    }

    #[test]
    fn with_nothing_here_to_compare_a_shared_cache_not_asked_is_the_cause() {
        let empty = History {
            builds: vec![],
            summaries: Default::default(),
            nodes: Default::default(),
        };
        let silent = "tcp://cache:7878 stopped answering".to_string();
        let finder = CauseFinder::new(&empty, &inputs_for("/c"), false);
        assert_eq!(
            cause_of_copy_missed_upstream(&finder, Some(silent.clone())).0,
            MissCause::UpstreamUnavailable {
                upstream: silent.clone()
            }
        );
        assert_eq!(cause_of_copy(&finder).0, MissCause::NeverBuilt);
        // With an earlier build to compare with, what changed stays the cause.
        let ctx = tempfile::tempdir().unwrap();
        let ctx = ctx.path().to_str().unwrap().to_string();
        let history = History {
            builds: vec![record(&ctx, "COPY src /app", copy_inputs("old"))],
            summaries: Default::default(),
            nodes: Default::default(),
        };
        let finder = CauseFinder::new(&history, &inputs_for(&ctx), false);
        assert!(!matches!(
            cause_of_copy_missed_upstream(&finder, Some(silent)).0,
            MissCause::UpstreamUnavailable { .. } | MissCause::NeverBuilt
        ));
    }

    #[test]
    fn a_failed_build_is_compared_with_as_far_as_it_got_and_older_builds_beyond() {
        let run = |parent: &str, cmd: &str| KeyInputs {
            platform: "linux/amd64".into(),
            parent: parent.into(),
            kind: "RUN".into(),
            fields: vec![KeyField {
                name: "cmd".into(),
                values: vec![cmd.into()],
            }],
        };
        let copy_old = copy_inputs("old").key();
        let copy_new = copy_inputs("new").key();
        let mut finished = record("/c", "COPY src /app", copy_inputs("old"));
        finished.steps.push(step(3, "RUN make", run(&copy_old, "make")));
        finished.steps.push(step(4, "RUN install", run("m1", "install")));
        let mut failed = record("/c", "COPY src /app", copy_inputs("new"));
        failed.failure = Some(lcache_proto::wire::BuildFailure {
            step: Some(step(3, "RUN make", run(&copy_new, "make"))),
            message: "Dockerfile:3: RUN make: the command exited with code 2".into(),
        });
        let history = History {
            builds: vec![failed, finished],
            summaries: Default::default(),
            nodes: Default::default(),
        };
        let finder = CauseFinder::new(&history, &inputs_for("/c"), false);
        let ask = |position: usize, instruction: &str, inputs: &KeyInputs| {
            let key = inputs.key();
            finder.cause(&StepAt {
                stage: 0,
                position,
                instruction,
                inputs,
                key: &key,
                rebuilt_parent: None,
                upstream_unavailable: None,
            })
        };
        // The COPY is compared with the failed build's, which finished it: its snapshot
        // seeds the next edit.
        assert_eq!(cause_of_copy(&finder).1, Some(copy_new.clone()));
        // The step it failed at, tried again with the same inputs.
        let same = run(&copy_new, "make");
        assert_eq!(ask(1, "RUN make", &same), (MissCause::FailedBefore, Some(same.key())));
        // Fixed: compared with the failed attempt.
        let fixed = run(&copy_new, "make all");
        assert!(matches!(
            ask(1, "RUN make all", &fixed).0,
            MissCause::InstructionChanged { .. }
        ));
        // A step the failed build never reached is compared with the build before it.
        let install = run("m2", "install");
        assert_eq!(ask(2, "RUN install", &install).1, Some(run("m1", "install").key()));
    }
}
