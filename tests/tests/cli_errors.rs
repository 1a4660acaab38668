//! The real `lcache` binary on bad input: the message names the place and what to do, the
//! exit status is non-zero, nothing panics.

use lcache_e2e::Project;

fn stderr_of(p: &Project, args: &[&str]) -> String {
    let out = p.lcache(args);
    assert!(!out.status.success(), "expected failure for {args:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn an_unknown_instruction_is_located_and_a_fix_suggested() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\n\nCOPPY a b\n");
    let err = stderr_of(&p, &["parse"]);
    assert!(err.contains("Dockerfile:3:1: unknown instruction 'COPPY'"), "{err}");
    assert!(err.contains("did you mean COPY?"), "{err}");
}

#[test]
fn a_missing_copy_source_names_the_line_and_the_path() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nCOPY nothere /x\n");
    let err = stderr_of(&p, &["keys", "."]);
    assert!(
        err.contains("Dockerfile:2:1") && err.contains("\"nothere\" was not found"),
        "{err}"
    );
    assert_eq!(err.matches("was not found").count(), 1, "said once: {err}");
}

#[test]
fn a_source_escaping_the_context_is_refused() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nCOPY ../secret /x\n");
    let err = stderr_of(&p, &["keys", "."]);
    assert!(err.contains("outside the build context"), "{err}");
}

#[test]
fn a_missing_dockerfile_says_how_to_point_at_one() {
    let p = Project::new();
    let err = stderr_of(&p, &["keys", "."]);
    assert!(err.contains("pass its path with -f"), "{err}");
}

#[test]
fn an_unknown_target_lists_the_stages() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine AS base\nFROM base AS app\n");
    let err = stderr_of(&p, &["keys", "--target", "nope", "."]);
    assert!(err.contains("stages are: base, app"), "{err}");
}

#[test]
fn parse_json_keeps_lines_and_text_as_written() {
    let p = Project::new();
    p.write("Dockerfile", "FROM alpine\nRUN a \\\n  b\n");
    let out = p.lcache(&["parse", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = &v["instructions"][1];
    assert_eq!((run["line"].as_u64(), run["end_line"].as_u64()), (Some(2), Some(3)));
    assert_eq!(run["written"], "RUN a   b");
}
