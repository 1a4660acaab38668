//! `lcached --max-size`: least recently used blobs go, with the records that need them,
//! never the blobs a named image uses; an evicted step says so.

use lcache_e2e::{parts_body, put_parts, sha256_digest, Daemon};

fn put_blob(d: &Daemon, content: &[u8]) -> String {
    let digest = sha256_digest(content);
    assert_eq!(d.http("PUT", &format!("/v1/blobs/{digest}"), content).0, 201);
    digest
}

fn put_step(d: &Daemon, key: &str, digest: &str) {
    let rec = format!(r#"{{"key":"{key}","layer":{{"digest":"{digest}","media_type":"m"}},"duration_ms":1}}"#);
    assert_eq!(d.http("PUT", &format!("/v1/steps/{key}"), rec.as_bytes()).0, 201);
}

#[test]
fn the_least_recently_used_blob_and_its_records_go_first_and_images_stay() {
    let d = Daemon::start(&["--max-size", "100"]);
    // A named image's blobs (60 bytes) are never evicted.
    let (layer, config, manifest) = (put_blob(&d, &[1; 40]), put_blob(&d, &[2; 10]), put_blob(&d, &[3; 10]));
    let image = format!(
        r#"{{"name":"base:1","manifest_digest":"{manifest}","config_digest":"{config}","layers":[{{"digest":"{layer}","media_type":"m","size":40}}],"config":"{{}}"}}"#
    );
    assert_eq!(d.http("PUT", "/v1/images/base:1", image.as_bytes()).0, 201);
    let (ka, kb) = (format!("{:064x}", 0xa), format!("{:064x}", 0xb));
    let a = put_blob(&d, &[4; 30]);
    put_step(&d, &ka, &a);
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(d.http("GET", &format!("/v1/steps/{ka}"), b"").0, 200);
    std::thread::sleep(std::time::Duration::from_millis(5));
    // 120 bytes now: over the limit, so the least recently used goes (A, used before B).
    let b = put_blob(&d, &[5; 30]);
    put_step(&d, &kb, &b);
    // Waited for by the metrics: asking for A's record would mark A used, and on a busy
    // machine make B the least recently used before the eviction pass runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !String::from_utf8_lossy(&d.http("GET", "/metrics", b"").1).contains("lcache_evicted_blobs_total 1")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (status, body) = d.http("GET", &format!("/v1/steps/{ka}"), b"");
    let gone = String::from_utf8_lossy(&body);
    assert_eq!(status, 404, "{gone}");
    assert!(gone.contains("evicted"), "A's record is gone and says why: {gone}");
    assert_eq!(d.http("HEAD", &format!("/v1/blobs/{a}"), b"").0, 404, "and its blob");
    assert_eq!(d.http("GET", &format!("/v1/steps/{kb}"), b"").0, 200, "B stays");
    for blob in [&layer, &config, &manifest] {
        assert_eq!(
            d.http("HEAD", &format!("/v1/blobs/{blob}"), b"").0,
            200,
            "image blobs stay"
        );
    }
    let (_, metrics) = d.http("GET", "/metrics", b"");
    let m = String::from_utf8_lossy(&metrics);
    assert!(
        m.contains("lcache_evicted_blobs_total 1") && m.contains("lcache_evicted_bytes_total 30"),
        "{m}"
    );
    // Storing the step again clears its tombstone.
    let a2 = put_blob(&d, &[4; 30]);
    put_step(&d, &ka, &a2);
    assert_eq!(d.http("GET", &format!("/v1/steps/{ka}"), b"").0, 200);
}

#[test]
fn a_build_after_eviction_explains_its_misses_as_evicted() {
    use lcache_e2e::{cached, BuildEnv, Project};
    // Room for the busybox base and little else: the steps' layers are evicted as soon as
    // something newer needs the space.
    let env = BuildEnv::with_daemon_args(&["--max-size", "3M"]);
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nRUN head -c 300000 /dev/urandom > /noise\n");
    let (steps, _) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false]);
    // Newer blobs push the step's layer out (least recently used goes first).
    for i in 0..8u8 {
        put_blob(&env.daemon, &vec![i; 400_000]);
    }
    // Built again from another directory: no earlier build of *this* context to compare
    // with, so only the daemon's tombstone can tell the miss was an eviction.
    let q = Project::new();
    q.write("Dockerfile", "FROM busybox\nRUN head -c 300000 /dev/urandom > /noise\n");
    let explain_cause = || {
        let out = env.lcache(&q, &["explain", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["steps"][0]["cause"].clone()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, _) = env.daemon.http("GET", "/v1/status", b"");
        assert_eq!(status, 200);
        let plan = env.lcache(&p, &["plan", "--json", "."]);
        let v: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
        if v["cached"][0] == false || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (steps, _) = env.build(&q, &[]);
    assert_eq!(cached(&steps), [false], "the record was evicted");
    assert_eq!(
        explain_cause(),
        serde_json::json!("evicted"),
        "said as such, not 'never built'"
    );
}

#[test]
fn blobs_kept_as_runs_count_once_what_they_share_with_their_base() {
    // 1 MB allowed. A 600 KB layer and five edits of it, kept as runs of its file: six
    // times 600 KB by their sizes, about 600 KB on disk.
    let d = Daemon::start(&["--max-size", "1000000"]);
    let base: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let base_digest = put_blob(&d, &base);
    let mut edits = Vec::new();
    for n in 0..5u8 {
        let mut edited = base.clone();
        edited[300_000] = n;
        let digest = sha256_digest(&edited);
        let body = parts_body(&base_digest, &[(0, 300_000), (300_000, 1), (300_001, 299_999)], &edited);
        assert_eq!(put_parts(&d.socket, &digest, &body, body.len()), 201);
        edits.push(digest);
    }
    // Eviction runs after every upload: one more wakes it once all are in.
    put_blob(&d, b"a last small blob");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (_, metrics) = d.http("GET", "/metrics", b"");
    assert!(
        String::from_utf8_lossy(&metrics).contains("lcache_evicted_blobs_total 0"),
        "nothing evicted"
    );
    for blob in edits.iter().chain([&base_digest]) {
        assert_eq!(d.http("HEAD", &format!("/v1/blobs/{blob}"), b"").0, 200, "{blob} kept");
    }

    // Over the limit on disk: blobs go until it is under 90 %, each counted for what its
    // removal freed (the base's bytes only once the last edit linking them goes).
    let other: Vec<u8> = (0..500_000u32).map(|i| (i % 241) as u8).collect();
    put_blob(&d, &other);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let freed = loop {
        let freed = d.metric("lcache_evicted_bytes_total");
        if freed > 0 || std::time::Instant::now() > deadline {
            break freed;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(freed >= 200_000, "{freed} bytes freed");
    let on_disk: u64 = walk_files(&d.store().join("blobs/sha256"));
    assert!(on_disk <= 900_000, "{on_disk} bytes left on disk");
}

/// The bytes of the distinct files under `dir` (a hard-linked file once).
fn walk_files(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            let m = e.path().symlink_metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if seen.insert(m.ino()) {
                total += m.len();
            }
        }
    }
    total
}
