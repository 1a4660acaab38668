//! What changed in a COPY's sources between two builds, from lcached's directory listings
//! (kept by node digest, so two sources digests diff only where they differ): a re-run
//! COPY of one directory then reads and places just those entries instead of walking,
//! hashing and checking the whole tree.

use std::cmp::Ordering;

use lcache_proto::source_select::EntryKind;
use lcache_proto::sources_digest::{DirNode, SummaryEntry};

use crate::build_control::BuildControl;

/// One entry that differs, by its path beneath the copied directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceChange {
    /// `entry` is new here or differs (its `path` is beneath the copied directory); a
    /// directory comes before what it holds.
    Put(SummaryEntry),
    /// Nothing is at this path any more (each entry beneath a removed directory is listed too).
    Gone(String),
}

/// The changes between two selections of the same single directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceChanges {
    /// The copied directory, relative to the context (`.` for the context itself).
    pub root: String,
    /// What differs, in the order to apply it.
    pub changes: Vec<SourceChange>,
}

impl SourceChanges {
    /// The path in the context of the entry at `rel` beneath the root.
    pub fn context_path(&self, rel: &str) -> String {
        if self.root == "." {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.root)
        }
    }
}

/// The changes from the sources digest `old` to `new`, when both select one and the same
/// directory and lcached still has every listing on the way; `None` (the caller copies as
/// if it knew nothing) otherwise, or past `limit` changes.
pub fn source_changes(control: &dyn BuildControl, old: &str, new: &str, limit: usize) -> Option<SourceChanges> {
    let (old_roots, new_roots) = (control.summary(old).ok()??, control.summary(new).ok()??);
    let ([o], [n]) = (&old_roots[..], &new_roots[..]) else {
        return None;
    };
    let dir = |e: &SummaryEntry| e.kind == EntryKind::Dir && !e.expanded;
    if o.path != n.path || !dir(o) || !dir(n) {
        return None;
    }
    let mut d = Diff {
        control,
        changes: Vec::new(),
        limit,
    };
    // The root's own mode is not copied (the destination's directories are made by the
    // COPY), so only its children matter.
    if o.digest != n.digest {
        d.dirs("", &o.digest, &n.digest)?;
    }
    Some(SourceChanges {
        root: n.path.clone(),
        changes: d.changes,
    })
}

struct Diff<'a> {
    control: &'a dyn BuildControl,
    changes: Vec<SourceChange>,
    limit: usize,
}

/// Whether a listed name is one path component (what lcached lists is trusted, but a name
/// that climbs or nests would make the paths read and placed other than listed).
fn plain(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

fn beneath(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

impl Diff<'_> {
    fn node(&self, digest: &str) -> Option<DirNode> {
        self.control
            .dir_node(digest)
            .ok()?
            .filter(|n| n.entries.iter().all(|e| plain(&e.path)))
    }

    fn push(&mut self, change: SourceChange) -> Option<()> {
        self.changes.push(change);
        (self.changes.len() <= self.limit).then_some(())
    }

    /// Compares two listings of the directory at `prefix`, by name (both are sorted).
    fn dirs(&mut self, prefix: &str, old: &str, new: &str) -> Option<()> {
        let (a, b) = (self.node(old)?, self.node(new)?);
        let (mut i, mut j) = (0, 0);
        while i < a.entries.len() || j < b.entries.len() {
            let order = match (a.entries.get(i), b.entries.get(j)) {
                (Some(x), Some(y)) => x.path.cmp(&y.path),
                (Some(_), None) => Ordering::Less,
                _ => Ordering::Greater,
            };
            match order {
                Ordering::Less => {
                    self.gone(prefix, &a.entries[i])?;
                    i += 1;
                }
                Ordering::Greater => {
                    self.put(prefix, &b.entries[j])?;
                    j += 1;
                }
                Ordering::Equal => {
                    let (x, y) = (&a.entries[i], &b.entries[j]);
                    if x.kind == y.kind && x.kind == EntryKind::Dir {
                        if x.digest != y.digest {
                            // The node digest covers the mode: the listing may be the same.
                            if x.mode != y.mode {
                                self.push(SourceChange::Put(SummaryEntry {
                                    path: beneath(prefix, &y.path),
                                    ..y.clone()
                                }))?;
                            }
                            self.dirs(&beneath(prefix, &y.path), &x.digest, &y.digest)?;
                        }
                    } else if x.kind == y.kind && x.kind == EntryKind::File {
                        if x.digest != y.digest || x.mode != y.mode {
                            self.push(SourceChange::Put(SummaryEntry {
                                path: beneath(prefix, &y.path),
                                ..y.clone()
                            }))?;
                        }
                    } else if x.kind != y.kind || x.digest != y.digest {
                        if x.kind != y.kind {
                            self.gone(prefix, x)?;
                        }
                        self.put(prefix, y)?;
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        Some(())
    }

    /// `entry` (named beneath `prefix`) and, for a directory, all it holds are new.
    fn put(&mut self, prefix: &str, entry: &SummaryEntry) -> Option<()> {
        let path = beneath(prefix, &entry.path);
        self.push(SourceChange::Put(SummaryEntry {
            path: path.clone(),
            ..entry.clone()
        }))?;
        if entry.kind == EntryKind::Dir {
            for child in self.node(&entry.digest)?.entries {
                self.put(&path, &child)?;
            }
        }
        Some(())
    }

    /// `entry` (named beneath `prefix`) and, for a directory, all it held are gone.
    fn gone(&mut self, prefix: &str, entry: &SummaryEntry) -> Option<()> {
        let path = beneath(prefix, &entry.path);
        if entry.kind == EntryKind::Dir {
            for child in self.node(&entry.digest)?.entries {
                self.gone(&path, &child)?;
            }
        }
        self.push(SourceChange::Gone(path))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use lcache_proto::source_select::{ContextEntry, FileStamp, SelectedRoot};
    use lcache_proto::sources_digest::sources_digest;
    use lcache_proto::wire::{BuildRecord, ImageRecord, PlanInputs, PlanResponse};

    use super::*;
    use crate::errors::CacheError;

    /// Summaries and listings of digests made here, as lcached keeps them.
    #[derive(Default)]
    struct Listings {
        summaries: Mutex<HashMap<String, Vec<SummaryEntry>>>,
        nodes: Mutex<HashMap<String, DirNode>>,
    }

    impl Listings {
        /// Digests `files` (path, content or `None` for a directory, `Some("->t")` a
        /// symlink to t) selected as the directory `src`; returns the digest.
        fn digest(&self, files: &[(&str, Option<&str>)]) -> String {
            let mut entries: Vec<ContextEntry> = files
                .iter()
                .map(|(p, c)| {
                    let (kind, link_target) = match c {
                        None => (EntryKind::Dir, None),
                        Some(t) if t.starts_with("->") => (EntryKind::Symlink, Some(t[2..].to_string())),
                        Some(_) => (EntryKind::File, None),
                    };
                    ContextEntry {
                        path: p.to_string(),
                        kind,
                        mode: if *p == "src/x.sh" { 0o755 } else { 0o644 },
                        link_target,
                        size: 0,
                        stamp: FileStamp::default(),
                        shared: false,
                    }
                })
                .collect();
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            let root = entries.iter().position(|e| e.path == "src");
            let members = entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.path.starts_with("src/"))
                .map(|(i, _)| i)
                .collect();
            let roots = [SelectedRoot {
                path: "src".into(),
                entry: root,
                members,
            }];
            let contents: Vec<[u8; 32]> = files
                .iter()
                .map(|(_, c)| *blake3::hash(c.unwrap_or_default().as_bytes()).as_bytes())
                .collect();
            let by_path: HashMap<&str, [u8; 32]> = files.iter().map(|(p, _)| *p).zip(contents).collect();
            let content = |i: usize| by_path[entries[i].path.as_str()];
            let d = sources_digest(&entries, &roots, &content);
            self.summaries.lock().unwrap().insert(d.digest.clone(), d.summary);
            self.nodes.lock().unwrap().extend(d.nodes);
            d.digest
        }
    }

    impl BuildControl for Listings {
        fn plan(&self, _: &PlanInputs) -> Result<PlanResponse, CacheError> {
            unimplemented!()
        }
        fn image(&self, _: &str) -> Result<Option<ImageRecord>, CacheError> {
            unimplemented!()
        }
        fn put_image(&self, _: &ImageRecord) -> Result<ImageRecord, CacheError> {
            unimplemented!()
        }
        fn builds(&self, _: usize) -> Result<Vec<BuildRecord>, CacheError> {
            unimplemented!()
        }
        fn summary(&self, digest: &str) -> Result<Option<Vec<SummaryEntry>>, CacheError> {
            Ok(self.summaries.lock().unwrap().get(digest).cloned())
        }
        fn dir_node(&self, digest: &str) -> Result<Option<DirNode>, CacheError> {
            Ok(self.nodes.lock().unwrap().get(digest).cloned())
        }
        fn post_build(&self, _: &BuildRecord) -> Result<BuildRecord, CacheError> {
            unimplemented!()
        }
    }

    fn show(c: &SourceChanges) -> Vec<String> {
        c.changes
            .iter()
            .map(|c| match c {
                SourceChange::Put(e) => format!("put {} {}", e.path, e.kind.name()),
                SourceChange::Gone(p) => format!("gone {p}"),
            })
            .collect()
    }

    #[test]
    fn lists_each_changed_entry_with_directories_before_their_contents() {
        let l = Listings::default();
        let old = l.digest(&[
            ("src", None),
            ("src/a", Some("a")),
            ("src/d", None),
            ("src/d/keep", Some("k")),
            ("src/d/edit", Some("1")),
            ("src/old", None),
            ("src/old/x", Some("x")),
            ("src/t", Some("file then dir")),
            ("src/l", Some("->a")),
        ]);
        let new = l.digest(&[
            ("src", None),
            ("src/a", Some("a")),
            ("src/d", None),
            ("src/d/keep", Some("k")),
            ("src/d/edit", Some("2")),
            ("src/n", None),
            ("src/n/y", Some("y")),
            ("src/t", None),
            ("src/t/z", Some("z")),
            ("src/l", Some("->d")),
        ]);
        let c = source_changes(&l, &old, &new, 100).unwrap();
        assert_eq!(c.root, "src");
        assert_eq!(c.context_path("d/edit"), "src/d/edit");
        assert_eq!(
            show(&c),
            [
                "put d/edit file",
                "put l symlink",
                "put n dir",
                "put n/y file",
                "gone old/x",
                "gone old",
                "gone t",
                "put t dir",
                "put t/z file",
            ]
        );
        assert!(source_changes(&l, &old, &old, 100).unwrap().changes.is_empty());
        assert!(source_changes(&l, &old, &new, 3).is_none(), "past the limit");
        assert!(source_changes(&l, &old, "unknown", 100).is_none());

        // A listing whose names climb or nest is not followed: the COPY is built the whole way.
        for bad in ["..", "a/../../x", ""] {
            let hostile = l.digest(&[("src", None), ("src/a", Some("a")), ("src/z", Some("new"))]);
            let mut nodes = l.nodes.lock().unwrap();
            let root = l.summaries.lock().unwrap()[&hostile][0].digest.clone();
            let node = nodes.get_mut(&root).unwrap();
            node.entries.last_mut().unwrap().path = bad.to_string();
            drop(nodes);
            assert!(source_changes(&l, &old, &hostile, 100).is_none(), "{bad:?}");
        }
    }
}
