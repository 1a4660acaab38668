//! A fresh CI runner restoring a 200 MB layer from the shared cache over loopback: its
//! lcached's read-through (fetch, verify, store, fsync) against `curl` downloading the same
//! bytes from the same shared lcached, in the same run. `cargo bench -p lcache-e2e --bench shared`

// Shared with the daemon bench, which uses the parts this one does not.
#[allow(dead_code)]
mod support;

use std::process::Command;

use lcache_client::daemon_client::DaemonClient;
use lcache_proto::endpoint::Endpoint;
use lcache_proto::wire::StepRecord;
use lcache_remote::Remote;
use support::{layer, layer_record, median, ms, start_daemon, start_daemon_with, time, SIZE};

const RUNS: usize = 3;

fn main() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let socket = tmp.path().join("shared.sock");
    let (listening, _stop) = start_daemon(
        tmp.path().join("shared"),
        vec![Endpoint::Unix(socket.clone()), Endpoint::Tcp("127.0.0.1:0".into())],
    );
    let tcp = listening
        .iter()
        .find_map(|l| l.strip_prefix("tcp://"))
        .expect("tcp listener")
        .to_string();
    let shared = DaemonClient::new(Endpoint::Unix(socket), None).expect("client");
    let token = support::read_token(&shared);
    let file = tmp.path().join("layer");
    let digest = layer(&file);
    shared
        .put_blob_file(&digest, &file, 0, SIZE as u64)
        .expect("upload the layer");
    let key = format!("{:064x}", 200);
    let rec = layer_record(&key, &digest);
    let _: StepRecord = shared
        .json(hyper::Method::PUT, &format!("/v1/steps/{key}"), Some(&rec))
        .expect("record");

    let mut curl = Vec::new();
    let mut curl_file = Vec::new();
    let mut restore = Vec::new();
    let copy = tmp.path().join("curl-copy");
    for run in 0..RUNS {
        curl_file.push(time(|| {
            let out = Command::new("curl")
                .args(["-sf", "-o"])
                .arg(&copy)
                .arg("-H")
                .arg(format!("Authorization: Bearer {token}"))
                .arg(format!("http://{tcp}/v1/blobs/{digest}"))
                .status()
                .expect("run curl (apt-get install curl)");
            assert!(out.success(), "curl failed");
            std::fs::File::open(&copy).and_then(|f| f.sync_all()).expect("fsync");
        }));
        let _ = std::fs::remove_file(&copy);
        curl.push(time(|| {
            let out = Command::new("curl")
                .args(["-sf", "-o", "/dev/null", "-H"])
                .arg(format!("Authorization: Bearer {token}"))
                .arg(format!("http://{tcp}/v1/blobs/{digest}"))
                .status()
                .expect("run curl (apt-get install curl)");
            assert!(out.success(), "curl failed");
        }));
        // A fresh runner: its own store, the shared cache behind it.
        let runner_sock = tmp.path().join(format!("runner{run}.sock"));
        let upstream = Remote::new(Endpoint::Tcp(tcp.clone()), Some(token.clone()), None).expect("remote");
        let (_, stop) = start_daemon_with(
            tmp.path().join(format!("runner{run}")),
            vec![Endpoint::Unix(runner_sock.clone())],
            Some(lcache_daemon::upstream::Tier::Lcached(upstream)),
        );
        let runner = DaemonClient::new(Endpoint::Unix(runner_sock), None).expect("client");
        restore.push(time(|| {
            let hit = runner
                .step(&key)
                .expect("lookup")
                .expect("a hit read through from the shared cache");
            assert_eq!(hit.layer.expect("layer").digest, digest);
        }));
        assert!(runner.blob_present(&digest).expect("head"), "the layer is kept locally");
        let _ = stop.send(());
    }
    let (c, cf, r) = (median(curl), median(curl_file), median(restore));
    println!(
        "== restore of a {} MB layer from the shared cache over loopback, median of {RUNS}",
        SIZE >> 20
    );
    println!(
        "{:<52} {:>10.1} ms  {:>6.2}",
        "curl of the blob to /dev/null (baseline)",
        ms(c),
        1.0
    );
    println!(
        "{:<52} {:>10.1} ms  {:>6.2}",
        "curl of the blob to a file, then fsync",
        ms(cf),
        ms(cf) / ms(c)
    );
    println!(
        "{:<52} {:>10.1} ms  {:>6.2}  ({:.2}x curl to a file)",
        "fresh runner's lcached: read-through, verify, fsync",
        ms(r),
        ms(r) / ms(c),
        ms(r) / ms(cf)
    );
}
