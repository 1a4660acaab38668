//! Each case of DESIGN.md's cache-key table, checked by running the real `lcache keys` on two
//! versions of a context or Dockerfile and comparing keys step by step.

use std::os::unix::fs::PermissionsExt;

use lcache_e2e::{changed, Project};

const APP: &str = "FROM alpine:3.19\nWORKDIR /app\nCOPY src ./src\nRUN make\n";

/// A context with `src/` copied by the Dockerfile and files outside it.
fn app() -> Project {
    let p = Project::new();
    p.write("Dockerfile", APP)
        .write("src/main.c", "int main(){}\n")
        .write("src/lib/util.c", "void u(){}\n")
        .write("README.md", "docs\n")
        .write("logs/debug.log", "noise\n")
        .write(".dockerignore", "logs\n");
    p
}

const COPY_AND_AFTER: [bool; 3] = [false, true, true];
const NOTHING: [bool; 3] = [false, false, false];

#[test]
fn keys_are_identical_on_the_same_tree_twice() {
    let p = app();
    assert_eq!(p.keys(&[]), p.keys(&[]));
}

#[test]
fn editing_a_copied_file_rebuilds_that_copy_and_what_follows() {
    let p = app();
    let before = p.keys(&[]);
    p.write("src/main.c", "int main(){return 1;}\n");
    assert_eq!(changed(&before, &p.keys(&[])), COPY_AND_AFTER);
}

#[test]
fn touching_mtime_only_changes_nothing() {
    let p = app();
    let before = p.keys(&[]);
    let f = std::fs::File::options()
        .write(true)
        .open(p.path().join("src/main.c"))
        .unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400))
        .unwrap();
    assert_eq!(changed(&before, &p.keys(&[])), NOTHING);
}

#[test]
fn chmod_of_a_copied_file_rebuilds() {
    let p = app();
    let before = p.keys(&[]);
    std::fs::set_permissions(p.path().join("src/main.c"), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(changed(&before, &p.keys(&[])), COPY_AND_AFTER);
}

#[test]
fn adding_removing_and_renaming_inside_a_copied_directory_rebuild() {
    let p = app();
    let k0 = p.keys(&[]);
    p.write("src/new.c", "n\n");
    let k1 = p.keys(&[]);
    assert_eq!(changed(&k0, &k1), COPY_AND_AFTER, "add");
    std::fs::rename(p.path().join("src/new.c"), p.path().join("src/renamed.c")).unwrap();
    let k2 = p.keys(&[]);
    assert_eq!(changed(&k1, &k2), COPY_AND_AFTER, "rename");
    std::fs::remove_file(p.path().join("src/renamed.c")).unwrap();
    let k3 = p.keys(&[]);
    assert_eq!(changed(&k2, &k3), COPY_AND_AFTER, "remove");
    assert_eq!(k3, k0, "removing the added file brings the original keys back");
}

#[test]
fn an_empty_directory_inside_a_copied_tree_rebuilds() {
    let p = app();
    let before = p.keys(&[]);
    std::fs::create_dir(p.path().join("src/empty")).unwrap();
    assert_eq!(changed(&before, &p.keys(&[])), COPY_AND_AFTER);
}

#[test]
fn retargeting_a_symlink_inside_a_copied_tree_rebuilds() {
    let p = app();
    std::os::unix::fs::symlink("main.c", p.path().join("src/entry")).unwrap();
    let before = p.keys(&[]);
    std::fs::remove_file(p.path().join("src/entry")).unwrap();
    std::os::unix::fs::symlink("lib/util.c", p.path().join("src/entry")).unwrap();
    assert_eq!(changed(&before, &p.keys(&[])), COPY_AND_AFTER);
}

#[test]
fn editing_a_file_no_copy_selects_changes_nothing() {
    let p = app();
    let before = p.keys(&[]);
    p.write("README.md", "other docs\n");
    assert_eq!(changed(&before, &p.keys(&[])), NOTHING);
}

#[test]
fn editing_a_dockerignored_file_changes_nothing_even_under_copy_dot() {
    let p = app();
    p.write("Dockerfile", "FROM alpine:3.19\nWORKDIR /app\nCOPY . .\nRUN make\n");
    let before = p.keys(&[]);
    p.write("logs/debug.log", "more noise\n");
    assert_eq!(changed(&before, &p.keys(&[])), NOTHING);
}

#[test]
fn newly_ignoring_a_copied_file_rebuilds() {
    let p = app();
    let before = p.keys(&[]);
    p.write(".dockerignore", "logs\nsrc/lib\n");
    assert_eq!(changed(&before, &p.keys(&[])), COPY_AND_AFTER);
}

#[test]
fn env_feeding_a_later_run_rebuilds_that_run_only() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nWORKDIR /w\nENV MODE=debug\nRUN make\n");
    let before = p.keys(&[]);
    p.write("Dockerfile", "FROM alpine\nWORKDIR /w\nENV MODE=release\nRUN make\n");
    assert_eq!(changed(&before, &p.keys(&[])), [false, true]);
}

#[test]
fn label_expose_and_cmd_change_no_key() {
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM alpine\nLABEL v=1\nEXPOSE 80\nRUN make\nCMD [\"a\"]\n",
    );
    let before = p.keys(&[]);
    p.write(
        "Dockerfile",
        "FROM alpine\nLABEL v=2\nEXPOSE 8080\nRUN make\nCMD [\"b\"]\n",
    );
    assert_eq!(p.keys(&[]), before);
}

#[test]
fn a_declared_build_arg_changes_later_runs_and_an_undeclared_one_nothing() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nRUN early\nARG FLAVOR=plain\nRUN late\n");
    let base = p.keys(&[]);
    assert_eq!(changed(&base, &p.keys(&["--build-arg", "FLAVOR=spicy"])), [false, true]);
    assert_eq!(p.keys(&["--build-arg", "OTHER=1"]), base);
    assert_eq!(
        p.keys(&["--build-arg", "FLAVOR=plain"]),
        base,
        "the default given explicitly is the default"
    );
}

#[test]
fn a_declared_but_unused_arg_still_changes_later_runs_as_in_buildkit() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nARG UNUSED=1\nRUN echo hi\n");
    let before = p.keys(&[]);
    p.write("Dockerfile", "FROM alpine\nARG UNUSED=2\nRUN echo hi\n");
    assert_eq!(changed(&before, &p.keys(&[])), [true]);
}

#[test]
fn any_whitespace_change_inside_a_run_rebuilds_it() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nRUN echo a && echo b\n");
    let before = p.keys(&[]);
    p.write("Dockerfile", "FROM alpine\nRUN echo a &&  echo b\n");
    assert_eq!(changed(&before, &p.keys(&[])), [true]);
}

#[test]
fn a_comment_line_changes_nothing() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nRUN echo a\n");
    let before = p.keys(&[]);
    p.write("Dockerfile", "# build it\nFROM alpine\n# now run\nRUN echo a\n");
    assert_eq!(p.keys(&[]), before);
}

#[test]
fn a_continuation_changes_the_key_only_through_the_whitespace_it_leaves() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nRUN echo a b\n");
    let one_line = p.keys(&[]);
    p.write("Dockerfile", "FROM alpine\nRUN echo a \\\nb\n");
    assert_eq!(p.keys(&[]), one_line, "`a \\` + `b` joins to `a b`");
    p.write("Dockerfile", "FROM alpine\nRUN echo a \\\n    b\n");
    assert_eq!(
        changed(&one_line, &p.keys(&[])),
        [true],
        "indentation is kept, as BuildKit keeps it"
    );
}

#[test]
fn workdir_and_user_changes_rebuild() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nWORKDIR /a\nUSER app\nRUN make\n");
    let before = p.keys(&[]);
    p.write("Dockerfile", "FROM alpine\nWORKDIR /b\nUSER app\nRUN make\n");
    assert_eq!(changed(&before, &p.keys(&[])), [true, true]);
    p.write("Dockerfile", "FROM alpine\nWORKDIR /a\nUSER root\nRUN make\n");
    assert_eq!(changed(&before, &p.keys(&[])), [false, true]);
}

#[test]
fn a_copy_glob_gains_a_matching_file_but_not_a_non_matching_one() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nCOPY *.txt /d/\nRUN cat /d/*\n")
        .write("a.txt", "a");
    let before = p.keys(&[]);
    p.write("b.md", "b");
    assert_eq!(p.keys(&[]), before, "non-matching");
    p.write("b.txt", "b");
    assert_eq!(changed(&before, &p.keys(&[])), [true, true], "matching");
}

#[test]
fn changing_copy_chmod_rebuilds() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nCOPY --chmod=644 a /a\n")
        .write("a", "a");
    let before = p.keys(&[]);
    p.write("Dockerfile", "FROM alpine\nCOPY --chmod=755 a /a\n");
    assert_eq!(changed(&before, &p.keys(&[])), [true]);
}

#[test]
fn changing_a_heredoc_body_rebuilds() {
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM alpine\nRUN <<EOF\necho one\nEOF\nCOPY <<EOF /f\nx\nEOF\n",
    );
    let before = p.keys(&[]);
    p.write(
        "Dockerfile",
        "FROM alpine\nRUN <<EOF\necho two\nEOF\nCOPY <<EOF /f\nx\nEOF\n",
    );
    assert_eq!(changed(&before, &p.keys(&[])), [true, true]);
    p.write(
        "Dockerfile",
        "FROM alpine\nRUN <<EOF\necho one\nEOF\nCOPY <<EOF /f\ny\nEOF\n",
    );
    assert_eq!(changed(&before, &p.keys(&[])), [false, true]);
}

#[test]
fn undoing_an_edit_gives_the_old_keys_back() {
    let p = app();
    let before = p.keys(&[]);
    p.write("src/main.c", "changed\n");
    assert_ne!(p.keys(&[]), before);
    p.write("src/main.c", "int main(){}\n");
    assert_eq!(p.keys(&[]), before);
}

#[test]
fn copy_from_a_stage_is_pending_on_that_stage_not_invented() {
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM alpine AS build\nRUN make\nFROM scratch\nCOPY --from=build /out /out\nWORKDIR /x\n",
    );
    let k = p.keys(&[]);
    assert_eq!(k[1..], ["pending", "pending"]);
    let out = p.lcache(&["keys", "."]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("pending: waits for the result of stage build"));
}

#[test]
fn editing_the_file_a_copied_symlink_names_rebuilds_the_copy() {
    // COPY follows a symlink named as a source (as BuildKit does), so the key must follow
    // it too: a hit after the target changed would be stale.
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM alpine:3.19\nCOPY current.conf /etc/app.conf\nRUN true\n",
    )
    .write("conf/v1.conf", "one\n");
    std::os::unix::fs::symlink("conf/v1.conf", p.path().join("current.conf")).unwrap();
    let before = p.keys(&[]);
    p.write("conf/v1.conf", "two\n");
    assert_eq!(changed(&before, &p.keys(&[])), [true, true]);
}
