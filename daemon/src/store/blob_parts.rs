//! Blobs uploaded as parts (`lcache_proto::wire::BLOB_PARTS_TYPE`): runs of a stored base
//! blob and runs the body sends. Only the sent bytes are written; the base's runs become
//! hard links to the files they lie in (flattened, so a recipe never points at another
//! recipe), and the whole is hashed from those links before it is renamed into place, so a
//! composed blob is verified exactly as a whole upload is. A blob whose runs would spread
//! over more than [`MAX_FILES`] files has the runs of its smaller files copied into one
//! (what the edits since the last merge sent), the largest staying linked; it is written
//! whole only when that would copy most of it.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use lcache_proto::wire::{BlobPart, BlobParts, LayerCompression, LayerDiffId, LayerParts, LayerTail};

use crate::layer_naming::{known, start, Started};
use lcache_image::layer_segments::tar_state_is_valid;
use tokio::io::AsyncWriteExt;

use super::blob_file::{pack_link_name, BlobFile, Recipe, RecipeRun, Source, RECIPE};
use super::blob_states::{self, GridSha};
use super::blob_store::{sha256_hex, BlobStore, IngestError};
use super::BlobMeta;
use crate::server::Limits;

/// What a kept layer's header (its `LayerParts`) is called in its directory.
const HEADER: &str = "header.json";

/// More files than this behind one blob, and it is stored whole.
pub const MAX_FILES: usize = 64;

/// The largest header (the JSON list of parts) taken.
const MAX_HEADER: u64 = 4 << 20;

/// The file holding the bytes an upload sent, in its blob's directory.
const SENT: &str = "s";

/// A request body read in pieces, with the daemon's limits.
struct BodyReader<'a, B> {
    body: B,
    held: BytesMut,
    received: u64,
    limits: &'a Limits,
}

impl<B> BodyReader<'_, B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// The next bytes of the body, what is held first; `None` at its end.
    async fn next(&mut self) -> Result<Option<Bytes>, IngestError> {
        if !self.held.is_empty() {
            return Ok(Some(self.held.split().freeze()));
        }
        self.frame().await
    }

    /// The body's next frame of data, past what is held; `None` at its end.
    async fn frame(&mut self) -> Result<Option<Bytes>, IngestError> {
        loop {
            let frame = tokio::time::timeout(self.limits.body_timeout, self.body.frame())
                .await
                .map_err(|_| IngestError::Stalled(self.limits.body_timeout))?;
            let Some(frame) = frame else { return Ok(None) };
            let frame = frame.map_err(|e| IngestError::Body(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                self.received += data.len() as u64;
                if self.received > self.limits.max_blob_size.saturating_add(MAX_HEADER + 8) {
                    return Err(IngestError::TooLarge {
                        limit: self.limits.max_blob_size,
                    });
                }
                if !data.is_empty() {
                    return Ok(Some(data));
                }
            }
        }
    }

    /// Exactly `n` bytes (`n` is bounded by the caller).
    async fn exact(&mut self, n: usize) -> Result<Bytes, IngestError> {
        while self.held.len() < n {
            // From the body: `next` would hand back what is held, and this loop would spin
            // on it for ever (a header longer than what its first frame carried did).
            let Some(more) = self.frame().await? else {
                return Err(IngestError::Truncated {
                    expected: n as u64,
                    received: self.held.len() as u64,
                });
            };
            self.held.extend_from_slice(&more);
        }
        Ok(self.held.split_to(n).freeze())
    }
}

fn bad(what: impl Into<String>) -> IngestError {
    IngestError::BadParts(what.into())
}

/// Removes a directory unless the upload committed it.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// How a blob's runs are kept once they spread over more than [`MAX_FILES`] files.
#[derive(Debug, PartialEq, Eq)]
enum Spread {
    /// Few enough files: as they are.
    Linked,
    /// The files (by name) holding the least of the blob, their runs to be copied into one
    /// file: the largest [`MAX_FILES`]` / 2` stay linked.
    Merge(std::collections::HashSet<String>),
    /// Merging would copy most of the blob: written whole.
    Whole,
}

/// The file a blob's merged runs are copied into.
const MERGED: &str = "m";

fn spread(recipe: &Recipe) -> Spread {
    // A pack's runs are the client's files, linked: never copied (its own link keeps it).
    let mut held: HashMap<&str, u64> = HashMap::new();
    for r in recipe.runs.iter().filter(|r| !r.pack) {
        *held.entry(r.file.as_str()).or_default() += r.len;
    }
    if held.len() <= MAX_FILES {
        return Spread::Linked;
    }
    let mut files: Vec<(&str, u64)> = held.into_iter().collect();
    // Largest first; by name among equals, so the same runs merge the same way.
    files.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let merged = &files[MAX_FILES / 2..];
    let total: u64 = recipe.runs.iter().map(|r| r.len).sum();
    // Each merge leaves at most half the limit in files, so the next comes no sooner than
    // MAX_FILES / 2 edits later, and copies what those edits sent, not the whole layer.
    if merged.iter().map(|f| f.1).sum::<u64>().saturating_mul(2) > total {
        return Spread::Whole;
    }
    Spread::Merge(merged.iter().map(|f| f.0.to_string()).collect())
}

/// Copies the runs of the files `merged` into one file in `dir`, in blob order, points the
/// recipe at it and removes their names from `dir`.
fn merge_runs(dir: &Path, recipe: &mut Recipe, merged: &std::collections::HashSet<String>) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(dir.join(MERGED))?);
    let mut opened: HashMap<String, std::fs::File> = HashMap::new();
    let mut at = 0u64;
    let mut runs: Vec<RecipeRun> = Vec::with_capacity(recipe.runs.len());
    let mut buf = vec![0u8; 1 << 20];
    for r in &recipe.runs {
        let run = if !r.pack && merged.contains(&r.file) {
            if !opened.contains_key(&r.file) {
                opened.insert(r.file.clone(), std::fs::File::open(dir.join(&r.file))?);
            }
            let f = &opened[&r.file];
            let mut done = 0u64;
            while done < r.len {
                let n = (r.len - done).min(buf.len() as u64) as usize;
                f.read_exact_at(&mut buf[..n], r.offset + done)?;
                out.write_all(&buf[..n])?;
                done += n as u64;
            }
            at += r.len;
            RecipeRun {
                file: MERGED.into(),
                offset: at - r.len,
                len: r.len,
                pack: false,
            }
        } else {
            r.clone()
        };
        match runs.last_mut() {
            Some(last) if last.file == run.file && last.pack == run.pack && last.offset + last.len == run.offset => {
                last.len += run.len
            }
            _ => runs.push(run),
        }
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    recipe.runs = runs;
    for name in merged {
        std::fs::remove_file(dir.join(name))?;
    }
    Ok(())
}

/// Hard-links `from` at `to`, replacing what an interrupted naming of the same received
/// layer linked there before a restart (the same names, given in the same order).
fn link_afresh(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(from, to) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(to)?;
            std::fs::hard_link(from, to)
        }
        done => done,
    }
}

/// The runs of `parts` over the base's runs (`base`) and the sent file, with the base's
/// files each linked once into `dir` under a name of their own, and the packs the base
/// reads kept as runs of the pack (their manifest linked once, as the pack's reference).
fn runs_of(parts: &[BlobPart], base: &BlobFile, dir: &Path) -> Result<Recipe, IngestError> {
    let mut names: HashMap<PathBuf, String> = HashMap::new();
    let mut packs: HashMap<String, ()> = HashMap::new();
    let mut recipe = Recipe::default();
    let mut push = |file: &str, offset: u64, len: u64, pack: bool| match recipe.runs.last_mut() {
        Some(last) if last.file == file && last.pack == pack && last.offset + last.len == offset => last.len += len,
        _ => recipe.runs.push(RecipeRun {
            file: file.to_string(),
            offset,
            len,
            pack,
        }),
    };
    let missing = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            IngestError::BaseMissing
        } else {
            IngestError::Io(e)
        }
    };
    let mut sent_at = 0u64;
    for part in parts.iter().filter(|p| !p.is_empty()) {
        let (offset, len) = match *part {
            BlobPart::Sent { len } => {
                push(SENT, sent_at, len, false);
                sent_at += len;
                continue;
            }
            BlobPart::Base { offset, len } => (offset, len),
        };
        if offset.checked_add(len).is_none_or(|end| end > base.len()) {
            return Err(bad(format!("a part runs past the base blob's {} bytes", base.len())));
        }
        // The base's runs that the part overlaps.
        let picked = base.select(&[(offset, len)]).map_err(IngestError::Io)?;
        for run in &picked.runs {
            match &run.source {
                Source::Open { path, .. } => {
                    let name = match names.get(path) {
                        Some(n) => n.clone(),
                        None => {
                            let name = format!("b{}", names.len());
                            link_afresh(path, &dir.join(&name)).map_err(missing)?;
                            names.insert(path.clone(), name.clone());
                            name
                        }
                    };
                    push(&name, run.offset, run.len, false);
                }
                Source::Linked { pack, at, .. } => {
                    if !packs.contains_key(&pack.id) {
                        link_afresh(&pack.manifest_path(), &dir.join(pack_link_name(&pack.id))).map_err(missing)?;
                        packs.insert(pack.id.clone(), ());
                    }
                    push(&pack.id, *at, run.len, true);
                }
            }
        }
    }
    Ok(recipe)
}

/// Hashes the blob `recipe` makes in `dir` (read back through the links just made, so what
/// is checked is what will be served) and, when `whole` is given, writes it there. The
/// SHA-256 resumes from the first `resume.1` of the base's kept states `resume.0` (the
/// blob's first part being the base's front) and, when the blob is written whole, runs
/// beside its BLAKE3 on its own thread. Returns the SHA-256 digest and its states, the
/// BLAKE3 (empty for a blob kept as runs) and the length; and the SHA-256's state at each
/// of `marks` (ascending, none in front of where it resumes).
fn hash_runs(
    dir: &Path,
    recipe: &Recipe,
    whole: Option<&Path>,
    resume: (&[u8], usize),
    marks: &[u64],
) -> std::io::Result<(Hashed, Vec<Vec<u8>>)> {
    struct Blake3<W> {
        b3: blake3::Hasher,
        out: W,
    }
    impl<W: Write> Write for Blake3<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.b3.update(buf);
            self.out.write_all(buf)?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let blob = BlobFile::from_recipe(dir, recipe)?;
    let hash_sha = || -> std::io::Result<_> {
        // A kept state that does not even parse: from the first byte.
        let mut sha = GridSha::resume(resume.0, resume.1).unwrap_or_default().marking(marks);
        blob.copy_from_to(sha.at(), &mut sha)?;
        let marked = sha.marked().to_vec();
        Ok((sha.finish(), marked))
    };
    let Some(whole) = whole else {
        // Kept as runs: nothing is written, and only what follows the base's front is
        // read. Its BLAKE3 would read the whole blob and nothing reads it: left empty.
        let ((digest, states), marked) = hash_sha()?;
        return Ok(((digest, states, String::new(), blob.len()), marked));
    };
    let mut b = Blake3 {
        b3: blake3::Hasher::new(),
        out: std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(whole)?),
    };
    let (sha, len) = std::thread::scope(|s| {
        let sha = s.spawn(hash_sha);
        let len = blob.copy_to(&mut b);
        let sha = sha
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the hashing thread failed")));
        (sha, len)
    });
    let (((digest, states), marked), len) = (sha?, len?);
    let Blake3 { b3, out } = b;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(((digest, states, b3.finalize().to_hex().to_string(), len), marked))
}

/// A body of parts read whole, its sent bytes durable: what is left to check and name.
pub struct ReceivedParts {
    claimed: Option<String>,
    header: BlobParts,
    tail: Option<LayerTail>,
    base: BlobFile,
    dir: PathBuf,
    guard: TempDir,
    /// The blob's length.
    pub size: u64,
    /// Whether the client asked to be answered before the blob is named.
    pub name_later: bool,
}

/// A blob's SHA-256 digest, its kept states, its BLAKE3 and its length.
type Hashed = (String, Vec<u8>, String, u64);

/// A layer's blob stored from `POST /v1/layers`: the blob, and its SHA-256 state after each
/// member the request listed.
#[derive(Debug)]
pub struct NamedBlob {
    /// The blob as stored.
    pub meta: BlobMeta,
    /// The blob's SHA-256 state after each listed member.
    pub blob_states: Vec<Vec<u8>>,
}

impl BlobStore {
    /// Stores blob `digest` from a body of parts (`BLOB_PARTS_TYPE`): the header, then the
    /// sent bytes, which are all that is written (unless the blob is to be stored whole).
    /// Nothing is kept unless every byte arrived and the whole hashes to `digest`.
    pub async fn ingest_parts<B>(
        &self,
        digest: &str,
        body: B,
        expected_len: Option<u64>,
        limits: &Limits,
    ) -> Result<BlobMeta, IngestError>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let (meta, _) = self.ingest_composed(Some(digest), body, expected_len, limits).await?;
        Ok(meta)
    }

    /// Stores a re-run COPY's layer from a body of parts whose header is a `LayerParts`,
    /// under the digest its bytes hash to, with its SHA-256 state after each member the
    /// header lists. Nothing is kept unless every byte arrived and the blob's front (the
    /// base's) gives the state the header says the client packed against. Returns the
    /// blob and the header's tail, whose diff_id is the caller's to take
    /// (`crate::layer_naming`).
    pub async fn ingest_layer<B>(
        &self,
        body: B,
        expected_len: Option<u64>,
        limits: &Limits,
    ) -> Result<(NamedBlob, LayerTail, Started), IngestError>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let received = self.receive_layer(body, expected_len, limits).await?;
        self.name_layer(received, |_| Ok(())).await
    }

    /// The first half of [`Self::ingest_layer`]: the body read whole, its sent bytes
    /// durable, nothing checked against the base or named yet (`name_later`: the client is
    /// answered now, and [`Self::name_layer`] runs behind).
    pub async fn receive_layer<B>(
        &self,
        body: B,
        expected_len: Option<u64>,
        limits: &Limits,
    ) -> Result<ReceivedParts, IngestError>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        self.receive_composed(None, body, expected_len, limits).await
    }

    /// Keeps a layer received under the provisional name whose hex is `hex`, header and
    /// all, where a restart finds it ([`Self::received_before`]): its client was answered,
    /// so the layer is named even if the daemon stops first.
    pub async fn keep_received(&self, received: &mut ReceivedParts, hex: &str) -> std::io::Result<()> {
        let header = LayerParts {
            blob: received.header.clone(),
            tail: received
                .tail
                .clone()
                .ok_or_else(|| std::io::Error::other("a layer without its tail"))?,
            name_later: true,
        };
        let json = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
        let dir = received.dir.clone();
        let kept = self.provisional.join(hex);
        let (to, parent) = (kept.clone(), self.provisional.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut f = std::fs::File::create(dir.join(HEADER))?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::File::open(&dir)?.sync_all()?;
            std::fs::rename(&dir, &to)?;
            std::fs::File::open(&parent)?.sync_all()
        })
        .await
        .map_err(std::io::Error::other)??;
        received.dir.clone_from(&kept);
        received.guard = TempDir(Some(kept));
        Ok(())
    }

    /// The layers [`Self::keep_received`] kept and the daemon stopped before naming, by
    /// their names' hex: each to name now, or why it cannot be (removed then).
    pub fn received_before(&self) -> Vec<(String, Result<ReceivedParts, IngestError>)> {
        let Ok(entries) = std::fs::read_dir(&self.provisional) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for e in entries.flatten() {
            let Ok(hex) = e.file_name().into_string() else { continue };
            let dir = e.path();
            let guard = TempDir(Some(dir.clone()));
            let received = std::fs::read(dir.join(HEADER))
                .map_err(IngestError::Io)
                .and_then(|b| serde_json::from_slice::<LayerParts>(&b).map_err(|e| bad(e.to_string())))
                .and_then(|l| {
                    let base = self.path_of(&l.blob.base).ok_or(IngestError::BaseMissing)?;
                    let base = BlobFile::open(&base)?.ok_or(IngestError::BaseMissing)?;
                    let size = l.blob.parts.iter().map(BlobPart::len).sum();
                    Ok(ReceivedParts {
                        claimed: None,
                        header: l.blob,
                        tail: Some(l.tail),
                        base,
                        dir,
                        guard,
                        size,
                        name_later: true,
                    })
                });
            found.push((hex, received));
        }
        found
    }

    /// The second half of [`Self::ingest_layer`]: checks and names the layer received.
    /// `before_commit` is told the name once the layer is checked, before the received
    /// directory leaves `provisional/`: what it makes durable then survives a kill that
    /// the directory, once moved, would not (its error keeps the layer unnamed).
    pub async fn name_layer(
        &self,
        received: ReceivedParts,
        before_commit: impl FnOnce(&NamedBlob) -> Result<(), IngestError>,
    ) -> Result<(NamedBlob, LayerTail, Started), IngestError> {
        let mut told = Some(before_commit);
        let tell = |meta: &BlobMeta, blob_states: &[Vec<u8>]| match told.take() {
            Some(f) => f(&NamedBlob {
                meta: meta.clone(),
                blob_states: blob_states.to_vec(),
            }),
            None => Ok(()),
        };
        let (meta, named) = self.name_received(received, tell).await?;
        let (tail, blob_states, started) = named.ok_or_else(|| bad("the layer's tail was not given"))?;
        Ok((NamedBlob { meta, blob_states }, tail, started))
    }

    /// [`Self::ingest_parts`] when `claimed` is given, else [`Self::ingest_layer`] (whose
    /// tail and states are returned beside the blob).
    async fn ingest_composed<B>(
        &self,
        claimed: Option<&str>,
        body: B,
        expected_len: Option<u64>,
        limits: &Limits,
    ) -> Result<(BlobMeta, Option<(LayerTail, Vec<Vec<u8>>, Started)>), IngestError>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let received = self.receive_composed(claimed, body, expected_len, limits).await?;
        self.name_received(received, |_, _| Ok(())).await
    }

    /// Reads a body of parts: its header checked, its sent bytes written and synced into a
    /// directory of their own (removed unless the blob is named).
    async fn receive_composed<B>(
        &self,
        claimed: Option<&str>,
        body: B,
        expected_len: Option<u64>,
        limits: &Limits,
    ) -> Result<ReceivedParts, IngestError>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        if let Some(d) = claimed {
            self.destination(d)?;
        }
        let mut body = BodyReader {
            body,
            held: BytesMut::new(),
            received: 0,
            limits,
        };
        let header_len = body.exact(8).await?.get_u64();
        if header_len > MAX_HEADER {
            return Err(bad(format!(
                "the list of parts is {header_len} bytes; at most {MAX_HEADER}"
            )));
        }
        let head = body.exact(header_len as usize).await?;
        let invalid = |e: serde_json::Error| bad(format!("the list of parts is not valid: {e}"));
        let (header, tail, name_later) = match claimed {
            Some(_) => (
                serde_json::from_slice::<BlobParts>(&head).map_err(invalid)?,
                None,
                false,
            ),
            None => {
                let l: LayerParts = serde_json::from_slice(&head).map_err(invalid)?;
                (l.blob, Some(l.tail), l.name_later)
            }
        };
        if tail.as_ref().is_some_and(|t| !tar_state_is_valid(&t.tar_state)) {
            return Err(bad("the tar's state in front of the change is not a SHA-256 state"));
        }
        if sha256_hex(&header.base).is_none() || claimed == Some(header.base.as_str()) {
            return Err(bad(format!("'{}' cannot be the base of the blob", header.base)));
        }
        let total = header
            .parts
            .iter()
            .try_fold(0u64, |t, p| t.checked_add(p.len()))
            .ok_or_else(|| bad("the parts' lengths overflow"))?;
        if total > limits.max_blob_size {
            return Err(IngestError::TooLarge {
                limit: limits.max_blob_size,
            });
        }
        // Each byte of the base used at most once, front to back (as a re-run's members
        // are): checking the blob then reads no more than the base holds, whatever a
        // small request asks for.
        let mut base_at = 0u64;
        for p in &header.parts {
            if let BlobPart::Base { offset, len } = *p {
                if offset < base_at {
                    return Err(bad("the base's runs overlap or go backwards"));
                }
                base_at = offset.saturating_add(len);
            }
        }
        let sent: u64 = header
            .parts
            .iter()
            .map(|p| match p {
                BlobPart::Sent { len } => *len,
                BlobPart::Base { .. } => 0,
            })
            .sum();
        if let Some(expected) = expected_len {
            if expected != 8 + header_len + sent {
                return Err(IngestError::Truncated {
                    expected,
                    received: 8 + header_len + sent,
                });
            }
        }
        let base_path = self.path_of(&header.base).ok_or(IngestError::BaseMissing)?;
        let base = tokio::task::spawn_blocking(move || BlobFile::open(&base_path))
            .await
            .map_err(|e| IngestError::Io(std::io::Error::other(e)))??
            .ok_or(IngestError::BaseMissing)?;

        let dir = self.temp_path("d");
        tokio::fs::create_dir(&dir).await?;
        let guard = TempDir(Some(dir.clone()));
        let mut file = tokio::fs::File::create(dir.join(SENT)).await?;
        let mut written = 0u64;
        while let Some(data) = body.next().await? {
            written += data.len() as u64;
            if written > sent {
                return Err(IngestError::Truncated {
                    expected: sent,
                    received: written,
                });
            }
            file.write_all(&data).await?;
        }
        if written != sent {
            return Err(IngestError::Truncated {
                expected: sent,
                received: written,
            });
        }
        file.sync_all().await?;
        drop(file);
        Ok(ReceivedParts {
            claimed: claimed.map(str::to_string),
            header,
            tail,
            base,
            dir,
            guard,
            size: total,
            name_later,
        })
    }

    /// Checks the blob `received` makes against the base's front and names it (its
    /// digest, checked against the one claimed), then moves it into place.
    async fn name_received(
        &self,
        received: ReceivedParts,
        mut before_commit: impl FnMut(&BlobMeta, &[Vec<u8>]) -> Result<(), IngestError>,
    ) -> Result<(BlobMeta, Option<(LayerTail, Vec<Vec<u8>>, Started)>), IngestError> {
        let ReceivedParts {
            claimed,
            header,
            tail,
            base,
            dir,
            mut guard,
            ..
        } = received;
        let claimed = claimed.as_deref();
        let d = dir.clone();
        let claimed_owned = claimed.map(str::to_string);
        // The blob's first bytes are the base's (a re-run COPY's unchanged front): its
        // SHA-256 resumes from the base's state kept nearest before they part.
        let front = match header.parts.first() {
            Some(BlobPart::Base { offset: 0, len }) => *len,
            _ => 0,
        };
        // A layer's tail starts after the front: the blob's state is taken there to check
        // the front against the client's, then after each member, for the client's index.
        let marks: Vec<u64> = match &tail {
            Some(t) => std::iter::once(t.first)
                .chain(t.members.iter().scan(t.first, |at, m| {
                    *at = at.saturating_add(*m);
                    Some(*at)
                }))
                .collect(),
            None => Vec::new(),
        };
        let front = marks.first().map_or(front, |first| front.min(*first));
        let base_states = self.load_states(&header.base);
        let resume_at = blob_states::usable(&base_states, front);
        let (actual, states, blake3, size, whole, named) =
            tokio::task::spawn_blocking(move || -> Result<_, IngestError> {
                let mut recipe = runs_of(&header.parts, &base, &d)?;
                recipe.origin = Some(header);
                let whole = match spread(&recipe) {
                    Spread::Linked => None,
                    // Before the hashing, which then reads what will be served.
                    Spread::Merge(merged) => {
                        merge_runs(&d, &mut recipe, &merged)?;
                        None
                    }
                    Spread::Whole => Some(d.join("whole")),
                };
                let ((mut actual, mut states, b3, size), mut marked) =
                    hash_runs(&d, &recipe, whole.as_deref(), (&base_states, resume_at), &marks)?;
                // A layer's diff_id is taken from the same links (open files: the directory
                // may be renamed meanwhile), once the digest the client waits for is known:
                // started beside it, it took a core from it (lcached's answer 144–225 ms
                // against 122–137 at 200,000 files), and nobody waits for it before the
                // stage ends (a build that waits for its name ended no later, measured).
                // A tar's diff_id is its digest, and the tar's states the blob's: nothing to
                // hash twice.
                let started = match &tail {
                    Some(t) if t.compression != LayerCompression::None => {
                        Some(start(BlobFile::from_recipe(&d, &recipe)?, t.clone()))
                    }
                    _ => None,
                };
                let front_differs = |marked: &[Vec<u8>]| {
                    tail.as_ref()
                        .is_some_and(|t| t.first > 0 && marked.first() != Some(&t.blob_state))
                };
                if resume_at > 0 && (claimed_owned.as_ref().is_some_and(|c| *c != actual) || front_differs(&marked)) {
                    // A kept state that was damaged must not refuse a good blob: check again
                    // from the first byte.
                    let blob = BlobFile::from_recipe(&d, &recipe)?;
                    let mut sha = GridSha::default().marking(&marks);
                    blob.copy_to(&mut sha)?;
                    marked = sha.marked().to_vec();
                    (actual, states) = sha.finish();
                }
                if front_differs(&marked) {
                    return Err(bad(
                        "the base blob's front is not the one the layer was packed against (damaged in the store)",
                    ));
                }
                if marked.len() != marks.len() {
                    return Err(bad("the layer's members do not lie within the blob"));
                }
                let named = tail.map(|t| {
                    let states = marked.split_off(1.min(marked.len()));
                    let started = started.unwrap_or_else(|| {
                        known(LayerDiffId {
                            diff_id: actual.clone(),
                            tar_states: states.clone(),
                        })
                    });
                    (t, states, started)
                });
                if whole.is_none() {
                    let mut f = std::fs::File::create(d.join(RECIPE))?;
                    f.write_all(&serde_json::to_vec(&recipe).map_err(std::io::Error::other)?)?;
                    f.sync_all()?;
                    std::fs::File::open(&d)?.sync_all()?;
                }
                Ok((actual, states, b3, size, whole, named))
            })
            .await
            .map_err(|e| IngestError::Io(std::io::Error::other(e)))??;
        if let Some(digest) = claimed {
            if actual != digest {
                return Err(IngestError::DigestMismatch {
                    expected: digest.to_string(),
                    actual,
                });
            }
        }
        let final_path = self.destination(&actual)?;
        let meta = BlobMeta {
            digest: actual,
            blake3,
            size,
        };
        before_commit(&meta, named.as_ref().map_or(&[][..], |n| &n.1[..]))?;
        match whole {
            // The directory is left to the guard: its whole file was moved out of it.
            Some(file) => self.commit(&file, &final_path).await?,
            None => {
                self.commit(&dir, &final_path).await?;
                guard.0 = None;
            }
        }
        self.save_states(&meta.digest, &states);
        Ok((meta, named))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http_body_util::Full;
    use lcache_proto::wire::LayerParts;

    pub(crate) fn digest_of(b: &[u8]) -> String {
        use sha2::Digest as _;
        format!("sha256:{:x}", sha2::Sha256::digest(b))
    }

    pub(crate) fn body(base: &str, parts: &[BlobPart], sent: &[u8]) -> Full<Bytes> {
        let header = serde_json::to_vec(&BlobParts {
            base: base.into(),
            parts: parts.to_vec(),
        })
        .unwrap();
        let mut b = (header.len() as u64).to_be_bytes().to_vec();
        b.extend(header);
        b.extend_from_slice(sent);
        Full::new(Bytes::from(b))
    }

    fn read(s: &BlobStore, digest: &str) -> Vec<u8> {
        let mut out = Vec::new();
        s.open_blob(digest).unwrap().unwrap().copy_to(&mut out).unwrap();
        out
    }

    /// Bytes held by files under `dir` that have no other link: what a blob added.
    fn own_bytes(dir: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap())
            .filter(|m| m.nlink() == 1)
            .map(|m| m.len())
            .sum()
    }

    async fn store_whole(s: &BlobStore, data: &[u8]) -> String {
        let d = digest_of(data);
        s.ingest(&d, Full::new(Bytes::copy_from_slice(data)), None, &Limits::default())
            .await
            .unwrap();
        d
    }

    #[tokio::test]
    async fn a_blob_of_parts_is_checked_from_its_bases_kept_state_and_a_damaged_state_costs_only_time() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let every = blob_states::EVERY as usize;
        let base_bytes: Vec<u8> = (0..(3 * every + 1000) as u32).map(|i| (i % 253) as u8).collect();
        let base = store_whole(&s, &base_bytes).await;
        let kept = s.load_states(&base);
        assert_eq!(
            kept.len(),
            3 * blob_states::state_len(),
            "a whole upload keeps its states"
        );

        let front = 2 * every + 500;
        // Kept as hashed; not a state at all; the states of other bytes.
        let mut other = GridSha::default();
        other.write_all(&vec![1u8; base_bytes.len()]).unwrap();
        let damages = [kept.clone(), vec![7u8; kept.len()], other.finish().1];
        for (n, damage) in damages.into_iter().enumerate() {
            let (n, damaged) = (n as u8, n > 0);
            // Kept with a good check: damaged before it was kept (a state that rots on
            // disk fails its check and is not used at all, as below).
            s.save_states(&base, &damage);
            let mut edited = base_bytes[..front].to_vec();
            edited.extend_from_slice(&[b'x', n]);
            edited.extend_from_slice(&base_bytes[front..]);
            let parts = [
                BlobPart::Base {
                    offset: 0,
                    len: front as u64,
                },
                BlobPart::Sent { len: 2 },
                BlobPart::Base {
                    offset: front as u64,
                    len: (base_bytes.len() - front) as u64,
                },
            ];
            let digest = digest_of(&edited);
            s.ingest_parts(&digest, body(&base, &parts, &[b'x', n]), None, &Limits::default())
                .await
                .unwrap_or_else(|e| panic!("damaged state {damaged}: {e}"));
            assert!(read(&s, &digest) == edited);
            // Its own states are the ones hashing it from the start gives.
            let mut scratch = GridSha::default();
            scratch.write_all(&edited).unwrap();
            assert_eq!(s.load_states(&digest), scratch.finish().1, "damaged state {damaged}");
        }
        let file = dir.path().join("states").join(sha256_hex(&base).unwrap());
        let mut rotten = std::fs::read(&file).unwrap();
        rotten[5] ^= 1;
        std::fs::write(&file, rotten).unwrap();
        assert!(
            s.load_states(&base).is_empty(),
            "a state that fails its check is not used"
        );
        s.remove(&base).unwrap();
        assert!(s.load_states(&base).is_empty(), "states go with their blob");
    }

    /// An 800,000-byte base stored whole, and an edit of it (its middle replaced: the front
    /// and the back are the base's) stored as parts: the base's digest, the edit, its digest
    /// and what the store said of it.
    async fn middle_replaced(s: &BlobStore) -> (String, Vec<u8>, String, BlobMeta) {
        let base_bytes: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let base = store_whole(s, &base_bytes).await;
        let mut edited = base_bytes[..300_000].to_vec();
        edited.extend_from_slice(b"new bytes");
        edited.extend_from_slice(&base_bytes[400_000..]);
        let parts = [
            BlobPart::Base {
                offset: 0,
                len: 300_000,
            },
            BlobPart::Sent { len: 9 },
            BlobPart::Base {
                offset: 400_000,
                len: 400_000,
            },
        ];
        let d = digest_of(&edited);
        let meta = s
            .ingest_parts(&d, body(&base, &parts, b"new bytes"), None, &Limits::default())
            .await
            .unwrap();
        (base, edited, d, meta)
    }

    #[tokio::test]
    async fn disk_usage_counts_a_linked_file_once_and_a_removal_frees_what_nothing_else_links() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let (base, _, d, _) = middle_replaced(&s).await;
        let own = own_bytes(&s.path_of(&d).unwrap());
        assert!(own < 10_000, "the edit's own files: {own} bytes");
        assert_eq!(s.disk_usage().unwrap(), 800_000 + own, "the base's file counted once");
        assert_eq!(s.freed_by_removing(&base), 0, "the edited blob still links it");
        assert_eq!(s.freed_by_removing(&d), own);
        s.remove(&base).unwrap();
        assert_eq!(s.freed_by_removing(&d), 800_000 + own, "now the last to hold it");
        assert_eq!(s.disk_usage().unwrap(), 800_000 + own);
    }

    #[tokio::test]
    async fn a_blob_of_parts_stores_only_what_was_sent_and_reads_back_whole_after_its_base_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let (base, edited, d, meta) = middle_replaced(&s).await;
        assert_eq!(meta.size, edited.len() as u64);
        assert_eq!(meta.blake3, "", "kept as runs: its BLAKE3 is not taken");
        assert_eq!(read(&s, &d), edited);
        let path = s.path_of(&d).unwrap();
        assert!(path.is_dir());
        assert!(own_bytes(&path) < 1024, "only the sent bytes and the recipe are new");

        // A second edit on top of the first: its runs are flattened to files, never to the
        // first's recipe, and still only the new bytes are written.
        let mut again = edited.clone();
        again.truncate(10);
        again.extend_from_slice(b"second");
        again.extend_from_slice(&edited[10..]);
        let parts2 = [
            BlobPart::Base { offset: 0, len: 10 },
            BlobPart::Sent { len: 6 },
            BlobPart::Base {
                offset: 10,
                len: edited.len() as u64 - 10,
            },
        ];
        let d2 = digest_of(&again);
        s.ingest_parts(&d2, body(&d, &parts2, b"second"), None, &Limits::default())
            .await
            .unwrap();
        let recipe: Recipe =
            serde_json::from_slice(&std::fs::read(s.path_of(&d2).unwrap().join(RECIPE)).unwrap()).unwrap();
        assert!(recipe
            .runs
            .iter()
            .all(|r| s.path_of(&d2).unwrap().join(&r.file).is_file()));
        assert!(own_bytes(&s.path_of(&d2).unwrap()) < 1024);

        // Removing the base and the first edit leaves the second readable: the links hold
        // the bytes.
        s.remove(&base).unwrap();
        s.remove(&d).unwrap();
        assert!(!s.exists(&base) && !s.exists(&d));
        assert_eq!(read(&s, &d2), again);
    }

    #[tokio::test]
    async fn bad_parts_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let base = store_whole(&s, b"0123456789").await;
        let l = Limits::default();
        let target = digest_of(b"0123xy");
        let ok_parts = [BlobPart::Base { offset: 0, len: 4 }, BlobPart::Sent { len: 2 }];
        // The wrong bytes sent.
        let e = s.ingest_parts(&target, body(&base, &ok_parts, b"zz"), None, &l).await;
        assert!(matches!(e, Err(IngestError::DigestMismatch { .. })), "{e:?}");
        // Fewer or more bytes than the parts say.
        let e = s.ingest_parts(&target, body(&base, &ok_parts, b"x"), None, &l).await;
        assert!(matches!(e, Err(IngestError::Truncated { .. })), "{e:?}");
        let e = s.ingest_parts(&target, body(&base, &ok_parts, b"xyz"), None, &l).await;
        assert!(matches!(e, Err(IngestError::Truncated { .. })), "{e:?}");
        // Base runs that go back over the base (reading it more than once).
        let twice = [
            BlobPart::Base { offset: 0, len: 4 },
            BlobPart::Base { offset: 0, len: 4 },
        ];
        let e = s
            .ingest_parts(&digest_of(b"01230123"), body(&base, &twice, b""), None, &l)
            .await;
        assert!(matches!(e, Err(IngestError::BadParts(_))), "{e:?}");
        // A run past the base's end, a base that is not stored, the blob as its own base.
        let past = [BlobPart::Base { offset: 8, len: 4 }, BlobPart::Sent { len: 2 }];
        let e = s.ingest_parts(&target, body(&base, &past, b"xy"), None, &l).await;
        assert!(matches!(e, Err(IngestError::BadParts(_))), "{e:?}");
        let e = s
            .ingest_parts(&target, body(&digest_of(b"absent"), &ok_parts, b"xy"), None, &l)
            .await;
        assert!(matches!(e, Err(IngestError::BaseMissing)), "{e:?}");
        let e = s.ingest_parts(&target, body(&target, &ok_parts, b"xy"), None, &l).await;
        assert!(matches!(e, Err(IngestError::BadParts(_))), "{e:?}");
        // A header that is not one.
        let mut junk = 5u64.to_be_bytes().to_vec();
        junk.extend_from_slice(b"{nope");
        let e = s.ingest_parts(&target, Full::new(Bytes::from(junk)), None, &l).await;
        assert!(matches!(e, Err(IngestError::BadParts(_))), "{e:?}");
        assert!(!s.exists(&target));
        assert_eq!(s.temp_files(), 0);

        s.ingest_parts(&target, body(&base, &ok_parts, b"xy"), None, &l)
            .await
            .unwrap();
        assert_eq!(read(&s, &target), b"0123xy");
    }

    /// Edits one byte of `bytes` at a time, each sent on its own over the blob before it,
    /// `edits` times; returns, per edit, how many bytes its directory holds that no other
    /// blob does (`None`: stored whole).
    async fn edit_bytes_one_by_one(s: &BlobStore, bytes: &mut [u8], edits: usize) -> Vec<Option<u64>> {
        let l = Limits::default();
        let mut digest = store_whole(s, bytes).await;
        let mut written = Vec::new();
        for i in 0..edits {
            let at = (i % (bytes.len() - 1)) as u64;
            bytes[at as usize] = bytes[at as usize].wrapping_add(1);
            let parts = [
                BlobPart::Base { offset: 0, len: at },
                BlobPart::Sent { len: 1 },
                BlobPart::Base {
                    offset: at + 1,
                    len: bytes.len() as u64 - at - 1,
                },
            ];
            let next = digest_of(bytes);
            let sent = [bytes[at as usize]];
            s.ingest_parts(&next, body(&digest, &parts, &sent), None, &l)
                .await
                .unwrap();
            assert_eq!(read(s, &next), bytes, "edit {i}");
            let path = s.path_of(&next).unwrap();
            written.push(match path.is_file() {
                true => None,
                false => {
                    let files = std::fs::read_dir(&path).unwrap().count();
                    assert!(files <= MAX_FILES + 1, "{files} files behind edit {i}");
                    // The recipe aside (it lists every run, whoever holds them).
                    Some(own_bytes(&path) - std::fs::metadata(path.join(RECIPE)).unwrap().len())
                }
            });
            digest = next;
        }
        assert_eq!(s.temp_files(), 0);
        written
    }

    #[tokio::test]
    async fn a_blob_spread_over_too_many_files_has_its_small_ones_merged_not_the_whole_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let mut bytes: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        // Each edit adds one file behind the blob: merged whenever there would be too many.
        let written = edit_bytes_one_by_one(&s, &mut bytes, 3 * MAX_FILES).await;
        assert!(written.iter().all(Option::is_some), "never written whole: {written:?}");
        let merges = written.iter().filter(|w| w.unwrap() > 1).count();
        assert!((2..=6).contains(&merges), "{merges} merges in {} edits", written.len());
        // A merge copies what the edits since the one before sent, not the layer.
        assert!(
            written.iter().all(|w| w.unwrap() <= MAX_FILES as u64 + 1),
            "{written:?}"
        );
    }

    #[tokio::test]
    async fn a_blob_mostly_made_of_small_files_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        // Every byte but one edited once: when the files are too many, the base's holds one
        // byte, as each edit's does.
        let mut bytes = vec![7u8; MAX_FILES + 1];
        let written = edit_bytes_one_by_one(&s, &mut bytes, MAX_FILES).await;
        assert_eq!(written.last(), Some(&None), "{written:?}");
        assert!(written[..MAX_FILES - 1].iter().all(|w| *w == Some(1)), "{written:?}");
    }

    #[tokio::test]
    async fn a_header_that_comes_over_many_frames_is_read_whole() {
        use http_body_util::StreamBody;
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let base = store_whole(&s, &[b'a'; 4000]).await;
        // Many runs make a header longer than one frame; the body comes 7 bytes at a time.
        let mut parts = Vec::new();
        let mut bytes = vec![b'a'; 4000];
        for i in 0..200u64 {
            parts.push(BlobPart::Base {
                offset: i * 20,
                len: 19,
            });
            parts.push(BlobPart::Sent { len: 1 });
            bytes[(i * 20 + 19) as usize] = b'b';
        }
        let sent = vec![b'b'; 200];
        let whole = http_body_util::BodyExt::collect(body(&base, &parts, &sent))
            .await
            .unwrap()
            .to_bytes();
        let frames: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = whole
            .chunks(7)
            .map(|c| Ok(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let target = digest_of(&bytes[..4000]);
        // On a thread of its own: a reader that spins never yields, so no timer of this
        // runtime could stop it; the test fails instead of hanging.
        let (tx, rx) = std::sync::mpsc::channel();
        let t = target.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let stream = StreamBody::new(futures_util::stream::iter(frames));
            let stored = rt.block_on(s.ingest_parts(&t, stream, None, &Limits::default()));
            let _ = tx.send((stored.map(|_| ()).map_err(|e| e.to_string()), s));
        });
        let (stored, s) = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the upload finishes");
        stored.unwrap();
        assert_eq!(read(&s, &target), &bytes[..4000]);
    }

    #[tokio::test]
    async fn a_whole_upload_repairs_a_blob_of_parts_and_the_other_way_round() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let l = Limits::default();
        let base = store_whole(&s, b"0123456789").await;
        let target = digest_of(b"0123xy");
        let parts = [BlobPart::Base { offset: 0, len: 4 }, BlobPart::Sent { len: 2 }];
        s.ingest_parts(&target, body(&base, &parts, b"xy"), None, &l)
            .await
            .unwrap();
        store_whole(&s, b"0123xy").await;
        assert!(s.path_of(&target).unwrap().is_file());
        s.ingest_parts(&target, body(&base, &parts, b"xy"), None, &l)
            .await
            .unwrap();
        assert!(s.path_of(&target).unwrap().is_dir());
        assert_eq!(read(&s, &target), b"0123xy");
    }

    /// A real layer of `n` files packed in segments at `dest` (as the client packs a COPY),
    /// with the file `edited` (if any) given other bytes; over `earlier` when given, by the
    /// cache's naming (`TailDigests::Cache`) or else whole.
    fn layer(
        root: &Path,
        edited: Option<usize>,
        earlier: Option<&lcache_image::layer_segments::SegmentIndex>,
        dest: &Path,
        compression: LayerCompression,
    ) -> lcache_image::layer_segments::Packed {
        use lcache_image::layer_segments::{pack_segmented, Reuse, SegmentEntry, SegmentEntryKind, TailDigests};
        let files: Vec<(String, Vec<u8>)> = (0..3000)
            .map(|i| {
                let body = match edited {
                    Some(e) if e == i => b"edited".to_vec(),
                    _ => format!("file {i} ").repeat(i % 40 + 1).into_bytes(),
                };
                (format!("f{i:04}"), body)
            })
            .collect();
        for (p, b) in &files {
            std::fs::write(root.join(p), b).unwrap();
        }
        let entries: Vec<SegmentEntry> = files
            .iter()
            .map(|(p, b)| SegmentEntry {
                path: p,
                kind: SegmentEntryKind::File {
                    size: b.len() as u64,
                    content: *blake3::hash(b).as_bytes(),
                },
                mode: 0o644,
                uid: 0,
                gid: 0,
            })
            .collect();
        let open = |e: &SegmentEntry| std::fs::File::open(root.join(e.path));
        let reuse = earlier.map(|index| Reuse {
            index,
            blob: std::io::empty(),
            skipped: 0,
        });
        pack_segmented(&entries, &open, reuse, dest, TailDigests::Cache, compression).unwrap()
    }

    fn layer_body(packed: &lcache_image::layer_segments::Packed, base: &str, tail: &LayerTail) -> Full<Bytes> {
        let header = LayerParts {
            blob: BlobParts {
                base: base.into(),
                parts: packed.parts.clone(),
            },
            tail: tail.clone(),
            name_later: false,
        };
        let mut b = header.head().unwrap();
        let made = std::fs::read(&packed.layer.path).unwrap();
        for (offset, len) in header.blob.sent_ranges() {
            b.extend_from_slice(&made[offset as usize..(offset + len) as usize]);
        }
        Full::new(Bytes::from(b))
    }

    #[tokio::test]
    async fn a_layer_sent_as_parts_is_named_with_the_digests_a_whole_pack_gives_and_a_bad_front_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let l = Limits::default();
        let first = layer(src.path(), None, None, &dir.path().join("l0"), LayerCompression::Gzip);
        let base_bytes = std::fs::read(&first.layer.path).unwrap();
        let base = store_whole(&s, &base_bytes).await;
        assert_eq!(base, first.layer.digest);
        // The edit, packed for the store to name, and the same layer packed whole.
        let edit = layer(
            src.path(),
            Some(1700),
            Some(&first.index),
            &dir.path().join("l1"),
            LayerCompression::Gzip,
        );
        let whole = layer(
            src.path(),
            Some(1700),
            None,
            &dir.path().join("l2"),
            LayerCompression::Gzip,
        );
        let tail = edit.tail.clone().expect("left to the store to name");
        assert!(tail.first > 0 && !tail.members.is_empty());

        // Members listed past the blob's end; a front that is not the one the client
        // packed against (its state), whether given wrong or rotten in the store.
        let mut past = tail.clone();
        past.members.push(1 << 30);
        let mut other_front = tail.clone();
        other_front.blob_state = tail.tar_state.clone();
        let mut no_state = tail.clone();
        no_state.tar_state = vec![1, 2, 3];
        for bad in [past, other_front, no_state] {
            let e = s.ingest_layer(layer_body(&edit, &base, &bad), None, &l).await;
            assert!(matches!(e, Err(IngestError::BadParts(_))), "{e:?}");
        }
        let mut rotten = base_bytes.clone();
        rotten[200] ^= 0x40;
        std::fs::write(s.path_of(&base).unwrap(), &rotten).unwrap();
        let e = s.ingest_layer(layer_body(&edit, &base, &tail), None, &l).await;
        assert!(matches!(e, Err(IngestError::BadParts(_))), "{e:?}");
        assert!(!s.exists(&whole.layer.digest));
        assert_eq!(s.temp_files(), 0);

        // A member after the change damaged in the base, where the store takes it from: the
        // blob is named by what it holds, and its diff_id cannot be taken. (Its CRC: a bit
        // flipped elsewhere may leave what the member inflates to as it was.)
        let mut rotten = base_bytes.clone();
        let last = first.index.segments.last().map(|m| m.offset + m.len - 8).unwrap();
        rotten[last as usize] ^= 0x40;
        std::fs::write(s.path_of(&base).unwrap(), &rotten).unwrap();
        let (named, _, started) = s.ingest_layer(layer_body(&edit, &base, &tail), None, &l).await.unwrap();
        let naming = crate::layer_naming::LayerNaming::default();
        naming.keep(&named.meta.digest, &tail, started);
        let e = naming.wait(&named.meta.digest, tail.clone(), || None).await.unwrap();
        assert!(matches!(&e, (Err(r), true) if r.contains("cannot be hashed")), "{e:?}");
        assert_ne!(named.meta.digest, whole.layer.digest);
        // Asked again, with no job kept: taken from the stored blob, and said not to be the
        // job's (whose failure alone removes blobs).
        let open = || s.open_blob(&named.meta.digest).unwrap();
        let e = naming.wait(&named.meta.digest, tail.clone(), open).await.unwrap();
        assert!(matches!(&e, (Err(r), false) if r.contains("cannot be hashed")), "{e:?}");

        std::fs::write(s.path_of(&base).unwrap(), &base_bytes).unwrap();
        let (named, given, started) = s.ingest_layer(layer_body(&edit, &base, &tail), None, &l).await.unwrap();
        assert_eq!(given, tail);
        // Taken beside the digest, and the same taken again from the stored blob.
        naming.keep(&named.meta.digest, &tail, started);
        let (diff_id, kept) = naming.wait(&named.meta.digest, tail.clone(), || None).await.unwrap();
        let diff_id = diff_id.unwrap();
        assert!(kept);
        let blob = s.open_blob(&named.meta.digest).unwrap().unwrap();
        assert_eq!(crate::layer_naming::diff_id_of(&blob, &tail).unwrap(), diff_id);
        assert_eq!(
            (&named.meta.digest, &diff_id.diff_id, named.meta.size),
            (&whole.layer.digest, &whole.layer.diff_id, whole.layer.size),
            "the digests packing the layer whole gives"
        );
        assert!(s.path_of(&named.meta.digest).unwrap().is_dir(), "kept as runs");
        assert_eq!(read(&s, &named.meta.digest), std::fs::read(&whole.layer.path).unwrap());
        // The states the client keeps for the next edit: the whole pack's.
        let k = tail.members.len();
        let n = whole.index.segments.len();
        let expected: Vec<_> = whole.index.segments[n - k..]
            .iter()
            .map(|seg| (seg.tar_state.clone(), seg.blob_state.clone()))
            .collect();
        let got: Vec<_> = diff_id.tar_states.into_iter().zip(named.blob_states).collect();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_tar_layer_sent_as_parts_is_named_by_its_digest_without_hashing_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let l = Limits::default();
        let plain = LayerCompression::None;
        let first = layer(src.path(), None, None, &dir.path().join("l0"), plain);
        let base = store_whole(&s, &std::fs::read(&first.layer.path).unwrap()).await;
        let edit = layer(
            src.path(),
            Some(1700),
            Some(&first.index),
            &dir.path().join("l1"),
            plain,
        );
        let whole = layer(src.path(), Some(1700), None, &dir.path().join("l2"), plain);
        let tail = edit.tail.clone().expect("left to the store to name");
        assert_eq!(tail.compression, plain);
        let (named, _, started) = s.ingest_layer(layer_body(&edit, &base, &tail), None, &l).await.unwrap();
        // Known as the blob is named: the job is done before anyone waits.
        assert!(started.is_done());
        let naming = crate::layer_naming::LayerNaming::default();
        naming.keep(&named.meta.digest, &tail, started);
        let (diff_id, _) = naming.wait(&named.meta.digest, tail.clone(), || None).await.unwrap();
        let diff_id = diff_id.unwrap();
        assert_eq!(
            (&named.meta.digest, &diff_id.diff_id),
            (&whole.layer.digest, &whole.layer.digest),
            "a tar is named by its digest, the one packing it whole gives"
        );
        // The same hashed from the stored blob (after a restart, say), and the states the
        // client keeps for the next edit: the whole pack's, the tar's being the blob's.
        let blob = s.open_blob(&named.meta.digest).unwrap().unwrap();
        assert_eq!(crate::layer_naming::diff_id_of(&blob, &tail).unwrap(), diff_id);
        let n = whole.index.segments.len();
        let expected: Vec<_> = whole.index.segments[n - tail.members.len()..]
            .iter()
            .map(|seg| (seg.tar_state.clone(), seg.blob_state.clone()))
            .collect();
        let got: Vec<_> = diff_id.tar_states.into_iter().zip(named.blob_states).collect();
        assert_eq!(got, expected);
    }
}
