//! Why a step missed the cache, as data first: one root cause per miss, found by comparing
//! the step's key inputs with the nearest earlier record of the same step, and the cascade
//! each root cause set off. Words come from [`MissCause::describe`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cache_key::KeyInputs;
use crate::source_select::EntryKind;
use crate::sources_digest::{DirNode, SummaryEntry};

/// How many file changes a cause lists before counting the rest.
pub const CHANGES_LISTED: usize = 10;

/// One changed variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VarChange {
    /// The name.
    pub name: String,
    /// The old value (`None`: not set).
    pub old: Option<String>,
    /// The new value (`None`: no longer set).
    pub new: Option<String>,
}

/// One changed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    /// Its path in the context.
    pub path: String,
    /// What happened to it.
    pub change: ChangeKind,
}

/// What happened to one path between the sources of two builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// It is new.
    Added,
    /// It is gone.
    Removed,
    /// A file's contents changed.
    Modified,
    /// Something beneath a directory changed; the summary does not list its children.
    ContentsChanged,
    /// A file with the same contents was removed at `from`.
    RenamedFrom {
        /// The path it had.
        from: String,
    },
    /// Only its permission bits changed.
    Mode {
        /// The old mode.
        old: u32,
        /// The new mode.
        new: u32,
    },
    /// A symlink points elsewhere.
    LinkTarget {
        /// The old target.
        old: String,
        /// The new target.
        new: String,
    },
    /// It became another type of entry (a file became a directory…).
    Type {
        /// The old type.
        old: EntryKind,
        /// The new type.
        new: EntryKind,
    },
}

impl std::fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Added => f.write_str("added"),
            Self::Removed => f.write_str("removed"),
            Self::Modified => f.write_str("modified"),
            Self::ContentsChanged => f.write_str("contents changed"),
            Self::RenamedFrom { from } => write!(f, "renamed from {from}"),
            Self::Mode { old, new } => write!(f, "mode {old:o} → {new:o}"),
            Self::LinkTarget { old, new } => write!(f, "symlink target {old} → {new}"),
            Self::Type { old, new } => write!(f, "{} → {}", old.name(), new.name()),
        }
    }
}

/// The root cause of a miss (or of a whole cascade).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissCause {
    /// The instruction's text changed.
    InstructionChanged {
        /// Old text.
        old: String,
        /// New text.
        new: String,
    },
    /// A variable in the step's environment changed (ARG via --build-arg, or ENV).
    VariableChanged {
        /// The changes.
        changes: Vec<VarChange>,
    },
    /// Copied files changed.
    FilesChanged {
        /// The first changes.
        changes: Vec<FileChange>,
        /// How many more.
        more: usize,
    },
    /// `.dockerignore` changed what the COPY selects.
    DockerignoreChanged {
        /// The first changes in the selection.
        changes: Vec<FileChange>,
        /// How many more.
        more: usize,
    },
    /// Another part of the effective definition changed (WORKDIR, USER, dest, flags…).
    DefinitionChanged {
        /// The key field.
        field: String,
        /// Old value.
        old: String,
        /// New value.
        new: String,
    },
    /// The base image is a different image now.
    BaseImageChanged {
        /// Old identity.
        old: String,
        /// New identity.
        new: String,
    },
    /// An earlier step rebuilt, so this one's parent changed.
    ParentRebuilt {
        /// Build step number (1-based) of the root of the cascade.
        root_step: usize,
        /// Its Dockerfile line.
        root_line: usize,
        /// Its instruction.
        root_instruction: String,
    },
    /// `--no-cache`.
    NoCache,
    /// The earlier result was evicted from the cache.
    Evicted,
    /// The step was never built before.
    NeverBuilt,
    /// An earlier record of the step exists and none of its inputs explains the new key: said
    /// honestly rather than guessed. (After the others, so stored causes keep their encoding.)
    Unexplained,
    /// The step ran with these same inputs in an earlier build, and failed there. (After the
    /// others, so stored causes keep their encoding.)
    FailedBefore,
    /// Not in the local cache, and the cache behind it could not be asked (unreachable,
    /// silent, or skipped for a while after failing to answer): it may have held the step.
    /// (Last, so stored causes keep their encoding.)
    UpstreamUnavailable {
        /// Which cache, and why, in words.
        upstream: String,
    },
}

/// The step at the root of a cascade: what a rebuilt step hands to the steps after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CascadeRoot {
    /// Build step number (1-based).
    pub step: usize,
    /// Its Dockerfile line.
    pub line: usize,
    /// Its instruction as written.
    pub instruction: String,
}

impl CascadeRoot {
    /// The cause every step of this cascade after the root has.
    pub fn cause(&self) -> MissCause {
        MissCause::ParentRebuilt {
            root_step: self.step,
            root_line: self.line,
            root_instruction: self.instruction.clone(),
        }
    }
}

impl MissCause {
    /// The cause in words.
    pub fn describe(&self) -> String {
        let files = |changes: &[FileChange], more: usize| {
            let mut v: Vec<String> = changes.iter().map(|c| format!("{} {}", c.path, c.change)).collect();
            if more > 0 {
                v.push(format!("and {more} more"));
            }
            v.join(", ")
        };
        match self {
            Self::InstructionChanged { old, new } => format!("instruction changed: {}", word_diff(old, new)),
            Self::VariableChanged { changes } => {
                let v: Vec<String> = changes
                    .iter()
                    .map(|c| {
                        format!(
                            "{}: {} → {}",
                            c.name,
                            c.old.as_deref().unwrap_or("(unset)"),
                            c.new.as_deref().unwrap_or("(unset)")
                        )
                    })
                    .collect();
                format!("variable changed: {}", v.join(", "))
            }
            Self::FilesChanged { changes, more } => format!("files changed: {}", files(changes, *more)),
            Self::DockerignoreChanged { changes, more } => {
                format!(".dockerignore changed what is selected: {}", files(changes, *more))
            }
            Self::DefinitionChanged { field, old, new } => format!("{field} changed: {old} → {new}"),
            Self::BaseImageChanged { old, new } => format!("base image changed: {} → {}", short(old), short(new)),
            Self::ParentRebuilt {
                root_step,
                root_line,
                root_instruction,
            } => {
                format!("parent rebuilt (cascade from #{root_step}, line {root_line}: {root_instruction})")
            }
            Self::NoCache => "--no-cache".into(),
            Self::Evicted => "its cached result was evicted".into(),
            Self::NeverBuilt => "never built before".into(),
            Self::FailedBefore => "it failed in an earlier build, with these same inputs".into(),
            Self::UpstreamUnavailable { upstream } => {
                format!("not in the local cache, and the shared cache could not be asked: {upstream}")
            }
            Self::Unexplained => {
                "changed, cause unknown: no input of the step differs from its earlier record's".into()
            }
        }
    }

    /// Whether this miss only follows from an earlier one.
    pub fn is_cascade(&self) -> bool {
        matches!(self, Self::ParentRebuilt { .. })
    }
}

fn short(s: &str) -> &str {
    &s[..s.len().min(19)]
}

/// `a b c` vs `a x c` → `a [-b-]{+x+} c`.
pub fn word_diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.split_whitespace().collect();
    let b: Vec<&str> = new.split_whitespace().collect();
    let pre = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let post = a[pre..]
        .iter()
        .rev()
        .zip(b[pre..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let mut out: Vec<String> = a[..pre].iter().map(|s| s.to_string()).collect();
    let removed = &a[pre..a.len() - post];
    let added = &b[pre..b.len() - post];
    if !removed.is_empty() {
        out.push(format!("[-{}-]", removed.join(" ")));
    }
    if !added.is_empty() {
        out.push(format!("{{+{}+}}", added.join(" ")));
    }
    if removed.is_empty() && added.is_empty() {
        out.push("(whitespace only)".into());
    }
    out.extend(a[a.len() - post..].iter().map(|s| s.to_string()));
    out.join(" ")
}

fn env_map(i: &KeyInputs) -> BTreeMap<String, String> {
    i.field("env")
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// Differences between two sources summaries, in user terms, to the file: where two
/// directories' digests differ, their listings are fetched by digest (`nodes`) and compared
/// in turn, so the work follows the change, not the tree. A directory whose listing is not
/// to be had is reported as `contents changed`.
pub fn diff_summaries(
    old: &[SummaryEntry],
    new: &[SummaryEntry],
    nodes: &dyn Fn(&str) -> Option<DirNode>,
) -> Vec<FileChange> {
    let mut d = TreeDiff {
        nodes,
        out: Vec::new(),
        added: Vec::new(),
        removed: Vec::new(),
    };
    d.level(old, new);
    d.finish()
}

/// A diff in progress: changes found so far, and adds and removes kept apart until the end
/// so that a file moved between directories is seen as renamed.
struct TreeDiff<'a> {
    nodes: &'a dyn Fn(&str) -> Option<DirNode>,
    out: Vec<FileChange>,
    added: Vec<SummaryEntry>,
    removed: Vec<SummaryEntry>,
}

impl TreeDiff<'_> {
    /// Compares one level: entries named by their full paths (a stored summary may list
    /// deeper levels too, under directories marked expanded).
    fn level(&mut self, old: &[SummaryEntry], new: &[SummaryEntry]) {
        let o: BTreeMap<&str, &SummaryEntry> = old.iter().map(|e| (e.path.as_str(), e)).collect();
        let n: BTreeMap<&str, &SummaryEntry> = new.iter().map(|e| (e.path.as_str(), e)).collect();
        // An entry whose parent is collapsed (children not listed) on the other side is
        // explained by that parent; don't report it as added or removed.
        let parent_collapsed = |m: &BTreeMap<&str, &SummaryEntry>, p: &str| {
            let parent = p.rsplit_once('/').map_or(".", |(d, _)| d);
            m.get(parent).is_some_and(|e| e.kind == EntryKind::Dir && !e.expanded)
        };
        for (p, e) in &n {
            match o.get(p) {
                None if !parent_collapsed(&o, p) => self.added.push((*e).clone()),
                None => {}
                Some(old) if old.digest != e.digest || old.mode != e.mode || old.kind != e.kind => {
                    self.changed(old, e);
                }
                Some(_) => {}
            }
        }
        for (p, e) in &o {
            if !n.contains_key(p) && !parent_collapsed(&n, p) {
                self.removed.push((*e).clone());
            }
        }
    }

    fn push(&mut self, path: &str, change: ChangeKind) {
        self.out.push(FileChange {
            path: path.to_string(),
            change,
        });
    }

    fn changed(&mut self, old: &SummaryEntry, e: &SummaryEntry) {
        let p = e.path.as_str();
        if old.kind != e.kind {
            let change = ChangeKind::Type {
                old: old.kind,
                new: e.kind,
            };
            return self.push(p, change);
        }
        match e.kind {
            EntryKind::Symlink => {
                let change = ChangeKind::LinkTarget {
                    old: old.digest.clone(),
                    new: e.digest.clone(),
                };
                self.push(p, change);
            }
            EntryKind::File if old.mode != e.mode && (old.digest == e.digest || digest_only_mode(old, e)) => {
                self.push(
                    p,
                    ChangeKind::Mode {
                        old: old.mode,
                        new: e.mode,
                    },
                );
            }
            EntryKind::File => self.push(p, ChangeKind::Modified),
            EntryKind::Dir => {
                if old.mode != e.mode {
                    self.push(
                        p,
                        ChangeKind::Mode {
                            old: old.mode,
                            new: e.mode,
                        },
                    );
                }
                if e.expanded && old.expanded {
                    return; // an old-style summary: its children say what changed
                }
                match ((self.nodes)(&old.digest), (self.nodes)(&e.digest)) {
                    (Some(a), Some(b)) if a != b => self.level(&beneath(p, a), &beneath(p, b)),
                    (Some(_), Some(_)) => {} // the same children: only its mode changed
                    _ if old.mode == e.mode => self.push(p, ChangeKind::ContentsChanged),
                    _ => {}
                }
            }
        }
    }

    fn finish(mut self) -> Vec<FileChange> {
        // A removed and an added file with the same content is a rename.
        let mut renamed_from = BTreeMap::new();
        for a in &self.added {
            if a.kind == EntryKind::File {
                if let Some(pos) = self
                    .removed
                    .iter()
                    .position(|r| r.kind == EntryKind::File && r.digest == a.digest)
                {
                    renamed_from.insert(a.path.clone(), self.removed.remove(pos).path);
                }
            }
        }
        for a in std::mem::take(&mut self.added) {
            let change = match renamed_from.remove(&a.path) {
                Some(from) => ChangeKind::RenamedFrom { from },
                None => ChangeKind::Added,
            };
            self.push(&a.path, change);
        }
        for r in std::mem::take(&mut self.removed) {
            self.push(&r.path, ChangeKind::Removed);
        }
        self.out.sort_by(|a, b| a.path.cmp(&b.path));
        self.out
    }
}

/// A directory listing's entries named by their full paths beneath `dir`.
fn beneath(dir: &str, node: DirNode) -> Vec<SummaryEntry> {
    node.entries
        .into_iter()
        .map(|mut e| {
            if !(dir.is_empty() || dir == ".") {
                e.path = format!("{dir}/{}", e.path);
            }
            e
        })
        .collect()
}

/// A file's node digest covers its mode, so a pure chmod changes the digest too; the
/// summary cannot tell content from mode then, and the mode change is the likelier story.
fn digest_only_mode(old: &SummaryEntry, new: &SummaryEntry) -> bool {
    old.kind == EntryKind::File && old.mode != new.mode
}

/// What a miss is compared against: the nearest earlier record of the same step.
#[derive(Debug, Clone)]
pub struct Previous<'a> {
    /// Its instruction as written.
    pub instruction: &'a str,
    /// Its key inputs.
    pub inputs: &'a KeyInputs,
    /// Its key.
    pub key: &'a str,
    /// It failed there: it has no record, so the same key again is no eviction.
    pub failed: bool,
}

/// What else the comparison needs.
#[derive(Debug, Clone, Default)]
pub struct CauseContext {
    /// `--no-cache` was given.
    pub no_cache: bool,
    /// The step whose miss changed this step's parent, if one did in this build:
    /// (step number, line, instruction).
    pub rebuilt_parent: Option<CascadeRoot>,
    /// Whether this is its stage's first step (its parent is the base image).
    pub first_in_stage: bool,
    /// What changed between the old and new sources ([`diff_summaries`]), when both
    /// summaries are known.
    pub file_changes: Option<Vec<FileChange>>,
    /// Whether .dockerignore differs from the earlier build's.
    pub dockerignore_changed: bool,
}

/// The root cause of a miss: --no-cache; else eviction (same key, record gone); else a
/// rebuilt parent (the step belongs to an earlier step's cascade); else the first that
/// applies of instruction text, variables, files, .dockerignore, other definition fields,
/// base image; else never built.
pub fn miss_cause(
    instruction: &str,
    cur: &KeyInputs,
    key: &str,
    prev: Option<&Previous<'_>>,
    cx: &CauseContext,
) -> MissCause {
    if cx.no_cache {
        return MissCause::NoCache;
    }
    let Some(prev) = prev else {
        // On a first build only the first step is new in itself; the rest follow from it.
        return match &cx.rebuilt_parent {
            Some(root) => root.cause(),
            None => MissCause::NeverBuilt,
        };
    };
    if prev.key == key {
        return match prev.failed {
            true => MissCause::FailedBefore,
            false => MissCause::Evicted,
        };
    }
    // A step whose parent rebuilt in this build belongs to that cascade, whatever else
    // changed in it: every miss has one root, and the earliest change is it.
    if prev.inputs.parent != cur.parent {
        if let Some(root) = &cx.rebuilt_parent {
            return root.cause();
        }
    }
    if prev.instruction != instruction {
        return MissCause::InstructionChanged {
            old: prev.instruction.to_string(),
            new: instruction.to_string(),
        };
    }
    let (old_env, new_env) = (env_map(prev.inputs), env_map(cur));
    let mut vars = Vec::new();
    for k in old_env
        .keys()
        .chain(new_env.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (a, b) = (old_env.get(k), new_env.get(k));
        if a != b {
            vars.push(VarChange {
                name: k.clone(),
                old: a.cloned(),
                new: b.cloned(),
            });
        }
    }
    if !vars.is_empty() {
        return MissCause::VariableChanged { changes: vars };
    }
    if prev.inputs.field("sources_digest") != cur.field("sources_digest") {
        let mut changes = cx.file_changes.clone().unwrap_or_default();
        let more = changes.len().saturating_sub(CHANGES_LISTED);
        changes.truncate(CHANGES_LISTED);
        if changes.is_empty() {
            changes.push(FileChange {
                path: cur.field("sources").map(|s| s.join(" ")).unwrap_or_default(),
                change: ChangeKind::ContentsChanged,
            });
        }
        return if cx.dockerignore_changed {
            MissCause::DockerignoreChanged { changes, more }
        } else {
            MissCause::FilesChanged { changes, more }
        };
    }
    for f in &cur.fields {
        if f.name == "env" || f.name == "sources_digest" {
            continue;
        }
        let old = prev.inputs.field(&f.name).unwrap_or_default();
        if old != f.values.as_slice() {
            return MissCause::DefinitionChanged {
                field: f.name.clone(),
                old: old.join(" "),
                new: f.values.join(" "),
            };
        }
    }
    if prev.inputs.platform != cur.platform {
        return MissCause::DefinitionChanged {
            field: "platform".into(),
            old: prev.inputs.platform.clone(),
            new: cur.platform.clone(),
        };
    }
    if prev.inputs.parent != cur.parent && cx.first_in_stage {
        return MissCause::BaseImageChanged {
            old: prev.inputs.parent.clone(),
            new: cur.parent.clone(),
        };
    }
    MissCause::Unexplained
}

/// The cascade root a step leaves for the steps after it: none after a hit, its own root
/// after a cascade member, itself after a root cause. `this` is (step number, line,
/// instruction).
pub fn root_after(cause: Option<&MissCause>, this: CascadeRoot) -> Option<CascadeRoot> {
    match cause? {
        MissCause::ParentRebuilt {
            root_step,
            root_line,
            root_instruction,
        } => Some(CascadeRoot {
            step: *root_step,
            line: *root_line,
            instruction: root_instruction.clone(),
        }),
        _ => Some(this),
    }
}

/// One root cause and the steps it rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cascade {
    /// Build step number of the root.
    pub root_step: usize,
    /// Its line.
    pub line: usize,
    /// Its instruction.
    pub instruction: String,
    /// Why it missed.
    pub cause: MissCause,
    /// Step numbers rebuilt because of it, the root first.
    pub steps: Vec<usize>,
    /// Time they took, milliseconds.
    pub duration_ms: u64,
}

impl Cascade {
    /// `src/a.txt modified → rebuilt COPY src (line 5) and 2 later steps: 41.2 s`.
    pub fn describe(&self) -> String {
        let later = match self.steps.len().saturating_sub(1) {
            0 => String::new(),
            1 => " and 1 later step".to_string(),
            n => format!(" and {n} later steps"),
        };
        format!(
            "{} → rebuilt {} (line {}){later}: {:.1} s",
            self.cause.describe(),
            self.instruction,
            self.line,
            self.duration_ms as f64 / 1000.0
        )
    }
}

/// Groups misses into cascades: each non-cascade cause is a root; cascades join theirs.
/// `steps` are (step number, line, instruction, cause, duration ms) of the misses.
pub fn cascades(steps: &[(usize, usize, String, MissCause, u64)]) -> Vec<Cascade> {
    let mut out: Vec<Cascade> = Vec::new();
    for (n, line, instruction, cause, ms) in steps {
        if let MissCause::ParentRebuilt { root_step, .. } = cause {
            if let Some(c) = out.iter_mut().find(|c| c.root_step == *root_step) {
                c.steps.push(*n);
                c.duration_ms += ms;
                continue;
            }
        }
        out.push(Cascade {
            root_step: *n,
            line: *line,
            instruction: instruction.clone(),
            cause: cause.clone(),
            steps: vec![*n],
            duration_ms: *ms,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache_key::KeyField;

    fn inputs(env: &[&str], digest: &str, workdir: &str, parent: &str) -> KeyInputs {
        KeyInputs {
            platform: "linux/amd64".into(),
            parent: parent.into(),
            kind: "RUN".into(),
            fields: vec![
                KeyField {
                    name: "env".into(),
                    values: env.iter().map(|s| s.to_string()).collect(),
                },
                KeyField {
                    name: "sources_digest".into(),
                    values: vec![digest.into()],
                },
                KeyField {
                    name: "workdir".into(),
                    values: vec![workdir.into()],
                },
            ],
        }
    }

    fn entry(path: &str, kind: EntryKind, mode: u32, digest: &str, expanded: bool) -> SummaryEntry {
        SummaryEntry {
            path: path.into(),
            kind,
            mode,
            digest: digest.into(),
            expanded,
        }
    }

    #[test]
    fn the_first_applicable_cause_wins() {
        let old = inputs(&["A=1"], "d1", "/a", "p1");
        let prev = Previous {
            instruction: "RUN make",
            inputs: &old,
            key: "k1",
            failed: false,
        };
        let cx = CauseContext::default();
        let c = miss_cause("RUN make all", &old, "k2", Some(&prev), &cx);
        assert_eq!(c.describe(), "instruction changed: RUN make {+all+}");
        let c = miss_cause("RUN make", &inputs(&["A=2"], "d2", "/b", "p2"), "k2", Some(&prev), &cx);
        assert_eq!(c.describe(), "variable changed: A: 1 → 2");
        let c = miss_cause("RUN make", &inputs(&["A=1"], "d1", "/b", "p1"), "k2", Some(&prev), &cx);
        assert_eq!(c.describe(), "workdir changed: /a → /b");
        let cx = CauseContext {
            rebuilt_parent: Some(CascadeRoot {
                step: 2,
                line: 5,
                instruction: "COPY src .".into(),
            }),
            ..CauseContext::default()
        };
        let c = miss_cause("RUN make", &inputs(&["A=1"], "d1", "/a", "p9"), "k2", Some(&prev), &cx);
        assert!(c.is_cascade() && c.describe().contains("#2, line 5"));
        assert_eq!(
            miss_cause("RUN make", &old, "k1", Some(&prev), &CauseContext::default()),
            MissCause::Evicted
        );
        assert_eq!(
            miss_cause("RUN make", &old, "k2", Some(&prev), &CauseContext::default()),
            MissCause::Unexplained,
            "same inputs, another key: said so, not guessed"
        );
        assert_eq!(
            miss_cause("RUN make", &old, "k1", None, &CauseContext::default()),
            MissCause::NeverBuilt
        );
        let failed = Previous { failed: true, ..prev };
        assert_eq!(
            miss_cause("RUN make", &old, "k1", Some(&failed), &CauseContext::default()),
            MissCause::FailedBefore,
            "a step that failed has no record to have been evicted"
        );
        assert_eq!(
            miss_cause("RUN make all", &old, "k2", Some(&failed), &CauseContext::default()).describe(),
            "instruction changed: RUN make {+all+}",
            "a failed step is compared like any other"
        );
    }

    #[test]
    fn summaries_diff_into_modified_added_removed_renamed_and_mode() {
        let old = vec![
            entry("src", EntryKind::Dir, 0o755, "r1", true),
            entry("src/a.txt", EntryKind::File, 0o644, "a", false),
            entry("src/b.txt", EntryKind::File, 0o644, "b", false),
            entry("src/run.sh", EntryKind::File, 0o644, "r", false),
            entry("src/gone", EntryKind::File, 0o644, "g", false),
        ];
        let new = vec![
            entry("src", EntryKind::Dir, 0o755, "r2", true),
            entry("src/a.txt", EntryKind::File, 0o644, "a2", false),
            entry("src/b2.txt", EntryKind::File, 0o644, "b", false),
            entry("src/run.sh", EntryKind::File, 0o755, "r3", false),
            entry("src/new", EntryKind::File, 0o644, "n", false),
        ];
        let d: Vec<String> = diff_summaries(&old, &new, &|_| None)
            .iter()
            .map(|c| format!("{} {}", c.path, c.change))
            .collect();
        assert_eq!(
            d,
            [
                "src/a.txt modified",
                "src/b2.txt renamed from src/b.txt",
                "src/gone removed",
                "src/new added",
                "src/run.sh mode 644 → 755"
            ]
        );
    }

    /// `COPY src` over a generated tree of `dirs` × `files`, with `edit` applied to its entries.
    fn big_tree(
        dirs: usize,
        files: usize,
        edit: &dyn Fn(&mut Vec<crate::source_select::ContextEntry>),
    ) -> crate::sources_digest::SourcesDigest {
        use crate::source_select::{ContextEntry, FileStamp};
        let entry = |path: String, kind: EntryKind| ContextEntry {
            path,
            kind,
            mode: 0o644,
            link_target: None,
            size: 1,
            stamp: FileStamp::default(),
            shared: false,
        };
        let mut entries = vec![entry("src".into(), EntryKind::Dir)];
        for d in 0..dirs {
            entries.push(entry(format!("src/d{d:03}"), EntryKind::Dir));
            for f in 0..files {
                entries.push(entry(format!("src/d{d:03}/f{f:03}"), EntryKind::File));
            }
        }
        edit(&mut entries);
        let roots = crate::source_select::select(
            &entries,
            &["src".to_string()],
            &crate::dockerignore::IgnoreMatcher::default(),
        )
        .unwrap();
        // Content by path (the moved file keeps its own); size 2 marks an edited file.
        crate::sources_digest::sources_digest(&entries, &roots, &|i| {
            let path = entries[i].path.replace("src/d101/moved", "src/d100/f099");
            let mut c = *blake3::hash(path.as_bytes()).as_bytes();
            c[0] ^= entries[i].size as u8;
            c
        })
    }

    #[test]
    fn directory_nodes_take_the_diff_to_the_file_fetching_only_what_differs() {
        let old = big_tree(300, 100, &|_| {});
        let new = big_tree(300, 100, &|e| {
            e.iter_mut().find(|e| e.path == "src/d250/f050").unwrap().size = 2;
            e.retain(|e| e.path != "src/d007/f001");
            let moved = e.iter().position(|e| e.path == "src/d100/f099").unwrap();
            e[moved].path = "src/d101/moved".into();
        });
        let store: std::collections::HashMap<String, DirNode> = old.nodes.into_iter().chain(new.nodes).collect();
        let fetched = std::cell::Cell::new(0);
        let nodes = |d: &str| {
            fetched.set(fetched.get() + 1);
            store.get(d).cloned()
        };
        let d: Vec<String> = diff_summaries(&old.summary, &new.summary, &nodes)
            .iter()
            .map(|c| format!("{} {}", c.path, c.change))
            .collect();
        assert_eq!(
            d,
            [
                "src/d007/f001 removed",
                "src/d101/moved renamed from src/d100/f099",
                "src/d250/f050 modified"
            ]
        );
        assert_eq!(fetched.get(), 2 + 2 * 4, "src, then the four directories that changed");
        let unknown = diff_summaries(&old.summary, &new.summary, &|_| None);
        assert_eq!(
            (unknown[0].path.as_str(), &unknown[0].change),
            ("src", &ChangeKind::ContentsChanged),
            "no listings: the nearest directory"
        );
    }

    #[test]
    fn type_and_link_changes_are_typed() {
        let old = vec![
            entry("a", EntryKind::File, 0o644, "x", false),
            entry("l", EntryKind::Symlink, 0o777, "t1", false),
        ];
        let new = vec![
            entry("a", EntryKind::Dir, 0o755, "y", false),
            entry("l", EntryKind::Symlink, 0o777, "t2", false),
        ];
        let d = diff_summaries(&old, &new, &|_| None);
        assert_eq!(
            d[0].change,
            ChangeKind::Type {
                old: EntryKind::File,
                new: EntryKind::Dir
            }
        );
        assert_eq!(d[0].change.to_string(), "file → dir");
        assert_eq!(
            d[1].change,
            ChangeKind::LinkTarget {
                old: "t1".into(),
                new: "t2".into()
            }
        );
        let json = serde_json::to_string(&d[1]).unwrap();
        assert_eq!(json, r#"{"path":"l","change":{"link_target":{"old":"t1","new":"t2"}}}"#);
        assert_eq!(
            serde_json::to_string(&FileChange {
                path: "f".into(),
                change: ChangeKind::Modified
            })
            .unwrap(),
            r#"{"path":"f","change":"modified"}"#,
            "unit changes keep the JSON they always had"
        );
    }

    #[test]
    fn cascades_group_under_their_root_with_time() {
        let root = MissCause::FilesChanged {
            changes: vec![FileChange {
                path: "src/a.txt".into(),
                change: ChangeKind::Modified,
            }],
            more: 0,
        };
        let child = MissCause::ParentRebuilt {
            root_step: 2,
            root_line: 5,
            root_instruction: "COPY src .".into(),
        };
        let c = cascades(&[
            (2, 5, "COPY src .".into(), root, 200),
            (3, 6, "RUN make".into(), child.clone(), 41_000),
            (4, 7, "RUN test".into(), child, 0),
        ]);
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0].describe(),
            "files changed: src/a.txt modified → rebuilt COPY src . (line 5) and 2 later steps: 41.2 s"
        );
    }

    #[test]
    fn word_diff_marks_removed_and_added_words() {
        assert_eq!(word_diff("RUN make a", "RUN make b"), "RUN make [-a-] {+b+}");
        assert_eq!(word_diff("RUN a  b", "RUN a b"), "RUN a b (whitespace only)");
    }
}
