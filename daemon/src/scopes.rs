//! Scopes: step records live in a scope (a branch, say), lookups try the build's scope and
//! then its fallbacks (`?scope=pr-42&fallback=main`), and a write token may be limited to
//! scopes matching a pattern. Blobs are shared across scopes. No scope is the unscoped
//! records every local build uses.

use crate::api::images::percent_decode;

/// The longest scope name.
const MAX_SCOPE: usize = 128;

/// A request's scopes: where records are written, and the order lookups try.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    /// Where records are written (`""`: unscoped).
    pub scope: String,
    /// Where lookups go after `scope`, in order.
    pub fallbacks: Vec<String>,
}

/// Why a scope in a request is refused.
#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a scope name: use 1 to 128 letters, digits, `.`, `_`, `-` or `/`")]
pub struct BadScope(pub String);

fn valid(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_SCOPE && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
}

impl Scopes {
    /// From a query string (`scope=…&fallback=…&fallback=…`).
    pub fn from_query(query: Option<&str>) -> Result<Self, BadScope> {
        let mut out = Self::default();
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| BadScope(v.to_string()))?;
            match k {
                "scope" | "fallback" if !valid(&v) => return Err(BadScope(v)),
                "scope" => out.scope = v,
                "fallback" => out.fallbacks.push(v),
                _ => {}
            }
        }
        Ok(out)
    }

    /// The scopes a lookup tries, in order.
    pub fn lookup_order(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.scope.as_str()).chain(self.fallbacks.iter().map(String::as_str))
    }

    /// The query string that names these scopes (empty for none).
    pub fn query(&self) -> String {
        let mut parts = Vec::new();
        if !self.scope.is_empty() {
            parts.push(format!("scope={}", self.scope));
        }
        parts.extend(self.fallbacks.iter().map(|f| format!("fallback={f}")));
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    }
}

/// Whether `scope` matches a token's `pattern`: `*` stands for any run of characters.
pub fn matches(pattern: &str, scope: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == scope,
        Some((head, rest)) => {
            let Some(tail) = scope.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|i| tail.is_char_boundary(*i))
                .any(|i| matches(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_read_from_the_query_in_order() {
        let s = Scopes::from_query(Some("scope=pr-42&fallback=main&fallback=release%2F1")).unwrap();
        assert_eq!(s.lookup_order().collect::<Vec<_>>(), ["pr-42", "main", "release/1"]);
        assert_eq!(s.query(), "?scope=pr-42&fallback=main&fallback=release/1");
        assert_eq!(
            Scopes::from_query(None).unwrap().lookup_order().collect::<Vec<_>>(),
            [""]
        );
        assert!(Scopes::from_query(Some("scope=a%00b")).is_err());
        assert!(Scopes::from_query(Some("scope=")).is_err());
    }

    #[test]
    fn patterns_match_with_stars() {
        assert!(matches("pr-*", "pr-42"));
        assert!(matches("*", ""));
        assert!(matches("main", "main"));
        assert!(!matches("main", "main2"));
        assert!(!matches("pr-*", "main"));
        assert!(matches("team/*/ci", "team/a/ci"));
    }
}
