//! Registry credentials where Docker users already keep them: `$DOCKER_CONFIG/config.json`
//! (else `~/.docker/config.json`) — `credHelpers` for the registry, else `credsStore`, else
//! `auths` — with `docker-credential-<helper> get` run as Docker runs it. No entry means an
//! anonymous pull.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use base64::Engine;
use lcache_proto::wire::RegistryCredentials;
use serde::Deserialize;

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The config file is unreadable or not JSON.
    #[error("cannot read Docker's config {}: {reason} — fix or remove it (lcache reads it for registry logins)", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A credential helper failed.
    #[error("the credential helper docker-credential-{helper} failed for {registry}: {reason} — check it with `echo {registry} | docker-credential-{helper} get`")]
    Helper {
        /// The helper's name.
        helper: String,
        /// The registry asked about.
        registry: String,
        /// Why.
        reason: String,
    },
}

#[derive(Deserialize, Default)]
struct Config {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: std::collections::BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "registrytoken")]
    registry_token: Option<String>,
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// The key Docker files Docker Hub's credentials under.
const DOCKER_HUB: &str = "https://index.docker.io/v1/";

/// Where Docker's config is.
fn config_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => Some(PathBuf::from(dir).join("config.json")),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
    }
}

/// The names a registry may be filed under in `auths` (Docker Hub has several).
fn keys_for(registry: &str) -> Vec<String> {
    if matches!(registry, "docker.io" | "index.docker.io" | "registry-1.docker.io") {
        return vec![
            DOCKER_HUB.into(),
            "index.docker.io".into(),
            "docker.io".into(),
            "registry-1.docker.io".into(),
        ];
    }
    vec![
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        format!("https://{registry}/v1/"),
        format!("https://{registry}/v2/"),
    ]
}

/// Runs `docker-credential-<helper> get` for `server`.
fn ask_helper(helper: &str, server: &str, registry: &str) -> Result<RegistryCredentials, CredentialsError> {
    let fail = |reason: String| CredentialsError::Helper {
        helper: helper.into(),
        registry: registry.into(),
        reason,
    };
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "credentials not found" is an answer: no login for this registry.
        if text.contains("credentials not found") || String::from_utf8_lossy(&out.stderr).contains("not found") {
            return Ok(RegistryCredentials::Anonymous);
        }
        return Err(fail(format!("exit status {}: {}", out.status, text.trim())));
    }
    let a: HelperAnswer = serde_json::from_str(&text).map_err(|e| fail(format!("its answer is not JSON: {e}")))?;
    Ok(match (a.username.as_str(), a.secret) {
        (_, s) if s.is_empty() => RegistryCredentials::Anonymous,
        // Docker's convention for an identity token: the user name `<token>`.
        ("<token>", s) => RegistryCredentials::Bearer { token: s },
        (u, s) => RegistryCredentials::Basic {
            username: u.to_string(),
            password: s,
        },
    })
}

/// The credentials Docker would use for `registry` (`host[:port]`, `docker.io` for Hub).
pub fn credentials_for(registry: &str) -> Result<RegistryCredentials, CredentialsError> {
    let Some(path) = config_path() else {
        return Ok(RegistryCredentials::Anonymous);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryCredentials::Anonymous),
        Err(e) => {
            return Err(CredentialsError::Config {
                path,
                reason: e.to_string(),
            })
        }
    };
    let config: Config = serde_json::from_str(&text).map_err(|e| CredentialsError::Config {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let keys = keys_for(registry);
    if let Some((key, helper)) = keys.iter().find_map(|k| config.cred_helpers.get(k).map(|h| (k, h))) {
        return ask_helper(helper, key, registry);
    }
    if let Some(store) = &config.creds_store {
        let server = if keys[0] == DOCKER_HUB { DOCKER_HUB } else { registry };
        return ask_helper(store, server, registry);
    }
    let Some(entry) = keys.iter().find_map(|k| config.auths.get(k)) else {
        return Ok(RegistryCredentials::Anonymous);
    };
    if let Some(token) = entry.registry_token.clone().filter(|t| !t.is_empty()) {
        return Ok(RegistryCredentials::Bearer { token });
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(RegistryCredentials::Basic {
            username: u.clone(),
            password: p.clone(),
        });
    }
    let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) else {
        return Ok(RegistryCredentials::Anonymous);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| CredentialsError::Config {
            path: path.clone(),
            reason: format!("auths.{registry}.auth is not base64 of user:password"),
        })?;
    let (u, p) = decoded.split_once(':').ok_or_else(|| CredentialsError::Config {
        path,
        reason: format!("auths.{registry}.auth is not user:password"),
    })?;
    Ok(RegistryCredentials::Basic {
        username: u.into(),
        password: p.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auths_helpers_and_hub_aliases_are_read_as_docker_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-fake");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread s\necho \"{\\\"Username\\\":\\\"bob\\\",\\\"Secret\\\":\\\"for-$s\\\"}\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"YWxpY2U6czNjcmV0"},"r.example:5000":{"username":"u","password":"p"}},
               "credHelpers":{"helped.example":"fake"}}"#,
        )
        .unwrap();
        // One test sets the process environment: the only one reading it.
        std::env::set_var("DOCKER_CONFIG", dir.path());
        let path = std::env::var("PATH").unwrap_or_default();
        std::env::set_var("PATH", format!("{}:{path}", dir.path().display()));
        assert_eq!(
            credentials_for("docker.io").unwrap(),
            RegistryCredentials::Basic {
                username: "alice".into(),
                password: "s3cret".into()
            }
        );
        assert_eq!(
            credentials_for("r.example:5000").unwrap(),
            RegistryCredentials::Basic {
                username: "u".into(),
                password: "p".into()
            }
        );
        assert_eq!(
            credentials_for("helped.example").unwrap(),
            RegistryCredentials::Basic {
                username: "bob".into(),
                password: "for-helped.example".into()
            }
        );
        assert_eq!(
            credentials_for("other.example").unwrap(),
            RegistryCredentials::Anonymous
        );
        std::env::set_var("PATH", path);
    }
}
