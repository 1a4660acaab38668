//! `ADD <url>`: a remote source downloaded as BuildKit downloads it. The file is named after
//! the URL's last path segment (`__unnamed__` without one) and is mode 0600; the server's
//! `Last-Modified` is in the key, as in BuildKit (which also makes it the file's mtime:
//! lcache's layers carry mtime 0 throughout); `--checksum` is checked before the file is
//! used. Downloads are kept in the client cache (by content, with what the server
//! said about each URL), revalidated with the server's ETag / Last-Modified so a 304 moves
//! no bytes, and with a `--checksum` that a kept download matches no request is made at
//! all — the rebuild works offline.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A downloaded file, kept in the client cache.
#[derive(Debug, Clone)]
pub struct Download {
    /// The kept bytes.
    pub path: PathBuf,
    /// The name it lands under.
    pub name: String,
    /// `sha256:<hex>` of the bytes.
    pub sha256: String,
    /// The server's `Last-Modified`, if it sent one.
    pub last_modified: Option<String>,
}

/// Why a remote source could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// No answer.
    #[error(
        "cannot download {url}: {reason} — check the address and the network (proxies come from HTTPS_PROXY, HTTP_PROXY, ALL_PROXY), or put the file in the context and COPY it"
    )]
    Fetch {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// An answer that is not the file.
    #[error("cannot download {url}: the server answered {status} — check the address")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The bytes are not the ones `--checksum` names.
    #[error(
        "{url} does not match --checksum: expected {expected}, got {actual} — the file changed on the server or the checksum is wrong; nothing was cached"
    )]
    Checksum {
        /// The URL.
        url: String,
        /// `--checksum`.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// A `--checksum` lcache cannot check.
    #[error("--checksum={0} is not sha256:<64 hex digits> (the only digest ADD checks)")]
    BadChecksum(String),
    /// The client cache could not keep it.
    #[error("cannot keep the download of {url} in {}: {source}", path.display())]
    Io {
        /// The URL.
        url: String,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What the server said about a URL the last time, kept beside the bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UrlMeta {
    url: String,
    sha256: String,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// The name BuildKit gives a URL's file: its path's last segment, percent-decoded.
pub fn file_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let decoded = percent_decode(path);
    let base = decoded.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    // As Go's path.Base: a trailing slash is dropped (`/dir/` names `dir`).
    match base {
        "" | "." | ".." => "__unnamed__".into(),
        b => b.to_string(),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}

/// Where downloads are kept: bytes by digest, what each URL answered by the URL's hash.
struct Kept {
    root: PathBuf,
}

impl Kept {
    fn blob(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(sha256.trim_start_matches("sha256:"))
    }

    fn meta_path(&self, url: &str) -> PathBuf {
        self.root
            .join("urls")
            .join(&blake3::hash(url.as_bytes()).to_hex()[..32])
    }

    fn meta(&self, url: &str) -> Option<UrlMeta> {
        let m: UrlMeta = serde_json::from_slice(&std::fs::read(self.meta_path(url)).ok()?).ok()?;
        (m.url == url).then_some(m)
    }

    /// The kept bytes with this digest, if they are still intact.
    fn intact(&self, sha256: &str) -> Option<PathBuf> {
        let p = self.blob(sha256);
        match sha256_file(&p) {
            Ok(d) if d == sha256 => Some(p),
            Ok(_) => {
                let _ = std::fs::remove_file(&p);
                None
            }
            Err(_) => None,
        }
    }

    fn save_meta(&self, meta: &UrlMeta) -> std::io::Result<()> {
        let path = self.meta_path(&meta.url);
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(&serde_json::to_vec(meta).map_err(std::io::Error::other)?)?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    }
}

fn check(url: &str, expected: &str, actual: &str) -> Result<(), DownloadError> {
    if expected.is_empty() || expected == actual {
        return Ok(());
    }
    Err(DownloadError::Checksum {
        url: url.into(),
        expected: expected.into(),
        actual: actual.into(),
    })
}

/// Downloads `url` (or reuses what `cache_root` keeps of it), checking `checksum`
/// (`sha256:<hex>`, or empty for none).
pub fn download(url: &str, checksum: &str, cache_root: &Path) -> Result<Download, DownloadError> {
    let checksum = checksum.to_ascii_lowercase();
    if !checksum.is_empty() {
        let hex = checksum.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DownloadError::BadChecksum(checksum));
        }
    }
    let kept = Kept {
        root: cache_root.join("downloads"),
    };
    let io = |path: &Path| {
        let (url, path) = (url.to_string(), path.to_path_buf());
        move |source| DownloadError::Io { url, path, source }
    };
    let name = file_name(url);
    let previous = kept.meta(url);
    // The digest BuildKit would trust without asking: the checksum's, when we hold it.
    if let Some(prev) = previous
        .as_ref()
        .filter(|m| !checksum.is_empty() && m.sha256 == checksum)
    {
        if let Some(path) = kept.intact(&prev.sha256) {
            return Ok(Download {
                path,
                name,
                sha256: prev.sha256.clone(),
                last_modified: prev.last_modified.clone(),
            });
        }
    }
    let agent = ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .redirects(10)
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(300))
        .user_agent(concat!("lcache/", env!("CARGO_PKG_VERSION")))
        .build();
    let mut req = agent.get(url);
    let reusable = previous.as_ref().and_then(|m| kept.intact(&m.sha256).map(|p| (m, p)));
    if let Some((m, _)) = &reusable {
        if let Some(etag) = &m.etag {
            req = req.set("If-None-Match", etag);
        }
        if let Some(lm) = &m.last_modified {
            req = req.set("If-Modified-Since", lm);
        }
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(status, _)) => {
            return Err(DownloadError::Status {
                url: url.into(),
                status,
            })
        }
        Err(e) => {
            return Err(DownloadError::Fetch {
                url: url.into(),
                reason: e.to_string(),
            })
        }
    };
    if resp.status() == 304 {
        if let Some((m, path)) = reusable {
            check(url, &checksum, &m.sha256)?;
            return Ok(Download {
                path,
                name,
                sha256: m.sha256.clone(),
                last_modified: m.last_modified.clone(),
            });
        }
    }
    if !(200..300).contains(&resp.status()) {
        return Err(DownloadError::Status {
            url: url.into(),
            status: resp.status(),
        });
    }
    let etag = resp.header("ETag").map(str::to_string);
    let last_modified = resp
        .header("Last-Modified")
        .filter(|v| httpdate::parse_http_date(v).is_ok())
        .map(str::to_string);
    let blobs = kept.root.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    let mut tmp = tempfile::NamedTempFile::new_in(&blobs).map_err(io(&blobs))?;
    let mut h = Sha256::new();
    let mut body = resp.into_reader();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = body.read(&mut buf).map_err(|e| DownloadError::Fetch {
            url: url.into(),
            reason: format!("the transfer broke off: {e}"),
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        tmp.write_all(&buf[..n]).map_err(io(tmp.path()))?;
    }
    let sha256 = format!("sha256:{:x}", h.finalize());
    check(url, &checksum, &sha256)?;
    tmp.as_file().sync_all().map_err(io(tmp.path()))?;
    let path = kept.blob(&sha256);
    tmp.persist(&path).map_err(|e| io(&path)(e.error))?;
    // Only a speed-up for the next build: failing to remember the answer is harmless.
    let _ = kept.save_meta(&UrlMeta {
        url: url.into(),
        sha256: sha256.clone(),
        etag,
        last_modified: last_modified.clone(),
    });
    Ok(Download {
        path,
        name,
        sha256,
        last_modified,
    })
}

/// Puts `d` in `dir` as BuildKit's HTTP source leaves it: under its name, mode 0600, its
/// mtime the server's `Last-Modified` (else the epoch) — which only matters to a layer
/// that keeps mtimes.
pub fn place(d: &Download, dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dest = dir.join(&d.name);
    std::fs::copy(&d.path, &dest)?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600))?;
    let mtime = d
        .last_modified
        .as_deref()
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .unwrap_or(std::time::UNIX_EPOCH);
    std::fs::File::options()
        .write(true)
        .open(&dest)?
        .set_times(std::fs::FileTimes::new().set_modified(mtime).set_accessed(mtime))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_named_as_buildkit_names_them() {
        assert_eq!(file_name("https://example.com/dl/tool.tar.gz"), "tool.tar.gz");
        assert_eq!(file_name("https://example.com/dl/tool.sh?x=1#f"), "tool.sh");
        assert_eq!(file_name("https://example.com/a%20b.txt"), "a b.txt");
        assert_eq!(file_name("https://example.com/"), "__unnamed__");
        assert_eq!(file_name("https://example.com"), "__unnamed__");
        assert_eq!(file_name("https://example.com/x/.."), "__unnamed__");
        assert_eq!(file_name("https://example.com/dir/"), "dir");
        assert_eq!(
            file_name("https://example.com/a%2F..%2F..%2Fetc"),
            "etc",
            "a decoded slash never makes a path"
        );
    }

    #[test]
    fn a_bad_checksum_is_refused_before_any_request() {
        let dir = tempfile::tempdir().unwrap();
        let e = download("http://127.0.0.1:9/x", "md5:abc", dir.path()).unwrap_err();
        assert!(matches!(e, DownloadError::BadChecksum(_)));
    }
}
