//! `HEAD/GET/PUT /v1/blobs/{digest}`: raw byte streams, verified against their digest.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::io::AsyncReadExt;

use super::{error, json, Body};
use crate::state::AppState;
use crate::store::blob_store::{sha256_hex, IngestError};
use crate::store::BlobMeta;

const CHUNK: usize = 256 * 1024;

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
    state.records.get_blob(d).map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            "check the daemon's store",
        )
    })
}

fn not_found(d: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        format!("blob {d} is not in the store"),
        "upload it with PUT /v1/blobs/{digest}",
    )
}

/// `HEAD /v1/blobs/{digest}`.
pub fn head(state: &AppState, d: &str) -> Response<Body> {
    match stored(state, d) {
        Ok(Some(m)) => Response::builder()
            .status(StatusCode::OK)
            .header("content-length", m.size)
            .body(super::full(""))
            .unwrap_or_else(|_| Response::new(super::full(""))),
        Ok(None) => {
            let mut r = Response::new(super::full(""));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
        Err(r) => r,
    }
}

/// `GET /v1/blobs/{digest}`: streamed from the file.
pub async fn get(state: &AppState, d: &str) -> Response<Body> {
    let meta = match stored(state, d) {
        Ok(Some(m)) => m,
        Ok(None) => return not_found(d),
        Err(r) => return r,
    };
    let Some(path) = state.blobs.path_of(d) else {
        return bad_digest(d);
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("blob {d} is recorded but unreadable: {e}"),
                "the store was changed behind the daemon's back; re-upload the blob",
            )
        }
    };
    state.metrics.bytes_out.fetch_add(meta.size, Ordering::Relaxed);
    let chunks = stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; CHUNK];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Frame::data(Bytes::from(buf))), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .header("content-length", meta.size)
        .body(StreamBody::new(chunks).boxed())
        .unwrap_or_else(|_| Response::new(super::full("")))
}

/// `PUT /v1/blobs/{digest}`: stored only if the bytes hash to the digest and all arrived.
pub async fn put(state: &AppState, d: &str, req: Request<Incoming>) -> Response<Body> {
    match stored(state, d) {
        Ok(Some(m)) => return json(StatusCode::OK, &m),
        Ok(None) => {}
        Err(r) => return r,
    }
    let expected_len = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match state.blobs.ingest(d, req.into_body(), expected_len).await {
        Ok(meta) => {
            state.metrics.bytes_in.fetch_add(meta.size, Ordering::Relaxed);
            // The file is durable; only now may the store (and records) know the blob.
            if let Err(e) = state.records.put_blob(&meta).and_then(|_| state.records.flush()) {
                return error(
                    StatusCode::INSUFFICIENT_STORAGE,
                    e.to_string(),
                    "free space on the store's disk",
                );
            }
            json(StatusCode::CREATED, &meta)
        }
        Err(e @ (IngestError::DigestMismatch { .. } | IngestError::Truncated { .. } | IngestError::Body(_))) => error(
            StatusCode::BAD_REQUEST,
            e.to_string(),
            "nothing was stored; upload the exact bytes of the blob under their sha256 digest",
        ),
        Err(IngestError::Io(e)) if e.raw_os_error() == Some(28) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("the store's disk is full: {e}"),
            "nothing was stored; free space or lower --max-size",
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            "nothing was stored; check the store's disk",
        ),
    }
}
