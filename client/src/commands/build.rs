//! `lcache build`.

use std::io::IsTerminal;

use anyhow::{Context, Result};
use lcache_builder::build_loop::BuildOutcome;
use serde::Serialize;

use crate::build_inputs::plan_inputs;
use crate::cli::DaemonArgs;
use crate::cli::{BuildArgs, NameImage};
use crate::daemon_choice::daemon;
use crate::image_views::human_size;
use crate::progress::{Progress, ProgressMode};
use lcache_builder::build_events::BuildObserver;
use lcache_builder::build_loop::{build, BuildRequest};
use lcache_builder::cache_dir::{default_cache_dir, CacheDir};
use lcache_builder::image_export::{export, OutputSpec};
use lcache_builder::snapshot_prune;

/// Runs `lcache build`.
pub fn run(args: &BuildArgs, explicit: &DaemonArgs) -> Result<String> {
    let output: Option<OutputSpec> = args.output.as_deref().map(str::parse).transpose()?;
    let inputs = plan_inputs(&args.inputs, false)?;
    let (mut client, _) = daemon(explicit)?;
    if let Some(scope) = &args.scope {
        client.set_scopes(scope, &args.scope_fallbacks);
    }
    let mode = match args.progress.as_str() {
        "json" => ProgressMode::Json,
        "plain" => ProgressMode::Plain,
        "tty" => ProgressMode::Tty,
        _ if std::io::stderr().is_terminal() => ProgressMode::Tty,
        _ => ProgressMode::Plain,
    };
    let mut progress = Progress::new(mode);
    let secrets = read_secrets(&args.secrets)?;
    let ssh = read_ssh(&args.ssh, std::env::var_os("SSH_AUTH_SOCK"))?;
    let req = BuildRequest {
        secrets,
        ssh,
        squash: args.squash,
        name_later: match args.name_image {
            NameImage::Now => false,
            NameImage::Later => true,
            NameImage::Auto => std::io::stdout().is_terminal(),
        } && output.is_none()
            && !args.push
            && !args.squash
            && args.summary_json.is_none(),
        source_date_epoch: match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) if !v.is_empty() => Some(
                v.trim()
                    .parse()
                    .with_context(|| format!("SOURCE_DATE_EPOCH={v} is not a number of seconds since 1970"))?,
            ),
            _ => None,
        },
        inputs,
        tags: args.tags.clone(),
        no_cache: args.no_cache,
        runtime: args.runtime.clone(),
        cache_dir: args.cache_dir.clone().unwrap_or_else(default_cache_dir),
        layer_compression: args.layer_compression.into(),
    };
    for note in crate::registry_ops::ensure_bases(&client, &req.inputs, args.pull, &args.insecure_registries)? {
        progress.note(&note);
    }
    let outcome = build(&client, &client, &req, &mut progress);
    // A failed build made snapshots too.
    keep_within_budget(&req.cache_dir, &mut progress, outcome.is_ok());
    let outcome = outcome?;
    if let Some(path) = &args.summary_json {
        let summary = build_summary(&outcome);
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("cannot write the build summary to {}", path.display()))?;
    }
    // What the registry has: the image's own manifest, or with layers kept as their tar,
    // one naming their gzip forms. Scripts read the digest from stdout to pull by.
    let mut pushed_digest = None;
    if args.push {
        for tag in &args.tags {
            let r = crate::registry_ops::push(&client, tag, tag, &args.insecure_registries)?;
            progress.note(&format!(
                "pushed {} ({}): {} blobs uploaded, {} already there, {} mounted",
                r.resolved, r.manifest_digest, r.uploaded_blobs, r.skipped_blobs, r.mounted_blobs
            ));
            pushed_digest = Some(r.manifest_digest);
        }
    }
    if let Some(out) = &output {
        export(&client, &outcome.image, out, &args.tags)?;
        if mode != ProgressMode::Json {
            eprintln!("exported {} to {}", out.kind, out.dest.display());
        }
    }
    Ok(if mode == ProgressMode::Json {
        String::new()
    } else if outcome.image.manifest_digest.is_empty() {
        // lcached names the image: what names it until then is the build.
        format!("build {}\n", outcome.record.id)
    } else {
        format!(
            "{}\n",
            pushed_digest.unwrap_or_else(|| outcome.image.manifest_digest.clone())
        )
    })
}

/// What `--summary-json` writes: one build, for a CI dashboard.
#[derive(Debug, Serialize)]
pub struct BuildSummary {
    /// The build's id in the history (`lcache explain ID`).
    pub build: String,
    /// The image's manifest digest.
    pub image: String,
    /// Steps in the build.
    pub steps: usize,
    /// Steps served from the cache.
    pub cached: usize,
    /// Steps executed.
    pub built: usize,
    /// `cached / steps` (1.0 for a build without steps).
    pub hit_rate: f64,
    /// Whole build, milliseconds.
    pub duration_ms: u64,
    /// What the cached steps took when they were built, milliseconds.
    pub saved_ms: u64,
    /// Blob bytes fetched from the cache.
    pub bytes_fetched: u64,
    /// Blob bytes stored into the cache.
    pub bytes_stored: u64,
    /// Each root cause and the steps it rebuilt.
    pub root_causes: Vec<lcache_proto::explain::Cascade>,
}

/// The summary of a finished build.
pub fn build_summary(o: &BuildOutcome) -> BuildSummary {
    let steps = o.steps.len();
    let cached = o.steps.iter().filter(|s| s.cached).count();
    BuildSummary {
        build: o.record.id.clone(),
        image: o.image.manifest_digest.clone(),
        steps,
        cached,
        built: steps - cached,
        hit_rate: if steps == 0 { 1.0 } else { cached as f64 / steps as f64 },
        duration_ms: o.record.finished_at_ms.saturating_sub(o.record.started_at_ms),
        saved_ms: o.record.steps.iter().map(|s| s.saved_ms).sum(),
        bytes_fetched: o.bytes_fetched,
        bytes_stored: o.bytes_stored,
        root_causes: o.record.cascades.clone(),
    }
}

/// `--secret id=ID,src=FILE|env=VAR` values, read.
fn read_secrets(values: &[String]) -> Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    for v in values {
        let (mut id, mut src, mut env) = (None, None, None);
        for part in v.split(',') {
            match part.split_once('=') {
                Some(("id", x)) => id = Some(x.to_string()),
                Some(("src" | "source", x)) => src = Some(x.to_string()),
                Some(("env", x)) => env = Some(x.to_string()),
                _ => anyhow::bail!("'{part}' in --secret {v}: write id=ID,src=FILE or id=ID,env=VAR"),
            }
        }
        let id = id.ok_or_else(|| anyhow::anyhow!("--secret {v} has no id=: write id=ID,src=FILE or id=ID,env=VAR"))?;
        let content = match (src, env) {
            (Some(f), None) => {
                std::fs::read(&f).with_context(|| format!("cannot read the secret file {f} for --secret id={id}"))?
            }
            (None, Some(e)) => std::env::var(&e)
                .with_context(|| format!("--secret id={id}: the environment has no {e}"))?
                .into_bytes(),
            _ => anyhow::bail!("--secret id={id} needs exactly one of src=FILE or env=VAR"),
        };
        out.insert(id, content);
    }
    Ok(out)
}

/// `--ssh ID[=SOCKET]` values: agent sockets by id (`ID` alone is the agent at
/// `$SSH_AUTH_SOCK`, given as `auth_sock`).
fn read_ssh(
    values: &[String],
    auth_sock: Option<std::ffi::OsString>,
) -> Result<std::collections::BTreeMap<String, std::path::PathBuf>> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = std::collections::BTreeMap::new();
    for v in values {
        let (id, path) = match v.split_once('=') {
            Some((id, path)) => (id, std::path::PathBuf::from(path)),
            None => match &auth_sock {
                Some(p) => (v.as_str(), std::path::PathBuf::from(p)),
                None => anyhow::bail!(
                    "--ssh {v}: SSH_AUTH_SOCK is not set — start an agent (eval $(ssh-agent); ssh-add) or write --ssh {v}=SOCKET"
                ),
            },
        };
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("--ssh {id}: cannot use the agent socket {}", path.display()))?;
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "--ssh {id}: {} is not an agent socket — lcache forwards an agent, not key files: load the key with ssh-add and pass the agent's socket",
                path.display()
            );
        }
        if id.is_empty() || id.contains(',') {
            anyhow::bail!("--ssh {v}: the id must be a non-empty name without commas");
        }
        out.insert(id.to_string(), path);
    }
    Ok(out)
}

/// Prunes the client cache's snapshots to their budget after a build (`snapshot_prune`);
/// a failure only warns (after a build that succeeded: a failed one has said what is wrong),
/// as the build's result stands either way.
fn keep_within_budget(cache_dir: &std::path::Path, progress: &mut Progress, warn: bool) {
    let pruned = CacheDir::open(cache_dir).map_err(|e| e.to_string()).and_then(|cache| {
        let budget = snapshot_prune::budget(&cache)?;
        snapshot_prune::after_build(&cache, budget)
            .map(|p| p.map(|p| (p, budget)))
            .map_err(|e| e.to_string())
    });
    if let Ok(Some((p, _))) = &pruned {
        if p.leftovers > 0 {
            progress.note(&format!(
                "removed {} director{} that killed builds left in {}",
                p.leftovers,
                if p.leftovers == 1 { "y" } else { "ies" },
                cache_dir.join("work").display()
            ));
        }
    }
    match pruned {
        Ok(Some((p, budget))) if p.removed > 0 => progress.note(&format!(
            "removed {} least recently used snapshot{} ({}) from the client cache, which keeps {} of its {} (LCACHE_CACHE_MAX)",
            p.removed,
            if p.removed == 1 { "" } else { "s" },
            human_size(p.freed),
            human_size(p.kept),
            human_size(budget)
        )),
        Ok(_) => {}
        Err(e) if warn => progress.note(&format!(
            "warning: the client cache {} was not pruned: {e}",
            cache_dir.display()
        )),
        Err(_) => {}
    }
}

/// Runs `lcache cache prune`: empties the cache mounts no RUN is using, and removes the
/// least recently used snapshots until those left hold at most `keep` bytes.
pub fn prune(cache_dir: Option<&std::path::Path>, keep: Option<&str>) -> Result<String> {
    let root = cache_dir
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(default_cache_dir);
    let keep = match keep {
        Some(k) => lcache_proto::byte_size::parse_size(k)
            .ok_or_else(|| anyhow::anyhow!("--keep-storage {k} is not a size: write bytes, or 500M, 20G"))?,
        None => 0,
    };
    let (removed, busy) = lcache_builder::run_mounts::prune(&root.join("run-cache"))
        .with_context(|| format!("cannot prune the cache mounts in {}", root.display()))?;
    let mut out = format!(
        "removed {removed} cache mount{}{}\n",
        if removed == 1 { "" } else { "s" },
        if busy > 0 {
            format!(", kept {busy} in use by a running build")
        } else {
            String::new()
        }
    );
    let cache = CacheDir::open(&root).with_context(|| format!("cannot use the client cache {}", root.display()))?;
    match snapshot_prune::prune(&cache, keep)
        .with_context(|| format!("cannot prune the snapshots in {}", root.display()))?
    {
        Some(p) => {
            out.push_str(&format!(
                "removed {} snapshot{} ({}), kept {}\n",
                p.removed,
                if p.removed == 1 { "" } else { "s" },
                human_size(p.freed),
                human_size(p.kept)
            ));
            if p.leftovers > 0 {
                out.push_str(&format!("removed {} directories killed builds left\n", p.leftovers));
            }
        }
        None => out.push_str("kept every snapshot: a build is using the cache — run this again once it ends\n"),
    }
    Ok(out)
}
