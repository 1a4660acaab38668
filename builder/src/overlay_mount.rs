//! Overlay mounts of snapshots: read-write (lowers + a fresh upper) for RUN, read-only
//! (lowers only) for reading a stage's files; unmounted when dropped.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A mounted overlay; unmounts on drop.
#[derive(Debug)]
pub struct OverlayMount {
    target: PathBuf,
}

impl OverlayMount {
    /// Mounts `lowers` (top first) at `target`, with `upper`/`work` when writable.
    /// An empty layer list mounts `empty` (an empty directory) as the only lower.
    pub fn mount(lowers: &[PathBuf], rw: Option<(&Path, &Path)>, target: &Path, empty: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(target)?;
        std::fs::create_dir_all(empty)?;
        let lower_list: Vec<String> = if lowers.is_empty() {
            vec![empty.display().to_string()]
        } else {
            lowers.iter().map(|p| p.display().to_string()).collect()
        };
        let mut opts = format!("lowerdir={}", lower_list.join(":"));
        if let Some((upper, work)) = rw {
            opts.push_str(&format!(",upperdir={},workdir={}", upper.display(), work.display()));
        } else if lower_list.len() == 1 {
            // overlayfs wants two lowers when there is no upper; a second empty one is harmless.
            opts.push_str(&format!(":{}", empty.display()));
        }
        let flags = if rw.is_some() {
            MsFlags::empty()
        } else {
            MsFlags::MS_RDONLY
        };
        mount(Some("overlay"), target, Some("overlay"), flags, Some(opts.as_str())).map_err(|e| {
            std::io::Error::other(format!(
                "cannot mount overlay at {} ({opts}): {e} — lcache build needs root (or CAP_SYS_ADMIN) and overlayfs",
                target.display()
            ))
        })?;
        Ok(Self {
            target: target.to_path_buf(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        // Lazy detach: a process still inside (a runtime shim) must not keep it mounted.
        let _ = umount2(&self.target, MntFlags::MNT_DETACH);
    }
}
