//! `HEAD/GET/PUT /v1/blobs/{digest}`: raw byte streams, verified against their digest (a
//! GET of a byte range excepted).

use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use lcache_image::layer_segments::tar_state_is_valid;
use lcache_proto::wire::{
    is_provisional, BlobParts, LayerTail, NamedLayer, ProvisionalNames, ResolvedNames, BLOB_PARTS_TYPE,
    PROVISIONAL_PREFIX,
};
use std::sync::Arc;

use super::{error, json, Body};
use crate::provisional_names::Naming;
use crate::state::AppState;
use crate::store::blob_file::BlobFile;
use crate::store::blob_parts::ReceivedParts;
use crate::store::blob_store::{sha256_hex, IngestError};
use crate::store::{BlobMeta, ProvisionalOutcome};

fn bad_digest(d: &str) -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        format!("'{d}' is not a blob digest"),
        "blobs are named sha256:<64 lower-case hex digits>",
    )
}

fn stored(state: &AppState, d: &str) -> Result<Option<BlobMeta>, Response<Body>> {
    if sha256_hex(d).is_none() {
        return Err(bad_digest(d));
    }
    state.records.get_blob(d).map_err(|e| super::store_failed(&e))
}

fn not_found(d: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        format!("blob {d} is not in the store"),
        "upload it with PUT /v1/blobs/{digest}",
    )
}

/// The blob opened, if it is there with the recorded size: a record alone is not a blob.
fn opened(state: &AppState, m: &BlobMeta) -> Option<BlobFile> {
    // Opening is a few metadata calls (a file, or a recipe and the files it names).
    state
        .blobs
        .open_blob(&m.digest)
        .ok()
        .flatten()
        .filter(|b| b.len() == m.size)
}

/// Whether the blob hashes to its digest. A damaged blob is removed, so that GET answers
/// 404 too and the next upload of the blob repairs it.
async fn file_verified(state: &AppState, m: &BlobMeta) -> bool {
    let Some(blob) = opened(state, m) else {
        return false;
    };
    let digest = m.digest.clone();
    let good = tokio::task::spawn_blocking(move || {
        use sha2::Digest;
        let mut sha = sha2::Sha256::new();
        blob.copy_to(&mut sha).is_ok() && format!("sha256:{:x}", sha.finalize()) == digest
    })
    .await
    .unwrap_or(false);
    if !good {
        let _ = state.blobs.remove(&m.digest);
    }
    good
}

/// `HEAD /v1/blobs/{digest}`: 200 only if the file is there and hashes to the digest.
pub async fn head(state: &AppState, d: &str) -> Response<Body> {
    let verified = match stored(state, d) {
        Ok(Some(m)) => file_verified(state, &m).await.then_some(m),
        Ok(None) => None,
        Err(r) => return r,
    };
    match verified {
        Some(m) => Response::builder()
            .status(StatusCode::OK)
            .header("content-length", m.size)
            .body(super::full(""))
            .unwrap_or_else(|_| Response::new(super::full(""))),
        None => {
            let mut r = Response::new(super::full(""));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

/// The bytes a `Range: bytes=FIRST-[LAST]` header asks for of a blob of `len` bytes, as
/// (offset, length); `None` for a range this does not serve (several, from the end, past
/// the end).
fn byte_range(header: &hyper::header::HeaderValue, len: u64) -> Option<(u64, u64)> {
    let spec = header.to_str().ok()?.strip_prefix("bytes=")?;
    let (first, last) = spec.split_once('-')?;
    let first: u64 = first.parse().ok()?;
    let end = match last {
        "" => len,
        last => last.parse::<u64>().ok()?.checked_add(1)?.min(len),
    };
    (first < end || (first == len && last.is_empty())).then(|| (first, end - first))
}

/// `GET /v1/blobs/{digest}`: streamed from the file; with `Range: bytes=FIRST-[LAST]`,
/// only those bytes (206), which a client takes from a blob it trusts this daemon for (a
/// range cannot be checked against the digest).
pub async fn get(
    state: &AppState,
    d: &str,
    range: Option<&hyper::header::HeaderValue>,
    accept_gzip: bool,
) -> Response<Body> {
    let meta = match stored(state, d) {
        Ok(Some(m)) => m,
        Ok(None) => return not_found(d),
        Err(r) => return r,
    };
    let Some(blob) = opened(state, &meta) else {
        // Lost or cut short behind the daemon's back: a miss, so the client rebuilds and
        // uploads it again.
        return error(
            StatusCode::NOT_FOUND,
            format!("blob {d} is recorded but its file is missing or damaged"),
            "upload it again with PUT /v1/blobs/{digest}",
        );
    };
    let (status, blob, content_range) = match range.map(|r| byte_range(r, meta.size)) {
        None => (StatusCode::OK, blob, None),
        Some(Some((offset, n))) => match blob.select(&[(offset, n)]) {
            Ok(b) => (
                StatusCode::PARTIAL_CONTENT,
                b,
                Some(format!("bytes {offset}-{}/{}", (offset + n).max(1) - 1, meta.size)),
            ),
            Err(e) => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("blob {d} is damaged: {e}"),
                    "upload it again with PUT /v1/blobs/{digest}",
                )
            }
        },
        Some(None) => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("blob {d} has {} bytes: the range asked for is not in it", meta.size),
                "ask for one range, Range: bytes=FIRST-[LAST], that starts within the blob",
            );
            if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("bytes */{}", meta.size)) {
                r.headers_mut().insert("content-range", v);
            }
            return r;
        }
    };
    let len = blob.len();
    state.metrics.bytes_out.fetch_add(len, Ordering::Relaxed);
    // A tar layer asked for gzipped (by another lcached) travels as gzip members.
    let gzip = accept_gzip && content_range.is_none() && {
        let mut head = vec![0u8; 512.min(len as usize)];
        blob.read_exact_at(&mut head, 0).is_ok() && crate::transit_gzip::is_tar(&head)
    };
    // The first chunk is read before answering: a blob held by reference whose file changed
    // behind the store fails there (its stamp) and is answered 404 and dropped, where a body
    // failing before its headers went out would reach the client as a connection closed,
    // which it cannot tell from a daemon gone away. A failure later ends the body early.
    let mut rest = Box::pin(blob.chunks());
    let first = match rest.next().await {
        Some(Err(e)) => {
            let _ = state.blobs.remove(&meta.digest);
            return error(
                StatusCode::NOT_FOUND,
                format!("blob {d} is damaged ({e}); it was dropped"),
                "upload it again with PUT /v1/blobs/{digest}",
            );
        }
        first => first,
    };
    let chunks = futures_util::stream::iter(first).chain(rest);
    if gzip {
        let chunks = crate::transit_gzip::gzipped(chunks).map(|c| c.map(Frame::data));
        return Response::builder()
            .status(status)
            .header("content-type", "application/octet-stream")
            .header("content-encoding", "gzip")
            .header(crate::transit_gzip::LENGTH_HEADER, len)
            .body(BodyExt::boxed(StreamBody::new(chunks)))
            .unwrap_or_else(|_| Response::new(super::full("")));
    }
    let chunks = chunks.map(|c| c.map(Frame::data));
    let mut r = Response::builder()
        .status(status)
        .header("content-type", "application/octet-stream")
        .header("content-length", len);
    if let Some(cr) = content_range {
        r = r.header("content-range", cr);
    }
    r.body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap_or_else(|_| Response::new(super::full("")))
}

/// The blob `d` and how it was uploaded as parts, or the answer to give instead (404 for a
/// blob stored whole: it has no parts to give).
fn with_parts(state: &AppState, d: &str) -> Result<(BlobFile, BlobParts), Response<Body>> {
    let meta = match stored(state, d) {
        Ok(Some(m)) => m,
        Ok(None) => return Err(not_found(d)),
        Err(r) => return Err(r),
    };
    match opened(state, &meta).map(|b| {
        let parts = b.origin.clone();
        (b, parts)
    }) {
        Some((b, Some(parts))) => Ok((b, parts)),
        _ => Err(error(
            StatusCode::NOT_FOUND,
            format!("blob {d} is not kept as parts here"),
            "fetch it whole with GET /v1/blobs/{digest}",
        )),
    }
}

/// `GET /v1/blobs/{digest}/parts`: the parts a blob was uploaded as (JSON), so a daemon that
/// holds their base can fetch only the sent runs (`/sent`) and store the blob from them.
pub async fn parts(state: &AppState, d: &str) -> Response<Body> {
    match with_parts(state, d) {
        Ok((_, parts)) => json(StatusCode::OK, &parts),
        Err(r) => r,
    }
}

/// `GET /v1/blobs/{digest}/sent`: the bytes of the blob's sent runs, front to back.
pub async fn sent(state: &AppState, d: &str) -> Response<Body> {
    let (blob, parts) = match with_parts(state, d) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let blob = match blob.select(&parts.sent_ranges()) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("blob {d} is damaged: {e}"),
                "fetch it whole with GET /v1/blobs/{digest}",
            )
        }
    };
    state.metrics.bytes_out.fetch_add(blob.len(), Ordering::Relaxed);
    let len = blob.len();
    let chunks = blob.chunks().map(|c| c.map(Frame::data));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .header("content-length", len)
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap_or_else(|_| Response::new(super::full("")))
}

/// `PUT /v1/blobs/{digest}`: stored only if the bytes hash to the digest and all arrived.
/// A blob already recorded is taken again too (verified, then renamed over the old file), so
/// a file damaged behind the daemon's back is repaired by the next upload. A body of type
/// `BLOB_PARTS_TYPE` sends only the runs that a stored base blob lacks.
pub async fn put(state: &AppState, d: &str, req: Request<Incoming>) -> Response<Body> {
    let known = match stored(state, d) {
        Ok(m) => m.is_some(),
        Err(r) => return r,
    };
    let (expected_len, as_parts) = upload_headers(&req);
    // The tests play an lcached older than gzip on the wire, which took any body as it came.
    let older = std::env::var_os("LCACHED_TEST_NO_TRANSIT_GZIP").is_some();
    let gzipped = !older && crate::transit_gzip::names_gzip(req.headers().get("content-encoding"));
    let ingested = if gzipped && !as_parts {
        // A tar layer sent gzipped by another lcached: kept, and checked, as the tar; the
        // length it states is the tar's.
        let own_len = req
            .headers()
            .get(crate::transit_gzip::LENGTH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = crate::transit_gzip::Gunzip::new(
            req.into_body(),
            crate::transit_gzip::limit_over(state.limits.max_blob_size),
        );
        state.blobs.ingest(d, body, own_len, &state.limits).await
    } else if gzipped {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a blob sent as parts cannot be gzipped",
            "send its parts as they are",
        );
    } else if as_parts {
        state
            .blobs
            .ingest_parts(d, req.into_body(), expected_len, &state.limits)
            .await
    } else {
        state
            .blobs
            .ingest(d, req.into_body(), expected_len, &state.limits)
            .await
    };
    match ingested {
        Ok(meta) => match recorded(state, &meta) {
            Ok(()) => json(if known { StatusCode::OK } else { StatusCode::CREATED }, &meta),
            Err(r) => r,
        },
        Err(e) => refused(e),
    }
}

/// The largest body of `POST /v1/layers/linked`: about 70 bytes a file.
const LINKED_JSON_LIMIT: usize = 128 << 20;

/// `POST /v1/layers/linked` (the daemon's socket only): a tar layer as runs of files on
/// this machine (`LinkedBlob`), kept as hard links to them (`store::linked_blobs`) and named
/// by the digest its bytes hash to: a `NamedLayer`, with the states at the body's marks.
pub async fn post_linked(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let linked: lcache_proto::wire::LinkedBlob = match super::read_json_within(state, req, LINKED_JSON_LIMIT).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    match state.blobs.ingest_linked(linked, &state.limits).await {
        Ok((meta, blob_states)) => match recorded(state, &meta) {
            Ok(()) => json(
                StatusCode::CREATED,
                &NamedLayer {
                    digest: meta.digest,
                    size: meta.size,
                    blob_states,
                },
            ),
            Err(r) => r,
        },
        Err(e) => refused(e),
    }
}

/// `POST /v1/layers` (the daemon's socket only): a re-run COPY's layer sent as parts
/// (`BLOB_PARTS_TYPE` framing, a `LayerParts` header), stored under the digest its bytes
/// hash to; answers a `NamedLayer` at once and takes the layer's diff_id from its own
/// members after the change meanwhile (`POST /v1/layers/{digest}/diff-id`). The client
/// never reads the layer's unchanged members. With `name_later`, the answer (202) comes
/// as soon as the sent bytes are durable, with a provisional name: the blob is checked
/// and named behind (`crate::provisional_names`).
pub async fn post_layer(state: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let (expected_len, as_parts) = upload_headers(&req);
    if !as_parts {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a layer is sent as parts",
            format!("send it with content-type {BLOB_PARTS_TYPE}"),
        );
    }
    let received = match state
        .blobs
        .receive_layer(req.into_body(), expected_len, &state.limits)
        .await
    {
        Ok(r) => r,
        Err(e) => return refused(e),
    };
    if received.name_later {
        let mut received = received;
        let naming = state.provisional.begin();
        let hex = &naming.name()[PROVISIONAL_PREFIX.len()..];
        // Kept where a restart finds it: the client is answered now and counts on it.
        if let Err(e) = state.blobs.keep_received(&mut received, hex).await {
            state
                .provisional
                .finish(&*state.records, naming, ProvisionalOutcome::Failed(e.to_string()));
            return refused(IngestError::Io(e));
        }
        let answer = NamedLayer {
            digest: naming.name().to_string(),
            size: received.size,
            blob_states: Vec::new(),
        };
        name_behind(state, naming, received);
        return json(StatusCode::ACCEPTED, &answer);
    }
    match name_layer(state, received, None).await {
        Ok(layer) => json(StatusCode::CREATED, &layer),
        Err(LayerNotStored::Ingest(e)) => refused(e),
        Err(LayerNotStored::Record(e)) => record_refused(e),
    }
}

/// Names a layer answered with a provisional name, on a task of its own.
fn name_behind(state: &Arc<AppState>, naming: Naming, received: ReceivedParts) {
    let state = Arc::clone(state);
    tokio::spawn(async move {
        // Lets the tests stop the daemon while a layer is being named.
        if let Some(ms) = std::env::var("LCACHED_TEST_LAYER_NAMING_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let outcome = match name_layer(&state, received, Some(naming.name())).await {
            Ok(layer) => ProvisionalOutcome::Named(layer),
            Err(e) => {
                let reason = e.to_string();
                eprintln!("lcached: layer {} cannot be stored: {reason}", naming.name());
                ProvisionalOutcome::Failed(reason)
            }
        };
        state.provisional.finish(&*state.records, naming, outcome);
    });
}

/// Names the layers answered with a provisional name that the daemon stopped before
/// naming (before the builds that bear them are named again).
pub fn resume_provisional(state: &Arc<AppState>) {
    for (hex, received) in state.blobs.received_before() {
        let naming = state.provisional.resume(&format!("{PROVISIONAL_PREFIX}{hex}"));
        eprintln!(
            "lcached: naming layer {}, which the daemon stopped naming",
            naming.name()
        );
        match received {
            Ok(received) => name_behind(state, naming, received),
            Err(e) => {
                eprintln!("lcached: layer {} cannot be stored: {e}", naming.name());
                state
                    .provisional
                    .finish(&*state.records, naming, ProvisionalOutcome::Failed(e.to_string()));
            }
        }
    }
}

/// Why a layer received was not stored.
#[derive(Debug, thiserror::Error)]
enum LayerNotStored {
    #[error(transparent)]
    Ingest(IngestError),
    #[error(transparent)]
    Record(crate::store::StoreError),
}

/// Checks and names a layer received, records its blob and starts taking its diff_id. A
/// layer answered with `provisional` name has the name's outcome kept before the layer
/// leaves `provisional/` (a restart resumes whatever is still there).
async fn name_layer(
    state: &AppState,
    received: ReceivedParts,
    provisional: Option<&str>,
) -> Result<NamedLayer, LayerNotStored> {
    let keep = |named: &crate::store::blob_parts::NamedBlob| match provisional {
        Some(name) => {
            let outcome = ProvisionalOutcome::Named(NamedLayer {
                digest: named.meta.digest.clone(),
                size: named.meta.size,
                blob_states: named.blob_states.clone(),
            });
            state
                .provisional
                .keep(&*state.records, name, &outcome)
                .map_err(|e| IngestError::Io(std::io::Error::other(e.to_string())))
        }
        None => Ok(()),
    };
    let (named, tail, started) = state
        .blobs
        .name_layer(received, keep)
        .await
        .map_err(LayerNotStored::Ingest)?;
    record_blob(state, &named.meta).map_err(LayerNotStored::Record)?;
    state.layer_naming.keep(&named.meta.digest, &tail, started);
    Ok(NamedLayer {
        digest: named.meta.digest,
        size: named.meta.size,
        blob_states: named.blob_states,
    })
}

/// `POST /v1/layers/provisional` (the daemon's socket only), with `ProvisionalNames`: what
/// each provisional name came to, waiting for those still being named.
pub async fn post_provisional(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let asked: ProvisionalNames = match super::read_json(state, req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Some(bad) = asked.names.iter().find(|n| !is_provisional(n)) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("'{bad}' is not a provisional layer name"),
            "send the names POST /v1/layers answered with name_later",
        );
    }
    let mut layers = Vec::with_capacity(asked.names.len());
    for name in &asked.names {
        layers.push(state.provisional.layer(&*state.records, name).await.ok());
    }
    json(StatusCode::OK, &ResolvedNames { layers })
}

/// `POST /v1/layers/{digest}/diff-id` (the daemon's socket only), with the layer's
/// `LayerTail`: its diff_id, as `POST /v1/layers` started taking it (or taken now). A tar
/// that cannot be hashed means the blob, or the one its unchanged members were taken from,
/// is damaged: both are removed, so the next build packs the layer whole.
pub async fn post_diff_id(state: &AppState, d: &str, req: Request<Incoming>) -> Response<Body> {
    if sha256_hex(d).is_none() {
        return bad_digest(d);
    }
    let tail: LayerTail = match super::read_json(state, req).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let open = || state.blobs.open_blob(d).ok().flatten();
    if !tar_state_is_valid(&tail.tar_state) {
        return error(
            StatusCode::BAD_REQUEST,
            "the tar's state in front of the change is not a SHA-256 state",
            "send the tail the layer was named with",
        );
    }
    match state.layer_naming.wait(d, tail, open).await {
        None => not_found(d),
        Some((Ok(diff_id), _)) => json(StatusCode::OK, &diff_id),
        // Taken as the layer was named: its members (or the base's it links) are damaged.
        Some((Err(reason), true)) => {
            remove_damaged_layer(state, d);
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("layer {d}: {reason}"),
                "it or the blob it was made from is damaged, and both were removed: run the build again, which packs the layer whole",
            )
        }
        // Any other request may name a blob that is no such layer: nothing is removed.
        Some((Err(reason), false)) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("layer {d}: {reason}"),
            "name the layer with POST /v1/layers first; if it was, run the build again",
        ),
    }
}

/// `POST /v1/layers/{digest}/gzip` (the daemon's socket only): the gzip form of the layer
/// kept as the tar `digest` (made now, or the one kept), for an export.
pub async fn post_gzip(state: &AppState, d: &str) -> Response<Body> {
    use crate::gzip_forms::{gzip_form, GzipFormError};
    if sha256_hex(d).is_none() {
        return bad_digest(d);
    }
    let tar = lcache_proto::wire::LayerRef {
        digest: d.to_string(),
        blake3: String::new(),
        size: 0,
        // A tar's diff_id is its digest.
        diff_id: d.to_string(),
        media_type: lcache_proto::wire::TAR_LAYER_MEDIA_TYPE.into(),
    };
    match gzip_form(state, &tar).await {
        Ok(layer) => json(StatusCode::OK, &layer),
        Err(GzipFormError::Missing(_)) => not_found(d),
        Err(e @ GzipFormError::Damaged { .. }) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.to_string(),
            "build the image again: the step re-runs and stores the layer afresh",
        ),
        Err(e @ GzipFormError::Failed { .. }) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            "check lcached's disk (`lcache status`) and export again",
        ),
    }
}

/// Removes a layer named by `POST /v1/layers` whose tar could not be hashed, and the blob its
/// unchanged members were taken from: one of them is damaged, and the next build of the
/// step packs the layer whole.
pub fn remove_damaged_layer(state: &AppState, digest: &str) {
    let base = state
        .blobs
        .open_blob(digest)
        .ok()
        .flatten()
        .and_then(|b| b.origin)
        .map(|o| o.base);
    for damaged in std::iter::once(digest).chain(base.as_deref()) {
        let _ = state.blobs.remove(damaged);
    }
}

/// An upload's declared length (Content-Length), and whether it is sent as parts.
fn upload_headers(req: &Request<Incoming>) -> (Option<u64>, bool) {
    let expected_len = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let as_parts = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes() == BLOB_PARTS_TYPE.as_bytes());
    (expected_len, as_parts)
}

/// Makes a blob just stored known to the store (and eviction), or the answer to give.
fn recorded(state: &AppState, meta: &BlobMeta) -> Result<(), Response<Body>> {
    record_blob(state, meta).map_err(record_refused)
}

/// Makes a blob just stored known to the records.
fn record_blob(state: &AppState, meta: &BlobMeta) -> Result<(), crate::store::StoreError> {
    state.metrics.bytes_in.fetch_add(meta.size, Ordering::Relaxed);
    // Just stored counts as just used: eviction must not take a blob whose record is about
    // to be written. Touched before the blob is known, so that a pass running meanwhile
    // never sees it without its use (as never used: first to go).
    let _ = state.records.touch(&meta.digest, super::now_ms());
    // The file is durable; only now may the store (and records) know the blob.
    state.records.put_blob(meta).and_then(|_| state.records.flush())?;
    state.evict_wake.notify_one();
    Ok(())
}

/// The answer when a blob stored cannot be recorded.
fn record_refused(e: crate::store::StoreError) -> Response<Body> {
    error(
        StatusCode::INSUFFICIENT_STORAGE,
        e.to_string(),
        "free space on the store's disk",
    )
}

/// The answer to an upload that stored nothing.
fn refused(e: IngestError) -> Response<Body> {
    match e {
        e @ IngestError::TooLarge { .. } => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            e.to_string(),
            "nothing was stored; the daemon's owner can raise --max-blob-size",
        ),
        e @ IngestError::Stalled(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            e.to_string(),
            "nothing was stored; send the body without pausing",
        ),
        e @ IngestError::BaseMissing => error(
            StatusCode::NOT_FOUND,
            e.to_string(),
            "nothing was stored; upload the whole blob",
        ),
        e @ IngestError::BadParts(_) => error(
            StatusCode::BAD_REQUEST,
            e.to_string(),
            "nothing was stored; list parts that lie within the base blob, or upload the whole blob",
        ),
        e @ (IngestError::DigestMismatch { .. } | IngestError::Truncated { .. } | IngestError::Body(_)) => error(
            StatusCode::BAD_REQUEST,
            e.to_string(),
            "nothing was stored; upload the exact bytes of the blob under their sha256 digest",
        ),
        IngestError::Io(e) if crate::store::is_full(&e) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("the store's disk is full: {e}"),
            "nothing was stored; free space or lower --max-size",
        ),
        e => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            "nothing was stored; check the store's disk",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::byte_range;

    fn range(h: &str, len: u64) -> Option<(u64, u64)> {
        byte_range(&hyper::header::HeaderValue::from_str(h).unwrap(), len)
    }

    #[test]
    fn one_range_from_a_first_byte_is_served_and_nothing_else() {
        assert_eq!(range("bytes=10-", 100), Some((10, 90)));
        assert_eq!(range("bytes=10-19", 100), Some((10, 10)));
        assert_eq!(range("bytes=90-200", 100), Some((90, 10)));
        assert_eq!(range("bytes=100-", 100), Some((100, 0)), "the empty rest of a blob");
        assert_eq!(range("bytes=0-", 0), Some((0, 0)));
        for bad in [
            "bytes=101-",
            "bytes=-10",
            "bytes=5-4",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=x-",
            "bytes=100-100",
        ] {
            assert_eq!(range(bad, 100), None, "{bad}");
        }
    }
}
