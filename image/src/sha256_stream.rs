//! Readers and writers that take the OCI digest (`sha256:<hex>`) and the length of what
//! passes through them, so a blob is hashed while it streams instead of in a second pass.

use std::io::{Read, Write};

use sha2::{Digest, Sha256};

/// Wraps a reader or a writer; see the `Read` and `Write` impls.
#[derive(Debug)]
pub struct Sha256Stream<T> {
    inner: T,
    sha: Sha256,
    len: u64,
}

impl<T> Sha256Stream<T> {
    /// Starts hashing what goes through `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            sha: Sha256::new(),
            len: 0,
        }
    }

    /// `sha256:<hex>` of everything so far.
    pub fn digest(&self) -> String {
        format!("sha256:{:x}", self.sha.clone().finalize())
    }

    /// How many bytes went through.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing went through yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The wrapped reader or writer.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Gives the wrapped reader or writer back.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<R: Read> Read for Sha256Stream<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Sha256Stream<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_directions_give_the_oci_digest_and_length() {
        let data = b"layer bytes";
        let want = format!("sha256:{:x}", Sha256::digest(data));
        let mut r = Sha256Stream::new(&data[..]);
        std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        assert_eq!((r.digest(), r.len()), (want.clone(), 11));
        let mut w = Sha256Stream::new(Vec::new());
        w.write_all(data).unwrap();
        assert_eq!((w.digest(), w.len()), (want, 11));
        assert_eq!(w.into_inner(), data);
    }
}
