//! The one place stored values are encoded: bincode 2 behind a format byte, so the codec can
//! be swapped (bincode 3 is a tombstone) and old records recognised instead of misread.
//!
//! Format 2 types explain's file changes (`ChangeKind`) where format 1 kept a string; only
//! build records hold them, so only they have a format-1 reader ([`build_v1`]). Format 3
//! adds a build record's `failure`, after its other fields. Every other value has the same
//! bytes in all three. Values are always written in the newest format.

mod build_v1;

use lcache_proto::sources_digest::{DirNode, SummaryEntry};
use lcache_proto::wire::{BuildRecord, ImageRecord, StepRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::{BlobMeta, CachedDigest, TokenRecord};

/// The first format: file changes as strings.
pub const FORMAT_V1: u8 = 1;
/// Explain's file changes typed; build records without `failure`.
pub const FORMAT_V2: u8 = 2;
/// The format values are written in.
pub const FORMAT_V3: u8 = 3;

/// A value the store keeps, and how it is read from an older format.
pub trait Stored: Serialize + DeserializeOwned {
    /// Reads a value written in format 1 (by default, its bytes are unchanged since).
    fn from_v1(body: &[u8]) -> Result<Self, CodecError> {
        body_of(body)
    }
    /// Reads a value written in format 2 (by default, its bytes are unchanged since).
    fn from_v2(body: &[u8]) -> Result<Self, CodecError> {
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
    fn from_v2(body: &[u8]) -> Result<Self, CodecError> {
        // Bincode records fields in order and nothing else: a format-2 record is a format-3
        // one up to its new last field, `failure`, whose `None` is the single byte 0.
        let mut whole = Vec::with_capacity(body.len() + 1);
        whole.extend_from_slice(body);
        whole.push(0);
        body_of(&whole)
    }
}

/// Why a stored value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value was written by a format this daemon does not know.
    #[error("stored value has format {found}, this lcached reads formats {FORMAT_V1} to {FORMAT_V3} — use the lcached version that wrote the store, or start with a fresh --store")]
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
    let mut out = vec![FORMAT_V3];
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
        Some((&FORMAT_V3, body)) => body_of(body),
        Some((&FORMAT_V2, body)) => T::from_v2(body),
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

    /// A build record as format 2 wrote it: every field of today's but `failure`.
    #[derive(serde::Serialize)]
    struct BuildRecordV2 {
        id: String,
        started_at_ms: u64,
        finished_at_ms: u64,
        dockerfile: String,
        context: String,
        target: Option<String>,
        steps: Vec<lcache_proto::wire::BuildStep>,
        dockerfile_path: String,
        dockerignore: String,
        cascades: Vec<lcache_proto::explain::Cascade>,
        image: String,
    }

    #[test]
    fn format_2_build_records_read_as_builds_that_did_not_fail_and_failures_round_trip() {
        use lcache_proto::explain::MissCause;
        use lcache_proto::wire::{BuildFailure, BuildStep};
        let step = BuildStep {
            stage: 0,
            line: 3,
            instruction: "RUN make".into(),
            key: "k".into(),
            cached: false,
            duration_ms: 7,
            saved_ms: 0,
            cause: Some(MissCause::NeverBuilt),
            inputs: None,
            compared_with: Some("old".into()),
        };
        let v2 = BuildRecordV2 {
            id: "b2".into(),
            started_at_ms: 1,
            finished_at_ms: 2,
            dockerfile: "Dockerfile".into(),
            context: "/ctx".into(),
            target: Some("app".into()),
            steps: vec![step.clone()],
            dockerfile_path: "/ctx/Dockerfile".into(),
            dockerignore: "d".into(),
            cascades: vec![],
            image: "sha256:11".into(),
        };
        let mut bytes = vec![FORMAT_V2];
        bytes.extend(bincode::serde::encode_to_vec(&v2, config()).unwrap());
        let read: BuildRecord = decode(&bytes).unwrap();
        assert_eq!(read.steps, vec![step.clone()]);
        assert_eq!(
            (read.image.as_str(), read.target.as_deref()),
            ("sha256:11", Some("app"))
        );
        assert_eq!(read.failure, None);
        assert_eq!(decode::<BuildRecord>(&encode(&read)).unwrap(), read);

        let failed = BuildRecord {
            failure: Some(BuildFailure {
                step: Some(step),
                message: "Dockerfile:3: RUN make: the command exited with code 2".into(),
            }),
            ..read
        };
        assert_eq!(decode::<BuildRecord>(&encode(&failed)).unwrap(), failed);
    }
}
