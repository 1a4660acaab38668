//! One stat-only walk of a build context, honouring `.dockerignore`, giving the sorted entry
//! list that source selection and hashing work from. Symlinks are recorded, never followed.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lcache_proto::dockerignore::IgnoreMatcher;
use lcache_proto::source_select::{ContextEntry, EntryKind, FileStamp};

use crate::errors::ContextError;

/// Name prefix of the marker files lcached creates at a context's root to sync with its
/// watcher; the walk never lists them, so no COPY can select one.
pub const BARRIER_PREFIX: &str = ".lcache-barrier-";

/// Reads `.dockerignore` at the root of `context`, if there is one.
pub fn read_dockerignore(context: &Path) -> Result<IgnoreMatcher, ContextError> {
    let path = context.join(".dockerignore");
    match std::fs::read_to_string(&path) {
        Ok(text) => IgnoreMatcher::parse(&text).map_err(|source| ContextError::Ignore { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(IgnoreMatcher::default()),
        Err(source) => Err(ContextError::Io { path, source }),
    }
}

/// Walks `context` and returns every entry not excluded by `ignore`, sorted by path.
pub fn walk(context: &Path, ignore: &IgnoreMatcher) -> Result<Vec<ContextEntry>, ContextError> {
    let mut out = Vec::new();
    let mut stack: Vec<(PathBuf, String)> = vec![(context.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|source| ContextError::Io {
            path: dir.clone(),
            source,
        })?;
        for item in rd {
            let item = item.map_err(|source| ContextError::Io {
                path: dir.clone(),
                source,
            })?;
            let name = item.file_name();
            let name = name.to_str().ok_or_else(|| ContextError::NonUtf8(item.path()))?;
            if rel.is_empty() && name.starts_with(BARRIER_PREFIX) {
                // lcached's own short-lived marker: never part of a build.
                continue;
            }
            let path = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let excluded = !ignore.is_empty() && ignore.is_excluded(&path);
            let meta = item.metadata().map_err(|source| ContextError::Io {
                path: item.path(),
                source,
            })?;
            let ft = meta.file_type();
            let mode = meta.permissions().mode() & 0o7777;
            let stamp = FileStamp {
                mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
                ino: meta.ino(),
                dev: meta.dev(),
            };
            if ft.is_dir() {
                if excluded && ignore.skips_dir(&path) {
                    continue;
                }
                stack.push((item.path(), path.clone()));
                if !excluded {
                    out.push(ContextEntry {
                        path,
                        kind: EntryKind::Dir,
                        mode,
                        link_target: None,
                        size: 0,
                        stamp,
                    });
                }
                continue;
            }
            if excluded {
                continue;
            }
            if ft.is_symlink() {
                let target = std::fs::read_link(item.path()).map_err(|source| ContextError::Io {
                    path: item.path(),
                    source,
                })?;
                let target = target
                    .to_str()
                    .ok_or_else(|| ContextError::NonUtf8(item.path()))?
                    .to_string();
                out.push(ContextEntry {
                    path,
                    kind: EntryKind::Symlink,
                    mode,
                    link_target: Some(target),
                    size: 0,
                    stamp,
                });
            } else if ft.is_file() {
                out.push(ContextEntry {
                    path,
                    kind: EntryKind::File,
                    mode,
                    link_target: None,
                    size: meta.len(),
                    stamp,
                });
            }
            // Sockets, FIFOs and devices cannot be copied into an image layer; Docker skips them too.
        }
    }
    out.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_records_types_and_modes_and_skips_ignored_trees() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("src/sub")).unwrap();
        std::fs::create_dir_all(root.join("target/debug")).unwrap();
        std::fs::write(root.join("src/a.rs"), "a").unwrap();
        std::fs::write(root.join("target/debug/big"), "x").unwrap();
        std::os::unix::fs::symlink("a.rs", root.join("src/link")).unwrap();
        std::fs::set_permissions(root.join("src/a.rs"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ignore = IgnoreMatcher::parse("target\n").unwrap();
        let e = walk(root, &ignore).unwrap();
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["src", "src/a.rs", "src/link", "src/sub"]);
        assert_eq!(e[1].mode, 0o755);
        assert_eq!(e[2].link_target.as_deref(), Some("a.rs"));
    }
}
