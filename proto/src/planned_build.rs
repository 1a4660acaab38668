//! The one pipeline every command runs to know a build's keys: parse the Dockerfile, plan
//! its stages, derive every key it can. `lcache keys --offline` and lcached's `/v1/plan`
//! (and through it `lcache plan` and `lcache build`) all call this, each with its own
//! `StepSources`; nothing else parses, plans or chains keys.

use crate::build_plan::{plan, BaseImages, BuildPlan};
use crate::dockerfile::Dockerfile;
use crate::errors::{DockerfileError, Location, SelectError};
use crate::step_keys::{derive_keys, StepSources};
use crate::wire::{KeysReport, PlanInputs};

/// A parsed and planned build, before its keys.
#[derive(Debug, Clone)]
pub struct PlannedBuild {
    /// The Dockerfile's name, for `file:line` in messages.
    pub file: String,
    /// Stages and effective step definitions.
    pub plan: BuildPlan,
}

/// A COPY/ADD source that could not be selected, at its instruction.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {error}")]
pub struct KeysError {
    /// The instruction.
    pub location: Location,
    /// What went wrong.
    pub error: SelectError,
}

impl PlannedBuild {
    /// Parses and plans `inputs`' Dockerfile, with base images' configs from `bases`.
    pub fn new(inputs: &PlanInputs, bases: &dyn BaseImages) -> Result<Self, DockerfileError> {
        let df = Dockerfile::parse(&inputs.dockerfile_name, &inputs.dockerfile)?;
        let plan = plan(&df, &inputs.plan_request(bases)?)?;
        Ok(Self { file: df.file, plan })
    }

    /// Derives every key it can from `src`; `hashed_files` is left for the caller, which
    /// knows what its sources read.
    pub fn keys(&self, inputs: &PlanInputs, src: &mut dyn StepSources) -> Result<KeysReport, KeysError> {
        let steps = derive_keys(&self.plan, src).map_err(|(at, source)| KeysError {
            location: Location {
                file: self.file.clone(),
                line: self.plan.stages[at.stage].steps[at.step].line,
                column: 1,
            },
            error: source,
        })?;
        let mut report = KeysReport {
            dockerfile: self.file.clone(),
            context: inputs.context.clone(),
            platform: inputs.platform.clone(),
            warnings: self.plan.warnings.clone(),
            hashed_files: 0,
            steps,
        };
        if !inputs.all_files {
            report.truncate_files();
        }
        Ok(report)
    }
}
