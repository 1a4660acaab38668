//! Which daemon a command talks to: `--daemon`/`LCACHE_DAEMON` if given, else the default
//! socket; `--offline` (or, for `lcache keys`, no daemon at the default socket) means none.

use std::os::unix::fs::MetadataExt;

use lcache_proto::endpoint::{default_socket, Endpoint};

use crate::daemon_client::DaemonClient;
use crate::errors::ClientError;

/// The daemon address this process uses when none is given.
pub fn default_endpoint() -> Endpoint {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    Endpoint::Unix(default_socket(uid, std::env::var("XDG_RUNTIME_DIR").ok().as_deref()))
}

/// A client for the chosen daemon, and whether the user named it.
pub fn daemon(explicit: Option<&Endpoint>) -> Result<(DaemonClient, bool), ClientError> {
    match explicit {
        Some(e) => Ok((DaemonClient::new(e.clone())?, true)),
        None => Ok((DaemonClient::new(default_endpoint())?, false)),
    }
}
