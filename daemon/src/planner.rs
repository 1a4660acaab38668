//! `POST /v1/plan`: parse, plan, take sources from the context index, derive keys, and look
//! each key up in the record store.

use std::path::Path;

use lcache_proto::build_plan::plan;
use lcache_proto::dockerfile::Dockerfile;
use lcache_proto::errors::{DockerfileError, Location, SelectError};
use lcache_proto::step_keys::derive_keys;
use lcache_proto::wire::{KeysReport, PlanInputs, PlanResponse};

use crate::api::images::{resolve, Resolved};

use crate::context_index::{ContextIndex, IndexError};
use crate::store::{RecordStore, StoreError};

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The Dockerfile is wrong.
    #[error(transparent)]
    Dockerfile(#[from] DockerfileError),
    /// A COPY/ADD source could not be selected.
    #[error("{location}: {source}")]
    Select {
        /// The instruction.
        location: Location,
        /// What went wrong.
        source: SelectError,
    },
    /// The context path is unusable.
    #[error("the build context '{0}' is not an absolute path to a directory this daemon can read")]
    BadContext(String),
    /// The context could not be read.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Plans a build against the context index and the record store.
pub fn plan_build(
    index: &ContextIndex,
    records: &dyn RecordStore,
    inputs: &PlanInputs,
) -> Result<PlanResponse, PlanError> {
    let df = Dockerfile::parse(&inputs.dockerfile_name, &inputs.dockerfile)?;
    let plan = plan(&df, &inputs.plan_request()?)?;
    let root = Path::new(&inputs.context);
    if !root.is_absolute() || !root.is_dir() {
        return Err(PlanError::BadContext(inputs.context.clone()));
    }
    let ctx = index.context(root)?;
    let mut ctx = ctx.lock().unwrap_or_else(|p| p.into_inner());
    let removed = ctx.refresh()?;
    let images = |reference: &str| match resolve(records, reference) {
        Ok(Resolved::Found(i)) => Some(i.manifest_digest),
        _ => None,
    };
    let mut sources = ctx.sources(inputs.all_files, &images);
    let steps = derive_keys(&plan, &mut sources).map_err(|(at, source)| PlanError::Select {
        location: Location {
            file: df.file.clone(),
            line: plan.stages[at.stage].steps[at.step].line,
            column: 1,
        },
        source,
    })?;
    for (digest, summary) in std::mem::take(&mut sources.summaries) {
        records.put_summary(&digest, &summary)?;
    }
    let (fresh, hashed_files) = sources.finish();
    index.persist(&ctx, &fresh, &removed)?;
    let mut cached = Vec::with_capacity(steps.len());
    for s in &steps {
        cached.push(match s.known_key() {
            Some(k) => Some(records.get_step(k)?.is_some()),
            None => None,
        });
    }
    let mut report = KeysReport {
        dockerfile: df.file.clone(),
        context: inputs.context.clone(),
        platform: inputs.platform.clone(),
        warnings: plan.warnings.clone(),
        hashed_files,
        steps,
    };
    if !inputs.all_files {
        report.truncate_files();
    }
    Ok(PlanResponse {
        report,
        cached,
        causes: Vec::new(),
        context: ctx.status(),
        plan: Some(plan),
    })
}
