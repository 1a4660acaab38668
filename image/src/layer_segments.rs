//! A layer whose entries are all known (a COPY's) packed in segments: its sorted entries are
//! cut where a path's hash says so (and around big files), so the cuts depend only on the
//! entries near them, and each segment is its own gzip member (a multi-member gzip is one
//! valid layer blob), or, uncompressed, its own run of the tar. A later layer of the same step takes the members of unchanged
//! segments from the earlier blob as they are, and compresses and reads from disk only the
//! segments that changed; the blob is the same, byte for byte, as packing from scratch.
//! Both digests still cover every byte: the blob's over every member, the diff_id resumed
//! from the SHA-256 state kept after the last of the unchanged segments in front of the
//! first change, and taken over the rest by inflating the reused members. An uncompressed
//! blob is the tar: its digest is the diff_id, and nothing is inflated or hashed twice.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::Path;

use lcache_proto::wire::BlobPart;

use crate::layer_diff::{LayerCompression, PackedLayer};
use crate::ordered_workers::{self, in_order};
use crate::read_tee::ReadTee;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentEntryKind<'a> {
    /// A directory.
    Dir,
    /// A regular file, by its size and BLAKE3.
    File {
        /// Its size in bytes.
        size: u64,
        /// The BLAKE3 of its bytes.
        content: [u8; 32],
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: &'a str,
    },
}

/// One entry of a layer to pack, in the (sorted) order packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentEntry<'a> {
    /// Its path inside the layer, without a leading slash.
    pub path: &'a str,
    /// What it is.
    pub kind: SegmentEntryKind<'a>,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// Where each segment's member lies in a packed blob, and what it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentIndex {
    /// In blob order.
    pub segments: Vec<Segment>,
    /// How the members are kept (indexes written before it was kept are gzip's): only a
    /// blob kept the same way gives members to a new one.
    #[serde(default)]
    pub compression: LayerCompression,
}

/// One segment's member: gzip, or a run of the tar.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    /// BLAKE3 over the segment's entries (path, kind, mode, owner, size, content).
    pub fingerprint: [u8; 32],
    /// Where its member starts in the blob.
    pub offset: u64,
    /// The member's length.
    pub len: u64,
    /// The uncompressed tar's SHA-256 state after this segment (segments end on 512-byte
    /// tar blocks, so nothing is buffered).
    pub tar_state: Vec<u8>,
    /// The path of its last entry: which segment an edited path falls in.
    pub last: String,
    /// The blob's SHA-256 state after this segment's member: the next blob of the step
    /// resumes its digest here instead of reading the members in front again.
    pub blob_state: Vec<u8>,
}

impl SegmentIndex {
    /// Where the member after the first `n` segments starts (the members lie end to end).
    pub fn front_end(&self, n: usize) -> u64 {
        n.checked_sub(1)
            .and_then(|i| self.segments.get(i))
            .map_or(0, |s| s.offset + s.len)
    }
}

/// A SHA-256 (the tar's, which is the diff_id, or the blob's) whose state can be kept and
/// resumed.
#[derive(Default)]
pub(crate) struct TarHash(sha2_resumable::Sha256);

/// The blob as it is written: its length and resumable SHA-256 (its digest).
struct BlobHash<W> {
    inner: W,
    sha: TarHash,
    len: u64,
}

impl<W: Write> Write for BlobHash<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.write_all(&buf[..n])?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl BlobHash<io::BufWriter<std::fs::File>> {
    /// Leaves `n` bytes of the file unwritten (a hole), and out of the digest, which is then
    /// not this blob's.
    fn skip(&mut self, n: u64) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        let n_signed = i64::try_from(n).map_err(|_| io::Error::other("a member is too long"))?;
        self.inner.seek(SeekFrom::Current(n_signed))?;
        self.len += n;
        Ok(())
    }
}

impl Write for TarHash {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sha2_resumable::Digest::update(&mut self.0, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TarHash {
    pub(crate) fn state(&self) -> Vec<u8> {
        use sha2_resumable::digest::common::hazmat::SerializableState;
        self.0.serialize().to_vec()
    }

    fn resume(state: &[u8]) -> io::Result<Self> {
        use sha2_resumable::digest::common::hazmat::{SerializableState, SerializedState};
        let bad = || io::Error::other("a kept SHA-256 state is malformed");
        let state = SerializedState::<sha2_resumable::Sha256>::try_from(state).map_err(|_| bad())?;
        sha2_resumable::Sha256::deserialize(&state).map(Self).map_err(|_| bad())
    }

    pub(crate) fn digest(self) -> String {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&sha2_resumable::Digest::finalize(self.0));
        format!("sha256:{}", lcache_proto::key_encoding::hex(&bytes))
    }
}

/// An earlier blob of the same step, and its index, to take unchanged members from. The
/// blob is read once, front to back, to its end.
pub struct Reuse<'a, R> {
    /// The earlier blob's index.
    pub index: &'a SegmentIndex,
    /// The earlier blob's bytes, from the end of its first `skipped` members.
    pub blob: R,
    /// How many members in front the plan takes unchanged and `blob` does not hold (see
    /// [`skippable_front`]): the new blob's digest resumes after them, and its file is not
    /// written there (`Packed::unwritten`).
    pub skipped: usize,
}

/// How many segments at the front of `plan` are the earlier blob's, one for one, with the
/// blob's SHA-256 state kept after them: none of their bytes need be read again.
pub fn skippable_front(plan: &[Planned], index: &SegmentIndex) -> usize {
    plan.iter()
        .zip(&index.segments)
        .enumerate()
        .take_while(|(i, (p, s))| matches!(p, Planned::Earlier(j) if j == i) && !s.blob_state.is_empty())
        .count()
}

/// A packed layer's diff_id being hashed on a thread of its own: over the blob's members
/// from `first` on, from the tar's SHA-256 state in front of them. The thread starts with
/// the first of those members and follows the pack as it writes them, so that it runs on
/// another core while the pack and then the build go on.
pub struct PendingDiffId {
    hashing: TailHashing,
    first: usize,
    index: SegmentIndex,
}

impl PendingDiffId {
    /// Waits for the hashing: the diff_id, and the index with every segment's state.
    pub fn finish(self) -> io::Result<(String, SegmentIndex)> {
        let (diff_id, states) = self
            .hashing
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the diff_id's thread failed")))?;
        let mut index = self.index;
        let tail = index.segments.get_mut(self.first..).unwrap_or_default();
        if tail.len() != states.len() {
            return Err(io::Error::other(
                "the diff_id was hashed over other segments than were packed",
            ));
        }
        for (seg, state) in tail.iter_mut().zip(states) {
            seg.tar_state = state;
        }
        Ok((diff_id, index))
    }
}

/// The diff_id's thread: the diff_id, and the tar's state after each member it hashed.
type TailHashing = std::thread::JoinHandle<io::Result<(String, Vec<Vec<u8>>)>>;

/// A member's offset and length, and its tar bytes when inflated ahead in memory.
type Inflated = ((u64, u64), Option<Vec<u8>>);

/// The members the pack has written after its reused front, as the diff_id's thread
/// waits for them.
#[derive(Default)]
struct Written {
    state: std::sync::Mutex<WrittenState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct WrittenState {
    /// Each member's offset and length, in blob order.
    members: Vec<(u64, u64)>,
    /// Whether the pack ended (done or failed): no more members will come.
    ended: bool,
}

impl Written {
    /// The `k`th member, once it is on the file.
    fn member(&self, k: usize) -> io::Result<(u64, u64)> {
        let lost = || io::Error::other("the pack the diff_id follows failed");
        let mut st = self.state.lock().map_err(|_| lost())?;
        loop {
            if let Some(&m) = st.members.get(k) {
                return Ok(m);
            }
            if st.ended {
                return Err(lost());
            }
            st = self.changed.wait(st).map_err(|_| lost())?;
        }
    }

    fn push(&self, member: (u64, u64)) {
        if let Ok(mut st) = self.state.lock() {
            st.members.push(member);
        }
        self.changed.notify_all();
    }

    fn end(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.ended = true;
        }
        self.changed.notify_all();
    }
}

/// The pack's end of a [`Written`]: dropped when the pack returns, done or failed early,
/// so the thread never waits for members that will not come.
struct Publisher(std::sync::Arc<Written>);

impl Drop for Publisher {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Reads exactly `buf.len()` bytes of a blob at an offset.
pub type ReadAt<'a> = dyn Fn(&mut [u8], u64) -> io::Result<()> + Sync + 'a;

/// Hashes the tar from `tar` on over `count` members, the `k`th at `member(k)` in the blob
/// `read` reads: inflated on every core ahead of the SHA-256, which is sequential. Returns
/// the tar's state after each.
fn hash_members(
    read: &ReadAt<'_>,
    tar: &mut TarHash,
    count: usize,
    member: &(dyn Fn(usize) -> io::Result<(u64, u64)> + Sync),
) -> io::Result<Vec<Vec<u8>>> {
    let jobs: Vec<usize> = (0..count).collect();
    let inflate = |&k: &usize| -> io::Result<Inflated> {
        let (offset, len) = member(k)?;
        Ok(((offset, len), inflated_in_memory(read, offset, len)?))
    };
    let mut states = Vec::with_capacity(count);
    in_order(&jobs, ordered_workers::workers(), &inflate, |fetched| {
        for _ in 0..count {
            match fetched.take()? {
                (_, Some(bytes)) => tar.write_all(&bytes)?,
                ((offset, len), None) => inflate_member(read, offset, len, &mut *tar)?,
            }
            states.push(tar.state());
        }
        Ok(())
    })?;
    Ok(states)
}

/// The diff_id of a layer blob (`len` bytes, read by `read`) whose tar in front of the
/// member at `first` hashed to `state`: each member from `first` on (`members`, their
/// lengths, end to end) inflated and hashed, then what follows them to the blob's end, which
/// must be one member too (the tar's end). Returns the diff_id and the tar's state after
/// each of `members`: what a cache that holds the blob needs to name it after an edit
/// without the client reading the unchanged members again.
pub fn diff_id_after(
    read: &ReadAt<'_>,
    len: u64,
    state: &[u8],
    first: u64,
    members: &[u64],
    compression: LayerCompression,
) -> io::Result<(String, Vec<Vec<u8>>)> {
    let mut at = first;
    let mut spans = Vec::with_capacity(members.len() + 1);
    for &m in members {
        spans.push((at, m));
        at = at
            .checked_add(m)
            .filter(|end| *end <= len)
            .ok_or_else(|| io::Error::other("the members listed run past the blob's end"))?;
    }
    if at < len {
        spans.push((at, len - at));
    }
    let mut tar = TarHash::resume(state)?;
    let mut states = match compression {
        LayerCompression::Gzip => hash_members(read, &mut tar, spans.len(), &|k| {
            spans.get(k).copied().ok_or_else(|| io::Error::other("no such member"))
        })?,
        // The members are the tar's own bytes.
        LayerCompression::None => {
            let mut states = Vec::with_capacity(spans.len());
            for &(at, len) in &spans {
                let mut member = ReadFrom { read, at, left: len };
                io::copy(&mut member, &mut tar)?;
                states.push(tar.state());
            }
            states
        }
    };
    states.truncate(members.len());
    Ok((tar.digest(), states))
}

/// The tar's SHA-256 state before its first byte, kept as a `LayerTail::tar_state` is.
pub fn empty_tar_state() -> Vec<u8> {
    TarHash(Default::default()).state()
}

/// Whether `state` is a SHA-256 state [`diff_id_after`] can resume from.
pub fn tar_state_is_valid(state: &[u8]) -> bool {
    TarHash::resume(state).is_ok()
}

/// Starts hashing the tar from `state` over `count` members of `blob` as the pack writes
/// them (see [`PendingDiffId`]).
fn start_tail_hash(blob: std::fs::File, state: Vec<u8>, count: usize) -> io::Result<(TailHashing, Publisher)> {
    let written = std::sync::Arc::new(Written::default());
    let follow = written.clone();
    let hashing = std::thread::Builder::new().name("diff-id".into()).spawn(move || {
        use std::os::unix::fs::FileExt;
        let mut tar = TarHash::resume(&state)?;
        let read = |buf: &mut [u8], offset: u64| blob.read_exact_at(buf, offset);
        let states = hash_members(&read, &mut tar, count, &|k| follow.member(k))?;
        tar.write_all(&[0; TRAILER])?;
        Ok((tar.digest(), states))
    })?;
    Ok((hashing, Publisher(written)))
}

/// The tar bytes of the member at `offset` in `blob`, or `None` when the member or its tar
/// is too big to wait in memory (then it is streamed by the hashing itself).
fn inflated_in_memory(blob: &ReadAt<'_>, offset: u64, len: u64) -> io::Result<Option<Vec<u8>>> {
    if len > WAIT_IN_MEMORY {
        return Ok(None);
    }
    let mut member = vec![0; len as usize];
    blob(&mut member, offset)?;
    inflate_member_bytes(&member)
}

/// The tar bytes of one whole gzip member, sized from its trailer; `None` when they would
/// be more than may wait in memory (the trailer holds the size modulo 2^32). The CRC and
/// size in the trailer are checked. zlib-rs, not libdeflate, inflates: it says where the
/// stream ended, so a member holding a second stream is refused.
fn inflate_member_bytes(member: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let size = member
        .last_chunk::<4>()
        .map(|t| u64::from(u32::from_le_bytes(*t)))
        .ok_or_else(|| io::Error::other("a segment's member is not a gzip stream"))?;
    if size > WAIT_IN_MEMORY {
        return Ok(None);
    }
    // One byte more than the trailer says: a member whose tar runs past it is streamed.
    let mut tar = vec![0; size as usize + 1];
    // 16 + 15: a gzip header, a 32 KiB window.
    let mut inflate = zlib_rs::Inflate::new(true, 16 + 15);
    match inflate.decompress(member, &mut tar, zlib_rs::InflateFlush::Finish) {
        Ok(zlib_rs::Status::StreamEnd) if inflate.total_out() == size => {
            if inflate.total_in() != member.len() as u64 {
                return Err(io::Error::other("a segment's member holds more than one gzip stream"));
            }
            tar.truncate(size as usize);
            Ok(Some(tar))
        }
        Ok(_) => Ok(None),
        Err(e) => Err(io::Error::other(format!(
            "a segment's member does not inflate: {}",
            inflate.error_message().unwrap_or(e.as_str())
        ))),
    }
}

/// `len` bytes of a blob from `at`, as a reader.
struct ReadFrom<'a> {
    read: &'a ReadAt<'a>,
    at: u64,
    left: u64,
}

impl Read for ReadFrom<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.left.min(256 * 1024) as usize);
        (self.read)(&mut buf[..n], self.at)?;
        self.at += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Inflates the member at `offset` in `blob` into `tar`, streamed.
fn inflate_member(blob: &ReadAt<'_>, offset: u64, len: u64, tar: &mut impl Write) -> io::Result<()> {
    let from = ReadFrom {
        read: blob,
        at: offset,
        left: len,
    };
    let mut member = io::BufReader::with_capacity(256 * 1024, from);
    io::copy(&mut flate2::bufread::GzDecoder::new(&mut member), tar)?;
    if io::copy(&mut member, &mut io::sink())? != 0 {
        return Err(io::Error::other("a segment's member holds more than one gzip stream"));
    }
    Ok(())
}

/// A segment compressed: its gzip member, and its tar bytes when they are to be hashed.
struct Compressed {
    member: Vec<u8>,
    tar: Vec<u8>,
}

/// A fresh segment whose files are more than this is compressed on the writer's thread,
/// streamed, not ahead in memory.
const WAIT_IN_MEMORY: u64 = 8 << 20;

/// The bytes of a segment's files.
fn bytes_of(seg: &[SegmentEntry]) -> u64 {
    seg.iter()
        .map(|e| match e.kind {
            SegmentEntryKind::File { size, .. } => size,
            _ => 0,
        })
        .sum()
}

/// A file this big gets a segment of its own: an edit next to it does not re-compress it.
const BIG_FILE: u64 = 1 << 20;

/// About one entry in this many ends a segment.
const CUT_ONE_IN: u8 = 255;

/// The segments of `entries`: a cut after an entry whose path hashes to a byte of 0 (so
/// about every 256 entries, wherever the tree is edited), and around big files.
fn split(entries: &[SegmentEntry]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, e) in entries.iter().enumerate() {
        let big = matches!(e.kind, SegmentEntryKind::File { size, .. } if size >= BIG_FILE);
        if big && i > start {
            out.push(start..i);
            start = i;
        }
        if big || blake3::hash(e.path.as_bytes()).as_bytes()[0] == CUT_ONE_IN {
            out.push(start..i + 1);
            start = i + 1;
        }
    }
    if start < entries.len() {
        out.push(start..entries.len());
    }
    out
}

pub(crate) fn fingerprint(entries: &[SegmentEntry]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for e in entries {
        h.update(&(e.path.len() as u64).to_le_bytes());
        h.update(e.path.as_bytes());
        for n in [e.mode, e.uid, e.gid] {
            h.update(&n.to_le_bytes());
        }
        match &e.kind {
            SegmentEntryKind::Dir => {
                h.update(b"d");
            }
            SegmentEntryKind::File { size, content } => {
                h.update(b"f");
                h.update(&size.to_le_bytes());
                h.update(content);
            }
            SegmentEntryKind::Symlink { target } => {
                h.update(b"l");
                h.update(&(target.len() as u64).to_le_bytes());
                h.update(target.as_bytes());
            }
        }
    }
    *h.finalize().as_bytes()
}

/// Writes to two writers.
struct Tee<A, B>(A, B);

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

/// Passes on all but the last `TRAILER` bytes written: a segment is a run of tar entries,
/// and `tar::Builder` always ends with the archive's end marker, which only the blob's
/// last member carries.
struct WithoutTrailer<W> {
    inner: W,
    held: Vec<u8>,
}

pub(crate) const TRAILER: usize = 1024;

impl<W: Write> Write for WithoutTrailer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.held.extend_from_slice(buf);
        if self.held.len() > 64 * 1024 {
            let pass = self.held.len() - TRAILER;
            self.inner.write_all(&self.held[..pass])?;
            self.held.drain(..pass);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> WithoutTrailer<W> {
    fn finish(mut self) -> io::Result<W> {
        let pass = self
            .held
            .len()
            .checked_sub(TRAILER)
            .filter(|_| self.held[self.held.len() - TRAILER..].iter().all(|b| *b == 0));
        let pass = pass.ok_or_else(|| io::Error::other("a tar segment did not end with the end-of-archive marker"))?;
        self.inner.write_all(&self.held[..pass])?;
        Ok(self.inner)
    }
}

pub(crate) fn header(e: &SegmentEntry, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(e.mode & 0o7777);
    h.set_uid(u64::from(e.uid));
    h.set_gid(u64::from(e.gid));
    h.set_mtime(0);
    h.set_size(size);
    h
}

fn gzip<W: Write>(out: W) -> flate2::write::GzEncoder<W> {
    // A fixed header (no name, mtime 0) keeps equal segments byte-identical.
    flate2::GzBuilder::new()
        .mtime(0)
        .write(out, flate2::Compression::fast())
}

/// Compresses `entries` as one member onto `blob`, their tar bytes also into `tar`: in
/// memory by libdeflate when their files are at most `WAIT_IN_MEMORY`, else streamed. Which
/// one depends only on the entries, so equal segments always give equal members.
fn write_member<B: Write, T: Write>(
    entries: &[SegmentEntry],
    open: &dyn Fn(&SegmentEntry) -> io::Result<std::fs::File>,
    mut blob: B,
    mut tar: T,
    compression: LayerCompression,
) -> io::Result<()> {
    if compression == LayerCompression::None {
        write_tar(entries, open, Tee(tar, blob))?;
        return Ok(());
    }
    if bytes_of(entries) > WAIT_IN_MEMORY {
        let Tee(_, gz) = write_tar(entries, open, Tee(tar, gzip(blob)))?;
        gz.finish()?;
        return Ok(());
    }
    let bytes = write_tar(entries, open, Vec::new())?;
    crate::layer_gzip::gzip_member(&bytes, &mut blob)?;
    tar.write_all(&bytes)
}

/// Writes `entries` as tar entries (no end-of-archive marker) into `out`.
fn write_tar<W: Write>(
    entries: &[SegmentEntry],
    open: &dyn Fn(&SegmentEntry) -> io::Result<std::fs::File>,
    out: W,
) -> io::Result<W> {
    let mut b = tar::Builder::new(WithoutTrailer {
        inner: out,
        held: Vec::new(),
    });
    for e in entries {
        match &e.kind {
            SegmentEntryKind::Dir => {
                let mut h = header(e, tar::EntryType::Directory, 0);
                b.append_data(&mut h, e.path, &[][..])?;
            }
            SegmentEntryKind::Symlink { target } => {
                let mut h = header(e, tar::EntryType::Symlink, 0);
                b.append_link(&mut h, e.path, target)?;
            }
            SegmentEntryKind::File { size, .. } => {
                let f = open(e)?;
                if f.metadata()?.len() != *size {
                    return Err(io::Error::other(format!(
                        "{} is not the size it was copied at: the snapshot changed",
                        e.path
                    )));
                }
                let mut h = header(e, tar::EntryType::Regular, *size);
                b.append_data(&mut h, e.path, f)?;
            }
        }
    }
    b.into_inner()?.finish()
}

/// Copies the earlier blob's member `seg` onto `blob` and, given `tar`, its inflated
/// bytes into it; `pos` is how far the earlier blob has been read.
fn copy_member<R: Read, B: Write>(
    from: &mut R,
    pos: &mut u64,
    seg: &Segment,
    blob: B,
    tar: Option<&mut TarHash>,
) -> io::Result<()> {
    let skip = seg
        .offset
        .checked_sub(*pos)
        .ok_or_else(|| io::Error::other("the earlier blob's segments are out of order"))?;
    if io::copy(&mut (&mut *from).take(skip), &mut io::sink())? != skip {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut member = ReadTee {
        inner: (&mut *from).take(seg.len),
        out: Some(blob),
    };
    if let Some(tar) = tar {
        io::copy(&mut flate2::read::GzDecoder::new(&mut member), tar)?;
    }
    io::copy(&mut member, &mut io::sink())?;
    if member.inner.limit() != 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    *pos = seg.offset + seg.len;
    Ok(())
}

/// Who takes a re-packed layer's digests after the front it shares with the earlier blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailDigests {
    /// The pack, as it writes.
    Here,
    /// A thread of its own that follows the pack (`Packed::pending`).
    Thread,
    /// The cache the layer goes to, which holds the earlier blob (`Packed::tail`): the
    /// earlier blob's members are neither read nor written (the file is sparse there), and
    /// neither the blob's digest nor the tar's after the front is taken here.
    Cache,
}

/// A layer packed in segments: the blob (whose `diff_id` is empty while `pending`), its
/// index (for the next layer of the step to reuse), and the diff_id still to hash.
pub struct Packed {
    /// The blob.
    pub layer: PackedLayer,
    /// Where each segment lies in it.
    pub index: SegmentIndex,
    /// With [`TailDigests::Thread`], when some of the tar is still to hash.
    pub pending: Option<PendingDiffId>,
    /// With [`TailDigests::Cache`] and an earlier blob: the tar the cache is to hash (the
    /// layer's `digest` and `diff_id` are then empty, and the file holds only the members
    /// that are not the earlier blob's).
    pub tail: Option<lcache_proto::wire::LayerTail>,
    /// The blob as runs of the earlier blob's bytes and of its own (empty when nothing was
    /// taken from an earlier blob): what a cache needs to store only the new members.
    pub parts: Vec<BlobPart>,
    /// How many bytes at the front of the file were not written (a hole): the earlier
    /// blob's members the first of `parts` names.
    pub unwritten: u64,
    /// A tar layer packed by reference (`layer_links`): the file holds only the tar's own
    /// bytes (headers, padding, its end), and the blob is these runs of it and of the
    /// snapshot's files.
    pub links: Option<lcache_proto::wire::LinkedBlob>,
}

/// The blob's runs: `taken` (where in the blob, where in the earlier one, how long) as
/// `Base` parts, merged where they follow each other in both, and the bytes between as
/// `Sent` parts.
fn blob_parts(taken: &[(u64, u64, u64)], size: u64) -> Vec<BlobPart> {
    let mut parts: Vec<BlobPart> = Vec::new();
    let mut at = 0;
    for &(pos, offset, len) in taken {
        if pos > at {
            parts.push(BlobPart::Sent { len: pos - at });
        }
        match parts.last_mut() {
            Some(BlobPart::Base { offset: o, len: l }) if *o + *l == offset => *l += len,
            _ => parts.push(BlobPart::Base { offset, len }),
        }
        at = pos + len;
    }
    if !taken.is_empty() && size > at {
        parts.push(BlobPart::Sent { len: size - at });
    }
    parts
}

/// Packs `entries` (sorted, parents first) into a layer blob at `dest` compressed as
/// `compression` says, reading each file through `open`, taking the members of unchanged
/// segments from `reuse` (kept the same way); `tail` says who takes the digests after the
/// reused front.
pub fn pack_segmented<R: Read>(
    entries: &[SegmentEntry],
    open: &(dyn Fn(&SegmentEntry) -> io::Result<std::fs::File> + Sync),
    reuse: Option<Reuse<'_, R>>,
    dest: &Path,
    tail: TailDigests,
    compression: LayerCompression,
) -> io::Result<Packed> {
    let plan: Vec<Planned> = split(entries)
        .into_iter()
        .map(|r| Planned::Entries(&entries[r]))
        .collect();
    pack_planned(&plan, open, reuse, dest, tail, compression)
}

/// One segment of a layer to pack, in blob order.
#[derive(Debug, Clone, Copy)]
pub enum Planned<'a, 'e> {
    /// Its entries (an earlier member with the same fingerprint is taken instead of them).
    Entries(&'a [SegmentEntry<'e>]),
    /// The earlier blob's segment of this index, known to hold the same entries.
    Earlier(usize),
}

/// The segments `entries` are cut into, as [`pack_segmented`] cuts them: ranges of
/// `entries`, and whether the last one ends at a cut (rather than where the entries do).
/// Cuts depend only on the entries near them, so a run of entries that starts where a
/// segment starts is cut the same way whatever comes before it.
pub fn segment_ranges(entries: &[SegmentEntry]) -> (Vec<Range<usize>>, bool) {
    (split(entries), entries.last().is_some_and(cuts_after))
}

/// Whether a segment ends after `e` whatever follows it (a big file, or a path whose hash
/// says so).
pub fn cuts_after(e: &SegmentEntry) -> bool {
    matches!(e.kind, SegmentEntryKind::File { size, .. } if size >= BIG_FILE)
        || blake3::hash(e.path.as_bytes()).as_bytes()[0] == CUT_ONE_IN
}

/// Packs the segments `plan` lists (as [`pack_segmented`] packs the ones it cuts):
/// `Earlier` ones are taken from `reuse` unread, so a caller that knows which segments an
/// edit left alone need not hold their entries.
pub fn pack_planned<R: Read>(
    plan: &[Planned],
    open: &(dyn Fn(&SegmentEntry) -> io::Result<std::fs::File> + Sync),
    reuse: Option<Reuse<'_, R>>,
    dest: &Path,
    tail: TailDigests,
    compression: LayerCompression,
) -> io::Result<Packed> {
    pack_on(plan, open, reuse, dest, tail, compression, ordered_workers::workers())
}

/// [`pack_planned`], fresh members compressed on `workers` threads (1: all on this one).
/// The blob is the same whatever their number: each member is compressed alone.
fn pack_on<R: Read>(
    plan: &[Planned],
    open: &(dyn Fn(&SegmentEntry) -> io::Result<std::fs::File> + Sync),
    mut reuse: Option<Reuse<'_, R>>,
    dest: &Path,
    tail: TailDigests,
    compression: LayerCompression,
    workers: usize,
) -> io::Result<Packed> {
    if reuse.as_ref().is_some_and(|r| r.index.compression != compression) {
        return Err(io::Error::other(
            "the earlier blob is compressed otherwise: its members cannot be taken",
        ));
    }
    // An uncompressed blob is its tar: the blob's SHA-256 is the diff_id, so the tar is
    // never hashed on its own (nor on a thread of its own).
    let plain = compression == LayerCompression::None;
    let defer = tail == TailDigests::Thread && !plain;
    let mut file = std::fs::File::create(dest)?;
    // The members in front that are taken unread: the file starts after them (a hole) and
    // the blob's digest from its state there.
    let skipped = reuse.as_ref().map_or(0, |r| r.skipped);
    let (unwritten, blob_sha) = match reuse.as_ref() {
        Some(r) if skipped > 0 => {
            let kept = r
                .index
                .segments
                .get(skipped - 1)
                .filter(|_| (0..skipped).all(|i| matches!(plan.get(i), Some(Planned::Earlier(j)) if *j == i)))
                .ok_or_else(|| io::Error::other("the members skipped are not the plan's front"))?;
            (r.index.front_end(skipped), TarHash::resume(&kept.blob_state)?)
        }
        _ => (0, TarHash::default()),
    };
    {
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(unwritten))?;
    }
    let mut blob = BlobHash {
        inner: io::BufWriter::new(file),
        sha: blob_sha,
        len: unwritten,
    };
    let mut tar = TarHash::default();
    let earlier: HashMap<[u8; 32], usize> = reuse
        .as_ref()
        .map(|r| {
            r.index
                .segments
                .iter()
                .enumerate()
                .map(|(i, s)| (s.fingerprint, i))
                .collect()
        })
        .unwrap_or_default();
    let (mut pos, mut next_reusable) = (unwritten, 0usize);
    // While the segments are the earlier blob's, one for one from the start, the tar is
    // not hashed: its state after them is the earlier one's (`front`, once they end).
    let mut in_front = reuse.is_some();
    let mut front: Option<&[u8]> = None;
    let mut index = SegmentIndex {
        segments: Vec::new(),
        compression,
    };
    // The first segment not hashed here, and the thread that hashes from it (told of each
    // member written, through its publisher).
    let mut deferred: Option<(usize, TailHashing, Publisher)> = None;
    // With `by_cache`: where the tar still to hash starts (segment, offset) and its state.
    let mut to_cache: Option<(usize, u64, Vec<u8>)> = None;
    // Members copied from the earlier blob: (offset here, offset there, length).
    let mut taken: Vec<(u64, u64, u64)> = Vec::new();
    // Each segment's fingerprint, entries and last path; which are taken from the earlier
    // blob (as the loop below decides it) and which are compressed afresh, on the workers
    // when small enough to wait in memory.
    let mut items = Vec::with_capacity(plan.len());
    let (mut next, mut queued, mut fresh) = (0usize, vec![false; plan.len()], Vec::new());
    let mut any_taken = false;
    for (i, planned) in plan.iter().enumerate() {
        let (fp, seg, last) = match *planned {
            Planned::Entries(seg) => (
                fingerprint(seg),
                Some(seg),
                seg.last().map(|e| e.path.to_string()).unwrap_or_default(),
            ),
            Planned::Earlier(j) => {
                let s = reuse
                    .as_ref()
                    .and_then(|r| r.index.segments.get(j))
                    .filter(|_| j >= next)
                    .ok_or_else(|| io::Error::other("a planned segment is not the earlier blob's next"))?;
                (s.fingerprint, None, s.last.clone())
            }
        };
        let reusable = match (reuse.as_ref(), planned, earlier.get(&fp)) {
            (Some(_), Planned::Earlier(j), _) => Some(*j),
            (Some(_), _, Some(&j)) if j >= next => Some(j),
            _ => None,
        };
        match (reusable, seg) {
            (Some(j), _) => {
                next = j + 1;
                any_taken = true;
            }
            (None, Some(seg)) if workers > 1 && bytes_of(seg) <= WAIT_IN_MEMORY => {
                queued[i] = true;
                fresh.push(seg);
            }
            _ => {}
        }
        items.push((fp, seg, last));
    }
    // The earlier blob's members are left where they lie, unread: the cache names the blob
    // (unless none is taken: then it is named here, as it is all written here anyway).
    let by_cache = tail == TailDigests::Cache && any_taken;
    // The fresh members' tar is hashed here unless the diff_id is left to a job of its own
    // (then from the first segment not in front, which no fresh one is).
    let keep_tar = !((defer || by_cache) && reuse.is_some()) && !plain;
    let compress = |seg: &&[SegmentEntry]| -> io::Result<Compressed> {
        let (mut member, mut tar) = (Vec::new(), Vec::new());
        if keep_tar {
            write_member(seg, open, &mut member, &mut tar, compression)?;
        } else {
            write_member(seg, open, &mut member, io::sink(), compression)?;
        }
        Ok(Compressed { member, tar })
    };
    in_order(&fresh, workers, &compress, |fetched| {
        for (i, (planned, (fp, seg, last))) in plan.iter().zip(items).enumerate() {
            let offset = blob.len;
            let reusable = match (reuse.as_ref(), planned, earlier.get(&fp)) {
                (Some(_), Planned::Earlier(j), _) => Some(*j),
                (Some(_), _, Some(&j)) if j >= next_reusable => Some(j),
                _ => None,
            };
            let (r, j) = match (reuse.as_mut(), reusable) {
                (Some(r), Some(j)) if in_front && j == i => {
                    let s = &r.index.segments[j];
                    let (offset, blob_state) = if i < skipped {
                        (s.offset, s.blob_state.clone())
                    } else if by_cache {
                        // The same bytes as the earlier blob's, in the same place.
                        blob.skip(s.len)?;
                        (offset, s.blob_state.clone())
                    } else {
                        copy_member(&mut r.blob, &mut pos, s, &mut blob, None)?;
                        (offset, blob.sha.state())
                    };
                    taken.push((offset, s.offset, s.len));
                    next_reusable = j + 1;
                    front = Some(&s.tar_state);
                    index.segments.push(Segment {
                        fingerprint: fp,
                        offset,
                        len: s.len,
                        tar_state: s.tar_state.clone(),
                        last,
                        blob_state,
                    });
                    continue;
                }
                (r, j) => (r, j),
            };
            if std::mem::take(&mut in_front) {
                if let Some(state) = front {
                    tar = TarHash::resume(state)?;
                }
                if defer {
                    let (hashing, follow) = start_tail_hash(std::fs::File::open(dest)?, tar.state(), plan.len() - i)?;
                    deferred = Some((i, hashing, follow));
                }
                if by_cache {
                    to_cache = Some((i, offset, tar.state()));
                }
            }
            let hashing = (deferred.is_none() && to_cache.is_none() && !plain).then_some(&mut tar);
            match (r, j) {
                (Some(r), Some(j)) if by_cache => {
                    let s = &r.index.segments[j];
                    blob.skip(s.len)?;
                    taken.push((offset, s.offset, s.len));
                    next_reusable = j + 1;
                }
                (Some(r), Some(j)) => {
                    copy_member(&mut r.blob, &mut pos, &r.index.segments[j], &mut blob, hashing)?;
                    taken.push((offset, r.index.segments[j].offset, r.index.segments[j].len));
                    next_reusable = j + 1;
                }
                _ if queued[i] => {
                    let c = fetched.take()?;
                    blob.write_all(&c.member)?;
                    match hashing {
                        Some(tar) if keep_tar => tar.write_all(&c.tar)?,
                        Some(_) => return Err(io::Error::other("a fresh member's tar was not kept to hash")),
                        None => {}
                    }
                }
                _ => {
                    let seg =
                        seg.ok_or_else(|| io::Error::other("an earlier segment to take has no blob to take it from"))?;
                    match hashing {
                        Some(tar) => write_member(seg, open, &mut blob, tar, compression)?,
                        None => write_member(seg, open, &mut blob, io::sink(), compression)?,
                    }
                }
            }
            index.segments.push(Segment {
                fingerprint: fp,
                offset,
                len: blob.len - offset,
                tar_state: if deferred.is_some() || to_cache.is_some() {
                    Vec::new()
                } else if plain {
                    blob.sha.state()
                } else {
                    tar.state()
                },
                last,
                blob_state: if by_cache { Vec::new() } else { blob.sha.state() },
            });
            if let Some((_, _, follow)) = deferred.as_ref() {
                // On the file before the diff_id's thread reads it.
                blob.flush()?;
                follow.0.push((offset, blob.len - offset));
            }
        }
        Ok(())
    })?;
    if in_front {
        if let Some(state) = front {
            tar = TarHash::resume(state)?;
        }
    }
    if by_cache && to_cache.is_none() {
        // Every segment is the earlier blob's: only the tar's end is left to hash.
        to_cache = Some((index.segments.len(), blob.len, tar.state()));
    }
    match reuse.as_mut() {
        Some(_) if by_cache => {}
        // Read to the end, so that whoever streams it can check the whole blob's digest.
        Some(r) => {
            io::copy(&mut r.blob, &mut io::sink())?;
        }
        None => {}
    }
    if plain {
        blob.write_all(&[0; TRAILER])?;
    } else {
        let mut end = gzip(&mut blob);
        end.write_all(&[0; TRAILER])?;
        end.finish()?;
    }
    blob.flush()?;
    let (digest, size) = match by_cache {
        false => (blob.sha.digest(), blob.len),
        true => (String::new(), blob.len),
    };
    // Not synced: the blob is a work file, streamed to the cache (which makes its own copy
    // durable) and removed; syncing it only wrote it to disk once more.
    blob.inner.into_inner().map_err(|e| e.into_error())?;
    let (diff_id, pending) = match deferred {
        // Every member is written: the publisher is done.
        Some((first, hashing, _)) => (
            String::new(),
            Some(PendingDiffId {
                hashing,
                first,
                index: index.clone(),
            }),
        ),
        None if by_cache => (String::new(), None),
        None if plain => (digest.clone(), None),
        None => {
            tar.write_all(&[0; TRAILER])?;
            (tar.digest(), None)
        }
    };
    let tail = to_cache.map(|(first, offset, state)| lcache_proto::wire::LayerTail {
        tar_state: state,
        first: offset,
        // The earlier blob's, which the front is (checked by the cache against its copy).
        blob_state: first
            .checked_sub(1)
            .and_then(|i| index.segments.get(i))
            .map(|s| s.blob_state.clone())
            .unwrap_or_default(),
        members: index
            .segments
            .get(first..)
            .unwrap_or_default()
            .iter()
            .map(|s| s.len)
            .collect(),
        compression,
    });
    Ok(Packed {
        layer: PackedLayer {
            path: dest.to_path_buf(),
            digest,
            diff_id,
            size,
        },
        index,
        pending,
        tail,
        parts: blob_parts(&taken, size),
        unwritten,
        links: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// How the helpers below pack: tests that hold for both set it in turn.
        static COMPRESSION: std::cell::Cell<LayerCompression> = const { std::cell::Cell::new(LayerCompression::Gzip) };
    }

    fn compression() -> LayerCompression {
        COMPRESSION.with(|c| c.get())
    }

    /// Runs `test` packing gzip layers, then uncompressed ones.
    fn with_each_compression(test: impl Fn(LayerCompression)) {
        for c in [LayerCompression::Gzip, LayerCompression::None] {
            COMPRESSION.with(|cell| cell.set(c));
            test(c);
        }
        COMPRESSION.with(|cell| cell.set(LayerCompression::Gzip));
    }

    /// The tar of a blob packed as [`compression`] says.
    fn tar_of(path: &Path) -> Box<dyn Read> {
        let f = std::fs::File::open(path).unwrap();
        match compression() {
            LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(f)),
            LayerCompression::None => Box::new(f),
        }
    }

    struct Tree {
        dir: tempfile::TempDir,
        files: Vec<(String, Vec<u8>)>,
    }

    fn tree(n: usize) -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for i in 0..n {
            let path = format!("app/d{}/f{i:04}", i % 7);
            let body = format!("{i}").repeat(i % 50 + 1).into_bytes();
            files.push((path, body));
        }
        files.sort();
        for (p, b) in &files {
            std::fs::create_dir_all(dir.path().join(p).parent().unwrap()).unwrap();
            std::fs::write(dir.path().join(p), b).unwrap();
        }
        Tree { dir, files }
    }

    fn entries(t: &Tree) -> Vec<(String, Vec<u8>, bool)> {
        let mut out: Vec<(String, Vec<u8>, bool)> = vec![("app".into(), vec![], true)];
        for d in 0..7 {
            out.push((format!("app/d{d}"), vec![], true));
        }
        out.extend(t.files.iter().map(|(p, b)| (p.clone(), b.clone(), false)));
        out.sort();
        out
    }

    fn as_entries(list: &[(String, Vec<u8>, bool)]) -> Vec<SegmentEntry<'_>> {
        list.iter()
            .map(|(p, b, dir)| SegmentEntry {
                path: p,
                kind: if *dir {
                    SegmentEntryKind::Dir
                } else {
                    SegmentEntryKind::File {
                        size: b.len() as u64,
                        content: *blake3::hash(b).as_bytes(),
                    }
                },
                mode: if *dir { 0o755 } else { 0o644 },
                uid: 0,
                gid: 0,
            })
            .collect()
    }

    fn pack(
        root: &Path,
        list: &[(String, Vec<u8>, bool)],
        reuse: Option<(&SegmentIndex, &[u8])>,
        out: &Path,
        opened: &std::sync::atomic::AtomicUsize,
    ) -> (PackedLayer, SegmentIndex) {
        pack_deferring(root, list, reuse, out, opened, TailDigests::Here)
    }

    /// The digests a cache holding `earlier` takes of a layer packed `by_cache` (as
    /// lcached does): the blob assembled from the parts, hashed, and the tar after the
    /// change inflated and hashed from the state the pack gave. Fills in `layer` and the
    /// tail's states in `index`.
    fn named_as_a_cache_does(
        layer: &mut PackedLayer,
        index: &mut SegmentIndex,
        tail: &lcache_proto::wire::LayerTail,
        blob: &[u8],
    ) {
        std::fs::write(&layer.path, blob).unwrap();
        let mut sha = TarHash::default();
        sha.write_all(blob).unwrap();
        layer.digest = sha.digest();
        assert_eq!(layer.size, blob.len() as u64);
        let read = |buf: &mut [u8], offset: u64| {
            let from = blob
                .get(offset as usize..offset as usize + buf.len())
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(from);
            Ok(())
        };
        assert_eq!(tail.compression, compression());
        let (diff_id, states) = diff_id_after(
            &read,
            layer.size,
            &tail.tar_state,
            tail.first,
            &tail.members,
            tail.compression,
        )
        .unwrap();
        layer.diff_id = diff_id;
        // The blob's state where its front ends is the earlier blob's there.
        let state_at = |n: u64| {
            let mut h = TarHash::default();
            h.write_all(&blob[..n as usize]).unwrap();
            h.state()
        };
        if tail.first > 0 {
            assert_eq!(tail.blob_state, state_at(tail.first));
        }
        let n = index.segments.len();
        assert_eq!(states.len(), tail.members.len());
        let mut at = tail.first;
        for ((seg, state), len) in index.segments[n - states.len()..]
            .iter_mut()
            .zip(states)
            .zip(&tail.members)
        {
            at += len;
            seg.tar_state = state;
            seg.blob_state = state_at(at);
        }
    }

    /// [`pack`], with the digests after the reused front taken as `tail` says (a cache's:
    /// as [`named_as_a_cache_does`]).
    fn pack_deferring(
        root: &Path,
        list: &[(String, Vec<u8>, bool)],
        reuse: Option<(&SegmentIndex, &[u8])>,
        out: &Path,
        opened: &std::sync::atomic::AtomicUsize,
        tail_digests: TailDigests,
    ) -> (PackedLayer, SegmentIndex) {
        let open = |e: &SegmentEntry| {
            opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::fs::File::open(root.join(e.path))
        };
        let earlier = reuse.map(|(_, blob)| blob);
        let reuse = reuse.map(|(index, blob)| Reuse {
            index,
            blob,
            skipped: 0,
        });
        let Packed {
            mut layer,
            mut index,
            pending,
            parts,
            tail,
            ..
        } = pack_segmented(&as_entries(list), &open, reuse, out, tail_digests, compression()).unwrap();
        assert_eq!(tail.is_some(), tail_digests == TailDigests::Cache && earlier.is_some());
        if let Some(earlier) = earlier {
            // The parts say what the blob is: the earlier blob's runs and its own.
            let made = std::fs::read(&layer.path).unwrap();
            let (mut assembled, mut sent) = (Vec::new(), 0);
            for p in &parts {
                let at = assembled.len();
                match *p {
                    BlobPart::Base { offset, len } => {
                        assembled.extend_from_slice(&earlier[offset as usize..(offset + len) as usize])
                    }
                    BlobPart::Sent { len } => {
                        sent += len;
                        assembled.extend_from_slice(&made[at..at + len as usize])
                    }
                }
            }
            match &tail {
                Some(tail) => {
                    assert_eq!(made.len() as u64, layer.size, "the file is as long as the blob");
                    named_as_a_cache_does(&mut layer, &mut index, tail, &assembled);
                }
                None => assert!(assembled == made, "the parts assemble the blob"),
            }
            assert!(sent * 2 < layer.size, "{sent} of {} bytes sent", layer.size);
        }
        match pending {
            Some(p) => {
                let (diff_id, index) = p.finish().unwrap();
                layer.diff_id = diff_id;
                (layer, index)
            }
            None => (layer, index),
        }
    }

    #[test]
    fn reusing_unchanged_members_gives_the_blob_packing_from_scratch_gives_and_reads_only_the_changed() {
        with_each_compression(|_| {
            reusing_unchanged_members_gives_the_blob_packing_from_scratch_gives_and_reads_only_the_changed_packed()
        });
    }

    fn reusing_unchanged_members_gives_the_blob_packing_from_scratch_gives_and_reads_only_the_changed_packed() {
        let t = tree(6000);
        let out = tempfile::tempdir().unwrap();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let list = entries(&t);
        let (first, index) = pack(t.dir.path(), &list, None, &out.path().join("1"), &opened);
        assert!(index.segments.len() > 12, "{} segments", index.segments.len());
        assert_eq!(opened.load(std::sync::atomic::Ordering::Relaxed), 6000);
        let first_blob = std::fs::read(&first.path).unwrap();

        // Edit one file, add one, remove one.
        let mut list2 = list.clone();
        let edit = list2.iter_mut().find(|(p, _, _)| p == "app/d6/f1000").unwrap();
        edit.1 = b"edited".to_vec();
        std::fs::write(t.dir.path().join("app/d6/f1000"), b"edited").unwrap();
        list2.retain(|(p, _, _)| p != "app/d5/f2000");
        std::fs::write(t.dir.path().join("app/d5/new"), b"new").unwrap();
        list2.push(("app/d5/new".into(), b"new".to_vec(), false));
        list2.sort();

        opened.store(0, std::sync::atomic::Ordering::Relaxed);
        let (scratch, _) = pack(t.dir.path(), &list2, None, &out.path().join("2"), &opened);
        opened.store(0, std::sync::atomic::Ordering::Relaxed);
        let (reused, _) = pack(
            t.dir.path(),
            &list2,
            Some((&index, &first_blob)),
            &out.path().join("3"),
            &opened,
        );
        assert_eq!(reused.digest, scratch.digest);
        assert_eq!(reused.diff_id, scratch.diff_id);
        // Three changes touch at most three segments of about 256 entries.
        assert!(
            opened.load(std::sync::atomic::Ordering::Relaxed) < 6000 / 4,
            "read {} files",
            opened.load(std::sync::atomic::Ordering::Relaxed)
        );

        // The blob is one layer: every entry is there, in order, edits included.
        let mut a = tar::Archive::new(tar_of(&reused.path));
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().display().to_string();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            seen.push((p.trim_end_matches('/').to_string(), body));
        }
        let expected: Vec<(String, Vec<u8>)> = list2.iter().map(|(p, b, _)| (p.clone(), b.clone())).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn the_diff_id_resumed_after_an_unchanged_front_is_the_one_hashing_everything_gives() {
        with_each_compression(|_| {
            the_diff_id_resumed_after_an_unchanged_front_is_the_one_hashing_everything_gives_packed()
        });
    }

    fn the_diff_id_resumed_after_an_unchanged_front_is_the_one_hashing_everything_gives_packed() {
        let t = tree(2000);
        let out = tempfile::tempdir().unwrap();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let list = entries(&t);
        let (first, index) = pack(t.dir.path(), &list, None, &out.path().join("0"), &opened);
        let first_blob = std::fs::read(&first.path).unwrap();
        let last = list.last().unwrap().0.clone();
        let first_file = list.iter().find(|(_, _, dir)| !dir).unwrap().0.clone();
        for (n, edit) in [None, Some(last), Some(first_file)].into_iter().enumerate() {
            let mut changed = list.clone();
            if let Some(path) = &edit {
                let e = changed.iter_mut().find(|(p, _, _)| p == path).unwrap();
                e.1 = format!("edited {n}").into_bytes();
                std::fs::write(t.dir.path().join(path), &e.1).unwrap();
            }
            let (scratch, scratch_index) =
                pack(t.dir.path(), &changed, None, &out.path().join(format!("s{n}")), &opened);
            let (resumed, resumed_index) = pack(
                t.dir.path(),
                &changed,
                Some((&index, &first_blob)),
                &out.path().join(format!("r{n}")),
                &opened,
            );
            assert_eq!(
                (&resumed.digest, &resumed.diff_id),
                (&scratch.digest, &scratch.diff_id),
                "{edit:?}"
            );
            assert_eq!(resumed_index, scratch_index, "the kept states are the same too");
            // Hashed later on a thread, or named by a cache: the same.
            for tail in [TailDigests::Thread, TailDigests::Cache] {
                let (later, later_index) = pack_deferring(
                    t.dir.path(),
                    &changed,
                    Some((&index, &first_blob)),
                    &out.path().join(format!("{tail:?}{n}")),
                    &opened,
                    tail,
                );
                assert_eq!(
                    (&later.digest, &later.diff_id, &later_index),
                    (&scratch.digest, &scratch.diff_id, &scratch_index),
                    "{tail:?}: {edit:?}"
                );
            }
            if let Some(path) = &edit {
                let original = &list.iter().find(|(p, _, _)| p == path).unwrap().1;
                std::fs::write(t.dir.path().join(path), original).unwrap();
            }
        }
    }

    #[test]
    fn the_diff_id_thread_follows_the_pack_and_stops_when_it_fails() {
        let w = Written::default();
        w.push((10, 5));
        assert_eq!(w.member(0).unwrap(), (10, 5));
        let w = std::sync::Arc::new(w);
        let waiting = {
            let w = w.clone();
            std::thread::spawn(move || w.member(1))
        };
        // A pack that returns early drops its end: the waiting member is an error, not a hang.
        drop(Publisher(w.clone()));
        assert!(waiting.join().unwrap().is_err());
        // Members written before the end are still served; none after it.
        let w = Written::default();
        w.push((0, 1));
        w.end();
        assert_eq!(w.member(0).unwrap(), (0, 1));
        assert!(w.member(1).is_err());
    }

    #[test]
    fn a_member_inflated_in_memory_is_checked_whole() {
        let tar: Vec<u8> = (0..300_000u32).flat_map(|i| (i % 1000).to_le_bytes()).collect();
        let mut member = Vec::new();
        let mut gz = gzip(&mut member);
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap();
        assert_eq!(inflate_member_bytes(&member).unwrap().unwrap(), tar);
        // A wrong CRC, two streams in one member: errors.
        let mut bad_crc = member.clone();
        let at = bad_crc.len() - 8;
        bad_crc[at] ^= 1;
        assert!(inflate_member_bytes(&bad_crc).is_err());
        let mut two = member.clone();
        two.extend_from_slice(&member);
        assert!(inflate_member_bytes(&two).is_err(), "two streams");
        // Cut short, or saying more than may wait in memory: left to the streamed path.
        assert!(inflate_member_bytes(&member[..member.len() / 2]).unwrap().is_none());
        let mut big = member.clone();
        let at = big.len() - 4;
        big[at..].copy_from_slice(&(WAIT_IN_MEMORY as u32 + 1).to_le_bytes());
        assert!(inflate_member_bytes(&big).unwrap().is_none());
    }

    #[test]
    fn a_member_too_big_to_wait_in_memory_is_streamed_into_the_deferred_diff_id() {
        let dir = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let big = b"0123456789abcdef".repeat(((WAIT_IN_MEMORY + (1 << 20)) / 16) as usize);
        let mut list: Vec<(String, Vec<u8>, bool)> = vec![("app".into(), vec![], true)];
        list.extend((0..600).map(|i| (format!("app/a{i:03}"), format!("{i}").into_bytes(), false)));
        list.push(("app/big".into(), big, false));
        list.extend((0..600).map(|i| (format!("app/z{i:03}"), format!("{i}").into_bytes(), false)));
        std::fs::create_dir(dir.path().join("app")).unwrap();
        for (p, b, d) in &list {
            if !d {
                std::fs::write(dir.path().join(p), b).unwrap();
            }
        }
        let (first, index) = pack(dir.path(), &list, None, &out.path().join("0"), &opened);
        let first_blob = std::fs::read(&first.path).unwrap();
        // The big file's member inflates past what may wait in memory, though it is small.
        let member = index.segments.iter().find(|s| s.last == "app/big").unwrap();
        assert!(member.len < WAIT_IN_MEMORY);
        let edited = list.iter_mut().find(|(p, _, _)| p == "app/a000").unwrap();
        edited.1 = b"edited".to_vec();
        std::fs::write(dir.path().join("app/a000"), b"edited").unwrap();
        let (scratch, scratch_index) = pack(dir.path(), &list, None, &out.path().join("s"), &opened);
        for tail in [TailDigests::Thread, TailDigests::Cache] {
            let (later, later_index) = pack_deferring(
                dir.path(),
                &list,
                Some((&index, &first_blob)),
                &out.path().join(format!("{tail:?}")),
                &opened,
                tail,
            );
            assert_eq!(
                (&later.digest, &later.diff_id, &later_index),
                (&scratch.digest, &scratch.diff_id, &scratch_index),
                "{tail:?}"
            );
        }
    }

    #[test]
    fn the_blob_is_the_same_however_many_threads_compress_it() {
        with_each_compression(|_| the_blob_is_the_same_however_many_threads_compress_it_packed());
    }

    fn the_blob_is_the_same_however_many_threads_compress_it_packed() {
        let t = tree(3000);
        let out = tempfile::tempdir().unwrap();
        let list = entries(&t);
        let e = as_entries(&list);
        let plan: Vec<Planned> = split(&e).into_iter().map(|r| Planned::Entries(&e[r])).collect();
        let open = |e: &SegmentEntry| std::fs::File::open(t.dir.path().join(e.path));
        let digests: Vec<(String, String)> = [1, 2, 4]
            .into_iter()
            .map(|w| {
                let p = pack_on::<std::io::Empty>(
                    &plan,
                    &open,
                    None,
                    &out.path().join(format!("{w}")),
                    TailDigests::Here,
                    compression(),
                    w,
                )
                .unwrap();
                (p.layer.digest, p.layer.diff_id)
            })
            .collect();
        assert!(plan.len() > 8);
        assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    }

    #[test]
    fn a_front_taken_unread_is_neither_fetched_nor_written_and_the_blob_is_the_same() {
        with_each_compression(|_| {
            a_front_taken_unread_is_neither_fetched_nor_written_and_the_blob_is_the_same_packed()
        });
    }

    fn a_front_taken_unread_is_neither_fetched_nor_written_and_the_blob_is_the_same_packed() {
        let t = tree(3000);
        let out = tempfile::tempdir().unwrap();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let list = entries(&t);
        let (first, index) = pack(t.dir.path(), &list, None, &out.path().join("0"), &opened);
        let first_blob = std::fs::read(&first.path).unwrap();
        let mut changed = list.clone();
        let at = changed.len() * 2 / 3;
        changed[at].1 = b"edited".to_vec();
        std::fs::write(t.dir.path().join(&changed[at].0), b"edited").unwrap();
        let (scratch, scratch_index) = pack(t.dir.path(), &changed, None, &out.path().join("s"), &opened);
        let scratch_blob = std::fs::read(&scratch.path).unwrap();
        // The segments in front of the edit are named, the rest listed.
        let e = as_entries(&changed);
        let mut plan = Vec::new();
        for (i, r) in split(&e).into_iter().enumerate() {
            let same = index.segments.get(i).map(|s| s.fingerprint) == Some(fingerprint(&e[r.clone()]));
            plan.push(
                if same && plan.len() == i && plan.iter().all(|p| matches!(p, Planned::Earlier(_))) {
                    Planned::Earlier(i)
                } else {
                    Planned::Entries(&e[r])
                },
            );
        }
        let skipped = skippable_front(&plan, &index);
        assert!(skipped > 2 && skipped < plan.len(), "{skipped} of {}", plan.len());
        let from = index.front_end(skipped);
        let open = |e: &SegmentEntry| std::fs::File::open(t.dir.path().join(e.path));
        for tail in [TailDigests::Here, TailDigests::Thread] {
            let reuse = Reuse {
                index: &index,
                blob: &first_blob[from as usize..],
                skipped,
            };
            let dest = out.path().join(format!("r{tail:?}"));
            let mut packed = pack_planned(&plan, &open, Some(reuse), &dest, tail, compression()).unwrap();
            if let Some(p) = packed.pending.take() {
                (packed.layer.diff_id, packed.index) = p.finish().unwrap();
            }
            assert_eq!(
                (&packed.layer.digest, &packed.layer.diff_id, &packed.index),
                (&scratch.digest, &scratch.diff_id, &scratch_index)
            );
            assert_eq!(packed.unwritten, from);
            assert_eq!(packed.parts[0], BlobPart::Base { offset: 0, len: from });
            let made = std::fs::read(&dest).unwrap();
            assert_eq!(made.len(), scratch_blob.len());
            assert!(made[..from as usize].iter().all(|b| *b == 0), "the front is a hole");
            assert!(made[from as usize..] == scratch_blob[from as usize..]);
        }
        // Skipping members the plan does not take from the front is refused.
        let reuse = Reuse {
            index: &index,
            blob: &first_blob[..],
            skipped: skipped + 1,
        };
        assert!(pack_planned(
            &plan,
            &open,
            Some(reuse),
            &out.path().join("bad"),
            TailDigests::Here,
            compression()
        )
        .is_err());
    }

    #[test]
    fn a_wrong_earlier_blob_fails_rather_than_packing_it() {
        with_each_compression(|_| a_wrong_earlier_blob_fails_rather_than_packing_it_packed());
    }

    fn a_wrong_earlier_blob_fails_rather_than_packing_it_packed() {
        let t = tree(600);
        let out = tempfile::tempdir().unwrap();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let list = entries(&t);
        let (_, index) = pack(t.dir.path(), &list, None, &out.path().join("1"), &opened);
        let garbage = vec![7u8; 4096];
        let r = pack_segmented(
            &as_entries(&list),
            &|e: &SegmentEntry| std::fs::File::open(t.dir.path().join(e.path)),
            Some(Reuse {
                index: &index,
                blob: &garbage[..],
                skipped: 0,
            }),
            &out.path().join("2"),
            TailDigests::Here,
            compression(),
        );
        assert!(r.is_err());
    }

    #[test]
    fn a_diff_id_following_the_pack_fails_with_it_or_on_a_damaged_member() {
        let t = tree(2000);
        let out = tempfile::tempdir().unwrap();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let list = entries(&t);
        let (first, index) = pack(t.dir.path(), &list, None, &out.path().join("0"), &opened);
        let blob = std::fs::read(&first.path).unwrap();
        // The first file edited: every member after it is taken from the earlier blob.
        let path = list.iter().find(|(_, _, dir)| !dir).unwrap().0.clone();
        std::fs::write(t.dir.path().join(&path), b"edited").unwrap();
        let open = |e: &SegmentEntry| std::fs::File::open(t.dir.path().join(e.path));
        let changed: Vec<_> = list
            .iter()
            .map(|(p, c, d)| (p.clone(), if *p == path { b"edited".to_vec() } else { c.clone() }, *d))
            .collect();
        let repack = |earlier: &[u8], name: &str| {
            let reuse = Reuse {
                index: &index,
                blob: earlier,
                skipped: 0,
            };
            pack_segmented(
                &as_entries(&changed),
                &open,
                Some(reuse),
                &out.path().join(name),
                TailDigests::Thread,
                compression(),
            )
        };
        // The earlier blob cut short in its tail: the pack fails (and tells its thread,
        // as `the_diff_id_thread_follows_the_pack_and_stops_when_it_fails` checks).
        let half = index.segments[index.segments.len() / 2].offset as usize;
        assert!(repack(&blob[..half], "cut").is_err());
        // A member after the change damaged in the earlier blob (its CRC): the pack takes it
        // as it is, and the diff_id's thread refuses it.
        let mut damaged = blob.clone();
        let s = &index.segments[index.segments.len() / 2];
        damaged[(s.offset + s.len - 8) as usize] ^= 1;
        let packed = repack(&damaged, "damaged").unwrap();
        let e = packed.pending.unwrap().finish().unwrap_err();
        assert!(e.to_string().contains("inflate"), "{e}");
    }

    #[test]
    fn an_uncompressed_blob_is_the_tar_the_gzip_one_holds_and_its_digest_is_the_diff_id() {
        let t = tree(2000);
        let out = tempfile::tempdir().unwrap();
        let opened = std::sync::atomic::AtomicUsize::new(0);
        let list = entries(&t);
        let (gz, gz_index) = pack(t.dir.path(), &list, None, &out.path().join("gz"), &opened);
        COMPRESSION.with(|c| c.set(LayerCompression::None));
        let (plain, plain_index) = pack(t.dir.path(), &list, None, &out.path().join("tar"), &opened);
        COMPRESSION.with(|c| c.set(LayerCompression::Gzip));
        assert_eq!(plain.digest, plain.diff_id);
        assert_eq!(plain.diff_id, gz.diff_id, "the same tar");
        let mut inflated = Vec::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(&gz.path).unwrap())
            .read_to_end(&mut inflated)
            .unwrap();
        assert!(std::fs::read(&plain.path).unwrap() == inflated);
        assert_eq!(plain_index.compression, LayerCompression::None);
        // Each segment's tar state is its blob state: the tar is the blob.
        for (p, g) in plain_index.segments.iter().zip(&gz_index.segments) {
            assert_eq!(p.tar_state, p.blob_state);
            assert_eq!(p.tar_state, g.tar_state);
        }
        // A blob kept the other way gives no members to a new one.
        let gz_blob = std::fs::read(&gz.path).unwrap();
        let open = |e: &SegmentEntry| std::fs::File::open(t.dir.path().join(e.path));
        let across = pack_segmented(
            &as_entries(&list),
            &open,
            Some(Reuse {
                index: &gz_index,
                blob: &gz_blob[..],
                skipped: 0,
            }),
            &out.path().join("across"),
            TailDigests::Here,
            LayerCompression::None,
        );
        assert!(across.is_err());
    }

    #[test]
    fn cuts_depend_only_on_the_entries_near_them() {
        let t = tree(2000);
        let list = entries(&t);
        let e = as_entries(&list);
        let before = split(&e);
        let mut fewer = e.clone();
        fewer.remove(10);
        let after = split(&fewer);
        // Past the removed entry's segment, the same cuts (shifted by one).
        let tail =
            |s: &[Range<usize>], shift: usize| -> Vec<usize> { s.iter().skip(2).map(|r| r.end - shift).collect() };
        assert_eq!(tail(&before, 1), tail(&after, 0));
    }
}
