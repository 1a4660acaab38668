//! `lcache token create|ls|revoke` and `lcache cache sync`: the shared cache's
//! administration, through the daemon's socket.

use anyhow::Result;
use hyper::Method;
use lcache_proto::wire::{SyncReport, TokenCreated, TokenInfo, TokenRequest};

use crate::cli::{DaemonArgs, TokenCommand};
use crate::daemon_choice::daemon;

/// Runs `lcache token …`.
pub fn run(cmd: &TokenCommand, explicit: &DaemonArgs) -> Result<String> {
    let (client, _) = daemon(explicit)?;
    match cmd {
        TokenCommand::Create { name, access, scope } => {
            let t: TokenCreated = client.json(
                Method::POST,
                "/v1/tokens",
                Some(&TokenRequest {
                    name: name.clone(),
                    access: access.clone(),
                    scope: scope.clone(),
                }),
            )?;
            eprintln!(
                "token '{}' ({} access) made; it is shown only now: save it in a file clients pass with --token-file",
                t.name, t.access
            );
            Ok(format!("{}\n", t.token))
        }
        TokenCommand::Ls(a) => {
            let ts: Vec<TokenInfo> = client.json(Method::GET, "/v1/tokens", None::<&()>)?;
            if a.json {
                return Ok(serde_json::to_string_pretty(&ts)? + "\n");
            }
            let mut out = format!(
                "{:<24} {:<6} {:<16} CREATED (ms since epoch)\n",
                "NAME", "ACCESS", "SCOPES"
            );
            for t in ts {
                let scope = t.scope.as_deref().unwrap_or("any");
                out.push_str(&format!(
                    "{:<24} {:<6} {scope:<16} {}\n",
                    t.name, t.access, t.created_at_ms
                ));
            }
            Ok(out)
        }
        TokenCommand::Revoke { name } => {
            let _: serde_json::Value = client.json(Method::DELETE, &format!("/v1/tokens/{name}"), None::<&()>)?;
            Ok(format!("revoked token '{name}'\n"))
        }
    }
}

/// Runs `lcache cache sync`.
pub fn sync(explicit: &DaemonArgs) -> Result<String> {
    let (client, _) = daemon(explicit)?;
    let r: SyncReport = client.json(Method::POST, "/v1/upstream/sync", None::<&()>)?;
    Ok(format!("every stored step record is pushed to {}\n", r.upstream))
}
