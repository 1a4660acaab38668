//! A layer kept as its tar compressed with zstd where it leaves the machine (`--output
//! type=oci,compression=zstd`, as BuildKit's exporters offer it): one zstd frame, compressed
//! on every core, hashed as it is written, so the blob's digest needs no second pass.

use std::io::{self, Write};

use crate::sha256_stream::Sha256Stream;

/// The level BuildKit and zstd use by default: ~gzip -6's ratio at several times its speed.
const LEVEL: i32 = 3;

/// Compresses what is written to it into `out`; [`ZstdLayer::finish`] gives the blob's
/// digest and size.
pub struct ZstdLayer<W: Write> {
    encoder: zstd::stream::write::Encoder<'static, Sha256Stream<W>>,
}

impl<W: Write> ZstdLayer<W> {
    /// Starts a frame over `out`, its blocks compressed by one worker per core.
    pub fn new(out: W) -> io::Result<Self> {
        let mut encoder = zstd::stream::write::Encoder::new(Sha256Stream::new(out), LEVEL)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        encoder.multithread(cores)?;
        // The size is unknown until the end: streamed, not set in the frame header.
        encoder.include_checksum(true)?;
        Ok(Self { encoder })
    }

    /// Ends the frame: the writer back, and the blob's `sha256:` digest and size.
    pub fn finish(self) -> io::Result<(W, String, u64)> {
        let hashed = self.encoder.finish()?;
        let (digest, len) = (hashed.digest(), hashed.len());
        Ok((hashed.into_inner(), digest, len))
    }
}

impl<W: Write> Write for ZstdLayer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.encoder.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.encoder.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_compresses_to_one_frame_that_decodes_to_its_tar_and_is_named_by_its_bytes() {
        let tar: Vec<u8> = (0..3_000_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let mut z = ZstdLayer::new(Vec::new()).unwrap();
        for chunk in tar.chunks(100_000) {
            z.write_all(chunk).unwrap();
        }
        let (blob, digest, len) = z.finish().unwrap();
        assert_eq!(len, blob.len() as u64);
        assert!(blob.len() < tar.len() / 10);
        assert_eq!(digest, crate::oci_image::sha256_of(&blob));
        assert_eq!(zstd::decode_all(&blob[..]).unwrap(), tar);
        // The magic every zstd frame starts with: what readers sniff.
        assert_eq!(blob[..4], [0x28, 0xb5, 0x2f, 0xfd]);
    }
}
