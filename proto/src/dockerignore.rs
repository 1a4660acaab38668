//! `.dockerignore` matching with Docker's rules (not gitignore's): patterns are cleaned paths
//! relative to the context root, `**` spans directories, `!` re-includes, the last matching
//! pattern wins, and a pattern that matches a directory excludes everything under it.
//! The same matcher serves COPY `--exclude`.

use globset::{GlobBuilder, GlobMatcher};

use crate::errors::SelectError;

#[derive(Debug, Clone)]
struct Pattern {
    glob: GlobMatcher,
    exception: bool,
}

/// A compiled list of ignore patterns.
#[derive(Debug, Clone, Default)]
pub struct IgnoreMatcher {
    patterns: Vec<Pattern>,
    has_exceptions: bool,
}

impl IgnoreMatcher {
    /// Compiles the text of a `.dockerignore` file.
    pub fn parse(text: &str) -> Result<Self, SelectError> {
        Self::from_patterns(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#')),
        )
    }

    /// Compiles patterns given one by one (as `--exclude` does).
    pub fn from_patterns<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<Self, SelectError> {
        let mut m = Self::default();
        for raw in patterns {
            let (exception, body) = match raw.strip_prefix('!') {
                Some(b) => (true, b.trim()),
                None => (false, raw),
            };
            let cleaned = clean(body);
            if cleaned.is_empty() {
                // "/" or "." would exclude the context itself; Docker ignores such a line.
                continue;
            }
            let glob = GlobBuilder::new(&cleaned)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| SelectError::BadPattern {
                    pattern: raw.to_string(),
                    reason: e.kind().to_string(),
                })?
                .compile_matcher();
            m.has_exceptions |= exception;
            m.patterns.push(Pattern { glob, exception });
        }
        Ok(m)
    }

    /// Whether there are no patterns at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `path` (relative to the root, `/`-separated) is excluded.
    pub fn is_excluded(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        let mut excluded = false;
        for p in &self.patterns {
            let mut hit = p.glob.is_match(path);
            if !hit && parts.len() > 1 {
                // A pattern also matches when it matches one of the path's parent directories.
                let mut prefix_len = 0;
                for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
                    prefix_len += part.len() + usize::from(i > 0);
                    if p.glob.is_match(&path[..prefix_len]) {
                        hit = true;
                        break;
                    }
                }
            }
            if hit {
                excluded = !p.exception;
            }
        }
        excluded
    }

    /// Whether a walk may skip the excluded directory `path` without looking inside: only
    /// when no `!` pattern could re-include something under it.
    pub fn skips_dir(&self, path: &str) -> bool {
        !self.has_exceptions && self.is_excluded(path)
    }
}

/// Docker's pattern cleaning: `./`, duplicate slashes and `..` resolved, leading `/` dropped.
fn clean(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(text: &str) -> IgnoreMatcher {
        IgnoreMatcher::parse(text).unwrap()
    }

    #[test]
    fn a_directory_pattern_excludes_its_contents() {
        let i = m("node_modules\n");
        assert!(i.is_excluded("node_modules"));
        assert!(i.is_excluded("node_modules/x/y.js"));
        assert!(!i.is_excluded("src/node_modules"));
    }

    #[test]
    fn double_star_spans_directories_and_star_does_not() {
        let i = m("**/*.log\n*.tmp\n");
        assert!(i.is_excluded("a.log") && i.is_excluded("a/b/c.log"));
        assert!(i.is_excluded("x.tmp"));
        assert!(!i.is_excluded("d/x.tmp"));
    }

    #[test]
    fn exceptions_re_include_and_last_match_wins() {
        let i = m("*.md\n!README.md\n");
        assert!(i.is_excluded("CHANGES.md"));
        assert!(!i.is_excluded("README.md"));
        let j = m("!README.md\n*.md\n");
        assert!(j.is_excluded("README.md"));
        assert!(!i.skips_dir("docs"));
    }

    #[test]
    fn leading_slash_and_dot_slash_are_the_root() {
        let i = m("/build\n./tmp/\n# comment\n\n");
        assert!(i.is_excluded("build/x") && i.is_excluded("tmp"));
        assert!(!i.is_excluded("src/build"));
    }

    #[test]
    fn an_excluded_directory_with_an_exception_inside_is_not_skipped() {
        let i = m("logs\n!logs/keep.txt\n");
        assert!(i.is_excluded("logs/a.txt"));
        assert!(!i.is_excluded("logs/keep.txt"));
        assert!(!i.skips_dir("logs"));
    }
}
