//! One daemon per store: an exclusive lock on `<store>/lcached.lock`, holding the owner's
//! pid so the refusal can name it.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Why the store could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another daemon holds it.
    #[error("another lcached (pid {pid}) is using the store {store} — stop it, or give this daemon its own --store")]
    Held {
        /// The store directory.
        store: String,
        /// The holder's pid, as it wrote it.
        pid: String,
    },
    /// The lock file could not be used.
    #[error("cannot lock {path}: {source} — check the store directory's permissions")]
    Io {
        /// The lock file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Locks `store` for this process; the lock lasts as long as the returned file.
pub fn lock_store(store: &Path) -> Result<File, LockError> {
    let path = store.join("lcached.lock");
    let io = |source| LockError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            return Err(LockError::Held {
                store: store.display().to_string(),
                pid: pid.trim().to_string(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    write!(f, "{}", std::process::id()).map_err(io)?;
    Ok(f)
}
