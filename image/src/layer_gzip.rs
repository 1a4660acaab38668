//! A layer kept as its tar (`--layer-compression none`) gzipped where it leaves the machine:
//! cut into runs of [`RUN`] bytes, each its own gzip member compressed by libdeflate on
//! every core, written in order (a multi-member gzip is one valid stream for registries,
//! `docker pull` and `skopeo`). The cuts depend only on the offsets, so one tar always
//! gives one blob, whoever compresses it.

use std::io::{self, Write};

use crate::layer_segments::ReadAt;
use crate::ordered_workers::{in_order, workers};

/// How many bytes of the tar each member holds: small enough that a few per core wait in
/// memory, big enough that the ratio is gzip's own (its window is 32 KiB).
pub const RUN: u64 = 1 << 20;

thread_local! {
    /// Each thread's libdeflate compressor and output buffer: allocated once, not per member.
    static COMPRESSOR: (std::cell::RefCell<libdeflater::Compressor>, std::cell::RefCell<Vec<u8>>) = (
        std::cell::RefCell::new(libdeflater::Compressor::new(
            libdeflater::CompressionLvl::new(1).unwrap_or_else(|_| libdeflater::CompressionLvl::fastest()),
        )),
        std::cell::RefCell::new(Vec::new()),
    );
}

/// Writes `bytes` to `out` as one gzip member (libdeflate, level 1, a fixed header).
pub fn gzip_member(bytes: &[u8], out: &mut dyn Write) -> io::Result<()> {
    COMPRESSOR.with(|c| {
        let (mut c, mut buf) = (c.0.borrow_mut(), c.1.borrow_mut());
        // Grown, never shrunk or zeroed again: each member only writes what it fills.
        let bound = c.gzip_compress_bound(bytes.len());
        if buf.len() < bound {
            buf.resize(bound, 0);
        }
        let n = c
            .gzip_compress(bytes, &mut buf[..bound])
            .map_err(|_| io::Error::other("a member did not fit its compression bound"))?;
        out.write_all(&buf[..n])
    })
}

/// A tar gzipped: how long the gzip blob is, and the tar's own digest as it was read (its
/// diff_id, which the caller checks: a stored tar damaged since it was named must not
/// reach a registry under its old name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GzippedTar {
    /// The gzip blob's length.
    pub size: u64,
    /// `sha256:` of the tar read.
    pub tar_digest: String,
}

/// Gzips the tar of `len` bytes that `read` reads into `out`.
pub fn gzip_tar(read: &ReadAt<'_>, len: u64, out: &mut dyn Write) -> io::Result<GzippedTar> {
    let runs: Vec<(u64, u64)> = (0..len.div_ceil(RUN))
        .map(|i| (i * RUN, RUN.min(len - i * RUN)))
        .collect();
    let mut counted = Counted { inner: out, n: 0 };
    let mut tar_sha = crate::sha256_stream::Sha256Stream::new(io::sink());
    if runs.is_empty() {
        gzip_member(&[], &mut counted)?;
    }
    let compress = |&(at, n): &(u64, u64)| -> io::Result<(Vec<u8>, Vec<u8>)> {
        let mut tar = vec![0; n as usize];
        read(&mut tar, at)?;
        let mut member = Vec::with_capacity(n as usize / 2);
        gzip_member(&tar, &mut member)?;
        Ok((tar, member))
    };
    in_order(&runs, workers(), &compress, |fetched| {
        for _ in &runs {
            let (tar, member) = fetched.take()?;
            tar_sha.write_all(&tar)?;
            counted.write_all(&member)?;
        }
        Ok(())
    })?;
    Ok(GzippedTar {
        size: counted.n,
        tar_digest: tar_sha.digest(),
    })
}

/// Counts what passes through.
struct Counted<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gzipped(tar: &[u8]) -> Vec<u8> {
        let read = |buf: &mut [u8], at: u64| {
            let from = tar
                .get(at as usize..at as usize + buf.len())
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(from);
            Ok(())
        };
        let mut out = Vec::new();
        let g = gzip_tar(&read, tar.len() as u64, &mut out).unwrap();
        assert_eq!(g.size, out.len() as u64);
        assert_eq!(g.tar_digest, crate::oci_image::sha256_of(tar));
        out
    }

    #[test]
    fn the_members_inflate_to_the_tar_and_the_same_tar_gives_the_same_blob() {
        for len in [0, 1, 1024, RUN as usize, RUN as usize * 3 + 517] {
            let tar: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8 ^ (i >> 12) as u8).collect();
            let gz = gzipped(&tar);
            let mut back = Vec::new();
            flate2::read::MultiGzDecoder::new(&gz[..])
                .read_to_end(&mut back)
                .unwrap();
            assert!(back == tar, "{len} bytes");
            assert_eq!(gz, gzipped(&tar), "{len} bytes: deterministic");
        }
    }

    #[test]
    fn a_tar_that_cannot_be_read_whole_is_an_error() {
        let read = |_: &mut [u8], at: u64| {
            if at >= RUN {
                Err(io::Error::other("gone"))
            } else {
                Ok(())
            }
        };
        assert!(gzip_tar(&read, RUN * 4, &mut Vec::new()).is_err());
    }
}
