//! Who may do what over TCP: bearer tokens. A token is 32 random bytes shown once at
//! creation (`lct_` and 64 hex digits); the daemon keeps only its SHA-256, and a presented
//! token's hash is compared with every stored one in constant time, so neither the answer
//! nor its timing tells how much of a guess was right. The Unix socket (owner-only) needs
//! no token: it is the admin interface where tokens are made.

use std::io::Read;
use std::sync::atomic::Ordering;

use hyper::{HeaderMap, Method, StatusCode};
use sha2::{Digest, Sha256};

use crate::api::{error, Body};
use crate::scopes;
use crate::state::AppState;
use crate::store::{Access, TokenRecord};

/// The prefix every token carries, so a leaked one is recognisable in logs and scanners.
pub const TOKEN_PREFIX: &str = "lct_";

/// A new random token.
pub fn generate() -> std::io::Result<String> {
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    Ok(format!("{TOKEN_PREFIX}{}", hex(&raw)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 of a token, hex: what is stored.
pub fn hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The stored token a presented one matches, comparing against every token.
pub fn find<'a>(tokens: &'a [TokenRecord], presented: &str) -> Option<&'a TokenRecord> {
    let h = hash(presented);
    let mut found = None;
    for t in tokens {
        if constant_time_eq(t.hash.as_bytes(), h.as_bytes()) {
            found = Some(t);
        }
    }
    found
}

/// Whether `access` allows `method` (reads are GET and HEAD; the rest write).
pub fn allows(access: Access, method: &Method) -> bool {
    access == Access::Write || matches!(*method, Method::GET | Method::HEAD)
}

/// Why a TCP request is refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer token was sent.
    #[error("this listener needs a token: no `Authorization: Bearer` header was sent")]
    Missing,
    /// The token is not one of this daemon's.
    #[error("the token is not known to this daemon (revoked, or made for another one)")]
    Unknown,
    /// A read token tried to write.
    #[error("token '{name}' may only read; {method} writes")]
    ReadOnly {
        /// The token's name.
        name: String,
        /// The method tried.
        method: Method,
    },
    /// A scoped write token tried to write outside its scopes.
    #[error("token '{name}' may write only into scopes matching '{pattern}', not {what}")]
    OutOfScope {
        /// The token's name.
        name: String,
        /// Its scope pattern.
        pattern: String,
        /// What was tried.
        what: String,
    },
    /// The tokens could not be read.
    #[error("cannot read the tokens: {0}")]
    Store(String),
}

impl AuthError {
    /// The answer to give.
    pub fn response(&self) -> hyper::Response<Body> {
        let (status, hint) = match self {
            Self::Missing => (
                StatusCode::UNAUTHORIZED,
                "create one on the daemon's machine with `lcache token create NAME --access read|write` and pass it with --token-file or LCACHE_TOKEN",
            ),
            Self::Unknown => (StatusCode::UNAUTHORIZED, "ask the daemon's owner for a token: `lcache token create NAME`"),
            Self::ReadOnly { .. } => (
                StatusCode::FORBIDDEN,
                "use a token made with --access write to store into this cache",
            ),
            Self::OutOfScope { .. } => (
                StatusCode::FORBIDDEN,
                "build with a --scope the token allows, or use a token made for this scope",
            ),
            Self::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "check the store's disk"),
        };
        error(status, self.to_string(), hint)
    }
}

/// What a request writes, for a scoped token's check.
#[derive(Debug, Clone, Copy)]
pub enum Writes<'a> {
    /// A step record into this scope.
    Step(&'a str),
    /// A blob (shared by every scope).
    Blob,
    /// Anything else (images, builds, …).
    Other,
}

/// Checks the request's bearer token against the stored ones and what it may do.
pub fn authorize(state: &AppState, headers: &HeaderMap, method: &Method, writes: Writes<'_>) -> Result<(), AuthError> {
    let outcome = check(state, headers, method, writes);
    if matches!(
        outcome,
        Err(AuthError::Missing | AuthError::Unknown | AuthError::ReadOnly { .. } | AuthError::OutOfScope { .. })
    ) {
        state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
    }
    outcome
}

fn check(state: &AppState, headers: &HeaderMap, method: &Method, writes: Writes<'_>) -> Result<(), AuthError> {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(AuthError::Missing)?;
    let tokens = state.records.tokens().map_err(|e| AuthError::Store(e.to_string()))?;
    let token = find(&tokens, presented).ok_or(AuthError::Unknown)?;
    if !allows(token.access, method) {
        return Err(AuthError::ReadOnly {
            name: token.name.clone(),
            method: method.clone(),
        });
    }
    if let (Some(pattern), false) = (&token.scope, matches!(*method, Method::GET | Method::HEAD)) {
        let out_of_scope = |what: String| AuthError::OutOfScope {
            name: token.name.clone(),
            pattern: pattern.clone(),
            what,
        };
        match writes {
            Writes::Blob => {}
            Writes::Step(scope) if scopes::matches(pattern, scope) => {}
            Writes::Step(scope) => {
                return Err(out_of_scope(if scope.is_empty() {
                    "unscoped records".into()
                } else {
                    format!("scope '{scope}'")
                }))
            }
            Writes::Other => return Err(out_of_scope("images or builds".into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_found_only_by_their_exact_value() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        let stored = vec![TokenRecord {
            name: "ci".into(),
            hash: hash(&a),
            access: Access::Read,
            created_at_ms: 0,
            scope: None,
        }];
        assert_eq!(find(&stored, &a).map(|t| t.name.as_str()), Some("ci"));
        assert!(find(&stored, &b).is_none());
        assert!(find(&stored, &a[..a.len() - 1]).is_none());
        assert!(
            !stored[0].hash.contains(&a[TOKEN_PREFIX.len()..]),
            "only the hash is kept"
        );
    }

    #[test]
    fn read_tokens_only_read() {
        assert!(allows(Access::Read, &Method::GET) && allows(Access::Read, &Method::HEAD));
        assert!(!allows(Access::Read, &Method::PUT) && !allows(Access::Read, &Method::POST));
        assert!(allows(Access::Write, &Method::PUT));
    }
}
