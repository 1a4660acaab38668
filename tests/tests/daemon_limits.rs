//! lcached under clients that are slow, idle, greedy or careless with paths: it cuts them
//! off, keeps nothing they half-sent, keeps serving everyone else, and never deletes or
//! exposes what is not its own.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use lcache_e2e::{sha256_digest, spawn_daemon, Daemon};

fn connect(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Reads until the daemon closes the connection; the response text (empty if none).
fn read_all(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let d = Daemon::start(&["--header-timeout", "1"]);
    let mut s = connect(&d);
    s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n").unwrap();
    let answer = read_all(&mut s);
    assert!(!answer.contains("200 OK"), "{answer}");
    // The daemon closed the connection (read_to_end returned) and still serves others.
    assert_eq!(d.http("GET", "/v1/status", b"").0, 200);
}

#[test]
fn an_upload_that_stalls_is_dropped_and_nothing_is_kept() {
    let d = Daemon::start(&["--body-timeout", "1"]);
    let data = vec![7u8; 100];
    let digest = sha256_digest(&data);
    let mut s = connect(&d);
    let head = format!("PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&data[..10]).unwrap();
    let answer = read_all(&mut s);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("nothing was stored"), "{answer}");
    assert_eq!(d.http("HEAD", &format!("/v1/blobs/{digest}"), b"").0, 404);
}

#[test]
fn a_chunked_upload_over_the_size_limit_is_refused_and_nothing_is_kept() {
    let d = Daemon::start(&["--max-blob-size", "1K"]);
    let data = vec![1u8; 4096];
    let digest = sha256_digest(&data);
    let mut s = connect(&d);
    let head = format!("PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    for chunk in data.chunks(512) {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).is_err()
            || s.write_all(chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break; // refused mid-body: the daemon may close before reading the rest
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let answer = read_all(&mut s);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("--max-blob-size"), "{answer}");
    assert_eq!(d.http("HEAD", &format!("/v1/blobs/{digest}"), b"").0, 404);
    // A declared length over the limit is refused before any byte is read.
    let (status, body) = lcache_e2e::raw_http(&d.socket, "PUT", &format!("/v1/blobs/{digest}"), &data, None);
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn connections_over_the_limit_wait_until_a_slot_frees() {
    let d = Daemon::start(&["--max-connections", "2"]);
    let a = connect(&d);
    let b = connect(&d);
    // Both slots are held by clients that say nothing; give the daemon time to accept them.
    std::thread::sleep(Duration::from_millis(300));
    let mut c = connect(&d);
    c.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    c.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let early = c.read(&mut buf);
    assert!(
        early.is_err(),
        "a third connection was served while two held the only slots"
    );
    drop(a);
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let answer = read_all(&mut c);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(b);
}

#[test]
fn listen_never_deletes_a_file_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let err = spawn_daemon(dir.path(), &precious, &[]).unwrap_err();
    assert!(
        err.contains("is not a socket") && err.contains("will not delete it"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
}

#[test]
fn the_store_and_the_socket_are_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = Daemon::start_in(dir, &[]);
    let data = b"blob".to_vec();
    assert_eq!(
        d.http("PUT", &format!("/v1/blobs/{}", sha256_digest(&data)), &data).0,
        201
    );
    assert_eq!(std::fs::metadata(d.store()).unwrap().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(&d.socket).unwrap().mode() & 0o777, 0o600);
    let blob = d
        .store()
        .join("blobs/sha256")
        .join(sha256_digest(&data).trim_start_matches("sha256:"));
    assert_eq!(
        std::fs::metadata(blob).unwrap().mode() & 0o077,
        0,
        "blobs are owner-only"
    );
}

#[test]
fn image_lists_are_paged() {
    let d = Daemon::start(&[]);
    let (status, body) = d.http("GET", "/v1/images?limit=x", b"");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, body) = d.http("GET", "/v1/images?limit=5&after=zzz", b"");
    assert_eq!((status, body.as_slice()), (200, &b"[]"[..]));
}

/// An lcached whose upstream takes connections and never answers, holding one pushed
/// record (so stopping waits on the upstream queue), with `extra` arguments; and its
/// stderr as it comes.
fn daemon_stuck_on_its_upstream(
    dir: &std::path::Path,
    extra: &[&str],
) -> (std::process::Child, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::io::BufRead;
    let upstream = format!("tcp://{}", lcache_e2e::silent_listener());
    let socket = dir.join("s.sock");
    let mut child = std::process::Command::new(lcache_e2e::bin("lcached"))
        .args(["--listen", &format!("unix://{}", socket.display())])
        .args(["--store", dir.join("store").to_str().unwrap()])
        .args(["--upstream", &upstream, "--upstream-timeout", "600"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    assert!(
        lines.by_ref().any(|l| l.unwrap().starts_with("lcached: store ")),
        "lcached did not start"
    );
    std::thread::spawn(move || for _ in lines {});
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn({
        let log = log.clone();
        move || {
            for line in stderr.lines().map_while(Result::ok) {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
    let blob = b"a layer".to_vec();
    let digest = sha256_digest(&blob);
    let put = |path: &str, body: &[u8]| lcache_e2e::raw_http(&socket, "PUT", path, body, None).0;
    assert_eq!(put(&format!("/v1/blobs/{digest}"), &blob), 201);
    let key = format!("{:064x}", 0x5709);
    let record = serde_json::json!({"key": key, "layer": {"digest": digest, "media_type": "application/vnd.oci.image.layer.v1.tar"}, "duration_ms": 1, "inputs": null});
    assert_eq!(put(&format!("/v1/steps/{key}"), record.to_string().as_bytes()), 201);
    (child, log)
}

/// Waits (a liveness bound, not a timing target) until `log` holds `text`.
fn wait_logged(log: &std::sync::Mutex<String>, text: &str) {
    let started = std::time::Instant::now();
    while !log.lock().unwrap().contains(text) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "lcached never logged '{text}': {}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &std::process::Child, sig: nix::libc::c_int) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { nix::libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn a_daemon_that_cannot_finish_stopping_exits_once_its_stop_timeout_passes() {
    let dir = tempfile::tempdir().unwrap();
    // The upstream queue would hold the stop for its 30 s drain; the watchdog ends it at 1 s.
    let (mut child, log) = daemon_stuck_on_its_upstream(dir.path(), &["--stop-timeout", "1"]);
    signal(&child, nix::libc::SIGTERM);
    let status = lcache_e2e::exits_within(&mut child, Duration::from_secs(60), "lcached after SIGTERM");
    wait_logged(&log, "still running 1 s after the signal; exiting now");
    assert!(!status.success());
    // What it acknowledged is there after a restart.
    let d = Daemon::start_in(dir, &[]);
    assert_eq!(d.http("GET", &format!("/v1/steps/{:064x}", 0x5709), b"").0, 200);
}

#[test]
fn a_second_signal_stops_the_daemon_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, log) = daemon_stuck_on_its_upstream(dir.path(), &[]);
    signal(&child, nix::libc::SIGINT);
    // Two signals sent back to back may reach the process as one.
    wait_logged(&log, "a second signal exits at once");
    signal(&child, nix::libc::SIGINT);
    lcache_e2e::exits_within(&mut child, Duration::from_secs(60), "lcached after a second SIGINT");
    wait_logged(&log, "a second signal; exiting now");
}
