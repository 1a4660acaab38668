//! Registries for real: Debian's `docker-registry` (distribution v2) started on loopback
//! with its own config, with and without htpasswd auth; images seeded and read back with
//! `skopeo`. `FROM` pulls what the daemon lacks, `--push` pushes (mounting the base's blobs
//! from its repository), and credentials come from Docker's config.json and helpers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

use lcache_e2e::{cached, BuildEnv, Project};

/// A running `docker-registry` on 127.0.0.1, stopped when dropped.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts one; with `user`, behind htpasswd auth for that user (password `pw-<user>`).
    fn start(user: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", lcache_e2e::free_port());
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some(user) = user {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, &format!("pw-{user}")])
                .output()
                .expect("htpasswd (apache2-utils; scripts/setup installs it)");
            assert!(out.status.success());
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: lcache-test\n    path: {}\n",
                file.display()
            ));
        }
        let config_file = dir.path().join("config.yml");
        std::fs::write(&config_file, config).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry (scripts/setup installs it)");
        lcache_e2e::wait_for_port(&addr, &mut child, "docker-registry");
        Self { child, addr, _dir: dir }
    }
}

fn skopeo(args: &[&str]) -> Output {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("skopeo (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds `FROM busybox` + a file in `env`, exports it as an OCI layout and copies it to
/// `reference` with skopeo (as `creds`, if given).
fn seed(env: &BuildEnv, reference: &str, creds: Option<&str>) {
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nRUN echo base > /base.txt\n");
    let layout = tempfile::tempdir().unwrap();
    let dest = format!("type=oci,dest={}", layout.path().display());
    let o = env.lcache(&p, &["build", "--progress", "plain", "--output", &dest, "."]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let src = format!("oci:{}", layout.path().display());
    let dst = format!("docker://{reference}");
    let mut args = vec!["copy", "--dest-tls-verify=false", &src, &dst];
    let creds_arg;
    if let Some(c) = creds {
        creds_arg = format!("--dest-creds={c}");
        args.insert(1, &creds_arg);
    }
    skopeo(&args);
}

/// `lcache ARGS` with `DOCKER_CONFIG` pointing at `docker_config`.
fn lcache_with_config(env: &BuildEnv, p: &Project, docker_config: &Path, args: &[&str]) -> Output {
    env.command(p, args)
        .env("DOCKER_CONFIG", docker_config)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn from_pulls_a_missing_base_and_push_publishes_what_skopeo_reads_back() {
    let registry = Registry::start(None);
    let seeder = BuildEnv::new();
    let base = format!("{}/base:1", registry.addr);
    seed(&seeder, &base, None);

    let env = BuildEnv::new();
    let p = Project::new();
    let no_config = tempfile::tempdir().unwrap();
    p.write("Dockerfile", &format!("FROM {base}\nRUN cat /base.txt > /copied\n"));
    let out = tempfile::tempdir().unwrap();
    let dest = format!("type=local,dest={}", out.path().display());
    let o = lcache_with_config(
        &env,
        &p,
        no_config.path(),
        &["build", "--progress", "plain", "--output", &dest, "."],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("pulled {base}")), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(out.path().join("copied")).unwrap(), "base\n");

    // Present now: no pull, every step cached.
    let o = lcache_with_config(&env, &p, no_config.path(), &["build", "--progress", "json", "."]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("pulled"));
    assert_eq!(cached(&env.build(&p, &[]).0), [true]);

    // Push: the base's blobs are mounted from its repository, the new layer uploaded.
    let app = format!("{}/app:1", registry.addr);
    let o = lcache_with_config(
        &env,
        &p,
        no_config.path(),
        &["build", "--progress", "plain", "-t", &app, "--push", "."],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let said = stderr(&o);
    assert!(said.contains(&format!("pushed {app}")), "{said}");
    assert!(
        !said.contains(" 0 mounted"),
        "the base's layers are mounted, not uploaded: {said}"
    );

    // skopeo reads what was pushed: the manifest digest the build printed, and lcache's
    // image (its config, so its ID and diff_ids). The layers the build kept as their tar
    // went up gzipped, under a manifest of their own.
    let pushed = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let images = env.lcache(&p, &["image", "ls", "--json"]);
    let images: serde_json::Value = serde_json::from_slice(&images.stdout).unwrap();
    let ours = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == app.as_str())
        .expect("the built image")
        .clone();
    let inspect = skopeo(&["inspect", "--tls-verify=false", &format!("docker://{app}")]);
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(inspect["Digest"], pushed.as_str());
    assert_ne!(
        ours["manifest_digest"],
        pushed.as_str(),
        "the local manifest names tar layers"
    );
    let config = skopeo(&["inspect", "--tls-verify=false", "--config", &format!("docker://{app}")]);
    let config: serde_json::Value = serde_json::from_slice(&config.stdout).unwrap();
    let diff_ids: Vec<&serde_json::Value> = ours["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["diff_id"])
        .collect();
    let theirs: Vec<&serde_json::Value> = config["rootfs"]["diff_ids"].as_array().unwrap().iter().collect();
    assert_eq!(diff_ids, theirs);
    let raw = skopeo(&["inspect", "--tls-verify=false", "--raw", &format!("docker://{app}")]);
    let raw: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert!(raw["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"));
    assert_eq!(
        ours["layers"][0]["digest"], raw["layers"][0]["digest"],
        "the base, mounted as it is"
    );
    let copy = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{app}"),
        &format!("oci:{}", copy.path().display()),
    ]);

    // A fresh daemon pulls the pushed image to the same digest.
    let other = BuildEnv::new();
    let o = lcache_with_config(&other, &p, no_config.path(), &["image", "pull", &app]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&pushed),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    // The key follows the image, not the tag: base:1 moves to new content; a build keeps
    // the base it has until --pull re-resolves the tag, which then rebuilds on it.
    {
        let p2 = Project::new();
        p2.write("Dockerfile", "FROM busybox\nRUN echo moved > /base.txt\n");
        let layout = tempfile::tempdir().unwrap();
        let o = seeder.lcache(
            &p2,
            &[
                "build",
                "--progress",
                "plain",
                "--output",
                &format!("type=oci,dest={}", layout.path().display()),
                ".",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}", layout.path().display()),
            &format!("docker://{base}"),
        ]);
    }
    assert_eq!(
        cached(&env.build(&p, &[]).0),
        [true],
        "without --pull the stored base is used"
    );
    let o = lcache_with_config(
        &env,
        &p,
        no_config.path(),
        &["build", "--progress", "json", "--pull", "."],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rebuilt = String::from_utf8_lossy(&o.stdout)
        .lines()
        .any(|l| l.contains("\"event\":\"step\"") && l.contains("\"cached\":false"));
    assert!(rebuilt, "the re-resolved base changes the key");

    // A blob corrupted on the registry is refused as it streams in, and nothing is kept.
    let top = raw["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let data = registry
        ._dir
        .path()
        .join(format!("data/docker/registry/v2/blobs/sha256/{}/{top}/data", &top[..2]));
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let third = BuildEnv::new();
    let o = lcache_with_config(&third, &p, no_config.path(), &["image", "pull", &app]);
    assert!(
        !o.status.success() && stderr(&o).contains("nothing of it was kept"),
        "{}",
        stderr(&o)
    );
    let listed = third.lcache(&p, &["image", "ls"]);
    assert!(!String::from_utf8_lossy(&listed.stdout).contains("app:1"));

    // A tag the registry does not have: the error says so and what to check.
    let o = lcache_with_config(
        &other,
        &p,
        no_config.path(),
        &["image", "pull", &format!("{}/app:nope", registry.addr)],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("not found"),
        "{}",
        stderr(&o)
    );
    // Nothing listens: unreachable, with the address.
    let o = lcache_with_config(&other, &p, no_config.path(), &["image", "pull", "127.0.0.1:9/x:1"]);
    assert!(
        !o.status.success() && stderr(&o).contains("cannot reach 127.0.0.1:9"),
        "{}",
        stderr(&o)
    );
}

/// A `docker-credential-NAME` in `dir` that answers `user`/`pw-user` for any registry.
fn credential_helper(dir: &Path, name: &str, user: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("docker-credential-{name}"));
    std::fs::write(
        &path,
        format!("#!/bin/sh\ncat >/dev/null\necho '{{\"Username\":\"{user}\",\"Secret\":\"pw-{user}\"}}'\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn credentials_come_from_docker_config_and_credential_helpers() {
    let registry = Registry::start(Some("ci"));
    let seeder = BuildEnv::new();
    let base = format!("{}/private:1", registry.addr);
    seed(&seeder, &base, Some("ci:pw-ci"));
    let env = BuildEnv::new();
    let p = Project::new();

    // No login: refused, and told how to log in.
    let empty = tempfile::tempdir().unwrap();
    let o = lcache_with_config(&env, &p, empty.path(), &["image", "pull", &base]);
    assert!(
        !o.status.success() && stderr(&o).contains(&format!("docker login {}", registry.addr)),
        "{}",
        stderr(&o)
    );

    // `auths` as `docker login` writes it.
    use base64::Engine;
    let auths = tempfile::tempdir().unwrap();
    let token = base64::engine::general_purpose::STANDARD.encode("ci:pw-ci");
    std::fs::write(
        auths.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{token}"}}}}}}"#, registry.addr),
    )
    .unwrap();
    let o = lcache_with_config(&env, &p, auths.path(), &["image", "pull", &base]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A credential helper named in credHelpers, found on PATH.
    let helped = tempfile::tempdir().unwrap();
    credential_helper(helped.path(), "lcachetest", "ci");
    std::fs::write(
        helped.path().join("config.json"),
        format!(r#"{{"credHelpers":{{"{}":"lcachetest"}}}}"#, registry.addr),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        helped.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    p.write("Dockerfile", &format!("FROM {base}\nRUN cat /base.txt\n"));
    let o = env
        .command(&p, &["build", "--progress", "plain", "--pull", "."])
        .env("DOCKER_CONFIG", helped.path())
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("pulled {base}")),
        "--pull pulls again: {}",
        stderr(&o)
    );
}

/// Blob files in `env`'s store.
fn stored_blobs(env: &BuildEnv) -> usize {
    std::fs::read_dir(env.daemon.store().join("blobs/sha256")).map_or(0, |d| d.count())
}

#[test]
fn layers_kept_as_tar_are_pushed_gzipped_once_and_pull_back_as_the_same_image() {
    let registry = Registry::start(None);
    let no_config = tempfile::tempdir().unwrap();
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY src /app/\nRUN cat /app/f0003.txt > /seen\n",
    )
    .write_many("src", 600);
    let app = format!("{}/tar:1", registry.addr);
    let build = [
        "build",
        "--progress",
        "plain",
        "--layer-compression",
        "none",
        "-t",
        &app,
        "--push",
        ".",
    ];
    let o = lcache_with_config(&env, &p, no_config.path(), &build);
    assert!(o.status.success(), "{}", stderr(&o));
    let printed = String::from_utf8_lossy(&o.stdout).trim().to_string();

    // The registry has gzip layers under a manifest of their own, which the build printed;
    // the config (the image's ID) is the one lcache built.
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{app}")]);
    let manifest: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(
        lcache_e2e::sha256_digest(&raw.stdout),
        printed,
        "stdout names what was pushed"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for l in layers {
        assert_eq!(
            l["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
            "{manifest}"
        );
    }
    let ours = env.lcache(&p, &["image", "inspect", &app]);
    let ours: serde_json::Value = serde_json::from_slice(&ours.stdout).unwrap();
    let ours = ours.as_array().map_or(ours.clone(), |a| a[0].clone());
    assert_eq!(manifest["config"]["digest"], ours["Id"]);
    // skopeo checks every blob against its digest as it copies.
    let copy = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{app}"),
        &format!("oci:{}", copy.path().display()),
    ]);

    // Pushed again elsewhere: the gzip forms kept are sent, nothing is compressed again
    // (a form made again would be renamed into place: another inode).
    let inodes = || -> Vec<u64> {
        use std::os::unix::fs::MetadataExt;
        layers[1..]
            .iter()
            .map(|l| {
                let hex = l["digest"].as_str().unwrap().trim_start_matches("sha256:");
                std::fs::metadata(env.daemon.store().join("blobs/sha256").join(hex))
                    .unwrap()
                    .ino()
            })
            .collect()
    };
    let (before, kept) = (stored_blobs(&env), inodes());
    let other_ref = format!("{}/tar-again:1", registry.addr);
    let o = lcache_with_config(&env, &p, no_config.path(), &["image", "push", &app, &other_ref]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&printed));
    assert_eq!(
        (stored_blobs(&env), inodes()),
        (before, kept),
        "no new gzip form was made"
    );

    // A fresh daemon pulls it and builds on it: the same image, its layers gzip.
    let other = BuildEnv::new();
    let o = lcache_with_config(&other, &p, no_config.path(), &["image", "pull", &app]);
    assert!(o.status.success(), "{}", stderr(&o));
    let q = Project::new();
    q.write(
        "Dockerfile",
        &format!("FROM {app}\nRUN cat /seen /app/f0599.txt > /both\n"),
    );
    let out = tempfile::tempdir().unwrap();
    let dest = format!("type=local,dest={}", out.path().display());
    let o = other.lcache(&q, &["build", "--progress", "plain", "--output", &dest, "."]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut both = std::fs::read(p.path().join("src/f0003.txt")).unwrap();
    both.extend(std::fs::read(p.path().join("src/f0599.txt")).unwrap());
    assert_eq!(std::fs::read(out.path().join("both")).unwrap(), both);

    // A tar layer damaged in the store since it was named is not pushed under its name.
    let r = Project::new();
    r.write("Dockerfile", "FROM busybox\nRUN echo damaged-soon > /d\n");
    let bad = format!("{}/bad:1", registry.addr);
    let o = env.lcache(
        &r,
        &[
            "build",
            "--progress",
            "plain",
            "--layer-compression",
            "none",
            "-t",
            &bad,
            ".",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let image = env.lcache(&r, &["image", "inspect", &bad]);
    let image: serde_json::Value = serde_json::from_slice(&image.stdout).unwrap();
    let image = image.as_array().map_or(image.clone(), |a| a[0].clone());
    let top = image["RootFS"]["Layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let mut file = env
        .daemon
        .store()
        .join("blobs/sha256")
        .join(top.trim_start_matches("sha256:"));
    if file.is_dir() {
        // Held by reference: its bytes are a pack's files, the tar's headers first. Rot
        // that keeps the file's time (which the pack's stamps would see) is left to the
        // digest check.
        let recipe: serde_json::Value = serde_json::from_slice(&std::fs::read(file.join("recipe")).unwrap()).unwrap();
        let pack = recipe["runs"][0]["file"].as_str().unwrap().to_string();
        file = env.daemon.store().join("blobs/packs").join(pack).join("0");
    }
    let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[600] ^= 0x20;
    std::fs::write(&file, bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    let o = lcache_with_config(&env, &r, no_config.path(), &["image", "push", &bad]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("damaged") && stderr(&o).contains("--no-cache"),
        "{}",
        stderr(&o)
    );
    let listed = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", &format!("docker://{bad}")])
        .output()
        .unwrap();
    assert!(!listed.status.success(), "nothing was pushed under the name");
}
