//! The build context on local disk as a key-derivation source: one walk, the selection of
//! every COPY/ADD worked out up front, and the union of selected files hashed once, in
//! parallel, before any key is derived.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lcache_proto::build_plan::{BuildPlan, CopyDef, CopyFrom, StepDef};
use lcache_proto::dockerignore::IgnoreMatcher;
use lcache_proto::errors::{Location, SelectError};
use lcache_proto::source_select::{select, ContextEntry, EntryKind, SelectedRoot};
use lcache_proto::sources_digest::{sources_digest, SourcesDigest};
use lcache_proto::step_keys::{is_remote, StepRef, StepSources};

use crate::content_hash::hash_files;
use crate::context_walk::{read_dockerignore, walk};
use crate::errors::ContextError;

/// Why a plan's sources could not be read from the context.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    /// Reading the context failed.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// A COPY/ADD source could not be selected.
    #[error("{location}: {source}")]
    Select {
        /// The instruction's location.
        location: Location,
        /// What went wrong.
        source: SelectError,
    },
}

/// A walked and hashed build context.
#[derive(Debug)]
pub struct LocalContext {
    root: PathBuf,
    entries: Vec<ContextEntry>,
    selections: HashMap<(usize, usize), Vec<SelectedRoot>>,
    content: Vec<[u8; 32]>,
    hashed_files: usize,
}

impl LocalContext {
    /// Walks `root` and hashes what the needed steps of `plan` select. `file` names the
    /// Dockerfile in messages.
    pub fn prepare(root: &Path, plan: &BuildPlan, file: &str) -> Result<Self, SourcesError> {
        let ignore = read_dockerignore(root)?;
        let entries = walk(root, &ignore)?;
        let mut selections = HashMap::new();
        let mut wanted = vec![false; entries.len()];
        for stage in plan.needed_stages() {
            for (n, step) in stage.steps.iter().enumerate() {
                let StepDef::Copy(c) = &step.def else { continue };
                if !matches!(c.from, CopyFrom::Context)
                    || c.sources.is_empty()
                    || (c.add && c.sources.iter().any(|s| is_remote(s)))
                {
                    continue;
                }
                let at = |source| SourcesError::Select {
                    location: Location {
                        file: file.to_string(),
                        line: step.line,
                        column: 1,
                    },
                    source,
                };
                let excludes = IgnoreMatcher::from_patterns(c.excludes.iter().map(String::as_str)).map_err(at)?;
                let roots = select(&entries, &c.sources, &excludes).map_err(at)?;
                for r in &roots {
                    for i in r.entry.iter().copied().chain(r.members.iter().map(|(i, _)| *i)) {
                        wanted[i] |= entries[i].kind == EntryKind::File;
                    }
                }
                selections.insert((stage.index, n), roots);
            }
        }
        let to_hash: Vec<usize> = (0..entries.len()).filter(|&i| wanted[i]).collect();
        let paths: Vec<(&str, u64)> = to_hash
            .iter()
            .map(|&i| (entries[i].path.as_str(), entries[i].size))
            .collect();
        let hashes = hash_files(root, &paths)?;
        let mut content = vec![[0u8; 32]; entries.len()];
        for (&i, h) in to_hash.iter().zip(hashes) {
            content[i] = h;
        }
        Ok(Self {
            root: root.to_path_buf(),
            entries,
            selections,
            content,
            hashed_files: to_hash.len(),
        })
    }

    /// The context directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Entries after `.dockerignore`.
    pub fn entries(&self) -> &[ContextEntry] {
        &self.entries
    }

    /// How many files were read and hashed.
    pub fn hashed_files(&self) -> usize {
        self.hashed_files
    }
}

impl StepSources for LocalContext {
    fn context_sources(&mut self, at: StepRef, _def: &CopyDef) -> Result<SourcesDigest, SelectError> {
        let roots = self
            .selections
            .get(&(at.stage, at.step))
            .map(Vec::as_slice)
            .unwrap_or_default();
        Ok(sources_digest(&self.entries, roots, &|i| self.content[i]))
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
