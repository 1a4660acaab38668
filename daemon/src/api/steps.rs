//! `GET/PUT /v1/steps/{key}`: a hit is a record, a miss a 404.

use std::sync::atomic::Ordering;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use lcache_proto::wire::StepRecord;

use super::{error, json, now_ms, read_json, Body};
use crate::scopes::{BadScope, Scopes};
use crate::state::AppState;
use crate::store::StoreError;

fn valid_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn bad_key(key: &str) -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        format!("'{key}' is not a step key"),
        "a key is 64 lower-case hex digits, as `lcache keys` prints",
    )
}

fn bad_scope(e: BadScope) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, e.to_string(), "see docs/ci.md on scopes")
}

/// The first record for `key` along the lookup order, and the scope it was found in.
fn find(state: &AppState, key: &str, scopes: &Scopes) -> Result<Option<(String, StepRecord)>, StoreError> {
    for scope in scopes.lookup_order() {
        if let Some(r) = state.records.get_step(scope, key)? {
            return Ok(Some((scope.to_string(), r)));
        }
    }
    Ok(None)
}

/// `GET /v1/steps/{key}[?scope=S&fallback=F…]`: the first record along the scopes; a local
/// miss is looked up in the upstream, if there is one. The scope that answered is in the
/// `lcache-scope` header.
pub async fn get(state: &AppState, key: &str, query: Option<&str>) -> Response<Body> {
    if !valid_key(key) {
        return bad_key(key);
    }
    let scopes = match Scopes::from_query(query) {
        Ok(s) => s,
        Err(e) => return bad_scope(e),
    };
    let mut found = find(state, key, &scopes);
    let mut upstream_unavailable = None;
    if let (Ok(None), Some(u)) = (&found, &state.upstream) {
        found = Ok(match u.fetch_step(key, &scopes, state).await {
            crate::upstream::Lookup::Found(f) => Some(*f),
            crate::upstream::Lookup::Missed => None,
            crate::upstream::Lookup::Unavailable(why) => {
                upstream_unavailable = Some(why);
                None
            }
        });
    }
    match found {
        Ok(Some((scope, rec))) => {
            state.metrics.hits.fetch_add(1, Ordering::Relaxed);
            state.metrics.count_scope(&scopes.scope, true);
            if let Some(l) = &rec.layer {
                // Access times only steer eviction; a failed update must not fail the hit.
                let _ = state.records.touch(&l.digest, now_ms());
            }
            let mut r = json(StatusCode::OK, &rec);
            if let Ok(v) = hyper::header::HeaderValue::from_str(&scope) {
                r.headers_mut().insert("lcache-scope", v);
            }
            r
        }
        Ok(None) => {
            state.metrics.misses.fetch_add(1, Ordering::Relaxed);
            state.metrics.count_scope(&scopes.scope, false);
            let why = if state.records.was_evicted(&scopes.scope, key).unwrap_or(false) {
                "its record was evicted to stay under --max-size"
            } else {
                "no record for it"
            };
            super::error_body(
                StatusCode::NOT_FOUND,
                lcache_proto::wire::ErrorBody {
                    error: format!("step {key}: {why}"),
                    hint: "a miss: run the step, upload its layer, then PUT its record".into(),
                    upstream_unavailable,
                },
            )
        }
        Err(e) => super::store_failed(&e),
    }
}

/// What a `PUT` of a step record came to.
pub enum Stored {
    /// Stored.
    New(StepRecord),
    /// The same layer was stored for the key already.
    Same(StepRecord),
    /// Another layer was stored for the key first; kept.
    Conflict(StepRecord),
}

/// `PUT /v1/steps/{key}[?scope=S]`: the record's layer blob must already be stored.
pub async fn put(state: &AppState, key: &str, req: Request<Incoming>) -> Response<Body> {
    if !valid_key(key) {
        return bad_key(key);
    }
    let scope = match Scopes::from_query(req.uri().query()) {
        Ok(s) => s.scope,
        Err(e) => return bad_scope(e),
    };
    let mut rec: StepRecord = match read_json(state, req).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    if rec.key.is_empty() {
        rec.key = key.to_string();
    } else if rec.key != key {
        return error(
            StatusCode::BAD_REQUEST,
            format!("the record is for key {} but was sent to {key}", rec.key),
            "PUT a record to its own key",
        );
    }
    if let Some(layer) = &mut rec.layer {
        match state.records.get_blob(&layer.digest) {
            Ok(Some(meta)) => {
                layer.blake3 = meta.blake3;
                layer.size = meta.size;
            }
            Ok(None) => {
                return error(
                    StatusCode::CONFLICT,
                    format!("layer blob {} is not in the store", layer.digest),
                    format!(
                        "PUT the blob to /v1/blobs/{} first; a record may only point to a stored blob",
                        layer.digest
                    ),
                )
            }
            Err(e) => return super::store_failed(&e),
        }
    }
    match keep_first(state, &scope, rec).await {
        Ok(Ok(Stored::New(rec))) => json(StatusCode::CREATED, &rec),
        Ok(Ok(Stored::Same(old))) => json(StatusCode::OK, &old),
        Ok(Ok(Stored::Conflict(old))) => error(
            StatusCode::CONFLICT,
            format!(
                "step {key} already has a record pointing at layer {}; the first writer wins, so it is kept",
                old.layer.as_ref().map_or("(none)", |l| l.digest.as_str())
            ),
            "nothing to do: a step that does not rebuild byte for byte keeps the first layer stored for its key",
        ),
        Ok(Err(e)) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            e.to_string(),
            "free space on the store's disk",
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), "report this bug"),
    }
}

/// Stores `rec` (its layer's blob stored) in `scope` unless its key has a record there
/// already, durably; a new one is queued for the upstream, a conflict counted.
pub async fn keep_first(
    state: &AppState,
    scope: &str,
    mut rec: StepRecord,
) -> Result<Result<Stored, crate::store::StoreError>, tokio::task::JoinError> {
    rec.created_at_ms = now_ms();
    let records = state.records.clone();
    let in_scope = scope.to_string();
    let stored = tokio::task::spawn_blocking(move || {
        let scope = in_scope;
        // First writer wins: a key never comes to point at another layer, so nobody can
        // re-point a key others hit at a layer of their own (cache poisoning). A record
        // whose layer is gone from the store may be replaced: that is how a lost layer is
        // rebuilt.
        let outcome = match records.put_step_first(&scope, &rec)? {
            None => Stored::New(rec),
            Some(old) if old.layer.as_ref().map(|l| &l.digest) == rec.layer.as_ref().map(|l| &l.digest) => {
                Stored::Same(old)
            }
            Some(old) => match &old.layer {
                Some(l) if records.get_blob(&l.digest)?.is_none() => {
                    records.put_step(&scope, &rec)?;
                    Stored::New(rec)
                }
                _ => Stored::Conflict(old),
            },
        };
        // Acknowledge only what survives a crash.
        records.flush()?;
        Ok::<_, crate::store::StoreError>(outcome)
    })
    .await;
    match &stored {
        Ok(Ok(Stored::New(rec))) => state.upstream_push(scope, rec),
        Ok(Ok(Stored::Conflict(_))) => {
            state.metrics.step_conflicts.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    stored
}
