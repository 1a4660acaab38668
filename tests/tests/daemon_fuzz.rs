//! Fuzzing lcached's HTTP layer through its real socket: request lines, headers, bodies and
//! raw bytes from a property generator. Whatever arrives, the daemon answers or hangs up,
//! never dies, keeps nothing it was not sent whole, and serves the next client.
//! `LCACHE_FUZZ_CASES=20000` runs longer.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use lcache_e2e::Daemon;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("LCACHE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET"),
        Just("PUT"),
        Just("HEAD"),
        Just("POST"),
        Just("DELETE"),
        Just("BREW"),
        Just(""),
        Just("G\u{0}T")
    ]
    .prop_map(str::to_string)
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("v1".to_string()),
            Just("steps".to_string()),
            Just("blobs".to_string()),
            Just("images".to_string()),
            Just("builds".to_string()),
            Just("plan".to_string()),
            Just("status".to_string()),
            Just("summaries".to_string()),
            Just("dir-nodes".to_string()),
            Just("metrics".to_string()),
            Just("..".to_string()),
            Just("%2F..%2F".to_string()),
            Just("%".to_string()),
            Just("sha256:".to_string()),
            Just("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".to_string()),
            Just("?limit=99999999999999999999".to_string()),
            Just("?after=%ZZ".to_string()),
            "[a-z0-9:%]{0,12}",
        ],
        0..5,
    )
    .prop_map(|v| format!("/{}", v.join("/")))
}

fn header() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Content-Length: 5".to_string()),
        Just("Content-Length: -1".to_string()),
        Just("Content-Length: 18446744073709551616".to_string()),
        Just("Content-Length: 3\r\nContent-Length: 4".to_string()),
        Just("Transfer-Encoding: chunked".to_string()),
        Just("Transfer-Encoding: gzip, chunked".to_string()),
        Just("Expect: 100-continue".to_string()),
        Just("Connection: close".to_string()),
        Just(format!("X-Big: {}", "a".repeat(9000))),
        "[ -~]{0,40}",
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"{}".to_vec()),
        Just(b"{\"key\":\"k\",\"layer\":null}".to_vec()),
        Just(b"5\r\nhello\r\n0\r\n\r\n".to_vec()),
        Just(b"zz\r\n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..300),
    ]
}

fn request() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (method(), path(), prop::collection::vec(header(), 0..4), body()).prop_map(|(m, p, hs, b)| {
            let mut r = format!("{m} {p} HTTP/1.1\r\nHost: x\r\n").into_bytes();
            for h in hs {
                r.extend_from_slice(h.as_bytes());
                r.extend_from_slice(b"\r\n");
            }
            r.extend_from_slice(b"\r\n");
            r.extend_from_slice(&b);
            r
        }),
        prop::collection::vec(any::<u8>(), 0..600),
    ]
}

/// Sends `bytes`, half-closes, and reads whatever comes back until the daemon hangs up.
fn send(socket: &std::path::Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).expect("the daemon accepts connections");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn no_request_stops_or_poisons_the_daemon() {
    let mut d = Daemon::start(&["--header-timeout", "2", "--body-timeout", "2"]);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases()));
    runner
        .run(&request(), |req| {
            let answer = send(&d.socket, &req);
            if let Some(status) = answer.get(9..12) {
                // A 5xx means the daemon failed, not that the request was bad.
                prop_assert!(
                    status[0] != b'5' || status == b"507",
                    "{}",
                    String::from_utf8_lossy(&answer)
                );
            }
            Ok(())
        })
        .unwrap();
    assert!(d.alive(), "the daemon survived every request");
    assert_eq!(d.http("GET", "/v1/status", b"").0, 200);
    let tmp = std::fs::read_dir(d.store().join("blobs/tmp")).unwrap().count();
    assert_eq!(tmp, 0, "no half-received upload is left behind");
}
