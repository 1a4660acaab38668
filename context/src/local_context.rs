//! The build context on local disk as a key-derivation source. Selection happens per
//! COPY/ADD as keys are derived; a file's content is hashed at most once per run (several
//! steps selecting it share the digest), the files of one step in parallel, and digests the
//! caller already knows (the daemon's index) are not recomputed.

use std::path::{Path, PathBuf};

use lcache_proto::build_plan::CopyDef;
use lcache_proto::dockerignore::IgnoreMatcher;
use lcache_proto::errors::{Location, SelectError};
use lcache_proto::source_select::{select, ContextEntry, EntryKind};
use lcache_proto::sources_digest::{sources_digest_reusing, SourcesDigest};
use lcache_proto::step_keys::{StepRef, StepSources};

use crate::content_hash::hash_files;
use crate::context_walk::{read_dockerignore, walk};
use crate::errors::ContextError;

/// Why a plan's sources could not be read from the context.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    /// Reading the context failed.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// A COPY/ADD source could not be selected or read.
    #[error("{location}: {error}")]
    Select {
        /// The instruction's location.
        location: Location,
        /// What went wrong.
        error: SelectError,
    },
}

/// Where a context's file digests are kept while keys are derived: one slot per entry,
/// in entry order. The plain list is a context's own; the daemon's index lends its digests
/// in a slot type of its own instead of copying every one into a list for each plan.
pub trait DigestSlots {
    /// Entry `i`'s content digest, if one is known and may be used.
    fn digest(&self, i: usize) -> Option<[u8; 32]>;
    /// Keeps entry `i`'s content digest, just read.
    fn set(&mut self, i: usize, digest: [u8; 32]);
}

impl DigestSlots for Vec<Option<[u8; 32]>> {
    fn digest(&self, i: usize) -> Option<[u8; 32]> {
        self.get(i).copied().flatten()
    }

    fn set(&mut self, i: usize, digest: [u8; 32]) {
        if let Some(slot) = self.get_mut(i) {
            *slot = Some(digest);
        }
    }
}

/// A walked build context whose file digests are filled in on demand.
#[derive(Debug)]
pub struct LocalContext<S = Vec<Option<[u8; 32]>>> {
    root: PathBuf,
    entries: Vec<ContextEntry>,
    content: S,
    hashed: Vec<usize>,
    /// How many files a sources digest describes (`SourcesDigest::files`).
    listed: usize,
}

impl LocalContext {
    /// Walks `root` (honouring its `.dockerignore`); nothing is hashed yet.
    pub fn walk(root: &Path) -> Result<Self, ContextError> {
        let ignore = read_dockerignore(root)?;
        Ok(Self::from_entries(root, walk(root, &ignore)?, |_, _| None))
    }

    /// A context from entries walked earlier; `known(entry)` gives a digest that is still
    /// valid for it, if the caller has one.
    pub fn from_entries(
        root: &Path,
        entries: Vec<ContextEntry>,
        known: impl Fn(usize, &ContextEntry) -> Option<[u8; 32]>,
    ) -> Self {
        let content = entries
            .iter()
            .enumerate()
            .map(|(i, e)| if e.kind == EntryKind::File { known(i, e) } else { None })
            .collect();
        LocalContext::with_slots(root, entries, content)
    }
}

impl<S: DigestSlots> LocalContext<S> {
    /// A context from entries walked earlier and the caller's digests of them, both lent:
    /// [`Self::into_parts`] gives them back, with what this context read filled in.
    pub fn with_slots(root: &Path, entries: Vec<ContextEntry>, content: S) -> Self {
        Self {
            root: root.to_path_buf(),
            entries,
            content,
            hashed: Vec::new(),
            listed: usize::MAX,
        }
    }

    /// The entries and digest slots back, for the caller that lent them.
    pub fn into_parts(self) -> (Vec<ContextEntry>, S) {
        (self.entries, self.content)
    }

    /// Describes at most `n` files per sources digest from now on (the digests and totals
    /// are unchanged).
    pub fn list_at_most(&mut self, n: usize) {
        self.listed = n;
    }

    /// The entries back, for the caller that lent them.
    pub fn into_entries(self) -> Vec<ContextEntry> {
        self.entries
    }

    /// The context directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Entries after `.dockerignore`, sorted by path.
    pub fn entries(&self) -> &[ContextEntry] {
        &self.entries
    }

    /// Entries whose content was read in this run, with their digests.
    pub fn newly_hashed(&self) -> impl Iterator<Item = (&ContextEntry, [u8; 32])> {
        self.hashed
            .iter()
            .filter_map(|&i| self.content.digest(i).map(|d| (&self.entries[i], d)))
    }

    /// How many files were read in this run.
    pub fn hashed_files(&self) -> usize {
        self.hashed.len()
    }

    /// Selects what a COPY/ADD names, hashing the selected files not hashed yet.
    pub fn digest_sources(&mut self, def: &CopyDef) -> Result<SourcesDigest, SelectError> {
        self.digest_sources_reusing(def, &|_| None)
    }

    /// [`Self::digest_sources`], taking a selected directory's node digest from `known(its
    /// path)` where the caller knows its subtree is unchanged since the same selection's
    /// last digest (see `sources_digest_reusing`).
    pub fn digest_sources_reusing(
        &mut self,
        def: &CopyDef,
        known: &dyn Fn(&str) -> Option<[u8; 32]>,
    ) -> Result<SourcesDigest, SelectError> {
        let excludes = IgnoreMatcher::from_patterns(def.excludes.iter().map(String::as_str))?;
        let roots = select(&self.entries, &def.sources, &excludes)?;
        let mut missing: Vec<usize> = roots
            .iter()
            .flat_map(|r| r.entry.into_iter().chain(r.members.iter().copied()))
            // The digest first: most files have one, and the slots are denser than entries.
            .filter(|&i| self.content.digest(i).is_none() && self.entries[i].kind == EntryKind::File)
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            let paths: Vec<(&str, u64)> = missing
                .iter()
                .map(|&i| (self.entries[i].path.as_str(), self.entries[i].size))
                .collect();
            let hashes = hash_files(&self.root, &paths).map_err(|e| match e {
                ContextError::Io { path, source } => SelectError::Unreadable {
                    path: path.display().to_string(),
                    reason: source.to_string(),
                },
                other => SelectError::Unreadable {
                    path: self.root.display().to_string(),
                    reason: other.to_string(),
                },
            })?;
            for (&i, h) in missing.iter().zip(hashes) {
                self.content.set(i, h);
            }
            self.hashed.extend(missing);
        }
        let content = &self.content;
        Ok(sources_digest_reusing(
            &self.entries,
            &roots,
            &|i| content.digest(i).unwrap_or_default(),
            self.listed,
            known,
        ))
    }
}

impl StepSources for LocalContext {
    fn context_sources(&mut self, _at: StepRef, def: &CopyDef) -> Result<SourcesDigest, SelectError> {
        self.digest_sources(def)
    }

    fn stage_sources(&mut self, _at: StepRef, _stage: usize, _def: &CopyDef) -> Option<SourcesDigest> {
        // Another stage's files exist only once it has been built.
        None
    }

    fn image_identity(&mut self, _reference: &str) -> Option<String> {
        // Without an image store the reference itself identifies the base.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(sources: &[&str]) -> CopyDef {
        CopyDef::from_context(sources, "/d/")
    }

    #[test]
    fn a_file_selected_by_two_steps_is_read_once_and_known_digests_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("src")).unwrap();
        std::fs::write(d.path().join("src/a"), "a").unwrap();
        std::fs::write(d.path().join("src/b"), "b").unwrap();
        let mut ctx = LocalContext::walk(d.path()).unwrap();
        let first = ctx.digest_sources(&copy(&["src"])).unwrap();
        ctx.digest_sources(&copy(&["src/a"])).unwrap();
        assert_eq!(ctx.hashed_files(), 2);

        let entries = ctx.entries().to_vec();
        let known: Vec<(String, [u8; 32])> = ctx.newly_hashed().map(|(e, h)| (e.path.clone(), h)).collect();
        let mut again = LocalContext::from_entries(d.path(), entries, |_, e| {
            known.iter().find(|(p, _)| *p == e.path).map(|(_, h)| *h)
        });
        assert_eq!(again.digest_sources(&copy(&["src"])).unwrap(), first);
        assert_eq!(again.hashed_files(), 0);
    }
}
