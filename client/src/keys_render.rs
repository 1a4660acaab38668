//! Renders a keys report for people: per step its stage, line, instruction, key and the
//! inputs the key was made of.

use std::fmt::Write;

use lcache_proto::step_keys::KeyState;

use crate::offline_keys::KeysReport;

/// How many selected files the text view lists per step before counting the rest.
const FILES_SHOWN: usize = 10;

/// The report as text.
pub fn render_keys(r: &KeysReport) -> String {
    let mut out = String::new();
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let mut stage = None;
    for (n, s) in r.steps.iter().enumerate() {
        if stage != Some(s.stage) {
            stage = Some(s.stage);
            let name = s.stage_name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
            let _ = writeln!(out, "stage {}{name}", s.stage);
        }
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
        if !s.files.is_empty() {
            let _ = writeln!(out, "      files    {} selected", s.files.len());
            for f in s.files.iter().take(FILES_SHOWN) {
                let _ = writeln!(out, "        {:<40} {:?} {} {}", f.path, f.kind, f.mode, f.digest);
            }
            if s.files.len() > FILES_SHOWN {
                let _ = writeln!(
                    out,
                    "        … and {} more (--json lists all)",
                    s.files.len() - FILES_SHOWN
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "{} steps, {} context files hashed, platform {}",
        r.steps.len(),
        r.hashed_files,
        r.platform
    );
    out
}

fn one_line(s: &str) -> String {
    let s = s.replace('\n', "\\n");
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}
