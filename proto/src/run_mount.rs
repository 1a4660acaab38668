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
    /// A secret file, never in the key, the layer or the history.
    Secret {
        /// Which secret (`lcache build --secret id=…`).
        id: String,
        /// Where it appears (default `/run/secrets/<id>`).
        target: String,
        /// Fail when the build was given no such secret.
        required: bool,
    },
    /// Files from the context, a stage or an image (not built yet).
    Bind {
        /// Where they appear.
        target: String,
    },
    /// The SSH agent (not built yet).
    Ssh,
}

/// Why a `--mount` value is refused; the words are the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    /// An unknown `type=`.
    #[error("--mount type={0} is not one of bind, cache, tmpfs, secret, ssh")]
    UnknownType(String),
    /// A mount that needs a target has none.
    #[error("--mount type={0} needs target=PATH")]
    NoTarget(String),
    /// A secret mount without `id=` or `target=`.
    #[error("--mount type=secret needs id=NAME (or target=PATH)")]
    NoSecretId,
    /// An unknown `sharing=`.
    #[error("--mount sharing={0} is not one of shared, private, locked")]
    Sharing(String),
}

/// Parses one `--mount` value (`type=cache,target=/root/.cache,sharing=locked`).
pub fn parse(value: &str) -> Result<RunMount, MountError> {
    let mut kind = "bind".to_string();
    let (mut target, mut id, mut sharing) = (String::new(), String::new(), "shared".to_string());
    let (mut readonly, mut required) = (false, false);
    for part in value.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        match k.to_ascii_lowercase().as_str() {
            "type" => kind = v.to_ascii_lowercase(),
            "target" | "dst" | "destination" => target = v.to_string(),
            "id" => id = v.to_string(),
            "sharing" => sharing = v.to_ascii_lowercase(),
            "readonly" | "ro" => readonly = v.is_empty() || v == "true",
            "required" => required = v.is_empty() || v == "true",
            _ => {}
        }
    }
    let need_target = |kind: &str, target: String| {
        if target.is_empty() {
            Err(MountError::NoTarget(kind.to_string()))
        } else {
            Ok(target)
        }
    };
    match kind.as_str() {
        "cache" => {
            if !matches!(sharing.as_str(), "shared" | "private" | "locked") {
                return Err(MountError::Sharing(sharing));
            }
            let target = need_target("cache", target)?;
            Ok(RunMount::Cache {
                id: if id.is_empty() { target.clone() } else { id },
                target,
                sharing,
                readonly,
            })
        }
        "tmpfs" => Ok(RunMount::Tmpfs {
            target: need_target("tmpfs", target)?,
        }),
        "secret" => {
            let id = match (id.is_empty(), target.rsplit('/').next()) {
                (false, _) => id,
                (true, Some(name)) if !name.is_empty() => name.to_string(),
                _ => return Err(MountError::NoSecretId),
            };
            Ok(RunMount::Secret {
                target: if target.is_empty() {
                    format!("/run/secrets/{id}")
                } else {
                    target
                },
                id,
                required,
            })
        }
        "bind" => Ok(RunMount::Bind {
            target: need_target("bind", target)?,
        }),
        "ssh" => Ok(RunMount::Ssh),
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
                target: "/run/secrets/npm".into(),
                required: false
            }
        );
        assert_eq!(
            parse("type=tmpfs,dst=/t").unwrap(),
            RunMount::Tmpfs { target: "/t".into() }
        );
        assert_eq!(
            parse("target=/src").unwrap(),
            RunMount::Bind { target: "/src".into() },
            "bind is the default"
        );
        assert_eq!(parse("type=cache"), Err(MountError::NoTarget("cache".into())));
        assert!(parse("type=cache,target=/c,sharing=sometimes").is_err());
        assert!(parse("type=volume,target=/v").is_err());
    }
}
