//! A fresh CI runner restoring a 200 MB layer from an S3-compatible bucket (moto's server on
//! loopback): its lcached's read-through (record GET, blob streamed in, verified, stored,
//! fsynced) against the server's own client — boto3's `get_object` streamed to a file, then
//! fsync — fetching the same object in the same run. (boto3's `download_file` splits the
//! object into concurrent ranged GETs, which moto serves several times slower: not a fair
//! baseline for one stream.) `cargo bench -p lcache-e2e --bench bucket`
//! (needs `scripts/setup --tests` for moto).

#[allow(dead_code)]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use lcache_bucket::Bucket;
use lcache_client::daemon_client::DaemonClient;
use lcache_daemon::upstream::Tier;
use lcache_proto::endpoint::Endpoint;
use lcache_proto::wire::{LayerRef, StepRecord};
use support::{ms, start_daemon_with, time};

const SIZE: usize = 200 << 20;
const RUNS: usize = 3;

fn layer(path: &std::path::Path) -> String {
    use sha2::Digest;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut h = sha2::Sha256::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..SIZE / buf.len() {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        h.update(&buf);
        f.write_all(&buf).expect("write");
    }
    format!("sha256:{:x}", h.finalize())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Starts moto's S3 server on `port` with the bucket `lcache-bench`.
fn moto(port: u16) -> std::process::Child {
    let mut child = Command::new("python3")
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 -m moto.server (scripts/setup --tests)");
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..400 {
        if let Ok(mut s) = TcpStream::connect(&addr) {
            write!(
                s,
                "PUT /lcache-bench HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .expect("create bucket");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            assert!(out.starts_with("HTTP/1.1 200"), "create bucket: {out}");
            return child;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("moto did not start");
}

fn main() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let mut server = moto(port);
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ALLOW_HTTP", "true"),
    ] {
        std::env::set_var(k, v);
    }
    std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
    let url = "s3://lcache-bench/ci";
    let file = tmp.path().join("layer");
    let digest = layer(&file);
    let key = format!("{:064x}", 200);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let bucket = Bucket::from_url(url).expect("bucket");
    rt.block_on(async {
        bucket.put_blob_file(&digest, &file).await.expect("upload");
        let rec = StepRecord {
            key: key.clone(),
            layer: Some(LayerRef {
                digest: digest.clone(),
                blake3: String::new(),
                size: SIZE as u64,
                diff_id: String::new(),
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            }),
            duration_ms: 1,
            inputs: None,
            created_at_ms: 0,
        };
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
    let _ = server.kill();
    let _ = server.wait();
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
