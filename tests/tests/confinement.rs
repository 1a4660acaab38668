//! No build, import or export writes outside its own directory, whatever symlinks it meets:
//! each hostile case is a real build (real lcached, runc, overlayfs) next to a host
//! directory that must come out of it exactly as it went in. Needs root, like every build.

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lcache_e2e::{BuildEnv, Project};

/// A host directory a hostile build aims at, with a file and a mode to watch.
struct Target {
    dir: tempfile::TempDir,
}

impl Target {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "host data\n").unwrap();
        std::fs::create_dir(dir.path().join("x")).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        std::fs::set_permissions(dir.path().join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Every name, type, mode, owner and content below the target.
    fn state(&self) -> Vec<String> {
        fn walk(p: &Path, out: &mut Vec<String>) {
            let m = std::fs::symlink_metadata(p).unwrap();
            let data = if m.is_file() { std::fs::read(p).unwrap() } else { vec![] };
            out.push(format!(
                "{} {:o} {}:{} {:?}",
                p.display(),
                m.mode(),
                m.uid(),
                m.gid(),
                data
            ));
            if m.is_dir() {
                let mut names: Vec<PathBuf> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().path()).collect();
                names.sort();
                for n in names {
                    walk(&n, out);
                }
            }
        }
        let mut v = Vec::new();
        walk(self.path(), &mut v);
        v
    }
}

fn link(p: &Project, rel: &str, target: &str) {
    let at = p.path().join(rel);
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    symlink(target, at).unwrap();
}

/// Builds `p` to a local export and returns the export; the build must succeed and the
/// target must not change.
fn build_confined(env: &BuildEnv, p: &Project, target: &Target, case: &str) -> tempfile::TempDir {
    let (out, res) = build_watching(env, p, target, case);
    assert!(res.status.success(), "{case}: {}", String::from_utf8_lossy(&res.stderr));
    out
}

/// Builds `p` to a local export; whatever the outcome, the target must not change.
fn build_watching(
    env: &BuildEnv,
    p: &Project,
    target: &Target,
    case: &str,
) -> (tempfile::TempDir, std::process::Output) {
    let before = target.state();
    let out = tempfile::tempdir().unwrap();
    let res = env.lcache(
        p,
        &[
            "build",
            "--progress",
            "plain",
            "--output",
            &format!("type=local,dest={}", out.path().display()),
            ".",
        ],
    );
    assert_eq!(target.state(), before, "{case}: the host directory changed");
    (out, res)
}

/// What a case puts into its context.
type Setup<'a> = Box<dyn Fn(&Project) + 'a>;

#[test]
fn copy_through_symlinks_in_the_context_writes_nothing_outside() {
    let env = BuildEnv::new();
    let target = Target::new();
    let host = target.path().to_str().unwrap().to_string();
    // A directory copied onto a symlink an earlier source placed fails, as in BuildKit
    // ("cannot copy to non-directory"); either way nothing outside is touched.
    let refused = |case: &str| case.contains("a file beneath its name");
    let cases: Vec<(&str, Setup, &str)> = vec![
        (
            "absolute symlink in one source, a file beneath its name in another",
            Box::new(|p: &Project| {
                link(p, "a/x", &host);
                p.write("b/x/secret", "pwned\n");
            }),
            "FROM busybox\nCOPY a b /dst/\n",
        ),
        (
            "relative symlink climbing out, a file beneath its name in another",
            Box::new(|p: &Project| {
                link(p, "a/x", &format!("../../../../../../../../..{host}"));
                p.write("b/x/secret", "pwned\n");
            }),
            "FROM busybox\nCOPY a b /dst/\n",
        ),
        (
            "a file copied over a same-named symlink",
            Box::new(|p: &Project| {
                link(p, "a/secret", &format!("{host}/secret"));
                p.write("b/secret", "pwned\n");
            }),
            "FROM busybox\nCOPY a b /dst/\n",
        ),
        (
            "a heredoc written over a same-named symlink",
            Box::new(|p: &Project| link(p, "a/secret", &format!("{host}/secret"))),
            "FROM busybox\nCOPY a <<secret /dst/\npwned\nsecret\n",
        ),
        (
            "--chmod on a symlink to a host directory",
            Box::new(|p: &Project| link(p, "a/x", &host)),
            "FROM busybox\nCOPY --chmod=777 a /dst/\n",
        ),
        (
            "--chown on a symlink to a host file",
            Box::new(|p: &Project| link(p, "a/s", &format!("{host}/secret"))),
            "FROM busybox\nCOPY --chown=1234:1234 a /dst/\n",
        ),
    ];
    for (case, setup, dockerfile) in cases {
        let p = Project::new();
        p.write("Dockerfile", dockerfile);
        setup(&p);
        if refused(case) {
            let (_, res) = build_watching(&env, &p, &target, case);
            let stderr = String::from_utf8_lossy(&res.stderr);
            assert!(!res.status.success(), "{case}: BuildKit refuses this build");
            assert!(
                stderr.contains("cannot copy to non-directory: /dst/x"),
                "{case}: {stderr}"
            );
            continue;
        }
        let out = build_confined(&env, &p, &target, case);
        assert!(out.path().join("dst").is_dir(), "{case}: the COPY happened");
    }
}

#[test]
fn copy_from_a_stage_whose_run_made_symlinks_to_the_host_writes_nothing_outside() {
    let env = BuildEnv::new();
    let target = Target::new();
    let host = target.path().display().to_string();
    let p = Project::new();
    p.write(
        "Dockerfile",
        &format!(
            "FROM busybox AS evil\n\
             RUN mkdir -p /a /b/x && ln -s {host} /a/x && echo pwned > /b/x/secret && ln -s {host}/secret /a/s\n\
             FROM busybox\n\
             COPY --from=evil /a /dst/\n\
             COPY --from=evil /b/x/secret /dst/s\n\
             COPY --from=evil --chmod=777 /a /dst2/\n"
        ),
    );
    let out = build_confined(&env, &p, &target, "COPY --from a stage with host symlinks");
    assert_eq!(
        std::fs::read_to_string(out.path().join("dst/s")).unwrap(),
        "pwned\n",
        "the file replaced the link in the image instead of going through it"
    );
    // A directory copied onto a link to the host an earlier source placed: BuildKit
    // refuses it, and so does lcache, writing nothing.
    p.write(
        "Dockerfile",
        &format!(
            "FROM busybox AS evil\n\
             RUN mkdir -p /a /b/x && ln -s {host} /a/x && echo pwned > /b/x/secret\n\
             FROM busybox\n\
             COPY --from=evil /a /b /dst/\n"
        ),
    );
    let (_, res) = build_watching(&env, &p, &target, "a directory onto a link to the host");
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("cannot copy to non-directory: /dst/x"),
        "{err}"
    );
    // A symlink named as a source is followed, as BuildKit follows it, but inside the
    // stage's root, where the host path does not exist: the COPY fails, reading nothing.
    p.write(
        "Dockerfile",
        &format!(
            "FROM busybox AS evil\n\
             RUN ln -s {host}/secret /s\n\
             FROM busybox\n\
             COPY --from=evil /s /read-through-link\n"
        ),
    );
    let before = target.state();
    let res = env.lcache(&p, &["build", "--progress", "plain", "."]);
    assert!(
        !res.status.success(),
        "a link to the host must not be followed out of the stage"
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("/s") && err.contains("Dockerfile:4"), "{err}");
    assert_eq!(target.state(), before, "the host directory changed");
}

/// A tar with `x -> HOST` and then `x/secret`, `x/new`: what an ADDed archive could try.
fn hostile_tar(host: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_link_name(host).unwrap();
    b.append_data(&mut h, "x", &[][..]).unwrap();
    for name in ["x/secret", "x/new"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(6);
        h.set_mode(0o644);
        b.append_data(&mut h, name, &b"pwned\n"[..]).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn add_of_a_local_tar_with_a_symlink_escape_writes_nothing_outside() {
    let env = BuildEnv::new();
    let target = Target::new();
    let p = Project::new();
    std::fs::write(p.path().join("evil.tar"), hostile_tar(target.path().to_str().unwrap())).unwrap();
    p.write("Dockerfile", "FROM busybox\nADD evil.tar /dst/\n");
    let out = build_confined(&env, &p, &target, "ADD of a hostile tar");
    let inside = out
        .path()
        .join("dst")
        .join(target.path().strip_prefix("/").unwrap())
        .join("new");
    assert_eq!(
        std::fs::read(&inside).unwrap(),
        b"pwned\n",
        "the entries landed inside the destination, where the symlink resolves in the root"
    );
}

#[test]
fn an_image_whose_layer_whiteouts_dot_dot_is_refused_and_removes_nothing() {
    let env = BuildEnv::new();
    let target = Target::new();
    let before = target.state();
    let mut b = tar::Builder::new(Vec::new());
    for name in ["dest/keep", "dest/.wh..."] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        // `append_data` would refuse these names; write them raw as an attacker would.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }
    let tarball = target.path().join("../lcache-whiteout-test.tar");
    std::fs::write(&tarball, b.into_inner().unwrap()).unwrap();
    let p = Project::new();
    let out = env.lcache(&p, &["image", "import", tarball.to_str().unwrap(), "evil:wh"]);
    let _ = std::fs::remove_file(&tarball);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'dest/.wh...'") && err.contains("malformed whiteout"),
        "{err}"
    );
    assert_eq!(target.state(), before);
}
