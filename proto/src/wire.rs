//! The types the client and the daemon exchange over HTTP (JSON) and that the daemon keeps
//! in its store. Stored types are plain structs (no flattening, no tagged enums) so the
//! binary codec can carry them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::build_plan::{BaseImages, BuildPlan, PlanRequest};
use crate::cache_key::KeyInputs;
use crate::errors::DockerfileError;
use crate::explain::{Cascade, MissCause};
use crate::platform::Platform;
use crate::step_keys::StepKey;

/// What to plan: the inputs of `lcache keys`, `plan` and `build`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanInputs {
    /// The Dockerfile's name as the user gave it (for messages).
    pub dockerfile_name: String,
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// The Dockerfile's absolute path, when it is a file (matches builds across spellings).
    #[serde(default)]
    pub dockerfile_path: String,
    /// The build context directory, absolute.
    pub context: String,
    /// `--build-arg` values.
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    #[serde(default)]
    pub target: Option<String>,
    /// `os/arch[/variant]`.
    pub platform: String,
    /// List every selected file per step (otherwise the first few and a count).
    #[serde(default)]
    pub all_files: bool,
}

impl PlanInputs {
    /// The front end's view of these inputs.
    pub fn plan_request<'a>(&'a self, bases: &'a dyn BaseImages) -> Result<PlanRequest<'a>, DockerfileError> {
        let platform = Platform::parse(&self.platform).ok_or_else(|| {
            DockerfileError::new(
                &self.dockerfile_name,
                1,
                1,
                format!("invalid platform '{}'", self.platform),
                "write os/arch[/variant], e.g. linux/amd64",
            )
        })?;
        Ok(PlanRequest {
            build_args: &self.build_args,
            target: self.target.as_deref(),
            platform,
            bases,
        })
    }
}

/// How many selected files a report lists per step unless all are asked for.
pub const FILES_LISTED: usize = 10;

/// How many of a context's newest builds a build is compared with (its misses' causes, a
/// re-run COPY's seed): lcached keeps the directory listings those builds refer to.
pub const HISTORY_COMPARED: usize = 50;

/// Every needed step's key and inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysReport {
    /// The Dockerfile's name.
    pub dockerfile: String,
    /// The context directory.
    pub context: String,
    /// The target platform.
    pub platform: String,
    /// Things the user should know.
    pub warnings: Vec<String>,
    /// How many context files were read to answer.
    pub hashed_files: usize,
    /// Steps in build order.
    pub steps: Vec<StepKey>,
}

impl KeysReport {
    /// Keeps at most [`FILES_LISTED`] files per step (`files_total` still counts them all).
    pub fn truncate_files(&mut self) {
        for s in &mut self.steps {
            s.files.truncate(FILES_LISTED);
        }
    }
}

/// How the daemon keeps a context's index fresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextIndexStatus {
    /// The context directory.
    pub root: String,
    /// `watching` (a notify watcher marks changes) or `stat-walk` (every plan re-stats).
    pub mode: String,
    /// Why watching is not possible, when it is not.
    pub reason: Option<String>,
    /// Entries after `.dockerignore`.
    pub entries: usize,
    /// Files whose digest the index holds.
    pub digests: usize,
}

/// `POST /v1/plan` answer: keys, and which are in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanResponse {
    /// The keys.
    pub report: KeysReport,
    /// Per step: `Some(true)` a hit, `Some(false)` a miss, `None` pending.
    pub cached: Vec<Option<bool>>,
    /// Per step: why a predicted miss would rebuild (filled in by the client from history).
    #[serde(default)]
    pub causes: Vec<Option<MissCause>>,
    /// The context index after this plan.
    pub context: ContextIndexStatus,
    /// The plan these keys were derived from: a build executes exactly this plan, so the
    /// front end runs once per command.
    #[serde(default)]
    pub plan: Option<BuildPlan>,
    /// Keys of steps whose record was evicted (`--max-size`): their misses are "evicted".
    #[serde(default)]
    pub evicted: Vec<String>,
}

/// A layer blob as a step record refers to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// OCI digest of the blob as stored (`sha256:…`): its name in the blob store.
    pub digest: String,
    /// BLAKE3 of the same bytes (filled in by the daemon from the upload).
    #[serde(default)]
    pub blake3: String,
    /// Size in bytes (filled in by the daemon).
    #[serde(default)]
    pub size: u64,
    /// OCI diff_id: sha256 of the uncompressed layer.
    #[serde(default)]
    pub diff_id: String,
    /// OCI media type.
    #[serde(default)]
    pub media_type: String,
}

/// The OCI media type of gzip layers.
pub const GZIP_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The OCI media type of uncompressed layers: the blob is the tar, its digest the diff_id.
pub const TAR_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// The OCI media type of zstd layers: only ever written by an export that asks for them
/// (`--output type=oci,compression=zstd`), never kept.
pub const ZSTD_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// How a layer's blob is kept (`lcache build --layer-compression`). Its `Default` is what
/// a stored value written before the field existed means (gzip), not what a build uses
/// (`none`, the client's default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerCompression {
    /// gzip, one member per segment: what registries and `docker load` take as they are.
    #[default]
    Gzip,
    /// The tar itself: nothing compressed on the build path, the digest is the diff_id;
    /// compressed where the layer leaves the machine (a push).
    None,
}

impl LayerCompression {
    /// The OCI media type of a layer kept this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Gzip => GZIP_LAYER_MEDIA_TYPE,
            Self::None => TAR_LAYER_MEDIA_TYPE,
        }
    }

    /// How a layer of `media_type` is kept (`None` when it is neither gzip nor a plain tar).
    pub fn of_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            GZIP_LAYER_MEDIA_TYPE | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Self::Gzip),
            TAR_LAYER_MEDIA_TYPE | "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
            _ => None,
        }
    }
}

/// The content type of a blob uploaded as parts (`PUT /v1/blobs/{digest}`): a big-endian
/// `u64` length, that many bytes of JSON [`BlobParts`], then the bytes of its `Sent` parts in
/// order. A re-run COPY's blob is mostly its predecessor's gzip members: only the new ones
/// travel, and the daemon keeps the rest as references to the stored blob.
pub const BLOB_PARTS_TYPE: &str = "application/vnd.lcache.blob-parts.v1";

/// How a blob uploaded as parts is made, front to back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobParts {
    /// The stored blob whose bytes the `Base` parts are (`sha256:…`).
    pub base: String,
    /// The runs of bytes, in blob order.
    pub parts: Vec<BlobPart>,
}

/// One run of bytes of a blob uploaded as parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobPart {
    /// `len` bytes of the base blob from `offset`.
    Base {
        /// Where the run starts in the base blob.
        offset: u64,
        /// How long it is.
        len: u64,
    },
    /// The next `len` bytes of the request body.
    Sent {
        /// How long it is.
        len: u64,
    },
}

/// The body of `POST /v1/layers/linked` (the daemon's Unix socket only): a tar layer
/// (`--layer-compression none`) made of runs of files on the daemon's machine — the
/// client's snapshot files and a file of the tar's headers. The daemon hard-links each file
/// into its store (copies it where it cannot), checks each is a regular file of the stated
/// size, and names the whole by hashing it (a [`NamedLayer`], with the states at `marks`):
/// the layer's bytes are kept once, as the snapshot's files, and hashed once, there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkedBlob {
    /// The files, by absolute path.
    pub files: Vec<LinkedFile>,
    /// The blob, front to back.
    pub runs: Vec<LinkedRun>,
    /// Where in the blob (ascending) the SHA-256's state is wanted back: each segment's
    /// end, for the next edit of the step to resume from.
    #[serde(default)]
    pub marks: Vec<u64>,
}

/// A file a linked blob reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkedFile {
    /// Its absolute path.
    pub path: String,
    /// Its size.
    pub size: u64,
}

/// `len` bytes of a linked blob's file `file` (an index into its files) from `offset`; or,
/// with `file` [`LinkedRun::ZEROS`], `len` zero bytes (a tar's padding and end: no file
/// need hold them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkedRun {
    /// The file's index.
    pub file: u32,
    /// Where the run starts in it.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
}

impl LinkedRun {
    /// The `file` of a run of zero bytes.
    pub const ZEROS: u32 = u32::MAX;
}

impl LinkedBlob {
    /// The blob's length.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }

    /// Whether it has no byte.
    pub fn is_empty(&self) -> bool {
        self.runs.iter().all(|r| r.len == 0)
    }
}

/// What a body of parts starts with: the header's length (big-endian `u64`), then the
/// header as JSON.
fn framed_head(header: &impl Serialize) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(header)?;
    let mut head = (json.len() as u64).to_be_bytes().to_vec();
    head.extend_from_slice(&json);
    Ok(head)
}

/// The header of `POST /v1/layers`, whose body is framed as [`BLOB_PARTS_TYPE`]'s: a
/// re-run COPY's gzip layer sent as parts and not named. The daemon names it (its digest)
/// at once and takes its diff_id from its own copy of the members after the change while
/// the build goes on (`POST /v1/layers/{digest}/diff-id` waits for it), so the client
/// never reads the unchanged rest of the layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerParts {
    /// The blob's runs.
    #[serde(flatten)]
    pub blob: BlobParts,
    /// Where the tar still to hash starts, and the tar's state in front of it.
    pub tail: LayerTail,
    /// Answer with a provisional name ([`PROVISIONAL_PREFIX`]) as soon as the bytes are
    /// stored, before the blob's SHA-256 (over everything after the change) is taken; the
    /// name is resolved later (`POST /v1/layers/provisional`), and a deferred build whose
    /// layers bear it is named with the digest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub name_later: bool,
}

/// What a provisional layer name starts with; 64 lowercase hex digits follow.
pub const PROVISIONAL_PREFIX: &str = "provisional:";

/// Whether `name` is a provisional layer name (see [`LayerParts::name_later`]).
pub fn is_provisional(name: &str) -> bool {
    name.strip_prefix(PROVISIONAL_PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// `POST /v1/layers/provisional`: provisional layer names to resolve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionalNames {
    /// The names, as `POST /v1/layers` answered them.
    pub names: Vec<String>,
}

/// The answer to `POST /v1/layers/provisional`, in the order asked: each layer as
/// stored once named, or `None` when the name is unknown (the daemon restarted before
/// naming it, or forgot it) or the layer could not be stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedNames {
    /// One per name asked.
    pub layers: Vec<Option<NamedLayer>>,
}

/// The part of a layer's tar the daemon hashes for its diff_id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerTail {
    /// The uncompressed tar's SHA-256 state (serialized, hex) in front of `first`.
    #[serde(with = "hex_bytes")]
    pub tar_state: Vec<u8>,
    /// Where in the blob the first gzip member to hash starts.
    pub first: u64,
    /// The blob's SHA-256 state (serialized, hex) at `first`, as the client knows it from
    /// the earlier blob: the daemon checks that its own copy of the front gives it (empty
    /// when `first` is 0).
    #[serde(with = "hex_bytes")]
    pub blob_state: Vec<u8>,
    /// The lengths of the members from `first` on whose states are wanted back, end to end;
    /// what follows them, to the blob's end, is the tar's end, hashed too.
    pub members: Vec<u64>,
    /// How the blob is kept: uncompressed, its members are the tar's own bytes. Always
    /// written (clients keep tails in bincode, which has no optional fields); read as gzip
    /// when absent (a client older than it).
    #[serde(default)]
    pub compression: LayerCompression,
}

/// The answer to `POST /v1/layers`: the layer's blob as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedLayer {
    /// The blob's digest (`sha256:…`); with `name_later`, a provisional name, and
    /// `blob_states` empty until it is resolved.
    pub digest: String,
    /// Its length.
    pub size: u64,
    /// The blob's SHA-256 state after each of `tail.members`, as `blob_state` is written.
    #[serde(with = "hex_list")]
    pub blob_states: Vec<Vec<u8>>,
}

/// The answer to `POST /v1/layers/{digest}/diff-id` (whose body is the layer's
/// [`LayerTail`]): the layer's diff_id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDiffId {
    /// The uncompressed tar's digest.
    pub diff_id: String,
    /// The tar's SHA-256 state after each of `tail.members`, as `tar_state` is written.
    #[serde(with = "hex_list")]
    pub tar_states: Vec<Vec<u8>>,
}

/// Bytes as lower-case hex.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        decode(&String::deserialize(d)?).ok_or_else(|| serde::de::Error::custom("not hex"))
    }

    pub fn encode(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    pub fn decode(s: &str) -> Option<Vec<u8>> {
        if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        (0..s.len())
            .step_by(2)
            .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect()
    }
}

/// A list of byte strings as hex.
mod hex_list {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(list: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(list.iter().map(|b| super::hex_bytes::encode(b)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|h| super::hex_bytes::decode(h).ok_or_else(|| serde::de::Error::custom("not hex")))
            .collect()
    }
}

impl LayerParts {
    /// What a body of layer parts starts with (as [`BlobParts::head`]).
    pub fn head(&self) -> Result<Vec<u8>, serde_json::Error> {
        framed_head(self)
    }
}

impl BlobParts {
    /// What a body of parts starts with: the list's length (big-endian `u64`), then the
    /// list as JSON.
    pub fn head(&self) -> Result<Vec<u8>, serde_json::Error> {
        framed_head(self)
    }

    /// Where the `Sent` runs lie in the blob: (offset, length), front to back.
    pub fn sent_ranges(&self) -> Vec<(u64, u64)> {
        let mut at = 0u64;
        let mut out = Vec::new();
        for p in &self.parts {
            if let BlobPart::Sent { len } = *p {
                out.push((at, len));
            }
            at = at.saturating_add(p.len());
        }
        out
    }
}

impl BlobPart {
    /// How many bytes of the blob the part is.
    pub fn len(&self) -> u64 {
        match *self {
            Self::Base { len, .. } | Self::Sent { len } => len,
        }
    }

    /// Whether the part holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a step produced: the cache's value for a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's key.
    pub key: String,
    /// Its layer, if it changed the filesystem.
    pub layer: Option<LayerRef>,
    /// How long the step took to run, in milliseconds (what a hit saves).
    pub duration_ms: u64,
    /// The inputs the key was made of, for explanations.
    pub inputs: Option<KeyInputs>,
    /// When it was stored, milliseconds since the epoch (set by the daemon).
    #[serde(default)]
    pub created_at_ms: u64,
}

/// One step of a finished build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildStep {
    /// 0-based stage.
    pub stage: usize,
    /// 1-based line.
    pub line: usize,
    /// As written.
    pub instruction: String,
    /// Its key (empty if it never got one).
    pub key: String,
    /// Served from the cache.
    pub cached: bool,
    /// Time spent, milliseconds.
    pub duration_ms: u64,
    /// For a hit: the time the original run took, which the hit saved.
    #[serde(default)]
    pub saved_ms: u64,
    /// For a miss: why.
    #[serde(default)]
    pub cause: Option<MissCause>,
    /// The key's inputs.
    #[serde(default)]
    pub inputs: Option<KeyInputs>,
    /// The key of the earlier record this step was compared with.
    #[serde(default)]
    pub compared_with: Option<String>,
}

/// A build in the history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    /// Assigned by the daemon.
    #[serde(default)]
    pub id: String,
    /// Start, milliseconds since the epoch.
    pub started_at_ms: u64,
    /// End, milliseconds since the epoch.
    pub finished_at_ms: u64,
    /// The Dockerfile's name.
    pub dockerfile: String,
    /// The context directory.
    pub context: String,
    /// `--target`, if any.
    pub target: Option<String>,
    /// Steps in order.
    pub steps: Vec<BuildStep>,
    /// The Dockerfile's absolute path.
    #[serde(default)]
    pub dockerfile_path: String,
    /// BLAKE3 of the context's .dockerignore (empty if none).
    #[serde(default)]
    pub dockerignore: String,
    /// Root causes and what each rebuilt.
    #[serde(default)]
    pub cascades: Vec<Cascade>,
    /// The image's manifest digest.
    #[serde(default)]
    pub image: String,
    /// Where the build stopped, if it failed (its `steps` are then the ones that finished).
    /// Always serialized: the store's bincode has no field names to skip one by.
    #[serde(default)]
    pub failure: Option<BuildFailure>,
}

/// Where a failed build stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildFailure {
    /// The step that failed, with the key, inputs and cause it had by then; `None` when the
    /// build failed outside a step (a base image it could not use).
    pub step: Option<BuildStep>,
    /// The error, as the build printed it.
    pub message: String,
}

impl BuildRecord {
    /// Every step the build started, with whether it failed: the finished ones, then the one
    /// it stopped at (so a step's position in its stage is the same as in a finished build).
    pub fn steps_tried(&self) -> impl Iterator<Item = (&BuildStep, bool)> {
        let failed = self.failure.as_ref().and_then(|f| f.step.as_ref());
        self.steps.iter().map(|s| (s, false)).chain(failed.map(|s| (s, true)))
    }
}

/// `GET /v1/status` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// The daemon's version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// The store directory.
    pub store: String,
    /// Where it listens.
    pub listen: Vec<String>,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Cache contents and traffic.
    pub stats: CacheStats,
    /// Indexed contexts.
    pub contexts: Vec<ContextIndexStatus>,
    /// The cache behind this one, if any (absent from older daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamStatus>,
}

/// How the upstream tier is doing, as `lcache status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// Its address.
    pub address: String,
    /// Seconds lookups still skip it, having just failed to answer (0: looked up).
    pub skipped_for_s: u64,
    /// Why its last request failed, if the last one did.
    pub last_error: Option<String>,
    /// Step records waiting to be pushed.
    pub queued: u64,
    /// Whether its token lets this daemon only read.
    pub read_only: bool,
}

/// Cache contents and traffic since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Step records stored.
    pub steps: u64,
    /// Blobs stored.
    pub blobs: u64,
    /// Bytes of blobs stored.
    pub blob_bytes: u64,
    /// Builds in the history.
    pub builds: u64,
    /// Step lookups answered with a record since start.
    pub hits: u64,
    /// Step lookups answered 404 since start.
    pub misses: u64,
}

/// Every API error's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// What to do about it.
    pub hint: String,
    /// On a step lookup's miss: the upstream that could not be asked, and why (so the miss
    /// is explained as the shared cache's, not as a step never built).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_unavailable: Option<String>,
}

/// An image lcached knows by name: imported, or tagged by `lcache build -t`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Normalised name (`busybox:latest`).
    pub name: String,
    /// `sha256:` of the manifest blob: the image's identity, and the parent of its
    /// children's first keys.
    pub manifest_digest: String,
    /// `sha256:` of the config blob.
    pub config_digest: String,
    /// Layers, bottom first.
    pub layers: Vec<LayerRef>,
    /// The OCI image config, as JSON text.
    pub config: String,
    /// When it was recorded, milliseconds since the epoch.
    #[serde(default)]
    pub created_at_ms: u64,
}

impl ImageRecord {
    /// Every blob the image needs: its layers, bottom first, then its config and manifest.
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        self.layers
            .iter()
            .map(|l| l.digest.as_str())
            .chain([self.config_digest.as_str(), self.manifest_digest.as_str()])
    }
}

/// `busybox` → `busybox:latest`; `docker.io/library/x:1` → `x:1`; digests kept.
pub fn normalize_image_name(name: &str) -> String {
    let n = name.strip_prefix("docker.io/").unwrap_or(name);
    let n = n.strip_prefix("library/").unwrap_or(n);
    let last = n.rsplit('/').next().unwrap_or(n);
    if last.contains(':') || last.contains('@') {
        n.to_string()
    } else {
        format!("{n}:latest")
    }
}

/// A reference pinned by digest (`name[:tag]@sha256:…`): the name part and the digest.
pub fn split_pinned(reference: &str) -> Option<(&str, &str)> {
    let (name, digest) = reference.rsplit_once('@')?;
    digest.starts_with("sha256:").then_some((name, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_header_and_its_answer_carry_their_states_as_hex_and_refuse_what_is_not() {
        let header = LayerParts {
            blob: BlobParts {
                base: "sha256:ab".into(),
                parts: vec![BlobPart::Base { offset: 0, len: 10 }, BlobPart::Sent { len: 3 }],
            },
            tail: LayerTail {
                tar_state: vec![0, 1, 0xfe, 0xff],
                first: 10,
                blob_state: vec![],
                members: vec![3],
                compression: LayerCompression::Gzip,
            },
            name_later: false,
        };
        let json = serde_json::to_string(&header).unwrap();
        assert!(!json.contains("name_later"), "left out when false: {json}");
        assert!(json.contains(r#""compression":"gzip""#), "{json}");
        let older = json.replace(r#","compression":"gzip""#, "");
        assert_eq!(
            serde_json::from_str::<LayerParts>(&older).unwrap(),
            header,
            "a client older than it sends none: gzip"
        );
        // Clients keep tails in bincode, which reads back only what every field wrote.
        let kept = bincode::serde::encode_to_vec(&header.tail, bincode::config::standard()).unwrap();
        let (back, _): (LayerTail, usize) =
            bincode::serde::decode_from_slice(&kept, bincode::config::standard()).unwrap();
        assert_eq!(back, header.tail);
        let mut plain = header.clone();
        plain.tail.compression = LayerCompression::None;
        let plain_json = serde_json::to_string(&plain).unwrap();
        assert!(plain_json.contains(r#""compression":"none""#), "{plain_json}");
        assert_eq!(serde_json::from_str::<LayerParts>(&plain_json).unwrap(), plain);
        assert!(json.contains(r#""tar_state":"0001feff""#), "{json}");
        assert!(
            json.contains(r#""base":"sha256:ab""#),
            "the parts' fields, flattened: {json}"
        );
        assert_eq!(serde_json::from_str::<LayerParts>(&json).unwrap(), header);
        let head = header.head().unwrap();
        assert_eq!(u64::from_be_bytes(head[..8].try_into().unwrap()) as usize, json.len());

        let named = LayerDiffId {
            diff_id: "sha256:ef".into(),
            tar_states: vec![vec![7, 8], vec![9]],
        };
        let json = serde_json::to_string(&named).unwrap();
        assert_eq!(serde_json::from_str::<LayerDiffId>(&json).unwrap(), named);
        for bad in ["0", "zz", "0g", "+f"] {
            let json = json.replace("\"0708\"", &format!("\"{bad}\""));
            assert!(serde_json::from_str::<LayerDiffId>(&json).is_err(), "{bad}");
        }
    }

    #[test]
    fn provisional_names_are_the_prefix_and_64_lowercase_hex_digits() {
        let hex = "0123456789abcdef".repeat(4);
        assert!(is_provisional(&format!("{PROVISIONAL_PREFIX}{hex}")));
        for bad in [
            hex.clone(),
            format!("sha256:{hex}"),
            format!("{PROVISIONAL_PREFIX}{}", hex.to_uppercase()),
            format!("{PROVISIONAL_PREFIX}{}", &hex[1..]),
            format!("{PROVISIONAL_PREFIX}{hex}0"),
            format!("{PROVISIONAL_PREFIX}../{}", &hex[3..]),
        ] {
            assert!(!is_provisional(&bad), "{bad}");
        }
        let later: LayerParts = serde_json::from_str(
            r#"{"base":"sha256:ab","parts":[],"tail":{"tar_state":"","first":0,"blob_state":"","members":[]},"name_later":true}"#,
        )
        .unwrap();
        assert!(later.name_later);
    }

    #[test]
    fn pinned_references_split_into_name_and_digest() {
        assert_eq!(split_pinned("app@sha256:00"), Some(("app", "sha256:00")));
        assert_eq!(
            split_pinned("reg:5000/app:1@sha256:ab"),
            Some(("reg:5000/app:1", "sha256:ab"))
        );
        assert_eq!(split_pinned("app:1"), None);
    }

    #[test]
    fn image_names_normalise_like_docker_hub_references() {
        assert_eq!(normalize_image_name("busybox"), "busybox:latest");
        assert_eq!(normalize_image_name("docker.io/library/alpine:3.19"), "alpine:3.19");
        assert_eq!(normalize_image_name("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(normalize_image_name("app@sha256:00"), "app@sha256:00");
    }
}

/// `POST /v1/tokens`: a token to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Its name.
    pub name: String,
    /// `read` or `write`.
    pub access: String,
    /// For a write token: the scopes it may write into (`pr-*`); none: any, and images.
    #[serde(default)]
    pub scope: Option<String>,
}

/// A token just made: the only time it is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    /// Its name.
    pub name: String,
    /// `read` or `write`.
    pub access: String,
    /// The token.
    pub token: String,
}

/// A token as `GET /v1/tokens` lists it (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Its name.
    pub name: String,
    /// `read` or `write`.
    pub access: String,
    /// The scopes a write token may write into, if limited.
    #[serde(default)]
    pub scope: Option<String>,
    /// When it was made.
    pub created_at_ms: u64,
}

/// `POST /v1/upstream/sync`: what could not be pushed to the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    /// The upstream's address.
    pub upstream: String,
    /// Step records given up on since the last sync, with why.
    pub failed: Vec<String>,
}

/// Credentials for one registry, as the client found them in Docker's config. Their
/// `Debug` never shows a secret.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RegistryCredentials {
    /// No credentials: anonymous pulls (a registry may still hand out a token).
    #[default]
    Anonymous,
    /// A user name and password (or an access token used as one).
    Basic {
        /// The user name.
        username: String,
        /// The password or token.
        password: String,
    },
    /// A registry bearer token, sent as is.
    Bearer {
        /// The token.
        token: String,
    },
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Self::Bearer { .. } => f.write_str("Bearer(***)"),
        }
    }
}

/// `POST /v1/images/pull`: fetch an image from a registry into the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullRequest {
    /// As written (`debian:bookworm`, `localhost:5000/app@sha256:…`).
    pub reference: String,
    /// The platform to pick from an index (`linux/amd64`).
    pub platform: String,
    /// For the reference's registry.
    #[serde(default)]
    pub credentials: RegistryCredentials,
    /// Registries (`host[:port]`) that may be reached over plain HTTP; loopback always may.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
}

/// What a pull did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullResponse {
    /// The image as stored.
    pub image: ImageRecord,
    /// The fully qualified reference (`docker.io/library/debian:bookworm`).
    pub resolved: String,
    /// Blobs downloaded, and their bytes.
    pub fetched_blobs: usize,
    /// Bytes downloaded.
    pub fetched_bytes: u64,
    /// Blobs the daemon already had.
    pub reused_blobs: usize,
}

/// `POST /v1/images/push`: send a stored image to a registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushRequest {
    /// The stored image's name.
    pub image: String,
    /// Where it goes (`registry.example.com/team/app:1`).
    pub reference: String,
    /// For the reference's registry.
    #[serde(default)]
    pub credentials: RegistryCredentials,
    /// Registries that may be reached over plain HTTP; loopback always may.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
}

/// What a push did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushResponse {
    /// The fully qualified reference pushed to.
    pub resolved: String,
    /// The manifest's digest, as the registry has it.
    pub manifest_digest: String,
    /// Blobs uploaded.
    pub uploaded_blobs: usize,
    /// Blobs the registry already had.
    pub skipped_blobs: usize,
    /// Blobs mounted from another repository of the same registry.
    pub mounted_blobs: usize,
}
