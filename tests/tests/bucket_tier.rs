//! An S3-compatible bucket as the tier behind runners' lcacheds (`--upstream s3://…`),
//! against a real S3 server on loopback: the Python `moto` server, started by the tests
//! (`scripts/setup` installs it). Runners share a bucket, a fresh runner gets every step
//! cached, concurrent writers keep one valid record, a server stopped mid-build degrades to
//! local,
//! and `lcache cache prune --upstream` prunes by age.

use lcache_e2e::{cached, BuildEnv, Project, S3Server};

/// A runner: its own lcached with `s3`'s bucket behind it.
fn runner(s3: &S3Server) -> BuildEnv {
    BuildEnv::with_daemon_env(&["--upstream", "s3://lcache-test/ci"], &s3.env())
}

/// The object keys under `prefix`.
fn keys(s3: &S3Server, prefix: &str) -> Vec<String> {
    let (_, body) = s3.http("GET", &format!("/lcache-test?list-type=2&prefix={prefix}"));
    body.split("<Key>")
        .skip(1)
        .filter_map(|k| k.split("</Key>").next())
        .map(str::to_string)
        .collect()
}

fn project() -> Project {
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY src/ /src/\nRUN cat /src/a.txt > /copied && echo built > /built\n",
    )
    .write("src/a.txt", "one\n");
    p
}

fn sync(env: &BuildEnv, p: &Project) -> std::process::Output {
    env.lcache(p, &["cache", "sync"])
}

#[test]
fn runners_share_a_bucket_and_a_fresh_runner_gets_every_step_cached() {
    let s3 = S3Server::start("lcache-test");
    let p = project();
    let a = runner(&s3);
    let (steps, image) = a.build(&p, &["-t", "team-app:1"]);
    assert_eq!(cached(&steps), [false, false]);
    let o = sync(&a, &p);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The layout docs/scale-out.md describes: the build's layers, kept as their tar, are
    // in the bucket gzipped, named by the tar's digest.
    let gzipped = keys(&s3, "ci/gzip/sha256/");
    let records = keys(&s3, "ci/records/_/");
    assert_eq!(records.len(), 2, "one record per step: {records:?}");
    assert_eq!(gzipped.len(), 2, "{gzipped:?}");
    for b in gzipped.iter().chain(&keys(&s3, "ci/blobs/sha256/")) {
        let parts: Vec<&str> = b.split('/').collect();
        assert_eq!(parts.len(), 5, "{b}");
        assert!(parts[4].starts_with(parts[3]) && parts[4].len() == 64, "{b}");
    }
    for g in &gzipped {
        let (status, gz) = s3.request("GET", &format!("/lcache-test/{g}"), b"");
        assert_eq!(status, 200);
        assert_eq!(gz[..2], [0x1f, 0x8b], "{g} is gzip");
        let tar = lcache_e2e::gunzip(&gz);
        assert!(gz.len() < tar.len(), "{g}: smaller than its tar");
        assert!(g.ends_with(&lcache_e2e::sha256_digest(&tar)["sha256:".len()..]));
    }

    let b = runner(&s3);
    let (steps, image_b) = b.build(&p, &[]);
    assert_eq!(
        cached(&steps),
        [true, true],
        "a fresh runner gets every step from the bucket"
    );
    assert_eq!(image_b, image, "and the same image");

    // The image name is shared too (in the background): another fresh runner builds FROM it.
    for _ in 0..200 {
        if keys(&s3, "ci/images/").len() >= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let c = runner(&s3);
    let q = Project::new();
    q.write("Dockerfile", "FROM team-app:1\nRUN cat /copied > /again\n");
    let (steps, _) = c.build(&q, &[]);
    assert_eq!(cached(&steps), [false], "built FROM an image another runner named");

    // Many writers at once, from scratch: all green, one record per key, and what the
    // bucket keeps serves a fresh runner.
    p.write("src/a.txt", "two\n");
    let runners: Vec<BuildEnv> = (0..3).map(|_| runner(&s3)).collect();
    std::thread::scope(|scope| {
        for r in &runners {
            let p = &p;
            scope.spawn(move || {
                let (steps, _) = r.build(p, &[]);
                assert_eq!(steps.len(), 2);
                let o = sync(r, p);
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            });
        }
    });
    // Two steps, the one built FROM the shared image, and the change's two.
    assert_eq!(
        keys(&s3, "ci/records/_/").len(),
        5,
        "one record per key, whoever wrote first"
    );
    let fresh = runner(&s3);
    assert_eq!(cached(&fresh.build(&p, &[]).0), [true, true]);
    assert!(keys(&s3, "ci/tmp/").is_empty(), "no half-written object is left around");

    // Prune: nothing is older than a day; everything is older than nothing (dry run).
    let prune = |age: &str, dry: bool| {
        let mut args = vec![
            "cache",
            "prune",
            "--upstream",
            "s3://lcache-test/ci",
            "--older-than",
            age,
        ];
        if dry {
            args.push("--dry-run");
        }
        let o = fresh.command(&p, &args).envs(s3.env()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(prune("1d", false).contains("removed 0 records, 0 images and 0 blobs"));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let said = prune("0s", true);
    assert!(said.contains("would remove 5 records, 2 images"), "{said}");
    assert_eq!(keys(&s3, "ci/records/_/").len(), 5, "a dry run removes nothing");
    prune("0s", false);
    assert!(
        keys(&s3, "ci/").is_empty(),
        "records unused for the age go, then their blobs"
    );
}

#[test]
fn a_bucket_an_older_lcached_filled_with_tar_layers_as_they_are_still_serves_them() {
    let s3 = S3Server::start("lcache-test");
    let p = project();
    let a = runner(&s3);
    let (_, image) = a.build(&p, &[]);
    assert!(sync(&a, &p).status.success());
    // What an lcached before gzip forms wrote: each tar layer as it is, under blobs/.
    let gzipped = keys(&s3, "ci/gzip/sha256/");
    assert_eq!(gzipped.len(), 2);
    for g in &gzipped {
        let (_, gz) = s3.request("GET", &format!("/lcache-test/{g}"), b"");
        let as_is = g.replacen("ci/gzip/", "ci/blobs/", 1);
        let (put, _) = s3.request("PUT", &format!("/lcache-test/{as_is}"), &lcache_e2e::gunzip(&gz));
        assert_eq!(put, 200);
        assert_eq!(s3.http("DELETE", &format!("/lcache-test/{g}")).0, 204);
    }
    let b = runner(&s3);
    let (steps, image_b) = b.build(&p, &[]);
    assert_eq!(cached(&steps), [true, true], "read from blobs/, as they are");
    assert_eq!(image_b, image);
}

#[test]
fn a_gzip_form_that_inflates_to_other_bytes_or_breaks_off_is_a_miss_not_a_poisoned_hit() {
    let s3 = S3Server::start("lcache-test");
    let p = project();
    let a = runner(&s3);
    a.build(&p, &[]);
    assert!(sync(&a, &p).status.success());
    let gzipped = keys(&s3, "ci/gzip/sha256/");
    assert_eq!(gzipped.len(), 2);
    // Whoever can write the bucket replaces the layers' gzip forms: one with the gzip of
    // other bytes, one with a gzip stream cut off.
    let (_, first) = s3.request("GET", &format!("/lcache-test/{}", gzipped[0]), b"");
    let other = {
        let mut tar = lcache_e2e::gunzip(&first);
        let mid = tar.len() / 2;
        tar[mid] ^= 0xff;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        gz.finish().unwrap()
    };
    s3.request("PUT", &format!("/lcache-test/{}", gzipped[0]), &other);
    let (_, second) = s3.request("GET", &format!("/lcache-test/{}", gzipped[1]), b"");
    s3.request(
        "PUT",
        &format!("/lcache-test/{}", gzipped[1]),
        &second[..second.len() / 2],
    );
    let b = runner(&s3);
    let (steps, _) = b.build(&p, &[]);
    assert_eq!(cached(&steps), [false, false], "misses, not poisoned hits");
    assert!(
        b.daemon.metric("lcache_upstream_errors_total") >= 1,
        "the bucket was read, and refused"
    );
    let (steps, _) = b.build(&p, &[]);
    assert_eq!(cached(&steps), [true, true], "what it built is kept");
}

#[test]
fn a_bucket_server_stopped_mid_build_degrades_to_local_and_sync_says_what_was_not_pushed() {
    let s3 = S3Server::start("lcache-test");
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY src/ /src/\nRUN sleep 2 && cat /src/a.txt > /copied\nRUN echo after > /after\n",
    )
    .write("src/a.txt", "one\n");
    let a = runner(&s3);
    a.build(&p, &[]);
    assert!(sync(&a, &p).status.success());
    p.write("src/a.txt", "changed while the bucket goes away\n");
    // The server stops while the RUN sleeps: the COPY before it was looked up (and
    // missed) with the server up; the RUN and what follows run with it gone.
    let steps = std::thread::scope(|scope| {
        let build = scope.spawn(|| a.build(&p, &[]).0);
        std::thread::sleep(std::time::Duration::from_millis(1200));
        drop(s3);
        build.join().unwrap()
    });
    assert_eq!(
        cached(&steps),
        [false, false, false],
        "the build is green without its bucket"
    );
    let (steps, _) = a.build(&p, &[]);
    assert_eq!(cached(&steps), [true, true, true], "and the local cache serves it");
    let o = sync(&a, &p);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("s3://lcache-test/ci"), "{err}");
}

#[test]
fn a_bucket_endpoint_that_takes_connections_and_never_answers_is_given_up_on() {
    let addr = lcache_e2e::silent_listener();
    let env: Vec<(String, String)> = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", &format!("http://{addr}")),
        ("AWS_ALLOW_HTTP", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let runner = BuildEnv::with_daemon_env(&["--upstream", "s3://lcache-test/ci", "--upstream-timeout", "2"], &env);
    let p = project();
    // Not a timing target: object_store's own limits kept each lookup for minutes.
    let (status, err) = runner.build_within(
        &p,
        std::time::Duration::from_secs(100),
        "the build waiting for the silent bucket",
    );
    assert!(status.success(), "{err}");
    let (again, _) = runner.build(&p, &[]);
    assert!(
        again.iter().all(|(_, hit)| *hit),
        "the local store serves the next build"
    );
}
