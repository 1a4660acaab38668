//! A stored blob opened for reading. A blob is stored whole (one file) or, when it was
//! uploaded as parts, as a directory: a `recipe` naming runs of the files beside it, each a
//! hard link to the file it was taken from (an earlier blob, or the bytes that upload sent).
//! The links make the file system count the references: removing a blob never takes bytes
//! another blob still reads.

use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use lcache_proto::wire::BlobParts;
use serde::{Deserialize, Serialize};

/// The file a composed blob's runs are listed in.
pub(crate) const RECIPE: &str = "recipe";

const CHUNK: u64 = 256 * 1024;

/// A composed blob's directory listing of runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Recipe {
    /// The runs, in blob order.
    pub runs: Vec<RecipeRun>,
    /// The parts the blob was uploaded as: a tier that holds the same base can be sent
    /// the same parts.
    #[serde(default)]
    pub origin: Option<BlobParts>,
}

/// `len` bytes of the file `file` (beside the recipe) from `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecipeRun {
    /// A name in the blob's directory.
    pub file: String,
    /// Where the run starts in it.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
}

/// Names the store itself gives the files of a composed blob: nothing a recipe says may
/// lead out of its directory.
pub(crate) fn plain_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 16 && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// One run of a blob: bytes of an open file.
pub(crate) struct Run {
    /// Where the file was opened (for links made from it).
    pub path: std::path::PathBuf,
    /// The open file: it stays readable whatever happens to its name meanwhile.
    pub file: std::fs::File,
    /// Where the run starts.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
}

/// A stored blob's bytes, as runs of open files.
pub struct BlobFile {
    pub(crate) runs: Vec<Run>,
    len: u64,
    /// How it was uploaded, when as parts.
    pub origin: Option<BlobParts>,
}

fn damaged(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl BlobFile {
    /// Opens what is at `path`: a whole blob's file or a composed blob's directory. `None`
    /// when nothing is there.
    pub(crate) fn open(path: &Path) -> io::Result<Option<Self>> {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if meta.is_file() {
            let file = std::fs::File::open(path)?;
            let len = file.metadata()?.len();
            let run = Run {
                path: path.to_path_buf(),
                file,
                offset: 0,
                len,
            };
            return Ok(Some(Self {
                runs: vec![run],
                len,
                origin: None,
            }));
        }
        if !meta.is_dir() {
            return Ok(None);
        }
        let recipe: Recipe = serde_json::from_slice(&std::fs::read(path.join(RECIPE))?)
            .map_err(|e| damaged(format!("{}: {e}", path.join(RECIPE).display())))?;
        Self::from_recipe(path, &recipe).map(Some)
    }

    /// Opens the runs `recipe` lists, in `dir`; each must lie within its file.
    pub(crate) fn from_recipe(dir: &Path, recipe: &Recipe) -> io::Result<Self> {
        let mut opened: Vec<(String, std::fs::File, u64)> = Vec::new();
        let mut runs = Vec::with_capacity(recipe.runs.len());
        let mut len = 0u64;
        for r in &recipe.runs {
            if !plain_name(&r.file) {
                return Err(damaged(format!("{}: a run names '{}'", dir.display(), r.file)));
            }
            let (file, size) = match opened.iter().find(|(n, _, _)| *n == r.file) {
                Some((_, f, size)) => (f.try_clone()?, *size),
                None => {
                    let f = std::fs::File::open(dir.join(&r.file))?;
                    let size = f.metadata()?.len();
                    opened.push((r.file.clone(), f.try_clone()?, size));
                    (f, size)
                }
            };
            if r.offset.checked_add(r.len).is_none_or(|end| end > size) {
                return Err(damaged(format!(
                    "{}: a run ends past the end of {} ({size} bytes)",
                    dir.display(),
                    r.file
                )));
            }
            len = len
                .checked_add(r.len)
                .ok_or_else(|| damaged(format!("{}: the runs overflow", dir.display())))?;
            runs.push(Run {
                path: dir.join(&r.file),
                file,
                offset: r.offset,
                len: r.len,
            });
        }
        Ok(Self {
            runs,
            len,
            origin: recipe.origin.clone(),
        })
    }

    /// Only the bytes at `ranges` (offset, length; in order, within the blob) of the blob.
    pub fn select(self, ranges: &[(u64, u64)]) -> io::Result<Self> {
        let mut runs = Vec::new();
        let mut len = 0u64;
        for &(offset, n) in ranges {
            let end = offset
                .checked_add(n)
                .filter(|e| *e <= self.len)
                .ok_or_else(|| damaged(format!("a range ends past the blob's {} bytes", self.len)))?;
            let mut run_start = 0u64;
            for run in &self.runs {
                let run_end = run_start + run.len;
                let (from, to) = (offset.max(run_start), end.min(run_end));
                if from < to {
                    runs.push(Run {
                        path: run.path.clone(),
                        file: run.file.try_clone()?,
                        offset: run.offset + (from - run_start),
                        len: to - from,
                    });
                }
                run_start = run_end;
            }
            len += n;
        }
        Ok(Self {
            runs,
            len,
            origin: None,
        })
    }

    /// The blob's size.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the blob has no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `buf` with the blob's bytes from `offset` (blocking reads).
    pub fn read_exact_at(&self, mut buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut run_start = 0u64;
        let mut at = offset;
        for run in &self.runs {
            let run_end = run_start + run.len;
            if !buf.is_empty() && at < run_end {
                let within = at - run_start;
                let n = buf.len().min((run.len - within) as usize);
                let (now, rest) = buf.split_at_mut(n);
                run.file.read_exact_at(now, run.offset + within)?;
                (buf, at) = (rest, at + n as u64);
            }
            run_start = run_end;
        }
        if buf.is_empty() {
            Ok(())
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    }

    /// Copies every byte to `out` (blocking reads).
    pub fn copy_to(&self, out: &mut dyn Write) -> io::Result<u64> {
        self.copy_from_to(0, out)
    }

    /// Copies the bytes from `first` on to `out` (blocking reads); returns the blob's length.
    pub fn copy_from_to(&self, first: u64, out: &mut dyn Write) -> io::Result<u64> {
        let mut buf = vec![0u8; CHUNK as usize];
        let mut run_start = 0u64;
        for run in &self.runs {
            let mut at = first.saturating_sub(run_start).min(run.len);
            run_start += run.len;
            while at < run.len {
                let want = (run.len - at).min(CHUNK) as usize;
                let n = run.file.read_at(&mut buf[..want], run.offset + at)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                out.write_all(&buf[..n])?;
                at += n as u64;
            }
        }
        Ok(self.len)
    }

    /// The bytes as a stream of chunks, read on the blocking pool. A file shorter than its
    /// run ends the stream with an error (never a short blob that looks whole).
    pub fn chunks(self) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
        let runs = Arc::new(self.runs);
        futures_util::stream::unfold(Some((0usize, 0u64)), move |at| {
            let runs = runs.clone();
            async move {
                let (mut i, mut pos) = at?;
                while runs.get(i).is_some_and(|r| pos == r.len) {
                    (i, pos) = (i + 1, 0);
                }
                runs.get(i)?;
                let read = tokio::task::spawn_blocking(move || {
                    let run = &runs[i];
                    let mut buf = vec![0u8; (run.len - pos).min(CHUNK) as usize];
                    let n = run.file.read_at(&mut buf, run.offset + pos)?;
                    if n == 0 {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                    }
                    buf.truncate(n);
                    Ok(Bytes::from(buf))
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
                match read {
                    Ok(b) => {
                        let next = (i, pos + b.len() as u64);
                        Some((Ok(b), Some(next)))
                    }
                    Err(e) => Some((Err(e), None)),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn recipe(runs: &[(&str, u64, u64)]) -> Recipe {
        Recipe {
            runs: runs
                .iter()
                .map(|(f, o, l)| RecipeRun {
                    file: f.to_string(),
                    offset: *o,
                    len: *l,
                })
                .collect(),
            origin: None,
        }
    }

    #[tokio::test]
    async fn runs_read_as_one_blob_both_ways() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"0123456789").unwrap();
        std::fs::write(d.path().join("b"), vec![b'x'; 600_000]).unwrap();
        let r = recipe(&[("a", 2, 3), ("b", 0, 600_000), ("a", 9, 1)]);
        std::fs::write(d.path().join(RECIPE), serde_json::to_vec(&r).unwrap()).unwrap();
        let blob = BlobFile::open(d.path()).unwrap().unwrap();
        assert_eq!(blob.len(), 600_004);
        let mut copied = Vec::new();
        blob.copy_to(&mut copied).unwrap();
        let mut expected = b"234".to_vec();
        expected.extend(vec![b'x'; 600_000]);
        expected.push(b'9');
        assert_eq!(copied, expected);
        let streamed: Vec<u8> = blob.chunks().map(|c| c.unwrap().to_vec()).concat().await;
        assert_eq!(streamed, expected);

        let blob = BlobFile::open(d.path()).unwrap().unwrap();
        let picked = blob.select(&[(1, 4), (600_002, 2)]).unwrap();
        let mut out = Vec::new();
        picked.copy_to(&mut out).unwrap();
        assert_eq!(out, b"34xxx9");
        let blob = BlobFile::open(d.path()).unwrap().unwrap();
        // Read at any offset, across runs.
        for (offset, n) in [
            (0usize, 600_004usize),
            (1, 3),
            (2, 5),
            (599_999, 5),
            (600_003, 1),
            (600_004, 0),
        ] {
            let mut buf = vec![0u8; n];
            blob.read_exact_at(&mut buf, offset as u64).unwrap();
            assert_eq!(buf, expected[offset..offset + n], "{offset}+{n}");
        }
        assert!(blob.read_exact_at(&mut [0u8; 2], 600_003).is_err(), "past the end");
        assert!(blob.select(&[(600_000, 5)]).is_err());
    }

    #[tokio::test]
    async fn a_recipe_that_leads_out_or_past_its_files_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"0123").unwrap();
        for bad in [
            recipe(&[("../a", 0, 1)]),
            recipe(&[("a", 3, 2)]),
            recipe(&[("a", u64::MAX, 2)]),
        ] {
            assert!(BlobFile::from_recipe(d.path(), &bad).is_err(), "{bad:?}");
        }
        // A file cut short behind the store's back ends the stream with an error.
        let blob = BlobFile::from_recipe(d.path(), &recipe(&[("a", 0, 4)])).unwrap();
        std::fs::write(d.path().join("a"), b"01").unwrap();
        let chunks: Vec<io::Result<Bytes>> = blob.chunks().collect().await;
        assert!(chunks.iter().any(|c| c.is_err()));
        assert!(BlobFile::open(&d.path().join("missing")).unwrap().is_none());
    }
}
