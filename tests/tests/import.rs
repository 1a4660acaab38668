//! `lcache image import` trusts nothing in the file: blob paths come only from validated
//! digests, every manifest, config and layer must match its descriptor (and the config's
//! diff_ids), expansion is bounded, and a pinned `FROM name@sha256:…` must match. Each case
//! is refused with a message naming what is wrong, and nothing is imported.

use std::path::Path;

use lcache_e2e::{BuildEnv, Project};

/// Exports a small image as an OCI layout into `dir` and returns the layout's path.
fn layout(env: &BuildEnv, dir: &Path) -> std::path::PathBuf {
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nCOPY a.txt /a.txt\n")
        .write("a.txt", "alpha\n");
    let dest = dir.join("layout");
    let out = env.lcache(
        &p,
        &[
            "build",
            "--progress",
            "plain",
            "--output",
            &format!("type=oci,dest={}", dest.display()),
            ".",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dest
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The image manifest of a layout we exported (index → manifest).
fn manifest_path(dest: &Path) -> std::path::PathBuf {
    let index = json(&dest.join("index.json"));
    let d = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    dest.join("blobs/sha256").join(d)
}

fn import(env: &BuildEnv, file: &Path, name: &str) -> (bool, String) {
    let out = env.lcache(&Project::new(), &["image", "import", file.to_str().unwrap(), name]);
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn not_imported(env: &BuildEnv, name: &str) {
    let out = env.lcache(&Project::new(), &["image", "ls"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(name),
        "{name} was imported"
    );
}

#[test]
fn a_valid_layout_imports_and_a_tampered_one_is_refused() {
    let env = BuildEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let dest = layout(&env, dir.path());
    let (ok, e) = import(&env, &dest, "good:1");
    assert!(ok, "{e}");

    // A layer whose bytes changed but whose descriptor did not.
    let manifest = json(&manifest_path(&dest));
    let layer = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let layer_path = dest.join("blobs/sha256").join(&layer);
    let original = std::fs::read(&layer_path).unwrap();
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&original[..]), &mut plain).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &plain).unwrap();
    std::fs::write(&layer_path, gz.finish().unwrap()).unwrap();
    let (ok, e) = import(&env, &dest, "tampered:1");
    assert!(!ok);
    assert!(e.contains("layer 1") && e.contains("tampered with"), "{e}");
    not_imported(&env, "tampered");
    std::fs::write(&layer_path, &original).unwrap();

    // A descriptor that would name a path outside the layout.
    let index_path = dest.join("index.json");
    let index = std::fs::read_to_string(&index_path).unwrap();
    let good = json(&index_path)["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(&index_path, index.replace(&good, "sha256:../../../../etc/passwd")).unwrap();
    let (ok, e) = import(&env, &dest, "escape:1");
    assert!(!ok);
    assert!(
        e.contains("'sha256:../../../../etc/passwd'") && e.contains("not sha256"),
        "{e}"
    );
    not_imported(&env, "escape");
}

#[test]
fn a_layer_that_does_not_match_the_configs_diff_ids_is_refused() {
    let env = BuildEnv::new();
    let dir = tempfile::tempdir().unwrap();
    // A docker save tar: manifest.json, a config whose diff_ids lie, one layer.
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    layer.append_data(&mut h, "f", &b"hi"[..]).unwrap();
    let layer = layer.into_inner().unwrap();
    let config = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "0".repeat(64))]}});
    let manifest = serde_json::json!([{"Config": "config.json", "RepoTags": [], "Layers": ["l/layer.tar"]}]);
    let mut t = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ("config.json", serde_json::to_vec(&config).unwrap()),
        ("l/layer.tar", layer),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        t.append_data(&mut h, name, &data[..]).unwrap();
    }
    let file = dir.path().join("save.tar");
    std::fs::write(&file, t.into_inner().unwrap()).unwrap();
    let (ok, e) = import(&env, &file, "liar:1");
    assert!(!ok);
    assert!(e.contains("layer 0 unpacks to") && e.contains("the config says"), "{e}");
    not_imported(&env, "liar");
}

#[test]
fn a_layer_expanding_past_the_limit_is_refused() {
    let env = BuildEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let mut t = tar::Builder::new(Vec::new());
    let zeros = vec![0u8; 1 << 20];
    let mut h = tar::Header::new_gnu();
    h.set_size(zeros.len() as u64);
    h.set_mode(0o644);
    t.append_data(&mut h, "zeros", &zeros[..]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &t.into_inner().unwrap()).unwrap();
    let file = dir.path().join("bomb.tar.gz");
    std::fs::write(&file, gz.finish().unwrap()).unwrap();
    let out = env
        .command(&Project::new(), &["image", "import", file.to_str().unwrap(), "bomb:1"])
        .env("LCACHE_MAX_LAYER_SIZE", "65536")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("LCACHE_MAX_LAYER_SIZE") && e.contains("decompression bomb"),
        "{e}"
    );
    not_imported(&env, "bomb");
}

#[test]
fn from_a_pinned_digest_must_match_the_image() {
    let env = BuildEnv::new();
    let out = env.lcache(&Project::new(), &["image", "ls", "--json"]);
    let images: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "busybox:latest")
        .unwrap()["manifest_digest"]
        .as_str()
        .unwrap()
        .to_string();
    let p = Project::new();
    p.write("Dockerfile", &format!("FROM busybox@{digest}\nRUN true\n"));
    env.build(&p, &[]);
    let wrong = format!("sha256:{}", "1".repeat(64));
    p.write("Dockerfile", &format!("FROM busybox@{wrong}\nRUN true\n"));
    let out = env.try_build(&p, &[]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("pins a digest") && e.contains(&digest), "{e}");
}
