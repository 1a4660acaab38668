//! The length-prefixed byte encoding that every digest in lcache is taken over, as
//! `docs/cache-keys.md` specifies byte by byte. Nothing here may change without bumping
//! [`crate::cache_key::KEY_SCHEME_VERSION`].

/// Builds an encoding: strings and byte strings are prefixed by their length as a u64
/// little-endian, lists by their item count as a u64 little-endian.
#[derive(Debug, Default, Clone)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty encoding.
    pub fn new() -> Self {
        Self::default()
    }

    /// `u32 LE`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// `u64 LE` length, then the bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(b);
        self
    }

    /// A UTF-8 string, as [`Encoder::bytes`].
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// `u64 LE` count, then each string.
    pub fn list<S: AsRef<str>>(&mut self, items: &[S]) -> &mut Self {
        self.buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
        for s in items {
            self.str(s.as_ref());
        }
        self
    }

    /// A raw 32-byte digest, no prefix (its length is fixed).
    pub fn digest(&mut self, d: &[u8; 32]) -> &mut Self {
        self.buf.extend_from_slice(d);
        self
    }

    /// The bytes so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// BLAKE3 of the bytes so far.
    pub fn finish(&self) -> [u8; 32] {
        *blake3::hash(&self.buf).as_bytes()
    }
}

/// Lower-case hex of a digest.
pub fn hex(d: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*d).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_lists_are_length_prefixed_little_endian() {
        let mut e = Encoder::new();
        e.str("ab").list(&["c"]).u32(1);
        assert_eq!(
            e.as_bytes(),
            [2, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, b'c', 1, 0, 0, 0]
        );
    }

    #[test]
    fn concatenations_that_would_collide_unprefixed_do_not() {
        let a = Encoder::new().str("ab").str("c").finish();
        let b = Encoder::new().str("a").str("bc").finish();
        assert_ne!(a, b);
    }
}
