use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use lcache_client::cli::{CacheCommand, Cli, Command};
use lcache_client::commands;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = &cli.daemon;
    let result = match &cli.command {
        Command::Parse(a) => commands::parse::run(a),
        Command::Keys(a) => commands::keys::run(a, daemon),
        Command::Plan(a) => commands::plan::run(a, daemon),
        Command::Build(a) => commands::build::run(a, daemon),
        Command::Explain(a) => commands::explain::explain(a, daemon),
        Command::History(a) => commands::explain::history(a, daemon),
        Command::Image { command } => commands::image::run(command, daemon),
        Command::Status(a) => commands::status::status(a.json, daemon),
        Command::Cache {
            command: CacheCommand::Stats(a),
        } => commands::status::cache_stats(a.json, daemon),
        Command::Cache {
            command: CacheCommand::Sync,
        } => commands::token::sync(daemon),
        Command::Token { command } => commands::token::run(command, daemon),
        Command::Cache {
            command:
                CacheCommand::Prune {
                    upstream: Some(url),
                    older_than,
                    dry_run,
                    ..
                },
        } => commands::bucket::prune(url, older_than.as_deref().unwrap_or_default(), *dry_run),
        Command::Cache {
            command:
                CacheCommand::Prune {
                    cache_dir,
                    keep_storage,
                    ..
                },
        } => commands::build::prune(cache_dir.as_deref(), keep_storage.as_deref()),
    };
    match result {
        Ok(out) => {
            // A closed pipe (`lcache keys . | head`) is not an error worth a message.
            let _ = std::io::stdout().write_all(out.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
