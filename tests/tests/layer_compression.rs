//! `lcache build --layer-compression none` (the default): layers kept as their tar, against
//! real builds (lcached, lcache, runc on overlayfs, the busybox base), and how they meet
//! gzip layers. Needs root.

use lcache_e2e::{blobs_kept_as_runs, cached, gunzip, own_bytes, sha256_digest, BuildEnv, Project};

const NONE: [&str; 2] = ["--layer-compression", "none"];

fn app() -> Project {
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY src /app/\nRUN cat /app/f0007.txt > /seen && rm /app/f0009.txt\n",
    )
    .write_many("src", 3000);
    p
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

/// `lcache image inspect NAME`.
fn inspect(env: &BuildEnv, p: &Project, name: &str) -> serde_json::Value {
    let out = env.lcache(p, &["image", "inspect", name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out.stdout);
    match v {
        serde_json::Value::Array(mut a) => a.remove(0),
        v => v,
    }
}

/// A layer as an export lists it: its media type, digest and blob.
type Exported = (String, String, Vec<u8>);

/// The image's layers as its OCI export (built with `--layer-compression none`,
/// `compression=COMPRESSION`) lists them, and its config's diff_ids.
fn exported_layers(env: &BuildEnv, p: &Project, compression: &str) -> (Vec<Exported>, Vec<String>) {
    let dest = tempfile::tempdir().unwrap();
    let layout = dest.path().join("oci");
    let output = format!("type=oci,dest={},compression={compression}", layout.display());
    build_tar_layers_to(env, p, &[], &output);
    let read = |d: &str| std::fs::read(layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap();
    let index = json(&std::fs::read(layout.join("index.json")).unwrap());
    let manifest = json(&read(index["manifests"][0]["digest"].as_str().unwrap()));
    let config = json(&read(manifest["config"]["digest"].as_str().unwrap()));
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().unwrap().to_string();
            let blob = read(&digest);
            assert_eq!(sha256_digest(&blob), digest);
            (l["mediaType"].as_str().unwrap().to_string(), digest, blob)
        })
        .collect();
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    (layers, diff_ids)
}

/// `lcache build --layer-compression none EXTRA --output OUTPUT .` in `p`, which must
/// succeed.
fn build_tar_layers_to(env: &BuildEnv, p: &Project, extra: &[&str], output: &str) {
    let mut args = vec!["build", "--progress", "plain", "--layer-compression", "none"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--output", output, "."]);
    let o = env.lcache(p, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn is_tar(blob: &[u8]) -> bool {
    blob.len() >= 1024 && &blob[257..262] == b"ustar"
}

#[test]
fn uncompressed_layers_give_the_image_gzip_layers_give_and_an_edit_stays_a_delta() {
    let (gz, plain) = (BuildEnv::new().with_gzip_layers(), BuildEnv::new());
    let p = app();
    let mut none_tagged = NONE.to_vec();
    none_tagged.extend(["-t", "app:1"]);
    gz.build(&p, &["-t", "app:1"]);
    let (steps, _) = plain.build(&p, &none_tagged);
    assert_eq!(cached(&steps), [false, false]);
    // The same tar either way: the same diff_ids, so the same image ID.
    let (a, b) = (inspect(&gz, &p, "app:1"), inspect(&plain, &p, "app:1"));
    assert_eq!(a["Id"], b["Id"]);
    assert_eq!(a["RootFS"], b["RootFS"]);

    let (layers, diff_ids) = exported_layers(&plain, &p, "uncompressed");
    assert_eq!(layers.len(), 3, "busybox, COPY, RUN");
    // The imported base stays gzip; the build's own layers are their tar, named by it.
    assert_eq!(layers[0].0, "application/vnd.oci.image.layer.v1.tar+gzip");
    for ((media_type, digest, blob), diff_id) in layers.iter().zip(&diff_ids).skip(1) {
        assert_eq!(media_type, "application/vnd.oci.image.layer.v1.tar");
        assert!(is_tar(blob));
        assert_eq!(digest, diff_id);
    }
    // Exported as BuildKit exports, by default: gzip layers under a manifest of their own,
    // each inflating to its diff_id, the config (so the image ID) the same.
    let (gzipped, same_diff_ids) = exported_layers(&plain, &p, "gzip");
    assert_eq!(same_diff_ids, diff_ids);
    for ((media_type, _, blob), diff_id) in gzipped.iter().zip(&diff_ids) {
        assert_eq!(media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
        assert_eq!(&sha256_digest(&gunzip(blob)), diff_id);
    }

    // An edit: the COPY re-runs over its last layer, stored as the members that changed.
    let before = blobs_kept_as_runs(&plain.daemon.store());
    p.write("src/f1700.txt", "edited\n");
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let mut args = NONE.to_vec();
    args.extend(["--summary-json", summary.to_str().unwrap()]);
    let (steps, edited) = plain.build(&p, &args);
    assert_eq!(cached(&steps), [false, false]);
    let s = json(&std::fs::read(&summary).unwrap());
    let composed: Vec<_> = blobs_kept_as_runs(&plain.daemon.store())
        .into_iter()
        .filter(|b| !before.contains(b))
        .collect();
    assert_eq!(composed.len(), 1, "the rebuilt COPY's blob is kept as runs");
    let copy_layer = &layers[1].2;
    let added = own_bytes(&composed[0]);
    assert!(
        added * 4 < copy_layer.len() as u64,
        "the edit stored {added} bytes for a layer of {}",
        copy_layer.len()
    );
    assert!(s["bytes_stored"].as_u64().unwrap() * 4 < copy_layer.len() as u64, "{s}");
    // What the edit made is what a cold build makes, byte for byte.
    let (steps, cold) = plain.build(&p, &["--layer-compression", "none", "--no-cache"]);
    assert_eq!(cached(&steps), [false, false]);
    assert_eq!(edited, cold);

    // The gzip cache asked for uncompressed layers after the edit: its gzip seed gives
    // none of its members, and the layers are the ones the other cache made.
    let (steps, switched) = gz.build(&p, &NONE);
    assert_eq!(cached(&steps), [false, false]);
    assert_eq!(switched, cold);
    // The option is how layers a build makes are kept: a hit takes the layer as it is.
    let (steps, again) = gz.build(&p, &[]);
    assert_eq!(cached(&steps), [true, true]);
    assert_eq!(again, switched);
}

#[test]
fn an_uncompressed_image_runs_and_exports_as_files() {
    let env = BuildEnv::new();
    let p = app();
    env.build(&p, &NONE);
    let out = tempfile::tempdir().unwrap();
    let dest = format!("type=local,dest={}", out.path().display());
    build_tar_layers_to(&env, &p, &[], &dest);
    assert_eq!(
        std::fs::read(out.path().join("seen")).unwrap(),
        std::fs::read(p.path().join("src/f0007.txt")).unwrap()
    );
    assert!(!out.path().join("app/f0009.txt").exists(), "the RUN's whiteout applies");
    assert!(out.path().join("app/f2999.txt").exists());
    // A bad value says which are good.
    let o = env.lcache(&p, &["build", "--layer-compression", "zip", "."]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("gzip") && err.contains("none"), "{err}");
}

#[test]
fn an_edit_whose_image_lcached_names_after_the_build_is_the_image_a_cold_build_makes() {
    let env = BuildEnv::new();
    let p = app();
    env.build(&p, &NONE);
    p.write("src/f1200.txt", "edited\n");
    let out = env.try_build(
        &p,
        &[
            "--layer-compression",
            "none",
            "--name-image",
            "later",
            "-t",
            "app:later",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| json(l.as_bytes()))
        .find(|v| v["event"] == "summary")
        .expect("a summary event");
    assert_eq!(summary["image"], "", "ended before the image was named: {summary}");
    // lcached named the layer (provisionally, then by its digest) and the image behind.
    let (status, tagged) = env.daemon.http("GET", "/v1/images/app:later", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&tagged));
    let tagged = json(&tagged);
    let (steps, cold) = env.build(&p, &["--layer-compression", "none", "--no-cache"]);
    assert_eq!(cached(&steps), [false, false]);
    assert_eq!(tagged["manifest_digest"], cold.as_str());
    // The next edit is a delta over the layer named behind.
    let runs = blobs_kept_as_runs(&env.daemon.store()).len();
    p.write("src/f0100.txt", "edited too\n");
    let (steps, edited) = env.build(&p, &NONE);
    assert_eq!(cached(&steps), [false, false]);
    assert!(blobs_kept_as_runs(&env.daemon.store()).len() > runs, "stored as runs");
    let (_, cold) = env.build(&p, &["--layer-compression", "none", "--no-cache"]);
    assert_eq!(edited, cold);
}

#[test]
fn a_docker_export_of_tar_layers_is_gzipped_and_imports_back_with_the_same_layers() {
    let env = BuildEnv::new();
    let p = app();
    let mut args = NONE.to_vec();
    args.extend(["-t", "app:1"]);
    env.build(&p, &args);
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("app.tar");
    for (compression, name) in [("gzip", "back-gzip:1"), ("uncompressed", "back-tar:1")] {
        let out = format!("type=docker,dest={},compression={compression}", tarball.display());
        build_tar_layers_to(&env, &p, &[], &out);
        let member = |name: &str| {
            let o = std::process::Command::new("tar")
                .arg("-xOf")
                .arg(&tarball)
                .arg(name)
                .output()
                .unwrap();
            assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
            o.stdout
        };
        // docker load reads manifest.json: the top layer it names is gzip, or the tar itself.
        let manifest = json(&member("manifest.json"));
        let top = member(
            manifest[0]["Layers"]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .as_str()
                .unwrap(),
        );
        match compression {
            "gzip" => assert_eq!(&top[..2], [0x1f, 0x8b]),
            _ => assert!(is_tar(&top)),
        }
        let o = env.lcache(&p, &["image", "import", tarball.to_str().unwrap(), name]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // Import writes the config anew; the layers' diff_ids and the config are the image's.
        let (back, built) = (inspect(&env, &p, name), inspect(&env, &p, "app:1"));
        assert_eq!(back["RootFS"], built["RootFS"], "{compression}");
        assert_eq!(back["Config"], built["Config"], "{compression}");
    }
}

#[test]
fn a_squashed_image_keeps_its_merged_layer_as_tar_too() {
    let env = BuildEnv::new();
    let p = app();
    let mut args = NONE.to_vec();
    args.extend(["--squash", "-t", "sq:1"]);
    env.build(&p, &args);
    let (status, body) = env.daemon.http("GET", "/v1/images/sq:1", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let image = json(&body);
    let layers = image["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "the base, and the stage's layers merged: {image}");
    assert_eq!(layers[1]["media_type"], "application/vnd.oci.image.layer.v1.tar");
    assert_eq!(layers[1]["digest"], layers[1]["diff_id"]);
    let out = tempfile::tempdir().unwrap();
    let dest = format!("type=local,dest={}", out.path().display());
    build_tar_layers_to(&env, &p, &["--squash"], &dest);
    assert!(!out.path().join("app/f0009.txt").exists(), "the RUN's whiteout applies");
    assert!(out.path().join("seen").exists());
}

/// The files of lcached's packs (`blobs/packs/*/N`), with their inode and link count.
fn pack_files(env: &BuildEnv) -> Vec<(std::path::PathBuf, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for pack in std::fs::read_dir(env.daemon.store().join("blobs/packs")).unwrap() {
        for f in std::fs::read_dir(pack.unwrap().path()).unwrap() {
            let path = f.unwrap().path();
            if path.file_name().unwrap().to_str().unwrap().parse::<u32>().is_ok() {
                let m = std::fs::metadata(&path).unwrap();
                out.push((path, m.ino(), m.nlink()));
            }
        }
    }
    out
}

#[test]
fn a_cold_tar_layer_is_kept_as_links_to_the_snapshots_files_and_a_file_changed_behind_is_never_served() {
    use std::os::unix::fs::MetadataExt;
    let env = BuildEnv::new();
    let p = app();
    // No option: layers are kept as their tar, held by reference, by default.
    let (steps, image) = env.build(&p, &["-t", "app:1"]);
    assert_eq!(cached(&steps), [false, false]);
    // The COPY's 3,000 files and the one the RUN wrote (`/seen`) are held by lcached as
    // links to the client's snapshot files: the layers' bytes were written once.
    let files = pack_files(&env);
    let shared = files.iter().filter(|(_, _, links)| *links == 2).count();
    assert_eq!(shared, 3001, "{} files in packs", files.len());
    let snapshot_inodes: std::collections::HashSet<u64> = walk(&env.cache_dir())
        .into_iter()
        .map(|p| std::fs::metadata(p).unwrap().ino())
        .collect();
    assert!(files
        .iter()
        .filter(|(_, _, links)| *links == 2)
        .all(|(_, ino, _)| snapshot_inodes.contains(ino)));
    let layer = inspect(&env, &p, "app:1")["RootFS"]["Layers"][1]
        .as_str()
        .unwrap()
        .to_string();
    let (status, blob) = env.daemon.http("GET", &format!("/v1/blobs/{layer}"), b"");
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&blob), layer, "served whole through the links");
    let (steps, again) = env.build(&p, &NONE);
    assert_eq!((cached(&steps), again), (vec![true, true], image.clone()));

    // An edit is a delta over the linked layer, and what a cold build makes.
    p.write("src/f1700.txt", "edited\n");
    let (steps, edited) = env.build(&p, &NONE);
    assert_eq!(cached(&steps), [false, false]);
    let (_, cold) = BuildEnv::new().build(&p, &NONE);
    assert_eq!(edited, cold);

    // A snapshot file written behind lcached's back (same size, new time): the layer that
    // links it is no longer served, nor found whole.
    let recipe = env
        .daemon
        .store()
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"))
        .join("recipe");
    let recipe = json(&std::fs::read(recipe).unwrap());
    let pack = env
        .daemon
        .store()
        .join("blobs/packs")
        .join(recipe["runs"][0]["file"].as_str().unwrap());
    let (path, _, _) = files
        .iter()
        .find(|(p, _, links)| *links == 2 && p.starts_with(&pack))
        .expect("a file the COPY's layer links");
    let inode = std::fs::metadata(path).unwrap().ino();
    let client_name = walk(&env.cache_dir())
        .into_iter()
        .find(|p| std::fs::metadata(p).unwrap().ino() == inode)
        .unwrap();
    let len = std::fs::metadata(&client_name).unwrap().len() as usize;
    std::fs::write(&client_name, vec![b'#'; len]).unwrap();
    let (status, body) = env.daemon.http("GET", &format!("/v1/blobs/{layer}"), b"");
    assert!(
        status != 200 || sha256_digest(&body) != layer && body.len() < blob.len(),
        "a damaged layer was served whole"
    );
    let (status, _) = env.daemon.http("HEAD", &format!("/v1/blobs/{layer}"), b"");
    assert_eq!(status, 404, "found damaged, and dropped");
}

/// Every regular file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn a_zstd_export_compresses_the_tar_layers_and_skopeo_copies_it() {
    let env = BuildEnv::new();
    let p = app();
    let (zst, diff_ids) = exported_layers(&env, &p, "zstd");
    assert_eq!(zst.len(), 3, "busybox, COPY, RUN");
    // The imported base stays as it is kept; the build's own layers are zstd frames of
    // their tar, so the diff_ids, the config and the image ID are the gzip export's.
    assert_eq!(zst[0].0, "application/vnd.oci.image.layer.v1.tar+gzip");
    for ((media_type, _, blob), diff_id) in zst.iter().zip(&diff_ids).skip(1) {
        assert_eq!(media_type, "application/vnd.oci.image.layer.v1.tar+zstd");
        let tar = zstd::decode_all(&blob[..]).unwrap();
        assert_eq!(&sha256_digest(&tar), diff_id);
        assert!(blob.len() < tar.len());
    }
    let (_, gz_diff_ids) = exported_layers(&env, &p, "gzip");
    assert_eq!(gz_diff_ids, diff_ids);

    // skopeo reads the layout (and checks every blob against its digest as it copies).
    let dest = tempfile::tempdir().unwrap();
    let layout = dest.path().join("oci");
    let output = format!("type=oci,dest={},compression=zstd", layout.display());
    build_tar_layers_to(&env, &p, &["-t", "app:zstd"], &output);
    let index = json(&std::fs::read(layout.join("index.json")).unwrap());
    let name = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap()
        .to_string();
    let copy = dest.path().join("copy");
    let o = std::process::Command::new("skopeo")
        .args([
            "copy",
            &format!("oci:{}:{name}", layout.display()),
            &format!("oci:{}:copied", copy.display()),
        ])
        .output()
        .expect("skopeo (scripts/setup --tests installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // `docker load` before Docker 23 cannot read zstd: refused before the build, saying what to write.
    let o = env.lcache(
        &p,
        &[
            "build",
            "--output",
            "type=docker,dest=/nonexistent/x.tar,compression=zstd",
            ".",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("type=oci,compression=zstd"),
        "{err}"
    );
}
