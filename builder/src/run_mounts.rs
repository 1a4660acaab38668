//! What a RUN's `--mount`s need on the host: cache mounts get a directory kept in the
//! client cache across builds (per id; `sharing=locked` and `private` take a lock for the
//! RUN, `shared` none), tmpfs mounts an empty filesystem, secret mounts a file (0400) made
//! in the step's work directory from `lcache build --secret` and gone with it, ssh mounts a
//! forwarder to the agent `lcache build --ssh` named. None of them reaches the key (only the
//! flag's text does), the layer, or the history. Bind mounts are the build loop's (their
//! files are in the key): they are not prepared here.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use lcache_proto::run_mount::{absolute_target, parse_nth, MountError, RunMount};
use nix::fcntl::{Flock, FlockArg};

use crate::run_step::PreparedMount;
use crate::ssh_forward::AgentForward;

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
    /// A required ssh agent was not given.
    #[error(
        "ssh agent '{0}' is required by this RUN — pass it with `lcache build --ssh {0}` (the agent at $SSH_AUTH_SOCK) or --ssh {0}=SOCKET"
    )]
    MissingSsh(String),
    /// The host side could not be made.
    #[error("cannot prepare the mount at {target}: {source}")]
    Io {
        /// The mount's target.
        target: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Prepared mounts, the locks and forwarders held while the RUN runs, and the environment
/// they add.
pub struct Prepared {
    /// For the runtime.
    pub mounts: Vec<PreparedMount>,
    /// Released when dropped, after the RUN.
    pub locks: Vec<Flock<std::fs::File>>,
    /// Stopped when dropped, after the RUN.
    pub agents: Vec<AgentForward>,
    /// Variables the mounts add (`SSH_AUTH_SOCK`, secrets asked for with `env=`).
    pub env: Vec<String>,
}

/// What the host side of a RUN's mounts is made from.
pub struct MountInputs<'a> {
    /// Where cache mounts' directories are kept.
    pub cache_root: &'a Path,
    /// The step's work directory (secrets, agent sockets; removed after the step).
    pub work: &'a Path,
    /// The RUN's WORKDIR, which relative targets are beneath.
    pub workdir: &'a str,
    /// `lcache build --secret`s by id.
    pub secrets: &'a BTreeMap<String, Vec<u8>>,
    /// `lcache build --ssh` agent sockets by id.
    pub ssh: &'a BTreeMap<String, PathBuf>,
}

/// A file or directory name for a cache id (any text) that cannot climb out.
fn cache_dir_name(id: &str) -> String {
    blake3::hash(id.as_bytes()).to_hex()[..32].to_string()
}

/// Prepares `mounts` (the RUN's `--mount` values) but its bind mounts.
pub fn prepare(mounts: &[String], inputs: &MountInputs) -> Result<Prepared, RunMountError> {
    let (cache_root, work, secrets) = (inputs.cache_root, inputs.work, inputs.secrets);
    let mut out = Prepared {
        mounts: Vec::new(),
        locks: Vec::new(),
        agents: Vec::new(),
        env: Vec::new(),
    };
    let mut ssh_count = 0;
    for value in mounts {
        let parsed = parse_nth(value, ssh_count)?;
        match parsed {
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
                    target: absolute_target(&target, inputs.workdir)?,
                    readonly,
                });
            }
            RunMount::Tmpfs { target } => out.mounts.push(PreparedMount::Tmpfs {
                target: absolute_target(&target, inputs.workdir)?,
            }),
            RunMount::Secret {
                id,
                target,
                env,
                required,
                uid,
                gid,
                mode,
            } => match secrets.get(&id) {
                Some(content) => {
                    if let Some(name) = env {
                        let value = String::from_utf8(content.clone()).map_err(|_| RunMountError::Io {
                            target: format!("${name}"),
                            source: std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                "the secret is not UTF-8 text",
                            ),
                        })?;
                        out.env.push(format!("{name}={value}"));
                    }
                    let Some(target) = target else { continue };
                    let target = absolute_target(&target, inputs.workdir)?;
                    let io = |source| RunMountError::Io {
                        target: target.clone(),
                        source,
                    };
                    let dir = work.join("secrets");
                    std::fs::create_dir_all(&dir).map_err(io)?;
                    let file = dir.join(cache_dir_name(&format!("{id}\0{target}")));
                    std::fs::write(&file, content).map_err(io)?;
                    std::os::unix::fs::chown(&file, Some(uid), Some(gid)).map_err(io)?;
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(io)?;
                    out.mounts.push(PreparedMount::Bind {
                        source: file,
                        target,
                        readonly: true,
                    });
                }
                None if required => return Err(RunMountError::MissingSecret(id)),
                None => {}
            },
            RunMount::Ssh {
                id,
                target,
                required,
                uid,
                gid,
                mode,
            } => {
                ssh_count += 1;
                let Some(agent) = inputs.ssh.get(&id) else {
                    if required {
                        return Err(RunMountError::MissingSsh(id));
                    }
                    continue;
                };
                let target = absolute_target(&target, inputs.workdir)?;
                let io = |source| RunMountError::Io {
                    target: target.clone(),
                    source,
                };
                let dir = work.join("ssh");
                std::fs::create_dir_all(&dir).map_err(io)?;
                let socket = dir.join(format!("agent.{}", out.agents.len()));
                let fwd = AgentForward::start(agent, &socket, (uid, gid), mode).map_err(|e| RunMountError::Io {
                    target: format!("{target} (the agent at {})", agent.display()),
                    source: e,
                })?;
                if out.agents.is_empty() {
                    out.env.push(format!("SSH_AUTH_SOCK={target}"));
                }
                out.mounts.push(PreparedMount::Bind {
                    source: fwd.socket().to_path_buf(),
                    target,
                    readonly: false,
                });
                out.agents.push(fwd);
            }
            RunMount::Bind { .. } => {}
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
        let ssh = BTreeMap::new();
        let inputs = MountInputs {
            cache_root: root.path(),
            work: work.path(),
            workdir: "/w",
            secrets: &secrets,
            ssh: &ssh,
        };
        let p = prepare(
            &[
                "type=cache,target=/c,id=../../escape".into(),
                "type=secret,id=tok".into(),
                "type=bind,target=/src".into(),
                "type=cache,target=rel,sharing=locked".into(),
                "type=ssh".into(),
            ],
            &inputs,
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
        let PreparedMount::Bind { target, .. } = &p.mounts[2] else {
            panic!()
        };
        assert_eq!(target, "/w/rel", "a relative target is beneath WORKDIR");
        assert_eq!(
            p.mounts.len(),
            3,
            "binds are not prepared here; an optional ssh is skipped"
        );
        assert_eq!(p.locks.len(), 1);
        let missing = prepare(&["type=secret,id=npm,required".into()], &inputs);
        assert!(matches!(missing, Err(RunMountError::MissingSecret(_))));
        let missing = prepare(&["type=ssh,required".into()], &inputs);
        assert!(matches!(missing, Err(RunMountError::MissingSsh(_))));
    }
}
