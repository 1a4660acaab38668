//! Keeps the client cache's snapshots within a budget. Each snapshot (a whole layer
//! directory with the files beside it, or a delta unit) has a marker, `<hex>.used`, whose
//! mtime is when a build last used it and whose text caches the disk it holds. Past the
//! budget the least recently used go; a whole snapshot goes with the deltas over it, which
//! are no use without it. Any snapshot can be made again from lcached's blob, so pruning
//! costs a later build time, never correctness.
//!
//! Builds hold the cache's lock shared while they run; pruning takes it exclusively and
//! does nothing while a build runs, so it never removes what a build is using. A snapshot
//! is renamed out of `snapshots/` before it is deleted: a prune killed half-way leaves
//! whole snapshots or none, never a tree with files missing that a build would trust.
//! With no build running, whatever is in `work/` was left by one that was killed (Ctrl-C
//! in a COPY leaves its tree, in a RUN an overlay mounted on it): pruning removes it too.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};

use crate::cache_dir::CacheDir;
use lcache_proto::byte_size::parse_size;

/// The lock builds hold shared and pruning exclusively.
const LOCK: &str = "snapshots.lock";
/// The suffix of a snapshot's marker.
const USED: &str = "used";
/// Where pruning records how `snapshots/` looked when it last had nothing to do.
const CHECKED: &str = "snapshots.checked";
/// What renamed-out snapshots are called in `work/` until deleted.
const TRASH: &str = "pruned-";

/// The cache's lock, held shared by a build for as long as it runs.
#[derive(Debug)]
pub struct BuildLock {
    _held: Flock<File>,
}

/// Takes the cache's lock shared for a build, waiting for a prune that holds it.
pub fn hold_for_build(cache: &CacheDir) -> std::io::Result<BuildLock> {
    let file = lock_file(cache)?;
    Flock::lock(file, FlockArg::LockShared)
        .map(|held| BuildLock { _held: held })
        .map_err(|(_, e)| std::io::Error::from(e))
}

fn lock_file(cache: &CacheDir) -> std::io::Result<File> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.root().join(LOCK))
}

fn marker(cache: &CacheDir, digest: &str) -> PathBuf {
    cache.snapshot(digest).with_extension(USED)
}

/// Records that a build used the snapshot of the layer `digest` now. Only pruning's order
/// reads it, so a failure costs nothing but that.
pub fn mark_used(cache: &CacheDir, digest: &str) {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(marker(cache, digest));
    if let Ok(f) = file {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// The budget: `LCACHE_CACHE_MAX` (bytes, or with a K, M, G or T suffix, powers of 1024),
/// else a tenth of the filesystem the cache is on, as buildkitd's default gc keeps.
pub fn budget(cache: &CacheDir) -> Result<u64, String> {
    match std::env::var("LCACHE_CACHE_MAX") {
        Ok(v) if !v.trim().is_empty() => {
            parse_size(&v).ok_or_else(|| format!("LCACHE_CACHE_MAX={v} is not a size: write bytes, or 500M, 20G"))
        }
        _ => {
            let st = nix::sys::statvfs::statvfs(cache.root())
                .map_err(|e| format!("cannot read the size of {}'s filesystem: {e}", cache.root().display()))?;
            Ok((st.blocks() as u64).saturating_mul(st.fragment_size() as u64) / 10)
        }
    }
}

/// What a prune did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pruned {
    /// Snapshots removed.
    pub removed: usize,
    /// Bytes they held.
    pub freed: u64,
    /// Bytes the snapshots left hold.
    pub kept: u64,
    /// What killed builds had left in `work/`, removed.
    pub leftovers: usize,
}

/// One snapshot: every name in `snapshots/` that starts with its layer's hex.
#[derive(Debug)]
struct Unit {
    hex: String,
    names: Vec<OsString>,
    used: SystemTime,
    bytes: u64,
    /// For a delta: the hex of the whole snapshot it goes over.
    base: Option<String>,
    /// Whether the unit holds a whole snapshot's directory.
    whole: bool,
}

/// Prunes after a build: only when `snapshots/` changed since the last prune, or `work/`
/// holds what a killed build left (a build that made no snapshot costs two `stat`s and a
/// directory read here). `None` when a build holds the cache.
pub fn after_build(cache: &CacheDir, budget: u64) -> std::io::Result<Option<Pruned>> {
    let stamp = cache.root().join(CHECKED);
    let now = std::fs::metadata(cache.root().join("snapshots"))?;
    let seen = std::fs::read_to_string(&stamp).ok();
    let state = format!("{} {} {budget}", now.mtime(), now.mtime_nsec());
    let left = std::fs::read_dir(cache.root().join("work"))?.next().is_some();
    if seen.as_deref() == Some(state.as_str()) && !left {
        return Ok(Some(Pruned::default()));
    }
    let pruned = prune(cache, budget)?;
    if pruned.is_some() {
        // Read again: removing snapshots (and measuring markers) moved it.
        if let Ok(m) = std::fs::metadata(cache.root().join("snapshots")) {
            let _ = std::fs::write(&stamp, format!("{} {} {budget}", m.mtime(), m.mtime_nsec()));
        }
    }
    Ok(pruned)
}

/// Removes the least recently used snapshots until those left hold at most `budget`
/// bytes. `None` when a build holds the cache (nothing is removed then).
pub fn prune(cache: &CacheDir, budget: u64) -> std::io::Result<Option<Pruned>> {
    let _held = match Flock::lock(lock_file(cache)?, FlockArg::LockExclusiveNonblock) {
        Ok(held) => held,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
        Err((_, e)) => return Err(e.into()),
    };
    let work = cache.root().join("work");
    let mut pruned = Pruned {
        leftovers: clear_work(&work)?,
        ..Pruned::default()
    };
    let dir = cache.root().join("snapshots");
    let mut units = scan(&dir)?;
    let mut total: u64 = units.values().map(|u| u.bytes).sum();
    if total > budget {
        // A whole snapshot is used whenever a delta over it is.
        let newest_delta: HashMap<String, SystemTime> = units
            .values()
            .filter_map(|u| u.base.clone().map(|b| (b, u.used)))
            .fold(HashMap::new(), |mut m, (b, t)| {
                let e = m.entry(b).or_insert(t);
                *e = (*e).max(t);
                m
            });
        let mut order: Vec<(SystemTime, bool, String)> = units
            .values()
            .map(|u| {
                let used = newest_delta.get(&u.hex).map_or(u.used, |t| u.used.max(*t));
                (used, u.whole, u.hex.clone())
            })
            .collect();
        // Oldest first; at the same time, deltas before the whole snapshots under them.
        order.sort();
        let mut gone = HashSet::new();
        for (_, _, hex) in order {
            if total <= budget {
                break;
            }
            if gone.contains(&hex) {
                continue;
            }
            let mut take = vec![hex.clone()];
            take.extend(
                units
                    .values()
                    .filter(|u| u.base.as_deref() == Some(hex.as_str()) && !gone.contains(&u.hex))
                    .map(|u| u.hex.clone()),
            );
            for h in take {
                if let Some(u) = units.remove(&h) {
                    remove_unit(&dir, &work, &u)?;
                    total = total.saturating_sub(u.bytes);
                    pruned.removed += 1;
                    pruned.freed += u.bytes;
                    gone.insert(h);
                }
            }
        }
    }
    pruned.kept = total;
    Ok(Some(pruned))
}

/// Every snapshot in `dir`, by hex, measured (once: the marker keeps the size and how many
/// names it was measured over).
fn scan(dir: &Path) -> std::io::Result<HashMap<String, Unit>> {
    let mut units: HashMap<String, Unit> = HashMap::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let Some(hex) = name.to_str().and_then(|n| n.split('.').next()) else {
            continue;
        };
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let hex = hex.to_string();
        let unit = units.entry(hex.clone()).or_insert_with(|| Unit {
            hex,
            names: Vec::new(),
            used: SystemTime::UNIX_EPOCH,
            bytes: 0,
            base: None,
            whole: false,
        });
        unit.names.push(name);
    }
    for u in units.values_mut() {
        let marker = dir.join(format!("{}.{USED}", u.hex));
        let measured = u.names.len();
        let kept = std::fs::read_to_string(&marker).ok().and_then(|t| {
            let (bytes, names) = t.trim().split_once(' ')?;
            (names.parse::<usize>().ok()? == measured).then(|| bytes.parse::<u64>().ok())?
        });
        let mut newest = SystemTime::UNIX_EPOCH;
        for n in &u.names {
            let path = dir.join(n);
            let m = std::fs::symlink_metadata(&path)?;
            newest = newest.max(m.modified()?);
            if m.is_dir() {
                if n.to_string_lossy().ends_with(".delta") {
                    u.base = std::fs::read_to_string(path.join("base"))
                        .ok()
                        .and_then(|b| b.trim().strip_prefix("sha256:").map(str::to_string));
                } else {
                    u.whole = true;
                }
            }
        }
        u.used = std::fs::metadata(&marker).and_then(|m| m.modified()).unwrap_or(newest);
        u.bytes = match kept {
            Some(b) => b,
            None => {
                let mut bytes = 0;
                for n in &u.names {
                    bytes += disk_bytes(&dir.join(n))?;
                }
                // Measuring writes the marker: its time is set back to when it was used.
                if std::fs::write(&marker, format!("{bytes} {}\n", measured + usize::from(!has(u, USED)))).is_ok() {
                    if let Ok(f) = File::options().write(true).open(&marker) {
                        let _ = f.set_modified(u.used);
                    }
                }
                bytes
            }
        };
    }
    Ok(units)
}

/// Empties `work/`, which only a killed build (or prune) leaves anything in once no build
/// holds the lock: mounts left on it are detached first, so removing never reaches
/// through an overlay. Returns how many entries it removed (a prune's own renamed-out
/// snapshots are not counted).
fn clear_work(work: &Path) -> std::io::Result<usize> {
    let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(work)?.collect::<Result<_, _>>()?;
    if entries.is_empty() {
        return Ok(0);
    }
    detach_mounts_under(work);
    let mut left = 0;
    for e in entries {
        remove_tree(&e.path())?;
        left += usize::from(!e.file_name().to_string_lossy().starts_with(TRASH));
    }
    Ok(left)
}

/// Lazily unmounts every mount at or beneath `dir`, deepest first (best effort: one that
/// stays makes removing it fail, which is reported).
fn detach_mounts_under(dir: &Path) {
    let (Ok(info), Ok(dir)) = (std::fs::read_to_string("/proc/self/mountinfo"), dir.canonicalize()) else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(&dir) && *p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A mount point as `/proc/self/mountinfo` writes it: space, tab, newline and backslash
/// as three octal digits after a backslash.
fn unescape_mount_path(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn has(u: &Unit, suffix: &str) -> bool {
    let name = format!("{}.{suffix}", u.hex);
    u.names.iter().any(|n| *n == *name)
}

/// The disk `path` takes: its blocks, a file's shared among its hard links (snapshots of
/// the same COPY link the files they have in common).
fn disk_bytes(path: &Path) -> std::io::Result<u64> {
    let mut bytes = 0;
    let mut todo = vec![path.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p)?;
        bytes += m.blocks() * 512 / m.nlink().max(1);
        if m.is_dir() {
            for e in std::fs::read_dir(&p)? {
                todo.push(e?.path());
            }
        }
    }
    Ok(bytes)
}

/// Removes the snapshot named by `hex` (whole or a delta, and what is kept beside it),
/// as pruning removes one: for a snapshot that stands for no stored layer.
pub fn remove_snapshot(cache: &CacheDir, hex: &str) -> std::io::Result<()> {
    let dir = cache.root().join("snapshots");
    let names = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .filter(|n| n.to_str().and_then(|n| n.split('.').next()) == Some(hex))
        .collect();
    let unit = Unit {
        hex: hex.to_string(),
        names,
        used: SystemTime::UNIX_EPOCH,
        bytes: 0,
        base: None,
        whole: false,
    };
    remove_unit(&dir, &cache.root().join("work"), &unit)
}

/// Removes a snapshot: the files beside it, then its directories (renamed out of
/// `snapshots/` first), then its marker.
fn remove_unit(dir: &Path, work: &Path, u: &Unit) -> std::io::Result<()> {
    let marker = OsString::from(format!("{}.{USED}", u.hex));
    let (dirs, files): (Vec<&OsString>, Vec<&OsString>) = u
        .names
        .iter()
        .filter(|n| **n != marker)
        .partition(|n| dir.join(n).symlink_metadata().is_ok_and(|m| m.is_dir()));
    for n in files {
        remove_if_there(std::fs::remove_file(dir.join(n)))?;
    }
    for n in dirs {
        let trash = work.join(format!("{TRASH}{}", n.to_string_lossy()));
        std::fs::rename(dir.join(n), &trash)?;
        remove_tree(&trash)?;
    }
    remove_if_there(std::fs::remove_file(dir.join(&marker)))
}

fn remove_if_there(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes a tree (a layer's files) through the confining module: beneath its parent's fd,
/// never following a symlink, so nothing a layer holds, or a container a killed build left
/// running changes meanwhile, leads the removal outside it.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::other(format!(
            "{} is not beneath a directory",
            path.display()
        )));
    };
    lcache_confine::Root::open(parent)
        .and_then(|root| root.remove_all(Path::new(name)))
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    fn hex(c: char) -> String {
        c.to_string().repeat(64)
    }

    /// A whole snapshot of `bytes` bytes of file, last used `age` seconds ago.
    fn whole(cache: &CacheDir, c: char, bytes: usize, age: u64) {
        let d = cache.snapshot(&format!("sha256:{}", hex(c)));
        std::fs::create_dir_all(d.join("usr")).unwrap();
        std::fs::write(d.join("usr/f"), vec![b'x'; bytes]).unwrap();
        std::fs::write(d.with_extension("entries.bin"), b"e").unwrap();
        used(cache, c, age);
    }

    /// A delta over `base`'s whole snapshot.
    fn delta(cache: &CacheDir, c: char, base: char, age: u64) {
        let d = cache.snapshot(&format!("sha256:{}", hex(c))).with_extension("delta");
        std::fs::create_dir_all(d.join("tree")).unwrap();
        std::fs::write(d.join("tree/g"), vec![b'y'; 4096]).unwrap();
        std::fs::write(d.join("base"), format!("sha256:{}", hex(base))).unwrap();
        used(cache, c, age);
    }

    fn used(cache: &CacheDir, c: char, age: u64) {
        let digest = format!("sha256:{}", hex(c));
        mark_used(cache, &digest);
        let f = File::options().write(true).open(marker(cache, &digest)).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age)).unwrap();
    }

    fn left(cache: &CacheDir) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(cache.root().join("snapshots"))
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .chars()
                    .take(1)
                    .collect::<String>()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn the_least_recently_used_go_first_and_a_base_goes_with_its_deltas_but_stays_while_they_are_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        whole(&cache, 'a', 1 << 20, 500);
        whole(&cache, 'b', 1 << 20, 400);
        delta(&cache, 'c', 'b', 10);
        whole(&cache, 'd', 1 << 20, 300);
        let all = prune(&cache, u64::MAX).unwrap().unwrap();
        assert_eq!((all.removed, all.freed), (0, 0));
        assert!(all.kept > 3 << 20, "{all:?}");

        // 'a' is the oldest; 'b' is older than 'd' but a delta over it was used since.
        let pruned = prune(&cache, all.kept - (1 << 20)).unwrap().unwrap();
        assert_eq!(pruned.removed, 1);
        assert_eq!(left(&cache), ["b", "c", "d"]);
        let pruned = prune(&cache, pruned.kept - (1 << 20)).unwrap().unwrap();
        assert_eq!(left(&cache), ["b", "c"], "{pruned:?}");
        // The delta was used when its base last was: it goes first, then the base.
        let pruned = prune(&cache, 1).unwrap().unwrap();
        assert_eq!((pruned.removed, pruned.kept), (2, 0));
        assert!(left(&cache).is_empty());
        assert_eq!(std::fs::read_dir(dir.path().join("work")).unwrap().count(), 0);
    }

    #[test]
    fn nothing_goes_while_a_build_holds_the_cache_and_a_measured_size_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        whole(&cache, 'a', 8192, 100);
        let build = hold_for_build(&cache).unwrap();
        assert_eq!(prune(&cache, 0).unwrap(), None);
        assert_eq!(left(&cache), ["a"]);
        drop(build);
        // Measured once; the marker's time stays when the build last used it.
        let before = std::fs::metadata(marker(&cache, &format!("sha256:{}", hex('a')))).unwrap();
        let first = prune(&cache, u64::MAX).unwrap().unwrap();
        let m = std::fs::metadata(marker(&cache, &format!("sha256:{}", hex('a')))).unwrap();
        assert_eq!(m.modified().unwrap(), before.modified().unwrap());
        std::fs::write(
            dir.path().join("snapshots").join(hex('a')).join("usr/f"),
            vec![b'x'; 1 << 20],
        )
        .unwrap();
        assert_eq!(
            prune(&cache, u64::MAX).unwrap().unwrap().kept,
            first.kept,
            "the size kept"
        );
    }

    #[test]
    fn a_prune_stopped_half_way_is_finished_by_the_next_and_after_a_build_only_a_change_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let stale = dir.path().join("work").join(format!("{TRASH}{}", hex('z')));
        std::fs::create_dir_all(stale.join("ro/x")).unwrap();
        std::fs::set_permissions(stale.join("ro"), std::fs::Permissions::from_mode(0o500)).unwrap();
        whole(&cache, 'a', 8192, 100);
        let after = after_build(&cache, u64::MAX).unwrap().unwrap();
        assert_eq!(
            (after.removed, after.leftovers),
            (0, 0),
            "a prune's own leftovers are not a build's"
        );
        assert!(!stale.exists());
        // Unchanged since: not even scanned, so a smaller budget waits for the next change
        // unless it is another budget.
        assert_eq!(after_build(&cache, u64::MAX).unwrap(), Some(Pruned::default()));
        assert_eq!(after_build(&cache, 0).unwrap().unwrap().removed, 1);
    }

    #[test]
    fn what_a_killed_build_left_in_work_goes_once_no_build_runs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let step = cache.work_dir().unwrap().keep();
        std::fs::create_dir_all(step.join("tree/src")).unwrap();
        std::fs::write(step.join("tree/src/a"), b"a").unwrap();
        // Nothing changed in snapshots/ since the last prune, but work/ is not empty.
        assert_eq!(after_build(&cache, u64::MAX).unwrap().unwrap().leftovers, 1);
        assert!(!step.exists());
        // While a build runs, its work/ is its own.
        let running = cache.work_dir().unwrap();
        let build = hold_for_build(&cache).unwrap();
        assert_eq!(after_build(&cache, u64::MAX).unwrap(), None);
        assert!(running.path().exists());
        drop(build);
    }

    #[test]
    fn mount_points_read_as_the_kernel_escapes_them() {
        assert_eq!(unescape_mount_path("/a\\040b/c\\011d\\134e"), "/a b/c\td\\e");
        assert_eq!(unescape_mount_path("/plain\\09x"), "/plain\\09x");
    }
}
