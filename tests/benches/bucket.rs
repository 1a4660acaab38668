//! A fresh CI runner restoring a 200 MB layer from an S3-compatible bucket (moto's server on
//! loopback): its lcached's read-through (record GET, blob streamed in, verified, stored,
//! fsynced) against the server's own client — boto3's `get_object` streamed to a file, then
//! fsync — fetching the same object in the same run. (boto3's `download_file` splits the
//! object into concurrent ranged GETs, which moto serves several times slower: not a fair
//! baseline for one stream.) `cargo bench -p lcache-e2e --bench bucket`
//! (needs `scripts/setup --tests` for moto).

#[allow(dead_code)]
mod support;

use std::process::Command;
use std::time::Duration;

use lcache_bucket::Bucket;
use lcache_client::daemon_client::DaemonClient;
use lcache_daemon::upstream::Tier;
use lcache_e2e::S3Server;
use lcache_proto::endpoint::Endpoint;
use support::{layer, layer_record, median, ms, start_daemon_with, time, SIZE};

const RUNS: usize = 3;

fn main() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().expect("temp dir");
    let server = S3Server::start("lcache-bench");
    let port = server.addr.rsplit(':').next().unwrap_or_default().to_string();
    for (k, v) in server.env() {
        std::env::set_var(k, v);
    }
    let url = "s3://lcache-bench/ci";
    let file = tmp.path().join("layer");
    let digest = layer(&file);
    let key = format!("{:064x}", 200);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let bucket = Bucket::from_url(url).expect("bucket");
    rt.block_on(async {
        bucket.put_blob_file(&digest, &file).await.expect("upload");
        let rec = layer_record(&key, &digest);
        bucket.put_record("", &rec, false).await.expect("record");
    });
    let object = format!(
        "ci/blobs/sha256/{}/{}",
        &digest[7..9],
        digest.trim_start_matches("sha256:")
    );
    let copy = tmp.path().join("boto-copy");
    let (mut boto, mut restore) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        // The server's own client, timed inside Python so its start-up is not counted.
        let out = Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import boto3,os,shutil,time\n\
s3=boto3.client('s3',endpoint_url='http://127.0.0.1:{port}')\n\
t=time.perf_counter()\n\
body=s3.get_object(Bucket='lcache-bench',Key='{object}')['Body']\n\
with open('{}','wb') as f:\n    shutil.copyfileobj(body,f,1<<20); f.flush(); os.fsync(f.fileno())\n\
print(time.perf_counter()-t)",
                copy.display()
            ))
            .output()
            .expect("python3 with boto3");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("seconds");
        boto.push(Duration::from_secs_f64(secs));
        let runner_sock = tmp.path().join(format!("runner{run}.sock"));
        let (_, stop) = start_daemon_with(
            tmp.path().join(format!("runner{run}")),
            vec![Endpoint::Unix(runner_sock.clone())],
            Some(Tier::Bucket(Bucket::from_url(url).expect("bucket"))),
        );
        let runner = DaemonClient::new(Endpoint::Unix(runner_sock), None).expect("client");
        restore.push(time(|| {
            let hit = runner
                .step(&key)
                .expect("lookup")
                .expect("a hit read through from the bucket");
            assert_eq!(hit.layer.expect("layer").digest, digest);
        }));
        assert!(runner.blob_present(&digest).expect("head"), "the layer is kept locally");
        let _ = stop.send(());
    }
    drop(server);
    let (b, r) = (median(boto), median(restore));
    println!(
        "== restore of a {} MB layer from an S3 bucket (moto) over loopback, median of {RUNS}",
        SIZE >> 20
    );
    println!(
        "{:<58} {:>10.1} ms  {:>6.2}",
        "boto3 get_object to a file, then fsync (baseline)",
        ms(b),
        1.0
    );
    println!(
        "{:<58} {:>10.1} ms  {:>6.2}",
        "fresh runner's lcached: record, blob streamed, verify, fsync",
        ms(r),
        ms(r) / ms(b)
    );
}
