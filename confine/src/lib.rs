//! Every write beneath an image, layer or export root goes through [`Root`].
//!
//! lcache runs as root, and what it writes comes from places it does not trust: layer tars,
//! imported images, stages whose RUN made arbitrary symlinks. Checking a joined path with
//! `symlink_metadata` and then writing to it is both racy and easy to forget, so this module
//! never joins paths: a [`Root`] holds a directory fd and resolves every path beneath it with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`. Symlinks are followed the way Docker
//! follows them inside an image (an absolute target, or `..` past the top, lands back in the
//! root, never on the host), and the final component of a write is never followed: it is
//! acted on with the `*at` calls and `AT_SYMLINK_NOFOLLOW`, or replaced.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, readlinkat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fchmodat, fstat, fstatat, mkdirat, mknodat, FchmodatFlags, FileStat, Mode, SFlag};
use nix::unistd::{fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

/// How many symlinks one path may pass through before it is refused (the kernel's own limit).
const MAX_LINK_DEPTH: usize = 40;

/// Why an operation beneath a root failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The system call failed.
    #[error("cannot {op} '{path}' beneath {root}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path inside the root, as asked for.
        path: PathBuf,
        /// The root directory.
        root: PathBuf,
        /// The error the kernel gave.
        source: std::io::Error,
    },
    /// The path names nothing that may be written (the root itself, `..`, a loop).
    #[error("refused to {op} '{path}' beneath {root}: {reason}")]
    Refused {
        /// What was being done.
        op: &'static str,
        /// The path inside the root, as asked for.
        path: PathBuf,
        /// The root directory.
        root: PathBuf,
        /// Why.
        reason: &'static str,
    },
}

impl ConfineError {
    /// Whether the entry (or one of its parents) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

impl From<ConfineError> for std::io::Error {
    fn from(e: ConfineError) -> Self {
        let kind = match &e {
            ConfineError::Io { source, .. } => source.kind(),
            ConfineError::Refused { .. } => std::io::ErrorKind::InvalidInput,
        };
        std::io::Error::new(kind, e)
    }
}

/// Result of an operation beneath a root.
pub type Result<T> = std::result::Result<T, ConfineError>;

/// What an entry is, read without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A device node, fifo or socket.
    Other,
}

/// What [`Root::stat`] tells about an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryStat {
    /// The entry's type.
    pub kind: EntryType,
    /// Permission bits (with setuid, setgid and sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
}

impl From<FileStat> for EntryStat {
    fn from(st: FileStat) -> Self {
        let fmt = st.st_mode & libc_mode(SFlag::S_IFMT);
        let kind = if fmt == libc_mode(SFlag::S_IFDIR) {
            EntryType::Dir
        } else if fmt == libc_mode(SFlag::S_IFREG) {
            EntryType::File
        } else if fmt == libc_mode(SFlag::S_IFLNK) {
            EntryType::Symlink
        } else {
            EntryType::Other
        };
        Self {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: u64::try_from(st.st_size).unwrap_or(0),
        }
    }
}

fn libc_mode(f: SFlag) -> u32 {
    f.bits()
}

/// A directory that everything done through it stays beneath.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// A path made relative to the root: `/` and `.` dropped, `..` kept (the kernel clamps it at
/// the root).
fn relative(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| matches!(c, Component::Normal(_) | Component::ParentDir))
        .collect()
}

impl Root {
    /// Opens an existing directory as a root. The path itself is the caller's (trusted).
    pub fn open(path: &Path) -> Result<Self> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ConfineError::Io {
            op: "open the root",
            path: PathBuf::new(),
            root: path.to_path_buf(),
            source: e.into(),
        })?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Creates the directory (and its parents) if needed, then opens it as a root.
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(|source| ConfineError::Io {
            op: "create the root",
            path: PathBuf::new(),
            root: path.to_path_buf(),
            source,
        })?;
        Self::open(path)
    }

    /// The directory `rel` (resolved in this root) as a root of its own, for content that
    /// must stay beneath it (an archive ADDed to a destination).
    pub fn subdir(&self, rel: &Path) -> Result<Self> {
        let fd = self.dir_fd(rel).map_err(self.io("open directory", rel))?;
        Ok(Self {
            fd,
            path: self.path.join(relative(rel)),
        })
    }

    /// The root's path on the host, for messages and for handing to other programs.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, op: &'static str, path: &Path) -> impl FnOnce(Errno) -> ConfineError + '_ {
        let path = path.to_path_buf();
        move |e| ConfineError::Io {
            op,
            path,
            root: self.path.clone(),
            source: e.into(),
        }
    }

    fn refused(&self, op: &'static str, path: &Path, reason: &'static str) -> ConfineError {
        ConfineError::Refused {
            op,
            path: path.to_path_buf(),
            root: self.path.clone(),
            reason,
        }
    }

    /// Resolves `rel` beneath the root with `flags`; symlinks on the way stay in the root.
    fn resolve(&self, rel: &Path, flags: OFlag) -> std::result::Result<OwnedFd, Errno> {
        let rel = relative(rel);
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &rel
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        // EAGAIN: a concurrent rename raced the kernel's `..` check; asking again is safe.
        let mut tries = 0;
        loop {
            match openat2(self.fd.as_fd(), rel, how) {
                Err(Errno::EAGAIN) if tries < 16 => tries += 1,
                other => return other,
            }
        }
    }

    /// The directory `rel` resolves to, as an fd for the `*at` calls.
    fn dir_fd(&self, rel: &Path) -> std::result::Result<OwnedFd, Errno> {
        self.resolve(rel, OFlag::O_PATH | OFlag::O_DIRECTORY)
    }

    /// Splits `rel` into the fd of its parent (resolved in the root) and its final name,
    /// which must be a plain name: never the root, `.` or `..`.
    fn parent_of(&self, op: &'static str, rel: &Path) -> Result<(OwnedFd, OsString)> {
        let clean = relative(rel);
        let name = match clean.components().next_back() {
            Some(Component::Normal(n)) => n.to_os_string(),
            _ => return Err(self.refused(op, rel, "it names the root or its parent, not an entry inside it")),
        };
        let parent = clean.parent().unwrap_or(Path::new(""));
        let fd = self.dir_fd(parent).map_err(self.io(op, rel))?;
        Ok((fd, name))
    }

    /// The entry at `rel`, not following a final symlink; `None` if it does not exist.
    pub fn stat(&self, rel: &Path) -> Result<Option<EntryStat>> {
        let (dir, name) = self.parent_of("inspect", rel)?;
        match fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st.into())),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(self.io("inspect", rel)(e)),
        }
    }

    /// The path `rel` names once every symlink on the way (the last one too) is resolved
    /// inside the root, as `RESOLVE_IN_ROOT` resolves it: absolute targets start at the root
    /// and `..` stops there. What does not exist is kept as written. This is how a COPY
    /// destination like `/data/`, where the image has `/data -> /var/data`, becomes the
    /// path the layer must hold (`var/data`).
    pub fn resolve_path(&self, rel: &Path) -> Result<PathBuf> {
        const MAX_LINKS: usize = 40;
        let parts = |p: &Path| -> Vec<OsString> {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n.to_os_string()),
                    Component::ParentDir => Some(OsString::from("..")),
                    _ => None,
                })
                .collect()
        };
        let mut todo: std::collections::VecDeque<OsString> = parts(rel).into();
        let mut out = PathBuf::new();
        let mut links = 0;
        while let Some(c) = todo.pop_front() {
            if c == ".." {
                out.pop();
                continue;
            }
            let candidate = out.join(&c);
            let found = match self.stat(&candidate) {
                Err(e) if e.is_not_found() => None,
                other => other?,
            };
            match found {
                Some(st) if st.kind == EntryType::Symlink => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(self.refused("resolve", rel, "too many levels of symbolic links"));
                    }
                    let target = self.read_link(&candidate)?;
                    if target.is_absolute() {
                        out = PathBuf::new();
                    }
                    for t in parts(&target).into_iter().rev() {
                        todo.push_front(t);
                    }
                }
                _ => out.push(c),
            }
        }
        Ok(out)
    }

    /// Whether `rel` resolves (following symlinks inside the root) to a directory.
    pub fn is_dir(&self, rel: &Path) -> bool {
        self.dir_fd(rel).is_ok()
    }

    /// Creates `rel` and its missing parents as directories with `mode`; existing
    /// directories keep their mode and owner. A dangling symlink on the way is resolved in
    /// the root and what it names is created, as Docker does.
    pub fn create_dir_all(&self, rel: &Path, mode: u32) -> Result<()> {
        self.create_dir_all_from(rel, relative(rel), mode, 0)
    }

    fn create_dir_all_from(&self, asked: &Path, path: PathBuf, mode: u32, depth: usize) -> Result<()> {
        const OP: &str = "create directory";
        if depth > MAX_LINK_DEPTH {
            return Err(self.refused(OP, asked, "too many levels of symbolic links"));
        }
        let comps: Vec<Component> = path.components().collect();
        let mut prefix = PathBuf::new();
        for (i, c) in comps.iter().enumerate() {
            let next = prefix.join(c);
            match self.dir_fd(&next) {
                Ok(_) => {}
                Err(Errno::ENOENT) => {
                    let Component::Normal(name) = c else {
                        return Err(self.io(OP, asked)(Errno::ENOENT));
                    };
                    let parent = self.dir_fd(&prefix).map_err(self.io(OP, asked))?;
                    match mkdirat(&parent, *name, Mode::from_bits_truncate(mode)) {
                        Ok(()) => self.chmod_dir_in(&parent, name, mode).map_err(self.io(OP, asked))?,
                        Err(Errno::EEXIST) => match readlinkat(&parent, *name) {
                            // A dangling symlink: create what it names, inside the root.
                            Ok(target) => {
                                let target = PathBuf::from(target);
                                let rest: PathBuf = comps[i + 1..].iter().collect();
                                let resolved = if target.is_absolute() {
                                    relative(&target).join(rest)
                                } else {
                                    prefix.join(target).join(rest)
                                };
                                return self.create_dir_all_from(asked, resolved, mode, depth + 1);
                            }
                            // Another creator made it meanwhile.
                            Err(Errno::EINVAL) if self.dir_fd(&next).is_ok() => {}
                            Err(Errno::EINVAL) => {
                                return Err(self.refused(OP, asked, "a parent on the way is not a directory"))
                            }
                            Err(e) => return Err(self.io(OP, asked)(e)),
                        },
                        Err(e) => return Err(self.io(OP, asked)(e)),
                    }
                }
                Err(Errno::ENOTDIR) => return Err(self.refused(OP, asked, "a parent on the way is not a directory")),
                Err(e) => return Err(self.io(OP, asked)(e)),
            }
            prefix = next;
        }
        Ok(())
    }

    /// Sets a freshly made directory's mode exactly (mkdir is subject to the umask).
    fn chmod_dir_in(&self, parent: &OwnedFd, name: &OsStr, mode: u32) -> std::result::Result<(), Errno> {
        fchmod(&open_child_dir(parent, name)?, Mode::from_bits_truncate(mode))
    }

    /// Creates one directory `rel` (parents must exist); `Ok(false)` when a directory is
    /// already there, which keeps its mode and owner. Whatever else is there is replaced.
    pub fn create_dir(&self, rel: &Path, mode: u32) -> Result<bool> {
        const OP: &str = "create directory";
        let (dir, name) = self.parent_of(OP, rel)?;
        match fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if EntryStat::from(st).kind == EntryType::Dir => return Ok(false),
            Ok(_) => unlinkat(&dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir).map_err(self.io(OP, rel))?,
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(self.io(OP, rel)(e)),
        }
        mkdirat(&dir, name.as_os_str(), Mode::from_bits_truncate(mode)).map_err(self.io(OP, rel))?;
        self.chmod_dir_in(&dir, &name, mode).map_err(self.io(OP, rel))?;
        Ok(true)
    }

    /// Removes a non-directory entry at `name` in `dir`, so a new one can take its place
    /// without writing through a symlink that was there.
    fn clear(&self, op: &'static str, rel: &Path, dir: &OwnedFd, name: &OsStr) -> Result<()> {
        match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::EISDIR) => Err(self.refused(op, rel, "a directory is in the way")),
            Err(e) => Err(self.io(op, rel)(e)),
        }
    }

    /// Creates a new regular file at `rel` with `mode` for writing, replacing a file or
    /// symlink that was there (never writing through it). Parents must exist.
    pub fn create_file(&self, rel: &Path, mode: u32) -> Result<File> {
        const OP: &str = "create file";
        let (dir, name) = self.parent_of(OP, rel)?;
        self.clear(OP, rel, &dir, &name)?;
        let fd = openat(
            &dir,
            name.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(self.io(OP, rel))?;
        fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(self.io(OP, rel))?;
        Ok(File::from(fd))
    }

    /// Writes `data` as a new file at `rel` (see [`Root::create_file`]).
    pub fn write_file(&self, rel: &Path, data: &[u8], mode: u32) -> Result<()> {
        use std::io::Write;
        let mut f = self.create_file(rel, mode)?;
        f.write_all(data).map_err(|source| ConfineError::Io {
            op: "write file",
            path: rel.to_path_buf(),
            root: self.path.clone(),
            source,
        })
    }

    /// Opens the file at `rel` for reading. Symlinks on the way resolve inside the root; a
    /// final symlink is followed only when `follow` is set (and then also inside the root).
    pub fn open_file(&self, rel: &Path, follow: bool) -> Result<File> {
        let mut flags = OFlag::O_RDONLY;
        if !follow {
            flags |= OFlag::O_NOFOLLOW;
        }
        // Reading leaves the access time alone: a COPY reads every file of its sources and
        // its layer, and relatime would dirty each inode on its first read after a change.
        // Only the owner or root may ask; anyone else opens the file plainly.
        let fd = match self.resolve(rel, flags | OFlag::O_NOATIME) {
            Err(nix::errno::Errno::EPERM) => self.resolve(rel, flags),
            other => other,
        };
        Ok(File::from(fd.map_err(self.io("open file", rel))?))
    }

    /// Makes a symlink at `rel` pointing at `target` (stored as given; it is only ever
    /// resolved inside a root), replacing a file or symlink that was there.
    pub fn symlink(&self, target: &Path, rel: &Path) -> Result<()> {
        const OP: &str = "create symlink";
        let (dir, name) = self.parent_of(OP, rel)?;
        self.clear(OP, rel, &dir, &name)?;
        symlinkat(target, &dir, name.as_os_str()).map_err(self.io(OP, rel))
    }

    /// The target of the symlink at `rel`.
    pub fn read_link(&self, rel: &Path) -> Result<PathBuf> {
        let (dir, name) = self.parent_of("read symlink", rel)?;
        readlinkat(&dir, name.as_os_str())
            .map(PathBuf::from)
            .map_err(self.io("read symlink", rel))
    }

    /// Hard-links the regular file at `src` in `from` (this root or another) to `rel` here,
    /// replacing what was there. Neither path's final symlink is followed, and `src` must be
    /// a regular file.
    pub fn hard_link_from(&self, from: &Root, src: &Path, rel: &Path) -> Result<()> {
        const OP: &str = "hard-link";
        let (sdir, sname) = from.parent_of(OP, src)?;
        match fstatat(&sdir, sname.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if EntryStat::from(st).kind == EntryType::File => {}
            Ok(_) => return Err(from.refused(OP, src, "a hard link may only point at a regular file")),
            Err(e) => return Err(from.io(OP, src)(e)),
        }
        let (dir, name) = self.parent_of(OP, rel)?;
        self.clear(OP, rel, &dir, &name)?;
        linkat(&sdir, sname.as_os_str(), &dir, name.as_os_str(), AtFlags::empty()).map_err(self.io(OP, rel))
    }

    /// Makes a device node, fifo or socket at `rel`, replacing a file or symlink there.
    pub fn mknod(&self, rel: &Path, kind: SFlag, mode: u32, dev: u64) -> Result<()> {
        const OP: &str = "create node";
        let (dir, name) = self.parent_of(OP, rel)?;
        self.clear(OP, rel, &dir, &name)?;
        mknodat(&dir, name.as_os_str(), kind, Mode::from_bits_truncate(mode), dev).map_err(self.io(OP, rel))
    }

    /// Sets the owner of `rel` itself (a symlink's own owner, never its target's).
    pub fn chown(&self, rel: &Path, uid: u32, gid: u32) -> Result<()> {
        let (dir, name) = self.parent_of("change owner of", rel)?;
        fchownat(
            &dir,
            name.as_os_str(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(self.io("change owner of", rel))
    }

    /// Sets the mode of `rel` itself; a symlink (which has no mode of its own) is left as is.
    pub fn set_mode(&self, rel: &Path, mode: u32) -> Result<()> {
        const OP: &str = "change mode of";
        let (dir, name) = self.parent_of(OP, rel)?;
        let fd = openat(
            &dir,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(self.io(OP, rel))?;
        let st = fstat(&fd).map_err(self.io(OP, rel))?;
        if EntryStat::from(st).kind == EntryType::Symlink {
            return Ok(());
        }
        // An O_PATH fd cannot be fchmod'ed; its /proc entry names exactly this inode.
        let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
        fchmodat(
            nix::fcntl::AT_FDCWD,
            proc.as_str(),
            Mode::from_bits_truncate(mode),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(self.io(OP, rel))
    }

    /// Sets an extended attribute on the directory `rel` (overlayfs's opaque marker).
    pub fn set_dir_xattr(&self, rel: &Path, attr: &str, value: &[u8]) -> Result<()> {
        const OP: &str = "set an attribute on";
        let fd = self
            .resolve(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW)
            .map_err(self.io(OP, rel))?;
        xattr::FileExt::set_xattr(&File::from(fd), attr, value).map_err(|source| ConfineError::Io {
            op: OP,
            path: rel.to_path_buf(),
            root: self.path.clone(),
            source,
        })
    }

    /// The names in the directory `rel` (which may be reached through symlinks in the root).
    pub fn read_dir(&self, rel: &Path) -> Result<Vec<OsString>> {
        const OP: &str = "list";
        let fd = self
            .resolve(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
            .map_err(self.io(OP, rel))?;
        names_in(fd).map_err(self.io(OP, rel))
    }

    /// Removes whatever is at `rel`, a whole tree for a directory, never following a
    /// symlink; nothing there is not an error. The root itself and `..` are refused.
    pub fn remove_all(&self, rel: &Path) -> Result<()> {
        const OP: &str = "remove";
        let (dir, name) = self.parent_of(OP, rel)?;
        remove_entry(&dir, &name).map_err(self.io(OP, rel))
    }
}

/// Opens the directory `name` in `parent` for reading, never through a symlink.
fn open_child_dir(parent: &OwnedFd, name: &OsStr) -> std::result::Result<OwnedFd, Errno> {
    openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// The names in an open directory, without `.` and `..`.
fn names_in(dir: OwnedFd) -> std::result::Result<Vec<OsString>, Errno> {
    let mut d = nix::dir::Dir::from_fd(dir)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let n = e?.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            out.push(OsStr::from_bytes(&n).to_os_string());
        }
    }
    Ok(out)
}

fn remove_entry(dir: &OwnedFd, name: &OsStr) -> std::result::Result<(), Errno> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
        Ok(st) if EntryStat::from(st).kind == EntryType::Dir => {
            let fd = open_child_dir(dir, name)?;
            let children = names_in(fd.try_clone().map_err(|_| Errno::EBADF)?)?;
            for c in children {
                remove_entry(&fd, &c)?;
            }
            unlinkat(dir, name, UnlinkatFlags::RemoveDir)
        }
        Ok(_) => unlinkat(dir, name, UnlinkatFlags::NoRemoveDir),
    }
}

#[cfg(test)]
mod tests;
