//! Where a daemon listens or is reached: `unix:///path/to.sock`, `tcp://host:port` (also
//! `http://host:port` for clients), `https://host:port` (TCP with TLS), and the default
//! locations.

use std::path::{Path, PathBuf};

/// A daemon address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
    /// A TCP `host:port` with TLS.
    Tls(String),
}

impl Endpoint {
    /// The host of a TCP address (for TLS's server name), without brackets.
    pub fn host(&self) -> Option<&str> {
        match self {
            Self::Tcp(a) | Self::Tls(a) => Some(
                a.rsplit_once(':')
                    .map_or(a.as_str(), |(h, _)| h)
                    .trim_matches(['[', ']']),
            ),
            Self::Unix(_) => None,
        }
    }
}

/// Why an address could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// `unix://` with nothing after it.
    #[error("'{0}' names no socket path: write unix:///path/to/lcached.sock")]
    NoSocketPath(String),
    /// A TCP address without a port.
    #[error("'{0}' has no port: write tcp://host:port, e.g. tcp://127.0.0.1:7878")]
    NoPort(String),
    /// Neither a socket path nor a TCP address.
    #[error("'{0}' is not an address: write unix:///path/to/lcached.sock, tcp://host:port or https://host:port")]
    NotAnAddress(String),
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, EndpointError> {
        if let Some(p) = s.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(EndpointError::NoSocketPath(s.into()));
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp://").or_else(|| s.strip_prefix("http://")) {
            let a = a.trim_end_matches('/');
            if !a.contains(':') {
                return Err(EndpointError::NoPort(s.into()));
            }
            return Ok(Self::Tcp(a.to_string()));
        }
        if let Some(a) = s.strip_prefix("https://") {
            let a = a.trim_end_matches('/');
            if !a.contains(':') {
                return Err(EndpointError::NoPort(s.into()));
            }
            return Ok(Self::Tls(a.to_string()));
        }
        if s.starts_with('/') {
            return Ok(Self::Unix(PathBuf::from(s)));
        }
        Err(EndpointError::NotAnAddress(s.into()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::Tls(a) => write!(f, "https://{a}"),
        }
    }
}

/// The default socket: `/run/lcache/lcached.sock` for root, else under
/// `$XDG_RUNTIME_DIR/lcache/`, else `/tmp/lcache-<uid>/`.
pub fn default_socket(uid: u32, runtime_dir: Option<&str>) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/run/lcache/lcached.sock");
    }
    match runtime_dir.filter(|d| !d.is_empty()) {
        Some(d) => Path::new(d).join("lcache/lcached.sock"),
        None => PathBuf::from(format!("/tmp/lcache-{uid}/lcached.sock")),
    }
}

/// The default store: `/var/lib/lcache` for root, else `$XDG_DATA_HOME/lcache`, else
/// `$HOME/.local/share/lcache`.
pub fn default_store(uid: u32, data_home: Option<&str>, home: Option<&str>) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/var/lib/lcache");
    }
    match (data_home.filter(|d| !d.is_empty()), home) {
        (Some(d), _) => Path::new(d).join("lcache"),
        (None, Some(h)) => Path::new(h).join(".local/share/lcache"),
        (None, None) => PathBuf::from(format!("/tmp/lcache-{uid}/store")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_back() {
        let u: Endpoint = "unix:///run/x.sock".parse().unwrap();
        assert_eq!(u, Endpoint::Unix("/run/x.sock".into()));
        assert_eq!(u.to_string(), "unix:///run/x.sock");
        assert_eq!(
            "http://127.0.0.1:7878/".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:7878".into())
        );
        assert_eq!(
            "tcp://nohost".parse::<Endpoint>(),
            Err(EndpointError::NoPort("tcp://nohost".into()))
        );
        assert!("ftp://x".parse::<Endpoint>().is_err());
        let tls: Endpoint = "https://cache.internal:7879".parse().unwrap();
        assert_eq!(tls, Endpoint::Tls("cache.internal:7879".into()));
        assert_eq!(tls.host(), Some("cache.internal"));
        assert_eq!(tls.to_string(), "https://cache.internal:7879");
    }

    #[test]
    fn defaults_follow_root_and_xdg() {
        assert_eq!(
            default_socket(0, Some("/run/user/0")),
            PathBuf::from("/run/lcache/lcached.sock")
        );
        assert_eq!(
            default_socket(1000, Some("/run/user/1000")),
            PathBuf::from("/run/user/1000/lcache/lcached.sock")
        );
        assert_eq!(
            default_store(1000, None, Some("/home/u")),
            PathBuf::from("/home/u/.local/share/lcache")
        );
    }
}
