//! Repair instead of failure: a step record whose layer blob was lost or damaged behind the
//! daemon's back is a miss. The step reruns, the blob is stored again, and the build
//! succeeds; HEAD never claims a blob whose file is not whole.

use lcache_e2e::{cached, BuildEnv, Project};

fn project() -> Project {
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY a.txt /a.txt\nRUN cat /a.txt > /b.txt\n",
    )
    .write("a.txt", "alpha\n");
    p
}

/// The blob files of the daemon's store, by path.
fn blob_files(env: &BuildEnv) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(env.daemon.store().join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// Damages every layer blob the build added (not in `base`): a gzip blob's file, or the
/// files of a tar layer held by reference (a directory naming its pack). Drops the client's
/// snapshots so the blobs must be fetched again, and returns the damaged digests.
fn damage(env: &BuildEnv, base: &[std::path::PathBuf], how: fn(&std::path::Path)) -> Vec<String> {
    let mut damaged = Vec::new();
    for f in blob_files(env).into_iter().filter(|f| !base.contains(f)) {
        if f.is_dir() || std::fs::read(&f).unwrap().starts_with(&[0x1f, 0x8b]) {
            how(&f);
            damaged.push(format!("sha256:{}", f.file_name().unwrap().to_string_lossy()));
        }
    }
    std::fs::remove_dir_all(env.cache_dir().join("snapshots")).unwrap();
    damaged
}

/// The files of the packs a linked blob's directory names (`p.<id>` → `blobs/packs/<id>/`).
fn pack_files(blob: &std::path::Path) -> Vec<std::path::PathBuf> {
    let packs = blob.parent().unwrap().parent().unwrap().join("packs");
    let mut files = Vec::new();
    for e in std::fs::read_dir(blob).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if let Some(id) = name.strip_prefix("p.") {
            for f in std::fs::read_dir(packs.join(id)).unwrap() {
                let f = f.unwrap().path();
                if f.file_name().unwrap() != "pack" && std::fs::metadata(&f).unwrap().len() > 0 {
                    files.push(f);
                }
            }
        }
    }
    files
}

fn flip_a_byte(f: &std::path::Path) {
    if f.is_dir() {
        let files = pack_files(f);
        assert!(!files.is_empty(), "{} names no pack", f.display());
        return files.iter().for_each(|f| flip_a_byte(f));
    }
    let mut data = std::fs::read(f).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(f, data).unwrap();
}

fn remove(f: &std::path::Path) {
    match f.is_dir() {
        true => std::fs::remove_dir_all(f).unwrap(),
        false => std::fs::remove_file(f).unwrap(),
    }
}

#[test]
fn a_corrupt_or_missing_layer_blob_is_a_miss_and_is_stored_again() {
    let damages = [("corrupt", flip_a_byte as fn(&std::path::Path)), ("missing", remove)];
    for ((what, how), gzip) in damages.into_iter().flat_map(|d| [(d, true), (d, false)]) {
        let env = match gzip {
            true => BuildEnv::new().with_gzip_layers(),
            false => BuildEnv::new(),
        };
        let what = format!("{what}, {}", if gzip { "gzip" } else { "tar held by reference" });
        let p = project();
        let base = blob_files(&env);
        let (first, image) = env.build(&p, &[]);
        assert_eq!(cached(&first), [false, false]);
        let damaged = damage(&env, &base, how);
        assert!(!damaged.is_empty(), "{what}: no layer blob found to damage");
        let out = env.lcache(&p, &["build", "--progress", "plain", "."]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {stderr}");
        assert!(stderr.contains("rebuilding the step"), "{what}: {stderr}");
        let (again, image2) = env.build(&p, &[]);
        assert_eq!(image, image2, "{what}: the rebuilt image is the same image");
        assert_eq!(cached(&again), [true, true], "{what}: repaired, so cached again");
        for d in &damaged {
            let (status, body) = env.daemon.http("GET", &format!("/v1/blobs/{d}"), b"");
            assert_eq!(status, 200, "{what}: {d} is served again");
            assert_eq!(&lcache_e2e::sha256_digest(&body), d, "{what}: the blob was repaired");
        }
    }
}
