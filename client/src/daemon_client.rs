//! Talking to lcached over its Unix socket or TCP: one HTTP/1.1 request at a time, with the
//! daemon's `{error, hint}` bodies turned into [`CacheError::Refused`].

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, StatusCode};
use lcache_image::image_draft::DeferredBuild;
use lcache_image::sha256_stream::Sha256Stream;
use lcache_proto::endpoint::Endpoint;
use lcache_proto::wire::{
    BlobPart, BlobParts, BuildRecord, ErrorBody, ImageRecord, LayerDiffId, LayerParts, LayerRef, LayerTail, LinkedBlob,
    NamedLayer, PlanInputs, PlanResponse, ProvisionalNames, ResolvedNames, StatusResponse, StepRecord, BLOB_PARTS_TYPE,
};
use lcache_remote::{Remote, RemoteError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use lcache_builder::errors::CacheError;

/// A connection-per-request client of one daemon.
pub struct DaemonClient {
    remote: Remote,
    rt: tokio::runtime::Runtime,
    /// The scope step records are written into, then the scopes lookups fall back to.
    scopes: Vec<String>,
    /// Keys whose lookup missed without lcached's upstream being asked, and why.
    upstream_unavailable: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

/// `%XX`-escapes what a scope name may hold that a query may not (`/`).
fn query_value(v: &str) -> String {
    v.replace('%', "%25").replace('/', "%2F")
}

/// A transport error as the builder's [`CacheError`].
pub fn transport(e: RemoteError) -> CacheError {
    match e {
        RemoteError::Unreachable { endpoint, reason } => CacheError::Unreachable { endpoint, reason },
        RemoteError::Protocol { reason, .. } => CacheError::Protocol(reason),
        RemoteError::Encode(m) => CacheError::Encode(m),
        RemoteError::Tls { endpoint, reason } => CacheError::Tls { endpoint, reason },
        RemoteError::Stalled { endpoint, after } => CacheError::Stalled {
            endpoint,
            secs: after.as_secs(),
        },
    }
}

/// The layer a daemon named (`what` answered `status` and `resp`), or `None` where it does
/// not name layers so: the endpoint is served only on its socket (403), or the daemon is
/// older than it (a 404 naming no endpoint; a 404 for a missing base blob is a refusal like
/// any other).
fn named_layer(status: StatusCode, resp: &Bytes, what: &str) -> Result<Option<NamedLayer>, CacheError> {
    match (status, daemon_error(status, resp)) {
        (StatusCode::FORBIDDEN, _) => Ok(None),
        (StatusCode::NOT_FOUND, CacheError::Refused { error, .. }) if error.starts_with("no endpoint") => Ok(None),
        (s, _) if s.is_success() => serde_json::from_slice(resp)
            .map(Some)
            .map_err(|e| CacheError::Protocol(format!("{what} answered what is not a layer: {e}"))),
        (_, refused) => Err(refused),
    }
}

impl DaemonClient {
    /// A client for `endpoint` (nothing is connected yet), showing `token` if given; an
    /// `https://` endpoint trusts the system's CAs.
    pub fn new(endpoint: Endpoint, token: Option<String>) -> Result<Self, CacheError> {
        Self::with_remote(Remote::new(endpoint, token, None).map_err(transport)?)
    }

    /// A client for `remote` (nothing is connected yet).
    pub fn with_remote(remote: Remote) -> Result<Self, CacheError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CacheError::Runtime)?;
        Ok(Self {
            remote,
            rt,
            scopes: Vec::new(),
            upstream_unavailable: Default::default(),
        })
    }

    /// Writes step records into `scope` and looks them up there, then in `fallbacks`.
    pub fn set_scopes(&mut self, scope: &str, fallbacks: &[String]) {
        self.scopes = std::iter::once(scope.to_string())
            .chain(fallbacks.iter().cloned())
            .collect();
    }

    /// `?scope=…&fallback=…` for lookups, `?scope=…` for writes (empty when unscoped).
    fn scope_query(&self, lookup: bool) -> String {
        let Some((scope, fallbacks)) = self.scopes.split_first() else {
            return String::new();
        };
        let mut q = format!("?scope={}", query_value(scope));
        if lookup {
            for f in fallbacks {
                q.push_str(&format!("&fallback={}", query_value(f)));
            }
        }
        q
    }

    /// The daemon's address.
    pub fn endpoint(&self) -> &Endpoint {
        &self.remote.endpoint
    }

    /// Sends one request; returns the status and the whole body.
    pub fn call(&self, method: Method, path: &str, body: Bytes) -> Result<(StatusCode, Bytes), CacheError> {
        let len = body.len() as u64;
        let body = Full::new(body).map_err(|never| match never {}).boxed();
        self.rt
            .block_on(self.remote.request(method, path, body, len))
            .map_err(transport)
    }

    /// Sends JSON (or nothing) and reads JSON, mapping error statuses to [`CacheError::Refused`].
    pub fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, CacheError> {
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).map_err(|e| CacheError::Encode(e.to_string()))?),
            None => Bytes::new(),
        };
        let (status, body) = self.call(method, path, bytes)?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => CacheError::Refused {
                    status: status.as_u16(),
                    error: e.error,
                    hint: e.hint,
                },
                Err(_) => CacheError::Protocol(format!(
                    "status {status} with body {:?}",
                    String::from_utf8_lossy(&body)
                )),
            });
        }
        serde_json::from_slice(&body).map_err(|e| CacheError::Protocol(e.to_string()))
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<StatusResponse, CacheError> {
        self.json(Method::GET, "/v1/status", None::<&()>)
    }

    /// `POST /v1/plan`.
    pub fn plan(&self, inputs: &PlanInputs) -> Result<PlanResponse, CacheError> {
        self.json(Method::POST, "/v1/plan", Some(inputs))
    }

    /// `GET /v1/steps/{key}`: `None` is a miss.
    pub fn step(&self, key: &str) -> Result<Option<StepRecord>, CacheError> {
        let path = format!("/v1/steps/{key}{}", self.scope_query(true));
        let (status, body) = self.call(Method::GET, &path, Bytes::new())?;
        // A miss's answer says whether it may be the shared cache's, for `explain`.
        let unavailable = (status == StatusCode::NOT_FOUND)
            .then(|| serde_json::from_slice::<ErrorBody>(&body).ok())
            .flatten()
            .and_then(|e| e.upstream_unavailable);
        {
            let mut noted = self.upstream_unavailable.lock().unwrap_or_else(|p| p.into_inner());
            match unavailable {
                Some(why) => noted.insert(key.to_string(), why),
                None => noted.remove(key),
            };
        }
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(daemon_error(status, &body));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| CacheError::Protocol(e.to_string()))
    }

    /// Why the last lookup of `key` missed without lcached's upstream being asked, if so.
    pub fn upstream_unavailable(&self, key: &str) -> Option<String> {
        self.upstream_unavailable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// `PUT /v1/steps/{key}`.
    pub fn put_step(&self, rec: &StepRecord) -> Result<StepRecord, CacheError> {
        self.json(
            Method::PUT,
            &format!("/v1/steps/{}{}", rec.key, self.scope_query(false)),
            Some(rec),
        )
    }

    /// Uploads a blob unless the daemon has it.
    pub fn put_blob(&self, digest: &str, data: Bytes) -> Result<(), CacheError> {
        let (status, _) = self.call(Method::HEAD, &format!("/v1/blobs/{digest}"), Bytes::new())?;
        if status == StatusCode::OK {
            return Ok(());
        }
        let _: serde_json::Value = self.json_bytes(Method::PUT, &format!("/v1/blobs/{digest}"), data)?;
        Ok(())
    }

    /// `HEAD /v1/blobs/{digest}`: whether the daemon holds the blob whole.
    pub fn blob_present(&self, digest: &str) -> Result<bool, CacheError> {
        let (status, body) = self.call(Method::HEAD, &format!("/v1/blobs/{digest}"), Bytes::new())?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(daemon_error(s, &body)),
        }
    }

    /// Uploads `len` bytes of `file` from `offset` as blob `digest`, streamed (never whole in
    /// memory), unless the daemon has it. The daemon verifies the digest.
    pub fn put_blob_file(&self, digest: &str, file: &std::path::Path, offset: u64, len: u64) -> Result<(), CacheError> {
        use std::io::{Read, Seek};
        let (status, _) = self.call(Method::HEAD, &format!("/v1/blobs/{digest}"), Bytes::new())?;
        if status == StatusCode::OK {
            return Ok(());
        }
        let io = |source| CacheError::Io {
            action: "read",
            path: file.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(file).map_err(io)?;
        f.seek(std::io::SeekFrom::Start(offset)).map_err(io)?;
        let mut reader = f.take(len);
        let chunks = futures_util::stream::poll_fn(move |_| {
            let mut buf = vec![0u8; 256 * 1024];
            match reader.read(&mut buf) {
                Ok(0) => std::task::Poll::Ready(None),
                Ok(n) => {
                    buf.truncate(n);
                    std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
                }
                Err(e) => std::task::Poll::Ready(Some(Err(e))),
            }
        });
        let body = StreamBody::new(chunks).boxed();
        let (status, resp) = self
            .rt
            .block_on(
                self.remote
                    .request(Method::PUT, &format!("/v1/blobs/{digest}"), body, len),
            )
            .map_err(transport)?;
        if !status.is_success() {
            return Err(daemon_error(status, &resp));
        }
        Ok(())
    }

    /// Uploads blob `digest`, which is `file` (`len` bytes) but for its first `unwritten`
    /// bytes (`base`'s), as `parts`: only the `Sent` runs travel, the daemon takes the rest
    /// from its blob `base` and checks the whole against the digest. Refused (an older
    /// daemon), it is uploaded whole, its front filled from `base` first.
    pub fn put_blob_parts(
        &self,
        digest: &str,
        file: &std::path::Path,
        len: u64,
        (base, unwritten): (&str, u64),
        parts: &[BlobPart],
    ) -> Result<(), CacheError> {
        let (status, _) = self.call(Method::HEAD, &format!("/v1/blobs/{digest}"), Bytes::new())?;
        if status == StatusCode::OK {
            return Ok(());
        }
        match self.send_parts(digest, file, base, parts) {
            Err(CacheError::Refused { .. }) => {
                self.fill_front(file, base, unwritten)?;
                self.put_blob_file(digest, file, 0, len)
            }
            other => other,
        }
    }

    /// Writes blob `base`'s first `n` bytes over the front of `file`.
    fn fill_front(&self, file: &std::path::Path, base: &str, n: u64) -> Result<(), CacheError> {
        if n == 0 {
            return Ok(());
        }
        let io = |source| CacheError::Io {
            action: "fill in the front of the layer blob",
            path: file.to_path_buf(),
            source,
        };
        let f = std::fs::OpenOptions::new().write(true).open(file).map_err(io)?;
        let mut front = FrontOnly {
            out: std::io::BufWriter::new(f),
            left: n,
        };
        let got = self.blob_into(base, &mut front).map_err(|e| match e {
            CacheError::UnusableBlob { reason, .. } => CacheError::UnusableBlob {
                digest: base.to_string(),
                reason: format!(
                    "{reason}; it holds the front of the layer being stored, so run the build again \
                     (it will pack the layer whole)"
                ),
            },
            e => e,
        })?;
        if got < n {
            return Err(CacheError::Protocol(format!(
                "blob {base} has {got} bytes, fewer than the {n} the layer takes from it"
            )));
        }
        std::io::Write::flush(&mut front.out).map_err(io)
    }

    fn send_parts(
        &self,
        digest: &str,
        file: &std::path::Path,
        base: &str,
        parts: &[BlobPart],
    ) -> Result<(), CacheError> {
        let parts = BlobParts {
            base: base.to_string(),
            parts: parts.to_vec(),
        };
        let head = parts.head().map_err(|e| CacheError::Encode(e.to_string()))?;
        let (status, resp) = self.send_framed(
            Method::PUT,
            &format!("/v1/blobs/{digest}"),
            head,
            file,
            parts.sent_ranges(),
        )?;
        if !status.is_success() {
            return Err(daemon_error(status, &resp));
        }
        Ok(())
    }

    /// `POST /v1/layers`: a re-run COPY's layer sent as `layer` says (the sent runs read from
    /// `file`, where they lie in the blob), named by the daemon. `None` when the daemon
    /// does not name layers (an older one, or over TCP): the caller names it.
    pub fn put_layer(&self, file: &std::path::Path, layer: &LayerParts) -> Result<Option<NamedLayer>, CacheError> {
        let head = layer.head().map_err(|e| CacheError::Encode(e.to_string()))?;
        let (status, resp) = self.send_framed(Method::POST, "/v1/layers", head, file, layer.blob.sent_ranges())?;
        named_layer(status, &resp, "POST /v1/layers")
    }

    /// Whether lcached is reached through its Unix socket: on this machine, with its files.
    pub fn is_local(&self) -> bool {
        matches!(self.remote.endpoint, Endpoint::Unix(_))
    }

    /// `POST /v1/layers/linked`: a tar layer as runs of files on this machine, which lcached
    /// hard-links into its store and names (hashing it: the client does not). `None` when
    /// it does not take layers so (over TCP; an lcached older than the endpoint).
    pub fn put_linked(&self, linked: &LinkedBlob) -> Result<Option<NamedLayer>, CacheError> {
        let body = Bytes::from(serde_json::to_vec(linked).map_err(|e| CacheError::Encode(e.to_string()))?);
        let (status, resp) = self.call(Method::POST, "/v1/layers/linked", body)?;
        named_layer(status, &resp, "POST /v1/layers/linked")
    }

    /// `POST /v1/layers/provisional`: what provisional layer names came to, in order.
    pub fn resolve_layers(&self, names: &[String]) -> Result<Vec<Option<NamedLayer>>, CacheError> {
        let asked = ProvisionalNames { names: names.to_vec() };
        let resolved: ResolvedNames = self.json(Method::POST, "/v1/layers/provisional", Some(&asked))?;
        if resolved.layers.len() != names.len() {
            return Err(CacheError::Protocol(format!(
                "POST /v1/layers/provisional answered {} layers for {} names",
                resolved.layers.len(),
                names.len()
            )));
        }
        Ok(resolved.layers)
    }

    /// `POST /v1/layers/{digest}/diff-id`: the diff_id of a layer [`Self::put_layer`] named,
    /// once lcached has taken it.
    pub fn layer_diff_id(&self, digest: &str, tail: &LayerTail) -> Result<LayerDiffId, CacheError> {
        self.json(Method::POST, &format!("/v1/layers/{digest}/diff-id"), Some(tail))
    }

    /// The gzip form of the layer kept as the tar `digest` (lcached makes it once and keeps
    /// it), for an export.
    pub fn gzip_form(&self, digest: &str) -> Result<LayerRef, CacheError> {
        self.json(Method::POST, &format!("/v1/layers/{digest}/gzip"), None::<&()>)
    }

    /// Sends `head` then the bytes of `file` at `sent` (offset, length), streamed, as a
    /// `BLOB_PARTS_TYPE` body; returns the answer's status and body.
    fn send_framed(
        &self,
        method: Method,
        path: &str,
        head: Vec<u8>,
        file: &std::path::Path,
        sent: Vec<(u64, u64)>,
    ) -> Result<(StatusCode, Bytes), CacheError> {
        use std::os::unix::fs::FileExt;
        let sent_len: u64 = sent.iter().map(|(_, l)| l).sum();
        let f = std::fs::File::open(file).map_err(|source| CacheError::Io {
            action: "read",
            path: file.to_path_buf(),
            source,
        })?;
        let total = head.len() as u64 + sent_len;
        let mut head = Some(Bytes::from(head));
        let mut runs = sent.into_iter();
        let mut run: Option<(u64, u64)> = None;
        let chunks = futures_util::stream::poll_fn(move |_| {
            if let Some(h) = head.take() {
                return std::task::Poll::Ready(Some(Ok(Frame::data(h))));
            }
            loop {
                match run {
                    Some((_, 0)) | None => match runs.next() {
                        Some(r) => run = Some(r),
                        None => return std::task::Poll::Ready(None),
                    },
                    Some((offset, left)) => {
                        let mut buf = vec![0u8; left.min(256 * 1024) as usize];
                        return std::task::Poll::Ready(Some(match f.read_at(&mut buf, offset) {
                            Ok(0) => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                            Ok(n) => {
                                buf.truncate(n);
                                run = Some((offset + n as u64, left - n as u64));
                                Ok(Frame::data(Bytes::from(buf)))
                            }
                            Err(e) => Err(e),
                        }));
                    }
                }
            }
        });
        let body = StreamBody::new(chunks).boxed();
        self.rt
            .block_on(async {
                let resp = self
                    .remote
                    .send_typed(method, path, BLOB_PARTS_TYPE, body, total)
                    .await?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                Ok::<_, RemoteError>((status, body))
            })
            .map_err(transport)
    }

    /// Streams blob `digest` into `out`, checking it against its digest as it arrives; a
    /// missing or corrupt blob is [`CacheError::UnusableBlob`] (and `out` must then be
    /// discarded). Returns the blob's size.
    pub fn blob_into(&self, digest: &str, out: &mut dyn std::io::Write) -> Result<u64, CacheError> {
        let mut w = Sha256Stream::new(out);
        let n = self.blob_from(digest, 0, &mut w)?;
        let actual = w.digest();
        if actual != digest {
            return Err(CacheError::UnusableBlob {
                digest: digest.to_string(),
                reason: format!("arrived with digest {actual}: the stored copy is corrupt"),
            });
        }
        Ok(n)
    }

    /// Streams blob `digest`'s bytes from `first` on into `out` (`Range`), unchecked: a part
    /// of a blob cannot be checked against its digest, so this is for a blob the daemon
    /// checked when it took it and whose use checks it again (a layer's gzip members
    /// carry their CRC, and the blob made from them is checked whole by the daemon).
    /// Returns how many bytes were written.
    pub fn blob_from(&self, digest: &str, first: u64, out: &mut dyn std::io::Write) -> Result<u64, CacheError> {
        let (status, n, body) =
            self.rt
                .block_on(request_into(&self.remote, &format!("/v1/blobs/{digest}"), first, out))?;
        if status == StatusCode::NOT_FOUND {
            return Err(CacheError::UnusableBlob {
                digest: digest.to_string(),
                reason: "is not in lcached's store".into(),
            });
        }
        if !status.is_success() {
            return Err(daemon_error(status, &body));
        }
        Ok(n)
    }

    /// `GET /v1/images/{name}`: `None` if unknown.
    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>, CacheError> {
        match self.json(Method::GET, &format!("/v1/images/{}", encode_name(name)), None::<&()>) {
            Ok(i) => Ok(Some(i)),
            Err(CacheError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /v1/images/pull`.
    pub fn pull_image(
        &self,
        req: &lcache_proto::wire::PullRequest,
    ) -> Result<lcache_proto::wire::PullResponse, CacheError> {
        self.json(Method::POST, "/v1/images/pull", Some(req))
    }

    /// `POST /v1/images/push`.
    pub fn push_image(
        &self,
        req: &lcache_proto::wire::PushRequest,
    ) -> Result<lcache_proto::wire::PushResponse, CacheError> {
        self.json(Method::POST, "/v1/images/push", Some(req))
    }

    /// `GET /v1/images`, page after page.
    pub fn images(&self) -> Result<Vec<ImageRecord>, CacheError> {
        let mut all: Vec<ImageRecord> = Vec::new();
        loop {
            let after = all.last().map(|i| encode_name(&i.name)).unwrap_or_default();
            let page: Vec<ImageRecord> = self.json(Method::GET, &format!("/v1/images?after={after}"), None::<&()>)?;
            let done = page.is_empty();
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// `PUT /v1/images/{name}`.
    pub fn put_image(&self, image: &ImageRecord) -> Result<ImageRecord, CacheError> {
        self.json(
            Method::PUT,
            &format!("/v1/images/{}", encode_name(&image.name)),
            Some(image),
        )
    }

    /// `DELETE /v1/images/{name}`.
    pub fn remove_image(&self, name: &str) -> Result<(), CacheError> {
        let _: serde_json::Value = self.json(
            Method::DELETE,
            &format!("/v1/images/{}", encode_name(name)),
            None::<&()>,
        )?;
        Ok(())
    }

    /// `GET /v1/builds?limit=N`, newest first.
    pub fn builds(&self, limit: usize) -> Result<Vec<BuildRecord>, CacheError> {
        self.json(Method::GET, &format!("/v1/builds?limit={limit}"), None::<&()>)
    }

    /// `GET /v1/builds?limit=N&context=C`: the newest builds of one context. An lcached
    /// that does not filter answers the newest of any, which the caller filters again.
    pub fn builds_of(&self, context: &str, limit: usize) -> Result<Vec<BuildRecord>, CacheError> {
        let context = percent_encoding::utf8_percent_encode(context, percent_encoding::NON_ALPHANUMERIC);
        self.json(
            Method::GET,
            &format!("/v1/builds?limit={limit}&context={context}"),
            None::<&()>,
        )
    }

    /// `GET /v1/builds/{id}`.
    pub fn build_record(&self, id: &str) -> Result<BuildRecord, CacheError> {
        self.json(Method::GET, &format!("/v1/builds/{id}"), None::<&()>)
    }

    /// `GET /v1/summaries/{digest}`: `None` if the daemon has none.
    pub fn summary(&self, digest: &str) -> Result<Option<Vec<lcache_proto::sources_digest::SummaryEntry>>, CacheError> {
        match self.json(Method::GET, &format!("/v1/summaries/{digest}"), None::<&()>) {
            Ok(s) => Ok(Some(s)),
            Err(CacheError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/dir-nodes/{digest}`: `None` if the daemon has none.
    pub fn dir_node(&self, digest: &str) -> Result<Option<lcache_proto::sources_digest::DirNode>, CacheError> {
        match self.json(Method::GET, &format!("/v1/dir-nodes/{digest}"), None::<&()>) {
            Ok(s) => Ok(Some(s)),
            Err(CacheError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /v1/builds`.
    pub fn post_build(&self, b: &BuildRecord) -> Result<BuildRecord, CacheError> {
        self.json(Method::POST, "/v1/builds", Some(b))
    }

    /// `POST /v1/builds/deferred`: hands lcached a build whose image waits for the diff_ids
    /// it is taking; the build as recorded. `None` from an lcached that does not take them
    /// (older, or reached over TCP).
    pub fn defer_build(&self, b: &DeferredBuild) -> Result<Option<BuildRecord>, CacheError> {
        let mut b = b.clone();
        b.scope = self.scopes.first().cloned().unwrap_or_default();
        let bytes = Bytes::from(serde_json::to_vec(&b).map_err(|e| CacheError::Encode(e.to_string()))?);
        let (status, resp) = self.call(Method::POST, "/v1/builds/deferred", bytes)?;
        match (status, daemon_error(status, &resp)) {
            (StatusCode::FORBIDDEN, _) => Ok(None),
            (StatusCode::NOT_FOUND, CacheError::Refused { error, .. }) if error.starts_with("no endpoint") => Ok(None),
            (s, _) if s.is_success() => serde_json::from_slice(&resp).map(Some).map_err(|e| {
                CacheError::Protocol(format!("POST /v1/builds/deferred answered what is not a build: {e}"))
            }),
            (_, refused) => Err(refused),
        }
    }

    fn json_bytes<T: DeserializeOwned>(&self, method: Method, path: &str, body: Bytes) -> Result<T, CacheError> {
        let (status, body) = self.call(method, path, body)?;
        if !status.is_success() {
            return Err(daemon_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| CacheError::Protocol(e.to_string()))
    }
}

/// Percent-encodes an image name for a path segment.
fn encode_name(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn daemon_error(status: StatusCode, body: &[u8]) -> CacheError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => CacheError::Refused {
            status: status.as_u16(),
            error: e.error,
            hint: e.hint,
        },
        Err(_) => CacheError::Protocol(format!("status {status} with body {:?}", String::from_utf8_lossy(body))),
    }
}

/// Passes on the first `left` bytes written to it and drops the rest.
struct FrontOnly<W> {
    out: W,
    left: u64,
}

impl<W: std::io::Write> std::io::Write for FrontOnly<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let pass = self.left.min(buf.len() as u64) as usize;
        self.out.write_all(&buf[..pass])?;
        self.left -= pass as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// `GET path` from byte `first` on, streaming a successful answer's body into `out` (a
/// daemon that ignores the range sends every byte; those in front are dropped here); an
/// error answer's body is returned whole instead. Returns the status, the bytes streamed
/// and the error body.
async fn request_into(
    remote: &Remote,
    path: &str,
    first: u64,
    out: &mut dyn std::io::Write,
) -> Result<(StatusCode, u64, Bytes), CacheError> {
    let resp = if first == 0 {
        remote.send(Method::GET, path, lcache_remote::empty(), 0).await
    } else {
        remote.get_from(path, first).await
    }
    .map_err(transport)?;
    let status = resp.status();
    let mut drop_front = if status == StatusCode::OK { first } else { 0 };
    let mut body = resp.into_body();
    if !status.is_success() {
        let b = body
            .collect()
            .await
            .map_err(|e| CacheError::Protocol(e.to_string()))?
            .to_bytes();
        return Ok((status, 0, b));
    }
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        // After a 200, lcached ends a body early when its stored copy fails a read (a file a
        // layer is held by changed behind it): a blob not to use, not a protocol error.
        let frame = frame.map_err(|e| CacheError::UnusableBlob {
            digest: path.rsplit('/').next().unwrap_or(path).to_string(),
            reason: format!("broke off after {n} bytes ({e}): lcached could not read its stored copy"),
        })?;
        if let Ok(mut data) = frame.into_data() {
            let dropped = drop_front.min(data.len() as u64);
            drop_front -= dropped;
            let data = data.split_off(dropped as usize);
            out.write_all(&data).map_err(|source| CacheError::Io {
                action: "write to disk the blob at",
                path: path.into(),
                source,
            })?;
            n += data.len() as u64;
        }
    }
    Ok((status, n, Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_does_not_name_layers_so_is_told_from_one_that_refuses() {
        let refusal = |error: &str| Bytes::from(format!(r#"{{"error":"{error}","hint":"h"}}"#));
        let what = "POST /v1/layers/linked";
        // Served on the socket only, or older than the endpoint: the caller packs whole.
        assert!(matches!(
            named_layer(StatusCode::FORBIDDEN, &refusal("socket only"), what),
            Ok(None)
        ));
        let older = refusal("no endpoint POST /v1/layers/linked");
        assert!(matches!(named_layer(StatusCode::NOT_FOUND, &older, what), Ok(None)));
        // Anything else it says is a refusal, with its words.
        let e = named_layer(StatusCode::BAD_REQUEST, &refusal("/x: no such file"), what).unwrap_err();
        assert!(matches!(e, CacheError::Refused { status: 400, ref error, .. } if error.contains("no such file")));
        let named = Bytes::from(r#"{"digest":"sha256:ab","size":3,"blob_states":["00ff"]}"#);
        let layer = named_layer(StatusCode::CREATED, &named, what).unwrap().unwrap();
        assert_eq!(
            (layer.digest.as_str(), layer.size, layer.blob_states),
            ("sha256:ab", 3, vec![vec![0, 255]])
        );
        let e = named_layer(StatusCode::CREATED, &Bytes::from("{}"), what).unwrap_err();
        assert!(e.to_string().contains("not a layer"), "{e}");
    }
}
