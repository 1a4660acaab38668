//! Talking to an lcached: one HTTP/1.1 request per connection over its Unix socket, TCP or
//! TCP with TLS (rustls, trusting the CA file given, else the system's roots), with
//! `Authorization: Bearer` when a token is given. The client (`lcache`) and lcached's
//! upstream tier both speak through it, so there is one transport to harden.

mod stall_guard;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lcache_proto::endpoint::Endpoint;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::stall_guard::StallGuard;

/// A request body: bytes in memory or a file streamed.
pub type ReqBody = BoxBody<Bytes, std::io::Error>;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Nothing answers at the address.
    #[error("no lcached answers at {endpoint} ({reason})")]
    Unreachable {
        /// The address tried.
        endpoint: String,
        /// The connection error.
        reason: String,
    },
    /// The exchange broke off or made no sense.
    #[error("the exchange with {endpoint} failed: {reason}")]
    Protocol {
        /// The address.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// The request could not be built (a path or token that is not valid HTTP).
    #[error("cannot build the request: {0}")]
    Encode(String),
    /// Connected, then nothing moved either way for too long (an overloaded server, or a
    /// network that drops packets).
    #[error("{endpoint} stopped answering: nothing came or went for {} s — is it overloaded, or is a firewall dropping packets?", after.as_secs())]
    Stalled {
        /// The address.
        endpoint: String,
        /// How long nothing moved.
        after: std::time::Duration,
    },
    /// TLS could not be set up: no usable CA, or a bad server name.
    #[error("cannot set up TLS for {endpoint}: {reason}")]
    Tls {
        /// The address.
        endpoint: String,
        /// What is wrong, and what to do.
        reason: String,
    },
}

/// Where the system keeps its CA bundle (Debian's ca-certificates).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A TLS client configuration trusting the CAs in `ca_file` (PEM), else the system's.
pub fn tls_config(endpoint: &Endpoint, ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, RemoteError> {
    let tls_err = |reason: String| RemoteError::Tls {
        endpoint: endpoint.to_string(),
        reason,
    };
    let path = ca_file.unwrap_or(Path::new(SYSTEM_ROOTS));
    let pem = std::fs::read(path).map_err(|e| {
        tls_err(format!(
            "cannot read the CA file {}: {e} — pass the CA that signed the daemon's certificate with --ca-file (or --upstream-ca)",
            path.display()
        ))
    })?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| tls_err(format!("{} is not PEM: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| tls_err(format!("{}: a certificate is unusable: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(tls_err(format!("{} holds no certificate", path.display())));
    }
    Ok(Arc::new(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// An lcached to talk to, and the token to show it.
#[derive(Clone)]
pub struct Remote {
    /// Its address.
    pub endpoint: Endpoint,
    /// The bearer token, for TCP listeners (the Unix socket needs none).
    pub token: Option<String>,
    /// For `https://` endpoints: whom to trust.
    tls: Option<Arc<ClientConfig>>,
    /// Over the network: how long a connection may make no progress (connecting, or no
    /// byte sent or received) before the request fails. The Unix socket has none: a local
    /// plan of a huge context may rightly be silent for minutes.
    stall: Option<Duration>,
}

/// How long a network exchange may make no progress, unless set otherwise.
pub const DEFAULT_STALL: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Remote")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// An empty body.
pub fn empty() -> ReqBody {
    bytes(Bytes::new())
}

/// A body from bytes.
pub fn bytes(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

impl Remote {
    /// A remote at `endpoint` showing `token`; an `https://` one trusts `ca_file` (else the
    /// system's CAs).
    pub fn new(endpoint: Endpoint, token: Option<String>, ca_file: Option<&Path>) -> Result<Self, RemoteError> {
        let tls = match &endpoint {
            Endpoint::Tls(_) => Some(tls_config(&endpoint, ca_file)?),
            _ => None,
        };
        let stall = match endpoint {
            Endpoint::Unix(_) => None,
            Endpoint::Tcp(_) | Endpoint::Tls(_) => Some(DEFAULT_STALL),
        };
        Ok(Self {
            endpoint,
            token,
            tls,
            stall,
        })
    }

    /// This remote with network exchanges failing after `limit` without progress.
    pub fn with_stall_timeout(mut self, limit: Duration) -> Self {
        if self.stall.is_some() {
            self.stall = Some(limit);
        }
        self
    }

    fn stalled(&self, e: &(dyn std::error::Error + 'static)) -> Option<RemoteError> {
        let after = self.stall?;
        let mut cause = Some(e);
        while let Some(c) = cause {
            if c.downcast_ref::<std::io::Error>().is_some_and(stall_guard::is_stall) {
                return Some(RemoteError::Stalled {
                    endpoint: self.endpoint.to_string(),
                    after,
                });
            }
            cause = c.source();
        }
        None
    }

    /// Connects to `addr` within the stall limit, guarded from then on.
    async fn connect_tcp(&self, addr: &str) -> Result<StallGuard<tokio::net::TcpStream>, RemoteError> {
        let unreachable = |reason: String| RemoteError::Unreachable {
            endpoint: self.endpoint.to_string(),
            reason,
        };
        let limit = self.stall.unwrap_or(DEFAULT_STALL);
        let s = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| unreachable(format!("no answer to connecting within {} s", limit.as_secs())))?
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = s.set_nodelay(true);
        Ok(StallGuard::new(s, limit))
    }

    fn protocol(&self, e: impl std::fmt::Display) -> RemoteError {
        RemoteError::Protocol {
            endpoint: self.endpoint.to_string(),
            reason: e.to_string(),
        }
    }

    /// Sends one request of `len` body bytes; returns the answer with its body unread.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: ReqBody,
        len: u64,
    ) -> Result<Response<Incoming>, RemoteError> {
        self.send_typed(method, path, "application/json", body, len).await
    }

    /// [`Remote::send`] with a body of `content_type`.
    pub async fn send_typed(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: ReqBody,
        len: u64,
    ) -> Result<Response<Incoming>, RemoteError> {
        self.send_with(method, path, &[("content-type", content_type)], body, Some(len))
            .await
    }

    /// A `GET` of the bytes of `path` from `first` on (`Range: bytes=FIRST-`): a server
    /// that serves ranges answers 206, one that does not 200 with every byte.
    pub async fn get_from(&self, path: &str, first: u64) -> Result<Response<Incoming>, RemoteError> {
        let range = format!("bytes={first}-");
        let headers = [("content-type", "application/json"), ("range", range.as_str())];
        self.send_with(Method::GET, path, &headers, empty(), Some(0)).await
    }

    /// Sends one request with `headers` (a content type among them); a body of `len` bytes,
    /// or of a length not known ahead (`None`: sent chunked, as a body compressed on the
    /// way is).
    pub async fn send_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
        len: Option<u64>,
    ) -> Result<Response<Incoming>, RemoteError> {
        let unreachable = |e: std::io::Error| RemoteError::Unreachable {
            endpoint: self.endpoint.to_string(),
            reason: e.to_string(),
        };
        let mut sender = match &self.endpoint {
            Endpoint::Unix(p) => {
                self.handshake(tokio::net::UnixStream::connect(p).await.map_err(unreachable)?)
                    .await?
            }
            Endpoint::Tcp(a) => self.handshake(self.connect_tcp(a).await?).await?,
            Endpoint::Tls(a) => {
                let s = self.connect_tcp(a).await?;
                let config = self.tls.clone().ok_or_else(|| RemoteError::Tls {
                    endpoint: self.endpoint.to_string(),
                    reason: "made without a TLS configuration".into(),
                })?;
                let name = ServerName::try_from(self.endpoint.host().unwrap_or_default().to_string()).map_err(|e| {
                    RemoteError::Tls {
                        endpoint: self.endpoint.to_string(),
                        reason: format!("not a server name: {e}"),
                    }
                })?;
                let tls = TlsConnector::from(config).connect(name, s).await.map_err(|e| {
                    if stall_guard::is_stall(&e) {
                        return RemoteError::Stalled {
                            endpoint: self.endpoint.to_string(),
                            after: self.stall.unwrap_or(DEFAULT_STALL),
                        };
                    }
                    RemoteError::Tls {
                    endpoint: self.endpoint.to_string(),
                    reason: format!("handshake failed: {e} — is the daemon's certificate signed by the CA you trust, and for this host name?"),
                }
                })?;
                self.handshake(tls).await?
            }
        };
        let host = match &self.endpoint {
            Endpoint::Tcp(a) | Endpoint::Tls(a) => a.clone(),
            Endpoint::Unix(_) => "lcached".to_string(),
        };
        let mut req = Request::builder().method(method).uri(path).header("host", host);
        if let Some(len) = len {
            req = req.header("content-length", len);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(body).map_err(|e| RemoteError::Encode(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| self.stalled(&e).unwrap_or_else(|| self.protocol(e)))
    }

    /// Sends one request and reads the whole answer.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: ReqBody,
        len: u64,
    ) -> Result<(StatusCode, Bytes), RemoteError> {
        let resp = self.send(method, path, body, len).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.stalled(&e).unwrap_or_else(|| self.protocol(e)))?
            .to_bytes();
        Ok((status, body))
    }

    async fn handshake<S>(&self, stream: S) -> Result<hyper::client::conn::http1::SendRequest<ReqBody>, RemoteError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}
