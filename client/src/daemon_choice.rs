//! Which daemon a command talks to: `--daemon`/`LCACHE_DAEMON` if given, else the default
//! socket; `--offline` (or, for `lcache keys`, no daemon at the default socket) means none.

use std::os::unix::fs::MetadataExt;

use lcache_proto::endpoint::{default_socket, Endpoint};

use crate::cli::DaemonArgs;
use crate::daemon_client::{transport, DaemonClient};
use crate::errors::ClientError;
use lcache_remote::Remote;

/// The daemon address this process uses when none is given.
pub fn default_endpoint() -> Endpoint {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    Endpoint::Unix(default_socket(uid, std::env::var("XDG_RUNTIME_DIR").ok().as_deref()))
}

/// The token to show a daemon: `--token-file`'s contents, else `LCACHE_TOKEN`, else none.
pub fn token(args: &DaemonArgs) -> Result<Option<String>, ClientError> {
    if let Some(path) = &args.token_file {
        let t = std::fs::read_to_string(path).map_err(|source| ClientError::TokenFile {
            path: path.clone(),
            source,
        })?;
        return Ok(Some(t.trim().to_string()));
    }
    Ok(std::env::var("LCACHE_TOKEN").ok().filter(|t| !t.trim().is_empty()))
}

/// A client for the chosen daemon, and whether the user named it.
pub fn daemon(args: &DaemonArgs) -> Result<(DaemonClient, bool), ClientError> {
    let token = token(args)?;
    let (endpoint, named) = match &args.daemon {
        Some(e) => (e.clone(), true),
        None => (default_endpoint(), false),
    };
    let remote = Remote::new(endpoint, token, args.ca_file.as_deref()).map_err(transport)?;
    Ok((DaemonClient::with_remote(remote)?, named))
}
