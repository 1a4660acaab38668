//! The COPY content is the keyed content: a file that changes between the plan (where the
//! step's key was made) and the copy fails the step clearly, and nothing is stored under
//! the key the old content made.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use lcache_e2e::{BuildEnv, Project};

#[test]
fn a_context_edited_mid_build_fails_the_copy_and_caches_nothing_under_the_old_key() {
    let env = BuildEnv::new();
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nRUN sleep 2\nCOPY a.txt /a.txt\n")
        .write("a.txt", "planned\n");
    let mut child = env
        .command(&p, &["build", "--progress", "plain", "."])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("RUN sleep 2") {
            // Keys are made; the COPY has not run yet.
            p.write("a.txt", "edited while building\n");
            break;
        }
    }
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("Dockerfile:3") && log.contains("the sources changed while the build ran"),
        "{log}"
    );
    assert!(log.contains("run the build again"), "{log}");

    // With the planned content back, the COPY's key is the one the failed build had: it
    // must still be a miss.
    p.write("a.txt", "planned\n");
    let out = env.lcache(&p, &["plan", "--json", "."]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["cached"], serde_json::json!([true, false]), "{plan}");
}
