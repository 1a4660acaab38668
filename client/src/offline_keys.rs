//! `lcache keys --offline`: read the Dockerfile, plan, walk and hash the context, derive
//! every step's key, all in this process.

use std::path::Path;

use lcache_context::local_context::{LocalContext, SourcesError};
use lcache_proto::build_plan::NoBaseImages;
use lcache_proto::dockerfile::Dockerfile;
use lcache_proto::planned_build::PlannedBuild;
use lcache_proto::wire::{KeysReport, PlanInputs};

use crate::errors::ClientError;

/// Reads and parses a Dockerfile, naming it in errors as the user wrote its path.
pub fn read_dockerfile(path: &Path) -> Result<Dockerfile, ClientError> {
    let text = std::fs::read(path).map_err(|source| ClientError::ReadDockerfile {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&text);
    Ok(Dockerfile::parse(&path.display().to_string(), &text)?)
}

/// Derives the keys of a build, reading the context directly.
pub fn offline_keys(req: &PlanInputs) -> Result<KeysReport, ClientError> {
    // Offline no image is known: a base's config counts as empty.
    let planned = PlannedBuild::new(req, &NoBaseImages)?;
    let context = Path::new(&req.context);
    if !context.is_dir() {
        return Err(ClientError::NotADirectory(context.to_path_buf()));
    }
    let mut ctx = LocalContext::walk(context).map_err(SourcesError::from)?;
    let mut report = planned.keys(req, &mut ctx).map_err(|e| SourcesError::Select {
        location: e.location,
        error: e.error,
    })?;
    report.hashed_files = ctx.hashed_files();
    Ok(report)
}
