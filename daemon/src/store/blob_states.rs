//! A stored blob's SHA-256 state every [`EVERY`] bytes, kept beside it, so that a blob
//! uploaded as parts whose front is its base's front (a re-run COPY's) is checked from
//! where the two part instead of from its first byte. A state is a function of the blob's
//! bytes alone, so a kept one is never stale; a damaged one only costs a check from the
//! start (the caller checks again from there before it refuses anything).

use std::io::{self, Write};

use sha2_resumable::digest::common::hazmat::{SerializableState, SerializedState};
use sha2_resumable::{Digest, Sha256};

/// How far apart the kept states are: resuming hashes at most this much of the shared
/// front again, and a 300 MB blob keeps 75 states.
pub const EVERY: u64 = 4 << 20;

/// The length of one serialized state.
pub fn state_len() -> usize {
    Sha256::new().serialize().len()
}

/// A SHA-256 of a blob from its start (or from a kept state), keeping its state at every
/// multiple of [`EVERY`].
pub struct GridSha {
    sha: Sha256,
    at: u64,
    states: Vec<u8>,
    /// Offsets still to take the state at, ascending (see [`GridSha::marking`]).
    marks: std::collections::VecDeque<u64>,
    /// The states taken at them.
    marked: Vec<Vec<u8>>,
}

impl Default for GridSha {
    fn default() -> Self {
        Self {
            sha: Sha256::new(),
            at: 0,
            states: Vec::new(),
            marks: Default::default(),
            marked: Vec::new(),
        }
    }
}

impl GridSha {
    /// Resumed at `n * EVERY` from the first `n` of `states` (a blob's kept states, whose
    /// first bytes the blob being hashed shares).
    pub fn resume(states: &[u8], n: usize) -> io::Result<Self> {
        if n == 0 {
            return Ok(Self::default());
        }
        let len = state_len();
        let kept = states
            .get(..n * len)
            .ok_or_else(|| io::Error::other("fewer SHA-256 states kept than asked for"))?;
        let last = SerializedState::<Sha256>::try_from(&kept[(n - 1) * len..])
            .map_err(|_| io::Error::other("a kept SHA-256 state is malformed"))?;
        let sha = Sha256::deserialize(&last).map_err(|_| io::Error::other("a kept SHA-256 state is malformed"))?;
        Ok(Self {
            sha,
            at: n as u64 * EVERY,
            states: kept.to_vec(),
            ..Self::default()
        })
    }

    /// Also takes the state at each of `marks` (ascending, none before [`Self::at`]):
    /// [`Self::marked`] has them once hashed past.
    pub fn marking(mut self, marks: &[u64]) -> Self {
        self.marks = marks.iter().copied().collect();
        self.take_marks();
        self
    }

    /// The states taken at the marks hashed past so far, in order.
    pub fn marked(&self) -> &[Vec<u8>] {
        &self.marked
    }

    fn take_marks(&mut self) {
        while self.marks.front().is_some_and(|m| *m <= self.at) {
            if self.marks.pop_front() == Some(self.at) {
                self.marked.push(self.sha.serialize().to_vec());
            }
        }
    }

    /// How many bytes it has hashed, counting a resumed front.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// `sha256:<hex>`, and the states kept (concatenated).
    pub fn finish(self) -> (String, Vec<u8>) {
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&self.sha.finalize());
        (
            format!("sha256:{}", lcache_proto::key_encoding::hex(&digest)),
            self.states,
        )
    }
}

impl Write for GridSha {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        while !buf.is_empty() {
            let to_mark = self.marks.front().map_or(u64::MAX, |m| m - self.at);
            let to_next = (EVERY - self.at % EVERY).min(to_mark).min(buf.len() as u64) as usize;
            self.sha.update(&buf[..to_next]);
            self.at += to_next as u64;
            if self.at.is_multiple_of(EVERY) {
                self.states.extend_from_slice(&self.sha.serialize());
            }
            self.take_marks();
            buf = &buf[to_next..];
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How many of a blob's kept `states` a blob that shares its first `front` bytes can
/// resume from.
pub fn usable(states: &[u8], front: u64) -> usize {
    ((front / EVERY) as usize).min(states.len() / state_len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn a_hash_resumed_from_a_kept_state_is_the_hash_from_the_start_with_the_same_states() {
        let base = bytes(3 * EVERY as usize + 12_345, 1);
        let mut whole = GridSha::default();
        // Written in pieces that straddle the grid.
        for piece in base.chunks(1_000_003) {
            whole.write_all(piece).unwrap();
        }
        let (digest, states) = whole.finish();
        use sha2::Digest as _;
        assert_eq!(digest, format!("sha256:{:x}", sha2::Sha256::digest(&base)));
        assert_eq!(states.len(), 3 * state_len());

        // A blob that shares the first 2.5 grid steps, then differs.
        let mut other = base[..(2 * EVERY + EVERY / 2) as usize].to_vec();
        other.extend_from_slice(&bytes(EVERY as usize * 2, 9));
        let n = usable(&states, 2 * EVERY + EVERY / 2);
        assert_eq!(n, 2);
        let mut resumed = GridSha::resume(&states, n).unwrap();
        assert_eq!(resumed.at(), 2 * EVERY);
        resumed.write_all(&other[(2 * EVERY) as usize..]).unwrap();
        let mut scratch = GridSha::default();
        scratch.write_all(&other).unwrap();
        assert_eq!(resumed.finish(), scratch.finish());
    }

    #[test]
    fn the_states_at_marks_are_those_of_hashing_up_to_them() {
        let data = bytes(2 * EVERY as usize + 999, 5);
        let marks = [0, 1, 4096, EVERY, EVERY + 7, 2 * EVERY + 999];
        let mut h = GridSha::default().marking(&marks);
        for piece in data.chunks(777_777) {
            h.write_all(piece).unwrap();
        }
        let expected: Vec<Vec<u8>> = marks
            .iter()
            .map(|&m| {
                let mut s = Sha256::new();
                s.update(&data[..m as usize]);
                s.serialize().to_vec()
            })
            .collect();
        assert_eq!(h.marked(), expected);
        // Marks in front of a resumed hash are never taken.
        let (_, states) = h.finish();
        let resumed = GridSha::resume(&states, 1).unwrap().marking(&[5, EVERY + 1]);
        assert!(resumed.marked().is_empty());
    }

    #[test]
    fn kept_states_that_are_short_or_malformed_are_refused() {
        let mut h = GridSha::default();
        h.write_all(&bytes(EVERY as usize, 3)).unwrap();
        let (_, states) = h.finish();
        assert!(GridSha::resume(&states, 2).is_err());
        assert!(GridSha::resume(&states[..states.len() - 1], 1).is_err());
        assert_eq!(usable(&states[..states.len() - 1], u64::MAX), 0);
    }
}
