//! `lcache keys --offline`: read the Dockerfile, plan, walk and hash the context, derive
//! every step's key, all in this process.

use std::path::Path;

use lcache_context::local_context::{LocalContext, SourcesError};
use lcache_proto::build_plan::plan;
use lcache_proto::dockerfile::Dockerfile;
use lcache_proto::errors::Location;
use lcache_proto::step_keys::derive_keys;
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
    let dockerfile = &Dockerfile::parse(&req.dockerfile_name, &req.dockerfile)?;
    let context = Path::new(&req.context);
    if !context.is_dir() {
        return Err(ClientError::NotADirectory(context.to_path_buf()));
    }
    let plan = plan(dockerfile, &req.plan_request()?)?;
    let mut ctx = LocalContext::walk(context).map_err(SourcesError::from)?;
    let steps = derive_keys(&plan, &mut ctx).map_err(|(at, source)| {
        let line = plan.stages[at.stage].steps[at.step].line;
        SourcesError::Select {
            location: Location {
                file: dockerfile.file.clone(),
                line,
                column: 1,
            },
            source,
        }
    })?;
    let mut report = KeysReport {
        dockerfile: dockerfile.file.clone(),
        context: req.context.clone(),
        platform: req.platform.clone(),
        warnings: plan.warnings,
        hashed_files: ctx.hashed_files(),
        steps,
    };
    if !req.all_files {
        report.truncate_files();
    }
    Ok(report)
}
