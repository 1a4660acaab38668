//! `ADD <url>` against a real HTTP server on loopback: the file lands as BuildKit lands it
//! (named after the URL, 0600), its content is in the key, a
//! rebuild revalidates with the ETag instead of downloading, `--checksum` is checked and
//! lets a rebuild skip the server altogether, and failures say what went wrong.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use lcache_e2e::{cached, BuildEnv, Project};

/// What the server serves, and what it was asked.
struct Served {
    body: Vec<u8>,
    etag: String,
    requests: usize,
    not_modified: usize,
}

/// Serves `/files/tool.sh` (with ETag and Last-Modified, answering 304 to a matching
/// If-None-Match), `/redirect` (302 to it), 404 for anything else.
fn serve() -> (String, Arc<Mutex<Served>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let state = Arc::new(Mutex::new(Served {
        body: b"#!/bin/sh\necho v1\n".to_vec(),
        etag: "\"v1\"".into(),
        requests: 0,
        not_modified: 0,
    }));
    let shared = state.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut if_none_match = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("if-none-match") {
                        if_none_match = Some(v.trim().to_string());
                    }
                }
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or_default().to_string();
            let mut s = shared.lock().unwrap();
            s.requests += 1;
            let head = |status: &str, extra: &str, len: usize| {
                format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n{extra}\r\n")
            };
            let reply: Vec<u8> = match path.as_str() {
                "/files/tool.sh" if if_none_match.as_deref() == Some(s.etag.as_str()) => {
                    s.not_modified += 1;
                    head("304 Not Modified", &format!("ETag: {}\r\n", s.etag), 0).into_bytes()
                }
                "/files/tool.sh" => {
                    let extra = format!("ETag: {}\r\nLast-Modified: Wed, 21 Oct 2015 07:28:00 GMT\r\n", s.etag);
                    let mut r = head("200 OK", &extra, s.body.len()).into_bytes();
                    r.extend_from_slice(&s.body);
                    r
                }
                "/redirect" => head("302 Found", "Location: /files/tool.sh\r\n", 0).into_bytes(),
                _ => head("404 Not Found", "", 0).into_bytes(),
            };
            drop(s);
            let _ = conn.write_all(&reply);
        }
    });
    (addr, state)
}

fn build_to(env: &BuildEnv, p: &Project, out: &Path) -> std::process::Output {
    let dest = format!("type=local,dest={}", out.display());
    env.lcache(p, &["build", "--progress", "plain", "--output", &dest, "."])
}

fn sha256_hex(data: &[u8]) -> String {
    lcache_e2e::sha256_digest(data)
        .trim_start_matches("sha256:")
        .to_string()
}

#[test]
fn add_url_downloads_as_buildkit_does_and_revalidates_instead_of_downloading() {
    let (addr, served) = serve();
    let env = BuildEnv::new();
    let p = Project::new();
    p.write(
        "Dockerfile",
        &format!(
            "FROM busybox\nADD http://{addr}/files/tool.sh /usr/local/bin/\n\
ADD --chmod=755 http://{addr}/redirect /bin/tool2\n"
        ),
    );
    let out = tempfile::tempdir().unwrap();
    let o = build_to(&env, &p, out.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tool = out.path().join("usr/local/bin/tool.sh");
    assert_eq!(std::fs::read(&tool).unwrap(), b"#!/bin/sh\necho v1\n");
    let meta = std::fs::metadata(&tool).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "a URL's file is 0600, as BuildKit makes it"
    );
    let tool2 = std::fs::metadata(out.path().join("bin/tool2")).unwrap();
    assert_eq!(
        tool2.permissions().mode() & 0o7777,
        0o755,
        "--chmod applies; redirects are followed"
    );

    // A rebuild asks the server whether the file changed (a 304 moves no bytes): cached.
    let before = served.lock().unwrap().not_modified;
    assert_eq!(cached(&env.build(&p, &[]).0), [true, true]);
    assert_eq!(
        served.lock().unwrap().not_modified,
        before + 2,
        "revalidated, not downloaded"
    );

    // The file changes on the server: both ADDs rebuild.
    {
        let mut s = served.lock().unwrap();
        s.body = b"#!/bin/sh\necho v2\n".to_vec();
        s.etag = "\"v2\"".into();
    }
    assert_eq!(cached(&env.build(&p, &[]).0), [false, false]);

    // A missing file fails at its line and says what the server answered.
    p.write(
        "Dockerfile",
        &format!("FROM busybox\nADD http://{addr}/files/missing.tgz /x\n"),
    );
    let o = env.try_build(&p, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("Dockerfile:2") && err.contains("404"),
        "{err}"
    );
    let unnamed_archive = out.path().join("x");
    assert!(!unnamed_archive.exists());
}

#[test]
fn add_checksum_is_checked_and_a_kept_download_needs_no_server() {
    let (addr, served) = serve();
    let env = BuildEnv::new();
    let p = Project::new();
    let body = served.lock().unwrap().body.clone();
    let url = format!("http://{addr}/files/tool.sh");
    p.write(
        "Dockerfile",
        &format!(
            "FROM busybox\nADD --checksum=sha256:{} {url} /tool\n",
            sha256_hex(&body)
        ),
    );
    let (steps, _) = env.build(&p, &[]);
    assert_eq!(cached(&steps), [false]);
    let asked = served.lock().unwrap().requests;
    assert_eq!(cached(&env.build(&p, &[]).0), [true]);
    assert_eq!(
        served.lock().unwrap().requests,
        asked,
        "the kept download has the checksum: no request at all"
    );
    // A wrong checksum fails, naming both digests, and caches nothing.
    p.write(
        "Dockerfile",
        &format!("FROM busybox\nADD --checksum=sha256:{} {url} /tool\n", "0".repeat(64)),
    );
    let o = env.try_build(&p, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("does not match --checksum") && err.contains(&sha256_hex(&body)),
        "{err}"
    );
    // Nothing listens: the error names the URL and what to do.
    p.write("Dockerfile", "FROM busybox\nADD http://127.0.0.1:9/tool.sh /tool\n");
    let o = env.try_build(&p, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cannot download http://127.0.0.1:9/tool.sh") && err.contains("COPY it"),
        "{err}"
    );
}
