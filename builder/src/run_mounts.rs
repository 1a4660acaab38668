//! What a RUN's `--mount`s need on the host: cache mounts get a directory kept in the
//! client cache across builds (per id; `sharing=locked` and `private` take a lock for the
//! RUN, `shared` none), tmpfs mounts an empty filesystem, secret mounts a file (0400) made
//! in the step's work directory from `lcache build --secret` and gone with it. None of them
//! reaches the key (only the flag's text does), the layer, or the history. Bind and ssh
//! mounts are not built yet: the step runs without them, with a warning.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use lcache_proto::run_mount::{parse, MountError, RunMount};
use nix::fcntl::{Flock, FlockArg};

use crate::run_step::PreparedMount;

/// Why a `--mount` cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub enum RunMountError {
    /// The value does not parse.
    #[error(transparent)]
    Parse(#[from] MountError),
    /// A required secret was not given.
    #[error(
        "secret '{0}' is required by this RUN — pass it with `lcache build --secret id={0},src=FILE` (or env=VAR)"
    )]
    MissingSecret(String),
    /// The host side could not be made.
    #[error("cannot prepare the mount at {target}: {source}")]
    Io {
        /// The mount's target.
        target: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Prepared mounts, the locks held while the RUN runs, and what to warn about.
pub struct Prepared {
    /// For the runtime.
    pub mounts: Vec<PreparedMount>,
    /// Released when dropped, after the RUN.
    pub locks: Vec<Flock<std::fs::File>>,
    /// Mounts the step runs without.
    pub skipped: Vec<String>,
}

/// A file or directory name for a cache id (any text) that cannot climb out.
fn cache_dir_name(id: &str) -> String {
    blake3::hash(id.as_bytes()).to_hex()[..32].to_string()
}

/// Prepares `mounts` (the RUN's `--mount` values): caches under `cache_root`, secrets into
/// `work`.
pub fn prepare(
    mounts: &[String],
    cache_root: &Path,
    work: &Path,
    secrets: &BTreeMap<String, Vec<u8>>,
) -> Result<Prepared, RunMountError> {
    let mut out = Prepared {
        mounts: Vec::new(),
        locks: Vec::new(),
        skipped: Vec::new(),
    };
    for value in mounts {
        match parse(value)? {
            RunMount::Cache {
                target,
                id,
                sharing,
                readonly,
            } => {
                let io = |source| RunMountError::Io {
                    target: target.clone(),
                    source,
                };
                let name = cache_dir_name(&id);
                let dir = cache_root.join(&name);
                std::fs::create_dir_all(&dir).map_err(io)?;
                if sharing != "shared" {
                    // `private` would want a fresh directory per concurrent RUN; one at a
                    // time on the same directory is the safe reading of both.
                    let lock = std::fs::File::create(cache_root.join(format!("{name}.lock"))).map_err(io)?;
                    let held = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| io(e.into()))?;
                    out.locks.push(held);
                }
                out.mounts.push(PreparedMount::Bind {
                    source: dir,
                    target,
                    readonly,
                });
            }
            RunMount::Tmpfs { target } => out.mounts.push(PreparedMount::Tmpfs { target }),
            RunMount::Secret { id, target, required } => match secrets.get(&id) {
                Some(content) => {
                    let io = |source| RunMountError::Io {
                        target: target.clone(),
                        source,
                    };
                    let dir = work.join("secrets");
                    std::fs::create_dir_all(&dir).map_err(io)?;
                    let file = dir.join(cache_dir_name(&id));
                    std::fs::write(&file, content).map_err(io)?;
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).map_err(io)?;
                    out.mounts.push(PreparedMount::Bind {
                        source: file,
                        target,
                        readonly: true,
                    });
                }
                None if required => return Err(RunMountError::MissingSecret(id)),
                None => {}
            },
            RunMount::Bind { .. } | RunMount::Ssh => out.skipped.push(value.clone()),
        }
    }
    Ok(out)
}

/// Removes the cache mounts' directories under `cache_root` that no RUN is using (a locked
/// one is skipped); returns how many were removed and how many were busy.
pub fn prune(cache_root: &Path) -> std::io::Result<(usize, usize)> {
    let (mut removed, mut busy) = (0, 0);
    let entries = match std::fs::read_dir(cache_root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        if !e.file_type()?.is_dir() {
            continue;
        }
        let lock_path = cache_root.join(format!("{}.lock", e.file_name().to_string_lossy()));
        let lock = std::fs::File::create(&lock_path)?;
        // A shared-sharing RUN holds no lock: pruning during a build may empty its cache,
        // which a cache mount allows (it is a cache, never an input).
        match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
            Ok(held) => {
                std::fs::remove_dir_all(e.path())?;
                let _ = std::fs::remove_file(&lock_path);
                drop(held);
                removed += 1;
            }
            Err(_) => busy += 1,
        }
    }
    Ok((removed, busy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_persist_by_id_secrets_are_owner_read_only_and_required_ones_are_checked() {
        let (root, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let secrets: BTreeMap<String, Vec<u8>> = [("tok".to_string(), b"s3cret".to_vec())].into();
        let p = prepare(
            &[
                "type=cache,target=/c,id=../../escape".into(),
                "type=secret,id=tok".into(),
                "type=bind,target=/src".into(),
                "type=cache,target=/l,sharing=locked".into(),
            ],
            root.path(),
            work.path(),
            &secrets,
        )
        .unwrap();
        let PreparedMount::Bind { source, .. } = &p.mounts[0] else {
            panic!()
        };
        assert!(
            source.starts_with(root.path()),
            "an id never names a path outside the cache"
        );
        let PreparedMount::Bind {
            source,
            target,
            readonly,
        } = &p.mounts[1]
        else {
            panic!()
        };
        assert_eq!((target.as_str(), *readonly), ("/run/secrets/tok", true));
        assert_eq!(std::fs::metadata(source).unwrap().permissions().mode() & 0o777, 0o400);
        assert_eq!(p.skipped, ["type=bind,target=/src"]);
        assert_eq!(p.locks.len(), 1);
        let missing = prepare(
            &["type=secret,id=npm,required".into()],
            root.path(),
            work.path(),
            &BTreeMap::new(),
        );
        assert!(matches!(missing, Err(RunMountError::MissingSecret(_))));
    }
}
