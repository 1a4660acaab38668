//! From command-line build inputs (`-f`, `--build-arg`, `--target`, `--platform`, CONTEXT)
//! to the [`PlanInputs`] that the daemon and the offline path both take.

use std::collections::BTreeMap;

use lcache_proto::platform::Platform;
use lcache_proto::wire::PlanInputs;

use crate::cli::BuildInputs;
use crate::errors::ClientError;

/// Reads the Dockerfile and resolves the context to an absolute path.
pub fn plan_inputs(inputs: &BuildInputs, all_files: bool) -> Result<PlanInputs, ClientError> {
    let mut build_args = BTreeMap::new();
    for a in &inputs.build_args {
        match a.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                build_args.insert(k.to_string(), v.to_string());
            }
            Some(_) => {
                return Err(ClientError::Usage(format!(
                    "--build-arg '{a}' has no name: write --build-arg NAME=value"
                )))
            }
            // `--build-arg K` takes K from the environment, and is not set when it is absent.
            None => {
                if let Ok(v) = std::env::var(a) {
                    build_args.insert(a.clone(), v);
                }
            }
        }
    }
    let platform = match &inputs.platform {
        Some(p) => Platform::parse(p).ok_or_else(|| {
            ClientError::Usage(format!(
                "--platform '{p}' is not os/arch[/variant]: write e.g. --platform linux/amd64"
            ))
        })?,
        None => Platform::host(),
    };
    let dockerfile_path = inputs.file.clone().unwrap_or_else(|| inputs.context.join("Dockerfile"));
    let text = std::fs::read(&dockerfile_path).map_err(|source| ClientError::ReadDockerfile {
        path: dockerfile_path.clone(),
        source,
    })?;
    let context =
        std::fs::canonicalize(&inputs.context).map_err(|_| ClientError::NotADirectory(inputs.context.clone()))?;
    if !context.is_dir() {
        return Err(ClientError::NotADirectory(inputs.context.clone()));
    }
    Ok(PlanInputs {
        dockerfile_name: dockerfile_path.display().to_string(),
        dockerfile_path: std::fs::canonicalize(&dockerfile_path)
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        dockerfile: String::from_utf8_lossy(&text).into_owned(),
        context: context.display().to_string(),
        build_args,
        target: inputs.target.clone(),
        platform: platform.to_string(),
        all_files,
    })
}
