//! `POST /v1/tokens`, `GET /v1/tokens`, `DELETE /v1/tokens/{name}`: making and revoking the
//! tokens TCP clients show. Served only on the Unix socket (the owner's admin interface).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use lcache_proto::wire::{TokenCreated, TokenInfo, TokenRequest};

use super::{error, json, now_ms, read_json, Body};
use crate::state::AppState;
use crate::store::{Access, TokenRecord};
use crate::token_auth;

fn access_name(a: Access) -> &'static str {
    match a {
        Access::Read => "read",
        Access::Write => "write",
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// `POST /v1/tokens {name, access}`: a new token, shown once; an existing name is replaced.
pub async fn create(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let r: TokenRequest = match read_json(state, req).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    if !valid_name(&r.name) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("'{}' is not a token name", r.name),
            "use up to 64 letters, digits, `-`, `_` or `.`",
        );
    }
    let access = match r.access.as_str() {
        "read" => Access::Read,
        "write" => Access::Write,
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("'{other}' is not an access level"),
                "use --access read (lookups and downloads) or --access write (also uploads)",
            )
        }
    };
    let token = match token_auth::generate() {
        Ok(t) => t,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read /dev/urandom: {e}"),
                "check the machine",
            )
        }
    };
    if r.scope.as_deref().is_some_and(|p| p.is_empty() || p.len() > 128) {
        return error(
            StatusCode::BAD_REQUEST,
            "a scope pattern is 1 to 128 characters",
            "write e.g. --scope 'pr-*' or --scope main",
        );
    }
    let rec = TokenRecord {
        name: r.name.clone(),
        hash: token_auth::hash(&token),
        access,
        created_at_ms: now_ms(),
        scope: r.scope.clone(),
    };
    if let Err(e) = state.records.put_token(&rec) {
        return error(
            StatusCode::INSUFFICIENT_STORAGE,
            e.to_string(),
            "free space on the store's disk",
        );
    }
    json(
        StatusCode::CREATED,
        &TokenCreated {
            name: r.name,
            access: access_name(access).into(),
            token,
        },
    )
}

/// `GET /v1/tokens`: names and access, never the tokens.
pub fn list(state: &AppState) -> Response<Body> {
    match state.records.tokens() {
        Ok(ts) => json(
            StatusCode::OK,
            &ts.iter()
                .map(|t| TokenInfo {
                    name: t.name.clone(),
                    access: access_name(t.access).into(),
                    created_at_ms: t.created_at_ms,
                    scope: t.scope.clone(),
                })
                .collect::<Vec<_>>(),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            "check the store's disk",
        ),
    }
}

/// `DELETE /v1/tokens/{name}`: the token stops working at once.
pub fn revoke(state: &AppState, name: &str) -> Response<Body> {
    match state.records.remove_token(name) {
        Ok(true) => json(StatusCode::OK, &serde_json::json!({"revoked": name})),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("no token named '{name}'"),
            "`lcache token ls` lists them",
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            "check the store's disk",
        ),
    }
}
