//! For each case of the key-semantics table: two real builds, then `lcache explain` must name
//! exactly that cause for the first missed step and "parent rebuilt" for the rest of its
//! cascade, and `lcache plan` run before the second build must have predicted the same.

use std::os::unix::fs::PermissionsExt;

use lcache_e2e::{BuildEnv, Project};
use serde_json::Value;

const BASE: &str = "FROM busybox\nARG FLAVOR=plain\nENV MODE=debug\nWORKDIR /app\nCOPY src ./src\nRUN ls -l src > listing\nRUN echo $MODE > mode\n";

fn project(dockerfile: &str) -> Project {
    let p = Project::new();
    p.write("Dockerfile", dockerfile)
        .write("src/a.txt", "alpha\n")
        .write("src/b.txt", "beta\n")
        .write("other.txt", "o\n")
        .write(".dockerignore", "other.txt\n");
    std::os::unix::fs::symlink("a.txt", p.path().join("src/link")).unwrap();
    p
}

fn json(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Builds, mutates, plans, builds again; returns (plan, explained build).
fn run_case(dockerfile: &str, mutate: impl FnOnce(&Project), args: &[&str]) -> (Value, Value) {
    let env = BuildEnv::new();
    let p = project(dockerfile);
    env.build(&p, &[]);
    mutate(&p);
    let mut plan_args = vec!["plan", "--json"];
    plan_args.extend_from_slice(args);
    plan_args.push(".");
    let plan = json(&env.lcache(&p, &plan_args));
    env.build(&p, args);
    let explained = json(&env.lcache(&p, &["explain", "--json"]));
    (plan, explained)
}

/// Asserts the first miss is `kind` with `text` in its description, the later misses are
/// its cascade, and the plan predicted the same hits and causes.
fn check(plan: &Value, build: &Value, kind: &str, text: &str) {
    let steps = build["steps"].as_array().unwrap();
    let first = steps
        .iter()
        .position(|s| s["cached"] == false)
        .expect("some step rebuilt");
    let cause = &steps[first]["cause"];
    assert!(
        cause.get(kind).is_some(),
        "first miss #{}: expected {kind}, got {cause}",
        first + 1
    );
    assert!(cause.to_string().contains(text), "{cause} should mention {text}");
    for s in &steps[first + 1..] {
        if s["cached"] == false {
            let c = &s["cause"]["parent_rebuilt"];
            assert_eq!(
                c["root_step"],
                first + 1,
                "later misses are its cascade: {}",
                s["cause"]
            );
        }
    }
    for (n, s) in steps.iter().enumerate() {
        if plan["cached"][n].is_null() {
            continue; // pending in the plan: depends on another stage's result
        }
        assert_eq!(plan["cached"][n], s["cached"], "plan predicted step #{} wrongly", n + 1);
        assert_eq!(
            plan["causes"][n],
            s["cause"],
            "plan predicted another cause for #{}",
            n + 1
        );
    }
    assert_eq!(
        build["cascades"][0]["cause"], *cause,
        "the cascade report starts from the same root"
    );
}

#[test]
fn an_edited_file_is_named_as_modified() {
    let (plan, b) = run_case(
        BASE,
        |p| {
            p.write("src/a.txt", "ALPHA\n");
        },
        &[],
    );
    check(&plan, &b, "files_changed", "src/a.txt");
    assert!(b["steps"][1]["cause"].to_string().contains("modified"));
}

#[test]
fn the_previous_build_of_a_context_is_found_behind_many_builds_of_others() {
    let env = BuildEnv::new();
    let p = project(BASE);
    env.build(&p, &[]);
    // A daemon busy with other contexts: more builds of theirs since than the client
    // reads of the history.
    for n in 0..60 {
        let b = serde_json::json!({"started_at_ms": n, "finished_at_ms": n + 1, "dockerfile": "Dockerfile", "context": format!("/elsewhere/{n}"), "target": null, "steps": []});
        assert_eq!(env.daemon.http("POST", "/v1/builds", b.to_string().as_bytes()).0, 201);
    }
    p.write("src/a.txt", "ALPHA\n");
    let plan = json(&env.lcache(&p, &["plan", "--json", "."]));
    env.build(&p, &[]);
    let b = json(&env.lcache(&p, &["explain", "--json"]));
    check(&plan, &b, "files_changed", "src/a.txt");
}

/// How many requests lcached answered on its `builds` route (the history).
fn history_requests(env: &BuildEnv) -> u64 {
    let (_, metrics) = env.daemon.http("GET", "/metrics", b"");
    let key = "lcache_request_duration_seconds_count{route=\"builds\"} ";
    String::from_utf8_lossy(&metrics)
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[test]
fn a_build_that_misses_nothing_reads_no_history_and_one_that_misses_reads_it_once() {
    let env = BuildEnv::new();
    let p = project(BASE);
    env.build(&p, &[]);
    let before = history_requests(&env);
    let (steps, _) = env.build(&p, &[]);
    assert!(steps.iter().all(|(_, cached)| *cached));
    assert_eq!(
        history_requests(&env) - before,
        1,
        "only the build's own record is posted"
    );
    p.write("src/a.txt", "ALPHA\n");
    let before = history_requests(&env);
    env.build(&p, &[]);
    assert_eq!(
        history_requests(&env) - before,
        2,
        "the history is read once, for every miss"
    );
}

#[test]
fn a_chmod_is_named_with_both_modes() {
    let (plan, b) = run_case(
        BASE,
        |p| std::fs::set_permissions(p.path().join("src/b.txt"), std::fs::Permissions::from_mode(0o755)).unwrap(),
        &[],
    );
    check(&plan, &b, "files_changed", r#"{"mode":{"new":493,"old":420}}"#);
}

#[test]
fn added_removed_and_renamed_files_are_named() {
    let (plan, b) = run_case(
        BASE,
        |p| {
            p.write("src/new.txt", "n\n");
        },
        &[],
    );
    check(&plan, &b, "files_changed", "added");
    let (plan, b) = run_case(BASE, |p| std::fs::remove_file(p.path().join("src/b.txt")).unwrap(), &[]);
    check(&plan, &b, "files_changed", "removed");
    let (plan, b) = run_case(
        BASE,
        |p| std::fs::rename(p.path().join("src/b.txt"), p.path().join("src/b2.txt")).unwrap(),
        &[],
    );
    check(&plan, &b, "files_changed", r#"{"renamed_from":{"from":"src/b.txt"}}"#);
}

#[test]
fn a_retargeted_symlink_is_named() {
    let (plan, b) = run_case(
        BASE,
        |p| {
            std::fs::remove_file(p.path().join("src/link")).unwrap();
            std::os::unix::fs::symlink("b.txt", p.path().join("src/link")).unwrap();
        },
        &[],
    );
    check(
        &plan,
        &b,
        "files_changed",
        r#"{"link_target":{"new":"b.txt","old":"a.txt"}}"#,
    );
}

#[test]
fn a_dockerignore_change_is_named_as_such() {
    let (plan, b) = run_case(
        BASE,
        |p| {
            p.write(".dockerignore", "other.txt\nsrc/b.txt\n");
        },
        &[],
    );
    check(&plan, &b, "dockerignore_changed", "src/b.txt");
}

#[test]
fn an_env_change_is_named_with_old_and_new_values() {
    let (plan, b) = run_case(
        BASE,
        |p| {
            p.write("Dockerfile", &BASE.replace("MODE=debug", "MODE=release"));
        },
        &[],
    );
    check(&plan, &b, "variable_changed", "release");
}

#[test]
fn a_declared_build_arg_is_named_and_an_undeclared_one_rebuilds_nothing() {
    let (plan, b) = run_case(BASE, |_| {}, &["--build-arg", "FLAVOR=spicy"]);
    check(&plan, &b, "variable_changed", "spicy");
    let (_, b) = run_case(BASE, |_| {}, &["--build-arg", "OTHER=1"]);
    assert!(b["steps"].as_array().unwrap().iter().all(|s| s["cached"] == true));
    assert_eq!(b["cascades"], serde_json::json!([]));
}

#[test]
fn a_run_text_change_is_named_with_a_word_diff() {
    let (plan, b) = run_case(
        BASE,
        |p| {
            p.write("Dockerfile", &BASE.replace("ls -l src", "ls -la src"));
        },
        &[],
    );
    check(&plan, &b, "instruction_changed", "ls -la src");
}

#[test]
fn a_workdir_change_starts_the_cascade_at_the_workdir() {
    let (plan, b) = run_case(
        BASE,
        |p| {
            p.write("Dockerfile", &BASE.replace("WORKDIR /app", "WORKDIR /srv"));
        },
        &[],
    );
    check(&plan, &b, "instruction_changed", "/srv");
}

#[test]
fn a_user_change_is_named_on_the_run_it_reaches() {
    let df = BASE.replace("RUN echo $MODE > mode", "USER root\nRUN echo $MODE > /tmp/mode");
    let (plan, b) = run_case(
        &df,
        |p| {
            p.write("Dockerfile", &df.replace("USER root", "USER nobody"));
        },
        &[],
    );
    check(&plan, &b, "definition_changed", "nobody");
}

#[test]
fn a_glob_gaining_a_matching_file_is_named() {
    let df = "FROM busybox\nCOPY src/*.txt /d/\nRUN ls /d > /listing\n";
    let (plan, b) = run_case(
        df,
        |p| {
            p.write("src/c.txt", "c\n");
        },
        &[],
    );
    check(&plan, &b, "files_changed", "src/c.txt");
    assert!(b["steps"][0]["cause"].to_string().contains("added"));
}

#[test]
fn a_chmod_flag_change_is_an_instruction_change() {
    let df = "FROM busybox\nCOPY --chmod=644 src/a.txt /a\nRUN cat /a > /b\n";
    let (plan, b) = run_case(
        df,
        |p| {
            p.write("Dockerfile", &df.replace("644", "600"));
        },
        &[],
    );
    check(&plan, &b, "instruction_changed", "--chmod=600");
}

#[test]
fn a_changed_artifact_from_another_stage_is_named_on_its_copy() {
    let df = "FROM busybox AS build\nCOPY src/a.txt /a\nRUN cp /a /artifact\nFROM busybox\nCOPY --from=build /artifact /artifact\nRUN cat /artifact > /out\n";
    let (_, b) = run_case(
        df,
        |p| {
            p.write("src/a.txt", "changed\n");
        },
        &[],
    );
    let cause = |n: usize| b["steps"][n]["cause"].clone();
    assert!(
        cause(0)["files_changed"].to_string().contains("src/a.txt"),
        "{}",
        cause(0)
    );
    assert_eq!(cause(1)["parent_rebuilt"]["root_step"], 1);
    // The other stage starts from an unchanged base: its COPY is a root of its own, named
    // by the artifact that changed, and the RUN after it is that root's cascade.
    assert!(
        cause(2)["files_changed"].to_string().contains("/artifact"),
        "{}",
        cause(2)
    );
    assert_eq!(cause(3)["parent_rebuilt"]["root_step"], 3);
    assert_eq!(b["cascades"].as_array().unwrap().len(), 2);
}

#[test]
fn no_cache_is_named() {
    let env = BuildEnv::new();
    let p = project(BASE);
    env.build(&p, &[]);
    env.build(&p, &["--no-cache"]);
    let b = json(&env.lcache(&p, &["explain", "--json"]));
    assert!(b["steps"].as_array().unwrap().iter().all(|s| s["cause"] == "no_cache"));
    let text = String::from_utf8_lossy(&env.lcache(&p, &["explain"]).stdout).to_string();
    assert!(text.contains("--no-cache"), "{text}");
}

#[test]
fn explain_step_shows_the_key_input_diff_and_history_lists_builds() {
    let env = BuildEnv::new();
    let p = project(BASE);
    env.build(&p, &[]);
    p.write("src/a.txt", "ALPHA\n");
    env.build(&p, &[]);
    let out = env.lcache(&p, &["explain", "--step", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("- sources_digest") && text.contains("+ sources_digest") && text.contains("src/a.txt modified"),
        "{text}"
    );
    let h = String::from_utf8_lossy(&env.lcache(&p, &["history"]).stdout).to_string();
    assert_eq!(h.lines().count(), 3, "header and two builds:\n{h}");
    assert!(h.contains("src/a.txt modified"), "{h}");
}

#[test]
fn the_previous_build_is_found_whatever_the_paths_are_called() {
    let env = BuildEnv::new();
    let p = project(BASE);
    let abs = p.path().display().to_string();
    assert!(env
        .lcache(
            &p,
            &["build", "--progress", "plain", "-f", &format!("{abs}/Dockerfile"), &abs]
        )
        .status
        .success());
    p.write("src/a.txt", "x\n");
    env.build(&p, &[]);
    let b = json(&env.lcache(&p, &["explain", "--json"]));
    assert!(
        b["steps"][1]["cause"]["files_changed"].is_object(),
        "{}",
        b["steps"][1]["cause"]
    );
}

#[test]
fn an_edit_deep_in_a_large_tree_is_named_to_the_file() {
    // 6,000 entries: three times what a summary could list before directory nodes were kept.
    let env = BuildEnv::new();
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nCOPY src /src\n");
    for d in 0..60 {
        for f in 0..100 {
            p.write(&format!("src/d{d:02}/f{f:03}"), &format!("{d} {f}\n"));
        }
    }
    env.build(&p, &[]);
    p.write("src/d47/f050", "edited\n");
    std::fs::remove_file(p.path().join("src/d03/f001")).unwrap();
    let plan = json(&env.lcache(&p, &["plan", "--json", "."]));
    env.build(&p, &[]);
    let b = json(&env.lcache(&p, &["explain", "--json"]));
    check(
        &plan,
        &b,
        "files_changed",
        r#"{"change":"modified","path":"src/d47/f050"}"#,
    );
    assert!(
        b["steps"][0]["cause"]
            .to_string()
            .contains(r#"{"change":"removed","path":"src/d03/f001"}"#),
        "{}",
        b["steps"][0]["cause"]
    );
    let text = String::from_utf8_lossy(&env.lcache(&p, &["explain", "--step", "1"]).stdout).to_string();
    assert!(text.contains("src/d47/f050 modified"), "{text}");
}

#[test]
fn listings_nothing_refers_to_are_collected_and_an_edit_still_names_its_file() {
    // lcached collects after every plan, and counts a plan as a build in flight for 2 s.
    let env = BuildEnv::with_daemon_env(
        &[],
        &[("LCACHED_TEST_LISTINGS_PLANNED_WITHIN_MS".into(), "2000".into())],
    );
    let p = project(BASE);
    env.build(&p, &[]);
    // A plan no build follows: once its 2 s have passed and a later plan replaced its memo,
    // nothing refers to it.
    p.write("src/a.txt", "planned, never built\n");
    let plan = json(&env.lcache(&p, &["plan", "--json", "."]));
    let planned = plan["report"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| s["sources_digest"].as_str())
        .expect("the COPY's sources digest")
        .to_string();
    let summary = format!("/v1/summaries/{planned}");
    assert_eq!(env.daemon.http("GET", &summary, b"").0, 200, "stored by the plan");

    p.write("src/a.txt", "ALPHA\n");
    env.build(&p, &[]);
    let explained = json(&env.lcache(&p, &["explain", "--json"]));
    let cause = explained["steps"][1]["cause"].to_string();
    assert!(cause.contains("src/a.txt") && cause.contains("modified"), "{cause}");
    // Each plan starts a collection: the unbuilt plan's summary goes once its time is up.
    // These plans, of other contents, replace the memo too: the second build's listings are
    // then kept for being among the newest builds alone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for i in 0.. {
        if env.daemon.http("GET", &summary, b"").0 == 404 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{summary} never collected");
        std::thread::sleep(std::time::Duration::from_millis(500));
        p.write("src/a.txt", &format!("planned again, {i}\n"));
        let out = env.lcache(&p, &["plan", "."]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // What the newest builds refer to stays: the next edit is still named to the file.
    p.write("src/b.txt", "BETA\n");
    env.build(&p, &[]);
    let explained = json(&env.lcache(&p, &["explain", "--json"]));
    let cause = explained["steps"][1]["cause"].to_string();
    assert!(cause.contains("src/b.txt") && cause.contains("modified"), "{cause}");
}
