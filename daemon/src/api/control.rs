//! Status, plan and metrics.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use lcache_proto::wire::{CacheStats, PlanInputs, StatusResponse};

use super::{error, json, read_json, store_failed, stored, Body};
use crate::context_index::IndexError;
use crate::planner::{plan_build, PlanError};
use crate::state::AppState;
use std::sync::atomic::Ordering;

/// `GET /v1/status`.
pub fn status(state: &AppState) -> Response<Body> {
    let (steps, blobs, blob_bytes, builds) = match state.records.counts() {
        Ok(c) => c,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
                "check the store's disk",
            )
        }
    };
    json(
        StatusCode::OK,
        &StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            store: state.store_dir.display().to_string(),
            listen: state.listen.clone(),
            uptime_s: state.started.elapsed().as_secs(),
            stats: CacheStats {
                steps,
                blobs,
                blob_bytes,
                builds,
                hits: state.metrics.hits.load(Ordering::Relaxed),
                misses: state.metrics.misses.load(Ordering::Relaxed),
            },
            contexts: state.index.statuses(),
            upstream: state.upstream.as_ref().map(|u| u.status()),
        },
    )
}

/// `POST /v1/plan`.
pub async fn plan(state: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let inputs: PlanInputs = match read_json(state, req).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let st = state.clone();
    // Walking and hashing block: keep them off the async workers.
    let result = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let plan = plan_build(&st.index, st.records.as_ref(), &inputs);
        // Only a plan that walked or read a large tree freed enough to be worth handing back.
        if started.elapsed() > std::time::Duration::from_millis(50) {
            crate::memory_release::release_free_memory();
        }
        plan
    })
    .await;
    match result {
        Ok(Ok(resp)) => {
            crate::listing_gc::ListingCollector::maybe_start(state);
            json(StatusCode::OK, &resp)
        }
        Ok(Err(PlanError::Dockerfile(e))) => error(
            StatusCode::BAD_REQUEST,
            format!("{}: {}", e.location, e.message),
            e.hint,
        ),
        Ok(Err(e @ (PlanError::Select { .. } | PlanError::BadContext(_)))) => error(
            StatusCode::BAD_REQUEST,
            e.to_string(),
            "fix the path or the Dockerfile and plan again",
        ),
        Ok(Err(PlanError::Store(e) | PlanError::Index(IndexError::Store(e)))) => store_failed(&e),
        Ok(Err(PlanError::Index(e))) => error(
            StatusCode::BAD_REQUEST,
            e.to_string(),
            "the daemon must be able to read the context",
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("planning failed: {e}"),
            "report this bug with the Dockerfile",
        ),
    }
}

/// `GET /metrics`.
pub fn metrics(state: &AppState) -> Response<Body> {
    let mut r = Response::new(super::full(state.metrics.render()));
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// `GET /v1/dir-nodes/{digest}`: a directory's listing by its node digest.
pub fn dir_node(state: &AppState, digest: &str) -> Response<Body> {
    stored(
        state.records.get_dir_node(digest),
        format!("no directory node {digest}"),
        "directory nodes exist for the directories of sources digests a plan computed",
    )
}

/// `GET /v1/summaries/{digest}`: the Merkle summary behind a sources digest.
pub fn summary(state: &AppState, digest: &str) -> Response<Body> {
    stored(
        state.records.get_summary(digest),
        format!("no summary for sources digest {digest}"),
        "summaries exist for digests a plan computed",
    )
}

/// `POST /v1/upstream/sync`: waits until every stored record is pushed to the upstream;
/// 502 with what was not, if anything.
pub async fn sync(state: &AppState) -> Response<Body> {
    let Some(u) = &state.upstream else {
        return error(
            StatusCode::CONFLICT,
            "this lcached has no upstream",
            "start it with --upstream ADDR to push to a shared cache",
        );
    };
    let report = u.sync(SYNC_DEADLINE, &state.metrics).await;
    if report.failed.is_empty() {
        json(StatusCode::OK, &report)
    } else {
        error(
            StatusCode::BAD_GATEWAY,
            format!(
                "{} step records were not pushed to {}: {}",
                report.failed.len(),
                report.upstream,
                report.failed.join("; ")
            ),
            "check that the upstream is reachable and the token may write; the next `lcache cache sync` tries them again",
        )
    }
}

/// How long a sync waits for the push queue.
const SYNC_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);
