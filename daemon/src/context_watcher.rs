//! Watches a build context with inotify and tells planners when something in it may have
//! changed. Only events that can change a build's inputs are asked for (writes, attribute
//! changes, creations, deletions, moves): never opens or reads, so the daemon's own hashing
//! of thousands of files does not wake the watcher once per file (a general-purpose watcher
//! such as `notify` always subscribes to opens, which cost a quarter of a touched tree's
//! plan). Directories made later are watched as they appear; an overflowed queue, or the
//! context directory itself removed or moved away, marks the watcher stale (the index
//! starts a new one); a directory that cannot be watched marks it failed, and the context
//! is stat-walked from then on.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use inotify::{EventMask, Inotify, WatchMask, Watches};
use lcache_context::context_walk::BARRIER_PREFIX;

/// Where changes were seen since a refresh last took them (absolute paths).
#[derive(Debug, Default)]
pub struct Dirty {
    /// Directories in which an entry was made, removed, moved, written or changed.
    pub listings: HashSet<PathBuf>,
    /// Directories made or moved in: everything beneath them is new.
    pub trees: HashSet<PathBuf>,
    /// A change that is not one directory's (a directory moved, `.dockerignore` changed):
    /// the whole context must be walked.
    pub everything: bool,
}

/// What the watcher thread tells planners.
#[derive(Default)]
pub struct WatchSignals {
    /// Something changed since the flag was last cleared; set after `dirty` says where.
    pub changed: AtomicBool,
    /// Where.
    pub dirty: Mutex<Dirty>,
    /// Set when events may have been lost, so the context is stat-walked from then on.
    pub failed: Mutex<Option<String>>,
    /// Barrier marker files seen created (see `IndexedContext::sync_watcher`).
    pub cookies: Mutex<HashSet<String>>,
    /// Signalled when a marker is seen.
    pub cookie_seen: Condvar,
    /// This watcher can no longer vouch for the tree: the context directory itself was
    /// removed or moved away (it sees nothing of one made again at the path), or its queue
    /// overflowed (events were lost, among them those of directories made meanwhile, which
    /// it does not watch). The index starts a new one, and walks the tree whole.
    pub stale: AtomicBool,
}

impl WatchSignals {
    /// Takes where changes were seen; clear `changed` first, so that a change seen in
    /// between is either taken now or flagged again.
    pub fn take_dirty(&self) -> Dirty {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn fail(&self, why: String) {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
        self.changed.store(true, Ordering::SeqCst);
    }
}

/// Why a context cannot be watched (it is stat-walked instead; the words are its status).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// No watcher could be made.
    #[error("cannot start a file watcher: {0}")]
    Start(std::io::Error),
    /// The kernel's limit on watched directories was reached.
    #[error("too many directories to watch (raise fs.inotify.max_user_watches)")]
    TooManyDirectories,
    /// The tree could not be watched.
    #[error("cannot watch {}: {source}", root.display())]
    Watch {
        /// The directory.
        root: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The events that can change what a build reads.
fn mask() -> WatchMask {
    WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DONT_FOLLOW
        | WatchMask::ONLYDIR
}

/// A running watcher; dropping it stops the thread.
pub struct ContextWatcher {
    stop: Arc<AtomicBool>,
}

impl Drop for ContextWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Every directory beneath `dir` (itself included), with a watch each; the map gives each
/// watch's directory, so directories made later beneath it can be watched too.
fn watch_tree(watches: &mut Watches, dir: &Path, dirs: &mut HashMap<i32, PathBuf>) -> Result<(), WatchError> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let wd = match watches.add(&d, mask()) {
            Ok(wd) => wd,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => return Err(WatchError::TooManyDirectories),
            // Gone or replaced by a file meanwhile: the event that says so is queued.
            Err(e) if matches!(e.raw_os_error(), Some(nix::libc::ENOENT | nix::libc::ENOTDIR)) && d != dir => continue,
            Err(source) => return Err(WatchError::Watch { root: d, source }),
        };
        let Ok(entries) = std::fs::read_dir(&d) else {
            dirs.insert(wd.get_watch_descriptor_id(), d);
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
        dirs.insert(wd.get_watch_descriptor_id(), d);
    }
    Ok(())
}

/// Starts watching `root` and everything beneath it.
pub fn start_watcher(root: &Path, signals: Arc<WatchSignals>) -> Result<ContextWatcher, WatchError> {
    let inotify = Inotify::init().map_err(WatchError::Start)?;
    let mut dirs = HashMap::new();
    watch_tree(&mut inotify.watches(), root, &mut dirs)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("context-watcher".into())
        .spawn({
            let root = root.to_path_buf();
            move || watch_loop(inotify, &root, dirs, &signals, &stopped)
        })
        .map_err(WatchError::Start)?;
    Ok(ContextWatcher { stop })
}

/// Notes in `dirty` what an event on the watched directory `dir` (`None`: unknown) says
/// must be read again.
fn note(dirty: &mut Dirty, root: &Path, dir: Option<&PathBuf>, mask: EventMask, name: Option<&std::ffi::OsStr>) {
    let Some(dir) = dir else {
        dirty.everything = true;
        return;
    };
    let moved = mask.contains(EventMask::ISDIR) && mask.intersects(EventMask::MOVED_FROM | EventMask::MOVED_TO);
    match name {
        // A moved directory's watches still name it by its old path until it is watched
        // again (`watch_tree` on its new path); the whole tree is walked meanwhile.
        _ if moved || mask.contains(EventMask::MOVE_SELF) => dirty.everything = true,
        Some(n) if dir == root && n == ".dockerignore" => dirty.everything = true,
        Some(n) => {
            dirty.listings.insert(dir.clone());
            if mask.contains(EventMask::ISDIR) && mask.contains(EventMask::CREATE) {
                dirty.trees.insert(dir.join(n));
            }
        }
        // The directory itself (its mode, its removal): its entry is in its parent's listing.
        None => {
            if let Some(parent) = dir.parent().filter(|_| dir != root) {
                dirty.listings.insert(parent.to_path_buf());
            }
        }
    }
}

fn watch_loop(
    mut inotify: Inotify,
    root: &Path,
    mut dirs: HashMap<i32, PathBuf>,
    signals: &WatchSignals,
    stop: &AtomicBool,
) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(500u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return signals.fail(format!("the file watcher failed ({e}); stat-walking from now on")),
        }
        let events = match inotify.read_events(&mut buf) {
            Ok(events) => events,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return signals.fail(format!("the file watcher failed ({e}); stat-walking from now on")),
        };
        let (mut new_dirs, mut markers) = (Vec::new(), Vec::new());
        for ev in events {
            if ev.mask.contains(EventMask::Q_OVERFLOW) {
                // Events were lost: a new watcher and a whole walk, at the next plan.
                signals.stale.store(true, Ordering::SeqCst);
                signals.changed.store(true, Ordering::SeqCst);
                continue;
            }
            let id = ev.wd.get_watch_descriptor_id();
            let on_root = dirs.get(&id).is_some_and(|d| d == root);
            if on_root
                && ev
                    .mask
                    .intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF)
            {
                signals.stale.store(true, Ordering::SeqCst);
            }
            if ev.mask.contains(EventMask::IGNORED) {
                if let Some(dir) = dirs.remove(&id) {
                    note(
                        &mut signals.dirty.lock().unwrap_or_else(|p| p.into_inner()),
                        root,
                        Some(&dir),
                        ev.mask,
                        None,
                    );
                }
                signals.changed.store(true, Ordering::SeqCst);
                continue;
            }
            let name = ev.name.and_then(|n| n.to_str());
            if let Some(marker) = name.filter(|n| n.starts_with(BARRIER_PREFIX)) {
                if ev.mask.contains(EventMask::CREATE) {
                    markers.push(marker.to_string());
                }
                continue;
            }
            note(
                &mut signals.dirty.lock().unwrap_or_else(|p| p.into_inner()),
                root,
                dirs.get(&id),
                ev.mask,
                ev.name,
            );
            signals.changed.store(true, Ordering::SeqCst);
            if ev.mask.contains(EventMask::ISDIR) && ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                if let (Some(parent), Some(n)) = (dirs.get(&id), ev.name) {
                    new_dirs.push(parent.join(n));
                }
            }
        }
        // Watched before any marker read with them is announced: a plan that waited for its
        // marker walks a tree whose every directory is watched, so a write made after that
        // walk into a directory made before it is seen (announced first, the plan could walk
        // the new directory before its watch was added and miss such a write for good).
        for d in new_dirs {
            if let Err(e) = watch_tree(&mut inotify.watches(), &d, &mut dirs) {
                signals.fail(format!("{e}; stat-walking from now on"));
            }
        }
        if !markers.is_empty() {
            signals
                .cookies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(markers);
            signals.cookie_seen.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Returns once the watcher has handled every event made before the call, as a plan's
    /// barrier does, so what the test asserts next never depends on timing.
    fn barrier(root: &Path, signals: &WatchSignals, name: &str) {
        std::fs::write(root.join(format!("{BARRIER_PREFIX}{name}")), "").unwrap();
        wait_marked(root, signals, name);
    }

    /// Waits for the marker `name`, made already, to be reported, and removes it.
    fn wait_marked(root: &Path, signals: &WatchSignals, name: &str) {
        let name = format!("{BARRIER_PREFIX}{name}");
        let cookies = signals.cookies.lock().unwrap();
        let (mut cookies, timeout) = signals
            .cookie_seen
            .wait_timeout_while(cookies, Duration::from_secs(30), |c| !c.contains(&name))
            .unwrap();
        assert!(!timeout.timed_out(), "the watcher never reported the marker {name}");
        cookies.remove(&name);
        drop(cookies);
        std::fs::remove_file(root.join(&name)).unwrap();
    }

    #[test]
    fn writes_creations_and_new_directories_are_seen_and_reads_are_not() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir(r.join("sub")).unwrap();
        std::fs::write(r.join("sub/a"), "a").unwrap();
        let signals = Arc::new(WatchSignals::default());
        let _w = start_watcher(r, signals.clone()).unwrap();
        let changed = || signals.changed.swap(false, Ordering::SeqCst);

        std::fs::read(r.join("sub/a")).unwrap();
        barrier(r, &signals, "read");
        assert!(!changed(), "reading changes nothing");

        std::fs::write(r.join("sub/a"), "b").unwrap();
        barrier(r, &signals, "write");
        assert!(changed(), "a write beneath a watched directory");

        std::fs::create_dir_all(r.join("new/deeper")).unwrap();
        barrier(r, &signals, "mkdir");
        assert!(changed());
        std::fs::write(r.join("new/deeper/f"), "x").unwrap();
        barrier(r, &signals, "write-deeper");
        assert!(changed(), "a directory made after the start is watched");

        let t = nix::sys::time::TimeSpec::new(1_700_000_000, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &r.join("sub/a"),
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        barrier(r, &signals, "touch");
        assert!(changed(), "a touch");

        // Every event of the first marker (made, written, closed, removed) comes before the
        // second's, so all of them have been handled when the second returns.
        barrier(r, &signals, "x");
        barrier(r, &signals, "y");
        assert!(!changed(), "a barrier marker is not a change");
        assert!(signals.failed.lock().unwrap().is_none());
    }

    #[test]
    fn a_tree_moved_in_before_a_barrier_is_watched_whole_once_the_barrier_returns() {
        let top = tempfile::tempdir().unwrap();
        let (r, staging) = (top.path().join("context"), top.path().join("staging"));
        std::fs::create_dir(&r).unwrap();
        let signals = Arc::new(WatchSignals::default());
        let _w = start_watcher(&r, signals.clone()).unwrap();
        // A tree big enough that watching it takes the watcher a while, moved in and followed
        // by a marker while the watcher is held, so that it reads both events together: every
        // write made once the marker is reported must be seen, however early it comes.
        for round in 0..3 {
            let tree = staging.join(format!("t{round}"));
            let dirs: Vec<PathBuf> = (0..400).map(|i| tree.join(format!("{}/{i}", i % 20))).collect();
            for d in &dirs {
                std::fs::create_dir_all(d).unwrap();
            }
            let held = signals.dirty.lock().unwrap();
            std::fs::write(r.join(format!("hold{round}")), "x").unwrap();
            // Time for the watcher to read that write's events and wait for the lock; were it
            // late, it would read all the events together, which is as good.
            std::thread::sleep(Duration::from_millis(50));
            std::fs::rename(&tree, r.join(format!("t{round}"))).unwrap();
            std::fs::write(r.join(format!("{BARRIER_PREFIX}moved{round}")), "").unwrap();
            drop(held);
            wait_marked(&r, &signals, &format!("moved{round}"));
            signals.take_dirty();
            let moved: Vec<PathBuf> = dirs.iter().map(|d| r.join(d.strip_prefix(&staging).unwrap())).collect();
            for d in &moved {
                std::fs::write(d.join("f"), "x").unwrap();
            }
            barrier(&r, &signals, &format!("written{round}"));
            let dirty = signals.take_dirty();
            let missed = moved.iter().filter(|d| !dirty.listings.contains(*d)).count();
            assert_eq!(
                missed,
                0,
                "{missed} of {} writes right after the barrier were missed",
                moved.len()
            );
        }
        assert!(signals.failed.lock().unwrap().is_none());
    }
}
