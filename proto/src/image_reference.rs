//! Whether a string is an image reference Docker accepts: `[HOST[:PORT]/]NAME[:TAG][@DIGEST]`
//! with Docker's rules (lower-case path components, a tag of up to 128 word characters,
//! `.` and `-`, a digest `algorithm:hex`), so `FROM golang:` (an ARG without a value)
//! is refused at its line as Docker refuses it, instead of failing later.

/// Why a reference is refused, in Docker's words where it has them.
pub fn check(reference: &str) -> Result<(), &'static str> {
    let (rest, digest) = match reference.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (reference, None),
    };
    if let Some(d) = digest {
        let ok = d.split_once(':').is_some_and(|(alg, hex)| {
            !alg.is_empty()
                && alg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
                && hex.len() >= 32
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        });
        if !ok {
            return Err("invalid reference format: the digest is not algorithm:hex");
        }
    }
    // A tag follows the last `:` after the last `/` (a `:` before it is a registry port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let ok = !t.is_empty()
            && t.len() <= 128
            && t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok {
            return Err("invalid reference format: the tag is empty or holds characters a tag cannot");
        }
    }
    if name.is_empty() {
        return Err("base name should not be blank");
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // A first component with a `.` or `:`, or `localhost`, is a registry host.
    if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
        let host = parts.remove(0);
        let host_ok = host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !host_ok {
            return Err("invalid reference format: the registry host is malformed");
        }
    }
    for p in parts {
        let ok = !p.is_empty()
            && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && p.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !ok {
            return Err("invalid reference format: repository name must be lowercase letters, digits and separators");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_docker_accepts_and_refuses() {
        for ok in [
            "alpine",
            "alpine:3.19",
            "library/debian:bookworm-slim",
            "ghcr.io/org/app:v1.2.3",
            "localhost:5000/app",
            "registry.example.com:443/a/b_c-d.e:tag_1",
            &format!("debian@sha256:{}", "a".repeat(64)),
            "mcr.microsoft.com/windows/servercore:ltsc2022",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for bad in [
            "golang:",
            ":latest",
            "",
            "UPPER:1",
            "a//b",
            "app:-x",
            "app@sha256:zz",
            "-app",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }
}

/// The registry an image reference names, as Docker reads it: the first path component
/// when it has a `.` or a `:` or is `localhost`, else Docker Hub (`docker.io`).
pub fn registry_of(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

#[cfg(test)]
mod registry_tests {
    use super::registry_of;

    #[test]
    fn registries_are_named_as_docker_names_them() {
        assert_eq!(registry_of("debian:bookworm"), "docker.io");
        assert_eq!(registry_of("library/debian"), "docker.io");
        assert_eq!(registry_of("ghcr.io/o/r:1"), "ghcr.io");
        assert_eq!(registry_of("127.0.0.1:5000/app"), "127.0.0.1:5000");
        assert_eq!(registry_of("localhost/app"), "localhost");
    }
}
