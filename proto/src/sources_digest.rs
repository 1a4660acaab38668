//! The Merkle digest of what a COPY/ADD selects: per entry its path, type, permission bits,
//! symlink target and content BLAKE3 — never mtime or owner. Each directory's node digest
//! covers its children, so two trees can be compared subtree by subtree.

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

/// The digest of a COPY's selected sources and the entries it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourcesDigest {
    /// The Merkle root, hex.
    pub digest: String,
    /// The entries that went in, in order (a source may keep only the first few).
    pub files: Vec<FileInput>,
    /// How many entries went in.
    pub total: usize,
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
}

impl Node {
    fn digest(&self) -> [u8; 32] {
        let mut e = Encoder::new();
        match self {
            Node::File { mode, content } => e.str("file").u32(*mode).digest(content),
            Node::Symlink { target } => e.str("symlink").str(target),
            Node::Dir { mode, children } => {
                e.str("dir").u32(*mode).u32(children.len() as u32);
                for (name, child) in children {
                    e.str(name).digest(&child.digest());
                }
                &mut e
            }
        };
        e.finish()
    }
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
    let mut e = Encoder::new();
    e.str("lcache-sources").u32(1).u32(roots.len() as u32);
    let mut files = Vec::new();
    let mut describe = |i: usize| {
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
    };
    for root in roots {
        let mut node = match root.entry {
            Some(i) => {
                describe(i);
                leaf(&entries[i], i, content)
            }
            None => Node::Dir {
                mode: 0,
                children: BTreeMap::new(),
            },
        };
        if let Node::Dir { children, .. } = &mut node {
            for (i, rel) in &root.members {
                describe(*i);
                insert(children, rel, leaf(&entries[*i], *i, content));
            }
        }
        e.str(&root.path).digest(&node.digest());
    }
    SourcesDigest {
        digest: hex(&e.finish()),
        total: files.len(),
        files,
    }
}

/// Digest of heredoc files a COPY makes, by name and content.
pub fn inline_digest(name: &str, content: &str) -> String {
    hex(&Encoder::new().str("inline").str(name).str(content).finish())
}
