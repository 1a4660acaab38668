//! The cache behind this one (`lcached --upstream ADDR`): a local miss asks it
//! (read-through: a hit there is fetched, verified and kept here); what builds store here is
//! pushed to it in the background through a bounded queue (write-behind), retried, drained
//! on shutdown, and waited for by `POST /v1/upstream/sync` (`lcache cache sync`). An
//! unreachable upstream is a warning, never a failed build: the daemon serves what it has.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Method, StatusCode};
use lcache_bucket::{BlobForm, Bucket, BucketError};
use lcache_proto::wire::{BlobParts, ImageRecord, StepRecord, SyncReport, BLOB_PARTS_TYPE};
use lcache_remote::{Remote, RemoteError};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::scopes::Scopes;
use crate::state::AppState;
use crate::store::blob_file::BlobFile;
use crate::transit_gzip;

/// How many step records may wait to be pushed before new ones are refused (and reported
/// by the next sync).
pub const QUEUE_LEN: usize = 4096;

/// Delays between the attempts to push one record.
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// How long lookups skip an upstream that failed to answer: a silent one would otherwise
/// cost every miss of a build its whole stall limit.
const QUIET_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// Why the upstream did not answer as hoped.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Unreachable, or the exchange broke.
    #[error(transparent)]
    Transport(#[from] RemoteError),
    /// It answered with an error status.
    #[error("{status}: {body}")]
    Refused {
        /// The status.
        status: StatusCode,
        /// Its `{error, hint}` body, as sent.
        body: String,
    },
    /// What it sent is not what was asked for.
    #[error("{0}")]
    Invalid(String),
    /// The local store failed.
    #[error("{0}")]
    Local(String),
    /// The bucket failed.
    #[error(transparent)]
    Bucket(#[from] BucketError),
}

impl UpstreamError {
    /// Whether nothing answered at the upstream's address.
    fn is_unreachable(&self) -> bool {
        match self {
            Self::Bucket(e) => e.is_unreachable(),
            other => matches!(
                other,
                Self::Transport(RemoteError::Unreachable { .. } | RemoteError::Stalled { .. })
            ),
        }
    }

    /// Whether trying again cannot help (a refused token, a record it rejects).
    fn is_permanent(&self) -> bool {
        match self {
            Self::Bucket(e) => e.is_permanent(),
            other => {
                matches!(other, Self::Refused { status, .. } if status.is_client_error() && *status != StatusCode::REQUEST_TIMEOUT)
            }
        }
    }
}

/// Where the upstream tier is.
#[derive(Clone, Debug)]
pub enum Tier {
    /// Another lcached (`tcp://`, `https://`).
    Lcached(Remote),
    /// An S3-compatible bucket (`s3://BUCKET/PREFIX`).
    Bucket(Bucket),
}

/// The longest upstream error passed on to clients.
const SHOWN_AT_MOST: usize = 512;

/// An upstream's error as clients are shown it (`lcache status`, `lcache explain`): it may
/// hold what the upstream sent, so control characters (a terminal's escape sequences) are
/// escaped and the length is bounded.
fn shown(why: &str) -> String {
    let mut out = String::new();
    for c in why.chars() {
        if out.len() >= SHOWN_AT_MOST {
            out.push('…');
            break;
        }
        match c.is_control() {
            true => out.extend(c.escape_default()),
            false => out.push(c),
        }
    }
    out
}

/// What a lookup in the upstream came to.
pub enum Lookup {
    /// A record, kept here now, and the scope it was found in.
    Found(Box<(String, StepRecord)>),
    /// The upstream answered that it has none.
    Missed,
    /// It could not be asked (unreachable, silent, skipped for a while after failing, or a
    /// bad answer): why, in words.
    Unavailable(String),
}

/// A record that could not be pushed, and why.
struct Failure {
    scope: String,
    key: String,
    why: String,
}

/// The upstream tier.
pub struct Upstream {
    tier: Tier,
    queue: mpsc::Sender<(String, String)>,
    /// Records given up on since the last sync: tried again by the next one.
    failed: Mutex<Vec<Failure>>,
    /// Whether the last request failed for want of a connection (warn once, not per step).
    down: AtomicBool,
    /// Records queued and not yet pushed or given up on.
    pending: AtomicU64,
    /// Whether the upstream said our token may only read: then nothing is pushed.
    read_only: AtomicBool,
    /// Until when lookups skip the upstream, which just failed to answer.
    quiet_until: Mutex<Option<tokio::time::Instant>>,
    /// Why the last request failed, until one succeeds.
    last_error: Mutex<Option<String>>,
}

impl Upstream {
    /// An upstream at `remote`, and the receiving end of its push queue for [`Self::run`].
    pub fn new(tier: Tier) -> (Arc<Self>, mpsc::Receiver<(String, String)>) {
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        (
            Arc::new(Self {
                tier,
                queue: tx,
                failed: Mutex::new(Vec::new()),
                down: AtomicBool::new(false),
                pending: AtomicU64::new(0),
                read_only: AtomicBool::new(false),
                quiet_until: Mutex::new(None),
                last_error: Mutex::new(None),
            }),
            rx,
        )
    }

    /// Its address.
    pub fn endpoint(&self) -> String {
        match &self.tier {
            Tier::Lcached(r) => r.endpoint.to_string(),
            Tier::Bucket(b) => b.url().to_string(),
        }
    }

    fn note(&self, metrics: &Metrics, e: &UpstreamError) {
        metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
        let why = shown(&e.to_string());
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
        let unreachable = e.is_unreachable();
        if unreachable {
            *self.quiet_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(tokio::time::Instant::now() + QUIET_AFTER_FAILURE);
        }
        if !unreachable || !self.down.swap(true, Ordering::Relaxed) {
            eprintln!(
                "lcached: warning: upstream {}: {why}; serving from the local store only",
                self.endpoint()
            );
        }
    }

    /// The upstream answered: lookups go to it again.
    fn answered(&self) {
        self.down.store(false, Ordering::Relaxed);
        *self.quiet_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// How it is doing, for `GET /v1/status`.
    pub fn status(&self) -> lcache_proto::wire::UpstreamStatus {
        let skipped_for = self
            .quiet_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(Duration::ZERO, |until| {
                until.saturating_duration_since(tokio::time::Instant::now())
            });
        lcache_proto::wire::UpstreamStatus {
            address: self.endpoint(),
            skipped_for_s: skipped_for.as_secs_f64().ceil() as u64,
            last_error: self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            queued: self.pending.load(Ordering::SeqCst),
            read_only: self.read_only.load(Ordering::Relaxed),
        }
    }

    /// Whether lookups skip the upstream for now (it just failed to answer); counted.
    fn quiet(&self, metrics: &Metrics) -> bool {
        let quiet = self
            .quiet_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| tokio::time::Instant::now() < until);
        if quiet {
            metrics.upstream_skipped.fetch_add(1, Ordering::Relaxed);
        }
        quiet
    }

    fn fail(&self, scope: &str, key: &str, why: impl std::fmt::Display) {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).push(Failure {
            scope: scope.to_string(),
            key: key.to_string(),
            why: shown(&why.to_string()),
        });
    }

    /// Queues a record stored in `scope` to be pushed.
    pub fn push(&self, scope: &str, key: &str, metrics: &Metrics) {
        if self.read_only.load(Ordering::Relaxed) {
            return;
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        metrics.upstream_queue.fetch_add(1, Ordering::Relaxed);
        if self.queue.try_send((scope.to_string(), key.to_string())).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            metrics.upstream_queue.fetch_sub(1, Ordering::Relaxed);
            metrics.upstream_push_failures.fetch_add(1, Ordering::Relaxed);
            self.fail(
                scope,
                key,
                format!("the push queue is full ({QUEUE_LEN} records waiting)"),
            );
        }
    }

    /// Pushes queued records until the queue closes.
    pub async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<(String, String)>, state: Arc<AppState>) {
        while let Some((scope, key)) = rx.recv().await {
            let mut attempt = 0;
            loop {
                match self.push_one(&scope, &key, &state).await {
                    Ok(()) => {
                        self.answered();
                        state.metrics.upstream_pushed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(UpstreamError::Refused { status, .. }) if status == StatusCode::FORBIDDEN => {
                        // A read-only token: this runner uses the shared cache and adds to
                        // it nothing, by design; not a failure.
                        if !self.read_only.swap(true, Ordering::Relaxed) {
                            eprintln!(
                                "lcached: upstream {} gave this daemon read access only: what it builds stays local",
                                self.endpoint()
                            );
                        }
                        break;
                    }
                    // Retried, unless the upstream is known to be down: then each queued
                    // record fails at once instead of waiting out the delays in turn
                    // (`cache sync` answers in seconds, not minutes); the first success
                    // clears the flag.
                    Err(e)
                        if !e.is_permanent() && attempt < RETRY_DELAYS.len() && !self.down.load(Ordering::Relaxed) =>
                    {
                        if e.is_unreachable() && attempt + 1 == RETRY_DELAYS.len() {
                            self.down.store(true, Ordering::Relaxed);
                        }
                        tokio::time::sleep(RETRY_DELAYS[attempt]).await;
                        attempt += 1;
                    }
                    Err(e) => {
                        self.note(&state.metrics, &e);
                        state.metrics.upstream_push_failures.fetch_add(1, Ordering::Relaxed);
                        self.fail(&scope, &key, e);
                        break;
                    }
                }
            }
            self.pending.fetch_sub(1, Ordering::SeqCst);
            state.metrics.upstream_queue.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Tries again what earlier pushes gave up on, waits until nothing is queued (or
    /// `deadline` passes), and returns what could still not be pushed.
    pub async fn sync(&self, deadline: Duration, metrics: &Metrics) -> SyncReport {
        let retry = std::mem::take(&mut *self.failed.lock().unwrap_or_else(|p| p.into_inner()));
        for f in retry.iter().filter(|f| !f.key.is_empty()) {
            self.push(&f.scope, &f.key, metrics);
        }
        let start = tokio::time::Instant::now();
        while self.pending.load(Ordering::SeqCst) > 0 {
            if start.elapsed() > deadline {
                self.fail(
                    "",
                    "",
                    format!(
                        "{} records were still waiting after {deadline:?}",
                        self.pending.load(Ordering::SeqCst)
                    ),
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        SyncReport {
            upstream: self.endpoint(),
            failed: failed
                .iter()
                .map(|f| match (f.scope.as_str(), f.key.as_str()) {
                    (_, "") => f.why.clone(),
                    ("", k) => format!("{k}: {}", f.why),
                    (s, k) => format!("{k} (scope {s}): {}", f.why),
                })
                .collect(),
        }
    }

    async fn call(
        remote: &Remote,
        method: Method,
        path: &str,
        body: lcache_remote::ReqBody,
        len: u64,
    ) -> Result<(StatusCode, Bytes), UpstreamError> {
        Ok(remote.request(method, path, body, len).await?)
    }

    fn refused(status: StatusCode, body: &[u8]) -> UpstreamError {
        UpstreamError::Refused {
            status,
            body: String::from_utf8_lossy(body).into_owned(),
        }
    }

    /// Sends blob `digest` as the parts it was uploaded here as, if it was and the upstream
    /// holds their base: only what the base lacks travels. `false` when it cannot be sent
    /// so (the caller sends it whole).
    async fn push_parts(remote: &Remote, local: &AppState, digest: &str) -> Result<bool, UpstreamError> {
        let blob = open_local(local, digest)?;
        let Some(parts) = blob.origin.clone() else {
            return Ok(false);
        };
        let base = format!("/v1/blobs/{}", parts.base);
        let (status, _) = Self::call(remote, Method::HEAD, &base, lcache_remote::empty(), 0).await?;
        if status != StatusCode::OK {
            return Ok(false);
        }
        let head = parts.head().map_err(|e| UpstreamError::Local(e.to_string()))?;
        let sent = blob
            .select(&parts.sent_ranges())
            .map_err(|e| UpstreamError::Local(format!("blob {digest}: {e}")))?;
        let len = head.len() as u64 + sent.len();
        let chunks = futures_util::stream::once(async move { Ok(Bytes::from(head)) })
            .chain(sent.chunks())
            .map(|r| r.map(Frame::data));
        let resp = remote
            .send_typed(
                Method::PUT,
                &format!("/v1/blobs/{digest}"),
                BLOB_PARTS_TYPE,
                BodyExt::boxed(StreamBody::new(chunks)),
                len,
            )
            .await?;
        // Refused (an lcached that predates parts, the base evicted meanwhile): whole.
        Ok(resp.status().is_success())
    }

    /// Stores blob `digest` from the upstream's parts of it, if it keeps it as parts over a
    /// base this daemon has: only the sent runs travel, and the blob is verified whole as
    /// any upload. `false` when it cannot be fetched so (the caller fetches it whole).
    async fn fetch_parts(remote: &Remote, local: &AppState, digest: &str) -> Result<bool, UpstreamError> {
        let (status, body) = Self::call(
            remote,
            Method::GET,
            &format!("/v1/blobs/{digest}/parts"),
            lcache_remote::empty(),
            0,
        )
        .await?;
        let Some(parts) = (status == StatusCode::OK)
            .then(|| serde_json::from_slice::<BlobParts>(&body).ok())
            .flatten()
        else {
            return Ok(false);
        };
        if !has_blob(local, &parts.base)? {
            return Ok(false);
        }
        let head = parts.head().map_err(|e| UpstreamError::Local(e.to_string()))?;
        let resp = remote
            .send(
                Method::GET,
                &format!("/v1/blobs/{digest}/sent"),
                lcache_remote::empty(),
                0,
            )
            .await?;
        if !resp.status().is_success() {
            return Ok(false);
        }
        let len = head.len() as u64 + parts.sent_ranges().iter().map(|(_, l)| l).sum::<u64>();
        let head = futures_util::stream::once(async move { Ok(Frame::data(Bytes::from(head))) });
        let body = StreamBody::new(Box::pin(head.chain(http_body_util::BodyStream::new(resp.into_body()))));
        match local.blobs.ingest_parts(digest, body, Some(len), &local.limits).await {
            Ok(meta) => {
                note_ingested(local, &meta)?;
                Ok(true)
            }
            // The base here not what it should be, the answer cut off: whole, then.
            Err(e) => {
                eprintln!("lcached: warning: layer {digest} could not be made from its parts ({e}); fetching it whole");
                Ok(false)
            }
        }
    }

    /// Pushes one record: its layer blob first (unless the upstream has it, and as parts
    /// when it was uploaded so and the upstream has their base), then the record.
    async fn push_one(&self, scope: &str, key: &str, local: &AppState) -> Result<(), UpstreamError> {
        let rec = local
            .records
            .get_step(scope, key)
            .map_err(|e| UpstreamError::Local(e.to_string()))?
            .ok_or_else(|| UpstreamError::Local(format!("step {key} is no longer stored here")))?;
        let remote = match &self.tier {
            Tier::Lcached(r) => r,
            Tier::Bucket(b) => return push_to_bucket(b, scope, &rec, local).await,
        };
        if let Some(layer) = &rec.layer {
            let path = format!("/v1/blobs/{}", layer.digest);
            let (status, _) = Self::call(remote, Method::HEAD, &path, lcache_remote::empty(), 0).await?;
            if status != StatusCode::OK && !Self::push_parts(remote, local, &layer.digest).await? {
                let blob = open_local(local, &layer.digest)?;
                let len = blob.len();
                let gzipped = if is_tar_layer(layer) {
                    // Kept as its tar here: gzipped on the wire, kept as the tar there.
                    let chunks = transit_gzip::gzipped(blob.chunks()).map(|r| r.map(Frame::data));
                    let body = BodyExt::boxed(StreamBody::new(chunks));
                    let own_len = len.to_string();
                    let headers = [
                        ("content-type", "application/octet-stream"),
                        ("content-encoding", "gzip"),
                        (transit_gzip::LENGTH_HEADER, own_len.as_str()),
                    ];
                    let resp = remote.send_with(Method::PUT, &path, &headers, body, None).await?;
                    let status = resp.status();
                    let answer = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| UpstreamError::Invalid(format!("the upstream's answer was cut off: {e}")))?
                        .to_bytes();
                    // An lcached older than gzip on the wire keeps the body as it came, which
                    // is not the digest: it refuses it, and is sent the tar as it is.
                    Some((status, answer)).filter(|(s, _)| *s != StatusCode::BAD_REQUEST)
                } else {
                    None
                };
                let (status, body) = match gzipped {
                    Some(answer) => answer,
                    None => {
                        let blob = open_local(local, &layer.digest)?;
                        let chunks = blob.chunks().map(|r| r.map(Frame::data));
                        let body = BodyExt::boxed(StreamBody::new(chunks));
                        Self::call(remote, Method::PUT, &path, body, len).await?
                    }
                };
                if !status.is_success() {
                    return Err(Self::refused(status, &body));
                }
            }
        }
        let json = serde_json::to_vec(&rec).map_err(|e| UpstreamError::Local(e.to_string()))?;
        let len = json.len() as u64;
        let (status, body) = Self::call(
            remote,
            Method::PUT,
            &format!(
                "/v1/steps/{key}{}",
                Scopes {
                    scope: scope.to_string(),
                    fallbacks: Vec::new()
                }
                .query()
            ),
            lcache_remote::bytes(json),
            len,
        )
        .await?;
        // A conflict means the upstream had a record for the key first: it keeps its own.
        if status.is_success() || status == StatusCode::CONFLICT {
            return Ok(());
        }
        Err(Self::refused(status, &body))
    }

    /// Shares the image `name` names through a bucket tier, in the background: its blobs
    /// (those the bucket lacks), then its record. An lcached tier shares steps only.
    pub fn push_image(&self, image: &ImageRecord, local: &Arc<AppState>) {
        let Tier::Bucket(b) = &self.tier else { return };
        let (b, image, local) = (b.clone(), image.clone(), local.clone());
        tokio::spawn(async move {
            let shared = async {
                for (digest, form) in image_blob_forms(&image) {
                    let blob = open_local(&local, digest).map_err(|e| BucketError::Invalid(e.to_string()))?;
                    put_to_bucket(&b, digest, form, blob).await?;
                }
                b.put_image(&image).await
            };
            if let Err(e) = shared.await {
                eprintln!(
                    "lcached: warning: image {} not shared through {}: {e}",
                    image.name,
                    b.url()
                );
            }
        });
    }

    /// An image this daemon lacks, from a bucket tier: its blobs are fetched (verified as
    /// they stream in) and the record kept here. `None` when the tier has none (or is not a
    /// bucket, or is unreachable: a warning, never an error).
    pub async fn fetch_image(&self, name: &str, local: &AppState) -> Option<ImageRecord> {
        let Tier::Bucket(b) = &self.tier else { return None };
        if self.quiet(&local.metrics) {
            return None;
        }
        let fetched = async {
            let Some(image) = b.get_image(name).await? else {
                return Ok(None);
            };
            let sizes: std::collections::HashMap<&str, u64> =
                image.layers.iter().map(|l| (l.digest.as_str(), l.size)).collect();
            for (digest, form) in image_blob_forms(&image) {
                if has_blob(local, digest)? {
                    continue;
                }
                if fetch_from_bucket_blob(b, digest, form, sizes.get(digest).copied(), local)
                    .await?
                    .is_none()
                {
                    return Ok(None);
                }
            }
            local
                .records
                .put_image(&image)
                .and_then(|_| local.records.flush())
                .map_err(|e| UpstreamError::Local(e.to_string()))?;
            Ok::<_, UpstreamError>(Some(image))
        };
        match fetched.await {
            Ok(found) => found,
            Err(e) => {
                self.note(&local.metrics, &e);
                None
            }
        }
    }

    /// Looks a locally missing step up in the upstream, along the same scopes; on a hit,
    /// its layer blob is fetched (verified against its digest) and both are kept here, in
    /// the scope the upstream found it in. `None` is a miss, whatever the reason: an
    /// unreachable upstream is warned about, never an error.
    pub async fn fetch_step(&self, key: &str, scopes: &Scopes, local: &AppState) -> Lookup {
        if self.quiet(&local.metrics) {
            let why = self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return Lookup::Unavailable(format!(
                "{} was skipped for failing to answer moments ago ({})",
                self.endpoint(),
                why.unwrap_or_else(|| "no detail".into())
            ));
        }
        match self.try_fetch_step(key, scopes, local).await {
            Ok(found) => {
                self.answered();
                match found {
                    Some(found) => {
                        local.metrics.upstream_hits.fetch_add(1, Ordering::Relaxed);
                        Lookup::Found(Box::new(found))
                    }
                    None => {
                        local.metrics.upstream_misses.fetch_add(1, Ordering::Relaxed);
                        Lookup::Missed
                    }
                }
            }
            Err(e) => {
                self.note(&local.metrics, &e);
                let (at, why) = (self.endpoint(), shown(&e.to_string()));
                Lookup::Unavailable(match why.contains(&at) {
                    true => why,
                    false => format!("{at}: {why}"),
                })
            }
        }
    }

    async fn try_fetch_step(
        &self,
        key: &str,
        scopes: &Scopes,
        local: &AppState,
    ) -> Result<Option<(String, StepRecord)>, UpstreamError> {
        let remote = match &self.tier {
            Tier::Lcached(r) => r,
            Tier::Bucket(b) => return fetch_from_bucket(b, key, scopes, local).await,
        };
        let resp = remote
            .send(
                Method::GET,
                &format!("/v1/steps/{key}{}", scopes.query()),
                lcache_remote::empty(),
                0,
            )
            .await?;
        let status = resp.status();
        let found_in = resp
            .headers()
            .get("lcache-scope")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(&scopes.scope)
            .to_string();
        if !scopes.lookup_order().any(|s| s == found_in) {
            return Err(UpstreamError::Invalid(format!(
                "answered from scope '{found_in}', which was not asked for"
            )));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| UpstreamError::Invalid(format!("the answer broke off: {e}")))?
            .to_bytes();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::refused(status, &body));
        }
        let rec: StepRecord =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::Invalid(format!("step record: {e}")))?;
        if rec.key != key {
            return Err(UpstreamError::Invalid(format!("asked for step {key}, got {}", rec.key)));
        }
        if let Some(layer) = &rec.layer {
            if !has_blob(local, &layer.digest)? && !Self::fetch_parts(remote, local, &layer.digest).await? {
                // A tar layer comes gzipped from an lcached that gzips it on the wire.
                let headers = [("content-type", "application/json"), ("accept-encoding", "gzip")];
                let resp = remote
                    .send_with(
                        Method::GET,
                        &format!("/v1/blobs/{}", layer.digest),
                        &headers,
                        lcache_remote::empty(),
                        Some(0),
                    )
                    .await?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(Self::refused(status, b""));
                }
                let gzipped = transit_gzip::names_gzip(resp.headers().get("content-encoding"));
                // Verified against the digest as it streams in; nothing is kept otherwise.
                let ingested = match gzipped {
                    true => {
                        let body = transit_gzip::Gunzip::new(
                            resp.into_body(),
                            transit_gzip::limit_over(local.limits.max_blob_size),
                        );
                        local
                            .blobs
                            .ingest(&layer.digest, body, Some(layer.size), &local.limits)
                            .await
                    }
                    false => {
                        local
                            .blobs
                            .ingest(&layer.digest, resp.into_body(), Some(layer.size), &local.limits)
                            .await
                    }
                };
                let meta = ingested.map_err(|e| UpstreamError::Invalid(format!("layer {}: {e}", layer.digest)))?;
                note_ingested(local, &meta)?;
            }
        }
        keep_locally(local, found_in, rec)
    }
}

/// Keeps a record found upstream in the local store (in the scope it was found in); a
/// record stored here meanwhile stands.
fn keep_locally(
    local: &AppState,
    found_in: String,
    rec: StepRecord,
) -> Result<Option<(String, StepRecord)>, UpstreamError> {
    let kept = match local.records.put_step_first(&found_in, &rec) {
        Ok(None) => rec,
        Ok(Some(existing)) => existing,
        Err(e) => return Err(UpstreamError::Local(e.to_string())),
    };
    let _ = local.records.flush();
    Ok(Some((found_in, kept)))
}

/// Whether the local store has blob `digest` already.
fn has_blob(local: &AppState, digest: &str) -> Result<bool, UpstreamError> {
    local
        .records
        .get_blob(digest)
        .map(|b| b.is_some())
        .map_err(|e| UpstreamError::Local(e.to_string()))
}

/// Records a blob that just streamed in (verified) as stored here.
fn note_ingested(local: &AppState, meta: &crate::store::BlobMeta) -> Result<(), UpstreamError> {
    local.metrics.bytes_in.fetch_add(meta.size, Ordering::Relaxed);
    // Touched first: an eviction pass never sees the blob without its use.
    local
        .records
        .touch(&meta.digest, crate::api::now_ms())
        .and_then(|_| local.records.put_blob(meta))
        .and_then(|_| local.records.flush())
        .map_err(|e| UpstreamError::Local(e.to_string()))?;
    local.evict_wake.notify_one();
    Ok(())
}

/// Looks `key` up in the bucket along the scopes; on a hit, fetches its blob (verified as
/// it streams in) unless it is here, and touches it there (at most once a day). A record
/// whose blob the bucket no longer has is a miss.
async fn fetch_from_bucket(
    b: &Bucket,
    key: &str,
    scopes: &Scopes,
    local: &AppState,
) -> Result<Option<(String, StepRecord)>, UpstreamError> {
    for scope in scopes.lookup_order() {
        let Some(rec) = b.get_record(scope, key).await? else {
            continue;
        };
        if let Some(layer) = &rec.layer {
            let form = if has_blob(local, &layer.digest)? {
                layer_form(layer)
            } else {
                match fetch_from_bucket_blob(b, &layer.digest, layer_form(layer), Some(layer.size), local).await? {
                    Some(form) => form,
                    None => return Ok(None),
                }
            };
            let (b, digest) = (b.clone(), layer.digest.clone());
            // Only keeps the blob young for a lifecycle rule: never worth a build's wait.
            tokio::spawn(async move {
                let _ = b.touch_blob(&digest, form).await;
            });
        }
        return keep_locally(local, scope.to_string(), rec);
    }
    Ok(None)
}

/// Pushes one record to the bucket: its blob unless the bucket has it, then the record
/// with conditional create (the first writer wins) — unless the bucket's record for the
/// key names a blob that has expired, which this one replaces.
async fn push_to_bucket(b: &Bucket, scope: &str, rec: &StepRecord, local: &AppState) -> Result<(), UpstreamError> {
    if let Some(layer) = &rec.layer {
        let blob = open_local(local, &layer.digest)?;
        put_to_bucket(b, &layer.digest, layer_form(layer), blob).await?;
    }
    if b.put_record(scope, rec, false).await? {
        return Ok(());
    }
    let theirs = b.get_record(scope, &rec.key).await?;
    let expired = match theirs.and_then(|r| r.layer) {
        Some(l) => {
            b.blob_info(&l.digest, BlobForm::AsIs).await?.is_none()
                && b.blob_info(&l.digest, BlobForm::Gzip).await?.is_none()
        }
        None => false,
    };
    if expired {
        b.put_record(scope, rec, true).await?;
    }
    Ok(())
}

/// How a bucket keeps `layer`: gzipped when it is kept as its tar (`--layer-compression
/// none`), so the bucket stores and moves what a registry would, while both ends keep the tar.
fn layer_form(layer: &lcache_proto::wire::LayerRef) -> BlobForm {
    match is_tar_layer(layer) {
        true => BlobForm::Gzip,
        false => BlobForm::AsIs,
    }
}

/// Every blob `image` needs, with the form a bucket keeps it in.
fn image_blob_forms(image: &ImageRecord) -> impl Iterator<Item = (&str, BlobForm)> {
    image
        .layers
        .iter()
        .map(|l| (l.digest.as_str(), layer_form(l)))
        .chain([image.config_digest.as_str(), image.manifest_digest.as_str()].map(|d| (d, BlobForm::AsIs)))
}

/// Uploads `blob` to the bucket as `form` (for [`BlobForm::Gzip`], one gzip member per
/// chunk read, compressed on the blocking pool as on the wire to an lcached tier), unless
/// the bucket has it so.
async fn put_to_bucket(b: &Bucket, digest: &str, form: BlobForm, blob: BlobFile) -> Result<(), BucketError> {
    let len = blob.len();
    match form {
        BlobForm::AsIs => b.put_blob_stream(digest, form, digest, len, blob.chunks()).await,
        BlobForm::Gzip => {
            let gzipped = transit_gzip::gzipped(blob.chunks());
            b.put_blob_stream(digest, form, digest, len, gzipped).await
        }
    }
}

/// Fetches blob `digest` from the bucket into the local store, verified against its digest
/// as it streams in: from its gzip form (inflated) when `preferred` says so and the bucket
/// has one, else as it is (a bucket an older lcached wrote keeps tar layers so). `size` is
/// the blob's own size when known. Returns the form it came in, or `None` when the bucket
/// has neither.
async fn fetch_from_bucket_blob(
    b: &Bucket,
    digest: &str,
    preferred: BlobForm,
    size: Option<u64>,
    local: &AppState,
) -> Result<Option<BlobForm>, UpstreamError> {
    let invalid = |e: crate::store::blob_store::IngestError| UpstreamError::Invalid(format!("blob {digest}: {e}"));
    if preferred == BlobForm::Gzip {
        if let Some((_, stream)) = b.blob_stream(digest, BlobForm::Gzip).await? {
            let body = StreamBody::new(stream.map(|r| r.map(Frame::data)));
            let body = transit_gzip::Gunzip::new(body, transit_gzip::limit_over(local.limits.max_blob_size));
            let meta = local
                .blobs
                .ingest(digest, body, size, &local.limits)
                .await
                .map_err(invalid)?;
            note_ingested(local, &meta)?;
            return Ok(Some(BlobForm::Gzip));
        }
    }
    let Some((stored, stream)) = b.blob_stream(digest, BlobForm::AsIs).await? else {
        return Ok(None);
    };
    let body = StreamBody::new(stream.map(|r| r.map(Frame::data)));
    let meta = local
        .blobs
        .ingest(digest, body, Some(size.unwrap_or(stored)), &local.limits)
        .await
        .map_err(invalid)?;
    note_ingested(local, &meta)?;
    Ok(Some(BlobForm::AsIs))
}

/// A blob of this daemon's store, opened to be sent up.
fn open_local(local: &AppState, digest: &str) -> Result<BlobFile, UpstreamError> {
    local
        .blobs
        .open_blob(digest)
        .map_err(|e| UpstreamError::Local(format!("blob {digest}: {e}")))?
        .ok_or_else(|| UpstreamError::Local(format!("blob {digest} is no longer stored here")))
}

/// Whether `layer` is kept as its tar (`--layer-compression none`): gzipped on the wire.
fn is_tar_layer(layer: &lcache_proto::wire::LayerRef) -> bool {
    lcache_proto::wire::LayerCompression::of_media_type(&layer.media_type)
        == Some(lcache_proto::wire::LayerCompression::None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_an_upstream_sent_is_shown_without_control_characters_and_bounded() {
        assert_eq!(shown("refused: \u{1b}[2Jgone\r\n"), "refused: \\u{1b}[2Jgone\\r\\n");
        let long = "x".repeat(10_000);
        assert!(shown(&long).chars().count() <= SHOWN_AT_MOST + 1);
        assert_eq!(shown("stopped answering — 2 s"), "stopped answering — 2 s");
    }
}
