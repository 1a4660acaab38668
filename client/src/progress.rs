//! Build progress for people and scripts: `plain` looks like BuildKit's (`#N [stage i/n]
//! INSTRUCTION`, output, `#N CACHED` / `#N DONE 1.2s`), `json` prints one event per line,
//! `tty` draws live spinners with per-step timers.

use std::io::Write;
use std::time::Duration;

use lcache_builder::build_events::{BuildObserver, StepEvent, SummaryEvent};
use serde::Serialize;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// BuildKit-style lines on stderr.
    Plain,
    /// One JSON object a line on stdout.
    Json,
    /// A live display on stderr.
    Tty,
}

/// The progress printer.
pub struct Progress {
    mode: ProgressMode,
    bars: Option<indicatif::MultiProgress>,
    /// Running steps' spinners, by step number (stages run concurrently).
    running: std::collections::HashMap<usize, indicatif::ProgressBar>,
}

impl Progress {
    /// A printer in `mode`.
    pub fn new(mode: ProgressMode) -> Self {
        let bars = (mode == ProgressMode::Tty).then(indicatif::MultiProgress::new);
        Self {
            mode,
            bars,
            running: std::collections::HashMap::new(),
        }
    }
}

impl BuildObserver for Progress {
    /// A step begins.
    fn started(&mut self, n: usize, label: &str, instruction: &str) {
        match self.mode {
            ProgressMode::Plain => eprintln!("#{n} [{label}] {instruction}"),
            ProgressMode::Json => {}
            ProgressMode::Tty => {
                if let Some(b) = &self.bars {
                    let pb = b.add(indicatif::ProgressBar::new_spinner());
                    pb.set_style(
                        indicatif::ProgressStyle::with_template("{spinner} #{prefix} {msg} {elapsed:>4}")
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                    );
                    pb.set_prefix(n.to_string());
                    pb.set_message(format!("[{label}] {instruction}"));
                    pb.enable_steady_tick(Duration::from_millis(100));
                    self.running.insert(n, pb);
                }
            }
        }
    }

    /// A line of the running step's output.
    fn output(&mut self, n: usize, line: &str) {
        match (self.mode, self.running.get(&n)) {
            (ProgressMode::Plain, _) => eprintln!("#{n} {line}"),
            (ProgressMode::Tty, Some(pb)) => pb.println(format!("  {line}")),
            _ => {}
        }
    }

    /// A step ends.
    fn finished(&mut self, e: &StepEvent) {
        match self.mode {
            ProgressMode::Plain => {
                if e.cached {
                    eprintln!("#{} CACHED", e.n);
                } else {
                    if let Some(c) = &e.cause {
                        eprintln!("#{} rebuilt: {c}", e.n);
                    }
                    eprintln!("#{} DONE {:.1}s", e.n, e.duration_ms as f64 / 1000.0);
                }
            }
            ProgressMode::Json => print_json(e),
            ProgressMode::Tty => {
                if let Some(pb) = self.running.remove(&e.n) {
                    let how = if e.cached {
                        "CACHED".to_string()
                    } else {
                        format!("DONE {:.1}s", e.duration_ms as f64 / 1000.0)
                    };
                    pb.finish_with_message(format!("{} {how}", pb.message()));
                }
            }
        }
    }

    /// A free-form note (warnings).
    fn note(&mut self, text: &str) {
        match self.mode {
            ProgressMode::Json => print_json(&serde_json::json!({"event": "note", "text": text})),
            _ => eprintln!("{text}"),
        }
    }

    /// The build's summary.
    fn summary(&mut self, s: &SummaryEvent) {
        if self.mode == ProgressMode::Json {
            return print_json(s);
        }
        for c in &s.cascades {
            eprintln!("cascade: {}", c.describe());
        }
        let took = format!(
            "in {:.1}s: {} steps, {} cached, {} run",
            s.duration_ms as f64 / 1000.0,
            s.steps,
            s.cached,
            s.built
        );
        let tags = s.tags.join(", ");
        if s.image.is_empty() {
            // lcached names the image, and moves the tags, once the diff_ids it is taking
            // are known (`--name-image later`).
            let tagging = if tags.is_empty() {
                tags
            } else {
                format!(" and tags it {tags}")
            };
            eprintln!(
                "built {took}; lcached is naming the image{tagging} (`lcache history show {}` shows it)",
                s.build
            );
        } else {
            let tagged = if tags.is_empty() {
                tags
            } else {
                format!(", tagged {tags}")
            };
            eprintln!("built {} {took}{tagged}", short(&s.image));
        }
    }
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(19)]
}

fn print_json<T: Serialize>(v: &T) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, v);
    let _ = writeln!(out);
    let _ = out.flush();
}
