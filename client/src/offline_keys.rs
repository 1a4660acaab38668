//! `lcache keys` without a daemon: read the Dockerfile, plan, walk and hash the context,
//! derive every step's key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lcache_proto::build_plan::{plan, PlanRequest};
use lcache_proto::dockerfile::Dockerfile;
use lcache_proto::errors::DockerfileError;
use lcache_proto::platform::Platform;
use lcache_proto::step_keys::{derive_keys, StepKey};
use serde::Serialize;

use crate::local_context::{LocalContext, SourcesError};

/// What to derive keys for.
#[derive(Debug, Clone)]
pub struct KeysRequest {
    /// The Dockerfile.
    pub dockerfile: PathBuf,
    /// The build context directory.
    pub context: PathBuf,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// The platform to build for.
    pub platform: Platform,
}

/// Every needed step's key and inputs.
#[derive(Debug, Clone, Serialize)]
pub struct KeysReport {
    /// The Dockerfile's path as given.
    pub dockerfile: String,
    /// The context directory as given.
    pub context: String,
    /// The target platform.
    pub platform: String,
    /// Things the user should know.
    pub warnings: Vec<String>,
    /// How many context files were read.
    pub hashed_files: usize,
    /// Steps in build order.
    pub steps: Vec<StepKey>,
}

/// Why keys could not be derived.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The Dockerfile could not be read.
    #[error(
        "cannot read the Dockerfile {path}: {source} — pass its path with -f, or run from the directory that holds it"
    )]
    ReadDockerfile {
        /// Where we looked.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The Dockerfile is wrong.
    #[error(transparent)]
    Dockerfile(#[from] DockerfileError),
    /// The context could not be read or a source not selected.
    #[error(transparent)]
    Sources(#[from] SourcesError),
    /// The build context is not a directory.
    #[error("the build context {0} is not a directory — pass the directory to build from, e.g. `.`")]
    NotADirectory(PathBuf),
}

/// Reads and parses a Dockerfile, naming it in errors as the user wrote its path.
pub fn read_dockerfile(path: &Path) -> Result<Dockerfile, KeysError> {
    let text = std::fs::read(path).map_err(|source| KeysError::ReadDockerfile {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&text);
    Ok(Dockerfile::parse(&path.display().to_string(), &text)?)
}

/// Derives the keys of `req`'s build, reading the context directly.
pub fn offline_keys(req: &KeysRequest) -> Result<KeysReport, KeysError> {
    if !req.context.is_dir() {
        return Err(KeysError::NotADirectory(req.context.clone()));
    }
    let df = read_dockerfile(&req.dockerfile)?;
    let plan = plan(
        &df,
        &PlanRequest {
            build_args: &req.build_args,
            target: req.target.as_deref(),
            platform: req.platform.clone(),
        },
    )?;
    let mut ctx = LocalContext::prepare(&req.context, &plan, &df.file)?;
    let steps = derive_keys(&plan, &mut ctx).map_err(|(at, source)| {
        let line = plan.stages[at.stage].steps[at.step].line;
        SourcesError::Select {
            location: lcache_proto::errors::Location {
                file: df.file.clone(),
                line,
                column: 1,
            },
            source,
        }
    })?;
    Ok(KeysReport {
        dockerfile: req.dockerfile.display().to_string(),
        context: req.context.display().to_string(),
        platform: req.platform.to_string(),
        warnings: plan.warnings,
        hashed_files: ctx.hashed_files(),
        steps,
    })
}
