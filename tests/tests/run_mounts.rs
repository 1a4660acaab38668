//! `RUN --mount` with real builds: a cache mount outlives builds and never reaches the
//! layer, a tmpfs leaves nothing, a secret is readable during the RUN and nowhere after.

use std::path::Path;

use lcache_e2e::{BuildEnv, Project};

const DOCKERFILE: &str = "FROM busybox\n\
RUN --mount=type=cache,target=/cache sh -c 'echo x >> /cache/log; wc -l < /cache/log | tr -d \" \" > /count'\n\
RUN --mount=type=tmpfs,target=/scratch sh -c 'echo t > /scratch/t && ls /scratch > /seen'\n\
RUN --mount=type=secret,id=tok sh -c 'test \"$(cat /run/secrets/tok)\" = s3cret && echo ok > /ok'\n";

fn build_to(env: &BuildEnv, p: &Project, out: &Path, extra: &[&str]) -> std::process::Output {
    let dest = format!("type=local,dest={}", out.display());
    let mut args = vec!["build", "--progress", "plain", "--output", &dest];
    args.extend_from_slice(extra);
    args.push(".");
    env.lcache(p, &args)
}

#[test]
fn cache_tmpfs_and_secret_mounts_work_and_leave_nothing_behind() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write("Dockerfile", DOCKERFILE).write("tok.txt", "s3cret");
    let secret = format!("id=tok,src={}", p.path().join("tok.txt").display());
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let o = build_to(&env, &p, one.path(), &["--secret", &secret]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |dir: &Path, f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    assert_eq!(read(one.path(), "count").trim(), "1");
    assert_eq!(
        read(one.path(), "seen").trim(),
        "t",
        "the tmpfs was there during the RUN"
    );
    assert_eq!(
        read(one.path(), "ok").trim(),
        "ok",
        "the secret was readable during the RUN"
    );
    assert!(
        !one.path().join("cache/log").exists(),
        "a cache mount is not layer content"
    );
    assert!(!one.path().join("scratch/t").exists(), "nor a tmpfs");
    assert!(!one.path().join("run/secrets/tok").exists(), "nor a secret");
    // Run again from scratch: the cache directory kept what the first build wrote.
    let o = build_to(&env, &p, two.path(), &["--secret", &secret, "--no-cache"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read(two.path(), "count").trim(), "2");
    // `lcache cache prune` empties the cache mounts: the next run starts over.
    let o = env.lcache(
        &p,
        &["cache", "prune", "--cache-dir", env.cache_dir().to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("removed 1 cache mount"));
    let three = tempfile::tempdir().unwrap();
    let o = build_to(&env, &p, three.path(), &["--secret", &secret, "--no-cache"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read(three.path(), "count").trim(), "1");
    // A required secret that is not given fails the RUN, saying how to give it.
    p.write(
        "Dockerfile",
        "FROM busybox\nRUN --mount=type=secret,id=npm,required true\n",
    );
    let o = env.try_build(&p, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Dockerfile:2") && err.contains("--secret id=npm"), "{err}");
}
