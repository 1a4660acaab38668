//! The client's own disk: extracted layer snapshots and per-step work directories.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The client cache: `$LCACHE_CACHE_DIR`, else `/var/cache/lcache` for root, else
/// `$XDG_CACHE_HOME/lcache` or `~/.cache/lcache`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LCACHE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    if uid == 0 {
        return PathBuf::from("/var/cache/lcache");
    }
    match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(d), _) if !d.is_empty() => PathBuf::from(d).join("lcache"),
        (_, Some(h)) => PathBuf::from(h).join(".cache/lcache"),
        _ => PathBuf::from(format!("/tmp/lcache-{uid}/cache")),
    }
}

/// Layout of the cache directory.
#[derive(Debug, Clone)]
pub struct CacheDir {
    root: PathBuf,
}

impl CacheDir {
    /// Opens (creating) the cache at `root`, owner-only: snapshots hold image files as the
    /// image has them, setuid binaries included, which no other user may reach.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        for d in ["snapshots", "work"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let m = std::fs::metadata(root)?;
        if m.uid() != nix::unistd::geteuid().as_raw() {
            return Err(std::io::Error::other(format!(
                "the cache {} belongs to uid {}, not to you — set LCACHE_CACHE_DIR to a directory of your own",
                root.display(),
                m.uid()
            )));
        }
        if m.mode() & 0o077 != 0 {
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the extracted layer with blob digest `sha256:<hex>` lives; a layer still
    /// bearing its provisional name `provisional:<hex>` lives under that hex until its next
    /// build renames it (`provisional_snapshots`).
    pub fn snapshot(&self, digest: &str) -> PathBuf {
        let hex = digest
            .strip_prefix(lcache_proto::wire::PROVISIONAL_PREFIX)
            .unwrap_or_else(|| digest.trim_start_matches("sha256:"));
        self.root.join("snapshots").join(hex)
    }

    /// A fresh, empty work directory for one step.
    pub fn work_dir(&self) -> std::io::Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix("step-")
            .tempdir_in(self.root.join("work"))
    }
}
