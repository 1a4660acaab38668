//! The one place stored values are encoded: bincode 2 behind a format byte, so the codec can
//! be swapped (bincode 3 is a tombstone) and old records recognised instead of misread.
//!
//! Format 2 types explain's file changes (`ChangeKind`) where format 1 kept a string; only
//! build records hold them, so only they have a format-1 reader ([`build_v1`]); every other
//! value has the same bytes in both. Values are always written in the newest format.

mod build_v1;

use lcache_proto::sources_digest::{DirNode, SummaryEntry};
use lcache_proto::wire::{BuildRecord, ImageRecord, StepRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::{BlobMeta, CachedDigest, TokenRecord};

/// The first format: file changes as strings.
pub const FORMAT_V1: u8 = 1;
/// The format values are written in.
pub const FORMAT_V2: u8 = 2;

/// A value the store keeps, and how it is read from an older format.
pub trait Stored: Serialize + DeserializeOwned {
    /// Reads a value written in format 1 (by default, its bytes are unchanged since).
    fn from_v1(body: &[u8]) -> Result<Self, CodecError> {
        body_of(body)
    }
}

impl Stored for StepRecord {}
impl Stored for ImageRecord {}
impl Stored for BlobMeta {}
impl Stored for CachedDigest {}
impl Stored for Vec<(String, CachedDigest)> {}
impl Stored for Vec<SummaryEntry> {}
impl Stored for DirNode {}
impl Stored for TokenRecord {}

impl Stored for BuildRecord {
    fn from_v1(body: &[u8]) -> Result<Self, CodecError> {
        body_of::<build_v1::BuildRecord>(body).map(Into::into)
    }
}

/// Why a stored value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value was written by a format this daemon does not know.
    #[error("stored value has format {found}, this lcached reads formats {FORMAT_V1} to {FORMAT_V2} — use the lcached version that wrote the store, or start with a fresh --store")]
    UnknownFormat {
        /// The format byte found.
        found: u8,
    },
    /// The bytes are not a valid value.
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `v` with the format byte.
pub fn encode<T: Stored>(v: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_V2];
    // Encoding into a Vec only fails for types serde cannot describe, which ours are not.
    if let Ok(body) = bincode::serde::encode_to_vec(v, config()) {
        out.extend_from_slice(&body);
    }
    out
}

fn body_of<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    bincode::serde::decode_from_slice(body, config())
        .map(|(v, _)| v)
        .map_err(|e| CodecError::Corrupt(e.to_string()))
}

/// Decodes a value written by [`encode`], in this format or an older one.
pub fn decode<T: Stored>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        Some((&FORMAT_V2, body)) => body_of(body),
        Some((&FORMAT_V1, body)) => T::from_v1(body),
        Some((&found, _)) => Err(CodecError::UnknownFormat { found }),
        None => Err(CodecError::Corrupt("empty value".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lcache_proto::wire::{LayerRef, StepRecord};

    #[test]
    fn records_round_trip_and_unknown_formats_are_named() {
        let r = StepRecord {
            key: "k".into(),
            layer: Some(LayerRef {
                digest: "sha256:00".into(),
                blake3: "b".into(),
                size: 3,
                diff_id: String::new(),
                media_type: "m".into(),
            }),
            duration_ms: 5,
            inputs: None,
            created_at_ms: 9,
        };
        let bytes = encode(&r);
        assert_eq!(decode::<StepRecord>(&bytes).unwrap(), r);
        let mut other = bytes.clone();
        other[0] = 7;
        assert!(matches!(
            decode::<StepRecord>(&other),
            Err(CodecError::UnknownFormat { found: 7 })
        ));
        assert!(matches!(decode::<StepRecord>(&bytes[..3]), Err(CodecError::Corrupt(_))));
    }
}
