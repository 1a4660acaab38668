//! What pulls and pushes share: an OCI distribution client (the `oci-client` crate) set up
//! for one registry — plain HTTP only for loopback and `--insecure-registry` hosts, as
//! Docker allows — the client's credentials in its terms, and registry failures turned
//! into errors that say what to do.

use std::time::Duration;

use lcache_proto::wire::RegistryCredentials;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// Why a pull or push failed; the words are the message the user sees.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse.
    #[error("'{reference}' is not an image reference: {reason} — write [REGISTRY/]NAME[:TAG|@sha256:DIGEST]")]
    BadReference {
        /// As given.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The registry does not have it.
    #[error("{reference}: not found on {registry} — check the name and tag (`skopeo list-tags docker://{repository}` lists the tags)")]
    NotFound {
        /// The reference.
        reference: String,
        /// The registry.
        registry: String,
        /// The repository.
        repository: String,
    },
    /// Credentials missing or refused.
    #[error("{reference}: {registry} refused the credentials{detail} — log in with `docker login {registry}` (lcache reads Docker's config.json and credential helpers)")]
    Unauthorized {
        /// The reference.
        reference: String,
        /// The registry.
        registry: String,
        /// What the registry said, if anything.
        detail: String,
    },
    /// Rate limited.
    #[error("{reference}: {registry} is rate limiting requests — wait, log in (authenticated pulls have a higher limit), or use a mirror")]
    RateLimited {
        /// The reference.
        reference: String,
        /// The registry.
        registry: String,
    },
    /// The index has no manifest for the platform.
    #[error("{reference} has no image for {platform} (it has: {available}) — build with --platform one of those")]
    WrongPlatform {
        /// The reference.
        reference: String,
        /// Asked for.
        platform: String,
        /// What the index lists.
        available: String,
    },
    /// Not reachable.
    #[error("{reference}: cannot reach {registry}: {reason} — check the network and the registry's name{}", if registry.ends_with("docker.io") { String::new() } else { format!("; a registry that serves plain HTTP needs --insecure-registry {registry}") })]
    Unreachable {
        /// The reference.
        reference: String,
        /// The registry.
        registry: String,
        /// Why.
        reason: String,
    },
    /// A blob or manifest did not have its digest, or the registry answered nonsense.
    #[error("{reference}: {reason} — nothing of it was kept; try again, and report it to the registry's owner if it persists")]
    Invalid {
        /// The reference.
        reference: String,
        /// What was wrong.
        reason: String,
    },
    /// Something lcache cannot store or build from.
    #[error("{reference}: {reason}")]
    Unsupported {
        /// The reference.
        reference: String,
        /// What.
        reason: String,
    },
    /// The local image to push is missing.
    #[error("no image {0} in this daemon — build it with `lcache build -t {0}` or pull it first")]
    NoLocalImage(String),
    /// The daemon's store failed.
    #[error("the daemon's store failed: {0}")]
    Store(String),
}

impl RegistryError {
    /// The HTTP status the daemon answers with.
    pub fn status(&self) -> hyper::StatusCode {
        use hyper::StatusCode as S;
        match self {
            Self::BadReference { .. } | Self::WrongPlatform { .. } | Self::Unsupported { .. } => S::BAD_REQUEST,
            Self::NotFound { .. } | Self::NoLocalImage(_) => S::NOT_FOUND,
            Self::Unauthorized { .. } => S::UNAUTHORIZED,
            Self::RateLimited { .. } => S::TOO_MANY_REQUESTS,
            Self::Unreachable { .. } | Self::Invalid { .. } => S::BAD_GATEWAY,
            Self::Store(_) => S::INSUFFICIENT_STORAGE,
        }
    }
}

/// Parses a reference as Docker does (`debian` is `docker.io/library/debian:latest`).
pub fn parse_reference(reference: &str) -> Result<Reference, RegistryError> {
    reference.parse::<Reference>().map_err(|e| RegistryError::BadReference {
        reference: reference.into(),
        reason: e.to_string(),
    })
}

/// Whether `registry` (`host[:port]`) is on this machine, where Docker allows plain HTTP.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A client for `reference`'s registry: HTTPS, except for loopback and `insecure` hosts.
pub fn client_for(reference: &Reference, insecure: &[String]) -> Client {
    let registry = reference.resolve_registry().to_string();
    let plain = is_loopback(&registry) || insecure.iter().any(|h| h == &registry || h == reference.registry());
    let protocol = if plain {
        ClientProtocol::HttpsExcept(vec![registry, reference.registry().to_string()])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        // Manifests are picked here, by the build's platform, not the daemon's.
        platform_resolver: None,
        // One streamed PUT per blob, not a PATCH per chunk.
        use_monolithic_push: true,
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(300)),
        https_proxy: std::env::var("HTTPS_PROXY")
            .or_else(|_| std::env::var("https_proxy"))
            .ok(),
        http_proxy: std::env::var("HTTP_PROXY")
            .or_else(|_| std::env::var("http_proxy"))
            .ok(),
        no_proxy: std::env::var("NO_PROXY").or_else(|_| std::env::var("no_proxy")).ok(),
        ..Default::default()
    })
}

/// The client's credentials as `oci-client` takes them.
pub fn auth_of(c: &RegistryCredentials) -> RegistryAuth {
    match c {
        RegistryCredentials::Anonymous => RegistryAuth::Anonymous,
        RegistryCredentials::Basic { username, password } => RegistryAuth::Basic(username.clone(), password.clone()),
        RegistryCredentials::Bearer { token } => RegistryAuth::Bearer(token.clone()),
    }
}

/// A registry failure in words a user can act on.
pub fn explain(reference: &Reference, e: OciDistributionError) -> RegistryError {
    let registry = reference.resolve_registry().to_string();
    let name = reference.whole();
    let not_found = || RegistryError::NotFound {
        reference: name.clone(),
        registry: registry.clone(),
        repository: format!("{}/{}", reference.registry(), reference.repository()),
    };
    let unauthorized = |detail: String| RegistryError::Unauthorized {
        reference: name.clone(),
        registry: registry.clone(),
        detail,
    };
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
        OciDistributionError::AuthenticationFailure(d) => unauthorized(format!(" ({d})")),
        OciDistributionError::UnauthorizedError { .. } => unauthorized(String::new()),
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let said = envelope
                .errors
                .iter()
                .map(|e| e.message.clone())
                .collect::<Vec<_>>()
                .join("; ");
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound
                )
            }) {
                not_found()
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                unauthorized(format!(" ({said})"))
            } else if codes.iter().any(|c| matches!(c, OciErrorCode::Toomanyrequests)) {
                RegistryError::RateLimited {
                    reference: name,
                    registry,
                }
            } else {
                RegistryError::Invalid {
                    reference: name,
                    reason: format!("the registry refused: {said}"),
                }
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => not_found(),
        OciDistributionError::ServerError {
            code: 401 | 403,
            message,
            ..
        } => unauthorized(format!(" ({message})")),
        OciDistributionError::ServerError { code: 429, .. } => RegistryError::RateLimited {
            reference: name,
            registry,
        },
        OciDistributionError::RequestError(e) => RegistryError::Unreachable {
            reference: name,
            registry,
            reason: error_chain(&e),
        },
        OciDistributionError::DigestError(e) => RegistryError::Invalid {
            reference: name,
            reason: e.to_string(),
        },
        other => RegistryError::Invalid {
            reference: name,
            reason: other.to_string(),
        },
    }
}

/// An error with its causes, which reqwest keeps apart.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_names_and_loopback_are_read_as_docker_reads_them() {
        let r = parse_reference("debian").unwrap();
        assert_eq!(r.whole(), "docker.io/library/debian:latest");
        let r = parse_reference("127.0.0.1:5000/app:1").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "app", Some("1"))
        );
        assert!(is_loopback("127.0.0.1:5000") && is_loopback("localhost:5000") && is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example.com:5000") && !is_loopback("docker.io"));
        assert!(parse_reference("no spaces allowed").is_err());
        assert!(parse_reference("app@sha256:zz").is_err());
    }
}
