//! The cache a build replays against: step records by key and blobs by digest, with blob
//! bodies streamed both ways. lcached's client is the first implementation; behaviours such
//! as read-only access are wrappers around any implementation (as sccache's storage and
//! tvix's blob services are layered), so the replay loop never knows which it talks to, and
//! one conformance suite (`tests/tests/step_cache.rs`) runs against each.

use std::io::Write;
use std::path::Path;

use lcache_proto::wire::{BlobPart, LayerDiffId, LayerParts, LayerRef, LayerTail, LinkedBlob, NamedLayer, StepRecord};

use crate::errors::CacheError;

/// The bytes of a blob to store.
#[derive(Debug, Clone, Copy)]
pub enum BlobSource<'a> {
    /// Small documents (configs, manifests), in memory.
    Bytes(&'a [u8]),
    /// `len` bytes of a file from `offset`, streamed (layers).
    File {
        /// The file.
        path: &'a Path,
        /// Where the blob starts.
        offset: u64,
        /// How long it is.
        len: u64,
    },
    /// A re-run COPY's blob, most of whose bytes are runs of the stored blob `base`, as
    /// `parts` say: a cache that can take only the `Sent` runs does; any other stores the
    /// file as it is, after filling its first `unwritten` bytes from `base`.
    Parts {
        /// The file: the blob, but for its first `unwritten` bytes (a hole).
        path: &'a Path,
        /// How long it is.
        len: u64,
        /// The blob the `Base` parts are runs of.
        base: &'a str,
        /// The blob's runs, front to back.
        parts: &'a [BlobPart],
        /// How many bytes at the file's front are not written: `base`'s first bytes, which
        /// the first part names.
        unwritten: u64,
    },
}

impl<'a> BlobSource<'a> {
    /// A whole file.
    pub fn file(path: &'a Path) -> Result<Self, CacheError> {
        let len = std::fs::metadata(path)
            .map_err(|source| CacheError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Ok(Self::File { path, offset: 0, len })
    }
}

/// Step records and blobs: what a build reads and writes while it replays a Dockerfile.
pub trait StepCache: Send + Sync {
    /// The record stored for `key`; `None` is a miss.
    fn get_step(&self, key: &str) -> Result<Option<StepRecord>, CacheError>;
    /// After [`StepCache::get_step`] missed `key`: the cache behind this one that the lookup
    /// could not ask, and why (`None`: there is none, or it was asked).
    fn upstream_unavailable(&self, key: &str) -> Option<String> {
        let _ = key;
        None
    }
    /// Stores a record. Its layer blob must be stored first.
    fn put_step(&self, record: &StepRecord) -> Result<(), CacheError>;
    /// Whether blob `digest` is stored whole.
    fn has_blob(&self, digest: &str) -> Result<bool, CacheError>;
    /// Streams blob `digest` into `out`, verified against the digest; returns its size. A
    /// missing or corrupt blob is [`CacheError::UnusableBlob`], and `out` must be discarded.
    fn get_blob(&self, digest: &str, out: &mut dyn Write) -> Result<u64, CacheError>;
    /// Streams blob `digest`'s bytes from `first` on into `out`; returns how many. A cache
    /// that can serve a range serves it unchecked (for a blob whose use checks it again);
    /// this default reads the whole blob, checked, and drops the front.
    fn get_blob_from(&self, digest: &str, first: u64, out: &mut dyn Write) -> Result<u64, CacheError> {
        let mut rest = DropFront { out, left: first };
        let n = self.get_blob(digest, &mut rest)?;
        Ok(n.saturating_sub(first))
    }
    /// Stores blob `digest` (unless it is there already); the bytes must hash to it.
    fn put_blob(&self, digest: &str, source: BlobSource<'_>) -> Result<(), CacheError>;
    /// Stores a re-run COPY's layer sent as `layer` says (its `Sent` runs read from `file`,
    /// where they lie in the blob) and names it: the cache takes the blob's digest from its
    /// own copy of the earlier blob's members, which the client then never reads, and
    /// starts taking its diff_id ([`StepCache::layer_diff_id`]). `None` when this cache
    /// does not name layers: the caller packs the layer whole and names it itself.
    fn put_layer(&self, file: &Path, layer: &LayerParts) -> Result<Option<NamedLayer>, CacheError> {
        let _ = (file, layer);
        Ok(None)
    }
    /// The diff_id of a layer [`StepCache::put_layer`] named `digest`, from `tail`: waits
    /// for the cache to have taken it.
    fn layer_diff_id(&self, digest: &str, tail: &LayerTail) -> Result<LayerDiffId, CacheError> {
        let _ = tail;
        Err(CacheError::Protocol(format!(
            "layer {digest} was not named by this cache, which does not name layers"
        )))
    }
    /// What the provisional names [`StepCache::put_layer`] answered with `name_later` came
    /// to, in order (waiting for those still being named): `None` for one that stands for
    /// no stored layer.
    fn resolve_layers(&self, names: &[String]) -> Result<Vec<Option<NamedLayer>>, CacheError> {
        Err(CacheError::Protocol(format!(
            "{} provisional layer names cannot be resolved by this cache, which gives none",
            names.len()
        )))
    }
    /// The gzip form of the layer kept as the tar `digest` (`--layer-compression none`),
    /// stored beside it, for an export that compresses.
    fn gzip_form(&self, digest: &str) -> Result<LayerRef, CacheError> {
        Err(CacheError::Protocol(format!(
            "layer {digest} cannot be gzipped by this cache: export it with compression=uncompressed"
        )))
    }
    /// Whether [`StepCache::put_linked`] may take a tar layer by reference (a cache on
    /// this machine, reached through its socket): the pack then writes none of its files.
    fn takes_linked(&self) -> bool {
        false
    }
    /// Stores the tar layer `linked` describes (runs of files on this machine, held by
    /// reference) and names it: its digest, and the states at its marks. `None` when this
    /// cache does not take layers so: the caller packs the layer whole and stores it with
    /// `put_blob`.
    fn put_linked(&self, linked: &LinkedBlob) -> Result<Option<NamedLayer>, CacheError> {
        let _ = linked;
        Ok(None)
    }
}

/// Passes on what is written to it but for the first `left` bytes.
struct DropFront<'a> {
    out: &'a mut dyn Write,
    left: u64,
}

impl Write for DropFront<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let dropped = self.left.min(buf.len() as u64) as usize;
        self.left -= dropped as u64;
        self.out.write_all(&buf[dropped..])?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Counts the blob bytes that pass through `inner`, both ways: what a build fetched and
/// what it stored, for its summary.
pub struct Metered<C> {
    inner: C,
    fetched: std::sync::atomic::AtomicU64,
    stored: std::sync::atomic::AtomicU64,
}

impl<C> Metered<C> {
    /// Wraps `inner`, counting from zero.
    pub fn new(inner: C) -> Self {
        Self {
            inner,
            fetched: Default::default(),
            stored: Default::default(),
        }
    }

    /// Blob bytes fetched so far.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Blob bytes stored so far.
    pub fn stored(&self) -> u64 {
        self.stored.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl<C: StepCache> StepCache for Metered<C> {
    fn get_step(&self, key: &str) -> Result<Option<StepRecord>, CacheError> {
        self.inner.get_step(key)
    }

    fn upstream_unavailable(&self, key: &str) -> Option<String> {
        self.inner.upstream_unavailable(key)
    }

    fn put_step(&self, record: &StepRecord) -> Result<(), CacheError> {
        self.inner.put_step(record)
    }

    fn has_blob(&self, digest: &str) -> Result<bool, CacheError> {
        self.inner.has_blob(digest)
    }

    fn get_blob(&self, digest: &str, out: &mut dyn Write) -> Result<u64, CacheError> {
        let n = self.inner.get_blob(digest, out)?;
        self.fetched.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }

    fn get_blob_from(&self, digest: &str, first: u64, out: &mut dyn Write) -> Result<u64, CacheError> {
        let n = self.inner.get_blob_from(digest, first, out)?;
        self.fetched.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }

    fn put_blob(&self, digest: &str, source: BlobSource<'_>) -> Result<(), CacheError> {
        self.inner.put_blob(digest, source)?;
        let n = match source {
            BlobSource::Bytes(b) => b.len() as u64,
            BlobSource::File { len, .. } | BlobSource::Parts { len, .. } => len,
        };
        self.stored.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn layer_diff_id(&self, digest: &str, tail: &LayerTail) -> Result<LayerDiffId, CacheError> {
        self.inner.layer_diff_id(digest, tail)
    }

    fn resolve_layers(&self, names: &[String]) -> Result<Vec<Option<NamedLayer>>, CacheError> {
        self.inner.resolve_layers(names)
    }

    fn gzip_form(&self, digest: &str) -> Result<LayerRef, CacheError> {
        self.inner.gzip_form(digest)
    }

    fn takes_linked(&self) -> bool {
        self.inner.takes_linked()
    }

    fn put_linked(&self, linked: &LinkedBlob) -> Result<Option<NamedLayer>, CacheError> {
        let named = self.inner.put_linked(linked)?;
        if named.is_some() {
            self.stored
                .fetch_add(linked.len(), std::sync::atomic::Ordering::Relaxed);
        }
        Ok(named)
    }

    fn put_layer(&self, file: &Path, layer: &LayerParts) -> Result<Option<NamedLayer>, CacheError> {
        let named = self.inner.put_layer(file, layer)?;
        if named.is_some() {
            let sent: u64 = layer.blob.sent_ranges().iter().map(|(_, n)| n).sum();
            self.stored.fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(named)
    }
}

/// Reads through `inner` and never writes to it: a build with read-only access still runs
/// every step it must, it just does not share what it built.
pub struct ReadOnly<C>(pub C);

impl<C: StepCache> StepCache for ReadOnly<C> {
    fn get_step(&self, key: &str) -> Result<Option<StepRecord>, CacheError> {
        self.0.get_step(key)
    }

    fn upstream_unavailable(&self, key: &str) -> Option<String> {
        self.0.upstream_unavailable(key)
    }

    fn put_step(&self, _record: &StepRecord) -> Result<(), CacheError> {
        Ok(())
    }

    fn has_blob(&self, digest: &str) -> Result<bool, CacheError> {
        self.0.has_blob(digest)
    }

    fn get_blob(&self, digest: &str, out: &mut dyn Write) -> Result<u64, CacheError> {
        self.0.get_blob(digest, out)
    }

    fn get_blob_from(&self, digest: &str, first: u64, out: &mut dyn Write) -> Result<u64, CacheError> {
        self.0.get_blob_from(digest, first, out)
    }

    fn put_blob(&self, _digest: &str, _source: BlobSource<'_>) -> Result<(), CacheError> {
        Ok(())
    }
}

impl<C: StepCache + ?Sized> StepCache for &C {
    fn get_step(&self, key: &str) -> Result<Option<StepRecord>, CacheError> {
        (**self).get_step(key)
    }

    fn upstream_unavailable(&self, key: &str) -> Option<String> {
        (**self).upstream_unavailable(key)
    }

    fn put_step(&self, record: &StepRecord) -> Result<(), CacheError> {
        (**self).put_step(record)
    }

    fn has_blob(&self, digest: &str) -> Result<bool, CacheError> {
        (**self).has_blob(digest)
    }

    fn get_blob(&self, digest: &str, out: &mut dyn Write) -> Result<u64, CacheError> {
        (**self).get_blob(digest, out)
    }

    fn get_blob_from(&self, digest: &str, first: u64, out: &mut dyn Write) -> Result<u64, CacheError> {
        (**self).get_blob_from(digest, first, out)
    }

    fn put_blob(&self, digest: &str, source: BlobSource<'_>) -> Result<(), CacheError> {
        (**self).put_blob(digest, source)
    }

    fn put_layer(&self, file: &Path, layer: &LayerParts) -> Result<Option<NamedLayer>, CacheError> {
        (**self).put_layer(file, layer)
    }

    fn layer_diff_id(&self, digest: &str, tail: &LayerTail) -> Result<LayerDiffId, CacheError> {
        (**self).layer_diff_id(digest, tail)
    }

    fn resolve_layers(&self, names: &[String]) -> Result<Vec<Option<NamedLayer>>, CacheError> {
        (**self).resolve_layers(names)
    }

    fn gzip_form(&self, digest: &str) -> Result<LayerRef, CacheError> {
        (**self).gzip_form(digest)
    }

    fn takes_linked(&self) -> bool {
        (**self).takes_linked()
    }

    fn put_linked(&self, linked: &LinkedBlob) -> Result<Option<NamedLayer>, CacheError> {
        (**self).put_linked(linked)
    }
}
