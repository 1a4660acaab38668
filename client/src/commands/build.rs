//! `lcache build`.

use std::io::IsTerminal;

use anyhow::Result;

use crate::build_inputs::plan_inputs;
use crate::cli::BuildArgs;
use crate::cli::DaemonArgs;
use crate::daemon_choice::daemon;
use crate::progress::{Progress, ProgressMode};
use lcache_builder::build_loop::{build, BuildRequest};
use lcache_builder::cache_dir::default_cache_dir;
use lcache_builder::image_export::{export, OutputSpec};

/// Runs `lcache build`.
pub fn run(args: &BuildArgs, explicit: &DaemonArgs) -> Result<String> {
    let output: Option<OutputSpec> = args.output.as_deref().map(str::parse).transpose()?;
    let inputs = plan_inputs(&args.inputs, false)?;
    let (client, _) = daemon(explicit)?;
    let mode = match args.progress.as_str() {
        "json" => ProgressMode::Json,
        "plain" => ProgressMode::Plain,
        "tty" => ProgressMode::Tty,
        _ if std::io::stderr().is_terminal() => ProgressMode::Tty,
        _ => ProgressMode::Plain,
    };
    let mut progress = Progress::new(mode);
    let req = BuildRequest {
        inputs,
        tags: args.tags.clone(),
        no_cache: args.no_cache,
        runtime: args.runtime.clone(),
        cache_dir: args.cache_dir.clone().unwrap_or_else(default_cache_dir),
    };
    let outcome = build(&client, &client, &req, &mut progress)?;
    if let Some(out) = &output {
        export(&client, &outcome.image, out, &args.tags)?;
        if mode != ProgressMode::Json {
            eprintln!("exported {} to {}", out.kind, out.dest.display());
        }
    }
    Ok(if mode == ProgressMode::Json {
        String::new()
    } else {
        format!("{}\n", outcome.image.manifest_digest)
    })
}
