//! The Merkle digest of what a COPY/ADD selects: per entry its path, type, permission bits,
//! symlink target and content BLAKE3 — never mtime or owner. Each directory's node digest
//! covers its children, so two trees can be compared subtree by subtree: every directory's
//! listing is kept by its node digest ([`DirNode`], once per distinct content, as git keeps
//! trees), so `explain` descends only where two digests differ, down to the file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::key_encoding::{hex, Encoder};
use crate::source_select::{ContextEntry, EntryKind, SelectedRoot};

/// One selected entry as it enters a key, for display and later comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInput {
    /// Path relative to the context.
    pub path: String,
    /// Type.
    pub kind: EntryKind,
    /// Permission bits in octal.
    pub mode: String,
    /// Content BLAKE3 (files), symlink target (symlinks), empty (directories).
    pub digest: String,
}

/// One entry of a sources summary (a selected root) or of a directory's listing: what
/// `explain` compares without the old tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryEntry {
    /// Path relative to the context (`src/a.txt`), or the matched root itself.
    pub path: String,
    /// Type.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Node digest (hex) for files and directories, the target for symlinks.
    pub digest: String,
    /// For directories: whether all its children are in the summary too (summaries stored
    /// before directory nodes were kept listed the tree's top breadth first; now a summary
    /// lists the roots and a directory's children are in its [`DirNode`]).
    pub expanded: bool,
}

/// One directory's listing, stored under its node digest: its children by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirNode {
    /// The children, sorted by name; `path` is the child's name.
    pub entries: Vec<SummaryEntry>,
}

/// The digest of a COPY's selected sources and the entries it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourcesDigest {
    /// The Merkle root, hex.
    pub digest: String,
    /// The entries that went in, in order (a source may keep only the first few).
    pub files: Vec<FileInput>,
    /// How many entries went in.
    pub total: usize,
    /// The selected roots as Merkle nodes.
    pub summary: Vec<SummaryEntry>,
    /// Every directory node beneath them, by node digest (hex), each once (not those of
    /// subtrees whose digest was known).
    pub nodes: Vec<(String, DirNode)>,
    /// Each selected directory's node digest, by its path in the context: what a later
    /// digest of the same selection may reuse while nothing beneath it changes.
    #[serde(skip)]
    pub subtrees: Vec<(String, [u8; 32])>,
}

enum Node {
    File {
        mode: u32,
        content: [u8; 32],
    },
    Symlink {
        target: String,
    },
    Dir {
        mode: u32,
        children: BTreeMap<String, Node>,
    },
    /// A directory whose node digest is known (its subtree unchanged since it was taken).
    Known {
        mode: u32,
        digest: [u8; 32],
    },
}

impl Node {
    /// The node's digest and its entry under `name` (`path` in the context); every
    /// directory's listing goes to `nodes` (each distinct one once), its digest to `subtrees`.
    fn digest(&self, name: &str, path: &str, out: &mut Collected) -> ([u8; 32], SummaryEntry) {
        if let Node::Known { mode, digest } = self {
            out.subtrees.push((path.to_string(), *digest));
            let entry = SummaryEntry {
                path: name.to_string(),
                kind: EntryKind::Dir,
                mode: *mode,
                digest: hex(digest),
                expanded: false,
            };
            return (*digest, entry);
        }
        let mut e = Encoder::new();
        let mut listing = Vec::new();
        let (kind, mode) = match self {
            Node::File { mode, content } => {
                file_node(&mut e, *mode, content);
                (EntryKind::File, *mode)
            }
            Node::Symlink { target } => {
                e.str("symlink").str(target);
                (EntryKind::Symlink, 0o777)
            }
            Node::Dir { mode, children } => {
                e.str("dir").u32(*mode).u32(children.len() as u32);
                for (child_name, child) in children {
                    let child_path = if path.is_empty() {
                        child_name.clone()
                    } else {
                        format!("{path}/{child_name}")
                    };
                    let (d, entry) = child.digest(child_name, &child_path, out);
                    e.str(child_name).digest(&d);
                    listing.push(entry);
                }
                (EntryKind::Dir, *mode)
            }
            Node::Known { .. } => unreachable!("answered above"),
        };
        let d = e.finish();
        let digest = match self {
            Node::Symlink { target } => target.clone(),
            _ => hex(&d),
        };
        if kind == EntryKind::Dir {
            out.subtrees.push((path.to_string(), d));
            out.nodes.entry(digest.clone()).or_insert(DirNode { entries: listing });
        }
        let entry = SummaryEntry {
            path: name.to_string(),
            kind,
            mode,
            digest,
            expanded: false,
        };
        (d, entry)
    }
}

fn file_node(e: &mut Encoder, mode: u32, content: &[u8; 32]) {
    e.str("file").u32(mode).digest(content);
}

/// A file's node digest (hex), as its directory's listing names it: what a COPY that
/// copies only changed files checks each one against.
pub fn file_node_digest(mode: u32, content: &[u8; 32]) -> String {
    let mut e = Encoder::new();
    file_node(&mut e, mode, content);
    hex(&e.finish())
}

/// What digesting a tree collects besides the digest.
#[derive(Default)]
struct Collected {
    nodes: BTreeMap<String, DirNode>,
    subtrees: Vec<(String, [u8; 32])>,
}

/// Node for one entry; `content` gives a file's BLAKE3 by entry index.
fn leaf(entry: &ContextEntry, index: usize, content: &dyn Fn(usize) -> [u8; 32]) -> Node {
    match entry.kind {
        EntryKind::File => Node::File {
            mode: entry.mode,
            content: content(index),
        },
        EntryKind::Symlink => Node::Symlink {
            target: entry.link_target.clone().unwrap_or_default(),
        },
        EntryKind::Dir => Node::Dir {
            mode: entry.mode,
            children: BTreeMap::new(),
        },
    }
}

fn insert(dir: &mut BTreeMap<String, Node>, rel: &str, node: Node) {
    match rel.split_once('/') {
        None => match (dir.get_mut(rel), node) {
            // The directory may already exist, made implicitly by a deeper entry.
            (Some(Node::Dir { mode, .. }), Node::Dir { mode: m, .. }) => *mode = m,
            (_, node) => {
                dir.insert(rel.to_string(), node);
            }
        },
        Some((head, rest)) => {
            let child = dir.entry(head.to_string()).or_insert(Node::Dir {
                mode: 0,
                children: BTreeMap::new(),
            });
            if let Node::Dir { children, .. } = child {
                insert(children, rest, node);
            }
        }
    }
}

/// Digests the selected `roots` over `entries`; `content(i)` is entry `i`'s content BLAKE3.
pub fn sources_digest(
    entries: &[ContextEntry],
    roots: &[SelectedRoot],
    content: &dyn Fn(usize) -> [u8; 32],
) -> SourcesDigest {
    sources_digest_listing(entries, roots, content, usize::MAX)
}

/// [`sources_digest`], describing only the first `listed` entries in `files` (`total` still
/// counts them all): describing 50,000 files to keep ten is most of a touched tree's digest.
pub fn sources_digest_listing(
    entries: &[ContextEntry],
    roots: &[SelectedRoot],
    content: &dyn Fn(usize) -> [u8; 32],
    listed: usize,
) -> SourcesDigest {
    sources_digest_reusing(entries, roots, content, listed, &|_| None)
}

/// How many of `items` from the front satisfy `pred`, which holds for a run at the front
/// and then never: searched outwards from the front, so a short run costs a few nearby
/// reads, not a binary search over the whole slice (a reused directory's files are a
/// short run in a long selection).
fn leading_run<T>(items: &[T], pred: impl Fn(&T) -> bool) -> usize {
    let mut end = 1;
    while end <= items.len() && pred(&items[end - 1]) {
        end *= 2;
    }
    let lo = end / 2;
    let hi = end.min(items.len() + 1) - 1;
    lo + items[lo..hi].partition_point(&pred)
}

/// [`sources_digest_listing`], taking the node digest of a selected directory from
/// `known(its path in the context)` when it has one (a directory whose subtree is unchanged
/// since an earlier digest of the same selection gave it, see `SourcesDigest::subtrees`)
/// instead of building its subtree, once `listed` files are described.
pub fn sources_digest_reusing(
    entries: &[ContextEntry],
    roots: &[SelectedRoot],
    content: &dyn Fn(usize) -> [u8; 32],
    listed: usize,
    known: &dyn Fn(&str) -> Option<[u8; 32]>,
) -> SourcesDigest {
    let mut e = Encoder::new();
    let mut total = 0;
    e.str("lcache-sources").u32(1).u32(roots.len() as u32);
    let mut files = Vec::new();
    let mut summary = Vec::new();
    let mut out = Collected::default();
    // Entries beneath a reused directory: counted, not visited.
    let mut skipped = 0;
    let mut describe = |i: usize| {
        total += 1;
        if files.len() >= listed {
            return false;
        }
        let en = &entries[i];
        files.push(FileInput {
            path: en.path.clone(),
            kind: en.kind,
            mode: format!("{:o}", en.mode),
            digest: match en.kind {
                EntryKind::File => hex(&content(i)),
                EntryKind::Symlink => en.link_target.clone().unwrap_or_default(),
                EntryKind::Dir => String::new(),
            },
        });
        true
    };
    // A directory whose digest is known stands for its whole subtree.
    let reused = |i: usize| {
        let en = &entries[i];
        (en.kind == EntryKind::Dir)
            .then(|| known(&en.path))
            .flatten()
            .map(|digest| Node::Known { mode: en.mode, digest })
    };
    for root in roots {
        let root_path = root.entry.map_or("", |i| entries[i].path.as_str());
        let mut node = match root.entry {
            Some(i) => {
                let described = describe(i);
                match reused(i).filter(|_| !described && !root.members.is_empty()) {
                    Some(k) => {
                        skipped += root.members.len();
                        k
                    }
                    None => leaf(&entries[i], i, content),
                }
            }
            None => Node::Dir {
                mode: 0,
                children: BTreeMap::new(),
            },
        };
        if let Node::Dir { children, .. } = &mut node {
            let members = &root.members;
            let from = root.entry.map_or(0, |i| entries[i].path.len() + 1);
            let mut m = 0;
            while let Some(&i) = members.get(m) {
                m += 1;
                let rel = &entries[i].path[from..];
                let described = describe(i);
                match reused(i).filter(|_| !described) {
                    Some(k) => {
                        // What lies beneath follows at once (paths under `d/` are
                        // contiguous): skipped in one search, not visited. A straggler
                        // sorted after a sibling (`d/x` after `d-x`) is counted, and
                        // inserting it beneath the known node does nothing.
                        let beneath = format!("{}/", entries[i].path);
                        let n = leading_run(&members[m..], |&j| entries[j].path.starts_with(&beneath));
                        skipped += n;
                        m += n;
                        insert(children, rel, k);
                    }
                    None => insert(children, rel, leaf(&entries[i], i, content)),
                }
            }
        }
        let (d, entry) = node.digest(&root.path, root_path, &mut out);
        e.str(&root.path).digest(&d);
        summary.push(entry);
    }
    SourcesDigest {
        digest: hex(&e.finish()),
        total: total + skipped,
        files,
        summary,
        nodes: out.nodes.into_iter().collect(),
        subtrees: out.subtrees,
    }
}

/// The sources digest of a RUN's bind mounts: the one mount's own digest (so explain can
/// diff its files as a COPY's), or all of them, with their targets, when there are several.
pub fn binds_digest(binds: &[(&str, &str)]) -> String {
    match binds {
        [(_, one)] => one.to_string(),
        many => {
            let mut e = Encoder::new();
            e.str("binds");
            for (target, digest) in many {
                e.str(target).str(digest);
            }
            hex(&e.finish())
        }
    }
}

/// Digest of heredoc files a COPY makes, by name and content.
pub fn inline_digest(name: &str, content: &str) -> String {
    hex(&Encoder::new().str("inline").str(name).str(content).finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerignore::IgnoreMatcher;
    use crate::source_select::{select, FileStamp};

    fn file(path: &str, mode: u32) -> ContextEntry {
        ContextEntry {
            path: path.into(),
            kind: EntryKind::File,
            mode,
            link_target: None,
            size: 1,
            stamp: FileStamp::default(),
            shared: false,
        }
    }

    fn dir(path: &str) -> ContextEntry {
        ContextEntry {
            kind: EntryKind::Dir,
            ..file(path, 0o755)
        }
    }

    fn link(path: &str, target: &str) -> ContextEntry {
        ContextEntry {
            kind: EntryKind::Symlink,
            link_target: Some(target.into()),
            ..file(path, 0o777)
        }
    }

    /// The digest of `COPY src` over `entries`, each file's content given by its path.
    fn digest_of(entries: &[ContextEntry], content: &dyn Fn(&str) -> u8) -> SourcesDigest {
        let roots = select(entries, &["src".to_string()], &IgnoreMatcher::default()).unwrap();
        sources_digest(entries, &roots, &|i| [content(&entries[i].path); 32])
    }

    fn tree() -> Vec<ContextEntry> {
        vec![
            dir("src"),
            file("src/a", 0o644),
            dir("src/d"),
            file("src/d/b", 0o644),
            link("src/l", "a"),
        ]
    }

    #[test]
    fn a_leading_run_is_counted_whatever_its_length() {
        for len in 0..40 {
            for run in 0..=len {
                let items: Vec<bool> = (0..len).map(|k| k < run).collect();
                assert_eq!(leading_run(&items, |&b| b), run, "{run} of {len}");
            }
        }
    }
    #[test]
    fn content_mode_link_target_and_names_change_the_digest_and_stamps_do_not() {
        let same = |_: &str| 1;
        let base = digest_of(&tree(), &same).digest;
        let mut stamped = tree();
        stamped[1].stamp.mtime_ns = 42;
        stamped[1].stamp.ino = 7;
        assert_eq!(
            digest_of(&stamped, &same).digest,
            base,
            "mtime and inode are not inputs"
        );
        assert_ne!(
            digest_of(&tree(), &|p| u8::from(p == "src/d/b") + 1).digest,
            base,
            "content"
        );
        let mut chmod = tree();
        chmod[3].mode = 0o755;
        assert_ne!(digest_of(&chmod, &same).digest, base, "mode");
        let mut relink = tree();
        relink[4].link_target = Some("d/b".into());
        assert_ne!(digest_of(&relink, &same).digest, base, "symlink target");
        let mut renamed = tree();
        renamed[1].path = "src/a2".into();
        assert_ne!(digest_of(&renamed, &same).digest, base, "a rename");
        let mut empty_dir = tree();
        empty_dir.push(dir("src/e"));
        assert_ne!(digest_of(&empty_dir, &same).digest, base, "an empty directory");
    }

    #[test]
    fn a_listing_limit_changes_only_how_many_files_are_described() {
        let entries = tree();
        let roots = select(&entries, &["src".to_string()], &IgnoreMatcher::default()).unwrap();
        let all = sources_digest(&entries, &roots, &|_| [1; 32]);
        let two = sources_digest_listing(&entries, &roots, &|_| [1; 32], 2);
        assert_eq!(
            (two.digest.as_str(), two.total, two.files.len()),
            (all.digest.as_str(), all.total, 2)
        );
        assert_eq!(two.files[..], all.files[..2]);
        assert_eq!((two.summary, two.nodes), (all.summary, all.nodes));
    }

    #[test]
    fn the_summary_lists_the_roots_and_each_distinct_directory_is_one_node() {
        let mut entries = vec![dir("src")];
        for d in ["x", "y"] {
            entries.push(dir(&format!("src/{d}")));
            for i in 0..3000 {
                entries.push(file(&format!("src/{d}/f{i:04}"), 0o644));
            }
        }
        let d = digest_of(&entries, &|_| 1);
        assert_eq!(d.total, 6003);
        assert_eq!(d.summary.len(), 1);
        assert_eq!((d.summary[0].path.as_str(), d.summary[0].kind), ("src", EntryKind::Dir));
        // x and y have the same contents: one node serves both.
        assert_eq!(d.nodes.len(), 2, "src and the shared listing of x and y");
        let top = &d.nodes.iter().find(|(k, _)| *k == d.summary[0].digest).unwrap().1;
        let names: Vec<&str> = top.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["x", "y"]);
        assert_eq!(top.entries[0].digest, top.entries[1].digest);
        let x = &d.nodes.iter().find(|(k, _)| *k == top.entries[0].digest).unwrap().1;
        assert_eq!(x.entries.len(), 3000);
        assert_eq!(x.entries[0].path, "f0000");
    }

    #[test]
    fn a_known_subtree_digest_stands_for_the_subtree_and_changes_nothing() {
        let entries = vec![
            dir("src"),
            file("src/a", 0o644),
            dir("src/d"),
            file("src/d-x", 0o644),
            file("src/d/b", 0o644),
            dir("src/d/e"),
            file("src/d/e/c", 0o600),
            file("src/z", 0o644),
        ];
        let roots = select(&entries, &["src".to_string()], &IgnoreMatcher::default()).unwrap();
        let content = |i: usize| [i as u8; 32];
        let whole = sources_digest_listing(&entries, &roots, &content, 1);
        let by_path: std::collections::HashMap<String, [u8; 32]> = whole.subtrees.iter().cloned().collect();
        assert_eq!(by_path.len(), 3, "src, src/d, src/d/e: {:?}", whole.subtrees);
        for reuse in ["src/d", "src/d/e", "src"] {
            let known = |p: &str| (p == reuse).then(|| by_path[p]);
            let again = sources_digest_reusing(&entries, &roots, &content, 1, &known);
            assert_eq!((&again.digest, again.total), (&whole.digest, whole.total), "{reuse}");
            assert_eq!(again.summary, whole.summary, "{reuse}");
        }
        let wrong = sources_digest_reusing(&entries, &roots, &content, 1, &|p| (p == "src/d").then_some([9; 32]));
        assert_ne!(wrong.digest, whole.digest, "the known digest is what is used");
        let listing_all = sources_digest_reusing(&entries, &roots, &content, usize::MAX, &|p| {
            (p == "src/d").then_some([9; 32])
        });
        assert_eq!(
            listing_all.digest, whole.digest,
            "nothing is reused while files are still described"
        );
    }
}
