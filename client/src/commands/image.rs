//! `lcache image import | ls | rm`.

use std::fmt::Write;

use anyhow::{Context, Result};
use lcache_proto::platform::Platform;

use crate::cli::DaemonArgs;
use crate::cli::ImageCommand;
use crate::daemon_choice::daemon;
use crate::image_import::import_image;

/// Runs an `lcache image` subcommand.
pub fn run(cmd: &ImageCommand, explicit: &DaemonArgs) -> Result<String> {
    let (client, _) = daemon(explicit)?;
    match cmd {
        ImageCommand::Import { file, name } => {
            let (img, format) = import_image(&client, file, name.as_deref(), &Platform::host().to_string())?;
            Ok(format!(
                "imported {} ({format}, {} layers) as {}\n",
                file.display(),
                img.layers.len(),
                img.name
            ))
        }
        ImageCommand::Pull {
            reference,
            platform,
            insecure_registries,
        } => {
            let platform = platform.clone().unwrap_or_else(|| Platform::host().to_string());
            let r = crate::registry_ops::pull(&client, reference, &platform, insecure_registries)?;
            Ok(format!(
                "pulled {} as {} ({}): {} blobs fetched ({} bytes), {} already here\n",
                r.resolved, r.image.name, r.image.manifest_digest, r.fetched_blobs, r.fetched_bytes, r.reused_blobs
            ))
        }
        ImageCommand::Push {
            name,
            reference,
            insecure_registries,
        } => {
            let target = reference.as_deref().unwrap_or(name);
            let r = crate::registry_ops::push(&client, name, target, insecure_registries)?;
            Ok(format!(
                "pushed {name} to {} ({}): {} blobs uploaded, {} already there, {} mounted\n",
                r.resolved, r.manifest_digest, r.uploaded_blobs, r.skipped_blobs, r.mounted_blobs
            ))
        }
        ImageCommand::History { name, no_trunc, format } => {
            let rows = crate::image_views::history(&client, name)?;
            if format == "json" {
                let mut out = String::new();
                for r in &rows {
                    out.push_str(&serde_json::to_string(r)?);
                    out.push('\n');
                }
                return Ok(out);
            }
            Ok(crate::image_views::history_table(&rows, *no_trunc))
        }
        ImageCommand::Analyze {
            name,
            json,
            ci,
            ci_config,
        } => {
            let (a, trees) = crate::layer_analysis::analyze_image(&client, name)?;
            if *ci {
                let (path, required) = match ci_config {
                    Some(p) => (p.clone(), true),
                    None => (std::path::PathBuf::from(".dive-ci"), false),
                };
                let rules = match std::fs::read_to_string(&path) {
                    Ok(t) => crate::layer_analysis::parse_ci_rules(&t)
                        .with_context(|| format!("cannot read the rules in {}", path.display()))?,
                    Err(e) if required => {
                        return Err(anyhow::anyhow!("cannot read the rules file {}: {e}", path.display()))
                    }
                    Err(_) => Default::default(),
                };
                let (lines, ok) = crate::layer_analysis::check(&a, &rules);
                let report = format!("{}\n{}\n", crate::layer_analysis::render(&a), lines.join("\n"));
                if !ok {
                    print!("{report}");
                    anyhow::bail!("{name} fails the image efficiency rules above");
                }
                return Ok(report + "all rules passed\n");
            }
            if *json {
                return Ok(serde_json::to_string_pretty(&a)? + "\n");
            }
            use std::io::IsTerminal;
            if std::io::stdout().is_terminal() && std::io::stdin().is_terminal() {
                crate::analyze_view::run(crate::analyze_view::ViewState::new(a, &trees))
                    .context("the terminal view failed")?;
                return Ok(String::new());
            }
            Ok(crate::layer_analysis::render(&a))
        }
        ImageCommand::Inspect { name } => {
            Ok(serde_json::to_string_pretty(&crate::image_views::inspect(&client, name)?)? + "\n")
        }
        ImageCommand::Ls(a) => {
            let images = client.images()?;
            if a.json {
                return Ok(serde_json::to_string_pretty(&images)? + "\n");
            }
            let mut out = String::new();
            let _ = writeln!(out, "{:<40} {:<20} {:>7} {:>12}", "NAME", "MANIFEST", "LAYERS", "SIZE");
            for i in images {
                let size: u64 = i.layers.iter().map(|l| l.size).sum();
                let _ = writeln!(
                    out,
                    "{:<40} {:<20} {:>7} {:>12}",
                    i.name,
                    &i.manifest_digest[..i.manifest_digest.len().min(19)],
                    i.layers.len(),
                    size
                );
            }
            Ok(out)
        }
        ImageCommand::Rm { name } => {
            client.remove_image(name)?;
            Ok(format!("removed {name}\n"))
        }
    }
}
