//! An S3-compatible bucket as the shared tier behind lcached (`--upstream s3://BUCKET/PREFIX`),
//! on the `object_store` crate, configured by the standard AWS environment variables.
//!
//! Layout, under PREFIX (see docs/scale-out.md for why):
//! - `blobs/sha256/<2 hex>/<hex>`: layer blobs, content-addressed, written with conditional
//!   create (never replaced by other bytes), multipart when large — an object only appears
//!   once complete, so a half-written one is never served;
//! - `gzip/sha256/<2 hex>/<hex>`: a layer kept as its tar (`--layer-compression none`),
//!   gzipped ([`BlobForm::Gzip`]): named by the tar's digest, which its inflated bytes hash
//!   to, so the tier moves and keeps compressed bytes while both ends keep the tar;
//! - `records/<scope>/<key>`: step records as JSON (`_` is the unscoped scope), written
//!   with conditional create: the first writer wins, as on an lcached;
//! - `images/<name>`: image records (a tag moves: the last writer wins), their manifest,
//!   config and layers among the blobs.
//!
//! Reads name objects directly; nothing on the hot path lists. A hit touches its blob at
//! most once a day (a server-side copy over itself refreshes its Last-Modified) so a
//! lifecycle rule can expire what no build used for N days; [`Bucket::prune`] does the same
//! without one, never deleting a blob a kept record needs.

use std::collections::HashSet;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use lcache_proto::wire::StepRecord;
use object_store::aws::AmazonS3Builder;
use object_store::path::{Path, PathPart};
use object_store::{
    ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};
use tokio::io::AsyncReadExt;

/// Blobs up to this size go up in one conditional PUT; larger ones in parts.
const SINGLE_PUT_MAX: u64 = 16 * 1024 * 1024;
/// The part size of a multipart upload.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Reads are handed on in pieces of about this size: the HTTP client's are a few KiB, and
/// each piece costs the consumer a file write.
const READ_CHUNK: usize = 1024 * 1024;

/// How long a request may wait for the endpoint to answer, unless set otherwise (lcached's
/// `--upstream-timeout`).
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);
/// A hit refreshes its blob's age at most this often.
pub const TOUCH_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Why the bucket did not answer as hoped.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    /// The URL or the environment does not describe a bucket.
    #[error("{0}")]
    Config(String),
    /// A request failed.
    #[error("bucket {op} {path}: {source}")]
    Store {
        /// What was being done.
        op: &'static str,
        /// The object.
        path: String,
        /// Why.
        source: object_store::Error,
    },
    /// What it holds is not what was expected.
    #[error("{0}")]
    Invalid(String),
    /// A local file could not be read.
    #[error("{path}: {source}")]
    Local {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl BucketError {
    /// Whether the bucket could not be reached at all (then a daemon stops asking for a while).
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Store { source, .. } => {
                let text = format!("{source:?}");
                text.contains("Connect")
                    || text.contains("connection")
                    || text.contains("dns error")
                    || text.contains("TimedOut")
                    || text.contains("timed out")
                    || text.contains("Timeout")
            }
            _ => false,
        }
    }

    /// Whether trying again cannot help (access denied, a bad configuration).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Config(_)
                | Self::Invalid(_)
                | Self::Store {
                    source: object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. },
                    ..
                }
        )
    }
}

/// How a blob's bytes are kept in the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobForm {
    /// As they are: the object's bytes hash to the digest.
    AsIs,
    /// Gzipped (one or more members): the object inflates to bytes that hash to the digest.
    /// Tar layers are kept so, at their own path, so a reader knows to inflate them.
    Gzip,
}

/// A blob as the bucket has it.
#[derive(Debug, Clone, Copy)]
pub struct BlobInfo {
    /// Its size.
    pub size: u64,
    /// When it was last written (or touched), seconds since the epoch.
    pub modified_s: i64,
}

/// What a prune did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PruneReport {
    /// Records kept and removed.
    pub records_kept: usize,
    /// Records older than the cutoff, removed.
    pub records_removed: usize,
    /// Image records kept (their blobs with them).
    pub images_kept: usize,
    /// Image records older than the cutoff, removed.
    pub images_removed: usize,
    /// Blobs kept (used by a kept record, or young).
    pub blobs_kept: usize,
    /// Blobs removed.
    pub blobs_removed: usize,
    /// Bytes of the removed blobs.
    pub bytes_removed: u64,
}

/// A bucket and the prefix lcache owns in it.
#[derive(Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: Vec<String>,
    url: String,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket").field("url", &self.url).finish_non_exhaustive()
    }
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl BlobForm {
    /// The directory under the prefix that holds blobs kept this way.
    fn dir(self) -> &'static str {
        match self {
            Self::AsIs => "blobs",
            Self::Gzip => "gzip",
        }
    }
}

fn sha256_hex(digest: &str) -> Result<&str, BucketError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| BucketError::Invalid(format!("'{digest}' is not a sha256 digest")))?;
    Ok(hex)
}

impl Bucket {
    /// The bucket `s3://BUCKET[/PREFIX]` names, with credentials, region and endpoint from
    /// the AWS environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint).
    pub fn from_url(url: &str) -> Result<Self, BucketError> {
        Self::from_url_with_stall(url, DEFAULT_STALL)
    }

    /// [`Bucket::from_url`], giving up a request once nothing has come back for `stall`
    /// (connecting, or between two reads) and retrying only within that time: object_store
    /// alone waits 30 s a request and retries for 3 minutes, which a silent endpoint made
    /// every build wait out.
    pub fn from_url_with_stall(url: &str, stall: Duration) -> Result<Self, BucketError> {
        use object_store::aws::AmazonS3ConfigKey::Client;
        let seconds = |d: Duration| format!("{}s", d.as_secs().max(1));
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| BucketError::Config(format!("'{url}' is not an s3:// URL — write s3://BUCKET/PREFIX")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(BucketError::Config(format!(
                "'{url}' names no bucket — write s3://BUCKET/PREFIX"
            )));
        }
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            // Set over what the environment configured (AWS_ALLOW_HTTP, proxies), not in
            // place of it.
            .with_config(Client(ClientConfigKey::ConnectTimeout), seconds(stall))
            .with_config(Client(ClientConfigKey::ReadTimeout), seconds(stall))
            // A whole request (a large blob streamed in) may take long while it moves; the
            // cap only bounds an upload part the endpoint stopped reading.
            .with_config(
                Client(ClientConfigKey::Timeout),
                seconds((stall * 60).max(Duration::from_secs(600))),
            )
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: stall,
                ..RetryConfig::default()
            })
            .build()
            .map_err(|e| {
                BucketError::Config(format!(
                    "cannot use {url}: {e} — set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (and AWS_ENDPOINT_URL for a server other than AWS; AWS_ALLOW_HTTP=true for plain HTTP)"
                ))
            })?;
        Ok(Self::with_store(Arc::new(store), prefix, url))
    }

    /// A bucket over any object store (tests use an in-memory one).
    pub fn with_store(store: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Self {
        Self {
            store,
            prefix: prefix
                .split('/')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
            url: url.to_string(),
        }
    }

    /// The URL it was made from.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path<'a>(&'a self, parts: impl IntoIterator<Item = &'a str>) -> Path {
        self.prefix
            .iter()
            .map(String::as_str)
            .chain(parts)
            .map(|p| PathPart::from(p.to_string()))
            .collect()
    }

    fn blob_path(&self, digest: &str, form: BlobForm) -> Result<Path, BucketError> {
        let hex = sha256_hex(digest)?;
        Ok(self.path([form.dir(), "sha256", &hex[..2], hex]))
    }

    fn record_path(&self, scope: &str, key: &str) -> Path {
        self.path(["records", if scope.is_empty() { "_" } else { scope }, key])
    }

    fn err(op: &'static str, path: &Path) -> impl FnOnce(object_store::Error) -> BucketError {
        let path = path.to_string();
        move |source| BucketError::Store { op, path, source }
    }

    /// The record for `key` in `scope`, if the bucket has one.
    pub async fn get_record(&self, scope: &str, key: &str) -> Result<Option<StepRecord>, BucketError> {
        let path = self.record_path(scope, key);
        let bytes = match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(Self::err("read", &path))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Self::err("get", &path)(e)),
        };
        let rec: StepRecord = serde_json::from_slice(&bytes)
            .map_err(|e| BucketError::Invalid(format!("record {path} is not a step record: {e}")))?;
        if rec.key != key {
            return Err(BucketError::Invalid(format!("record {path} is for step {}", rec.key)));
        }
        Ok(Some(rec))
    }

    /// Stores `rec` unless the bucket has a record for its key in `scope` already (the first
    /// writer wins); `replace` overwrites one (a record whose blob expired). Returns whether
    /// it was stored.
    pub async fn put_record(&self, scope: &str, rec: &StepRecord, replace: bool) -> Result<bool, BucketError> {
        let path = self.record_path(scope, &rec.key);
        let json = serde_json::to_vec(rec).map_err(|e| BucketError::Invalid(e.to_string()))?;
        let mode = if replace { PutMode::Overwrite } else { PutMode::Create };
        match self
            .store
            .put_opts(&path, PutPayload::from(json), PutOptions::from(mode))
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(Self::err("put", &path)(e)),
        }
    }

    fn image_path(&self, name: &str) -> Path {
        self.path(["images", name])
    }

    /// Records the image `image.name` points to (a tag moves: it replaces what was there).
    pub async fn put_image(&self, image: &lcache_proto::wire::ImageRecord) -> Result<(), BucketError> {
        let path = self.image_path(&image.name);
        let json = serde_json::to_vec(image).map_err(|e| BucketError::Invalid(e.to_string()))?;
        self.store
            .put_opts(&path, PutPayload::from(json), PutOptions::from(PutMode::Overwrite))
            .await
            .map_err(Self::err("put", &path))?;
        Ok(())
    }

    /// The image record `name` points to, if the bucket has one.
    pub async fn get_image(&self, name: &str) -> Result<Option<lcache_proto::wire::ImageRecord>, BucketError> {
        let path = self.image_path(name);
        let bytes = match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(Self::err("read", &path))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Self::err("get", &path)(e)),
        };
        let image: lcache_proto::wire::ImageRecord = serde_json::from_slice(&bytes)
            .map_err(|e| BucketError::Invalid(format!("image {path} is not an image record: {e}")))?;
        if image.name != name {
            return Err(BucketError::Invalid(format!("image {path} is named {}", image.name)));
        }
        Ok(Some(image))
    }

    /// Whether the bucket has `digest` kept as `form`, and the object's size and age.
    pub async fn blob_info(&self, digest: &str, form: BlobForm) -> Result<Option<BlobInfo>, BucketError> {
        let path = self.blob_path(digest, form)?;
        match self.store.head(&path).await {
            Ok(m) => Ok(Some(BlobInfo {
                size: m.size,
                modified_s: m.last_modified.timestamp(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::err("head", &path)(e)),
        }
    }

    /// Uploads the blob `digest` from `file` unless the bucket has it: one conditional PUT
    /// when small, a multipart upload (visible only once complete) when large.
    pub async fn put_blob_file(&self, digest: &str, file: &FsPath) -> Result<(), BucketError> {
        let local = |source| BucketError::Local {
            path: file.display().to_string(),
            source,
        };
        let f = tokio::fs::File::open(file).await.map_err(local)?;
        let len = f.metadata().await.map_err(local)?.len();
        let chunks = futures_util::stream::unfold(Some(f), |f| async move {
            let mut f = f?;
            let mut buf = vec![0u8; 1024 * 1024];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), Some(f)))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
        self.put_blob_stream(digest, BlobForm::AsIs, &file.display().to_string(), len, chunks)
            .await
    }

    /// Uploads the blob `digest` kept as `form`, read from `chunks` (named `what` in
    /// errors), unless the bucket has it, as [`Bucket::put_blob_file`] does. `len` is its
    /// size, or for a gzip form the size it inflates to: it only picks one PUT or parts, and
    /// bounds the buffer of one PUT (gzip adds at most a few bytes per 64 KiB).
    pub async fn put_blob_stream<S>(
        &self,
        digest: &str,
        form: BlobForm,
        what: &str,
        len: u64,
        chunks: S,
    ) -> Result<(), BucketError>
    where
        S: futures_util::Stream<Item = std::io::Result<Bytes>> + Send,
    {
        let path = self.blob_path(digest, form)?;
        if self.blob_info(digest, form).await?.is_some() {
            return Ok(());
        }
        let local = |source| BucketError::Local {
            path: what.to_string(),
            source,
        };
        let mut chunks = std::pin::pin!(chunks);
        if len <= SINGLE_PUT_MAX {
            let mut buf = Vec::with_capacity(len as usize);
            while let Some(c) = chunks.next().await {
                buf.extend_from_slice(&c.map_err(local)?);
            }
            return match self
                .store
                .put_opts(&path, PutPayload::from(buf), PutOptions::from(PutMode::Create))
                .await
            {
                // Someone stored the same digest meanwhile: the same bytes.
                Ok(_) | Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                    Ok(())
                }
                Err(e) => Err(Self::err("put", &path)(e)),
            };
        }
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(Self::err("start upload", &path))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        while let Some(c) = chunks.next().await {
            let c = match c {
                Ok(c) => c,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(local(e));
                }
            };
            w.wait_for_capacity(4).await.map_err(Self::err("upload part", &path))?;
            w.write(&c);
        }
        w.finish().await.map_err(Self::err("finish upload", &path))?;
        Ok(())
    }

    /// The bytes of the blob kept as `form` as they stream in (the caller inflates a gzip
    /// form and verifies them), and the object's size.
    pub async fn blob_stream(
        &self,
        digest: &str,
        form: BlobForm,
    ) -> Result<Option<(u64, BoxStream<'static, Result<Bytes, BucketError>>)>, BucketError> {
        let path = self.blob_path(digest, form)?;
        let r = match self.store.get(&path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Self::err("get", &path)(e)),
        };
        let size = r.meta.size;
        let shown = path.to_string();
        let stream = r.into_stream().map_err(move |source| BucketError::Store {
            op: "read",
            path: shown.clone(),
            source,
        });
        Ok(Some((size, rechunk(stream, READ_CHUNK).boxed())))
    }

    /// Refreshes the age of the blob kept as `form` if it is older than [`TOUCH_EVERY`], so
    /// a lifecycle rule keeps what builds use; returns whether it did.
    pub async fn touch_blob(&self, digest: &str, form: BlobForm) -> Result<bool, BucketError> {
        let Some(info) = self.blob_info(digest, form).await? else {
            return Ok(false);
        };
        if now_s() - info.modified_s < TOUCH_EVERY.as_secs() as i64 {
            return Ok(false);
        }
        // S3 refuses a copy onto itself that changes nothing: copy out and back, both
        // server-side, the second replacing the blob with its own bytes.
        let path = self.blob_path(digest, form)?;
        let hex = sha256_hex(digest)?;
        let aside = self.path(["tmp", "touch", form.dir(), hex]);
        self.store.copy(&path, &aside).await.map_err(Self::err("copy", &path))?;
        let back = self.store.copy(&aside, &path).await.map_err(Self::err("copy", &aside));
        let _ = self.store.delete(&aside).await;
        back?;
        Ok(true)
    }

    /// Removes the objects under `prefix` older than `cutoff` (unless `dry_run`); returns
    /// what `needs` says each kept one needs, and how many went.
    async fn prune_listed(
        &self,
        prefix: &str,
        cutoff: i64,
        dry_run: bool,
        needs: impl Fn(&[u8]) -> Vec<String>,
    ) -> Result<(Vec<Vec<String>>, usize), BucketError> {
        let (mut kept, mut removed) = (Vec::new(), 0);
        let dir = self.path([prefix]);
        let mut listing = self.store.list(Some(&dir));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(Self::err("list", &dir))?;
            if meta.last_modified.timestamp() < cutoff {
                if !dry_run {
                    self.store
                        .delete(&meta.location)
                        .await
                        .map_err(Self::err("delete", &meta.location))?;
                }
                removed += 1;
                continue;
            }
            let bytes = self
                .store
                .get(&meta.location)
                .await
                .map_err(Self::err("get", &meta.location))?
                .bytes()
                .await
                .map_err(Self::err("read", &meta.location))?;
            kept.push(needs(&bytes));
        }
        Ok((kept, removed))
    }

    /// Removes records and image names not written for `older_than`, then blobs as old that
    /// no kept record or image needs. Lists the bucket: an administrative job, never a build's path.
    pub async fn prune(&self, older_than: Duration, dry_run: bool) -> Result<PruneReport, BucketError> {
        let cutoff = now_s() - older_than.as_secs() as i64;
        let mut report = PruneReport::default();
        let mut needed = HashSet::new();
        // Records, then images: a kept one names the blobs it needs; one that does not parse
        // needs nothing and is left for its owner.
        let (kept, removed) = self
            .prune_listed("records", cutoff, dry_run, |bytes| {
                serde_json::from_slice::<StepRecord>(bytes)
                    .ok()
                    .and_then(|r| r.layer)
                    .map(|l| vec![l.digest])
                    .unwrap_or_default()
            })
            .await?;
        (report.records_kept, report.records_removed) = (kept.len(), removed);
        needed.extend(kept.into_iter().flatten());
        let (kept, removed) = self
            .prune_listed("images", cutoff, dry_run, |bytes| {
                serde_json::from_slice::<lcache_proto::wire::ImageRecord>(bytes)
                    .map(|i| i.blobs().map(str::to_string).collect())
                    .unwrap_or_default()
            })
            .await?;
        (report.images_kept, report.images_removed) = (kept.len(), removed);
        needed.extend(kept.into_iter().flatten());
        for form in [BlobForm::AsIs, BlobForm::Gzip] {
            self.prune_blobs(form, &needed, cutoff, dry_run, &mut report).await?;
        }
        Ok(report)
    }

    /// Removes the blobs kept as `form` older than `cutoff` that nothing in `needed` names.
    async fn prune_blobs(
        &self,
        form: BlobForm,
        needed: &HashSet<String>,
        cutoff: i64,
        dry_run: bool,
        report: &mut PruneReport,
    ) -> Result<(), BucketError> {
        let blobs = self.path([form.dir(), "sha256"]);
        let mut listing = self.store.list(Some(&blobs));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(Self::err("list", &blobs))?;
            let digest = format!("sha256:{}", meta.location.filename().unwrap_or_default());
            if needed.contains(&digest) || meta.last_modified.timestamp() >= cutoff {
                report.blobs_kept += 1;
                continue;
            }
            if !dry_run {
                self.store
                    .delete(&meta.location)
                    .await
                    .map_err(Self::err("delete", &meta.location))?;
            }
            report.blobs_removed += 1;
            report.bytes_removed += meta.size;
        }
        Ok(())
    }
}

/// Joins the pieces of `input` into pieces of at least `min` bytes (the last may be less).
fn rechunk<S>(input: S, min: usize) -> impl futures_util::Stream<Item = Result<Bytes, BucketError>>
where
    S: futures_util::Stream<Item = Result<Bytes, BucketError>> + Unpin,
{
    futures_util::stream::unfold((input, false), move |(mut input, done)| async move {
        if done {
            return None;
        }
        let mut buf = bytes::BytesMut::new();
        loop {
            match input.next().await {
                Some(Ok(b)) => {
                    buf.extend_from_slice(&b);
                    if buf.len() >= min {
                        return Some((Ok(buf.freeze()), (input, false)));
                    }
                }
                Some(Err(e)) => return Some((Err(e), (input, true))),
                None if buf.is_empty() => return None,
                None => return Some((Ok(buf.freeze()), (input, true))),
            }
        }
    })
}

/// Parses an age such as `30d`, `12h`, `90m` or `45s`.
pub fn parse_age(text: &str) -> Option<Duration> {
    let (n, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return None,
    };
    Some(Duration::from_secs(n * secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lcache_proto::wire::LayerRef;
    use object_store::memory::InMemory;
    use sha2::Digest;

    fn record(key: &str, digest: &str) -> StepRecord {
        StepRecord {
            key: key.into(),
            layer: Some(LayerRef {
                digest: digest.into(),
                blake3: String::new(),
                size: 5,
                diff_id: String::new(),
                media_type: String::new(),
            }),
            duration_ms: 1,
            inputs: None,
            created_at_ms: 0,
        }
    }

    impl Bucket {
        /// Prunes the blobs as old as `cutoff`, keeping those a record names.
        async fn prune_blobs_older(&self, cutoff_age: u64) -> PruneReport {
            let needed: HashSet<String> = [format!("sha256:{:x}", sha2::Sha256::digest(b"layer"))].into();
            let mut report = PruneReport::default();
            for form in [BlobForm::AsIs, BlobForm::Gzip] {
                let cutoff = now_s() - cutoff_age as i64;
                self.prune_blobs(form, &needed, cutoff, false, &mut report)
                    .await
                    .unwrap();
            }
            report
        }
    }

    #[tokio::test]
    async fn records_are_first_writer_wins_blobs_content_addressed_and_prune_keeps_what_records_need() {
        let b = Bucket::with_store(Arc::new(InMemory::new()), "team/cache", "s3://b/team/cache");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("blob");
        std::fs::write(&file, b"layer").unwrap();
        let digest = format!("sha256:{:x}", sha2::Sha256::digest(b"layer"));
        b.put_blob_file(&digest, &file).await.unwrap();
        b.put_blob_file(&digest, &file).await.unwrap();
        let (size, stream) = b.blob_stream(&digest, BlobForm::AsIs).await.unwrap().unwrap();
        let got: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert_eq!((size, got.concat()), (5, b"layer".to_vec()));
        let key = "a".repeat(64);
        assert!(b.put_record("", &record(&key, &digest), false).await.unwrap());
        let other = format!("sha256:{}", "0".repeat(64));
        assert!(
            !b.put_record("", &record(&key, &other), false).await.unwrap(),
            "the first writer wins"
        );
        assert_eq!(
            b.get_record("", &key).await.unwrap().unwrap().layer.unwrap().digest,
            digest
        );
        assert!(b.get_record("pr-1", &key).await.unwrap().is_none(), "scopes are apart");
        assert!(b.blob_stream(&other, BlobForm::AsIs).await.unwrap().is_none());
        assert!(
            b.blob_path("sha256:../../x", BlobForm::Gzip).is_err(),
            "a digest never names a path"
        );
        // A gzip form is kept apart from the blob as it is, under the same digest.
        assert!(b.blob_stream(&digest, BlobForm::Gzip).await.unwrap().is_none());
        let gz = Bytes::from_static(b"\x1f\x8b pretend");
        let one = futures_util::stream::iter([Ok(gz.clone())]);
        b.put_blob_stream(&digest, BlobForm::Gzip, "gz", 5, one).await.unwrap();
        let (_, stream) = b.blob_stream(&digest, BlobForm::Gzip).await.unwrap().unwrap();
        let got: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert_eq!(got.concat(), gz.to_vec());
        let unneeded = format!("sha256:{}", "1".repeat(64));
        let one = futures_util::stream::iter([Ok(gz.clone())]);
        b.put_blob_stream(&unneeded, BlobForm::Gzip, "gz", 5, one)
            .await
            .unwrap();
        let image = lcache_proto::wire::ImageRecord {
            name: "team/app:1".into(),
            manifest_digest: other.clone(),
            config_digest: other.clone(),
            layers: vec![],
            config: "{}".into(),
            created_at_ms: 0,
        };
        b.put_image(&image).await.unwrap();
        assert_eq!(b.get_image("team/app:1").await.unwrap().unwrap().manifest_digest, other);
        assert!(b.get_image("team/app:2").await.unwrap().is_none());
        // Everything is young: nothing goes. Everything is old: the record goes, then its blob.
        let r = b.prune(Duration::from_secs(3600), false).await.unwrap();
        assert_eq!((r.records_removed, r.blobs_removed), (0, 0));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let r = b.prune(Duration::from_secs(0), true).await.unwrap();
        assert_eq!(
            (r.records_removed, r.blobs_removed),
            (1, 3),
            "a dry run counts both forms"
        );
        assert!(b.get_record("", &key).await.unwrap().is_some(), "and removes nothing");
        // Records kept, old blobs: only the gzip form nothing names goes.
        let r = b.prune_blobs_older(0).await;
        assert_eq!((r.blobs_kept, r.blobs_removed), (2, 1));
        assert!(b.blob_info(&digest, BlobForm::Gzip).await.unwrap().is_some());
        assert!(b.blob_info(&unneeded, BlobForm::Gzip).await.unwrap().is_none());
        assert_eq!(parse_age("30d"), Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_age("30"), None);
    }
}
