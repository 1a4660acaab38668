//! `lcache parse`: the Dockerfile as the front end understands it.

use std::fmt::Write;

use anyhow::Result;

use crate::cli::ParseArgs;
use crate::offline_keys::read_dockerfile;

/// Runs `lcache parse`.
pub fn run(args: &ParseArgs) -> Result<String> {
    let df = read_dockerfile(&args.file)?;
    if args.json {
        return Ok(serde_json::to_string_pretty(&df)? + "\n");
    }
    let mut out = String::new();
    for ins in &df.instructions {
        let lines = if ins.end_line > ins.line {
            format!("{}-{}", ins.line, ins.end_line)
        } else {
            ins.line.to_string()
        };
        let _ = writeln!(out, "{lines:>7}  {}", ins.written);
        for h in &ins.heredocs {
            let _ = writeln!(out, "         <<{} ({} bytes)", h.delimiter, h.body.len());
        }
    }
    Ok(out)
}
