//! `lcache keys`: every step's key and inputs, through the daemon's index when one runs.

use anyhow::Result;

use crate::build_inputs::plan_inputs;
use crate::cli::DaemonArgs;
use crate::cli::KeysArgs;
use crate::daemon_choice::daemon;
use crate::offline_keys::offline_keys;
use crate::render::render_keys;
use lcache_builder::errors::CacheError;

/// Runs `lcache keys`.
pub fn run(args: &KeysArgs, explicit: &DaemonArgs) -> Result<String> {
    let inputs = plan_inputs(&args.inputs, args.json)?;
    let (report, source) = if args.offline {
        (offline_keys(&inputs)?, "offline".to_string())
    } else {
        let (client, named) = daemon(explicit)?;
        match client.plan(&inputs) {
            Ok(p) => (p.report, format!("daemon {}", client.endpoint())),
            // Keys need no cache: without a daemon at the default place, work offline.
            Err(CacheError::Unreachable { .. }) if !named => {
                (offline_keys(&inputs)?, "offline: no daemon running".to_string())
            }
            Err(e) => return Err(e.into()),
        }
    };
    if args.json {
        return Ok(serde_json::to_string_pretty(&report)? + "\n");
    }
    Ok(render_keys(&report, &source))
}
