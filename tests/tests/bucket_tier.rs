//! An S3-compatible bucket as the tier behind runners' lcacheds (`--upstream s3://…`),
//! against a real S3 server on loopback: the Python `moto` server, started by the tests
//! (`scripts/setup` installs it). Runners share a bucket, a fresh runner gets every step
//! cached, concurrent writers keep one valid record, a server stopped mid-build degrades to
//! local,
//! and `lcache cache prune --upstream` prunes by age.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};

use lcache_e2e::{cached, BuildEnv, Project};

/// A running moto server with one bucket, stopped when dropped.
struct S3Server {
    child: Child,
    addr: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw HTTP request to `addr`; the status and body.
fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

impl S3Server {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 with moto (pip install 'moto[server]'; scripts/setup installs it)");
        for _ in 0..400 {
            if TcpStream::connect(&addr).is_ok() {
                let (status, body) = http(&addr, "PUT", "/lcache-test");
                assert_eq!(status, 200, "create the bucket: {body}");
                return Self { child, addr };
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("moto_server did not start on {addr}");
    }

    /// The environment a daemon needs to use the bucket.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", &format!("http://{}", self.addr)),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// A runner: its own lcached with the bucket behind it.
    fn runner(&self) -> BuildEnv {
        BuildEnv::with_daemon_env(&["--upstream", "s3://lcache-test/ci"], &self.env())
    }

    /// The object keys under `prefix`.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let (_, body) = http(&self.addr, "GET", &format!("/lcache-test?list-type=2&prefix={prefix}"));
        body.split("<Key>")
            .skip(1)
            .filter_map(|k| k.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
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
    let s3 = S3Server::start();
    let p = project();
    let a = s3.runner();
    let (steps, image) = a.build(&p, &[]);
    assert_eq!(cached(&steps), [false, false]);
    let o = sync(&a, &p);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The layout docs/scale-out.md describes.
    let blobs = s3.keys("ci/blobs/sha256/");
    let records = s3.keys("ci/records/_/");
    assert_eq!(records.len(), 2, "one record per step: {records:?}");
    assert!(blobs.len() >= 2, "{blobs:?}");
    for b in &blobs {
        let parts: Vec<&str> = b.split('/').collect();
        assert_eq!(parts.len(), 5, "{b}");
        assert!(parts[4].starts_with(parts[3]) && parts[4].len() == 64, "{b}");
    }

    let b = s3.runner();
    let (steps, image_b) = b.build(&p, &[]);
    assert_eq!(
        cached(&steps),
        [true, true],
        "a fresh runner gets every step from the bucket"
    );
    assert_eq!(image_b, image, "and the same image");

    // Many writers at once, from scratch: all green, one record per key, and what the
    // bucket keeps serves a fresh runner.
    p.write("src/a.txt", "two\n");
    let runners: Vec<BuildEnv> = (0..3).map(|_| s3.runner()).collect();
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
    assert_eq!(
        s3.keys("ci/records/_/").len(),
        4,
        "one record per key, whoever wrote first"
    );
    let fresh = s3.runner();
    assert_eq!(cached(&fresh.build(&p, &[]).0), [true, true]);
    assert!(s3.keys("ci/tmp/").is_empty(), "no half-written object is left around");

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
    assert!(prune("1d", false).contains("removed 0 records and 0 blobs"));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let said = prune("0s", true);
    assert!(said.contains("would remove 4 records"), "{said}");
    assert_eq!(s3.keys("ci/records/_/").len(), 4, "a dry run removes nothing");
    prune("0s", false);
    assert!(
        s3.keys("ci/").is_empty(),
        "records unused for the age go, then their blobs"
    );
}

#[test]
fn a_bucket_server_stopped_mid_build_degrades_to_local_and_sync_says_what_was_not_pushed() {
    let s3 = S3Server::start();
    let p = Project::new();
    p.write(
        "Dockerfile",
        "FROM busybox\nCOPY src/ /src/\nRUN sleep 2 && cat /src/a.txt > /copied\nRUN echo after > /after\n",
    )
    .write("src/a.txt", "one\n");
    let a = s3.runner();
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
    assert_eq!(cached(&steps), [false, false, false], "the build is green without its bucket");
    let (steps, _) = a.build(&p, &[]);
    assert_eq!(cached(&steps), [true, true, true], "and the local cache serves it");
    let o = sync(&a, &p);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("s3://lcache-test/ci"), "{err}");
}
