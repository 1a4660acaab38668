//! The HTTP API, `/v1` (see docs/api.md): routing, JSON helpers and the `{error, hint}`
//! body every error carries.

// Handlers return early with a ready error response; a response is built once per request,
// so boxing it to shrink `Result` would cost more than it saves.
#![allow(clippy::result_large_err)]

pub(crate) mod blobs;
mod builds;
mod control;
pub mod images;
mod registry;
pub(crate) mod steps;
mod tokens;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use lcache_proto::wire::ErrorBody;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::state::AppState;

/// Every response body.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// The largest JSON control body accepted (Dockerfiles included).
pub const JSON_LIMIT: usize = 4 << 20;

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    match serde_json::to_vec(v) {
        Ok(bytes) => Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(full(bytes))
            .unwrap_or_else(|_| Response::new(full(""))),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}"),
            "report this bug",
        ),
    }
}

/// An error response with the `{error, hint}` body.
pub fn error(status: StatusCode, error: impl Into<String>, hint: impl Into<String>) -> Response<Body> {
    error_body(
        status,
        ErrorBody {
            error: error.into(),
            hint: hint.into(),
            upstream_unavailable: None,
        },
    )
}

/// An error answer with `body` as it is.
pub fn error_body(status: StatusCode, body: ErrorBody) -> Response<Body> {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut r = Response::new(full(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The answer when the store failed: 507 and where to make room when its disk is full,
/// else 500.
pub fn store_failed(e: &crate::store::StoreError) -> Response<Body> {
    match e {
        crate::store::StoreError::Full(_) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            e.to_string(),
            "free space on the disk holding lcached's store (or lower its --max-size), then try again",
        ),
        _ => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            "check the daemon's store",
        ),
    }
}

/// A value looked up in the store: 200 with it, 404 (`missing`, `hint`) without it, 500 when
/// the store failed.
pub fn stored<T: Serialize>(
    found: Result<Option<T>, crate::store::StoreError>,
    missing: String,
    hint: &str,
) -> Response<Body> {
    match found {
        Ok(Some(v)) => json(StatusCode::OK, &v),
        Ok(None) => error(StatusCode::NOT_FOUND, missing, hint),
        Err(e) => store_failed(&e),
    }
}

/// Reads a JSON body of at most [`JSON_LIMIT`] bytes, within the body timeout.
pub async fn read_json<T: DeserializeOwned>(state: &AppState, req: Request<Incoming>) -> Result<T, Response<Body>> {
    read_json_within(state, req, JSON_LIMIT).await
}

/// Reads a JSON body of at most `limit` bytes, within the body timeout.
pub async fn read_json_within<T: DeserializeOwned>(
    state: &AppState,
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, Response<Body>> {
    let timeout = state.limits.body_timeout;
    let collected = match tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect()).await {
        Ok(c) => c,
        Err(_) => {
            return Err(error(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {timeout:?}"),
                "send the whole body at once",
            ))
        }
    };
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than {} MiB", limit >> 20),
                "control requests are small JSON documents; blobs go to PUT /v1/blobs/{digest}",
            ))
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
                "send the whole body",
            ))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON for this endpoint: {e}"),
            "see docs/api.md for the expected shape",
        )
    })
}

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The Unix socket: a process on this machine, with this machine's files.
    Local,
    /// TCP: possibly another machine.
    Network,
}

/// Answers one request.
/// Whether a request reads step records, builds or images, which a build being named
/// (`deferred_naming`) is about to store: it is answered once they are.
fn reads_what_builds_being_named_store(method: &Method, segs: &[&str]) -> bool {
    match segs {
        ["v1", "plan"] | ["v1", "upstream", "sync"] => true,
        ["v1", "steps", _] | ["v1", "builds"] | ["v1", "builds", _] => method == Method::GET,
        ["v1", "images", ..] => true,
        _ => false,
    }
}

pub async fn route(state: Arc<AppState>, req: Request<Incoming>, origin: Origin) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if origin == Origin::Network {
        let scope = crate::scopes::Scopes::from_query(req.uri().query())
            .unwrap_or_default()
            .scope;
        let writes = match segs.as_slice() {
            ["v1", "steps", _] => crate::token_auth::Writes::Step(&scope),
            ["v1", "blobs", _] => crate::token_auth::Writes::Blob,
            _ => crate::token_auth::Writes::Other,
        };
        if let Err(e) = crate::token_auth::authorize(&state, req.headers(), &method, writes) {
            let refused = e.response();
            state
                .metrics
                .observe("other", refused.status().as_u16(), started.elapsed());
            return refused;
        }
    }
    if reads_what_builds_being_named_store(&method, &segs) {
        state.deferred.settled().await;
    }
    let (label, response) = match (&method, segs.as_slice()) {
        // Tokens are made and the upstream synced by the daemon's owner, on its socket; a
        // build is handed over to be named only by a client trusted with the diff_ids it
        // would record (see `POST /v1/layers`).
        (
            _,
            ["v1", "tokens", ..]
            | ["v1", "upstream", ..]
            | ["v1", "images", "pull" | "push"]
            | ["v1", "builds", "deferred"],
        ) if origin == Origin::Network => (
            "other",
            error(
                StatusCode::FORBIDDEN,
                format!("{path} is served only on the daemon's Unix socket"),
                "run this on the daemon's machine, as its owner",
            ),
        ),
        (&Method::POST, ["v1", "tokens"]) => ("other", tokens::create(&state, req).await),
        (&Method::GET, ["v1", "tokens"]) => ("other", tokens::list(&state)),
        (&Method::DELETE, ["v1", "tokens", name]) => ("other", tokens::revoke(&state, name)),
        (&Method::POST, ["v1", "upstream", "sync"]) => ("other", control::sync(&state).await),
        (&Method::GET, ["v1", "status"]) => ("status", control::status(&state)),
        // Planning reads and lists files on this machine's disk: serving it over TCP would let
        // any remote client enumerate and fingerprint the daemon's filesystem.
        (&Method::POST, ["v1", "plan"]) if origin == Origin::Network => (
            "plan",
            error(
                StatusCode::FORBIDDEN,
                "plans read the build context from the daemon's own disk, so they are served only on its Unix socket",
                "run lcached on the machine that holds the context and plan through its socket",
            ),
        ),
        (&Method::POST, ["v1", "plan"]) => ("plan", control::plan(&state, req).await),
        // The layer's tar state in front of its change is the client's word, and the diff_id
        // taken from it would be recorded as the layer's: only a client trusted as the
        // socket's users are may send one. Others upload blobs by digest.
        (&Method::POST, ["v1", "layers"]) if origin == Origin::Network => (
            "other",
            error(
                StatusCode::FORBIDDEN,
                "POST /v1/layers is served only on the daemon's Unix socket",
                "upload the layer with PUT /v1/blobs/{digest} (whole or as parts)",
            ),
        ),
        (&Method::POST, ["v1", "layers"]) => ("blobs_put", blobs::post_layer(&state, req).await),
        // The body names files on this machine, which the daemon links into its store.
        (&Method::POST, ["v1", "layers", "linked"]) if origin == Origin::Network => (
            "other",
            error(
                StatusCode::FORBIDDEN,
                "POST /v1/layers/linked is served only on the daemon's Unix socket",
                "upload the layer's bytes with PUT /v1/blobs/{digest}",
            ),
        ),
        (&Method::POST, ["v1", "layers", "linked"]) => ("blobs_put", blobs::post_linked(&state, req).await),
        (&Method::POST, ["v1", "layers", "provisional"]) if origin == Origin::Network => (
            "other",
            error(
                StatusCode::FORBIDDEN,
                "POST /v1/layers/provisional is served only on the daemon's Unix socket",
                "resolve provisional names on the daemon that gave them",
            ),
        ),
        (&Method::POST, ["v1", "layers", "provisional"]) => ("other", blobs::post_provisional(&state, req).await),
        (&Method::POST, ["v1", "layers", _, "diff-id"]) if origin == Origin::Network => (
            "other",
            error(
                StatusCode::FORBIDDEN,
                "POST /v1/layers/{digest}/diff-id is served only on the daemon's Unix socket",
                "upload the layer with PUT /v1/blobs/{digest} (whole or as parts)",
            ),
        ),
        (&Method::POST, ["v1", "layers", d, "diff-id"]) => ("other", blobs::post_diff_id(&state, d, req).await),
        // Gzipping a layer takes cores: only the socket's users export.
        (&Method::POST, ["v1", "layers", _, "gzip"]) if origin == Origin::Network => (
            "other",
            error(
                StatusCode::FORBIDDEN,
                "POST /v1/layers/{digest}/gzip is served only on the daemon's Unix socket",
                "export through the lcached that holds the image",
            ),
        ),
        (&Method::POST, ["v1", "layers", d, "gzip"]) => ("other", blobs::post_gzip(&state, d).await),
        (&Method::GET, ["metrics"]) => ("other", control::metrics(&state)),
        (&Method::GET, ["v1", "steps", key]) => ("steps_get", steps::get(&state, key, req.uri().query()).await),
        (&Method::PUT, ["v1", "steps", key]) => ("steps_put", steps::put(&state, key, req).await),
        (&Method::HEAD, ["v1", "blobs", d]) => ("blobs_get", blobs::head(&state, d).await),
        (&Method::GET, ["v1", "blobs", d]) => {
            let gzip = crate::transit_gzip::names_gzip(req.headers().get("accept-encoding"));
            (
                "blobs_get",
                blobs::get(&state, d, req.headers().get("range"), gzip).await,
            )
        }
        (&Method::GET, ["v1", "blobs", d, "parts"]) => ("blobs_get", blobs::parts(&state, d).await),
        (&Method::GET, ["v1", "blobs", d, "sent"]) => ("blobs_get", blobs::sent(&state, d).await),
        (&Method::PUT, ["v1", "blobs", d]) => ("blobs_put", blobs::put(&state, d, req).await),
        (&Method::POST, ["v1", "builds"]) => ("builds", builds::post(&state, req).await),
        (&Method::POST, ["v1", "builds", "deferred"]) => ("builds", builds::post_deferred(&state, req).await),
        (&Method::GET, ["v1", "builds"]) => ("builds", builds::list(&state, req.uri().query())),
        (&Method::GET, ["v1", "builds", id]) => ("builds", builds::get(&state, id)),
        (&Method::GET, ["v1", "summaries", d]) => ("other", control::summary(&state, d)),
        (&Method::GET, ["v1", "dir-nodes", d]) => ("other", control::dir_node(&state, d)),
        (&Method::POST, ["v1", "images", "pull"]) => ("other", registry::pull(&state, req).await),
        (&Method::POST, ["v1", "images", "push"]) => ("other", registry::push(&state, req).await),
        (&Method::GET, ["v1", "images"]) => ("other", images::list(&state, req.uri().query())),
        (&Method::GET, ["v1", "images", name]) => ("other", images::get(&state, name).await),
        (&Method::PUT, ["v1", "images", name]) => ("other", images::put(&state, name, req).await),
        (&Method::DELETE, ["v1", "images", name]) => ("other", images::delete(&state, name)),
        (
            _,
            ["v1", "status" | "plan"]
            | ["metrics"]
            | ["v1", "steps" | "blobs", _]
            | ["v1", "builds"]
            | ["v1", "builds", _],
        ) => (
            "other",
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
                "see docs/api.md for each endpoint's methods",
            ),
        ),
        _ => (
            "other",
            error(
                StatusCode::NOT_FOUND,
                format!("no endpoint {method} {path}"),
                "endpoints live under /v1; see docs/api.md",
            ),
        ),
    };
    state
        .metrics
        .observe(label, response.status().as_u16(), started.elapsed());
    response
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
