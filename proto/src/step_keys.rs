//! Walks a build plan in order and derives every needed step's key, chaining parents across
//! steps and stages. Keys that need a result not known yet (another stage's files, an
//! image's files) are reported as pending on it, never invented.

use serde::{Deserialize, Serialize};

use crate::build_plan::{Base, BuildPlan, CopyDef, CopyFrom, StepDef};
use crate::cache_key::{key_inputs, KeyInputs};
use crate::errors::SelectError;
use crate::sources_digest::{binds_digest, FileInput, SourcesDigest};

/// Where a step stands in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct StepRef {
    /// Stage index.
    pub stage: usize,
    /// Step index within the stage's filesystem steps.
    pub step: usize,
}

/// What the key derivation needs from the outside world (context files, images, results).
pub trait StepSources {
    /// The digest of what a COPY/ADD selects from the build context.
    fn context_sources(&mut self, at: StepRef, def: &CopyDef) -> Result<SourcesDigest, SelectError>;
    /// The digest of what it selects from another stage's result, if that is known.
    fn stage_sources(&mut self, at: StepRef, stage: usize, def: &CopyDef) -> Option<SourcesDigest>;
    /// A base image's identity (manifest digest), if it is known.
    fn image_identity(&mut self, reference: &str) -> Option<String>;
}

/// A step's key, or what it waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyState {
    /// The key is known.
    Known {
        /// 64 hex digits.
        key: String,
    },
    /// The key depends on something not known yet.
    Pending {
        /// What it waits for, in words.
        waiting_on: String,
    },
}

/// One step's key and what it is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepKey {
    /// 0-based stage.
    pub stage: usize,
    /// 0-based index among the stage's filesystem steps: with `stage`, where the step stands
    /// in the plan (steps are matched by this, never by their position in a list).
    #[serde(default)]
    pub step: usize,
    /// The stage's AS name.
    pub stage_name: Option<String>,
    /// 1-based line where the instruction starts.
    pub line: usize,
    /// As written, continuations joined.
    pub instruction: String,
    /// The key or what it waits for.
    #[serde(flatten)]
    pub key: KeyState,
    /// The inputs, when the key is known.
    pub inputs: Option<KeyInputs>,
    /// Files selected by a COPY/ADD, with their digests (possibly only the first few).
    pub files: Vec<FileInput>,
    /// How many files the step selected in all.
    pub files_total: usize,
    /// A context COPY/ADD's sources digest, known even while the key is pending, so the
    /// key can be finished once the parent is known.
    #[serde(default)]
    pub sources_digest: Option<String>,
    /// A RUN's bind mounts' digests, in order, where they come from the context (empty for
    /// the others): the builder shows the RUN the files these name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bind_digests: Vec<String>,
}

impl StepKey {
    /// Where the step stands in the plan.
    pub fn at(&self) -> StepRef {
        StepRef {
            stage: self.stage,
            step: self.step,
        }
    }

    /// The key, if known.
    pub fn known_key(&self) -> Option<&str> {
        match &self.key {
            KeyState::Known { key } => Some(key),
            KeyState::Pending { .. } => None,
        }
    }
}

/// The identity of a stage's base state as it enters the first key.
fn base_state(base: &Base, results: &[Option<KeyState>], src: &mut dyn StepSources) -> KeyState {
    match base {
        Base::Scratch => KeyState::Known { key: "scratch".into() },
        Base::Image { reference } => KeyState::Known {
            key: src
                .image_identity(reference)
                .unwrap_or_else(|| format!("image:{reference}")),
        },
        Base::Stage { index } => results.get(*index).cloned().flatten().unwrap_or(KeyState::Pending {
            waiting_on: format!("stage {index}"),
        }),
    }
}

/// Derives the keys of every needed stage's steps.
pub fn derive_keys(plan: &BuildPlan, src: &mut dyn StepSources) -> Result<Vec<StepKey>, (StepRef, SelectError)> {
    let mut results: Vec<Option<KeyState>> = vec![None; plan.stages.len()];
    let mut out = Vec::new();
    for stage in plan.needed_stages() {
        let mut parent = base_state(&stage.base, &results, src);
        for (n, step) in stage.steps.iter().enumerate() {
            let at = StepRef {
                stage: stage.index,
                step: n,
            };
            let mut files = Vec::new();
            let mut files_total = 0;
            let mut context_digest = None;
            let mut bind_digests = Vec::new();
            let sources: Result<String, KeyState> = match &step.def {
                StepDef::Run(r) if !r.binds.is_empty() => {
                    let mut parts = Vec::new();
                    let mut pending = None;
                    for b in &r.binds {
                        let sel = b.selection();
                        let digest = match &b.from {
                            CopyFrom::Context => {
                                let d = src.context_sources(at, &sel).map_err(|e| (at, e))?;
                                if r.binds.len() == 1 {
                                    files = d.files;
                                    files_total = d.total;
                                    context_digest = Some(d.digest.clone());
                                }
                                bind_digests.push(d.digest.clone());
                                Some(d.digest)
                            }
                            CopyFrom::Stage { index } => {
                                bind_digests.push(String::new());
                                src.stage_sources(at, *index, &sel).map(|d| d.digest)
                            }
                            CopyFrom::Image { .. } => {
                                bind_digests.push(String::new());
                                None
                            }
                        };
                        match digest {
                            Some(d) => parts.push((b.target.clone(), d)),
                            None => pending = pending.or(Some(from_words(plan, &b.from))),
                        }
                    }
                    match pending {
                        Some(waiting_on) => Err(KeyState::Pending { waiting_on }),
                        None => {
                            let parts: Vec<(&str, &str)> =
                                parts.iter().map(|(t, d)| (t.as_str(), d.as_str())).collect();
                            Ok(binds_digest(&parts))
                        }
                    }
                }
                StepDef::Copy(c) => match &c.from {
                    CopyFrom::Context if c.sources.is_empty() => Ok(String::new()),
                    CopyFrom::Context if c.add && c.sources.iter().any(|s| is_remote(s)) => Err(KeyState::Pending {
                        waiting_on: "the download of a remote ADD source".into(),
                    }),
                    CopyFrom::Context => {
                        let d = src.context_sources(at, c).map_err(|e| (at, e))?;
                        files = d.files;
                        files_total = d.total;
                        context_digest = Some(d.digest.clone());
                        Ok(d.digest)
                    }
                    CopyFrom::Stage { index } => match src.stage_sources(at, *index, c) {
                        Some(d) => Ok(d.digest),
                        None => Err(KeyState::Pending {
                            waiting_on: from_words(plan, &c.from),
                        }),
                    },
                    CopyFrom::Image { .. } => Err(KeyState::Pending {
                        waiting_on: from_words(plan, &c.from),
                    }),
                },
                _ => Ok(String::new()),
            };
            let (key, inputs) = match (&parent, sources) {
                (KeyState::Pending { .. }, _) => (parent.clone(), None),
                (_, Err(pending)) => (pending, None),
                (KeyState::Known { key: p }, Ok(digest)) => {
                    let inputs = key_inputs(&step.def, &stage.platform, p, &digest);
                    (KeyState::Known { key: inputs.key() }, Some(inputs))
                }
            };
            parent = key.clone();
            out.push(StepKey {
                stage: stage.index,
                step: n,
                stage_name: stage.name.clone(),
                line: step.line,
                instruction: step.instruction.clone(),
                key,
                inputs,
                files_total,
                files,
                sources_digest: context_digest,
                bind_digests,
            });
        }
        results[stage.index] = Some(parent);
    }
    Ok(out)
}

/// What a key waits for when its files come from `from`, in words.
fn from_words(plan: &BuildPlan, from: &CopyFrom) -> String {
    match from {
        CopyFrom::Context => "the build context".into(),
        CopyFrom::Stage { index } => format!(
            "the result of stage {}",
            plan.stages[*index].name.clone().unwrap_or_else(|| index.to_string())
        ),
        CopyFrom::Image { reference } => format!("the files of image {reference}"),
    }
}

/// Whether an ADD source names something to download rather than a context path.
pub fn is_remote(source: &str) -> bool {
    ["http://", "https://", "git@", "git://"]
        .iter()
        .any(|p| source.starts_with(p))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::build_plan::{plan, PlanRequest};
    use crate::dockerfile::Dockerfile;
    use crate::platform::Platform;

    /// Sources that know the context but no built stage.
    struct ContextOnly;

    impl StepSources for ContextOnly {
        fn context_sources(&mut self, at: StepRef, _def: &CopyDef) -> Result<SourcesDigest, SelectError> {
            Ok(SourcesDigest {
                digest: format!("ctx-{}-{}", at.stage, at.step),
                files: vec![],
                total: 0,
                summary: vec![],
                nodes: vec![],
                subtrees: vec![],
            })
        }

        fn stage_sources(&mut self, _at: StepRef, _stage: usize, _def: &CopyDef) -> Option<SourcesDigest> {
            None
        }

        fn image_identity(&mut self, _reference: &str) -> Option<String> {
            None
        }
    }

    fn keys(dockerfile: &str) -> Vec<StepKey> {
        let df = Dockerfile::parse("Dockerfile", dockerfile).unwrap();
        let args = BTreeMap::new();
        let p = plan(
            &df,
            &PlanRequest {
                build_args: &args,
                target: None,
                platform: Platform::host(),
                bases: &crate::build_plan::NoBaseImages,
            },
        )
        .unwrap();
        derive_keys(&p, &mut ContextOnly).unwrap()
    }

    #[test]
    fn every_step_knows_where_it_stands_in_the_plan() {
        let k = keys("FROM a AS b\nRUN x\nCOPY f /f\nFROM b\nWORKDIR /w\nRUN y\n");
        let at: Vec<(usize, usize)> = k.iter().map(|s| (s.stage, s.step)).collect();
        assert_eq!(at, [(0, 0), (0, 1), (1, 0), (1, 1)]);
        assert_eq!(k[1].sources_digest.as_deref(), Some("ctx-0-1"));
    }

    #[test]
    fn a_key_waiting_on_a_stage_result_passes_the_wait_down_the_chain() {
        let k = keys("FROM a AS b\nRUN x\nFROM a\nCOPY --from=b /o /o\nRUN y\n");
        assert!(k[0].known_key().is_some());
        assert!(k[1].known_key().is_none() && k[2].known_key().is_none());
        assert!(matches!(&k[2].key, KeyState::Pending { waiting_on } if waiting_on.contains("stage b")));
        assert!(k[1].inputs.is_none(), "no inputs are invented for a pending key");
    }

    #[test]
    fn the_same_definition_parent_and_sources_give_the_same_key_however_reached() {
        let a = keys("FROM a\nRUN x\nCOPY f /f\n");
        let b = keys("# a comment\nFROM a\n\nRUN x\nLABEL l=1\nCOPY f /f\n");
        let ka: Vec<_> = a.iter().map(|s| s.known_key().map(str::to_string)).collect();
        let kb: Vec<_> = b.iter().map(|s| s.known_key().map(str::to_string)).collect();
        assert_eq!(ka, kb);
    }
}
