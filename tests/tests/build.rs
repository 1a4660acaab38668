//! Real builds: the real lcached, the real lcache, runc on overlayfs, a busybox base made
//! from Debian's busybox-static. Needs root (overlay mounts, runc).

use std::io::Read;

use lcache_e2e::{blob_size, blobs_kept_as_runs, cached, own_bytes, sha256_digest, BuildEnv, Project};

const APP: &str = "FROM busybox\nWORKDIR /app\nCOPY src ./src\nRUN cat src/* > /app/all && echo built >> /app/all\nENV MODE=prod\nCMD [\"cat\", \"/app/all\"]\n";

fn app() -> Project {
    let p = Project::new();
    p.write("Dockerfile", APP)
        .write("src/a.txt", "alpha\n")
        .write("src/b.txt", "beta\n")
        .write("notes.md", "n\n")
        .write(".dockerignore", "notes.md\n");
    p
}

/// `lcache build --progress plain EXTRA --output OUTPUT .`, which must succeed.
fn build_to(env: &BuildEnv, p: &Project, extra: &[&str], output: &str) {
    let mut args = vec!["build", "--progress", "plain"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--output", output, "."]);
    let out = env.lcache(p, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn export_local(env: &BuildEnv, p: &Project, dest: &std::path::Path) {
    build_to(env, p, &[], &format!("type=local,dest={}", dest.display()));
}

#[test]
fn run_output_lands_in_the_image_and_a_second_build_is_all_cached() {
    let env = BuildEnv::new();
    let p = app();
    let (first, image) = env.build(&p, &[]);
    assert_eq!(cached(&first), [false, false, false]);
    let (second, image2) = env.build(&p, &[]);
    assert_eq!(cached(&second), [true, true, true]);
    assert_eq!(image, image2);
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert_eq!(
        std::fs::read_to_string(out.path().join("app/all")).unwrap(),
        "alpha\nbeta\nbuilt\n"
    );
    assert!(
        out.path().join("bin/busybox").exists(),
        "the base image's files are there too"
    );
}

#[test]
fn rebuilding_without_the_cache_gives_byte_identical_layers() {
    let env = BuildEnv::new();
    let p = app();
    let (_, image) = env.build(&p, &[]);
    let (steps, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(cached(&steps), [false, false, false]);
    assert_eq!(image, again, "same manifest, so same config and layer bytes");
}

#[test]
fn an_edit_rebuilds_its_copy_and_what_follows_and_ignored_files_change_nothing() {
    let env = BuildEnv::new();
    let p = app();
    env.build(&p, &[]);
    p.write("notes.md", "edited but ignored\n");
    assert_eq!(cached(&env.build(&p, &[]).0), [true, true, true]);
    let f = std::fs::File::options()
        .write(true)
        .open(p.path().join("src/a.txt"))
        .unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    assert_eq!(
        cached(&env.build(&p, &[]).0),
        [true, true, true],
        "mtime alone changes nothing"
    );
    p.write("src/b.txt", "BETA\n");
    assert_eq!(cached(&env.build(&p, &[]).0), [true, false, false]);
    p.write("src/b.txt", "beta\n");
    assert_eq!(
        cached(&env.build(&p, &[]).0),
        [true, true, true],
        "undoing the edit finds the old results"
    );
}

#[test]
fn a_build_arg_for_a_declared_arg_reruns_later_runs_only() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nRUN echo early > /early\nARG FLAVOR=plain\nRUN echo $FLAVOR > /flavor\n",
    );
    env.build(&p, &[]);
    assert_eq!(
        cached(&env.build(&p, &["--build-arg", "FLAVOR=spicy"]).0),
        [true, false]
    );
    assert_eq!(cached(&env.build(&p, &["--build-arg", "UNDECLARED=1"]).0), [true, true]);
    let out = tempfile::tempdir().unwrap();
    build_to(
        &env,
        &p,
        &["--build-arg", "FLAVOR=spicy"],
        &format!("type=local,dest={}", out.path().display()),
    );
    assert_eq!(std::fs::read_to_string(out.path().join("flavor")).unwrap(), "spicy\n");
}

#[test]
fn a_failing_run_fails_the_build_with_its_output_and_is_not_cached() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nRUN echo preparing && echo boom >&2 && exit 3\n",
    );
    let out = env.try_build(&p, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Dockerfile:2") && err.contains("exited with code 3") && err.contains("boom"),
        "{err}"
    );
    let plan = env.lcache(&p, &["plan", "--json", "."]);
    let v: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(v["cached"][0], false, "the failed step was not recorded");
}

#[test]
fn copy_from_a_stage_keeps_downstream_hits_when_the_artifact_bytes_are_unchanged() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox AS build\nCOPY gen.sh /gen.sh\nRUN sh /gen.sh > /artifact\nFROM busybox\nCOPY --from=build /artifact /artifact\nRUN wc -c /artifact > /size\n",
    )
    .write("gen.sh", "echo artifact-v1\n");
    env.build(&p, &[]);
    p.write(
        "gen.sh",
        "# a comment that changes nothing in the output\necho artifact-v1\n",
    );
    assert_eq!(
        cached(&env.build(&p, &[]).0),
        [false, false, true, true],
        "same artifact: downstream hits"
    );
    p.write("gen.sh", "echo artifact-v2\n");
    assert_eq!(cached(&env.build(&p, &[]).0), [false, false, false, false]);
}

#[test]
fn user_and_workdir_reach_the_container() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nWORKDIR /srv/data\nRUN chmod 777 /srv/data\nUSER nobody\nRUN id -u > uid && pwd > where\n",
    );
    env.build(&p, &[]);
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert_eq!(
        std::fs::read_to_string(out.path().join("srv/data/uid")).unwrap(),
        "65534\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("srv/data/where")).unwrap(),
        "/srv/data\n"
    );
}

#[test]
fn deletions_in_a_run_become_whiteouts_in_the_image() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nRUN mkdir -p /d && echo x > /d/f && echo y > /keep\nRUN rm -r /d\n",
    );
    env.build(&p, &[]);
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert!(!out.path().join("d").exists());
    assert!(out.path().join("keep").exists());
}

#[test]
fn the_exported_oci_layout_is_valid() {
    let env = BuildEnv::new();
    let p = app();
    let dest = tempfile::tempdir().unwrap();
    let layout = dest.path().join("oci");
    build_to(
        &env,
        &p,
        &["-t", "app:1"],
        &format!("type=oci,dest={}", layout.display()),
    );
    let read = |d: &str| std::fs::read(layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap();
    let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
    assert_eq!(
        json(&std::fs::read(layout.join("oci-layout")).unwrap())["imageLayoutVersion"],
        "1.0.0"
    );
    let index = json(&std::fs::read(layout.join("index.json")).unwrap());
    let m = &index["manifests"][0];
    let manifest_bytes = read(m["digest"].as_str().unwrap());
    assert_eq!(sha256_digest(&manifest_bytes), m["digest"]);
    assert_eq!(manifest_bytes.len() as u64, m["size"].as_u64().unwrap());
    assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "app:1");
    let manifest = json(&manifest_bytes);
    assert_eq!(manifest["schemaVersion"], 2);
    let config_bytes = read(manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(sha256_digest(&config_bytes), manifest["config"]["digest"]);
    let config = json(&config_bytes);
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["cat", "/app/all"]));
    assert!(config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "MODE=prod"));
    let layers = manifest["layers"].as_array().unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len());
    assert_eq!(layers.len(), 4, "busybox + WORKDIR + COPY + RUN");
    for (l, diff_id) in layers.iter().zip(diff_ids) {
        let blob = read(l["digest"].as_str().unwrap());
        assert_eq!(sha256_digest(&blob), l["digest"]);
        assert_eq!(blob.len() as u64, l["size"].as_u64().unwrap());
        let tar = lcache_e2e::gunzip(&blob);
        assert_eq!(sha256_digest(&tar), *diff_id);
    }
}

#[test]
fn the_docker_export_carries_manifest_json_with_the_tag() {
    let env = BuildEnv::new();
    let p = app();
    let dest = tempfile::tempdir().unwrap();
    let tarball = dest.path().join("img.tar");
    build_to(
        &env,
        &p,
        &["-t", "app:2"],
        &format!("type=docker,dest={}", tarball.display()),
    );
    let list = std::process::Command::new("tar")
        .arg("-xOf")
        .arg(&tarball)
        .arg("manifest.json")
        .output()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(m[0]["RepoTags"][0], "app:2");
    assert_eq!(m[0]["Layers"].as_array().unwrap().len(), 4);
    let ls = env.lcache(&p, &["image", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("app:2"));
}

#[test]
fn a_tagged_image_can_be_a_later_from() {
    let env = BuildEnv::new();
    let p = app();
    assert!(env.lcache(&p, &["build", "-t", "base:1", "."]).status.success());
    let q = Project::new();
    q.write("Dockerfile", "FROM base:1\nRUN cat /app/all > /copied\n");
    let (steps, _) = env.build(&q, &[]);
    assert_eq!(cached(&steps), [false]);
}

#[test]
fn an_unknown_base_image_says_how_to_import_one() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write("Dockerfile", "FROM nosuch:1\nRUN true\n");
    let out = env.try_build(&p, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("lcache image import FILE nosuch:1"),
        "{err}"
    );
}

#[test]
fn hostile_image_tars_are_refused_and_write_nothing_outside() {
    let env = BuildEnv::new();
    let p = Project::new();
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("evil.tar");
    // A tar whose entry climbs out of the root, written byte by byte as an attacker would.
    let mut header = [0u8; 512];
    let name = b"../../lcache-escaped";
    header[..name.len()].copy_from_slice(name);
    header[100..107].copy_from_slice(b"0000644");
    header[108..115].copy_from_slice(b"0000000");
    header[116..123].copy_from_slice(b"0000000");
    header[124..135].copy_from_slice(b"00000000004");
    header[136..147].copy_from_slice(b"00000000000");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut data = header.to_vec();
    let mut body = b"evil".to_vec();
    body.resize(512, 0);
    data.extend_from_slice(&body);
    data.extend_from_slice(&[0u8; 1024]);
    std::fs::write(&tarball, &data).unwrap();
    let out = env.lcache(&p, &["image", "import", tarball.to_str().unwrap(), "evil:1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'../../lcache-escaped'") && err.contains("refused"),
        "{err}"
    );
    let ls = env.lcache(&p, &["image", "ls"]);
    assert!(!String::from_utf8_lossy(&ls.stdout).contains("evil"));
}

#[test]
fn independent_stages_run_at_the_same_time() {
    // Stage `a` waits for a message that only stage `b` sends (over the host network both
    // RUNs share, BuildKit's default): built one after the other, `a` would time out.
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        concat!(
            "FROM busybox AS a\n",
            // Listen until a message arrives, for at most 30 s; nothing means failure.
            "RUN end=$(($(date +%s) + 30)); while [ $(date +%s) -lt $end ]; do timeout 5 nc -l -p 47613 > /got; [ -s /got ] && break; done; [ -s /got ]\n",
            "FROM busybox AS b\n",
            // Send until a send succeeds, keep sending while they do, stop once nobody listens.
            "RUN sent=0; for i in $(seq 150); do if echo hello | nc 127.0.0.1 47613; then sent=1; elif [ $sent = 1 ]; then break; fi; sleep 0.2; done; echo $sent > /sent\n",
            "FROM busybox\nCOPY --from=a /got /got\nCOPY --from=b /sent /sent\n",
        ),
    );
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert_eq!(std::fs::read_to_string(out.path().join("got")).unwrap(), "hello\n");
}

#[test]
fn our_docker_and_oci_exports_import_back_as_bases() {
    let env = BuildEnv::new();
    let p = app();
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("app.tar");
    let layout = dir.path().join("layout");
    for out in [
        format!("type=docker,dest={}", tarball.display()),
        format!("type=oci,dest={}", layout.display()),
    ] {
        assert!(env
            .lcache(&p, &["build", "-t", "exported:1", "--output", &out, "."])
            .status
            .success());
    }
    for (file, name) in [(&tarball, "from-docker:1"), (&layout, "from-oci:1")] {
        let o = env.lcache(&p, &["image", "import", file.to_str().unwrap(), name]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let q = Project::new();
        q.write("Dockerfile", &format!("FROM {name}\nRUN cat /app/all > /seen\n"));
        let out = tempfile::tempdir().unwrap();
        export_local(&env, &q, out.path());
        assert_eq!(
            std::fs::read_to_string(out.path().join("seen")).unwrap(),
            "alpha\nbeta\nbuilt\n"
        );
    }
    let ls = String::from_utf8_lossy(&env.lcache(&p, &["image", "ls"]).stdout).to_string();
    assert!(ls.contains("from-docker:1") && ls.contains("from-oci:1"), "{ls}");
}

#[test]
fn add_unpacks_a_local_tar_and_copy_does_not() {
    let env = BuildEnv::new();
    let p = Project::new();
    let status = std::process::Command::new("tar")
        .args(["-czf", "bundle.tar.gz", "-C", "/etc", "hostname"])
        .current_dir(p.path())
        .status();
    assert!(status.unwrap().success());
    p.write(
        "Dockerfile",
        "FROM busybox\nADD bundle.tar.gz /unpacked/\nCOPY bundle.tar.gz /packed/\n",
    );
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert!(out.path().join("unpacked/hostname").is_file());
    assert!(out.path().join("packed/bundle.tar.gz").is_file());
}

#[test]
fn config_only_changes_comments_and_equal_continuations_rebuild_nothing_for_real() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nLABEL v=1\nRUN echo a b > /x\nEXPOSE 80\nCMD [\"a\"]\n",
    );
    env.build(&p, &[]);
    p.write(
        "Dockerfile",
        "# a comment\nFROM busybox\nLABEL v=2\nRUN echo a \\\nb > /x\nEXPOSE 8080\nCMD [\"b\"]\n",
    );
    assert_eq!(cached(&env.build(&p, &[]).0), [true]);
    p.write("Dockerfile", "FROM busybox\nRUN <<EOF\necho one > /h\nEOF\n");
    env.build(&p, &[]);
    p.write("Dockerfile", "FROM busybox\nRUN <<EOF\necho two > /h\nEOF\n");
    assert_eq!(
        cached(&env.build(&p, &[]).0),
        [false],
        "a heredoc body change reruns the step"
    );
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert_eq!(std::fs::read_to_string(out.path().join("h")).unwrap(), "two\n");
}

#[test]
fn run_network_none_gets_an_empty_network_namespace() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nRUN --network=none ls /sys/class/net > /net-none\nRUN ls /sys/class/net > /net-host\n",
    );
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert_eq!(std::fs::read_to_string(out.path().join("net-none")).unwrap(), "lo\n");
    assert_ne!(
        std::fs::read_to_string(out.path().join("net-host")).unwrap(),
        "lo\n",
        "the default is the host's network"
    );
}

#[test]
fn a_rebuilt_copy_links_unchanged_files_and_copies_changed_ones_even_with_mtime_restored() {
    use std::os::unix::fs::MetadataExt;
    let env = BuildEnv::new();
    let p = app();
    env.build(&p, &[]);
    p.write("src/b.txt", "BETA\n");
    // Same size, content changed, mtime put back: only ctime tells.
    let a = p.path().join("src/a.txt");
    let old_mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
    p.write("src/a.txt", "ALPHA\n");
    std::fs::File::options()
        .write(true)
        .open(&a)
        .unwrap()
        .set_modified(old_mtime)
        .unwrap();
    p.write("src/c.txt", "gamma\n");
    let (steps, _) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [true, false, false]);
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert_eq!(
        std::fs::read_to_string(out.path().join("app/all")).unwrap(),
        "ALPHA\nBETA\ngamma\nbuilt\n"
    );

    // A file the last delta holds, unchanged since, is a hard link shared by both deltas.
    p.write("src/c.txt", "GAMMA\n");
    env.build(&p, &[]);
    let mut linked = 0;
    for tree in delta_trees(&env) {
        if let Ok(m) = std::fs::metadata(tree.join("app/src/b.txt")) {
            linked += usize::from(m.nlink() > 1);
        }
    }
    assert_eq!(linked, 2, "b.txt should be shared by the last two COPY snapshots");
}

/// The trees of the delta snapshots in `env`'s cache.
fn delta_trees(env: &BuildEnv) -> Vec<std::path::PathBuf> {
    let mut trees: Vec<_> = std::fs::read_dir(env.cache_dir().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "delta"))
        .map(|p| p.join("tree"))
        .collect();
    trees.sort();
    trees
}

/// Regular files and whiteouts beneath `root`, as `(path, "file" | "whiteout")`, sorted.
fn leaves(root: &std::path::Path) -> Vec<(String, &'static str)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if m.is_dir() {
                todo.push(path);
            } else if m.file_type().is_char_device() && m.rdev() == 0 {
                out.push((rel, "whiteout"));
            } else {
                out.push((rel, "file"));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_rebuilt_copy_keeps_only_what_changed_and_makes_the_layer_a_cold_build_makes() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY src /app/\nRUN ls -lnR /app > /listing && stat -c '%a %n' /app /app/d1 >> /listing\n",
    );
    for i in 0..40 {
        p.write(&format!("src/d{}/f{i}.txt", i % 4), &format!("file {i}\n"));
    }
    p.write("src/gone/x.txt", "x\n");
    // Directories' own modes must survive in the delta's view.
    {
        use std::os::unix::fs::PermissionsExt;
        for (dir, mode) in [("src", 0o750), ("src/d1", 0o700)] {
            std::fs::set_permissions(p.path().join(dir), std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    env.build(&p, &[]);
    p.write("src/d1/f5.txt", "EDITED\n");
    p.write("src/d2/new.txt", "new\n");
    std::fs::remove_file(p.path().join("src/d3/f7.txt")).unwrap();
    std::fs::remove_dir_all(p.path().join("src/gone")).unwrap();
    let (steps, image) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false, false]);
    let trees = delta_trees(&env);
    assert_eq!(trees.len(), 1, "the rebuilt COPY's snapshot is a delta");
    assert_eq!(
        leaves(&trees[0]),
        [
            ("app/d1/f5.txt".to_string(), "file"),
            ("app/d2/new.txt".to_string(), "file"),
            ("app/d3/f7.txt".to_string(), "whiteout"),
            ("app/gone".to_string(), "whiteout"),
        ],
        "only what changed, and whiteouts for what is gone"
    );

    // The next edit's delta is over the same whole snapshot, not stacked on the last one.
    p.write("src/d0/f0.txt", "EDITED TOO\n");
    let (_, image) = {
        let _ = image;
        env.build(&p, &[])
    };
    let trees = delta_trees(&env);
    assert_eq!(trees.len(), 2);
    let newest: Vec<_> = trees
        .iter()
        .map(|t| leaves(t))
        .find(|l| l.len() == 5)
        .expect("a delta with both edits");
    assert!(newest.contains(&("app/d0/f0.txt".to_string(), "file")), "{newest:?}");

    // What RUN saw through the deltas and the layers they packed are what a cold build makes.
    let (steps, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(cached(&steps), [false, false]);
    assert_eq!(image, again, "same layers, byte for byte");
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    let listing = std::fs::read_to_string(out.path().join("listing")).unwrap();
    assert!(
        listing.contains("new.txt") && !listing.contains("f7.txt") && !listing.contains("gone"),
        "{listing}"
    );
    assert!(listing.contains("700 /app/d1\n"), "{listing}");
    assert_eq!(
        std::fs::read_to_string(out.path().join("app/d1/f5.txt")).unwrap(),
        "EDITED\n"
    );
}

#[test]
fn a_rebuilt_copy_reads_only_what_lcached_lists_as_changed_and_makes_the_layer_a_cold_build_makes() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY src /app/\nRUN ls -lnR /app > /listing && stat -c '%a %n' /app/sub /app/mode.sh >> /listing\n",
    )
    .write("src/keep.txt", "keep\n")
    .write("src/touched.txt", "same bytes\n")
    .write("src/edit.txt", "one\n")
    .write("src/t2d", "a file, then a directory\n")
    .write("src/d2t/x", "a directory, then a file\n")
    .write("src/gone/x", "x\n")
    .write("src/mode.sh", "#!/bin/sh\n")
    .write("src/sub/y", "y\n");
    symlink("keep.txt", p.path().join("src/link")).unwrap();
    let chmod = |path: &str, mode| {
        std::fs::set_permissions(p.path().join(path), std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod("src/sub", 0o750);
    env.build(&p, &[]);

    // Every kind of change at once; one file only touched.
    let touched = std::fs::File::options()
        .write(true)
        .open(p.path().join("src/touched.txt"))
        .unwrap();
    touched
        .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
        .unwrap();
    p.write("src/edit.txt", "two\n");
    std::fs::remove_file(p.path().join("src/t2d")).unwrap();
    p.write("src/t2d/y", "now a directory\n");
    std::fs::remove_dir_all(p.path().join("src/d2t")).unwrap();
    p.write("src/d2t", "now a file\n");
    std::fs::remove_file(p.path().join("src/link")).unwrap();
    symlink("edit.txt", p.path().join("src/link")).unwrap();
    std::fs::remove_dir_all(p.path().join("src/gone")).unwrap();
    chmod("src/mode.sh", 0o755);
    chmod("src/sub", 0o700);
    p.write("src/new/deep/z", "z\n");
    let (steps, _) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false, false]);
    let trees = delta_trees(&env);
    assert_eq!(trees.len(), 1, "the rebuilt COPY's snapshot is a delta");
    let first = leaves(&trees[0]);
    assert!(
        trees[0].with_file_name("segments.bin").is_file(),
        "the segment index is kept once the diff_id hashed behind the RUN is known"
    );
    let has = |l: &[(String, &str)], p: &str, what: &str| l.contains(&(p.to_string(), what));
    assert!(
        !first.iter().any(|(p, _)| p == "app/touched.txt"),
        "a file lcached does not list as changed is not read again: {first:?}"
    );
    for (path, what) in [
        ("app/edit.txt", "file"),
        ("app/t2d/y", "file"),
        ("app/d2t", "file"),
        ("app/link", "file"),
        ("app/gone", "whiteout"),
        ("app/mode.sh", "file"),
        ("app/new/deep/z", "file"),
    ] {
        assert!(has(&first, path, what), "{path} {what} in {first:?}");
    }

    // The next edit builds on the same base: what the last delta changed is kept in this one.
    p.write("src/keep.txt", "kept no more\n");
    let (steps, image) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false, false]);
    let newest = delta_trees(&env)
        .iter()
        .map(|t| leaves(t))
        .find(|l| has(l, "app/keep.txt", "file"))
        .expect("a delta with the second edit");
    for (path, what) in [
        ("app/edit.txt", "file"),
        ("app/gone", "whiteout"),
        ("app/new/deep/z", "file"),
    ] {
        assert!(has(&newest, path, what), "{path} {what} in {newest:?}");
    }

    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    let read = |p: &str| std::fs::read_to_string(out.path().join(p)).unwrap();
    assert_eq!(read("app/link"), "two\n");
    assert_eq!(read("app/t2d/y"), "now a directory\n");
    assert_eq!(read("app/d2t"), "now a file\n");
    assert_eq!(read("app/keep.txt"), "kept no more\n");
    let listing = read("listing");
    assert!(
        listing.contains("700 /app/sub\n") && listing.contains("755 /app/mode.sh\n"),
        "{listing}"
    );
    assert!(!listing.contains("gone"), "{listing}");
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again, "same layers, byte for byte, as a cold build");
}

#[test]
fn a_copy_of_a_linked_directory_rebuilds_from_what_the_link_points_at() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY lnk /app/\nRUN cat /app/a.txt > /seen\n",
    )
    .write("src/a.txt", "one\n")
    .write("src/b.txt", "b\n");
    std::os::unix::fs::symlink("src", p.path().join("lnk")).unwrap();
    env.build(&p, &[]);
    p.write("src/a.txt", "two\n");
    let (steps, image) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false, false]);
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert_eq!(std::fs::read_to_string(out.path().join("seen")).unwrap(), "two\n");
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again);
}

#[test]
fn a_rebuilt_copy_stays_cached_when_the_run_after_it_fails() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nCOPY src /app/\nRUN cat /app/f0000.txt\n");
    // Enough entries for several segments: the re-run's diff_id is hashed behind the RUN.
    for i in 0..1500 {
        p.write(&format!("src/f{i:04}.txt"), &format!("{i}\n"));
    }
    env.build(&p, &[]);
    p.write("src/f0001.txt", "edited\n").write(
        "Dockerfile",
        "FROM busybox\nCOPY src /app/\nRUN cat /app/f0000.txt && false\n",
    );
    let failed = env.lcache(&p, &["build", "--progress", "plain", "."]);
    assert!(!failed.status.success());
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY src /app/\nRUN cat /app/f0000.txt && true\n",
    );
    let (steps, image) = env.build(&p, &[]);
    assert_eq!(
        cached(&steps),
        [true, false],
        "the COPY's record was stored after the RUN failed"
    );
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again, "with the diff_id a cold build gives");
}

fn stdout(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_failed_build_is_kept_in_the_history_and_the_next_one_goes_on_from_where_it_got() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nCOPY src /app/\nRUN test -e /app/ok\n")
        .write("src/a.txt", "a\n")
        .write("src/b.txt", "b\n");
    // The first build of the context fails at its RUN.
    assert!(!env.try_build(&p, &[]).status.success());
    let history = stdout(&env.lcache(&p, &["history"]));
    assert!(history.contains("FAILED at line 3 (RUN test -e /app/ok)"), "{history}");
    let explain = stdout(&env.lcache(&p, &["explain"]));
    assert!(
        explain.contains("Dockerfile:3: RUN test -e /app/ok: the command exited with code 1"),
        "{explain}"
    );
    assert!(
        explain.contains("2 steps: 0 cached (saved 0.0 s), 1 rebuilt, 1 failed"),
        "{explain}"
    );
    assert!(explain.contains("#2   line 3    RUN test -e /app/ok"), "{explain}");
    assert!(explain.contains("FAILED after"), "{explain}");
    let step = stdout(&env.lcache(&p, &["explain", "--step", "2"]));
    assert!(
        step.contains("FAILED: ./Dockerfile:3") && step.contains("key inputs"),
        "{step}"
    );

    // Tried again as it is: the COPY is a hit, and the RUN says it failed before.
    assert!(!env.try_build(&p, &[]).status.success());
    let explain = stdout(&env.lcache(&p, &["explain"]));
    assert!(explain.contains("CACHED"), "{explain}");
    assert!(
        explain.contains("it failed in an earlier build, with these same inputs"),
        "{explain}"
    );

    // Mended: the COPY is compared with the failed builds' and re-run from the snapshot they
    // made (a delta over it, not a second whole copy); the image is a cold build's.
    p.write("src/ok", "ok\n");
    let (steps, image) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false, false]);
    let explain = stdout(&env.lcache(&p, &["explain"]));
    assert!(explain.contains("files changed: src/ok added"), "{explain}");
    assert_eq!(whole_copy_snapshots(&env).len(), 1, "one whole snapshot of the COPY");
    assert_eq!(delta_trees(&env).len(), 1, "the mended COPY is a delta over it");
    let history = stdout(&env.lcache(&p, &["history"]));
    assert_eq!(history.matches("FAILED").count(), 2, "{history}");
    let (_, cold) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, cold);
}

/// The layer snapshots in `env`'s cache: whole directories and delta units.
fn snapshot_dirs(env: &BuildEnv) -> usize {
    std::fs::read_dir(env.cache_dir().join("snapshots"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
        .count()
}

#[test]
fn the_client_cache_keeps_to_its_budget_and_a_pruned_snapshot_is_made_again() {
    let env = BuildEnv::new();
    let p = app();
    let (_, image) = env.build(&p, &[]);
    assert!(snapshot_dirs(&env) >= 3, "busybox, the COPY, the RUN");

    let build_within = |max: &str| {
        env.command(&p, &["build", "--progress", "plain", "."])
            .env("LCACHE_CACHE_MAX", max)
            .output()
            .unwrap()
    };
    // With a budget of nothing every snapshot goes once the build is over, and it says so.
    let out = build_within("0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("least recently used snapshots") && err.contains("LCACHE_CACHE_MAX"),
        "{err}"
    );
    assert_eq!(snapshot_dirs(&env), 0);
    let bad = build_within("lots");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        bad.status.success() && err.contains("LCACHE_CACHE_MAX=lots is not a size"),
        "{err}"
    );

    // The next builds make them again from lcached's blobs: all cached, the same image; an
    // edit copies its COPY whole and makes the image a cold build makes.
    let (steps, again) = env.build(&p, &[]);
    assert!(cached(&steps).iter().all(|c| *c), "{steps:?}");
    assert_eq!(again, image);
    assert!(snapshot_dirs(&env) >= 3);
    p.write("src/a.txt", "alpha, edited\n");
    let (_, edited) = env.build(&p, &[]);
    let (_, cold) = env.build(&p, &["--no-cache"]);
    assert_eq!(edited, cold);

    // `lcache cache prune` removes them too, or keeps what fits.
    let kept = stdout(&env.lcache(&p, &["cache", "prune", "--keep-storage", "1T"]));
    assert!(kept.contains("removed 0 snapshots"), "{kept}");
    let out = stdout(&env.lcache(&p, &["cache", "prune"]));
    assert!(
        out.contains("snapshots (") && !out.contains("removed 0 snapshots"),
        "{out}"
    );
    assert_eq!(snapshot_dirs(&env), 0);
    let bad = env.lcache(&p, &["cache", "prune", "--keep-storage", "lots"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--keep-storage lots is not a size"));
}

/// Whether anything is mounted beneath `dir`.
fn mounted_under(dir: &std::path::Path) -> bool {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&dir)))
}

#[test]
fn what_a_killed_build_left_mounted_in_the_cache_is_cleared_by_the_next_build() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nCOPY src /src\nRUN sleep 2\n")
        .write("src/a.txt", "a\n");
    let mut killed = env
        .command(&p, &["build", "--progress", "plain", "."])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let cache = env.cache_dir();
    let started = std::time::Instant::now();
    while !(cache.exists() && mounted_under(&cache.canonicalize().unwrap())) {
        assert!(started.elapsed().as_secs() < 60, "the RUN never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    killed.kill().unwrap();
    killed.wait().unwrap();
    let cache = cache.canonicalize().unwrap();
    assert!(mounted_under(&cache), "a killed build leaves its overlay mounted");
    let work = cache.join("work");
    assert!(std::fs::read_dir(&work).unwrap().count() > 0);
    // The container's sleep ends on its own.
    std::thread::sleep(std::time::Duration::from_secs(3));

    p.write("Dockerfile", "FROM busybox\nCOPY src /src\nRUN true\n");
    let out = env.lcache(&p, &["build", "--progress", "plain", "."]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("that killed builds left in"), "{err}");
    assert!(!mounted_under(&cache));
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
}

/// The whole COPY snapshots in `env`'s cache (those that keep their entries), by digest hex.
fn whole_copy_snapshots(env: &BuildEnv) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(env.cache_dir().join("snapshots"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".entries.bin").map(str::to_string)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_delta_whose_base_is_gone_and_a_seed_blob_that_is_gone_cost_speed_not_correctness() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY src /app/\nRUN cat /app/a.txt > /seen\n",
    )
    .write("src/a.txt", "one\n")
    .write("src/b.txt", "b\n");
    env.build(&p, &[]);
    p.write("src/a.txt", "two\n");
    env.build(&p, &[]);
    assert_eq!(delta_trees(&env).len(), 1);

    // The whole snapshot under the delta is removed: the delta is not used, its layer is
    // extracted whole from the blob, and the next edit copies everything.
    let snapshots = env.cache_dir().join("snapshots");
    for hex in whole_copy_snapshots(&env) {
        std::fs::remove_dir_all(snapshots.join(&hex)).unwrap();
        std::fs::remove_file(snapshots.join(format!("{hex}.entries.bin"))).unwrap();
    }
    let (steps, _) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [true, true]);
    p.write("src/a.txt", "three\n");
    let (steps, image) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false, false]);
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again);

    // The seed layer's blob is gone from lcached: its segments cannot be reused, so all are
    // packed again, to the same bytes.
    let seed = whole_copy_snapshots(&env);
    assert_eq!(seed.len(), 1, "{seed:?}");
    // Kept whole, or as runs over the blob before it (a directory).
    let blob = env.daemon.store().join("blobs/sha256").join(&seed[0]);
    match blob.is_dir() {
        true => std::fs::remove_dir_all(&blob).unwrap(),
        false => std::fs::remove_file(&blob).unwrap(),
    }
    p.write("src/a.txt", "four\n");
    let (steps, image) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false, false]);
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again);
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert_eq!(std::fs::read_to_string(out.path().join("seen")).unwrap(), "four\n");
}

/// A COPY of 1,500 files built once: enough entries for several segments, so an edit reuses
/// members of the layer's blob, whose file in lcached's store is returned.
fn copy_built_once(env: &BuildEnv, p: &Project) -> std::path::PathBuf {
    p.write("Dockerfile", "FROM busybox\nCOPY src /app/\n");
    for i in 0..1500 {
        p.write(&format!("src/f{i:04}.txt"), &format!("{i}\n"));
    }
    env.build(p, &[]);
    let seed = whole_copy_snapshots(env);
    assert_eq!(seed.len(), 1);
    env.daemon.store().join("blobs/sha256").join(&seed[0])
}

#[test]
fn entries_damaged_on_disk_beside_the_seed_cost_a_whole_copy_not_the_build() {
    let env = BuildEnv::new();
    let p = Project::new();
    copy_built_once(&env, &p);
    // A bit flipped in the middle of the entries kept beside the whole snapshot: found when
    // the chunk holding the edited path is read.
    let seed = whole_copy_snapshots(&env);
    let entries = env
        .cache_dir()
        .join("snapshots")
        .join(format!("{}.entries.bin", seed[0]));
    let mut bytes = std::fs::read(&entries).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&entries, &bytes).unwrap();

    p.write("src/f0750.txt", "edited\n");
    let out = env.lcache(&p, &["build", "--progress", "plain", "."]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("are damaged") && err.contains("copying the sources whole"),
        "{err}"
    );
    let image = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again);
    // The next edit has a whole snapshot to go over again.
    p.write("src/f0100.txt", "edited too\n");
    let (steps, image) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false]);
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again);
}

#[test]
fn a_corrupt_seed_blob_is_never_reused_into_a_new_layer() {
    // A gzip blob's mechanics (one file, members, CRCs); layer_compression.rs has the tar's.
    let env = BuildEnv::new().with_gzip_layers();
    let p = Project::new();
    let blob = copy_built_once(&env, &p);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[40] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();

    p.write("src/f1499.txt", "edited\n");
    let (steps, image) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false]);
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again, "the corrupt front was not copied into the new layer");
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert_eq!(
        std::fs::read_to_string(out.path().join("app/f0000.txt")).unwrap(),
        "0\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("app/f1499.txt")).unwrap(),
        "edited\n"
    );
}

/// Builds `p`'s one COPY again, a miss, and checks it gives the image `--no-cache` does.
fn rebuilds_as_cold(env: &BuildEnv, p: &Project) {
    let (steps, image) = env.build(p, &[]);
    assert_eq!(cached(&steps), [false]);
    let (_, again) = env.build(p, &["--no-cache"]);
    assert_eq!(image, again);
}

/// Damages the CRC of the blob's last member (before the tar's end, ~30 bytes): lcached
/// takes that member into an edited layer unread, and only inflating it for the diff_id
/// finds it damaged.
fn damage_last_member(blob: &std::path::Path) {
    let mut bytes = std::fs::read(blob).unwrap();
    let trailer = (0..bytes.len() - 1)
        .rev()
        .find(|&i| bytes[i..].starts_with(&[0x1f, 0x8b, 8]))
        .unwrap();
    bytes[trailer - 8] ^= 0x55;
    std::fs::write(blob, &bytes).unwrap();
}

#[test]
fn a_seed_blob_damaged_after_the_change_fails_the_build_once_and_the_next_packs_whole() {
    // A gzip blob's mechanics (one file, members, CRCs); layer_compression.rs has the tar's.
    let env = BuildEnv::new().with_gzip_layers();
    let p = Project::new();
    damage_last_member(&copy_built_once(&env, &p));

    p.write("src/f0100.txt", "edited\n");
    let out = env.try_build(&p, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot hash the layer") && err.contains("run the build again"),
        "{err}"
    );
    // lcached removed the damaged blob: the next build packs the layer whole, and it is
    // the layer a cold build makes.
    rebuilds_as_cold(&env, &p);
}

#[test]
fn a_rebuilt_copy_stores_in_lcached_only_the_members_that_changed_and_exports_whole() {
    // A gzip blob's mechanics (one file, members, CRCs); layer_compression.rs has the tar's.
    let env = BuildEnv::new().with_gzip_layers();
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nCOPY src /app/\n")
        .write_many("src", 3000);
    env.build(&p, &[]);
    let seed = whole_copy_snapshots(&env);
    assert_eq!(seed.len(), 1);
    p.write("src/f1700.txt", "edited\n");
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let (steps, image) = env.build(&p, &["--summary-json", summary.to_str().unwrap()]);
    assert_eq!(cached(&steps), [false]);
    // lcached named the layer from its own copy of the last one: the client fetched none of
    // it (the members after the change included) and sent only the new members.
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(s["bytes_fetched"].as_u64(), Some(0), "{s}");

    let blobs = env.daemon.store().join("blobs/sha256");
    let composed = blobs_kept_as_runs(&env.daemon.store());
    assert_eq!(composed.len(), 1, "the rebuilt COPY's blob is kept as runs");
    let whole = std::fs::metadata(blobs.join(&seed[0])).unwrap().len();
    let added = own_bytes(&composed[0]);
    assert!(
        added * 4 < whole,
        "the edit stored {added} bytes for a layer of about {whole}"
    );
    let stored = s["bytes_stored"].as_u64().unwrap();
    assert!(
        stored * 4 < whole,
        "the edit sent {stored} bytes for a layer of about {whole}"
    );

    // The base blob evicted behind it: the new blob still reads whole, and it is the
    // layer a cold build makes.
    std::fs::remove_file(blobs.join(&seed[0])).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let layout = dest.path().join("oci");
    build_to(&env, &p, &[], &format!("type=oci,dest={}", layout.display()));
    let hex = composed[0].file_name().unwrap().to_str().unwrap();
    let exported = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(sha256_digest(&exported), format!("sha256:{hex}"));
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again);
}

/// A socket in `dir` that passes every connection through to `env`'s lcached but answers
/// `POST {endpoint}` as an lcached older than it does (404, no endpoint). Returns how many
/// times it was asked, and the socket's endpoint (for `--daemon`).
fn older_lcached(
    env: &BuildEnv,
    dir: &std::path::Path,
    endpoint: &'static str,
) -> (std::sync::Arc<std::sync::atomic::AtomicUsize>, String) {
    let front = dir.join("older.sock");
    let daemon = env.daemon.endpoint();
    let asked = pass_through_but(
        std::path::Path::new(daemon.trim_start_matches("unix://")),
        &front,
        endpoint,
    );
    (asked, format!("unix://{}", front.display()))
}

/// The proxy of [`older_lcached`], from `front` to the socket `daemon`.
fn pass_through_but(
    daemon: &std::path::Path,
    front: &std::path::Path,
    endpoint: &'static str,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::io::Write;
    use std::net::Shutdown;
    use std::os::unix::net::{UnixListener, UnixStream};
    let listener = UnixListener::bind(front).unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (daemon, count) = (daemon.to_path_buf(), asked.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let (daemon, count) = (daemon.clone(), count.clone());
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if conn.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                if head.starts_with(format!("POST {endpoint} ").as_bytes()) {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let text = String::from_utf8_lossy(&head).to_lowercase();
                    let len: u64 = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let _ = std::io::copy(&mut (&conn).take(len), &mut std::io::sink());
                    let body =
                        format!(r#"{{"error":"no endpoint POST {endpoint}","hint":"endpoints live under /v1"}}"#);
                    let _ = write!(
                        conn,
                        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    return;
                }
                let Ok(mut up) = UnixStream::connect(&daemon) else {
                    return;
                };
                let _ = up.write_all(&head);
                let (mut from, mut to) = (conn.try_clone().unwrap(), up.try_clone().unwrap());
                let forward = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
                let _ = std::io::copy(&mut up, &mut conn);
                let _ = conn.shutdown(Shutdown::Write);
                let _ = forward.join();
            });
        }
    });
    asked
}

#[test]
fn with_an_lcached_that_does_not_name_layers_the_client_packs_and_names_the_edit_itself() {
    // A gzip blob's mechanics (one file, members, CRCs); layer_compression.rs has the tar's.
    let env = BuildEnv::new().with_gzip_layers();
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nCOPY src /app/\n")
        .write_many("src", 3000);
    let dir = tempfile::tempdir().unwrap();
    let (asked, older) = older_lcached(&env, dir.path(), "/v1/layers");
    env.build(&p, &["--daemon", &older]);
    p.write("src/f1700.txt", "edited\n");
    let summary = dir.path().join("summary.json");
    let (steps, image) = env.build(&p, &["--daemon", &older, "--summary-json", summary.to_str().unwrap()]);
    assert_eq!(cached(&steps), [false]);
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the client asked lcached to name the layer"
    );
    // The client read the seed's members after the change itself, and still sent the
    // cache only the new ones.
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert!(s["bytes_fetched"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(blobs_kept_as_runs(&env.daemon.store()).len(), 1);
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again, "the layer a cold build makes");
}

#[test]
fn sources_that_overlap_at_the_destination_end_as_the_last_one_says_in_a_delta_too() {
    use std::os::unix::fs::PermissionsExt;
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY a b /dest/\nRUN cat /dest/x/f > /seen && stat -c '%a' /dest/x >> /seen\n",
    )
    .write("a/x/f", "from a\n")
    .write("b/x/f", "from b\n")
    .write("b/other", "1\n");
    std::fs::set_permissions(p.path().join("a/x"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(p.path().join("b/x"), std::fs::Permissions::from_mode(0o750)).unwrap();
    env.build(&p, &[]);
    p.write("b/other", "2\n");
    let (steps, image) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false, false]);
    assert_eq!(delta_trees(&env).len(), 1, "the rebuild is a delta");
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again);
    let out = tempfile::tempdir().unwrap();
    export_local(&env, &p, out.path());
    assert_eq!(
        std::fs::read_to_string(out.path().join("seen")).unwrap(),
        "from b\n750\n"
    );
}

/// The `summary` event of a `--progress json` build that succeeded.
fn summary_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .expect("a summary event")
}

/// What lcached answers for `GET path`, as JSON (waiting, as every reader does, for the
/// builds whose images it is naming).
fn daemon_json(env: &BuildEnv, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = env.daemon.http("GET", path, b"");
    (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

#[test]
fn a_build_that_leaves_its_image_to_lcached_ends_cached_and_lcached_names_and_tags_it() {
    // lcached names the image a second after the build ends: whoever asks first waits.
    let env = BuildEnv::with_daemon_env(&[], &[("LCACHED_TEST_NAMING_DELAY_MS".into(), "1000".into())]);
    let p = Project::new();
    copy_built_once(&env, &p);
    p.write("src/f0100.txt", "edited\n");
    let out = env.lcache(
        &p,
        &[
            "build",
            "--progress",
            "plain",
            "--name-image",
            "later",
            "-t",
            "app:later",
            ".",
        ],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    // The build ended before its image had a name: lcached was still taking the diff_id.
    // What names it until then is the build.
    let id = stdout
        .trim()
        .strip_prefix("build ")
        .unwrap_or_else(|| panic!("{stdout}"))
        .to_string();
    assert!(
        stderr.contains(&format!(
            "lcached is naming the image and tags it app:later (`lcache history show {id}`"
        )),
        "{stderr}"
    );

    // lcached answered the re-run COPY's layer with a provisional name: its snapshot bears
    // it, listed for the next build to rename.
    let listed = || std::fs::read_dir(env.cache_dir().join("provisional")).map_or(0, |d| d.count());
    assert_eq!(listed(), 1, "the layer's provisional name is listed");

    let (status, tagged) = daemon_json(&env, "/v1/images/app:later");
    assert_eq!(status, 200, "{tagged}");
    let named = tagged["manifest_digest"].as_str().unwrap().to_string();
    let (_, build) = daemon_json(&env, &format!("/v1/builds/{id}"));
    assert_eq!(build["image"], named.as_str());
    let layers = tagged["layers"].as_array().unwrap();
    let copied = layers.last().unwrap()["digest"].as_str().unwrap();
    assert!(
        copied.starts_with("sha256:"),
        "the image names the layer by its digest: {tagged}"
    );
    let unit = env
        .cache_dir()
        .join("snapshots")
        .join(format!("{}.delta", copied.trim_start_matches("sha256:")));
    let shown = env.lcache(&p, &["history", "show", &id]);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains(&format!("image {named}")),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );
    // The step's record was stored by lcached: the next build is a hit, and the image is
    // the one a build that waits for its name makes, and the one --no-cache makes.
    let (steps, image) = env.build(&p, &["--name-image", "now"]);
    assert_eq!(cached(&steps), [true]);
    assert_eq!(image, named);
    assert_eq!(listed(), 0, "the next build resolved the name");
    assert!(unit.join("tree").is_dir(), "the snapshot now bears the digest");
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(again, named);

    // The next edit packs over the layer lcached named: the tar's states its index lacked
    // are asked for then, so only the changed members are sent.
    p.write("src/f1200.txt", "edited too\n");
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let (steps, image) = env.build(&p, &["--summary-json", summary.to_str().unwrap()]);
    assert_eq!(cached(&steps), [false]);
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    let whole = blob_size(&env.daemon, &format!("sha256:{}", whole_copy_snapshots(&env)[0]));
    let stored = s["bytes_stored"].as_u64().unwrap();
    assert!(
        stored * 4 < whole,
        "the second edit sent {stored} bytes for a layer of about {whole}"
    );
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again);
}

#[test]
fn an_image_being_named_when_lcached_is_killed_is_named_when_it_starts_again() {
    let mut env = BuildEnv::with_daemon_env(&[], &[("LCACHED_TEST_NAMING_DELAY_MS".into(), "60000".into())]);
    let p = Project::new();
    copy_built_once(&env, &p);
    p.write("src/f0100.txt", "edited\n");
    let s = summary_of(&env.try_build(&p, &["--name-image", "later", "-t", "app:later"]));
    assert_eq!(s["image"], "", "{s}");
    let id = s["build"].as_str().unwrap().to_string();
    let stopped = std::mem::replace(&mut env.daemon, lcache_e2e::Daemon::start(&[]));
    env.daemon = lcache_e2e::Daemon::start_in(stopped.kill9(), &[]);

    let (status, tagged) = daemon_json(&env, "/v1/images/app:later");
    assert_eq!(status, 200, "{tagged}");
    let (_, build) = daemon_json(&env, &format!("/v1/builds/{id}"));
    assert_eq!(build["image"], tagged["manifest_digest"]);
    let (steps, image) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [true]);
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again);
    assert_eq!(tagged["manifest_digest"], again.as_str());
}

#[test]
fn a_layer_found_damaged_while_lcached_names_the_image_leaves_it_unnamed_and_the_next_build_packs_whole() {
    // A gzip blob's mechanics (one file, members, CRCs); layer_compression.rs has the tar's.
    let env = BuildEnv::new().with_gzip_layers();
    let p = Project::new();
    damage_last_member(&copy_built_once(&env, &p));

    p.write("src/f0100.txt", "edited\n");
    let s = summary_of(&env.try_build(&p, &["--name-image", "later", "-t", "app:later"]));
    let id = s["build"].as_str().unwrap().to_string();
    // Nothing was named after a layer that cannot be: no tag, no image in the history.
    let (status, _) = daemon_json(&env, "/v1/images/app:later");
    assert_eq!(status, 404);
    let (_, build) = daemon_json(&env, &format!("/v1/builds/{id}"));
    assert_eq!(build["image"], "", "{build}");
    let shown = env.lcache(&p, &["history", "show", &id]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("image not named"));
    // lcached removed the damaged blobs: the next build rebuilds and packs the layer whole.
    rebuilds_as_cold(&env, &p);
}

#[test]
fn with_an_lcached_that_does_not_name_images_a_build_asked_to_end_first_names_its_own() {
    let env = BuildEnv::new();
    let p = Project::new();
    copy_built_once(&env, &p);
    let dir = tempfile::tempdir().unwrap();
    let (asked, older) = older_lcached(&env, dir.path(), "/v1/builds/deferred");
    p.write("src/f0100.txt", "edited\n");
    let s = summary_of(&env.try_build(&p, &["--daemon", &older, "--name-image", "later", "-t", "app:own"]));
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the build was offered"
    );
    // It waited for lcached's diff_id instead, and named and tagged the image itself.
    let image = s["image"].as_str().unwrap().to_string();
    assert!(image.starts_with("sha256:"), "{s}");
    let (_, tagged) = daemon_json(&env, "/v1/images/app:own");
    assert_eq!(tagged["manifest_digest"], image.as_str());
    let (_, again) = env.build(&p, &["--no-cache"]);
    assert_eq!(image, again);
}

#[test]
fn a_name_that_pins_another_digest_is_not_given_to_an_image_lcached_names() {
    let env = BuildEnv::new();
    let p = Project::new();
    copy_built_once(&env, &p);
    p.write("src/f0100.txt", "edited\n");
    let pinned = format!("app@sha256:{}", "0".repeat(64));
    let s = summary_of(&env.try_build(&p, &["--name-image", "later", "-t", &pinned]));
    assert_eq!(s["image"], "", "{s}");
    let id = s["build"].as_str().unwrap().to_string();
    // As `PUT /v1/images` refuses it: nothing is tagged, and the image is left unnamed.
    let (_, build) = daemon_json(&env, &format!("/v1/builds/{id}"));
    assert_eq!(build["image"], "", "{build}");
    let (_, images) = daemon_json(&env, "/v1/images");
    assert!(!images.to_string().contains("app@"), "{images}");
}
