//! `lcache keys`/`plan` through a real `lcached`: the same keys as offline, a warm plan that
//! reads no file, edits seen through the watcher (or a stat walk), digests that survive a
//! restart, and a clear message when no daemon runs.

use lcache_e2e::{plan_keys, Daemon, Project};

fn app() -> Project {
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM alpine:3.19\nWORKDIR /app\nCOPY src ./src\nRUN make\nCOPY extra.txt /\n",
    )
    .write("src/main.c", "int main(){}\n")
    .write("src/lib/util.c", "void u(){}\n")
    .write("extra.txt", "x\n")
    .write("notes/todo.md", "later\n")
    .write(".dockerignore", "notes\n");
    p
}

/// Lets files just written age past the racily-clean window (50 ms): a digest taken within
/// it is used but not kept, so only then does a warm plan read nothing.
fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(120));
}

fn hashed(plan: &serde_json::Value) -> u64 {
    plan["report"]["hashed_files"].as_u64().expect("hashed_files")
}

fn check_daemon_follows_edits(extra: &[&str], mode: &str) {
    let d = Daemon::start(extra);
    let p = app();
    settle();
    let first = p.plan_with(&d);
    assert_eq!(plan_keys(&first), p.keys(&[]), "daemon keys equal offline keys");
    assert_eq!(hashed(&first), 3, "cold: every selected file read once");
    assert_eq!(first["context"]["mode"], mode);

    let warm = p.plan_with(&d);
    assert_eq!(plan_keys(&warm), plan_keys(&first));
    assert_eq!(hashed(&warm), 0, "warm: no file read");

    p.write("src/main.c", "int main(){return 2;}\n");
    settle();
    let edited = p.plan_with(&d);
    assert_eq!(hashed(&edited), 1, "only the edited file is re-read");
    assert_eq!(plan_keys(&edited), p.keys(&[]));
    assert_ne!(plan_keys(&edited)[2], plan_keys(&first)[2]);

    p.write("notes/todo.md", "ignored edit\n");
    assert_eq!(
        plan_keys(&p.plan_with(&d)),
        plan_keys(&edited),
        "an ignored file changes nothing"
    );
    std::fs::remove_file(p.path().join("src/lib/util.c")).unwrap();
    assert_eq!(plan_keys(&p.plan_with(&d)), p.keys(&[]), "a removal is seen");
    p.write("src/main.c", "int main(){}\n");
    p.write("src/lib/util.c", "void u(){}\n");
    assert_eq!(
        plan_keys(&p.plan_with(&d)),
        plan_keys(&first),
        "undoing the edits brings the first keys back"
    );
}

#[test]
fn a_watching_daemon_gives_offline_keys_reads_nothing_when_warm_and_sees_edits() {
    check_daemon_follows_edits(&[], "watching");
}

#[test]
fn a_stat_walking_daemon_gives_the_same_answers() {
    check_daemon_follows_edits(&["--watch", "off"], "stat-walk");
}

#[test]
fn file_digests_survive_a_restart() {
    let d = Daemon::start(&[]);
    let p = app();
    settle();
    let first = p.plan_with(&d);
    let dir = d.kill9();
    let d = Daemon::start_in(dir, &[]);
    let again = p.plan_with(&d);
    assert_eq!(plan_keys(&again), plan_keys(&first));
    assert_eq!(hashed(&again), 0, "digests came from the store, not from re-reading");
}

#[test]
fn files_changed_and_removed_while_the_daemon_was_down_are_seen_after_a_restart() {
    let d = Daemon::start(&[]);
    let p = app();
    p.write("src/gone.c", "soon gone\n")
        .write("src/lib/becomes_dir.c", "a file\n");
    settle();
    p.plan_with(&d);
    let dir = d.kill9();
    p.write("src/main.c", "int main(){return 1;}\n");
    std::fs::remove_file(p.path().join("src/gone.c")).unwrap();
    std::fs::remove_file(p.path().join("src/lib/becomes_dir.c")).unwrap();
    p.write("src/lib/becomes_dir.c/inside.c", "now a directory\n");
    settle();
    let expected = plan_keys(&p.plan_with(&Daemon::start(&[])));
    let d = Daemon::start_in(dir, &[]);
    assert_eq!(
        plan_keys(&p.plan_with(&d)),
        expected,
        "what the store remembered is checked"
    );
    // Restarted again: the digests of what is gone were dropped, not kept for later.
    let dir = d.kill9();
    let d = Daemon::start_in(dir, &[]);
    let again = p.plan_with(&d);
    assert_eq!(plan_keys(&again), expected);
    assert_eq!(hashed(&again), 0, "and what is there came from the store");
}

#[test]
fn plan_marks_steps_the_cache_holds() {
    let d = Daemon::start(&[]);
    let p = app();
    let keys = plan_keys(&p.plan_with(&d));
    let rec = serde_json::json!({"key": keys[0], "layer": null, "duration_ms": 5, "inputs": null});
    assert_eq!(
        d.http("PUT", &format!("/v1/steps/{}", keys[0]), rec.to_string().as_bytes())
            .0,
        201
    );
    let plan = p.plan_with(&d);
    let cached: Vec<bool> = plan["cached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_bool().unwrap())
        .collect();
    assert_eq!(cached, [true, false, false, false]);
    let text = String::from_utf8_lossy(&p.lcache_with(&d, &["plan", "."]).stdout).to_string();
    assert!(text.contains("1 cached, 3 to build"), "{text}");
}

#[test]
fn status_and_cache_stats_describe_the_daemon() {
    let d = Daemon::start(&[]);
    let p = app();
    p.plan_with(&d);
    let out = p.lcache_with(&d, &["status"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&d.endpoint()) && text.contains("watching"), "{text}");
    let out = p.lcache_with(&d, &["cache", "stats", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["steps"], 0);
}

#[test]
fn without_a_daemon_plan_says_how_to_start_one_and_keys_works_offline() {
    let p = app();
    let missing = p.path().join("no.sock");
    let addr = format!("unix://{}", missing.display());
    let out = p.lcache(&["--daemon", &addr, "plan", "."]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("start it with `lcached`, or pass --offline"), "{err}");
    let out = p.lcache(&["plan", "--offline", "."]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = p.lcache(&["keys", "--offline", "."]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("(offline)"));
}

#[test]
fn a_bad_dockerfile_through_the_daemon_keeps_its_location_and_hint() {
    let d = Daemon::start(&[]);
    let p = Project::new();
    p.write("Dockerfile", "FROM a\nCOPPY x y\n");
    let out = p.lcache_with(&d, &["plan", "."]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":2:1: unknown instruction 'COPPY'") && err.contains("did you mean COPY?"),
        "{err}"
    );
}

#[test]
fn a_file_edited_through_a_hard_link_outside_the_context_is_seen() {
    // The watcher hears of writes made through the context's own directories only: a file
    // also linked from elsewhere (a package store's, a `cp -al` tree's) can change with no
    // event in the context.
    let d = Daemon::start(&[]);
    let p = app();
    let outside = tempfile::tempdir().unwrap();
    let elsewhere = outside.path().join("util.c");
    std::fs::hard_link(p.path().join("src/lib/util.c"), &elsewhere).unwrap();
    settle();
    let first = p.plan_with(&d);
    assert_eq!(first["context"]["mode"], "watching");
    assert_eq!(plan_keys(&p.plan_with(&d)), plan_keys(&first));

    std::fs::write(&elsewhere, "void u(){ return; }\n").unwrap();
    settle();
    let edited = p.plan_with(&d);
    assert_eq!(
        plan_keys(&edited),
        p.keys(&[]),
        "the edit made elsewhere is in the keys"
    );
    assert_ne!(plan_keys(&edited)[2], plan_keys(&first)[2]);
    assert_eq!(plan_keys(&p.plan_with(&d)), plan_keys(&edited));

    // Unlinked elsewhere, the file is the context's alone again; edits are still seen.
    std::fs::remove_file(&elsewhere).unwrap();
    p.write("src/lib/util.c", "void u(){}\n");
    settle();
    assert_eq!(plan_keys(&p.plan_with(&d)), plan_keys(&first));
}
