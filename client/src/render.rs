//! Text views of keys and plans: per step its stage, line, instruction, key (and cache
//! state), and the inputs the key was made of.

use std::fmt::Write;

use lcache_proto::step_keys::{KeyState, StepKey};
use lcache_proto::wire::{KeysReport, PlanResponse};

/// A keys report as text; `source` says where the keys came from.
pub fn render_keys(r: &KeysReport, source: &str) -> String {
    let mut out = String::new();
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let mut stage = None;
    for (n, s) in r.steps.iter().enumerate() {
        stage_header(&mut out, &mut stage, s);
        let _ = writeln!(out, "  #{} line {}: {}", n + 1, s.line, s.instruction);
        match &s.key {
            KeyState::Known { key } => {
                let _ = writeln!(out, "      key      {key}");
            }
            KeyState::Pending { waiting_on } => {
                let _ = writeln!(out, "      key      pending: waits for {waiting_on}");
            }
        }
        if let Some(i) = &s.inputs {
            let _ = writeln!(out, "      parent   {}", i.parent);
            for f in &i.fields {
                if f.values.iter().all(String::is_empty) || f.name == "heredocs" {
                    continue;
                }
                let shown: Vec<String> = f.values.iter().map(|v| one_line(v)).collect();
                let _ = writeln!(out, "      {:<8} {}", f.name, shown.join(" "));
            }
        }
        if s.files_total > 0 {
            let _ = writeln!(out, "      files    {} selected", s.files_total);
            for f in &s.files {
                let _ = writeln!(out, "        {:<40} {:?} {} {}", f.path, f.kind, f.mode, f.digest);
            }
            if s.files_total > s.files.len() {
                let _ = writeln!(
                    out,
                    "        … and {} more (--json lists all)",
                    s.files_total - s.files.len()
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "{} steps, {} context files read, platform {} ({source})",
        r.steps.len(),
        r.hashed_files,
        r.platform
    );
    out
}

/// A plan as text: each step and whether the cache has it.
pub fn render_plan(p: &PlanResponse, source: &str) -> String {
    let mut out = String::new();
    for w in &p.report.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let mut stage = None;
    let (mut hits, mut misses, mut pending) = (0, 0, 0);
    for (n, (s, c)) in p.report.steps.iter().zip(&p.cached).enumerate() {
        stage_header(&mut out, &mut stage, s);
        let state = match c {
            Some(true) => {
                hits += 1;
                "CACHED"
            }
            Some(false) => {
                misses += 1;
                "build"
            }
            None => {
                pending += 1;
                "pending"
            }
        };
        let key = s.known_key().map_or("(pending)", |k| &k[..12]);
        let _ = writeln!(
            out,
            "  #{:<3} {state:<8} {key}  line {}: {}",
            n + 1,
            s.line,
            one_line(&s.instruction)
        );
        if let Some(Some(c)) = p.causes.get(n) {
            let _ = writeln!(out, "        because {}", c.describe());
        }
    }
    let _ = writeln!(
        out,
        "{hits} cached, {misses} to build, {pending} pending on earlier results; {} context files read ({source})",
        p.report.hashed_files
    );
    out
}

fn stage_header(out: &mut String, stage: &mut Option<usize>, s: &StepKey) {
    if *stage != Some(s.stage) {
        *stage = Some(s.stage);
        let name = s.stage_name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        let _ = writeln!(out, "stage {}{name}", s.stage);
    }
}

fn one_line(s: &str) -> String {
    let s = s.replace('\n', "\\n");
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}
