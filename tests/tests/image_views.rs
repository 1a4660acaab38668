//! `lcache image history` and `lcache image inspect` against what `docker history` and
//! `docker inspect` showed for the same build, exported and `docker load`ed
//! (`tests/image_views/docker`, recorded by `scripts/record-docker-image-views`), and with
//! the history Docker's BuildKit writes when it builds the same Dockerfile. lcache's
//! builds are reproducible, so CI's build is the recorded image, byte for byte — as long as
//! the busybox base is the same; where it is not, the fields that depend on it are skipped
//! and the test says so.

use std::path::Path;

use lcache_e2e::{BuildEnv, Project};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("image_views/docker")
            .join(name),
    )
    .expect("fixture")
}

#[test]
fn history_and_inspect_show_what_docker_shows_for_the_same_image() {
    let env = BuildEnv::new();
    let p = Project::new();
    let ctx = Path::new(env!("CARGO_MANIFEST_DIR")).join("image_views/context");
    for f in ["Dockerfile", "app.sh"] {
        p.write(f, &std::fs::read_to_string(ctx.join(f)).unwrap());
    }
    let (steps, _) = env.build(&p, &["-t", "lcache-views:1"]);
    assert_eq!(steps.len(), 4);

    let docker_inspect: serde_json::Value = serde_json::from_str(&fixture("inspect.json")).unwrap();
    let theirs = &docker_inspect[0];
    let o = env.lcache(&p, &["image", "inspect", "lcache-views:1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ours = &ours[0];
    let same_base = ours["RootFS"]["Layers"][0] == theirs["RootFS"]["Layers"][0];
    if !same_base {
        eprintln!("the busybox base differs from the recorded one: Id, Size and the base layer are not compared");
    }
    for field in ["RepoTags", "Created", "Architecture", "Os"] {
        assert_eq!(ours[field], theirs[field], "{field}");
    }
    for field in [
        "User",
        "ExposedPorts",
        "Env",
        "Cmd",
        "ArgsEscaped",
        "Volumes",
        "WorkingDir",
        "Entrypoint",
        "Labels",
        "StopSignal",
    ] {
        assert_eq!(ours["Config"][field], theirs["Config"][field], "Config.{field}");
    }
    let layers = |v: &serde_json::Value| v["RootFS"]["Layers"].as_array().unwrap()[1..].to_vec();
    assert_eq!(layers(ours), layers(theirs), "the layers lcache made");
    if same_base {
        for field in ["Id", "Size"] {
            assert_eq!(ours[field], theirs[field], "{field}");
        }
    }

    // History: newest first, the same instruction, size and comment on every row, and
    // lcache's own columns on the rows its build made.
    let o = env.lcache(&p, &["image", "history", "--format", "json", "lcache-views:1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let theirs: Vec<serde_json::Value> = fixture("history.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ours.len(), theirs.len());
    for (o, t) in ours.iter().zip(&theirs) {
        assert_eq!(o["CreatedBy"], t["CreatedBy"]);
        assert_eq!(o["Comment"], t["Comment"]);
        if same_base || !o["CreatedBy"].as_str().unwrap_or_default().is_empty() {
            assert_eq!(o["Size"], t["Size"], "{}", o["CreatedBy"]);
        }
    }
    // And every row reads as BuildKit's own build of the same Dockerfile reads.
    let buildkit: Vec<serde_json::Value> = fixture("buildkit-history.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ours.len(), buildkit.len());
    for (o, b) in ours.iter().zip(&buildkit) {
        assert_eq!(o["CreatedBy"], b["CreatedBy"], "as BuildKit writes it");
        if !o["CreatedBy"].as_str().unwrap_or_default().is_empty() {
            assert_eq!(o["Size"], b["Size"], "{}", o["CreatedBy"]);
            assert_eq!(o["Comment"], b["Comment"]);
        }
    }
    let run = ours
        .iter()
        .find(|r| r["CreatedBy"].as_str().unwrap_or_default().contains("chmod"))
        .unwrap();
    assert_eq!((run["Line"].as_u64(), run["Cached"].as_bool()), (Some(6), Some(false)));
    assert_eq!(run["Key"].as_str().map(str::len), Some(64));
    let label = ours
        .iter()
        .find(|r| r["CreatedBy"].as_str().unwrap_or_default().starts_with("LABEL"))
        .unwrap();
    assert_eq!(label["Line"].as_u64(), Some(8), "config-only rows find their line too");

    // The table, truncated as docker history truncates.
    let o = env.lcache(&p, &["image", "history", "lcache-views:1"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.lines().next().unwrap().starts_with("IMAGE"));
    assert!(table.contains("rebuilt") && table.contains("30B"), "{table}");
}

#[test]
fn analyze_finds_a_file_written_then_removed_and_ci_rules_fail_and_pass_around_it() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nRUN dd if=/dev/zero of=/big bs=1024 count=200 2>/dev/null && echo keep > /keep\nRUN rm /big\n",
    );
    env.build(&p, &["-t", "wasteful:1"]);
    let o = env.lcache(&p, &["image", "analyze", "--json", "wasteful:1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let big = a["inefficiencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["path"] == "big")
        .expect("/big is wasted");
    assert_eq!(
        big["lines"],
        serde_json::json!([2, 3]),
        "attributed to the line that wrote it and the one that removed it"
    );
    assert_eq!(big["cumulative_size"], 2 * 204_800);
    assert!(a["wasted_bytes"].as_u64().unwrap() >= 409_600);
    assert!(a["efficiency"].as_f64().unwrap() < 1.0);
    assert!(a["fixes"][0].as_str().unwrap().starts_with("line 2:"), "{}", a["fixes"]);
    assert_eq!(a["layers"][2]["removed"], serde_json::json!(["big"]));

    let text = String::from_utf8_lossy(&env.lcache(&p, &["image", "analyze", "wasteful:1"]).stdout).to_string();
    assert!(text.contains("/big") && text.contains("fix: line 2"), "{text}");

    // Dive's rules, from a .dive-ci, on both sides of the threshold.
    p.write(
        ".dive-ci",
        "rules:\n  lowestEfficiency: 0.1\n  highestWastedBytes: 100KB\n  highestUserWastedPercent: disabled\n",
    );
    let o = env.lcache(&p, &["image", "analyze", "--ci", "wasteful:1"]);
    assert!(!o.status.success(), "409.6 kB wasted is over 100 kB");
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL: highestWastedBytes"));
    p.write(
        "lax.yaml",
        "rules:\n  lowestEfficiency: 0.1\n  highestWastedBytes: 1MB\n  highestUserWastedPercent: disabled\n",
    );
    let o = env.lcache(
        &p,
        &["image", "analyze", "--ci", "--ci-config", "lax.yaml", "wasteful:1"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("PASS: highestWastedBytes"));
}

#[test]
fn squash_merges_the_stage_layers_into_one_and_keeps_config_and_history() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nRUN echo a > /a && echo tmp > /tmp/t\nRUN rm /bin/ls /tmp/t && echo b > /b\nCMD [\"sh\"]\n",
    );
    let out = tempfile::tempdir().unwrap();
    let dest = format!("type=local,dest={}", out.path().display());
    let o = env.lcache(
        &p,
        &[
            "build",
            "--progress",
            "plain",
            "--squash",
            "-t",
            "sq:1",
            "--output",
            &dest,
            ".",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.path().join("a").exists() && out.path().join("b").exists());
    assert!(
        !out.path().join("bin/ls").exists(),
        "a base file removed by the stage stays removed"
    );
    assert!(!out.path().join("tmp/t").exists());
    assert!(out.path().join("bin/sh").exists());
    let inspect: serde_json::Value =
        serde_json::from_slice(&env.lcache(&p, &["image", "inspect", "sq:1"]).stdout).unwrap();
    assert_eq!(
        inspect[0]["RootFS"]["Layers"].as_array().unwrap().len(),
        2,
        "the base's layer and one more"
    );
    assert_eq!(inspect[0]["Config"]["Cmd"], serde_json::json!(["sh"]));
    let history =
        String::from_utf8_lossy(&env.lcache(&p, &["image", "history", "--format", "json", "sq:1"]).stdout).to_string();
    assert!(
        history.lines().next().unwrap().contains("merge of 2 layers"),
        "{history}"
    );
    assert!(
        history.contains("RUN /bin/sh -c rm /bin/ls"),
        "the instructions stay in the history"
    );
    // The steps stay cached; a squashed build again is the same image.
    let (steps, first) = env.build(&p, &["--squash"]);
    assert!(lcache_e2e::cached(&steps).iter().all(|c| *c));
    let (_, again) = env.build(&p, &["--squash"]);
    assert_eq!(first, again);
    let (_, plain) = env.build(&p, &[]);
    assert_ne!(plain, first);
}
