//! CI runners sharing one cache: real lcached daemons on loopback, each runner's daemon
//! with `--upstream` pointing at a shared one over TCP with a token.

use std::path::Path;

use lcache_e2e::{blobs_kept_as_runs, cached, make_token, own_bytes, BuildEnv, Daemon, Project};

const DOCKERFILE: &str =
    "FROM busybox\nCOPY src /src\nRUN cat /src/a.txt /src/b.txt > /joined\nWORKDIR /app\nRUN echo built > /app/out\n";

fn project() -> Project {
    let p = Project::new();
    p.write("Dockerfile", DOCKERFILE)
        .write("src/a.txt", "alpha\n")
        .write("src/b.txt", "bravo\n");
    p
}

/// A runner: a daemon of its own (fresh store and client cache) whose upstream is `shared`.
fn runner(shared: &Daemon, token: &str, dir: &Path, name: &str) -> BuildEnv {
    runner_at(&shared.tcp, token, dir, name)
}

/// A runner whose upstream is the lcached at `addr` (host:port).
fn runner_at(addr: &str, token: &str, dir: &Path, name: &str) -> BuildEnv {
    let file = dir.join(format!("{name}.token"));
    std::fs::write(&file, token).unwrap();
    let upstream = format!("tcp://{addr}");
    BuildEnv::with_daemon_args(&["--upstream", &upstream, "--upstream-token-file", file.to_str().unwrap()])
}

/// A TCP proxy on loopback to `target` that counts the bytes it passes, both ways.
fn counting_proxy(target: &str) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicU64::new(0));
    let (target, counted) = (target.to_string(), count.clone());
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = std::io::Read::read(&mut from, &mut buf) {
                        if n == 0 || std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                            break;
                        }
                        counted.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (addr, count)
}

fn steps_in(d: &Daemon) -> u64 {
    let (_, body) = d.http("GET", "/v1/status", b"");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["stats"]["steps"].as_u64().unwrap()
}

fn sync(env: &BuildEnv, p: &Project) -> std::process::Output {
    env.lcache(p, &["cache", "sync"])
}

#[test]
fn a_fresh_runner_gets_every_step_from_the_shared_cache_and_a_read_only_one_adds_nothing() {
    let shared = Daemon::start(&[]);
    let tokens = tempfile::tempdir().unwrap();
    let write = make_token(&shared, "runners", "write");
    let p = project();

    // Runner A builds and pushes.
    let a = runner(&shared, &write, tokens.path(), "a");
    let (steps, image_a) = a.build(&p, &[]);
    assert_eq!(cached(&steps), [false; 4]);
    let out = sync(&a, &p);
    assert!(out.status.success(), "sync: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(steps_in(&shared), 4, "every step record reached the shared cache");

    // Runner B, fresh store and cache, same upstream: nothing runs, the image is the same.
    let b = runner(&shared, &write, tokens.path(), "b");
    let summary = tokens.path().join("summary.json");
    let (steps, image_b) = b.build(&p, &["--summary-json", summary.to_str().unwrap()]);
    assert_eq!(cached(&steps), [true; 4], "{steps:?}");
    assert_eq!(image_a, image_b, "byte-identical layers, so the same image");
    // What a CI dashboard reads: all hits, time saved, the layers fetched, nothing stored
    // but the image's config and manifest.
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(
        (s["hit_rate"].as_f64(), s["built"].as_u64()),
        (Some(1.0), Some(0)),
        "{s}"
    );
    assert!(s["bytes_fetched"].as_u64().unwrap() > 0, "{s}");
    assert!(s["bytes_stored"].as_u64().unwrap() < 4096, "{s}");
    assert_eq!(s["image"], image_b.as_str());

    // A read-only runner rebuilds what an edit changed and the shared cache gains nothing.
    let read = make_token(&shared, "forks", "read");
    let c = runner(&shared, &read, tokens.path(), "c");
    p.write("src/b.txt", "changed\n");
    let (steps, _) = c.build(&p, &[]);
    assert_eq!(cached(&steps), [false, false, false, false]);
    let out = sync(&c, &p);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(steps_in(&shared), 4, "a read token stores nothing upstream");
}

#[test]
fn an_unreachable_upstream_degrades_to_local_and_sync_says_what_was_not_pushed() {
    let tokens = tempfile::tempdir().unwrap();
    let shared = Daemon::start(&[]);
    let write = make_token(&shared, "runners", "write");
    let env = runner(&shared, &write, tokens.path(), "a");
    // The shared cache goes away before the build.
    drop(shared);
    let p = project();
    let (steps, _) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false; 4], "the build ran, green, from the local store");
    let (again, _) = env.build(&p, &[]);
    assert_eq!(cached(&again), [true; 4], "and the local store serves the next one");
    let out = sync(&env, &p);
    assert!(!out.status.success(), "sync must fail when records could not be pushed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not pushed") && err.contains("reachable"), "{err}");
}

#[test]
fn an_upstream_that_accepts_and_never_answers_is_given_up_on_and_the_build_runs() {
    // A shared cache that is overloaded, or half-dead behind a load balancer: connections
    // are taken and nothing ever comes back.
    let addr = lcache_e2e::silent_listener();
    let upstream = format!("tcp://{addr}");
    let env = BuildEnv::with_daemon_args(&["--upstream", &upstream, "--upstream-timeout", "2"]);
    let p = project();
    // Not a timing target: without a deadline the build waited for ever.
    let (status, err) = env.build_within(
        &p,
        std::time::Duration::from_secs(180),
        "the build waiting for the silent upstream",
    );
    assert!(status.success(), "{err}");
    // Given up on once: the lookups after it skip it rather than wait again.
    assert!(env.daemon.metric("lcache_upstream_skipped_total") >= 1);
    // `lcache explain` names the shared cache as the first miss's cause, not "never built".
    let explained = env.lcache(&p, &["explain", "--json"]);
    let explained: serde_json::Value = serde_json::from_slice(&explained.stdout).unwrap();
    let first = explained["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| !s["cause"].is_null())
        .unwrap();
    let cause = first["cause"]["upstream_unavailable"]["upstream"]
        .as_str()
        .unwrap_or_default();
    assert!(cause.contains(&upstream), "{first}");
    let said = String::from_utf8_lossy(&env.lcache(&p, &["explain"]).stdout).to_string();
    assert!(said.contains("the shared cache could not be asked: "), "{said}");
    // And `lcache status` says why.
    let out = env.lcache(&p, &["status"]);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(&format!("upstream   {upstream} — ")) && status.contains("stopped answering"),
        "{status}"
    );
    let (again, _) = env.build(&p, &[]);
    assert_eq!(cached(&again), [true; 4], "the local store serves the next build");
}

#[test]
fn what_a_hostile_upstream_sends_in_its_errors_reaches_no_terminal_raw() {
    // An upstream that answers every request with a 500 whose body clears the screen.
    let hostile = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hostile.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in hostile.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let body = "\u{1b}[2J\u{1b}[31mall is well\u{1b}[0m";
                let _ = write!(
                    conn,
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    let upstream = format!("tcp://{addr}");
    let env = BuildEnv::with_daemon_args(&["--upstream", &upstream]);
    let p = project();
    env.build(&p, &[]);
    let status = env.lcache(&p, &["status"]).stdout;
    let explained = env.lcache(&p, &["explain"]).stdout;
    for (what, out) in [("status", &status), ("explain", &explained)] {
        assert!(!out.contains(&0x1b), "{what}: {}", String::from_utf8_lossy(out));
    }
    assert!(String::from_utf8_lossy(&status).contains("\\u{1b}[2J"), "shown escaped");
}

/// A self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem) in `dir`.
fn certificate(dir: &Path) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

#[test]
fn runners_reach_the_shared_cache_over_tls_trusting_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let shared = Daemon::start(&[
        "--listen",
        "https://127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let https = format!("https://{}", shared.https.clone().expect("an https listener"));
    let write = make_token(&shared, "runners", "write");
    let token_file = dir.path().join("runner.token");
    std::fs::write(&token_file, &write).unwrap();
    let token_file = token_file.display().to_string();

    // A runner's daemon reaches it over TLS, trusting its CA, and pushes what it builds.
    let a = BuildEnv::with_daemon_args(&[
        "--upstream",
        &https,
        "--upstream-token-file",
        &token_file,
        "--upstream-ca",
        &cert,
    ]);
    let p = project();
    a.build(&p, &[]);
    let out = sync(&a, &p);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(steps_in(&shared), 4);

    // The client speaks TLS too; without the CA it refuses the certificate, saying so.
    let status = |extra: &[&str]| {
        let mut c = std::process::Command::new(lcache_e2e::bin("lcache"));
        c.args(["status", "--daemon", &https, "--token-file", &token_file])
            .args(extra);
        c.output().unwrap()
    };
    let ok = status(&["--ca-file", &cert]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let refused = status(&["--ca-file", "/etc/ssl/certs/ca-certificates.crt"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("TLS") && err.contains("certificate"), "{err}");
    // Plain HTTP to the TLS port is no way in either.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(shared.https.as_deref().unwrap()).unwrap();
    let _ = write!(
        s,
        "GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {write}\r\n\r\n"
    );
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
}

#[test]
fn a_pull_request_reads_main_through_its_scope_and_writes_only_its_own() {
    let shared = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let main_token = make_token_scoped(&shared, "main-ci", "main");
    let pr_token = make_token_scoped(&shared, "pr-ci", "pr-*");
    let p = project();

    // main's pipeline fills scope `main`.
    let m = runner(&shared, &main_token, dir.path(), "m");
    let (steps, _) = m.build(&p, &["--scope", "main"]);
    assert_eq!(cached(&steps), [false; 4]);
    assert!(sync(&m, &p).status.success());

    // A pull request's runner looks in pr-7, then main: everything is there.
    let pr = runner(&shared, &pr_token, dir.path(), "pr");
    let (steps, _) = pr.build(&p, &["--scope", "pr-7", "--scope-fallback", "main"]);
    assert_eq!(cached(&steps), [true; 4], "{steps:?}");
    // Its own edit is stored in pr-7 (pushed with its scoped token), never in main.
    p.write("src/b.txt", "pull request change\n");
    let (steps, _) = pr.build(&p, &["--scope", "pr-7", "--scope-fallback", "main"]);
    assert_eq!(cached(&steps), [false; 4]);
    let out = sync(&pr, &p);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fresh_main = runner(&shared, &main_token, dir.path(), "m2");
    let (steps, _) = fresh_main.build(&p, &["--scope", "main"]);
    assert_eq!(
        cached(&steps),
        [false; 4],
        "main does not see the pull request's records"
    );
    let fresh_pr = runner(&shared, &pr_token, dir.path(), "pr2");
    let (steps, _) = fresh_pr.build(&p, &["--scope", "pr-7", "--scope-fallback", "main"]);
    assert_eq!(cached(&steps), [true; 4], "but the next run of the pull request does");

    // The pull request's token writes nothing outside pr-*: not main, not images.
    let key = format!("{:064x}", 77);
    let rec = format!(r#"{{"key":"{key}","layer":null,"duration_ms":1}}"#);
    let put = |q: &str| {
        lcache_e2e::tcp_http(
            &shared.tcp,
            "PUT",
            &format!("/v1/steps/{key}{q}"),
            Some(&pr_token),
            rec.as_bytes(),
        )
    };
    let (status, body) = put("?scope=main");
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert_eq!(put("").0, 403, "nor unscoped records");
    assert_eq!(put("?scope=pr-8").0, 201);
    let image = lcache_e2e::tcp_http(&shared.tcp, "PUT", "/v1/images/base:1", Some(&pr_token), b"{}");
    assert_eq!(image.0, 403, "nor image names");
    let (_, metrics) = shared.http("GET", "/metrics", b"");
    assert!(String::from_utf8_lossy(&metrics).contains(r#"lcache_scope_lookups_total{scope="pr-7",result="hit"}"#));
}

/// A write token limited to scopes matching `pattern`.
fn make_token_scoped(d: &Daemon, name: &str, pattern: &str) -> String {
    let (status, body) = d.http(
        "POST",
        "/v1/tokens",
        format!(r#"{{"name":"{name}","access":"write","scope":"{pattern}"}}"#).as_bytes(),
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["token"].as_str().unwrap().to_string()
}

#[test]
fn a_layer_the_upstream_serves_corrupt_is_refused_and_nothing_is_kept() {
    let shared = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let read = make_token(&shared, "runner", "read");
    let content = vec![7u8; 4096];
    let digest = lcache_e2e::sha256_digest(&content);
    assert_eq!(shared.http("PUT", &format!("/v1/blobs/{digest}"), &content).0, 201);
    let key = format!("{:064x}", 5);
    let rec = format!(r#"{{"key":"{key}","layer":{{"digest":"{digest}","media_type":"m"}},"duration_ms":1}}"#);
    assert_eq!(shared.http("PUT", &format!("/v1/steps/{key}"), rec.as_bytes()).0, 201);
    // The upstream's copy rots on its disk: same length, other bytes.
    let hex = digest.trim_start_matches("sha256:");
    std::fs::write(shared.store().join("blobs/sha256").join(hex), vec![8u8; 4096]).unwrap();
    let token_file = dir.path().join("t");
    std::fs::write(&token_file, &read).unwrap();
    let runner = Daemon::start(&[
        "--upstream",
        &format!("tcp://{}", shared.tcp),
        "--upstream-token-file",
        token_file.to_str().unwrap(),
    ]);
    assert_eq!(
        runner.http("GET", &format!("/v1/steps/{key}"), b"").0,
        404,
        "a miss, not a poisoned hit"
    );
    assert_eq!(
        runner.http("HEAD", &format!("/v1/blobs/{digest}"), b"").0,
        404,
        "nothing kept"
    );
    let (_, metrics) = runner.http("GET", "/metrics", b"");
    assert!(String::from_utf8_lossy(&metrics).contains("lcache_upstream_errors_total 1"));
}

/// A shared cache, where runner tokens are kept, a write token, a project whose one COPY
/// layer is several segments, and runner `a`, which has built and pushed it.
fn segmented_layer_pushed() -> (Daemon, tempfile::TempDir, String, Project, BuildEnv) {
    segmented_layer_pushed_with(&[])
}

/// [`segmented_layer_pushed`], built with `extra` arguments.
fn segmented_layer_pushed_with(extra: &[&str]) -> (Daemon, tempfile::TempDir, String, Project, BuildEnv) {
    let shared = Daemon::start(&[]);
    let tokens = tempfile::tempdir().unwrap();
    let write = make_token(&shared, "runners", "write");
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nCOPY src /app/\n")
        .write_many("src", 3000);
    let a = runner(&shared, &write, tokens.path(), "a");
    a.build(&p, extra);
    assert!(sync(&a, &p).status.success());
    (shared, tokens, write, p, a)
}

/// The size of the largest blob `store` keeps whole: the layer before an edit.
fn largest_whole_blob(store: &Path) -> u64 {
    std::fs::read_dir(store.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .max()
        .unwrap()
}

#[test]
fn a_runner_sends_the_shared_cache_only_the_members_an_edit_changed() {
    let (shared, tokens, write, p, a) = segmented_layer_pushed();
    let layer = largest_whole_blob(&shared.store());

    // The edit's blob reaches the shared cache as parts of the one it has: the shared
    // lcached keeps it as runs, having been sent only the changed members.
    p.write("src/f1700.txt", "edited\n");
    let (steps, image) = a.build(&p, &[]);
    assert_eq!(cached(&steps), [false]);
    let out = sync(&a, &p);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let runs = blobs_kept_as_runs(&shared.store());
    assert_eq!(runs.len(), 1, "the edited layer is kept as runs upstream too");
    let added = own_bytes(&runs[0]);
    assert!(added * 4 < layer, "{added} bytes stored for a layer of {layer}");

    // A fresh runner reads it through, whole and verified: the same image.
    let b = runner(&shared, &write, tokens.path(), "b");
    let (steps, again) = b.build(&p, &[]);
    assert_eq!(cached(&steps), [true]);
    assert_eq!(image, again);
}

#[test]
fn layers_kept_as_their_tar_go_through_the_shared_cache_edits_as_parts() {
    let none = ["--layer-compression", "none"];
    let (shared, tokens, write, p, a) = segmented_layer_pushed_with(&none);
    let layer = largest_whole_blob(&shared.store());
    p.write("src/f1700.txt", "edited\n");
    let (steps, image) = a.build(&p, &none);
    assert_eq!(cached(&steps), [false]);
    assert!(sync(&a, &p).status.success());
    let runs = blobs_kept_as_runs(&shared.store());
    assert_eq!(runs.len(), 1, "the edited tar is kept as runs upstream too");
    let added = own_bytes(&runs[0]);
    assert!(added * 4 < layer, "{added} bytes stored for a layer of {layer}");
    // The shared blob is the tar itself, named by it.
    let hex = runs[0].file_name().unwrap().to_str().unwrap().to_string();
    let b = runner(&shared, &write, tokens.path(), "b");
    let (steps, again) = b.build(&p, &[]);
    assert_eq!(cached(&steps), [true]);
    assert_eq!(image, again);
    let fetched = std::fs::read(b.daemon.store().join("blobs/sha256").join(&hex)).unwrap();
    assert_eq!(&fetched[257..262], b"ustar", "a tar, not gzip");
}

#[test]
fn tar_layers_travel_gzipped_between_lcacheds_and_are_kept_as_tar() {
    use std::sync::atomic::Ordering;
    let shared = Daemon::start(&[]);
    let (proxy, wire) = counting_proxy(&shared.tcp);
    let tokens = tempfile::tempdir().unwrap();
    let write = make_token(&shared, "runners", "write");
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nCOPY src /app/\n")
        .write_many("src", 3000);
    let a = runner_at(&proxy, &write, tokens.path(), "a");
    let (_, image) = a.build(&p, &["--layer-compression", "none"]);
    assert!(sync(&a, &p).status.success());
    // The shared lcached keeps the tar, named by it; what crossed the wire was gzip.
    let layer = largest_whole_blob(&shared.store());
    let tar = std::fs::read_dir(shared.store().join("blobs/sha256"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap_or_default())
        .find(|b| b.len() as u64 == layer)
        .unwrap();
    assert_eq!(&tar[257..262], b"ustar");
    let sent = wire.swap(0, Ordering::Relaxed);
    assert!(
        sent * 10 < layer * 7,
        "{sent} bytes crossed the wire for a {layer}-byte tar"
    );

    // A fresh runner fetches it gzipped and keeps the tar: the same image.
    let b = runner_at(&proxy, &write, tokens.path(), "b");
    let (steps, again) = b.build(&p, &[]);
    assert_eq!(cached(&steps), [true]);
    assert_eq!(image, again);
    let fetched = wire.load(Ordering::Relaxed);
    assert!(
        fetched * 10 < layer * 7,
        "{fetched} bytes crossed the wire for a {layer}-byte tar"
    );
}

#[test]
fn a_tar_layer_refused_gzipped_by_an_older_upstream_is_sent_as_it_is() {
    let shared = Daemon::start_env(
        tempfile::tempdir().unwrap(),
        &[],
        &[("LCACHED_TEST_NO_TRANSIT_GZIP".into(), "1".into())],
    );
    let tokens = tempfile::tempdir().unwrap();
    let write = make_token(&shared, "runners", "write");
    let p = Project::new();
    p.write("Dockerfile", "FROM busybox\nCOPY src /app/\n")
        .write_many("src", 300);
    let a = runner(&shared, &write, tokens.path(), "a");
    let (_, image) = a.build(&p, &["--layer-compression", "none"]);
    let out = sync(&a, &p);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(steps_in(&shared), 1);
    let b = runner(&shared, &write, tokens.path(), "b");
    let (steps, again) = b.build(&p, &[]);
    assert_eq!(cached(&steps), [true]);
    assert_eq!(image, again);
}

#[test]
fn a_runner_with_the_last_layer_fetches_only_the_members_an_edit_changed() {
    let (shared, tokens, write, p, a) = segmented_layer_pushed();
    let b = runner(&shared, &write, tokens.path(), "b");
    // B reads the first layer through, whole.
    let (steps, _) = b.build(&p, &[]);
    assert_eq!(cached(&steps), [true]);
    assert!(blobs_kept_as_runs(&b.daemon.store()).is_empty());

    // A edits and pushes (as parts); B, holding the layer the edit's is made over, is sent
    // only the changed members and keeps the new layer as runs, verified whole.
    p.write("src/f1700.txt", "edited\n");
    let (_, image) = a.build(&p, &[]);
    assert!(sync(&a, &p).status.success());
    let (steps, again) = b.build(&p, &[]);
    assert_eq!(cached(&steps), [true]);
    assert_eq!(image, again);
    let runs = blobs_kept_as_runs(&b.daemon.store());
    assert_eq!(runs.len(), 1, "the edited layer came as parts");
    let whole = largest_whole_blob(&b.daemon.store());
    let added = own_bytes(&runs[0]);
    assert!(added * 4 < whole, "{added} bytes fetched for a layer of {whole}");
}

#[test]
fn a_step_whose_image_lcached_names_after_the_build_reaches_the_shared_cache() {
    let (shared, tokens, write, p, a) = segmented_layer_pushed();
    // A's build ends before its image is named: A's lcached stores the step's record once
    // the diff_id is known, and pushes it up as any other (`cache sync` waits for it).
    p.write("src/f1700.txt", "edited\n");
    let out = a.try_build(&p, &["--name-image", "later", "-t", "app:edit"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""image":"""#));
    let out = sync(&a, &p);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(steps_in(&shared), 2, "the edit's record reached the shared cache");
    let (_, named) = a.daemon.http("GET", "/v1/images/app:edit", b"");
    let named: serde_json::Value = serde_json::from_slice(&named).unwrap();

    // A fresh runner gets the step from there, and makes the image A's lcached named.
    let b = runner(&shared, &write, tokens.path(), "b");
    let (steps, image) = b.build(&p, &[]);
    assert_eq!(cached(&steps), [true]);
    assert_eq!(named["manifest_digest"], image.as_str());
}
