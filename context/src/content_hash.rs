//! Content BLAKE3 of context files: in parallel across files, streamed so no file is held
//! whole, and each file read once. Never memory-mapped: a file truncated while it is hashed
//! would kill the process (the daemon) with SIGBUS; a read just ends early.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::errors::ContextError;

/// Files at least this large are read through a larger buffer.
const LARGE_FILE: u64 = 1 << 20;

/// Hashes the files at `paths` (relative to `root`) on all cores; result `i` is `paths[i]`'s.
pub fn hash_files(root: &Path, paths: &[(&str, u64)]) -> Result<Vec<[u8; 32]>, ContextError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(paths.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<[u8; 32]>> = Mutex::new(vec![[0u8; 32]; paths.len()]);
    let first_error: Mutex<Option<ContextError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; 64 * 1024];
                let mut local = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= paths.len() {
                        break;
                    }
                    let (rel, size) = paths[i];
                    match hash_one(&root.join(rel), size, &mut buf) {
                        Ok(h) => local.push((i, h)),
                        Err(e) => {
                            first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            // Stop every worker: the result is an error anyway.
                            next.store(paths.len(), Ordering::Relaxed);
                            break;
                        }
                    }
                }
                let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
                for (i, h) in local {
                    r[i] = h;
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(results.into_inner().unwrap_or_else(|p| p.into_inner()))
}

fn hash_one(path: &Path, size: u64, buf: &mut [u8]) -> Result<[u8; 32], ContextError> {
    let io = |source| ContextError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut hasher = blake3::Hasher::new();
    let mut big = Vec::new();
    let buf = if size >= LARGE_FILE {
        big.resize(1 << 20, 0);
        &mut big[..]
    } else {
        buf
    };
    let mut f = open_for_hashing(path).map_err(io)?;
    loop {
        let n = match f.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Opens a context file to hash it without updating its access time: after an edit or a
/// touch, relatime updates a file's atime on its first read, so hashing every file of a
/// context dirtied every inode, and ext4 journalled each. Only the file's owner or root may
/// ask for that; anyone else opens it plainly.
fn open_for_hashing(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOATIME.bits())
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => std::fs::File::open(path),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_blake3_of_the_content_in_order() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "alpha").unwrap();
        let big = vec![7u8; (LARGE_FILE + 5) as usize];
        std::fs::write(d.path().join("b"), &big).unwrap();
        let h = hash_files(d.path(), &[("b", big.len() as u64), ("a", 5)]).unwrap();
        assert_eq!(h[0], *blake3::hash(&big).as_bytes());
        assert_eq!(h[1], *blake3::hash(b"alpha").as_bytes());
    }

    #[test]
    fn hashing_leaves_the_access_time_alone() {
        use std::time::{Duration, SystemTime};
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a");
        std::fs::write(&p, "alpha").unwrap();
        // Read before it was last changed: relatime would update it on the next read.
        let accessed = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let times = std::fs::FileTimes::new()
            .set_accessed(accessed)
            .set_modified(SystemTime::now());
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_times(times)
            .unwrap();
        hash_files(d.path(), &[("a", 5)]).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().accessed().unwrap(), accessed);
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let e = hash_files(d.path(), &[("gone", 1)]).unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
    }
}
