//! `lcache keys`: every step's key and inputs, offline.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use lcache_proto::platform::Platform;

use crate::cli::{BuildInputs, KeysArgs};
use crate::keys_render::render_keys;
use crate::offline_keys::{offline_keys, KeysRequest};

/// Turns command-line build inputs into a request.
pub fn request(inputs: &BuildInputs) -> Result<KeysRequest> {
    let mut build_args = BTreeMap::new();
    for a in &inputs.build_args {
        match a.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                build_args.insert(k.to_string(), v.to_string());
            }
            Some(_) => bail!("--build-arg '{a}' has no name: write --build-arg NAME=value"),
            // `--build-arg K` takes K from the environment, and is not set when it is absent.
            None => {
                if let Ok(v) = std::env::var(a) {
                    build_args.insert(a.clone(), v);
                }
            }
        }
    }
    let platform = match &inputs.platform {
        Some(p) => match Platform::parse(p) {
            Some(p) => p,
            None => bail!("--platform '{p}' is not os/arch[/variant]: write e.g. --platform linux/amd64"),
        },
        None => Platform::host(),
    };
    Ok(KeysRequest {
        dockerfile: inputs.file.clone().unwrap_or_else(|| inputs.context.join("Dockerfile")),
        context: inputs.context.clone(),
        build_args,
        target: inputs.target.clone(),
        platform,
    })
}

/// Runs `lcache keys`.
pub fn run(args: &KeysArgs) -> Result<String> {
    let report = offline_keys(&request(&args.inputs)?)?;
    if args.json {
        return Ok(serde_json::to_string_pretty(&report)? + "\n");
    }
    Ok(render_keys(&report))
}
