//! Talking to an lcached: one HTTP/1.1 request per connection over its Unix socket or TCP,
//! with `Authorization: Bearer` when a token is given. The client (`lcache`) and lcached's
//! upstream tier both speak through it, so there is one transport to harden.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lcache_proto::endpoint::Endpoint;

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
}

/// An lcached to talk to, and the token to show it.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Its address.
    pub endpoint: Endpoint,
    /// The bearer token, for TCP listeners (the Unix socket needs none).
    pub token: Option<String>,
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
        let unreachable = |e: std::io::Error| RemoteError::Unreachable {
            endpoint: self.endpoint.to_string(),
            reason: e.to_string(),
        };
        let mut sender = match &self.endpoint {
            Endpoint::Unix(p) => {
                self.handshake(tokio::net::UnixStream::connect(p).await.map_err(unreachable)?)
                    .await?
            }
            Endpoint::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await.map_err(unreachable)?;
                let _ = s.set_nodelay(true);
                self.handshake(s).await?
            }
        };
        let host = match &self.endpoint {
            Endpoint::Tcp(a) => a.clone(),
            Endpoint::Unix(_) => "lcached".to_string(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .header("content-type", "application/json")
            .header("content-length", len);
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(body).map_err(|e| RemoteError::Encode(e.to_string()))?;
        sender.send_request(req).await.map_err(|e| self.protocol(e))
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
            .map_err(|e| self.protocol(e))?
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
