//! Build records as format 1 stored them, when a file change was a string
//! (`modified`, `mode 644 → 755`…): read, and turned into today's types. Every field is
//! declared in the order format 1 wrote it, since bincode records no names.

use lcache_proto::cache_key::KeyInputs;
use lcache_proto::explain::{self, ChangeKind, VarChange};
use lcache_proto::source_select::EntryKind;
use lcache_proto::wire;
use serde::Deserialize;

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct BuildRecord {
    id: String,
    started_at_ms: u64,
    finished_at_ms: u64,
    dockerfile: String,
    context: String,
    target: Option<String>,
    steps: Vec<BuildStep>,
    dockerfile_path: String,
    dockerignore: String,
    cascades: Vec<Cascade>,
    image: String,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct BuildStep {
    stage: usize,
    line: usize,
    instruction: String,
    key: String,
    cached: bool,
    duration_ms: u64,
    saved_ms: u64,
    cause: Option<MissCause>,
    inputs: Option<KeyInputs>,
    compared_with: Option<String>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct Cascade {
    root_step: usize,
    line: usize,
    instruction: String,
    cause: MissCause,
    steps: Vec<usize>,
    duration_ms: u64,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct FileChange {
    path: String,
    change: String,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
enum MissCause {
    InstructionChanged {
        old: String,
        new: String,
    },
    VariableChanged {
        changes: Vec<VarChange>,
    },
    FilesChanged {
        changes: Vec<FileChange>,
        more: usize,
    },
    DockerignoreChanged {
        changes: Vec<FileChange>,
        more: usize,
    },
    DefinitionChanged {
        field: String,
        old: String,
        new: String,
    },
    BaseImageChanged {
        old: String,
        new: String,
    },
    ParentRebuilt {
        root_step: usize,
        root_line: usize,
        root_instruction: String,
    },
    NoCache,
    Evicted,
    NeverBuilt,
    Unexplained,
}

/// A format-1 change string as a typed change; the strings were only ever these forms.
fn change_kind(s: &str) -> ChangeKind {
    let kind = |k: &str| match k {
        "file" => Some(EntryKind::File),
        "dir" => Some(EntryKind::Dir),
        "symlink" => Some(EntryKind::Symlink),
        _ => None,
    };
    match s {
        "added" => return ChangeKind::Added,
        "removed" => return ChangeKind::Removed,
        "modified" => return ChangeKind::Modified,
        "contents changed" => return ChangeKind::ContentsChanged,
        _ => {}
    }
    if let Some(from) = s.strip_prefix("renamed from ") {
        return ChangeKind::RenamedFrom { from: from.into() };
    }
    if let Some((old, new)) = s.strip_prefix("symlink target ").and_then(|t| t.split_once(" → ")) {
        return ChangeKind::LinkTarget {
            old: old.into(),
            new: new.into(),
        };
    }
    if let Some((old, new)) = s.strip_prefix("mode ").and_then(|t| t.split_once(" → ")) {
        if let (Ok(old), Ok(new)) = (u32::from_str_radix(old, 8), u32::from_str_radix(new, 8)) {
            return ChangeKind::Mode { old, new };
        }
    }
    if let Some((Some(old), Some(new))) = s.split_once(" → ").map(|(o, n)| (kind(o), kind(n))) {
        return ChangeKind::Type { old, new };
    }
    ChangeKind::ContentsChanged
}

fn changes(v: Vec<FileChange>) -> Vec<explain::FileChange> {
    v.into_iter()
        .map(|c| explain::FileChange {
            change: change_kind(&c.change),
            path: c.path,
        })
        .collect()
}

impl From<MissCause> for explain::MissCause {
    fn from(c: MissCause) -> Self {
        use explain::MissCause as M;
        match c {
            MissCause::InstructionChanged { old, new } => M::InstructionChanged { old, new },
            MissCause::VariableChanged { changes } => M::VariableChanged { changes },
            MissCause::FilesChanged { changes: c, more } => M::FilesChanged {
                changes: changes(c),
                more,
            },
            MissCause::DockerignoreChanged { changes: c, more } => M::DockerignoreChanged {
                changes: changes(c),
                more,
            },
            MissCause::DefinitionChanged { field, old, new } => M::DefinitionChanged { field, old, new },
            MissCause::BaseImageChanged { old, new } => M::BaseImageChanged { old, new },
            MissCause::ParentRebuilt {
                root_step,
                root_line,
                root_instruction,
            } => M::ParentRebuilt {
                root_step,
                root_line,
                root_instruction,
            },
            MissCause::NoCache => M::NoCache,
            MissCause::Evicted => M::Evicted,
            MissCause::NeverBuilt => M::NeverBuilt,
            MissCause::Unexplained => M::Unexplained,
        }
    }
}

impl From<BuildRecord> for wire::BuildRecord {
    fn from(b: BuildRecord) -> Self {
        Self {
            id: b.id,
            started_at_ms: b.started_at_ms,
            finished_at_ms: b.finished_at_ms,
            dockerfile: b.dockerfile,
            context: b.context,
            target: b.target,
            steps: b
                .steps
                .into_iter()
                .map(|s| wire::BuildStep {
                    stage: s.stage,
                    line: s.line,
                    instruction: s.instruction,
                    key: s.key,
                    cached: s.cached,
                    duration_ms: s.duration_ms,
                    saved_ms: s.saved_ms,
                    cause: s.cause.map(Into::into),
                    inputs: s.inputs,
                    compared_with: s.compared_with,
                })
                .collect(),
            dockerfile_path: b.dockerfile_path,
            dockerignore: b.dockerignore,
            cascades: b
                .cascades
                .into_iter()
                .map(|c| explain::Cascade {
                    root_step: c.root_step,
                    line: c.line,
                    instruction: c.instruction,
                    cause: c.cause.into(),
                    steps: c.steps,
                    duration_ms: c.duration_ms,
                })
                .collect(),
            image: b.image,
            failure: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, FORMAT_V1};

    fn v1_bytes(b: &BuildRecord) -> Vec<u8> {
        let mut out = vec![FORMAT_V1];
        out.extend(bincode::serde::encode_to_vec(b, bincode::config::standard()).unwrap());
        out
    }

    #[test]
    fn format_1_build_records_read_with_typed_changes() {
        let strings = [
            "modified",
            "added",
            "removed",
            "contents changed",
            "renamed from src/old.txt",
            "mode 644 → 755",
            "symlink target a → b",
            "file → dir",
        ];
        let cause = || MissCause::FilesChanged {
            changes: strings
                .iter()
                .map(|c| FileChange {
                    path: "p".into(),
                    change: c.to_string(),
                })
                .collect(),
            more: 2,
        };
        let old = BuildRecord {
            id: "b1".into(),
            started_at_ms: 1,
            finished_at_ms: 2,
            dockerfile: "Dockerfile".into(),
            context: "/ctx".into(),
            target: None,
            steps: vec![BuildStep {
                stage: 0,
                line: 3,
                instruction: "COPY . .".into(),
                key: "k".into(),
                cached: false,
                duration_ms: 5,
                saved_ms: 0,
                cause: Some(cause()),
                inputs: None,
                compared_with: Some("k0".into()),
            }],
            dockerfile_path: "/ctx/Dockerfile".into(),
            dockerignore: String::new(),
            cascades: vec![Cascade {
                root_step: 1,
                line: 3,
                instruction: "COPY . .".into(),
                cause: cause(),
                steps: vec![1],
                duration_ms: 5,
            }],
            image: "sha256:i".into(),
        };
        let read: wire::BuildRecord = decode(&v1_bytes(&old)).unwrap();
        assert_eq!(read.id, "b1");
        assert_eq!(read.steps[0].compared_with.as_deref(), Some("k0"));
        let Some(explain::MissCause::FilesChanged { changes, more }) = &read.steps[0].cause else {
            panic!("cause: {:?}", read.steps[0].cause);
        };
        assert_eq!(*more, 2);
        let kinds: Vec<ChangeKind> = changes.iter().map(|c| c.change.clone()).collect();
        assert_eq!(
            kinds,
            [
                ChangeKind::Modified,
                ChangeKind::Added,
                ChangeKind::Removed,
                ChangeKind::ContentsChanged,
                ChangeKind::RenamedFrom {
                    from: "src/old.txt".into()
                },
                ChangeKind::Mode { old: 0o644, new: 0o755 },
                ChangeKind::LinkTarget {
                    old: "a".into(),
                    new: "b".into()
                },
                ChangeKind::Type {
                    old: EntryKind::File,
                    new: EntryKind::Dir
                },
            ]
        );
        // Each reads back as the words format 1 stored.
        let words: Vec<String> = changes.iter().map(|c| c.change.to_string()).collect();
        assert_eq!(words, strings);
        assert_eq!(read.cascades[0].cause, read.steps[0].cause.clone().unwrap());
        // Written again, it is format 2 and reads back the same.
        assert_eq!(decode::<wire::BuildRecord>(&crate::codec::encode(&read)).unwrap(), read);
    }
}
