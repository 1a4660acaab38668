//! Talking to lcached over its Unix socket or TCP: one HTTP/1.1 request at a time, with the
//! daemon's `{error, hint}` bodies turned into [`ClientError::Daemon`].

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use lcache_proto::endpoint::Endpoint;
use lcache_proto::wire::{ErrorBody, PlanInputs, PlanResponse, StatusResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::errors::ClientError;

/// A connection-per-request client of one daemon.
pub struct DaemonClient {
    endpoint: Endpoint,
    rt: tokio::runtime::Runtime,
}

impl DaemonClient {
    /// A client for `endpoint` (nothing is connected yet).
    pub fn new(endpoint: Endpoint) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Local(format!("cannot start the async runtime: {e}")))?;
        Ok(Self { endpoint, rt })
    }

    /// The daemon's address.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends one request; returns the status and the whole body.
    pub fn call(&self, method: Method, path: &str, body: Bytes) -> Result<(StatusCode, Bytes), ClientError> {
        self.rt.block_on(request(&self.endpoint, method, path, body))
    }

    /// Sends JSON (or nothing) and reads JSON, mapping error statuses to [`ClientError::Daemon`].
    pub fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).map_err(|e| ClientError::Local(e.to_string()))?),
            None => Bytes::new(),
        };
        let (status, body) = self.call(method, path, bytes)?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => ClientError::Daemon {
                    status: status.as_u16(),
                    error: e.error,
                    hint: e.hint,
                },
                Err(_) => ClientError::Protocol(format!(
                    "status {status} with body {:?}",
                    String::from_utf8_lossy(&body)
                )),
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<StatusResponse, ClientError> {
        self.json(Method::GET, "/v1/status", None::<&()>)
    }

    /// `POST /v1/plan`.
    pub fn plan(&self, inputs: &PlanInputs) -> Result<PlanResponse, ClientError> {
        self.json(Method::POST, "/v1/plan", Some(inputs))
    }
}

async fn request(ep: &Endpoint, method: Method, path: &str, body: Bytes) -> Result<(StatusCode, Bytes), ClientError> {
    let unreachable = |e: std::io::Error| ClientError::DaemonUnreachable {
        endpoint: ep.to_string(),
        reason: e.to_string(),
    };
    let proto = |e: hyper::Error| ClientError::Protocol(e.to_string());
    let mut sender = match ep {
        Endpoint::Unix(p) => handshake(tokio::net::UnixStream::connect(p).await.map_err(unreachable)?).await?,
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await.map_err(unreachable)?;
            let _ = s.set_nodelay(true);
            handshake(s).await?
        }
    };
    let host = match ep {
        Endpoint::Tcp(a) => a.clone(),
        Endpoint::Unix(_) => "lcached".to_string(),
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| ClientError::Local(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(proto)?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(proto)?.to_bytes();
    Ok((status, body))
}

async fn handshake<S>(stream: S) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
