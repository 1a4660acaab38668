//! A reader that also writes what it reads to a writer: a layer's bytes kept (or hashed)
//! while they are being read for something else.

use std::io::{Read, Write};

/// Reads through `inner`, copying what it reads to `out` when there is one.
pub(crate) struct ReadTee<R, W> {
    /// What is read.
    pub(crate) inner: R,
    /// Where a copy goes.
    pub(crate) out: Option<W>,
}

impl<R: Read, W: Write> Read for ReadTee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(w) = self.out.as_mut() {
            w.write_all(&buf[..n])?;
        }
        Ok(n)
    }
}
