//! `lcache explain` and `lcache history`: builds from the daemon's history, each miss with
//! its root cause and each cause with what it rebuilt and cost.

use std::fmt::Write;

use anyhow::{anyhow, Result};
use lcache_builder::miss_causes::file_changes;
use lcache_proto::cache_key::KeyInputs;
use lcache_proto::wire::BuildRecord;

use crate::cli::DaemonArgs;
use crate::cli::{ExplainArgs, HistoryArgs, HistoryCommand};
use crate::daemon_choice::daemon;
use crate::daemon_client::DaemonClient;

fn latest(client: &DaemonClient) -> Result<BuildRecord> {
    client
        .builds(1)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no builds yet — run `lcache build` first"))
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// A build, step by step, with its cascades.
pub fn render_build(b: &BuildRecord) -> String {
    let mut out = String::new();
    let cached = b.steps.iter().filter(|s| s.cached).count();
    let saved: u64 = b.steps.iter().map(|s| s.saved_ms).sum();
    let failed = b.failure.as_ref().is_some_and(|f| f.step.is_some());
    let _ = writeln!(
        out,
        "build {} — {} ({}), {} steps: {cached} cached (saved {}), {} rebuilt{} in {}",
        b.id,
        b.context,
        b.dockerfile,
        b.steps.len() + usize::from(failed),
        secs(saved),
        b.steps.len() - cached,
        if failed { ", 1 failed" } else { "" },
        secs(b.finished_at_ms.saturating_sub(b.started_at_ms))
    );
    match &b.failure {
        Some(f) => {
            let _ = writeln!(out, "  FAILED: {}", f.message);
        }
        None => {
            let _ = writeln!(
                out,
                "  image {}",
                if b.image.is_empty() {
                    // A build that ended before its image was named, whose layer lcached
                    // then found damaged (or one recorded before builds kept their image).
                    "not named"
                } else {
                    &b.image
                }
            );
        }
    }
    for (n, (s, failed)) in b.steps_tried().enumerate() {
        let what = if failed {
            format!(
                "FAILED after {}: {}",
                secs(s.duration_ms),
                s.cause.as_ref().map_or("unknown".to_string(), |c| c.describe())
            )
        } else if s.cached {
            format!("CACHED (saved {})", secs(s.saved_ms))
        } else {
            format!(
                "rebuilt in {}: {}",
                secs(s.duration_ms),
                s.cause.as_ref().map_or("unknown".to_string(), |c| c.describe())
            )
        };
        let _ = writeln!(
            out,
            "  #{:<3} line {:<4} {:<40} {what}",
            n + 1,
            s.line,
            truncate(&s.instruction, 40)
        );
    }
    if b.cascades.is_empty() {
        let _ = writeln!(out, "nothing rebuilt");
    }
    for c in &b.cascades {
        let _ = writeln!(out, "cascade: {}", c.describe());
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

fn field_diff(out: &mut String, old: Option<&KeyInputs>, new: &KeyInputs) {
    let show = |v: &[String]| v.iter().map(|s| s.replace('\n', "\\n")).collect::<Vec<_>>().join(" ");
    let _ = writeln!(out, "  platform  {}", new.platform);
    match old {
        Some(o) if o.parent != new.parent => {
            let _ = writeln!(out, "- parent    {}\n+ parent    {}", o.parent, new.parent);
        }
        _ => {
            let _ = writeln!(out, "  parent    {}", new.parent);
        }
    }
    for f in &new.fields {
        match old.map(|o| o.field(&f.name).unwrap_or_default()) {
            Some(ov) if ov != f.values.as_slice() => {
                let _ = writeln!(out, "- {:<9} {}\n+ {:<9} {}", f.name, show(ov), f.name, show(&f.values));
            }
            _ => {
                let _ = writeln!(out, "  {:<9} {}", f.name, show(&f.values));
            }
        }
    }
}

/// Step `n` (1-based) of the steps `b` started, and whether it failed.
fn step_tried(b: &BuildRecord, n: usize) -> Result<(&lcache_proto::wire::BuildStep, bool)> {
    let tried = b.steps_tried().count();
    b.steps_tried()
        .nth(n.wrapping_sub(1))
        .ok_or_else(|| anyhow!("build {} has steps 1 to {tried}; there is no step {n}", b.id))
}

fn render_step(client: &DaemonClient, b: &BuildRecord, n: usize) -> Result<String> {
    let (s, failed) = step_tried(b, n)?;
    let mut out = String::new();
    let _ = writeln!(out, "#{n} line {}: {}\nkey {}", s.line, s.instruction, s.key);
    if let (true, Some(f)) = (failed, &b.failure) {
        let _ = writeln!(out, "FAILED: {}", f.message);
    }
    if s.cached {
        let _ = writeln!(
            out,
            "CACHED: the key matched a stored result (saved {})",
            secs(s.saved_ms)
        );
    } else if let Some(c) = &s.cause {
        let _ = writeln!(out, "rebuilt: {}", c.describe());
    }
    let old = match &s.compared_with {
        Some(k) => {
            let _ = writeln!(out, "compared with the earlier record {k}");
            client.step(k)?.and_then(|r| r.inputs)
        }
        None => None,
    };
    if let Some(new) = &s.inputs {
        let _ = writeln!(
            out,
            "key inputs ({}):",
            if old.is_some() {
                "- earlier, + now"
            } else {
                "no earlier record"
            }
        );
        field_diff(&mut out, old.as_ref(), new);
        let digest = |i: &KeyInputs| {
            i.field("sources_digest")
                .and_then(|v| v.first().cloned())
                .filter(|d| !d.is_empty())
        };
        if let (Some(o), Some(nw)) = (old.as_ref().and_then(digest), digest(new)) {
            if o != nw {
                if let Some(changes) = file_changes(client, &o, &nw) {
                    let _ = writeln!(out, "files:");
                    for c in changes {
                        let _ = writeln!(out, "  {} {}", c.path, c.change);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Runs `lcache explain`.
pub fn explain(args: &ExplainArgs, explicit: &DaemonArgs) -> Result<String> {
    let (client, _) = daemon(explicit)?;
    let b = match &args.build {
        Some(id) => client.build_record(id)?,
        None => latest(&client)?,
    };
    match (args.step, args.json) {
        (Some(n), true) => Ok(serde_json::to_string_pretty(step_tried(&b, n)?.0)? + "\n"),
        (Some(n), false) => render_step(&client, &b, n),
        (None, true) => Ok(serde_json::to_string_pretty(&b)? + "\n"),
        (None, false) => Ok(render_build(&b)),
    }
}

/// Runs `lcache history`.
pub fn history(args: &HistoryArgs, explicit: &DaemonArgs) -> Result<String> {
    let (client, _) = daemon(explicit)?;
    if let Some(HistoryCommand::Show { build }) = &args.command {
        let b = client.build_record(build)?;
        return Ok(if args.json {
            serde_json::to_string_pretty(&b)? + "\n"
        } else {
            render_build(&b)
        });
    }
    let builds = client.builds(args.n)?;
    if args.json {
        return Ok(serde_json::to_string_pretty(&builds)? + "\n");
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<17} {:>6} {:>6} {:>9} {:>9}  ROOT CAUSES",
        "BUILD", "STEPS", "HITS", "TOOK", "SAVED"
    );
    for b in &builds {
        let cached = b.steps.iter().filter(|s| s.cached).count();
        let rate = if b.steps.is_empty() {
            0.0
        } else {
            100.0 * cached as f64 / b.steps.len() as f64
        };
        let saved: u64 = b.steps.iter().map(|s| s.saved_ms).sum();
        let mut causes = match b.cascades.len() {
            0 => "-".to_string(),
            1 => b.cascades[0].cause.describe(),
            n => format!("{} (+{} more)", b.cascades[0].cause.describe(), n - 1),
        };
        if let Some(f) = &b.failure {
            causes = match &f.step {
                Some(s) => format!("FAILED at line {} ({}); {causes}", s.line, truncate(&s.instruction, 30)),
                None => format!("FAILED; {causes}"),
            };
        }
        let _ = writeln!(
            out,
            "{:<17} {:>6} {:>5.0}% {:>9} {:>9}  {}",
            b.id,
            b.steps.len(),
            rate,
            secs(b.finished_at_ms.saturating_sub(b.started_at_ms)),
            secs(saved),
            truncate(&causes, 80)
        );
    }
    if builds.is_empty() {
        let _ = writeln!(out, "no builds yet — run `lcache build`");
    }
    Ok(out)
}
