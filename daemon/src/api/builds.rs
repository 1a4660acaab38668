//! `POST/GET /v1/builds`, `GET /v1/builds/{id}`: the build history.

use std::sync::atomic::Ordering;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;

use lcache_image::image_draft::DeferredBuild;
use lcache_image::layer_segments::tar_state_is_valid;
use lcache_proto::wire::{is_provisional, BuildRecord};

use super::{error, json, now_ms, read_json, stored, Body};
use crate::state::AppState;

/// A new build's id: fixed-width hex of the time first, so ids sort by time in the store.
fn new_id(state: &AppState) -> String {
    format!(
        "{:012x}{:04x}",
        now_ms(),
        state.build_seq.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

/// `POST /v1/builds`: stores a finished build, assigning its id.
pub async fn post(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let mut b: BuildRecord = match read_json(state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    b.id = new_id(state);
    match state
        .records
        .put_build(&b, state.limits.max_builds)
        .and_then(|_| state.records.flush())
    {
        Ok(()) => json(StatusCode::CREATED, &b),
        Err(e) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            e.to_string(),
            "free space on the store's disk",
        ),
    }
}

/// `POST /v1/builds/deferred` (the daemon's socket only): a build whose image waits for the
/// diff_ids `POST /v1/layers` started taking; stored like a finished build, its image left
/// empty until lcached has named it (`deferred_naming`). Answers the build as recorded.
pub async fn post_deferred(state: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let mut d: DeferredBuild = match read_json(state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Some(why) = d.malformed() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("the build cannot be named here: {why}"),
            "send the image's layers and each layer POST /v1/layers named, with the tail it was named by",
        );
    }
    if let Some(l) = d.layers.iter().find(|l| !tar_state_is_valid(&l.tail.tar_state)) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "layer {}: the tar's state in front of the change is not a SHA-256 state",
                l.at
            ),
            "send the tail the layer was named with",
        );
    }
    if d.tags.iter().any(|t| t.is_empty()) {
        return error(
            StatusCode::BAD_REQUEST,
            "'' is not an image name",
            "tag the image with names such as app:latest",
        );
    }
    for t in &mut d.tags {
        *t = lcache_proto::wire::normalize_image_name(t);
    }
    for l in &d.layers {
        let digest = l.record.layer.as_ref().map_or("", |r| r.digest.as_str());
        // A provisional name is resolved as the build is named.
        let known = if is_provisional(digest) {
            state.provisional.known(&*state.records, digest)
        } else {
            matches!(state.records.get_blob(digest), Ok(Some(_)))
        };
        if !known {
            return error(
                StatusCode::CONFLICT,
                format!("layer {digest} is not stored"),
                "name the layer with POST /v1/layers first",
            );
        }
    }
    d.build.id = new_id(state);
    d.build.image = String::new();
    match crate::deferred_naming::start(state, d.clone()) {
        Ok(()) => json(StatusCode::CREATED, &d.build),
        Err(e) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            e.to_string(),
            "free space on the store's disk",
        ),
    }
}

/// `GET /v1/builds?limit=N[&context=C]`: newest first, of one context if asked (C
/// percent-encoded).
pub fn list(state: &AppState, query: Option<&str>) -> Response<Body> {
    let param = |name: &str| {
        query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    let context = match param("context").map(|c| percent_encoding::percent_decode_str(c).decode_utf8()) {
        None => None,
        Some(Ok(c)) => Some(c.into_owned()),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the context is not UTF-8 once decoded",
                "percent-encode the context directory's path as UTF-8",
            )
        }
    };
    let limit = param("limit").map(|v| v.parse::<usize>());
    let limit = match limit {
        None => 20,
        Some(Ok(n)) => n.min(1000),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "limit is not a number", "write ?limit=20"),
    };
    match state.records.recent_builds(limit, context.as_deref()) {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => super::store_failed(&e),
    }
}

/// `GET /v1/builds/{id}`.
pub fn get(state: &AppState, id: &str) -> Response<Body> {
    stored(
        state.records.get_build(id),
        format!("no build {id}"),
        "list builds with GET /v1/builds",
    )
}
