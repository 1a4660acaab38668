//! Content-addressed layer blobs under `blobs/sha256/<hex>`: a file, or for a blob uploaded
//! as parts a directory of runs (`blob_file`, `blob_parts`). An upload streams to
//! `blobs/tmp/`, is hashed as it arrives, fsynced, checked against its claimed digest and
//! only then renamed into place: a reader never sees a partial blob, and leftovers of a
//! daemon killed mid-upload are removed at the next start.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

use super::BlobMeta;
use crate::server::Limits;

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The bytes do not hash to the digest they were uploaded under.
    #[error("the uploaded bytes have digest {actual}, not {expected}")]
    DigestMismatch {
        /// The digest in the URL.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// Fewer (or more) bytes arrived than Content-Length announced.
    #[error("the upload announced {expected} bytes but {received} arrived")]
    Truncated {
        /// Content-Length.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// The connection failed mid-body.
    #[error("the upload was cut off: {0}")]
    Body(String),
    /// More bytes than the daemon accepts for one blob.
    #[error("the blob is larger than this daemon's limit of {limit} bytes")]
    TooLarge {
        /// `--max-blob-size`.
        limit: u64,
    },
    /// The client stopped sending mid-body.
    #[error("no byte of the upload arrived for {0:?}")]
    Stalled(std::time::Duration),
    /// A blob uploaded as parts whose list of parts is malformed or does not fit its base.
    #[error("the blob's parts are refused: {0}")]
    BadParts(String),
    /// A blob uploaded as parts whose base blob is not stored here.
    #[error("the base blob of the parts is not in the store")]
    BaseMissing,
    /// Writing to disk failed.
    #[error("cannot write the blob: {0}")]
    Io(#[from] std::io::Error),
}

/// The blob directory.
pub struct BlobStore {
    root: PathBuf,
    tmp: PathBuf,
    /// Each blob's SHA-256 states (`blob_states`), by hex digest.
    states: PathBuf,
    /// Layers answered with a provisional name and not yet named, by the name's hex: kept
    /// across a restart, unlike `tmp` (`blob_parts::ReceivedParts`).
    pub(crate) provisional: PathBuf,
    /// Tar layers held as links to the client's files (`linked_blobs`).
    pub(crate) packs: PathBuf,
    seq: AtomicU64,
}

use super::blob_file::BlobFile;
use super::blob_states::GridSha;

pub use lcache_proto::digest::sha256_hex;

/// Removes a temp file unless the upload committed it.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl BlobStore {
    /// Opens `dir` (creating it) and clears temp files left by an earlier run.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let root = dir.join("sha256");
        let tmp = dir.join("tmp");
        let states = dir.join("states");
        let provisional = dir.join("provisional");
        let packs = dir.join(super::blob_file::PACKS);
        std::fs::create_dir_all(&provisional)?;
        std::fs::create_dir_all(&packs)?;
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&tmp)?;
        std::fs::create_dir_all(&states)?;
        for e in std::fs::read_dir(&tmp)? {
            remove_any(&e?.path())?;
        }
        let store = Self {
            root,
            tmp,
            states,
            provisional,
            packs,
            seq: AtomicU64::new(0),
        };
        // Nothing reads yet: a pack no blob links is nobody's.
        store.collect_packs(std::time::Duration::ZERO)?;
        Ok(store)
    }

    /// Keeps blob `digest`'s SHA-256 states. Not synced: a state lost or damaged only
    /// costs a later check from the blob's start.
    pub(crate) fn save_states(&self, digest: &str, states: &[u8]) {
        let Some(hex) = sha256_hex(digest) else { return };
        if states.is_empty() {
            return;
        }
        let mut kept = states.to_vec();
        kept.extend_from_slice(states_check(digest, states).as_bytes());
        let tmp = self.temp_path("s");
        if std::fs::write(&tmp, kept).is_ok() && std::fs::rename(&tmp, self.states.join(hex)).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Blob `digest`'s kept SHA-256 states (empty when none are, or when they do not match
    /// the BLAKE3 kept after them: a blob named from its base's states, as `POST
    /// /v1/layers` names one, has no digest to check a damaged state against).
    pub(crate) fn load_states(&self, digest: &str) -> Vec<u8> {
        let Some(kept) = sha256_hex(digest).and_then(|hex| std::fs::read(self.states.join(hex)).ok()) else {
            return Vec::new();
        };
        match kept.split_last_chunk::<32>() {
            Some((states, check)) if states_check(digest, states).as_bytes() == check => states.to_vec(),
            _ => Vec::new(),
        }
    }

    /// Where a blob with a valid digest lives (a file, or a composed blob's directory).
    pub(crate) fn path_of(&self, digest: &str) -> Option<PathBuf> {
        sha256_hex(digest).map(|h| self.root.join(h))
    }

    /// Where an upload of `digest` goes once verified.
    pub(crate) fn destination(&self, digest: &str) -> Result<PathBuf, IngestError> {
        self.path_of(digest)
            .ok_or_else(|| IngestError::Body(format!("'{digest}' is not a sha256 digest")))
    }

    /// Whether blob `digest` is on disk (its bytes are not checked).
    pub fn exists(&self, digest: &str) -> bool {
        self.path_of(digest).is_some_and(|p| p.symlink_metadata().is_ok())
    }

    /// Blob `digest` opened for reading; `None` when it is not on disk.
    pub fn open_blob(&self, digest: &str) -> std::io::Result<Option<BlobFile>> {
        match self.path_of(digest) {
            Some(p) => BlobFile::open(&p),
            None => Ok(None),
        }
    }

    /// The whole of a small blob (a config, a manifest); `None` when it is not on disk.
    pub async fn read_small(&self, digest: &str) -> std::io::Result<Option<Vec<u8>>> {
        let Some(path) = self.path_of(digest) else {
            return Ok(None);
        };
        tokio::task::spawn_blocking(move || {
            let Some(blob) = BlobFile::open(&path)? else {
                return Ok(None);
            };
            let mut out = Vec::with_capacity(blob.len().min(16 << 20) as usize);
            blob.copy_to(&mut out)?;
            Ok(Some(out))
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// The bytes the blobs' files take, each file once however many blobs link it (a blob
    /// kept as runs links its base's files).
    pub fn disk_usage(&self) -> std::io::Result<u64> {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        for e in std::fs::read_dir(&self.root)? {
            let path = e?.path();
            let files = match path.symlink_metadata() {
                Ok(m) if m.is_dir() => std::fs::read_dir(&path)?
                    .filter_map(|e| e.ok().and_then(|e| e.path().symlink_metadata().ok()))
                    .collect(),
                Ok(m) => vec![m],
                // Removed meanwhile (evicted, repaired).
                Err(_) => Vec::new(),
            };
            for m in files.iter().filter(|m| m.is_file()) {
                if seen.insert((m.dev(), m.ino())) {
                    total += m.len();
                }
            }
        }
        // A pack's files are the client's snapshot files too: counted here in full, as the
        // client's cache budget counts them (one inode, two budgets).
        for e in std::fs::read_dir(&self.packs)? {
            if let Some(id) = e?.file_name().to_str() {
                total += self.pack_bytes(id);
            }
        }
        Ok(total)
    }

    /// The bytes removing blob `digest` would free: its files that no other blob links.
    pub fn freed_by_removing(&self, digest: &str) -> u64 {
        let Some(path) = self.path_of(digest) else { return 0 };
        let files: Vec<(String, std::fs::Metadata)> = match path.symlink_metadata() {
            Ok(m) if m.is_dir() => std::fs::read_dir(&path)
                .map(|d| {
                    d.filter_map(|e| {
                        let e = e.ok()?;
                        Some((
                            e.file_name().to_string_lossy().into_owned(),
                            e.path().symlink_metadata().ok()?,
                        ))
                    })
                    .collect()
                })
                .unwrap_or_default(),
            Ok(m) => vec![(String::new(), m)],
            Err(_) => Vec::new(),
        };
        let packs: u64 = files
            .iter()
            .filter_map(|(name, m)| Some((name.strip_prefix("p.")?, m)))
            // The pack's own name and this blob's: the last blob that reads it.
            .filter(|(_, m)| m.nlink() == 2)
            .map(|(id, _)| self.pack_bytes(id))
            .sum();
        files
            .iter()
            .filter(|(_, m)| m.is_file() && m.nlink() == 1)
            .map(|(_, m)| m.len())
            .sum::<u64>()
            + packs
    }

    /// Deletes a blob (after its metadata is gone, so nothing serves it meanwhile). Bytes
    /// another composed blob still links stay on disk for it.
    pub fn remove(&self, digest: &str) -> std::io::Result<()> {
        if let Some(hex) = sha256_hex(digest) {
            let _ = std::fs::remove_file(self.states.join(hex));
        }
        match self.path_of(digest) {
            Some(p) => match remove_any(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// A fresh name in the temp directory.
    pub(crate) fn temp_path(&self, tag: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{}-{n}{tag}", std::process::id()))
    }

    /// Renames a verified, synced blob (file or directory) from the temp directory into
    /// place, replacing what was there (a repair), and makes the rename durable.
    pub(crate) async fn commit(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        if let Err(e) = tokio::fs::rename(from, to).await {
            // A file cannot be renamed over a directory nor a directory over anything
            // but an empty one: the old copy goes first (readers holding it keep it).
            if to.symlink_metadata().is_err() {
                return Err(e);
            }
            let old = to.to_path_buf();
            tokio::task::spawn_blocking(move || remove_any(&old))
                .await
                .map_err(std::io::Error::other)??;
            tokio::fs::rename(from, to).await?;
        }
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(root)?.sync_all())
            .await
            .map_err(std::io::Error::other)?
    }

    /// Temp files currently present (uploads in flight).
    pub fn temp_files(&self) -> usize {
        std::fs::read_dir(&self.tmp).map(|d| d.count()).unwrap_or(0)
    }

    /// Streams `body` into the store under `digest`; `expected_len` is Content-Length. At most
    /// `limits.max_blob_size` bytes are taken, and a body that stalls for `limits.body_timeout`
    /// is dropped.
    pub async fn ingest<B>(
        &self,
        digest: &str,
        mut body: B,
        expected_len: Option<u64>,
        limits: &Limits,
    ) -> Result<BlobMeta, IngestError>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let final_path = self.destination(digest)?;
        let tmp_path = self.temp_path("");
        if expected_len.is_some_and(|n| n > limits.max_blob_size) {
            return Err(IngestError::TooLarge {
                limit: limits.max_blob_size,
            });
        }
        let mut guard = TempGuard(Some(tmp_path.clone()));
        let mut file = tokio::fs::File::create(&tmp_path).await?;
        let mut sha = GridSha::default();
        let mut b3 = blake3::Hasher::new();
        let mut received = 0u64;
        loop {
            let frame = tokio::time::timeout(limits.body_timeout, body.frame())
                .await
                .map_err(|_| IngestError::Stalled(limits.body_timeout))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| IngestError::Body(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                received += data.len() as u64;
                if received > limits.max_blob_size {
                    return Err(IngestError::TooLarge {
                        limit: limits.max_blob_size,
                    });
                }
                std::io::Write::write_all(&mut sha, &data)?;
                b3.update(&data);
                file.write_all(&data).await?;
            }
        }
        if let Some(expected) = expected_len {
            if expected != received {
                return Err(IngestError::Truncated { expected, received });
            }
        }
        let (actual, states) = sha.finish();
        if actual != digest {
            return Err(IngestError::DigestMismatch {
                expected: digest.to_string(),
                actual,
            });
        }
        file.sync_all().await?;
        drop(file);
        self.commit(&tmp_path, &final_path).await?;
        guard.0 = None;
        self.save_states(digest, &states);
        Ok(BlobMeta {
            digest: digest.to_string(),
            blake3: b3.finalize().to_hex().to_string(),
            size: received,
        })
    }
}

impl BlobStore {
    /// Stores what `make` writes (on the blocking pool), under its digest: hashed as it is
    /// written, synced, then renamed into place like an upload. For blobs the daemon makes
    /// itself (a layer gzipped for a push).
    pub async fn store_made<F>(&self, make: F) -> Result<BlobMeta, IngestError>
    where
        F: FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send + 'static,
    {
        let tmp_path = self.temp_path("");
        let mut guard = TempGuard(Some(tmp_path.clone()));
        let path = tmp_path.clone();
        let (digest, states, b3, size) = tokio::task::spawn_blocking(move || {
            let mut out = MadeBlob {
                file: std::io::BufWriter::new(std::fs::File::create(&path)?),
                sha: GridSha::default(),
                b3: blake3::Hasher::new(),
                size: 0,
            };
            make(&mut out)?;
            let file = out.file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            let (digest, states) = out.sha.finish();
            Ok::<_, std::io::Error>((digest, states, out.b3.finalize(), out.size))
        })
        .await
        .map_err(std::io::Error::other)??;
        let final_path = self.destination(&digest)?;
        self.commit(&tmp_path, &final_path).await?;
        guard.0 = None;
        self.save_states(&digest, &states);
        Ok(BlobMeta {
            digest,
            blake3: b3.to_hex().to_string(),
            size,
        })
    }
}

/// A blob the daemon writes itself, hashed as it goes.
struct MadeBlob {
    file: std::io::BufWriter<std::fs::File>,
    sha: GridSha,
    b3: blake3::Hasher,
    size: u64,
}

impl std::io::Write for MadeBlob {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        std::io::Write::write_all(&mut self.sha, &buf[..n])?;
        self.b3.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Removes a file, or a directory with what it holds.
fn remove_any(path: &Path) -> std::io::Result<()> {
    if path.symlink_metadata()?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// What a blob's kept states are checked by: BLAKE3 over its digest and the states.
fn states_check(digest: &str, states: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(digest.as_bytes());
    h.update(states);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn digest_of(b: &[u8]) -> String {
        use sha2::Digest as _;
        format!("sha256:{:x}", sha2::Sha256::digest(b))
    }

    #[tokio::test]
    async fn a_good_upload_lands_whole_and_a_bad_one_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let data = Bytes::from_static(b"layer bytes");
        let meta = s
            .ingest(&digest_of(&data), Full::new(data.clone()), Some(11), &Limits::default())
            .await
            .unwrap();
        assert_eq!(meta.size, 11);
        assert_eq!(std::fs::read(s.path_of(&meta.digest).unwrap()).unwrap(), data);

        let wrong = digest_of(b"other");
        let e = s
            .ingest(&wrong, Full::new(data.clone()), None, &Limits::default())
            .await
            .unwrap_err();
        assert!(matches!(e, IngestError::DigestMismatch { .. }));
        assert!(!s.path_of(&wrong).unwrap().exists());
        let e = s
            .ingest(&digest_of(&data), Full::new(data.clone()), Some(99), &Limits::default())
            .await
            .unwrap_err();
        assert!(matches!(e, IngestError::Truncated { .. }));
        assert_eq!(s.temp_files(), 0);
    }

    #[test]
    fn leftover_temp_files_are_cleared_on_open() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("tmp")).unwrap();
        std::fs::write(d.path().join("tmp/123-0"), "partial").unwrap();
        // A blob of parts cut off mid-upload leaves a directory.
        std::fs::create_dir_all(d.path().join("tmp/123-1d")).unwrap();
        std::fs::write(d.path().join("tmp/123-1d/s"), "partial").unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        assert_eq!(s.temp_files(), 0);
    }

    #[test]
    fn only_sha256_digests_name_blobs() {
        assert!(sha256_hex(&format!("sha256:{}", "a".repeat(64))).is_some());
        assert!(sha256_hex("sha256:../../etc/passwd").is_none());
        assert!(sha256_hex(&format!("sha256:{}", "A".repeat(64))).is_none());
    }
}
