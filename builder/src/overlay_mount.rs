//! Overlay mounts of snapshots: read-write (lowers + a fresh upper) for RUN, read-only
//! (lowers only) for reading a stage's files; unmounted when dropped.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Lower lists longer than this (bytes) are passed as descriptors: a page is 4,096 bytes,
/// and the upper and work directories need their share.
const LONG_LOWERS: usize = 3072;

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
        let mut lower_list: Vec<String> = if lowers.is_empty() {
            vec![empty.display().to_string()]
        } else {
            lowers.iter().map(|p| p.display().to_string()).collect()
        };
        // The mount's options must fit in one page, and each layer (two for a COPY kept as
        // a delta) names a ~100-byte snapshot path: past a few dozen layers, name each
        // lower by a descriptor of ours instead (the kernel resolves `/proc/self/fd/N` when
        // it mounts), ~18 bytes each. The descriptors stay open until the mount is made.
        let mut held = Vec::new();
        if lower_list.iter().map(|l| l.len() + 1).sum::<usize>() > LONG_LOWERS {
            for l in &mut lower_list {
                let dir = std::fs::File::open(&*l)?;
                *l = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir));
                held.push(dir);
            }
        }
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
        let mounted = mount(Some("overlay"), target, Some("overlay"), flags, Some(opts.as_str()));
        drop(held);
        mounted.map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_layers_than_their_paths_fit_in_a_page_still_mount() {
        if !lcache_image::layer_extract::is_root() {
            // Mounting needs root; CI runs the tests as root.
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let long = "l".repeat(120);
        let lowers: Vec<PathBuf> = (0..80)
            .map(|i| {
                let p = d.path().join(format!("{long}-{i:02}"));
                std::fs::create_dir(&p).unwrap();
                std::fs::write(p.join(format!("f{i:02}")), i.to_string()).unwrap();
                p
            })
            .collect();
        let plain: usize = lowers.iter().map(|p| p.as_os_str().len() + 1).sum();
        assert!(plain > 4096, "the plain list would not fit: {plain} bytes");
        let m = OverlayMount::mount(&lowers, None, &d.path().join("m"), &d.path().join("e")).unwrap();
        for i in [0, 41, 79] {
            assert_eq!(
                std::fs::read_to_string(m.path().join(format!("f{i:02}"))).unwrap(),
                i.to_string()
            );
        }
    }
}
