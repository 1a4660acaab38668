//! The real `lcached` on a temp socket and store, driven with raw HTTP: the step and blob
//! round trip, refused uploads that store nothing, crash safety, concurrency, bad requests.

use std::io::Write;

use lcache_e2e::{make_token, parts_body, put_parts, raw_http, sha256_digest, tcp_http, Daemon};
use lcache_proto::wire::BLOB_PARTS_TYPE;

fn key(n: u32) -> String {
    format!("{:064x}", 0xabc000 + n)
}

fn record(key: &str, digest: &str) -> Vec<u8> {
    serde_json::json!({"key": key, "layer": {"digest": digest, "media_type": "application/vnd.oci.image.layer.v1.tar"}, "duration_ms": 1200, "inputs": null})
        .to_string()
        .into_bytes()
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Every file under blobs/sha256 hashes to its name, and no temp file is left.
/// Every blob the store holds reads back whole: a file, or (kept as parts) what the daemon
/// serves from its runs.
fn assert_blobs_whole(d: &Daemon) {
    for e in std::fs::read_dir(d.store().join("blobs/sha256")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let data = if p.is_dir() {
            let (status, body) = d.http("GET", &format!("/v1/blobs/sha256:{name}"), b"");
            assert_eq!(status, 200, "blob kept as parts {name}");
            body
        } else {
            std::fs::read(&p).unwrap()
        };
        assert_eq!(
            sha256_digest(&data),
            format!("sha256:{name}"),
            "partial or corrupt blob {}",
            p.display()
        );
    }
}

#[test]
fn a_miss_then_upload_then_hit_round_trips_and_fills_both_digests() {
    let d = Daemon::start(&[]);
    let k = key(1);
    let (status, body) = d.http("GET", &format!("/v1/steps/{k}"), b"");
    assert_eq!(status, 404);
    assert!(json(&body)["hint"].as_str().unwrap().contains("a miss"));

    let layer = b"a layer tarball".to_vec();
    let digest = sha256_digest(&layer);
    assert_eq!(d.http("PUT", &format!("/v1/blobs/{digest}"), &layer).0, 201);
    assert_eq!(d.http("PUT", &format!("/v1/steps/{k}"), &record(&k, &digest)).0, 201);

    let (status, body) = d.http("GET", &format!("/v1/steps/{k}"), b"");
    assert_eq!(status, 200);
    let rec = json(&body);
    assert_eq!(rec["layer"]["digest"], digest);
    assert_eq!(rec["layer"]["blake3"], blake3_hex(&layer));
    assert_eq!(rec["layer"]["size"], layer.len());
    assert_eq!(d.http("HEAD", &format!("/v1/blobs/{digest}"), b"").0, 200);
    let (status, got) = d.http("GET", &format!("/v1/blobs/{digest}"), b"");
    assert_eq!((status, got), (200, layer));

    let (_, metrics) = d.http("GET", "/metrics", b"");
    let m = String::from_utf8_lossy(&metrics);
    assert!(
        m.contains("lcache_step_hits_total 1") && m.contains("lcache_step_misses_total 1"),
        "{m}"
    );
}

fn blake3_hex(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

#[test]
fn a_record_pointing_to_a_missing_blob_is_refused() {
    let d = Daemon::start(&[]);
    let k = key(2);
    let (status, body) = d.http(
        "PUT",
        &format!("/v1/steps/{k}"),
        &record(&k, &sha256_digest(b"never uploaded")),
    );
    assert_eq!(status, 409);
    assert!(json(&body)["hint"].as_str().unwrap().contains("PUT the blob"));
    assert_eq!(d.http("GET", &format!("/v1/steps/{k}"), b"").0, 404);
}

#[test]
fn an_upload_with_the_wrong_digest_is_refused_and_nothing_is_kept() {
    let d = Daemon::start(&[]);
    let claimed = sha256_digest(b"what I said");
    let (status, body) = d.http("PUT", &format!("/v1/blobs/{claimed}"), b"what I sent");
    assert_eq!(status, 400);
    assert!(json(&body)["error"].as_str().unwrap().contains("have digest"));
    assert_eq!(d.http("HEAD", &format!("/v1/blobs/{claimed}"), b"").0, 404);
    assert_eq!(std::fs::read_dir(d.store().join("blobs/sha256")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(d.store().join("blobs/tmp")).unwrap().count(), 0);
}

#[test]
fn a_truncated_upload_is_refused_and_nothing_is_kept() {
    let d = Daemon::start(&[]);
    let data = vec![7u8; 100_000];
    let digest = sha256_digest(&data);
    let (status, _) = raw_http(
        &d.socket,
        "PUT",
        &format!("/v1/blobs/{digest}"),
        &data[..40_000],
        Some(data.len()),
    );
    assert!(status == 400 || status == 0, "status {status}");
    assert_eq!(d.http("HEAD", &format!("/v1/blobs/{digest}"), b"").0, 404);
    assert_eq!(std::fs::read_dir(d.store().join("blobs/tmp")).unwrap().count(), 0);
    assert_eq!(d.http("GET", "/v1/status", b"").0, 200, "the daemon is still up");
}

#[test]
fn kill_9_during_uploads_leaves_only_whole_blobs_and_every_acknowledged_record() {
    let d = Daemon::start(&[]);
    // Acknowledged work: blobs and records the daemon answered 201 for.
    let mut acked = Vec::new();
    for n in 0..20u32 {
        let layer = format!("layer number {n}").repeat(1000).into_bytes();
        let digest = sha256_digest(&layer);
        assert_eq!(d.http("PUT", &format!("/v1/blobs/{digest}"), &layer).0, 201);
        let k = key(100 + n);
        assert_eq!(d.http("PUT", &format!("/v1/steps/{k}"), &record(&k, &digest)).0, 201);
        acked.push((k, digest));
    }
    // Acknowledged blobs uploaded as parts of the first: kept as runs, they must survive too.
    let base = "layer number 0".repeat(1000).into_bytes();
    for n in 0..4u32 {
        let mut layer = base.clone();
        layer[100..104].copy_from_slice(&n.to_le_bytes());
        let digest = sha256_digest(&layer);
        let body = parts_body(&acked[0].1, &[(0, 100), (100, 4), (104, base.len() - 104)], &layer);
        assert_eq!(put_parts(&d.socket, &digest, &body, body.len()), 201);
        let k = key(200 + n);
        assert_eq!(d.http("PUT", &format!("/v1/steps/{k}"), &record(&k, &digest)).0, 201);
        acked.push((k, digest));
    }
    // Uploads in flight: half a body sent, the rest never comes.
    let mut in_flight = Vec::new();
    for n in 0..8u32 {
        let data = vec![n as u8; 1 << 20];
        let digest = sha256_digest(&data);
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        write!(
            s,
            "PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            data.len()
        )
        .unwrap();
        s.write_all(&data[..data.len() / 2]).unwrap();
        in_flight.push((s, digest));
    }
    // And as parts: the list and half the sent bytes.
    for n in 0..4u32 {
        let mut layer = base.clone();
        layer.extend(vec![n as u8; 1 << 20]);
        let digest = sha256_digest(&layer);
        let body = parts_body(&acked[0].1, &[(0, base.len()), (base.len(), 1 << 20)], &layer);
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        write!(
            s,
            "PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Type: {BLOB_PARTS_TYPE}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body[..body.len() / 2]).unwrap();
        in_flight.push((s, digest));
    }
    let store = d.store();
    let in_flight_on_disk = || std::fs::read_dir(store.join("blobs/tmp")).unwrap().count();
    for _ in 0..100 {
        if in_flight_on_disk() > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(in_flight_on_disk() > 0, "uploads should be in flight");
    let dir = d.kill9();
    drop(in_flight);

    let d = Daemon::start_in(dir, &[]);
    assert_eq!(
        std::fs::read_dir(d.store().join("blobs/tmp")).unwrap().count(),
        0,
        "temp files cleared"
    );
    assert_blobs_whole(&d);
    for (k, digest) in &acked {
        let (status, body) = d.http("GET", &format!("/v1/steps/{k}"), b"");
        assert_eq!(status, 200, "acknowledged record {k} lost");
        assert_eq!(json(&body)["layer"]["digest"], *digest);
        let (status, blob) = d.http("GET", &format!("/v1/blobs/{digest}"), b"");
        assert_eq!(status, 200);
        assert_eq!(sha256_digest(&blob), *digest);
    }
}

#[test]
fn thirty_two_concurrent_clients_all_get_answers() {
    let d = Daemon::start(&[]);
    let socket = d.socket.clone();
    let threads: Vec<_> = (0..32u32)
        .map(|t| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                for i in 0..10u32 {
                    let layer = format!("client {t} layer {i}").into_bytes();
                    let digest = sha256_digest(&layer);
                    assert_eq!(
                        raw_http(&socket, "PUT", &format!("/v1/blobs/{digest}"), &layer, None).0,
                        201
                    );
                    let k = key(10_000 + t * 100 + i);
                    assert_eq!(
                        raw_http(&socket, "PUT", &format!("/v1/steps/{k}"), &record(&k, &digest), None).0,
                        201
                    );
                    assert_eq!(raw_http(&socket, "GET", &format!("/v1/steps/{k}"), b"", None).0, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let (_, body) = d.http("GET", "/v1/status", b"");
    assert_eq!(json(&body)["stats"]["steps"], 320);
}

#[test]
fn a_second_daemon_on_the_same_store_is_refused_by_name() {
    let d = Daemon::start(&[]);
    let out = std::process::Command::new(lcache_e2e::bin("lcached"))
        .args(["--listen", "tcp://127.0.0.1:0", "--store"])
        .arg(d.store())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("another lcached (pid {})", d.pid())), "{err}");
}

#[test]
fn bad_requests_get_4xx_with_a_hint_and_the_daemon_stays_up() {
    let mut d = Daemon::start(&[]);
    let cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        ("POST", "/v1/plan".into(), b"{not json".to_vec(), 400),
        ("POST", "/v1/plan".into(), vec![b' '; 5 << 20], 413),
        ("POST", "/v1/builds".into(), b"[]".to_vec(), 400),
        ("GET", "/v1/nope".into(), vec![], 404),
        ("DELETE", "/v1/status".into(), vec![], 405),
        ("GET", "/v1/steps/not-a-key".into(), vec![], 400),
        ("PUT", "/v1/steps/".to_string() + &key(1), b"{\"key\":1}".to_vec(), 400),
        ("GET", "/v1/blobs/sha256:../../etc/passwd".into(), vec![], 404),
        ("GET", "/v1/blobs/sha256:..%2f..%2fetc%2fpasswd".into(), vec![], 400),
        ("PUT", "/v1/blobs/md5:abc".into(), b"x".to_vec(), 400),
        ("GET", "/v1/builds/nope".into(), vec![], 404),
    ];
    for (method, path, body, want) in cases {
        let (status, resp) = d.http(method, &path, &body);
        assert_eq!(status, want, "{method} {path}");
        let v = json(&resp);
        assert!(v["error"].is_string() && v["hint"].is_string(), "{method} {path}: {v}");
    }
    assert!(d.alive());
    assert_eq!(d.http("GET", "/v1/status", b"").0, 200);
}

#[test]
fn builds_are_recorded_and_listed_newest_first() {
    let d = Daemon::start(&[]);
    for n in 0..3 {
        let b = serde_json::json!({"started_at_ms": n, "finished_at_ms": n + 1, "dockerfile": "Dockerfile", "context": "/c", "target": null, "steps": []});
        assert_eq!(d.http("POST", "/v1/builds", b.to_string().as_bytes()).0, 201);
    }
    let (_, body) = d.http("GET", "/v1/builds?limit=2", b"");
    let list = json(&body);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["started_at_ms"], 2);
    let id = list[0]["id"].as_str().unwrap();
    assert_eq!(d.http("GET", &format!("/v1/builds/{id}"), b"").0, 200);
}

/// `GET /v1/builds?QUERY`, which must succeed: each build's `started_at_ms`, as listed.
fn started_of(d: &Daemon, query: &str) -> Vec<u64> {
    let (status, body) = d.http("GET", &format!("/v1/builds?{query}"), b"");
    assert_eq!(status, 200, "{query}");
    json(&body)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["started_at_ms"].as_u64().unwrap())
        .collect()
}

#[test]
fn the_history_keeps_the_newest_builds_up_to_its_bound_across_restarts() {
    let post = |d: &Daemon, n: u64| {
        let b = serde_json::json!({"started_at_ms": n, "finished_at_ms": n + 1, "dockerfile": "Dockerfile", "context": "/c", "target": null, "steps": []});
        let (status, body) = d.http("POST", "/v1/builds", b.to_string().as_bytes());
        assert_eq!(status, 201);
        json(&body)["id"].as_str().unwrap().to_string()
    };
    let started = |d: &Daemon| started_of(d, "limit=100");
    let d = Daemon::start(&["--max-builds", "2"]);
    let first = post(&d, 0);
    for n in 1..3 {
        post(&d, n);
    }
    assert_eq!(started(&d), [2, 1]);
    assert_eq!(d.http("GET", &format!("/v1/builds/{first}"), b"").0, 404);
    // Counted again when the store is opened again.
    let d = Daemon::start_in(d.kill9(), &["--max-builds", "2"]);
    post(&d, 3);
    assert_eq!(started(&d), [3, 2]);
    let (_, status) = d.http("GET", "/v1/status", b"");
    assert_eq!(json(&status)["stats"]["builds"], 2);
}

#[test]
fn builds_are_listed_for_one_context_whatever_its_path_holds() {
    let d = Daemon::start(&[]);
    let odd = "/work/a b&c=d/%zz/é";
    for (n, context) in ["/a", odd, "/a", "/b", odd].iter().enumerate() {
        let b = serde_json::json!({"started_at_ms": n, "finished_at_ms": n + 1, "dockerfile": "Dockerfile", "context": context, "target": null, "steps": []});
        assert_eq!(d.http("POST", "/v1/builds", b.to_string().as_bytes()).0, 201);
    }
    let started = |query: &str| started_of(&d, query);
    assert_eq!(started("context=%2Fa&limit=10"), [2, 0]);
    assert_eq!(started("limit=1&context=%2Fa"), [2]);
    assert_eq!(started("context=%2Fwork%2Fa%20b%26c%3Dd%2F%25zz%2F%C3%A9"), [4, 1]);
    assert_eq!(started("context=%2Fnowhere"), Vec::<u64>::new());
    assert_eq!(started("limit=10").len(), 5);
    let (status, body) = d.http("GET", "/v1/builds?context=%FF", b"");
    assert_eq!(status, 400);
    assert!(json(&body)["hint"].as_str().unwrap().contains("UTF-8"));
}

#[test]
fn sigterm_stops_the_daemon_cleanly_and_removes_its_socket() {
    let d = Daemon::start(&[]);
    let socket = d.socket.clone();
    let status = d.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists());
}

/// Unmounts a test filesystem when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A directory for a daemon whose `store` is a tmpfs of `size` (mounting needs root, as the
/// build tests do), unmounted when the guard drops.
fn store_on_tmpfs(size: &str) -> (tempfile::TempDir, std::path::PathBuf, Mounted) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&store)
        .status()
        .unwrap();
    assert!(ok.success(), "mounting a tmpfs needs root");
    let mounted = Mounted(store.clone());
    (dir, store, mounted)
}

#[test]
fn a_full_disk_refuses_the_upload_keeps_nothing_and_the_daemon_stays_up() {
    // The store on a 4 MiB tmpfs: an 8 MiB blob cannot fit.
    let (dir, store, _mounted) = store_on_tmpfs("4m");
    let mut d = Daemon::start_in(dir, &[]);
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let digest = sha256_digest(&big);
    let (status, body) = d.http("PUT", &format!("/v1/blobs/{digest}"), &big);
    assert_eq!(status, 507, "{}", String::from_utf8_lossy(&body));
    assert!(json(&body)["hint"].as_str().unwrap().contains("free space"));
    assert_eq!(d.http("HEAD", &format!("/v1/blobs/{digest}"), b"").0, 404);
    assert_eq!(
        std::fs::read_dir(store.join("blobs/tmp")).unwrap().count(),
        0,
        "the partial upload was removed"
    );
    assert!(d.alive());
    let small = b"still works".to_vec();
    assert_eq!(
        d.http("PUT", &format!("/v1/blobs/{}", sha256_digest(&small)), &small).0,
        201
    );
}

#[test]
fn a_full_disk_fails_the_plan_with_507_and_the_plan_after_stores_its_listings() {
    let (dir, store, _mounted) = store_on_tmpfs("6m");
    let mut d = Daemon::start_in(dir, &[]);
    let context = tempfile::tempdir().unwrap();
    for dir in 0..5 {
        let sub = context.path().join(format!("d{dir}"));
        std::fs::create_dir(&sub).unwrap();
        for f in 0..40 {
            std::fs::write(sub.join(format!("f{f}")), format!("file {dir} {f}\n")).unwrap();
        }
    }
    let plan = serde_json::json!({
        "dockerfile_name": "Dockerfile",
        "dockerfile": "FROM scratch\nCOPY . /d/\n",
        "context": context.path(),
        "platform": "linux/amd64",
    })
    .to_string();
    // Whatever room is left, taken.
    let filler = store.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while f.write_all(&[0u8; 65536]).is_ok() {}
    drop(f);
    let (status, body) = d.http("POST", "/v1/plan", plan.as_bytes());
    assert_eq!(status, 507, "{}", String::from_utf8_lossy(&body));
    let said = json(&body);
    assert!(said["error"].as_str().unwrap().contains("disk is full"), "{said}");
    assert!(said["hint"].as_str().unwrap().contains("free space"), "{said}");
    assert!(d.alive());
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = d.http("POST", "/v1/plan", plan.as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let digest = json(&body)["report"]["steps"][0]["sources_digest"]
        .as_str()
        .unwrap()
        .to_string();
    // The failed plan's digest was not memoised: this plan stored what explain reads.
    let (status, summary) = d.http("GET", &format!("/v1/summaries/{digest}"), b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&summary));
    let summary = json(&summary);
    let top = summary
        .as_array()
        .and_then(|s| s.iter().find(|e| e["kind"] == "dir"))
        .unwrap_or_else(|| panic!("no directory in {summary}"));
    let node = top["digest"].as_str().unwrap();
    let (status, listing) = d.http("GET", &format!("/v1/dir-nodes/{node}"), b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&listing));
    assert!(String::from_utf8_lossy(&listing).contains("d4"));
}

#[test]
fn plans_and_layers_to_name_are_refused_over_tcp_where_the_rest_of_the_api_is_served() {
    let mut d = Daemon::start(&[]);
    let token = make_token(&d, "ci", "write");
    let plan = serde_json::json!({"dockerfile_name": "Dockerfile", "dockerfile": "FROM a\n", "context": "/etc", "platform": "linux/amd64"}).to_string();
    let (status, body) = tcp_http(&d.tcp, "POST", "/v1/plan", Some(&token), plan.as_bytes());
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("Unix socket"));
    // A layer's tar state is the client's word: only the socket's users may have the
    // daemon name a layer from it.
    let (status, body) = tcp_http(&d.tcp, "POST", "/v1/layers", Some(&token), b"junk");
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("Unix socket"));
    let (status, body) = d.http("POST", "/v1/layers", b"junk");
    assert_eq!(status, 415, "{}", String::from_utf8_lossy(&body));
    // Asking a stored blob's diff_id from a state that is none is refused, and the blob
    // stays; so does asking it over TCP.
    let blob = b"not a layer".to_vec();
    let digest = sha256_digest(&blob);
    assert_eq!(d.http("PUT", &format!("/v1/blobs/{digest}"), &blob).0, 201);
    let tail = br#"{"tar_state":"00","first":0,"blob_state":"","members":[]}"#;
    let (status, body) = d.http("POST", &format!("/v1/layers/{digest}/diff-id"), tail);
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let over_tcp = tcp_http(
        &d.tcp,
        "POST",
        &format!("/v1/layers/{digest}/diff-id"),
        Some(&token),
        tail,
    );
    assert_eq!(over_tcp.0, 403);
    assert_eq!(d.http("HEAD", &format!("/v1/blobs/{digest}"), b"").0, 200);
    // Gzipping a stored tar for an export takes the daemon's cores: the socket's users only.
    let gzip = format!("/v1/layers/{digest}/gzip");
    assert_eq!(tcp_http(&d.tcp, "POST", &gzip, Some(&token), b"").0, 403);
    let (status, body) = d.http("POST", &gzip, b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let form = json(&body);
    assert_eq!(form["diff_id"], digest.as_str());
    assert_eq!(
        d.http("HEAD", &format!("/v1/blobs/{}", form["digest"].as_str().unwrap()), b"")
            .0,
        200
    );
    assert_eq!(
        d.http("POST", &format!("/v1/layers/sha256:{}/gzip", key(8)), b"").0,
        404
    );
    assert_eq!(d.http("POST", "/v1/layers/sha256:zz/gzip", b"").0, 400);
    assert!(d.alive());
    assert_eq!(tcp_http(&d.tcp, "GET", "/v1/status", Some(&token), b"").0, 200);
    let k = key(7);
    assert_eq!(
        tcp_http(&d.tcp, "GET", &format!("/v1/steps/{k}"), Some(&token), b"").0,
        404
    );
}

#[test]
fn tcp_needs_a_known_token_and_a_read_token_never_writes() {
    let d = Daemon::start(&[]);
    let read = make_token(&d, "reader", "read");
    let write = make_token(&d, "writer", "write");
    let k = key(9);
    let rec = format!(r#"{{"key":"{k}","layer":null,"duration_ms":1}}"#);
    let put = |token: Option<&str>| tcp_http(&d.tcp, "PUT", &format!("/v1/steps/{k}"), token, rec.as_bytes());
    let (status, body) = put(None);
    assert_eq!(status, 401, "no token");
    assert!(
        String::from_utf8_lossy(&body).contains("lcache token create"),
        "says what to do"
    );
    assert_eq!(put(Some("lct_0000")).0, 401, "an unknown token");
    let (status, body) = put(Some(&read));
    assert_eq!(status, 403, "a read token writes nothing");
    assert!(String::from_utf8_lossy(&body).contains("--access write"));
    assert_eq!(
        tcp_http(&d.tcp, "GET", &format!("/v1/steps/{k}"), Some(&read), b"").0,
        404,
        "and may read"
    );
    assert_eq!(put(Some(&write)).0, 201);
    assert_eq!(
        tcp_http(&d.tcp, "GET", &format!("/v1/steps/{k}"), Some(&read), b"").0,
        200
    );
    // Tokens are made only on the socket, and a revoked one stops working at once.
    assert_eq!(tcp_http(&d.tcp, "GET", "/v1/tokens", Some(&write), b"").0, 403);
    let (status, body) = d.http("GET", "/v1/tokens", b"");
    assert_eq!(status, 200);
    assert!(
        !String::from_utf8_lossy(&body).contains(&read),
        "the list never shows a token"
    );
    assert_eq!(d.http("DELETE", "/v1/tokens/reader", b"").0, 200);
    assert_eq!(
        tcp_http(&d.tcp, "GET", &format!("/v1/steps/{k}"), Some(&read), b"").0,
        401
    );
    let (_, metrics) = d.http("GET", "/metrics", b"");
    assert!(String::from_utf8_lossy(&metrics).contains("lcache_auth_failures_total 4"));
}

#[test]
fn a_key_keeps_the_first_layer_stored_for_it() {
    let d = Daemon::start(&[]);
    let k = key(11);
    let mut layers = Vec::new();
    for content in [&b"first layer"[..], b"second layer"] {
        let digest = sha256_digest(content);
        assert_eq!(d.http("PUT", &format!("/v1/blobs/{digest}"), content).0, 201);
        layers.push(digest);
    }
    let rec = |digest: &str| {
        format!(
            r#"{{"key":"{k}","layer":{{"digest":"{digest}","blake3":"","size":0,"diff_id":"","media_type":"m"}},"duration_ms":1}}"#
        )
    };
    assert_eq!(
        d.http("PUT", &format!("/v1/steps/{k}"), rec(&layers[0]).as_bytes()).0,
        201
    );
    assert_eq!(
        d.http("PUT", &format!("/v1/steps/{k}"), rec(&layers[0]).as_bytes()).0,
        200,
        "the same again is fine"
    );
    let (status, body) = d.http("PUT", &format!("/v1/steps/{k}"), rec(&layers[1]).as_bytes());
    assert_eq!(status, 409, "another layer for the same key is refused");
    assert!(String::from_utf8_lossy(&body).contains("first writer wins"));
    let (_, got) = d.http("GET", &format!("/v1/steps/{k}"), b"");
    assert!(
        String::from_utf8_lossy(&got).contains(&layers[0]),
        "the first record stands"
    );
    let (_, metrics) = d.http("GET", "/metrics", b"");
    assert!(String::from_utf8_lossy(&metrics).contains("lcache_step_conflicts_total 1"));
}

#[test]
fn runners_racing_to_store_one_key_leave_one_record() {
    let d = Daemon::start(&[]);
    let token = make_token(&d, "runners", "write");
    let k = key(13);
    let layers: Vec<String> = (0..8u8)
        .map(|i| {
            let content = vec![i; 64];
            let digest = sha256_digest(&content);
            assert_eq!(d.http("PUT", &format!("/v1/blobs/{digest}"), &content).0, 201);
            digest
        })
        .collect();
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = layers
            .iter()
            .map(|digest| {
                let (tcp, token, k) = (&d.tcp, &token, &k);
                s.spawn(move || {
                    let rec =
                        format!(r#"{{"key":"{k}","layer":{{"digest":"{digest}","media_type":"m"}},"duration_ms":1}}"#);
                    tcp_http(tcp, "PUT", &format!("/v1/steps/{k}"), Some(token), rec.as_bytes()).0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 7, "{statuses:?}");
    let (_, body) = d.http("GET", &format!("/v1/steps/{k}"), b"");
    let stored: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(layers.contains(&stored["layer"]["digest"].as_str().unwrap().to_string()));
}

/// A daemon holding one 11,000-byte blob, stored whole: the daemon, the bytes, the digest.
fn daemon_with_a_base_blob() -> (Daemon, Vec<u8>, String) {
    let d = Daemon::start(&[]);
    let base = "base bytes ".repeat(1000).into_bytes();
    let base_digest = sha256_digest(&base);
    assert_eq!(d.http("PUT", &format!("/v1/blobs/{base_digest}"), &base).0, 201);
    (d, base, base_digest)
}

#[test]
fn the_parts_of_a_blob_are_given_only_for_one_kept_as_parts() {
    let (d, base, base_digest) = daemon_with_a_base_blob();
    let mut edited = base.clone();
    edited[500..504].copy_from_slice(b"EDIT");
    let digest = sha256_digest(&edited);
    let body = parts_body(&base_digest, &[(0, 500), (500, 4), (504, base.len() - 504)], &edited);
    assert_eq!(put_parts(&d.socket, &digest, &body, body.len()), 201);

    let (status, parts) = d.http("GET", &format!("/v1/blobs/{digest}/parts"), b"");
    assert_eq!(status, 200);
    assert_eq!(json(&parts)["base"], base_digest.as_str());
    assert_eq!(
        d.http("GET", &format!("/v1/blobs/{digest}/sent"), b""),
        (200, b"EDIT".to_vec())
    );
    // A blob stored whole, one not stored, a name that is not a digest: no parts.
    for path in [
        format!("/v1/blobs/{base_digest}/parts"),
        format!("/v1/blobs/{base_digest}/sent"),
        format!("/v1/blobs/{}/sent", sha256_digest(b"absent")),
    ] {
        assert_eq!(d.http("GET", &path, b"").0, 404, "{path}");
    }
    assert_eq!(d.http("GET", "/v1/blobs/sha256:..%2F..%2Fetc/parts", b"").0, 400);
    assert_eq!(d.http("GET", "/v1/status", b"").0, 200, "the daemon is still up");
}

#[test]
fn a_parts_upload_that_arrives_a_few_bytes_at_a_time_is_answered() {
    // Its header then spans many reads: lcached once spun on it for ever, at 100 % of a core.
    let (d, base, base_digest) = daemon_with_a_base_blob();
    let mut edited = base.clone();
    let mut runs = Vec::new();
    for i in 0..100 {
        edited[i * 100 + 50] = b'#';
        runs.push((if i == 0 { 0 } else { i * 100 - 49 }, if i == 0 { 50 } else { 99 }));
        runs.push((i * 100 + 50, 1));
    }
    runs.push((9951, base.len() - 9951));
    let digest = sha256_digest(&edited);
    let body = parts_body(&base_digest, &runs, &edited);
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    write!(
        s,
        "PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Type: {BLOB_PARTS_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    for chunk in body.chunks(64) {
        s.write_all(chunk).unwrap();
        s.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "answered: {answer:?}");
    assert_eq!(d.http("GET", &format!("/v1/blobs/{digest}"), b""), (200, edited));
}

/// A GET with a `Range` header over the Unix socket: status, `Content-Range`, and body.
fn get_range(socket: &std::path::Path, path: &str, range: &str) -> (u16, String, Vec<u8>) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: {range}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let content_range = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-range: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, content_range, answer[split + 4..].to_vec())
}

#[test]
fn a_blob_range_is_served_exactly_and_a_hostile_range_is_refused() {
    let d = Daemon::start(&[]);
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let digest = sha256_digest(&blob);
    assert_eq!(d.http("PUT", &format!("/v1/blobs/{digest}"), &blob).0, 201);
    let path = format!("/v1/blobs/{digest}");

    let (status, range, body) = get_range(&d.socket, &path, "bytes=99000-");
    assert_eq!((status, range.as_str()), (206, "bytes 99000-99999/100000"));
    assert!(body == blob[99_000..]);
    let (status, _, body) = get_range(&d.socket, &path, "bytes=10-19");
    assert_eq!(status, 206);
    assert!(body == blob[10..20]);
    // A last byte past the end is cut to the end, as HTTP says.
    let (status, range, _) = get_range(&d.socket, &path, "bytes=99990-200000");
    assert_eq!((status, range.as_str()), (206, "bytes 99990-99999/100000"));
    let (status, _, body) = get_range(&d.socket, &path, "bytes=100000-");
    assert_eq!((status, body.len()), (206, 0), "the empty rest of the blob");

    for hostile in [
        "bytes=100001-",
        "bytes=-10",
        "bytes=5-4",
        "bytes=0-1,5-6",
        "bytes=99999999999999999999-",
        "bytes=0-18446744073709551615",
        "items=0-1",
        "bytes=",
    ] {
        let (status, range, _) = get_range(&d.socket, &path, hostile);
        assert_eq!((status, range.as_str()), (416, "bytes */100000"), "{hostile}");
    }
    // A range of a blob the store does not hold is a miss, as a whole GET is.
    let missing = sha256_digest(b"not stored");
    assert_eq!(get_range(&d.socket, &format!("/v1/blobs/{missing}"), "bytes=0-").0, 404);
    assert_eq!(d.http("GET", "/v1/status", b"").0, 200, "the daemon is still up");
}

#[test]
fn a_build_to_name_later_is_refused_over_tcp_and_when_it_names_no_layer_being_taken() {
    use lcache_image::image_draft::DeferredLayer;
    use lcache_proto::wire::{LayerRef, LayerTail, StepRecord};
    let mut d = Daemon::start(&[]);
    let token = make_token(&d, "ci", "write");
    let layer = LayerRef {
        digest: format!("sha256:{}", "ab".repeat(32)),
        blake3: String::new(),
        size: 10,
        diff_id: String::new(),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    };
    let state = lcache_image::layer_segments::empty_tar_state();
    let tail = LayerTail {
        tar_state: state.clone(),
        first: 0,
        blob_state: vec![],
        members: vec![],
        compression: Default::default(),
    };
    let record = StepRecord {
        key: key(3),
        layer: Some(layer.clone()),
        duration_ms: 1,
        inputs: None,
        created_at_ms: 0,
    };
    let build = |layers: Vec<DeferredLayer>| serde_json::to_vec(&deferred_build(&layer, "app:latest", layers)).unwrap();
    let at = |at: usize, tar_state: Vec<u8>| DeferredLayer {
        at,
        tail: LayerTail {
            tar_state,
            ..tail.clone()
        },
        record: record.clone(),
    };
    // The diff_ids a build hands over become its records': only the socket's users may.
    let (status, body) = tcp_http(&d.tcp, "POST", "/v1/builds/deferred", Some(&token), &build(vec![]));
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("Unix socket"));
    for (body, says) in [
        (b"junk".to_vec(), ""),
        (build(vec![]), "no layer whose diff_id"),
        (build(vec![at(1, state.clone())]), "past the image's 1 layers"),
        (build(vec![at(0, vec![0; 3])]), "not a SHA-256 state"),
    ] {
        let (status, answer) = d.http("POST", "/v1/builds/deferred", &body);
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
        assert!(
            String::from_utf8_lossy(&answer).contains(says),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    // A tag that is no name.
    let mut untagged: serde_json::Value = serde_json::from_slice(&build(vec![at(0, state.clone())])).unwrap();
    untagged["tags"] = serde_json::json!([""]);
    let (status, answer) = d.http("POST", "/v1/builds/deferred", untagged.to_string().as_bytes());
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
    // Well formed, but naming a layer lcached does not hold.
    let (status, answer) = d.http("POST", "/v1/builds/deferred", &build(vec![at(0, state.clone())]));
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&answer));
    assert!(String::from_utf8_lossy(&answer).contains("POST /v1/layers"));
    // Nothing was recorded, and the daemon serves on.
    let (status, builds) = d.http("GET", "/v1/builds", b"");
    assert_eq!((status, builds.as_slice()), (200, b"[]".as_slice()));
    assert_eq!(d.http("GET", "/v1/images/app:latest", b"").0, 404);
    assert!(d.alive());
}

/// A build of one layer, `layer`, handed over to be named and tagged `tag`.
fn deferred_build(
    layer: &lcache_proto::wire::LayerRef,
    tag: &str,
    layers: Vec<lcache_image::image_draft::DeferredLayer>,
) -> lcache_image::image_draft::DeferredBuild {
    lcache_image::image_draft::DeferredBuild {
        build: lcache_proto::wire::BuildRecord {
            started_at_ms: 1,
            finished_at_ms: 2,
            dockerfile: "Dockerfile".into(),
            context: "/nonexistent".into(),
            ..Default::default()
        },
        draft: lcache_image::image_draft::ImageDraft {
            platform: "linux/amd64".into(),
            config: Default::default(),
            layers: vec![layer.clone()],
            history: vec![],
        },
        tags: vec![tag.into()],
        layers,
        scope: String::new(),
    }
}

/// A COPY layer of 3,000 files (`edited`: that one's contents changed) packed in segments
/// from `root`; over `earlier`'s blob, its unchanged members are left to the daemon.
fn segmented_layer(
    root: &std::path::Path,
    edited: Option<usize>,
    earlier: Option<&lcache_image::layer_segments::SegmentIndex>,
    dest: &std::path::Path,
) -> lcache_image::layer_segments::Packed {
    use lcache_image::layer_segments::{pack_segmented, Reuse, SegmentEntry, SegmentEntryKind, TailDigests};
    let files: Vec<(String, Vec<u8>)> = (0..3000)
        .map(|i| {
            let body = match edited {
                Some(e) if e == i => b"edited".to_vec(),
                _ => format!("file {i} ").repeat(i % 40 + 1).into_bytes(),
            };
            (format!("f{i:04}"), body)
        })
        .collect();
    for (p, b) in &files {
        std::fs::write(root.join(p), b).unwrap();
    }
    let entries: Vec<SegmentEntry> = files
        .iter()
        .map(|(p, b)| SegmentEntry {
            path: p,
            kind: SegmentEntryKind::File {
                size: b.len() as u64,
                content: *blake3::hash(b).as_bytes(),
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
        })
        .collect();
    let open = |e: &SegmentEntry| std::fs::File::open(root.join(e.path));
    let reuse = earlier.map(|index| Reuse {
        index,
        blob: std::io::empty(),
        skipped: 0,
    });
    pack_segmented(&entries, &open, reuse, dest, TailDigests::Cache, Default::default()).unwrap()
}

/// `POST /v1/layers`'s body for `packed` over `base`, its tail `tail`.
fn layer_body(
    packed: &lcache_image::layer_segments::Packed,
    base: &str,
    tail: &lcache_proto::wire::LayerTail,
    name_later: bool,
) -> Vec<u8> {
    let header = lcache_proto::wire::LayerParts {
        blob: lcache_proto::wire::BlobParts {
            base: base.into(),
            parts: packed.parts.clone(),
        },
        tail: tail.clone(),
        name_later,
    };
    let mut b = header.head().unwrap();
    let made = std::fs::read(&packed.layer.path).unwrap();
    for (offset, len) in header.blob.sent_ranges() {
        b.extend_from_slice(&made[offset as usize..(offset + len) as usize]);
    }
    b
}

/// What `POST /v1/layers/provisional` says `names` came to.
fn resolve(d: &Daemon, names: &[&str]) -> Vec<Option<lcache_proto::wire::NamedLayer>> {
    let asked = serde_json::json!({ "names": names }).to_string();
    let (status, body) = d.http("POST", "/v1/layers/provisional", asked.as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice::<lcache_proto::wire::ResolvedNames>(&body)
        .unwrap()
        .layers
}

#[test]
fn a_layer_named_later_is_answered_at_once_and_comes_to_the_digest_naming_it_now_gives() {
    use lcache_image::image_draft::DeferredLayer;
    use lcache_proto::wire::{is_provisional, LayerRef, NamedLayer, StepRecord};
    let mut d = Daemon::start(&[]);
    let token = make_token(&d, "ci", "write");
    let work = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let first = segmented_layer(src.path(), None, None, &work.path().join("l0"));
    let base = first.layer.digest.clone();
    let bytes = std::fs::read(&first.layer.path).unwrap();
    assert_eq!(d.http("PUT", &format!("/v1/blobs/{base}"), &bytes).0, 201);
    let edit = segmented_layer(src.path(), Some(1700), Some(&first.index), &work.path().join("l1"));
    let whole = segmented_layer(src.path(), Some(1700), None, &work.path().join("l2"));
    let tail = edit.tail.clone().expect("left to the daemon to name");

    // Answered with a provisional name (202), then resolved to what naming it now gives.
    let (status, answer) = lcache_e2e::post_parts(&d.socket, "/v1/layers", &layer_body(&edit, &base, &tail, true));
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&answer));
    let later: NamedLayer = serde_json::from_slice(&answer).unwrap();
    assert!(is_provisional(&later.digest), "{}", later.digest);
    assert!(later.blob_states.is_empty());
    assert_eq!(later.size, whole.layer.size);
    let unknown = format!("provisional:{}", "0".repeat(64));
    let resolved = resolve(&d, &[&later.digest, &unknown]);
    let named = resolved[0].clone().expect("the layer was named");
    assert_eq!(named.digest, whole.layer.digest);
    assert_eq!(named.size, whole.layer.size);
    assert_eq!(resolved[1], None, "a name never given");
    let (status, answer) = lcache_e2e::post_parts(&d.socket, "/v1/layers", &layer_body(&edit, &base, &tail, false));
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));
    let now: NamedLayer = serde_json::from_slice(&answer).unwrap();
    assert_eq!(now, named, "named at once: the same digest and the same states");

    // A build handed over with a layer still bearing its provisional name: the image and
    // the step's record get the digest, and the diff_id the whole pack gives.
    let (status, answer) = lcache_e2e::post_parts(&d.socket, "/v1/layers", &layer_body(&edit, &base, &tail, true));
    assert_eq!(status, 202);
    let pending: NamedLayer = serde_json::from_slice(&answer).unwrap();
    assert_ne!(pending.digest, later.digest, "each answer its own name");
    let layer = LayerRef {
        digest: pending.digest.clone(),
        blake3: String::new(),
        size: pending.size,
        diff_id: String::new(),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    };
    let record = StepRecord {
        key: key(11),
        layer: Some(layer.clone()),
        duration_ms: 1,
        inputs: None,
        created_at_ms: 0,
    };
    let build = deferred_build(
        &layer,
        "later:1",
        vec![DeferredLayer {
            at: 0,
            tail: tail.clone(),
            record,
        }],
    );
    let (status, answer) = d.http("POST", "/v1/builds/deferred", &serde_json::to_vec(&build).unwrap());
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));
    let (status, image) = d.http("GET", "/v1/images/later:1", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&image));
    let image = json(&image);
    assert_eq!(image["layers"][0]["digest"], whole.layer.digest.as_str(), "{image}");
    assert_eq!(image["layers"][0]["diff_id"], whole.layer.diff_id.as_str(), "{image}");
    let (status, rec) = d.http("GET", &format!("/v1/steps/{}", key(11)), b"");
    assert_eq!(status, 200);
    assert_eq!(json(&rec)["layer"]["digest"], whole.layer.digest.as_str());

    // A front that is not the base's: answered, then resolved to nothing, and nothing kept.
    let mut bad = tail.clone();
    bad.blob_state = tail.tar_state.clone();
    let (status, answer) = lcache_e2e::post_parts(&d.socket, "/v1/layers", &layer_body(&edit, &base, &bad, true));
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&answer));
    let refused: NamedLayer = serde_json::from_slice(&answer).unwrap();
    assert_eq!(resolve(&d, &[&refused.digest]), vec![None]);
    // Only names are resolved, and only on the socket.
    let (status, _) = d.http("POST", "/v1/layers/provisional", br#"{"names":["sha256:00"]}"#);
    assert_eq!(status, 400);
    let asked = serde_json::json!({ "names": [later.digest] }).to_string();
    let over_tcp = tcp_http(&d.tcp, "POST", "/v1/layers/provisional", Some(&token), asked.as_bytes());
    assert_eq!(over_tcp.0, 403);
    assert!(d.alive());

    // What the names came to outlives the daemon.
    let store = d.kill9();
    let d = Daemon::start_in(store, &[]);
    assert_eq!(resolve(&d, &[&later.digest, &refused.digest]), vec![Some(named), None]);
}

#[test]
fn a_layer_answered_before_the_daemon_was_killed_is_named_when_it_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_env(
        dir,
        &[],
        &[("LCACHED_TEST_LAYER_NAMING_DELAY_MS".into(), "60000".into())],
    );
    let work = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let first = segmented_layer(src.path(), None, None, &work.path().join("l0"));
    let base = first.layer.digest.clone();
    assert_eq!(
        d.http(
            "PUT",
            &format!("/v1/blobs/{base}"),
            &std::fs::read(&first.layer.path).unwrap()
        )
        .0,
        201
    );
    let edit = segmented_layer(src.path(), Some(5), Some(&first.index), &work.path().join("l1"));
    let whole = segmented_layer(src.path(), Some(5), None, &work.path().join("l2"));
    let tail = edit.tail.clone().unwrap();
    let (status, answer) = lcache_e2e::post_parts(&d.socket, "/v1/layers", &layer_body(&edit, &base, &tail, true));
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&answer));
    let later: lcache_proto::wire::NamedLayer = serde_json::from_slice(&answer).unwrap();
    // Killed while the layer waits to be named: named when the daemon starts again. A
    // kept layer whose header is damaged comes to nothing, and the daemon starts.
    let store = d.kill9();
    let junk = format!("{}{}", "0".repeat(16), "f".repeat(48));
    let kept = store.path().join("store/blobs/provisional").join(&junk);
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::write(kept.join("header.json"), b"{not json").unwrap();
    let d = Daemon::start_in(store, &[]);
    assert_eq!(resolve(&d, &[&format!("provisional:{junk}")]), vec![None]);
    assert!(!kept.exists(), "what cannot be named is removed");
    let named = resolve(&d, &[&later.digest])
        .remove(0)
        .expect("named after the restart");
    assert_eq!(named.digest, whole.layer.digest);
    let (status, blob) = d.http("GET", &format!("/v1/blobs/{}", named.digest), b"");
    assert_eq!(status, 200);
    assert_eq!(blob, std::fs::read(&whole.layer.path).unwrap());
}

/// `data` gzipped by the system's gzip (the test crate has no compression library).
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut child = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    out.stdout
}

/// A `PUT /v1/blobs/{digest}` over TCP whose body is declared gzipped; the status.
fn put_gzipped(d: &Daemon, token: &str, digest: &str, body: &[u8], own_len: Option<usize>) -> u16 {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(&d.tcp).unwrap();
    let mut head = format!(
        "PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: lcached\r\nAuthorization: Bearer {token}\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(n) = own_len {
        head.push_str(&format!("x-lcache-length: {n}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

#[test]
fn gzipped_uploads_over_tcp_are_checked_as_the_bytes_they_inflate_to_and_bombs_keep_nothing() {
    let mut d = Daemon::start(&["--max-blob-size", "1M"]);
    let token = make_token(&d, "ci", "write");
    let mut tar = vec![0u8; 4096];
    tar[257..262].copy_from_slice(b"ustar");
    let digest = sha256_digest(&tar);
    let head = |digest: &str| d.http("HEAD", &format!("/v1/blobs/{digest}"), b"").0;
    // Garbage declared gzip; a good stream of other bytes; a stream cut short: refused,
    // nothing kept.
    assert_eq!(put_gzipped(&d, &token, &digest, b"not gzip at all", None), 400);
    assert_eq!(put_gzipped(&d, &token, &digest, &gzip(b"other bytes"), None), 400);
    let gz = gzip(&tar);
    assert_eq!(
        put_gzipped(&d, &token, &digest, &gz[..gz.len() - 10], Some(tar.len())),
        400
    );
    // Stating another length than it inflates to.
    assert_eq!(put_gzipped(&d, &token, &digest, &gz, Some(tar.len() + 1)), 400);
    assert_eq!(head(&digest), 404);
    // A bomb: 8 MiB of zeros in a few KiB, past --max-blob-size once inflated.
    let zeros = vec![0u8; 8 << 20];
    let bomb_digest = sha256_digest(&zeros);
    assert_eq!(put_gzipped(&d, &token, &bomb_digest, &gzip(&zeros), None), 413);
    assert_eq!(head(&bomb_digest), 404);
    assert!(d.alive());
    // The tar itself, gzipped: kept as the tar, and served as it.
    assert_eq!(put_gzipped(&d, &token, &digest, &gz, Some(tar.len())), 201);
    let (status, body) = d.http("GET", &format!("/v1/blobs/{digest}"), b"");
    assert_eq!((status, body), (200, tar));
}

/// A `POST /v1/layers/linked` body, and the digest of the blob it makes (`files` end to end).
fn linked_body(files: &[&std::path::Path]) -> (Vec<u8>, String) {
    let mut bytes = Vec::new();
    let mut listed = Vec::new();
    let mut runs = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let b = std::fs::read(f).unwrap();
        listed.push(serde_json::json!({"path": f.display().to_string(), "size": b.len()}));
        runs.push(serde_json::json!({"file": i, "offset": 0, "len": b.len()}));
        bytes.extend(b);
    }
    let body = serde_json::json!({"files": listed, "runs": runs, "marks": [bytes.len()]})
        .to_string()
        .into_bytes();
    (body, sha256_digest(&bytes))
}

const LINKED: &str = "/v1/layers/linked";

#[test]
fn a_layer_of_linked_files_is_taken_on_the_socket_only_and_one_that_lies_keeps_nothing() {
    let files = tempfile::tempdir().unwrap();
    let (a, b) = (files.path().join("a"), files.path().join("b"));
    std::fs::write(&a, b"the headers").unwrap();
    std::fs::write(&b, vec![7u8; 100_000]).unwrap();
    let d = Daemon::start(&[]);
    let token = make_token(&d, "ci", "write");
    let (body, digest) = linked_body(&[&a, &b]);
    // It names files of the daemon's machine: never over TCP.
    let (status, answer) = tcp_http(&d.tcp, "POST", LINKED, Some(&token), &body);
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(d.http("HEAD", &format!("/v1/blobs/{digest}"), b"").0, 404);
    // A file whose size is not the one stated, or that is gone: refused, nothing kept.
    let wrong = String::from_utf8(body.clone()).unwrap().replace("100000", "99999");
    let (status, answer) = d.http("POST", LINKED, wrong.as_bytes());
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
    let (missing, _) = linked_body(&[&a]);
    std::fs::remove_file(&a).unwrap();
    let (status, answer) = d.http("POST", LINKED, &missing);
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
    assert!(String::from_utf8_lossy(&answer).contains("no such file"));
    assert_eq!(std::fs::read_dir(d.store().join("blobs/packs")).unwrap().count(), 0);
    std::fs::write(&a, b"the headers").unwrap();
    // Named by what its bytes hash to, with the state asked for at its end.
    let (status, answer) = d.http("POST", LINKED, &body);
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));
    let named = json(&answer);
    assert_eq!(named["digest"], digest.as_str());
    assert_eq!(named["size"], 100_011);
    assert_eq!(named["blob_states"].as_array().unwrap().len(), 1);
    let (status, got) = d.http("GET", &format!("/v1/blobs/{digest}"), b"");
    assert_eq!((status, sha256_digest(&got)), (200, digest.clone()));
    // The client's names go; the store's links keep the bytes.
    drop(files);
    assert_eq!(d.http("HEAD", &format!("/v1/blobs/{digest}"), b"").0, 200);
}

#[test]
fn a_linked_layer_copied_onto_a_full_store_on_another_file_system_is_a_507_and_keeps_nothing() {
    // The store on a 4 MiB tmpfs, the files on the disk: linking fails across file
    // systems, the copy runs out of room.
    let (dir, store, _mounted) = store_on_tmpfs("4m");
    let mut d = Daemon::start_in(dir, &[]);
    let files = tempfile::tempdir_in("/var/tmp").unwrap();
    let big = files.path().join("big");
    std::fs::write(
        &big,
        (0..8u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let (body, _) = linked_body(&[&big]);
    let (status, answer) = d.http("POST", LINKED, &body);
    assert_eq!(status, 507, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(std::fs::read_dir(store.join("blobs/tmp")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(store.join("blobs/packs")).unwrap().count(), 0);
    assert!(d.alive());
    // A FIFO put where a file was named is copied from no more than it is linked: refused,
    // without waiting for a writer that never comes.
    let fifo = files.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let body = serde_json::json!({"files": [{"path": fifo.display().to_string(), "size": 0}], "runs": []});
    let (status, answer) = d.http("POST", LINKED, body.to_string().as_bytes());
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
    assert!(String::from_utf8_lossy(&answer).contains("not a regular file"));
    // One that fits is copied, and outlives the file it was copied from.
    let small = files.path().join("small");
    std::fs::write(&small, vec![3u8; 1 << 20]).unwrap();
    let (body, digest) = linked_body(&[&small]);
    assert_eq!(d.http("POST", LINKED, &body).0, 201);
    drop(files);
    let (status, got) = d.http("GET", &format!("/v1/blobs/{digest}"), b"");
    assert_eq!((status, sha256_digest(&got)), (200, digest));
}
