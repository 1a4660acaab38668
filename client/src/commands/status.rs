//! `lcache status` and `lcache cache stats`.

use std::fmt::Write;

use anyhow::Result;

use crate::cli::DaemonArgs;
use crate::daemon_choice::daemon;

/// Runs `lcache status`.
pub fn status(json: bool, explicit: &DaemonArgs) -> Result<String> {
    let (client, _) = daemon(explicit)?;
    let s = client.status()?;
    if json {
        return Ok(serde_json::to_string_pretty(&s)? + "\n");
    }
    let mut out = String::new();
    let _ = writeln!(out, "lcached {} (pid {}), up {} s", s.version, s.pid, s.uptime_s);
    let _ = writeln!(out, "store      {}", s.store);
    for l in &s.listen {
        let _ = writeln!(out, "listening  {l}");
    }
    let _ = writeln!(
        out,
        "cache      {} steps, {} blobs ({} bytes), {} builds",
        s.stats.steps, s.stats.blobs, s.stats.blob_bytes, s.stats.builds
    );
    if let Some(u) = &s.upstream {
        let how = match (u.skipped_for_s, &u.last_error) {
            (0, None) => "no request to it has failed",
            (0, Some(_)) => "its last request failed",
            _ => "not answering",
        };
        let skipped = match u.skipped_for_s {
            0 => String::new(),
            n => format!("; lookups skip it for {n} s more"),
        };
        let access = if u.read_only { "; read-only token" } else { "" };
        let _ = writeln!(
            out,
            "upstream   {} — {how}{skipped}{access}; {} records waiting to be pushed",
            u.address, u.queued
        );
        if let Some(e) = &u.last_error {
            let _ = writeln!(out, "           last error: {e}");
        }
    }
    if s.contexts.is_empty() {
        let _ = writeln!(out, "contexts   none indexed yet");
    }
    for c in &s.contexts {
        let how = match &c.reason {
            Some(r) => format!("stat-walk: {r}"),
            None => c.mode.clone(),
        };
        let _ = writeln!(
            out,
            "context    {} — {} entries, {} digests, {how}",
            c.root, c.entries, c.digests
        );
    }
    Ok(out)
}

/// Runs `lcache cache stats`.
pub fn cache_stats(json: bool, explicit: &DaemonArgs) -> Result<String> {
    let (client, _) = daemon(explicit)?;
    let s = client.status()?.stats;
    if json {
        return Ok(serde_json::to_string_pretty(&s)? + "\n");
    }
    let lookups = s.hits + s.misses;
    let rate = if lookups == 0 {
        "no lookups yet".to_string()
    } else {
        format!("{:.1}% hits", 100.0 * s.hits as f64 / lookups as f64)
    };
    Ok(format!(
        "steps      {}\nblobs      {} ({} bytes)\nbuilds     {}\nlookups    {} hits, {} misses since the daemon started ({rate})\n",
        s.steps, s.blobs, s.blob_bytes, s.builds, s.hits, s.misses
    ))
}
