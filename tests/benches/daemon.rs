//! lcached benchmarks, figures printed as ratios against baselines measured in the same run:
//!
//! 1. step lookups (`GET /v1/steps/{key}`, hits) over the Unix socket and TCP loopback at
//!    1, 8 and 64 concurrent keep-alive clients: p50/p99 latency and lookups/s;
//! 2. `POST /v1/plan` on the synthetic 50,000-file / ~200 MB context: cold (empty index),
//!    warm no-op, and after a one-file edit, against hashing the context from scratch
//!    (`lcache keys --offline`'s path).
//!
//! The daemon runs in this process on its own runtime (2 workers) but is reached through
//! real sockets. Run: `cargo bench -p lcache-e2e --bench daemon`.

// Shared with the other benches, which use parts this one does not.
#[allow(dead_code)]
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use lcache_client::daemon_client::DaemonClient;
use lcache_client::offline_keys::offline_keys;
use lcache_context::synthetic_context::{make_synthetic_context, FILES};
use lcache_proto::endpoint::Endpoint;
use lcache_proto::wire::StepRecord;
use support::{row, start_daemon, time};

const KEYS: usize = 2_000;
const LOOKUPS: usize = 40_000;

fn key(i: usize) -> String {
    format!("{:064x}", 0x5eed_0000 + i)
}

async fn connect(ep: &Endpoint) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let io: Box<dyn lcache_daemon::server::IoStream> = match ep {
        Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await.expect("connect")),
        Endpoint::Tcp(a) | Endpoint::Tls(a) => {
            let s = tokio::net::TcpStream::connect(a).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            Box::new(s)
        }
    };
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// Latencies of `LOOKUPS` hits spread over `clients` keep-alive connections, and the wall time.
fn lookups(ep: &Endpoint, clients: usize, token: &str) -> (Vec<Duration>, Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let ep = ep.clone();
            let auth = format!("Bearer {token}");
            tasks.push(tokio::spawn(async move {
                let mut s = connect(&ep).await;
                let mut lat = Vec::with_capacity(LOOKUPS / clients);
                for i in 0..LOOKUPS / clients {
                    let path = format!("/v1/steps/{}", key((c * 7919 + i) % KEYS));
                    let req = Request::get(path)
                        .header("host", "lcached")
                        .header("authorization", &auth)
                        .body(Empty::new())
                        .expect("request");
                    let t = Instant::now();
                    let resp = s.send_request(req).await.expect("send");
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.expect("body");
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut all = Vec::with_capacity(LOOKUPS);
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        (all, started.elapsed())
    })
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let socket = tmp.path().join("lcached.sock");
    let (listening, stop) = start_daemon(
        tmp.path().join("store"),
        vec![Endpoint::Unix(socket.clone()), Endpoint::Tcp("127.0.0.1:0".into())],
    );
    let tcp: Endpoint = listening
        .iter()
        .find(|l| l.starts_with("tcp://"))
        .expect("tcp listener")
        .parse()
        .expect("addr");
    let unix = Endpoint::Unix(socket);

    let client = DaemonClient::new(unix.clone(), None).expect("client");
    for i in 0..KEYS {
        let rec = StepRecord {
            key: key(i),
            layer: None,
            duration_ms: 1000,
            inputs: None,
            created_at_ms: 0,
        };
        let _: StepRecord = client
            .json(hyper::Method::PUT, &format!("/v1/steps/{}", key(i)), Some(&rec))
            .expect("put step");
    }
    // TCP needs a token (the socket ignores it).
    let token = support::read_token(&client);
    println!("== step lookups (hits), {LOOKUPS} per row, {KEYS} records");
    println!(
        "{:<6} {:>8} {:>10} {:>10} {:>12}",
        "over", "clients", "p50 ms", "p99 ms", "lookups/s"
    );
    for (name, ep) in [("unix", &unix), ("tcp", &tcp)] {
        for clients in [1, 8, 64] {
            let (mut lat, wall) = lookups(ep, clients, &token);
            lat.sort();
            println!(
                "{name:<6} {clients:>8} {:>10.3} {:>10.3} {:>12.0}",
                pct(&lat, 0.50),
                pct(&lat, 0.99),
                lat.len() as f64 / wall.as_secs_f64()
            );
        }
    }

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-context");
    make_synthetic_context(&root).expect("bench context");
    let root = std::fs::canonicalize(&root).expect("canonical");
    let inputs = support::inputs(
        &root,
        std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile"),
    );
    // Warm the page cache so the baseline and the cold plan both read from memory.
    offline_keys(&inputs).expect("offline keys");
    let scratch = median(
        (0..3)
            .map(|_| time(|| assert_eq!(offline_keys(&inputs).expect("keys").hashed_files, FILES)))
            .collect(),
    );
    let cold = time(|| assert_eq!(client.plan(&inputs).expect("plan").report.hashed_files, FILES));
    let warm = median(
        (0..30)
            .map(|_| time(|| assert_eq!(client.plan(&inputs).expect("plan").report.hashed_files, 0)))
            .collect(),
    );
    let edited_file = root.join("src/d123/f045.dat");
    let original = std::fs::read(&edited_file).expect("read");
    let edit = median(
        (0..5u8)
            .map(|n| {
                let mut changed = original.clone();
                changed.push(n);
                std::fs::write(&edited_file, &changed).expect("edit");
                time(|| assert_eq!(client.plan(&inputs).expect("plan").report.hashed_files, 1))
            })
            .collect(),
    );
    std::fs::write(&edited_file, &original).expect("restore");
    eprintln!("\n== plan on {FILES} files (page cache warm)");
    row("hash from scratch (offline keys)", scratch, scratch, "");
    row("daemon plan, cold (empty index)", cold, scratch, "");
    row("daemon plan, warm no-op", warm, scratch, "(target <= 30 ms)");
    row("daemon plan, one file edited", edit, scratch, "(target <= 1500 ms)");
    let _ = stop.send(());
}
