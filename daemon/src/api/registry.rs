//! `POST /v1/images/pull` and `POST /v1/images/push`: images from and to registries, with
//! the credentials the client read from Docker's config. Served on the Unix socket only:
//! registry credentials never travel to a shared cache.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use lcache_proto::wire::{PullRequest, PushRequest};

use super::{error, json, read_json, Body};
use crate::state::AppState;

/// `POST /v1/images/pull`.
pub async fn pull(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let body: PullRequest = match read_json(state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match crate::registry_pull::pull(state, &body).await {
        Ok(r) => json(StatusCode::OK, &r),
        Err(e) => error(e.status(), e.to_string(), ""),
    }
}

/// `POST /v1/images/push`.
pub async fn push(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let body: PushRequest = match read_json(state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match crate::registry_push::push(state, &body).await {
        Ok(r) => json(StatusCode::OK, &r),
        Err(e) => error(e.status(), e.to_string(), ""),
    }
}
