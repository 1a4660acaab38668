//! `POST /v1/plan`: parse, plan, take sources from the context index, derive keys, and look
//! each key up in the record store.

use std::path::Path;

use lcache_image::oci_image::RuntimeConfig;
use lcache_proto::build_plan::{BaseConfig, BaseImages};
use lcache_proto::errors::{DockerfileError, Location, SelectError};
use lcache_proto::planned_build::PlannedBuild;
use lcache_proto::wire::{PlanInputs, PlanResponse};

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
    #[error("{location}: {error}")]
    Select {
        /// The instruction.
        location: Location,
        /// What went wrong.
        error: SelectError,
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

/// Base images' configs from the images this daemon holds.
struct StoredImages<'a>(&'a dyn RecordStore);

impl BaseImages for StoredImages<'_> {
    fn config(&self, reference: &str) -> Option<BaseConfig> {
        match resolve(self.0, reference) {
            // A config that does not parse is refused when the build starts from it.
            Ok(Resolved::Found(i)) => RuntimeConfig::of_document(i.config.as_bytes())
                .ok()
                .map(|c| c.base_config()),
            _ => None,
        }
    }
}

/// Plans a build against the context index and the record store.
pub fn plan_build(
    index: &ContextIndex,
    records: &dyn RecordStore,
    inputs: &PlanInputs,
) -> Result<PlanResponse, PlanError> {
    let planned = PlannedBuild::new(inputs, &StoredImages(records))?;
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
    let mut report = planned.keys(inputs, &mut sources).map_err(|e| PlanError::Select {
        location: e.location,
        error: e.error,
    })?;
    for (digest, summary) in &sources.summaries {
        records.put_summary(digest, summary)?;
    }
    index.note_planned(sources.summaries.iter().map(|(d, _)| d.as_str()));
    records.put_dir_nodes(&std::mem::take(&mut sources.dir_nodes))?;
    let (learnt, hashed_files) = sources.finish();
    index.persist(&ctx, learnt, removed)?;
    report.hashed_files = hashed_files;
    let mut cached = Vec::with_capacity(report.steps.len());
    let mut evicted = Vec::new();
    for s in &report.steps {
        cached.push(match s.known_key() {
            Some(k) => {
                let hit = records.get_step("", k)?.is_some();
                if !hit && records.was_evicted("", k)? {
                    evicted.push(k.to_string());
                }
                Some(hit)
            }
            None => None,
        });
    }
    Ok(PlanResponse {
        report,
        cached,
        evicted,
        causes: Vec::new(),
        context: ctx.status(),
        plan: Some(planned.plan),
    })
}
