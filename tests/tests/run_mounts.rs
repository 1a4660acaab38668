//! `RUN --mount` with real builds: a cache mount outlives builds and never reaches the
//! layer, a tmpfs leaves nothing, a secret is readable during the RUN and nowhere after.

use std::path::Path;

use lcache_e2e::{BuildEnv, Project};

const DOCKERFILE: &str = "FROM busybox\n\
RUN --mount=type=cache,target=/cache sh -c 'echo x >> /cache/log; wc -l < /cache/log | tr -d \" \" > /count'\n\
RUN --mount=type=tmpfs,target=/scratch sh -c 'echo t > /scratch/t && ls /scratch > /seen'\n\
RUN --mount=type=secret,id=tok --mount=type=secret,id=tok,env=TOK sh -c 'test \"$(cat /run/secrets/tok)\" = s3cret && test \"$TOK\" = s3cret && echo ok > /ok'\n";

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

/// Each step's cached flag of a `--progress json` build.
fn cached_flags(env: &BuildEnv, p: &Project) -> Vec<bool> {
    lcache_e2e::cached(&env.build(p, &[]).0)
}

#[test]
fn bind_mounts_show_the_context_read_only_and_their_files_are_in_the_key() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nWORKDIR /w\n\
RUN --mount=type=bind,source=src,target=s sh -c 'cat s/a.txt > /out-a; ls -a s > /listing; (touch s/new 2>/dev/null && echo writable || echo readonly) > /rw'\n\
RUN --mount=type=bind,source=cfg.txt,target=/etc/app.cfg cat /etc/app.cfg > /cfg-copy\n\
RUN --mount=type=bind,source=src cat a.txt > /via-workdir\n",
    )
    .write("src/a.txt", "one\n")
    .write("src/ignored.txt", "never seen\n")
    .write(".dockerignore", "src/ignored.txt\n")
    .write("cfg.txt", "setting=1\n");
    let out = tempfile::tempdir().unwrap();
    let o = build_to(&env, &p, out.path(), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |f: &str| std::fs::read_to_string(out.path().join(f)).unwrap_or_default();
    assert_eq!(read("out-a"), "one\n");
    assert_eq!(read("rw").trim(), "readonly", "a bind mount is read-only by default");
    assert_eq!(
        read("listing").split_whitespace().collect::<Vec<_>>(),
        [".", "..", "a.txt"],
        ".dockerignore applies to a bind mount as to a COPY"
    );
    assert_eq!(read("cfg-copy"), "setting=1\n", "a file source is mounted as that file");
    assert_eq!(read("via-workdir"), "one\n", "no target: the mount is at WORKDIR");
    assert!(
        !out.path().join("etc/app.cfg").exists() && !out.path().join("w/s/a.txt").exists(),
        "what a bind mount shows is not layer content"
    );
    let steps = |p: &Project| cached_flags(&env, p);
    assert_eq!(steps(&p), [true, true, true, true], "a rebuild is all cached");
    p.write("src/ignored.txt", "changed, still ignored\n");
    assert_eq!(steps(&p), [true, true, true, true], "an ignored file is not in the key");
    p.write("cfg.txt", "setting=2\n");
    assert_eq!(
        steps(&p),
        [true, true, false, false],
        "the bound file changed: its RUN reruns, and what follows"
    );
    p.write("src/a.txt", "two\n");
    assert_eq!(
        steps(&p),
        [true, false, false, false],
        "the bound directory changed: its RUN and what follows rerun"
    );
    let o = env.lcache(&p, &["explain"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("a.txt"),
        "explain names the bound file that changed:\n{text}"
    );
}

#[test]
fn a_bind_mount_from_a_stage_is_writable_with_rw_and_its_writes_are_thrown_away() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox AS gen\nRUN mkdir /out && echo generated > /out/g.txt\n\
FROM busybox\n\
RUN --mount=type=bind,from=gen,source=/out,target=/g,rw sh -c 'cat /g/g.txt > /copied && echo x > /g/extra'\n",
    );
    let out = tempfile::tempdir().unwrap();
    let o = build_to(&env, &p, out.path(), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(out.path().join("copied")).unwrap(),
        "generated\n"
    );
    assert!(
        !out.path().join("g/extra").exists() && !out.path().join("g/g.txt").exists(),
        "writes to an rw bind mount are discarded"
    );
    assert_eq!(cached_flags(&env, &p), [true, true]);
    // A bind from an image that is not a stage says what to do instead.
    p.write(
        "Dockerfile",
        "FROM busybox\nRUN --mount=type=bind,from=alpine:3,target=/a true\n",
    );
    let o = env.try_build(&p, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("Dockerfile:2") && err.contains("FROM alpine:3 AS"),
        "{err}"
    );
}

/// Copies `bin` and the libraries `ldd` says it loads into `p` under `tools/`, at the paths
/// they have on the host, so `COPY tools/ /` makes it runnable on the busybox base.
fn bring_binary(p: &Project, bin: &str) {
    let ldd = std::process::Command::new("ldd").arg(bin).output().expect("run ldd");
    let mut files = vec![bin.to_string()];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line.split_whitespace().find(|w| w.starts_with('/')).map(str::to_string);
        files.extend(path);
    }
    for f in files {
        let real = std::fs::canonicalize(&f).unwrap();
        let dest = p.path().join("tools").join(f.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(real, dest).unwrap();
    }
}

#[test]
fn an_ssh_mount_forwards_the_agent_and_leaves_no_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let mut agent = std::process::Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent (openssh-client; scripts/setup installs it)");
    let key = dir.path().join("id");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "lcache-test-key", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let st = std::process::Command::new("ssh-add")
        .arg("-q")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &sock)
        .status()
        .unwrap();
    assert!(st.success());
    let env = BuildEnv::new();
    let p = Project::new();
    bring_binary(&p, "/usr/bin/ssh-add");
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY tools/ /\n\
RUN --mount=type=ssh sh -c 'ssh-add -l > /keys; echo $SSH_AUTH_SOCK > /sock'\n\
RUN --mount=type=ssh,id=other,target=/agent,required ssh-add -l\n",
    );
    let out = tempfile::tempdir().unwrap();
    let agent_arg = format!("other={}", sock.display());
    let o = env
        .command(&p, &["build", "--progress", "plain", "--output"])
        .arg(format!("type=local,dest={}", out.path().display()))
        .args(["--ssh", "default", "--ssh", &agent_arg, "."])
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let keys = std::fs::read_to_string(out.path().join("keys")).unwrap();
    assert!(
        keys.contains("lcache-test-key"),
        "the RUN listed the agent's key: {keys}"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("sock")).unwrap().trim(),
        "/run/buildkit/ssh_agent.0"
    );
    assert!(
        !out.path().join("run/buildkit/ssh_agent.0").exists() && !out.path().join("agent").exists(),
        "the socket is not layer content"
    );
    // Without --ssh, a required agent fails the RUN and says how to give it.
    let o = env.try_build(&p, &["--no-cache"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("Dockerfile:4") && err.contains("--ssh other"),
        "{err}"
    );
}
