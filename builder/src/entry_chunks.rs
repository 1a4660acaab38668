//! A whole COPY snapshot's entries as kept beside it (`<hex>.entries.bin`): sorted by path
//! and cut into chunks, each read, checked and decoded only when an entry in it is asked
//! for. A re-run COPY built from lcached's list of changes asks for the few entries near
//! what changed; at 200,000 files, decoding them all took longer than the rest of the step,
//! and reading and checking the whole 17 MB file still took most of it.
//!
//! The file: `lcentry2`, the header's length (`u64`, little-endian), the header (bincode:
//! entry count, each chunk's last path, place and BLAKE3) and its BLAKE3, then the chunks
//! (bincode, sorted `(path, entry)` lists). A chunk is checked against its BLAKE3 when it is read; one that
//! fails marks the whole as damaged, which every user checks. Files of the format before
//! (`lcentry1`, one BLAKE3 over every chunk, so the whole file was read to use any of it)
//! are not read: the next build of the step copies instead of keeping, once.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::copy_seed::{LayerEntries, Placed};

const MAGIC: &[u8; 8] = b"lcentry2";

/// Entries per chunk: small enough that a lookup decodes little, large enough that the
/// header stays small.
const CHUNK: usize = 256;

/// The largest header read (about 60 bytes a chunk: 4 GiB of entries).
const MAX_HEADER: u64 = 64 << 20;

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    entries: u64,
    chunks: Vec<ChunkHead>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ChunkHead {
    /// The chunk's last path.
    last: String,
    /// Where its bytes start among the chunks' bytes.
    at: u64,
    /// How many bytes it is.
    len: u64,
    /// BLAKE3 of its bytes.
    blake3: [u8; 32],
}

type Chunk = Vec<(String, Placed)>;

/// Where the chunks' bytes are.
enum ChunkBytes {
    /// The file, from `start` on: each chunk read when it is first asked for.
    File { file: std::fs::File, start: u64 },
    /// In memory.
    Memory(Vec<u8>),
}

/// A snapshot's entries, read chunk by chunk.
pub struct EntryChunks {
    heads: Vec<ChunkHead>,
    bytes: ChunkBytes,
    chunks: Vec<OnceLock<Chunk>>,
    len: usize,
    damaged: AtomicBool,
}

impl std::fmt::Debug for EntryChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EntryChunks({} entries in {} chunks)", self.len, self.heads.len())
    }
}

fn encode<T: serde::Serialize>(value: &T) -> std::io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(std::io::Error::other)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .ok()
        .map(|(v, _)| v)
}

/// The header in `bytes` (its bincode, then its BLAKE3), if it is whole.
fn checked_header(bytes: &[u8]) -> Option<Header> {
    let (header, hash) = bytes.split_last_chunk::<32>()?;
    (blake3::hash(header).as_bytes() == hash).then(|| decode(header))?
}

impl EntryChunks {
    /// The file's bytes for `entries`: the magic and header, and the chunks.
    fn encode(entries: &LayerEntries) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
        let mut sorted: Vec<(&String, &Placed)> = entries.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut data = Vec::new();
        let mut chunks = Vec::new();
        for chunk in sorted.chunks(CHUNK) {
            let bytes = encode(&chunk)?;
            chunks.push(ChunkHead {
                last: chunk.last().map(|(p, _)| p.to_string()).unwrap_or_default(),
                at: data.len() as u64,
                len: bytes.len() as u64,
                blake3: *blake3::hash(&bytes).as_bytes(),
            });
            data.extend_from_slice(&bytes);
        }
        let header = encode(&Header {
            entries: sorted.len() as u64,
            chunks,
        })?;
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&(header.len() as u64).to_le_bytes());
        head.extend_from_slice(&header);
        head.extend_from_slice(blake3::hash(&header).as_bytes());
        Ok((head, data))
    }

    /// Writes `entries` to `path` (aside, then renamed: a crash leaves the old file or
    /// none).
    pub fn save(path: &Path, entries: &LayerEntries) -> std::io::Result<()> {
        let aside = path.with_extension("partial");
        let (head, data) = Self::encode(entries)?;
        {
            use std::io::Write;
            let mut f = std::io::BufWriter::new(std::fs::File::create(&aside)?);
            f.write_all(&head)?;
            f.write_all(&data)?;
            f.flush()?;
        }
        std::fs::rename(&aside, path)
    }

    /// Opens the file at `path`, reading only its header; `None` if it is missing, of
    /// another format, or its header is damaged.
    pub fn load(path: &Path) -> Option<Self> {
        let file = std::fs::File::open(path).ok()?;
        let size = file.metadata().ok()?.len();
        let mut front = [0u8; 16];
        file.read_exact_at(&mut front, 0).ok()?;
        if &front[..8] != MAGIC {
            return None;
        }
        let header_len = u64::from_le_bytes(front[8..].try_into().ok()?);
        if header_len > MAX_HEADER || 16 + header_len + 32 > size {
            return None;
        }
        let mut header = vec![0; header_len as usize + 32];
        file.read_exact_at(&mut header, 16).ok()?;
        let start = 16 + header_len + 32;
        Self::with(checked_header(&header)?, ChunkBytes::File { file, start }, size - start)
    }

    /// The entries of `entries`, as a file would give them.
    pub fn from_entries(entries: &LayerEntries) -> Self {
        let parsed = Self::encode(entries).ok().and_then(|(head, data)| {
            let header = checked_header(head.get(16..)?)?;
            let len = data.len() as u64;
            Self::with(header, ChunkBytes::Memory(data), len)
        });
        parsed.unwrap_or_else(|| Self {
            heads: Vec::new(),
            bytes: ChunkBytes::Memory(Vec::new()),
            chunks: Vec::new(),
            len: 0,
            damaged: AtomicBool::new(true),
        })
    }

    /// The entries `header` describes, their chunks in `bytes` (`available` bytes long).
    fn with(header: Header, bytes: ChunkBytes, available: u64) -> Option<Self> {
        let fits = |h: &ChunkHead| h.at.checked_add(h.len).is_some_and(|end| end <= available);
        if !header.chunks.iter().all(fits) {
            return None;
        }
        Some(Self {
            chunks: header.chunks.iter().map(|_| OnceLock::new()).collect(),
            heads: header.chunks,
            bytes,
            len: usize::try_from(header.entries).ok()?,
            damaged: AtomicBool::new(false),
        })
    }

    /// Chunk `i`'s bytes, checked against its BLAKE3.
    fn chunk_bytes(&self, i: usize) -> Option<Vec<u8>> {
        let h = &self.heads[i];
        let bytes = match &self.bytes {
            ChunkBytes::File { file, start } => {
                let mut b = vec![0; usize::try_from(h.len).ok()?];
                file.read_exact_at(&mut b, start.checked_add(h.at)?).ok()?;
                b
            }
            ChunkBytes::Memory(data) => data.get(h.at as usize..(h.at + h.len) as usize)?.to_vec(),
        };
        (*blake3::hash(&bytes).as_bytes() == h.blake3).then_some(bytes)
    }

    fn chunk(&self, i: usize) -> &[(String, Placed)] {
        self.chunks[i].get_or_init(|| {
            self.chunk_bytes(i).and_then(|b| decode(&b)).unwrap_or_else(|| {
                // Answering "no entries" would make a wrong layer: every user checks
                // `damaged` (and copies without the snapshot these entries describe).
                self.damaged.store(true, Ordering::Relaxed);
                Vec::new()
            })
        })
    }

    /// Whether a chunk failed to decode (the entries answered are then incomplete).
    pub fn damaged(&self) -> bool {
        self.damaged.load(Ordering::Relaxed)
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk `path` would be in.
    fn chunk_of(&self, path: &str) -> Option<usize> {
        let i = self.heads.partition_point(|h| h.last.as_str() < path);
        (i < self.heads.len()).then_some(i)
    }

    /// The entry at `path`.
    pub fn get(&self, path: &str) -> Option<&Placed> {
        let chunk = self.chunk(self.chunk_of(path)?);
        chunk
            .binary_search_by(|(p, _)| p.as_str().cmp(path))
            .ok()
            .map(|i| &chunk[i].1)
    }

    /// Whether there is an entry at `path`.
    pub fn contains_key(&self, path: &str) -> bool {
        self.get(path).is_some()
    }

    /// Every entry, in path order (each chunk decoded as it is reached).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Placed)> {
        (0..self.heads.len()).flat_map(|i| self.chunk(i).iter().map(|(p, e)| (p, e)))
    }

    /// Every path, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.iter().map(|(p, _)| p)
    }

    /// The entries after `after` (all, given `None`) up to and including `upto` (to the
    /// end, given `None`), in path order.
    pub fn range<'a>(
        &'a self,
        after: Option<&'a str>,
        upto: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a String, &'a Placed)> {
        let first = match after {
            Some(a) => self.heads.partition_point(|h| h.last.as_str() <= a),
            None => 0,
        };
        (first..self.heads.len())
            .take_while(move |&i| match (upto, i.checked_sub(1)) {
                // A chunk is past `upto` once the one before it already reached it.
                (Some(u), Some(prev)) => self.heads[prev].last.as_str() < u,
                _ => true,
            })
            .flat_map(move |i| self.chunk(i).iter().map(|(p, e)| (p, e)))
            .skip_while(move |(p, _)| after.is_some_and(|a| p.as_str() <= a))
            .take_while(move |(p, _)| upto.is_none_or(|u| p.as_str() <= u))
    }

    /// Every entry, as a map.
    pub fn to_map(&self) -> LayerEntries {
        self.iter().map(|(p, e)| (p.clone(), e.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy_seed::CopiedFrom;

    fn dir(mode: u32) -> Placed {
        Placed::Dir { mode, uid: 0, gid: 0 }
    }

    fn many(n: u32) -> LayerEntries {
        (0..n).map(|i| (format!("app/f{i:05}"), dir(i))).collect()
    }

    #[test]
    fn entries_read_back_by_path_by_range_and_whole() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.entries.bin");
        let mut entries = many(1000);
        entries.insert(
            "app/file".into(),
            Placed::File(CopiedFrom {
                dev: 1,
                ino: 2,
                ctime_ns: 3,
                mtime_ns: 4,
                size: 5,
                mode: 0o644,
                uid: 0,
                gid: 0,
                content: [9; 32],
            }),
        );
        EntryChunks::save(&path, &entries).unwrap();
        let e = EntryChunks::load(&path).unwrap();
        assert_eq!(e.len(), 1001);
        assert_eq!(e.get("app/f00500"), Some(&dir(500)));
        assert_eq!(e.get("app/file"), entries.get("app/file"));
        assert_eq!(e.get("app/f00500x"), None);
        assert_eq!(e.get("zzz"), None);
        assert_eq!(e.to_map(), entries);
        let keys: Vec<&String> = e.keys().collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));

        // Ranges, across chunk ends and at both ends.
        let range =
            |a: Option<&str>, u: Option<&str>| -> Vec<String> { e.range(a, u).map(|(p, _)| p.clone()).collect() };
        let expect = |a: Option<&str>, u: Option<&str>| -> Vec<String> {
            keys.iter()
                .filter(|p| a.is_none_or(|a| p.as_str() > a) && u.is_none_or(|u| p.as_str() <= u))
                .map(|p| p.to_string())
                .collect()
        };
        for (a, u) in [
            (None, None),
            (Some("app/f00100"), Some("app/f00700")),
            (Some("app/f00255"), Some("app/f00256")),
            (Some("app/f00250"), None),
            (None, Some("app/f00003")),
            (Some("a"), Some("app/f00000")),
            (Some("app/f00999"), None),
            (Some("app/f00300x"), Some("app/f00301x")),
        ] {
            assert_eq!(range(a, u), expect(a, u), "{a:?}..={u:?}");
        }
        assert!(!e.damaged());
    }

    #[test]
    fn a_damaged_chunk_is_found_when_read_and_a_damaged_or_foreign_file_is_not_read() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.entries.bin");
        EntryChunks::save(&path, &many(600)).unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut bytes = good.clone();
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        // The first chunks are whole: read without reading the damaged last one.
        let e = EntryChunks::load(&path).unwrap();
        assert_eq!(e.get("app/f00001"), Some(&dir(1)));
        assert!(!e.damaged());
        assert_eq!(e.get("app/f00599"), None);
        assert!(e.damaged(), "the last chunk does not match its BLAKE3");
        // A header that does not decode, a file cut short, the format before.
        let mut bytes = good.clone();
        bytes[20] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(EntryChunks::load(&path).is_none());
        std::fs::write(&path, &good[..good.len() - 100]).unwrap();
        assert!(EntryChunks::load(&path).is_none());
        let mut v1 = good.clone();
        v1[..8].copy_from_slice(b"lcentry1");
        std::fs::write(&path, &v1).unwrap();
        assert!(EntryChunks::load(&path).is_none());
        // The format before chunks: a bare bincode map.
        let old = bincode::serde::encode_to_vec(many(3), bincode::config::standard()).unwrap();
        std::fs::write(&path, old).unwrap();
        assert!(EntryChunks::load(&path).is_none());
        assert!(EntryChunks::load(&d.path().join("missing")).is_none());
    }
}
