//! `lcache plan`: which steps the next build takes from the cache, executing nothing.

use anyhow::Result;
use lcache_proto::wire::{ContextIndexStatus, PlanResponse};

use crate::build_inputs::plan_inputs;
use crate::cli::DaemonArgs;
use crate::cli::KeysArgs;
use crate::daemon_choice::daemon;
use crate::offline_keys::offline_keys;
use crate::render::render_plan;
use lcache_builder::miss_causes::plan_causes;

/// Runs `lcache plan`.
pub fn run(args: &KeysArgs, explicit: &DaemonArgs) -> Result<String> {
    let inputs = plan_inputs(&args.inputs, args.json)?;
    let (resp, source) = if args.offline {
        // Offline there is no cache to ask: every known key is a step to build.
        let report = offline_keys(&inputs)?;
        let cached = report.steps.iter().map(|s| s.known_key().map(|_| false)).collect();
        let context = ContextIndexStatus {
            root: inputs.context.clone(),
            mode: "offline".into(),
            reason: None,
            entries: 0,
            digests: 0,
        };
        (
            PlanResponse {
                report,
                cached,
                causes: Vec::new(),
                context,
                plan: None,
                evicted: Vec::new(),
            },
            "offline: no cache consulted".to_string(),
        )
    } else {
        let (client, _) = daemon(explicit)?;
        let mut resp = client.plan(&inputs)?;
        resp.causes = plan_causes(&client, &inputs, &resp)?;
        (resp, format!("daemon {}", client.endpoint()))
    };
    if args.json {
        return Ok(serde_json::to_string_pretty(&resp)? + "\n");
    }
    Ok(render_plan(&resp, &source))
}
