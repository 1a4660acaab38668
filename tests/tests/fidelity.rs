//! The image lcache builds is the image Docker BuildKit builds: every case in
//! `tests/fidelity/cases` is built here, and its root filesystem (type, mode, owner, size,
//! content, link target; times ignored) and image config are compared with what Docker
//! 20.10's BuildKit built from the same Dockerfile, context and busybox base, recorded by
//! `scripts/record-docker-fidelity` into `tests/fidelity/docker`; a case Docker refuses to
//! build (`NAME.error`, its message) lcache must refuse too, naming the same path. A case listed in
//! `tests/fidelity/known-differences.txt` must differ (so the list stays honest); every
//! other case must be identical.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use lcache_e2e::{BuildEnv, Project};
use sha2::{Digest, Sha256};

fn fidelity_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fidelity")
}

/// One line per entry beneath `root`, as `scripts/fidelity-listing` lists a tar.
fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let mode = format!("{:04o}", m.mode() & 0o7777);
            let (kind, size, extra) = if ft.is_dir() {
                ("dir", 0, String::new())
            } else if ft.is_symlink() {
                (
                    "symlink",
                    0,
                    std::fs::read_link(&p).unwrap().to_string_lossy().to_string(),
                )
            } else if ft.is_file() {
                let data = std::fs::read(&p).unwrap();
                ("file", data.len(), format!("{:x}", Sha256::digest(&data)))
            } else if ft.is_char_device() || ft.is_block_device() {
                let kind = if ft.is_char_device() { "char" } else { "block" };
                let (maj, min) = (nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev()));
                (kind, 0, format!("{maj}:{min}"))
            } else {
                ("fifo", 0, String::new())
            };
            out.insert(
                rel.clone(),
                format!("{rel}\t{kind}\t{mode}\t{}\t{}\t{size}\t{extra}", m.uid(), m.gid()),
            );
            if ft.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// `listing` relative to the base: entries that differ from it, and `absent` for the gone.
fn relative(listing: &BTreeMap<String, String>, base: &BTreeMap<String, String>) -> Vec<String> {
    let mut lines: Vec<String> = listing
        .iter()
        .filter(|(p, l)| base.get(*p) != Some(l))
        .map(|(_, l)| l.clone())
        .chain(
            base.keys()
                .filter(|p| !listing.contains_key(*p))
                .map(|p| format!("{p}\tabsent")),
        )
        .collect();
    lines.sort();
    lines
}

/// A config section with its null members dropped (Docker writes `"OnBuild": null`).
fn normalized(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, normalized(v)))
                .collect(),
        ),
        v => v,
    }
}

struct Case {
    name: String,
    dockerfile: PathBuf,
}

fn cases() -> Vec<Case> {
    let mut v: Vec<Case> = std::fs::read_dir(fidelity_dir().join("cases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.strip_suffix(".Dockerfile")?.to_string();
            Some(Case { name, dockerfile: p })
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Builds `case` with `--output type=local`; returns the root filesystem's listing and the
/// image config's `config` section.
fn build(
    env: &BuildEnv,
    ctx: &Project,
    case: &Case,
    out: &Path,
) -> Result<(BTreeMap<String, String>, serde_json::Value), String> {
    let tag = format!("fidelity-{}:latest", case.name);
    let output = format!("type=local,dest={}", out.display());
    let o = env.lcache(
        ctx,
        &[
            "build",
            "--progress",
            "plain",
            "-f",
            case.dockerfile.to_str().unwrap(),
            "-t",
            &tag,
            "--output",
            &output,
            ".",
        ],
    );
    if !o.status.success() {
        return Err(format!("build failed: {}", String::from_utf8_lossy(&o.stderr)));
    }
    let (status, body) = env.daemon.http("GET", &format!("/v1/images/{tag}"), b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let record: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let doc: serde_json::Value = serde_json::from_str(record["config"].as_str().unwrap()).unwrap();
    Ok((listing(out), doc["config"].clone()))
}

/// For a case Docker refuses (`refused` is its message): lcache must refuse it too, saying
/// why at the same path. `None` when it does.
fn refused_too(env: &BuildEnv, ctx: &Project, case: &Case, out: &Path, refused: &str) -> Option<String> {
    let e = match build(env, ctx, case, out) {
        Ok(_) => return Some(format!("lcache built what Docker refuses ({refused})")),
        Err(e) => e,
    };
    let path = refused
        .split_whitespace()
        .find(|w| w.starts_with('/'))
        .map(|w| w.trim_end_matches(':'));
    let said = (e.contains("not a directory") || e.contains("non-directory")) && path.is_none_or(|p| e.contains(p));
    (!said).then(|| format!("Docker: {refused}; lcache: {e}"))
}

#[test]
fn lcache_builds_the_image_docker_builds() {
    let env = BuildEnv::new();
    let ctx = Project::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fidelity-context");
    let made = std::process::Command::new(&script).arg(ctx.path()).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let work = tempfile::tempdir().unwrap();
    let all = cases();
    let (base_case, cases): (Vec<&Case>, Vec<&Case>) = all.iter().partition(|c| c.name == "00-base");
    let (base, _) = build(&env, &ctx, base_case[0], &work.path().join("00-base")).unwrap();
    let known: BTreeSet<String> = std::fs::read_to_string(fidelity_dir().join("known-differences.txt"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('#').next())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let mut identical = 0;
    let mut report = Vec::new();
    for case in &cases {
        let docker_dir = fidelity_dir().join("docker");
        if let Ok(refused) = std::fs::read_to_string(docker_dir.join(format!("{}.error", case.name))) {
            let problems = refused_too(&env, &ctx, case, &work.path().join(&case.name), refused.trim());
            match (problems, known.contains(&case.name)) {
                (None, false) => identical += 1,
                (Some(_), true) => {}
                (None, true) => report.push(format!(
                    "{}: now identical to Docker — remove it from known-differences.txt",
                    case.name
                )),
                (Some(p), false) => report.push(format!("{}:\n  {p}", case.name)),
            }
            continue;
        }
        let want_fs: Vec<String> = std::fs::read_to_string(docker_dir.join(format!("{}.tsv", case.name)))
            .unwrap_or_else(|e| {
                panic!(
                    "{}: no Docker fixture ({e}): run scripts/record-docker-fidelity {}",
                    case.name, case.name
                )
            })
            .lines()
            .map(str::to_string)
            .collect();
        let want_config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(docker_dir.join(format!("{}.config.json", case.name))).unwrap(),
        )
        .unwrap();
        let problems = match build(&env, &ctx, case, &work.path().join(&case.name)) {
            Err(e) => vec![e],
            Ok((fs, config)) => {
                let got = relative(&fs, &base);
                let mut p = Vec::new();
                let (g, w): (BTreeSet<&String>, BTreeSet<&String>) = (got.iter().collect(), want_fs.iter().collect());
                for l in w.difference(&g) {
                    p.push(format!("docker has  {l}"));
                }
                for l in g.difference(&w) {
                    p.push(format!("lcache has  {l}"));
                }
                if normalized(config.clone()) != normalized(want_config) {
                    p.push(format!("config differs: lcache {config}"));
                }
                p
            }
        };
        match (problems.is_empty(), known.contains(&case.name)) {
            (true, false) => identical += 1,
            (false, true) => {}
            (true, true) => report.push(format!(
                "{}: now identical to Docker — remove it from known-differences.txt",
                case.name
            )),
            (false, false) => report.push(format!("{}:\n  {}", case.name, problems.join("\n  "))),
        }
    }
    eprintln!(
        "image fidelity: {identical}/{} cases identical to Docker BuildKit",
        cases.len()
    );
    assert!(report.is_empty(), "{}", report.join("\n"));
}
