//! `RUN --mount=…` as BuildKit reads it: `type=cache|tmpfs|secret|bind|ssh` and their
//! options. Parsed here (no I/O); the builder prepares what each mount needs.

/// One `--mount` of a RUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunMount {
    /// A directory kept across builds, never in the key or the layer.
    Cache {
        /// Where it appears.
        target: String,
        /// Which cache (default: the target).
        id: String,
        /// `locked` (one RUN at a time), `shared` or `private` (default `shared`).
        sharing: String,
        /// Mounted read-only.
        readonly: bool,
    },
    /// An empty in-memory filesystem.
    Tmpfs {
        /// Where it appears.
        target: String,
    },
    /// A secret file (or variable), never in the key, the layer or the history.
    Secret {
        /// Which secret (`lcache build --secret id=…`).
        id: String,
        /// Where the file appears: `/run/secrets/<id>` unless given; none when only `env`
        /// is asked for.
        target: Option<String>,
        /// The variable the RUN sees the secret in.
        env: Option<String>,
        /// Fail when the build was given no such secret.
        required: bool,
        /// The file's owner, group and mode (default root, 0400).
        uid: u32,
        /// Its group.
        gid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// Files from the context, a stage or an image, read-only unless `rw`; their content is
    /// in the key as a COPY's is, and what the RUN writes there is thrown away.
    Bind {
        /// Where they appear.
        target: String,
        /// The path within `from` (default: its root).
        source: String,
        /// A stage name or index, or an image (default: the build context).
        from: Option<String>,
        /// Writable (the writes are discarded).
        readwrite: bool,
    },
    /// The SSH agent socket given with `lcache build --ssh`, never in the key or the layer.
    Ssh {
        /// Which agent (`lcache build --ssh ID=…`; default `default`).
        id: String,
        /// Where the socket appears (default `/run/buildkit/ssh_agent.N`).
        target: String,
        /// Fail when the build was given no such agent.
        required: bool,
        /// The socket's owner and mode in the RUN (default root, 0600).
        uid: u32,
        /// Its group.
        gid: u32,
        /// Its permission bits.
        mode: u32,
    },
}

/// Why a `--mount` value is refused; the words are the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    /// An unknown `type=`.
    #[error("--mount type={0} is not one of bind, cache, tmpfs, secret, ssh")]
    UnknownType(String),
    /// A mount onto the root.
    #[error("--mount target=/ would hide the whole filesystem")]
    RootTarget,
    /// A secret mount without `id=` or `target=`.
    #[error("--mount type=secret needs id=NAME (or target=PATH)")]
    NoSecretId,
    /// A `uid=`, `gid=` or `mode=` that is not a number.
    #[error("--mount {0}={1} is not a number")]
    Number(&'static str, String),
    /// An unknown `sharing=`.
    #[error("--mount sharing={0} is not one of shared, private, locked")]
    Sharing(String),
}

/// A mount target as the runtime needs it: a relative one (or none) is beneath WORKDIR, as
/// in BuildKit; the root itself is refused.
pub fn absolute_target(target: &str, workdir: &str) -> Result<String, MountError> {
    let joined = if target.starts_with('/') {
        target.to_string()
    } else {
        let base = if workdir.is_empty() { "/" } else { workdir };
        format!("{}/{target}", base.trim_end_matches('/'))
    };
    let clean = joined.trim_end_matches('/');
    if clean.is_empty() || clean.split('/').all(|c| c.is_empty() || c == ".") {
        return Err(MountError::RootTarget);
    }
    Ok(clean.to_string())
}

/// Parses one `--mount` value (`type=cache,target=/root/.cache,sharing=locked`).
pub fn parse(value: &str) -> Result<RunMount, MountError> {
    parse_nth(value, 0)
}

/// Parses the `--mount` value that is the RUN's `ssh_index`th ssh mount (which names its
/// default target).
pub fn parse_nth(value: &str, ssh_index: usize) -> Result<RunMount, MountError> {
    let mut kind = "bind".to_string();
    let (mut target, mut id, mut sharing) = (String::new(), String::new(), "shared".to_string());
    let (mut source, mut from) = (String::new(), None);
    let (mut readonly, mut required, mut readwrite) = (false, false, false);
    let (mut uid, mut gid, mut mode) = (0, 0, None);
    let mut env = None;
    let number = |name: &'static str, v: &str, radix: u32| {
        u32::from_str_radix(v, radix).map_err(|_| MountError::Number(name, v.to_string()))
    };
    for part in value.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        match k.to_ascii_lowercase().as_str() {
            "type" => kind = v.to_ascii_lowercase(),
            "target" | "dst" | "destination" => target = v.to_string(),
            "id" => id = v.to_string(),
            "sharing" => sharing = v.to_ascii_lowercase(),
            "readonly" | "ro" => readonly = v.is_empty() || v == "true",
            "required" => required = v.is_empty() || v == "true",
            "rw" | "readwrite" => readwrite = v.is_empty() || v == "true",
            "source" | "src" => source = v.to_string(),
            "from" => from = Some(v.to_string()),
            "uid" => uid = number("uid", v, 10)?,
            "gid" => gid = number("gid", v, 10)?,
            "mode" => mode = Some(number("mode", v, 8)?),
            "env" => env = Some(v.to_string()),
            _ => {}
        }
    }
    match kind.as_str() {
        "cache" => {
            if !matches!(sharing.as_str(), "shared" | "private" | "locked") {
                return Err(MountError::Sharing(sharing));
            }
            Ok(RunMount::Cache {
                id: if id.is_empty() { target.clone() } else { id },
                target,
                sharing,
                readonly,
            })
        }
        "tmpfs" => Ok(RunMount::Tmpfs { target }),
        "secret" => {
            let id = match (id.is_empty(), source.is_empty(), target.rsplit('/').next()) {
                (_, false, _) => source,
                (false, true, _) => id,
                (true, true, Some(name)) if !name.is_empty() => name.to_string(),
                _ => return Err(MountError::NoSecretId),
            };
            let target = match (target.is_empty(), &env) {
                (false, _) => Some(target),
                (true, Some(_)) => None,
                (true, None) => Some(format!("/run/secrets/{}", id.rsplit('/').next().unwrap_or(&id))),
            };
            Ok(RunMount::Secret {
                target,
                id,
                env,
                required,
                uid,
                gid,
                mode: mode.unwrap_or(0o400),
            })
        }
        "bind" => Ok(RunMount::Bind {
            target,
            source,
            from,
            readwrite,
        }),
        "ssh" => Ok(RunMount::Ssh {
            id: if id.is_empty() { "default".into() } else { id },
            target: if target.is_empty() {
                format!("/run/buildkit/ssh_agent.{ssh_index}")
            } else {
                target
            },
            required,
            uid,
            gid,
            mode: mode.unwrap_or(0o600),
        }),
        other => Err(MountError::UnknownType(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_read_as_buildkit_reads_them() {
        assert_eq!(
            parse("type=cache,target=/root/.cache,sharing=locked").unwrap(),
            RunMount::Cache {
                target: "/root/.cache".into(),
                id: "/root/.cache".into(),
                sharing: "locked".into(),
                readonly: false
            }
        );
        assert_eq!(
            parse("type=secret,id=npm").unwrap(),
            RunMount::Secret {
                id: "npm".into(),
                target: Some("/run/secrets/npm".into()),
                env: None,
                required: false,
                uid: 0,
                gid: 0,
                mode: 0o400
            }
        );
        assert_eq!(
            parse("type=tmpfs,dst=/t").unwrap(),
            RunMount::Tmpfs { target: "/t".into() }
        );
        assert_eq!(
            parse("target=/src").unwrap(),
            RunMount::Bind {
                target: "/src".into(),
                source: String::new(),
                from: None,
                readwrite: false
            },
            "bind is the default"
        );
        assert_eq!(
            parse("type=bind,source=go.sum,target=go.sum,from=deps,rw").unwrap(),
            RunMount::Bind {
                target: "go.sum".into(),
                source: "go.sum".into(),
                from: Some("deps".into()),
                readwrite: true
            }
        );
        assert_eq!(
            parse_nth("type=ssh", 1).unwrap(),
            RunMount::Ssh {
                id: "default".into(),
                target: "/run/buildkit/ssh_agent.1".into(),
                required: false,
                uid: 0,
                gid: 0,
                mode: 0o600
            }
        );
        assert!(matches!(
            parse("type=ssh,uid=1000,mode=0644"),
            Ok(RunMount::Ssh {
                uid: 1000,
                mode: 0o644,
                ..
            })
        ));
        assert!(parse("type=ssh,uid=me").is_err());
        assert!(matches!(
            parse("type=secret,id=tok,env=TOKEN"),
            Ok(RunMount::Secret {
                target: None,
                env: Some(_),
                ..
            })
        ));
        assert!(matches!(
            parse("type=secret,source=aws,target=/root/.aws/credentials"),
            Ok(RunMount::Secret { ref id, .. }) if id == "aws"
        ));
        assert_eq!(absolute_target("go.sum", "/src/").unwrap(), "/src/go.sum");
        assert_eq!(absolute_target("x", "").unwrap(), "/x");
        assert_eq!(absolute_target("/abs/", "/w").unwrap(), "/abs");
        assert_eq!(absolute_target("", "/src").unwrap(), "/src");
        assert_eq!(absolute_target("", ""), Err(MountError::RootTarget));
        assert_eq!(absolute_target("/", "/w"), Err(MountError::RootTarget));
        assert!(
            matches!(parse("type=cache"), Ok(RunMount::Cache { .. })),
            "the target defaults to WORKDIR"
        );
        assert!(parse("type=cache,target=/c,sharing=sometimes").is_err());
        assert!(parse("type=volume,target=/v").is_err());
    }
}
