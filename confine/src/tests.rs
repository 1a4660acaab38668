use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

/// A root with a sibling directory `outside` holding a file a hostile path would aim at.
struct Fixture {
    dir: tempfile::TempDir,
    root: Root,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/secret"), "keep").unwrap();
        std::fs::set_permissions(dir.path().join("outside"), std::fs::Permissions::from_mode(0o750)).unwrap();
        let root = Root::open(&dir.path().join("root")).unwrap();
        Self { dir, root }
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    fn inside(&self, rel: &str) -> PathBuf {
        self.dir.path().join("root").join(rel)
    }

    /// Everything outside the root as it is now: names, modes, contents.
    fn outside_state(&self) -> Vec<(String, u32, Vec<u8>)> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.file_name() == Some(OsStr::new("root")) {
                continue;
            }
            collect(&p, &mut v);
        }
        v.sort();
        v
    }
}

fn collect(p: &Path, out: &mut Vec<(String, u32, Vec<u8>)>) {
    let m = std::fs::symlink_metadata(p).unwrap();
    let data = if m.is_file() { std::fs::read(p).unwrap() } else { vec![] };
    out.push((p.display().to_string(), m.mode(), data));
    if m.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            collect(&e.unwrap().path(), out);
        }
    }
}

#[test]
fn an_absolute_symlink_resolves_inside_the_root_not_on_the_host() {
    let f = Fixture::new();
    let before = f.outside_state();
    f.root.symlink(&f.outside(), Path::new("link")).unwrap();
    // The host path does not exist inside the root, so creating beneath it creates it there.
    f.root.create_dir_all(Path::new("link/sub"), 0o755).unwrap();
    f.root.write_file(Path::new("link/sub/f"), b"x", 0o644).unwrap();
    assert_eq!(f.outside_state(), before);
    let landed = f.inside(format!("{}/sub/f", f.outside().display()).trim_start_matches('/'));
    assert_eq!(std::fs::read(landed).unwrap(), b"x");
}

#[test]
fn a_relative_symlink_climbing_out_is_clamped_at_the_root() {
    let f = Fixture::new();
    let before = f.outside_state();
    f.root.symlink(Path::new("../../../outside"), Path::new("up")).unwrap();
    f.root.create_dir_all(Path::new("up"), 0o755).unwrap();
    f.root
        .write_file(Path::new("up/secret"), b"overwritten", 0o644)
        .unwrap();
    assert_eq!(f.outside_state(), before);
    assert_eq!(std::fs::read(f.inside("outside/secret")).unwrap(), b"overwritten");
}

#[test]
fn a_file_replaces_a_symlink_of_the_same_name_instead_of_writing_through_it() {
    let f = Fixture::new();
    let before = f.outside_state();
    std::os::unix::fs::symlink(f.outside().join("secret"), f.inside("x")).unwrap();
    f.root.write_file(Path::new("x"), b"new", 0o600).unwrap();
    assert_eq!(f.outside_state(), before);
    let m = std::fs::symlink_metadata(f.inside("x")).unwrap();
    assert!(m.is_file());
    assert_eq!(m.mode() & 0o7777, 0o600, "mode is exact, not masked by the umask");
}

#[test]
fn mode_and_owner_changes_never_reach_a_symlinks_target() {
    let f = Fixture::new();
    let before = f.outside_state();
    std::os::unix::fs::symlink(f.outside(), f.inside("d")).unwrap();
    f.root.set_mode(Path::new("d"), 0o777).unwrap();
    if nix::unistd::geteuid().is_root() {
        f.root.chown(Path::new("d"), 1234, 1234).unwrap();
        assert_eq!(std::fs::symlink_metadata(f.inside("d")).unwrap().uid(), 1234);
    }
    assert_eq!(f.outside_state(), before);
}

#[test]
fn the_root_and_its_parent_cannot_be_removed() {
    let f = Fixture::new();
    for p in ["", ".", "..", "a/..", "/", "../outside/.."] {
        let e = f.root.remove_all(Path::new(p)).unwrap_err();
        assert!(matches!(e, ConfineError::Refused { .. }), "{p}: {e}");
    }
    std::fs::create_dir(f.inside("a")).unwrap();
    std::os::unix::fs::symlink("..", f.inside("a/up")).unwrap();
    // Removing through a symlink to the parent removes only what the root holds.
    f.root.remove_all(Path::new("a/up/a")).unwrap();
    assert!(f.dir.path().join("outside/secret").exists());
    assert!(!f.inside("a").exists());
}

#[test]
fn remove_all_does_not_follow_symlinks_inside_the_tree() {
    let f = Fixture::new();
    std::fs::create_dir(f.inside("t")).unwrap();
    std::os::unix::fs::symlink(f.outside(), f.inside("t/out")).unwrap();
    f.root.remove_all(Path::new("t")).unwrap();
    assert!(!f.inside("t").exists());
    assert!(f.outside().join("secret").exists());
}

#[test]
fn hard_links_only_join_regular_files_inside_roots() {
    let f = Fixture::new();
    std::os::unix::fs::symlink(f.outside().join("secret"), f.inside("s")).unwrap();
    let e = f
        .root
        .hard_link_from(&f.root, Path::new("s"), Path::new("h"))
        .unwrap_err();
    assert!(e.to_string().contains("regular file"), "{e}");
    // `../outside/secret` from the root is clamped to the root's own `outside/secret`.
    let e = f
        .root
        .hard_link_from(&f.root, Path::new("../outside/secret"), Path::new("h"))
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    f.root.write_file(Path::new("a"), b"1", 0o644).unwrap();
    f.root.hard_link_from(&f.root, Path::new("a"), Path::new("b")).unwrap();
    assert_eq!(std::fs::metadata(f.inside("b")).unwrap().nlink(), 2);
}

#[test]
fn existing_directories_keep_their_mode_and_new_ones_get_theirs() {
    let f = Fixture::new();
    std::fs::create_dir(f.inside("tmp")).unwrap();
    std::fs::set_permissions(f.inside("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    f.root.create_dir_all(Path::new("/tmp/new/deeper"), 0o751).unwrap();
    assert_eq!(std::fs::metadata(f.inside("tmp")).unwrap().mode() & 0o7777, 0o1777);
    assert_eq!(std::fs::metadata(f.inside("tmp/new")).unwrap().mode() & 0o7777, 0o751);
    assert!(!f.root.create_dir(Path::new("tmp"), 0o700).unwrap());
}

#[test]
fn a_symlink_loop_is_refused_not_followed_forever() {
    let f = Fixture::new();
    std::os::unix::fs::symlink("b", f.inside("a")).unwrap();
    std::os::unix::fs::symlink("a", f.inside("b")).unwrap();
    assert!(f.root.create_dir_all(Path::new("a/x"), 0o755).is_err());
}

#[test]
fn reading_follows_a_final_symlink_only_when_asked_and_only_inside() {
    let f = Fixture::new();
    std::os::unix::fs::symlink(f.outside().join("secret"), f.inside("s")).unwrap();
    assert!(f.root.open_file(Path::new("s"), false).is_err());
    // Followed, the absolute target is looked up inside the root, where it is absent.
    assert!(f.root.open_file(Path::new("s"), true).unwrap_err().is_not_found());
}

#[test]
fn reading_a_file_leaves_its_access_time_alone() {
    use std::io::Read;
    use std::time::{Duration, SystemTime};
    let f = Fixture::new();
    std::fs::write(f.inside("a"), "alpha").unwrap();
    // Read before it was last changed: relatime would update it on the next read.
    let accessed = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let times = std::fs::FileTimes::new()
        .set_accessed(accessed)
        .set_modified(SystemTime::now());
    std::fs::File::options()
        .write(true)
        .open(f.inside("a"))
        .unwrap()
        .set_times(times)
        .unwrap();
    let mut read = String::new();
    f.root
        .open_file(Path::new("a"), false)
        .unwrap()
        .read_to_string(&mut read)
        .unwrap();
    assert_eq!(read, "alpha");
    assert_eq!(std::fs::metadata(f.inside("a")).unwrap().accessed().unwrap(), accessed);
}

mod props {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Symlink(String, String),
        MkdirAll(String),
        Write(String),
        Chmod(String),
        Remove(String),
        Link(String, String),
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![Just("a"), Just("b"), Just(".."), Just("."), Just("outside")],
            0..4,
        )
        .prop_map(|v| v.join("/"))
    }

    fn target() -> impl Strategy<Value = String> {
        prop_oneof![
            path(),
            path().prop_map(|p| format!("/{p}")),
            Just("OUTSIDE".to_string())
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (target(), path()).prop_map(|(t, p)| Op::Symlink(t, p)),
            path().prop_map(Op::MkdirAll),
            path().prop_map(Op::Write),
            path().prop_map(Op::Chmod),
            path().prop_map(Op::Remove),
            (path(), path()).prop_map(|(a, b)| Op::Link(a, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        /// Whatever symlinks and paths a hostile layer combines, nothing outside changes.
        #[test]
        fn no_sequence_of_operations_changes_anything_outside(ops in prop::collection::vec(op(), 1..12)) {
            let f = Fixture::new();
            let before = f.outside_state();
            let host = f.outside().display().to_string();
            for op in ops {
                let _ = match op {
                    Op::Symlink(t, p) => f.root.symlink(Path::new(&t.replace("OUTSIDE", &host)), Path::new(&p)),
                    Op::MkdirAll(p) => f.root.create_dir_all(Path::new(&p), 0o777),
                    Op::Write(p) => f.root.write_file(Path::new(&p), b"pwned", 0o777),
                    Op::Chmod(p) => f.root.set_mode(Path::new(&p), 0o777),
                    Op::Remove(p) => f.root.remove_all(Path::new(&p)),
                    Op::Link(a, b) => f.root.hard_link_from(&f.root, Path::new(&a), Path::new(&b)),
                };
            }
            prop_assert_eq!(f.outside_state(), before);
        }
    }
}

#[test]
fn paths_resolve_through_links_inside_the_root() {
    let f = Fixture::new();
    std::fs::create_dir_all(f.inside("var/data")).unwrap();
    std::os::unix::fs::symlink("/var/data", f.inside("data")).unwrap();
    std::os::unix::fs::symlink("../../../outside", f.inside("var/up")).unwrap();
    std::os::unix::fs::symlink("loop2", f.inside("loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", f.inside("loop2")).unwrap();
    let r = |p: &str| f.root.resolve_path(Path::new(p)).unwrap();
    assert_eq!(
        r("/data/f.txt"),
        Path::new("var/data/f.txt"),
        "absolute targets start at the root"
    );
    assert_eq!(r("data"), Path::new("var/data"), "the last link is followed too");
    assert_eq!(
        r("var/up/x"),
        Path::new("outside/x"),
        "`..` stops at the root: never the real outside"
    );
    assert_eq!(
        r("new/dir/../f"),
        Path::new("new/f"),
        "what does not exist is kept as written"
    );
    assert!(
        f.root.resolve_path(Path::new("loop1/x")).is_err(),
        "link loops are refused"
    );
}
