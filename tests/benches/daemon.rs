//! lcached benchmarks, figures printed as ratios against baselines measured in the same run:
//!
//! 1. step lookups (`GET /v1/steps/{key}`, hits) over the Unix socket and TCP loopback at
//!    1, 8 and 64 concurrent keep-alive clients: p50/p99 latency and lookups/s;
//! 2. `POST /v1/plan` on the synthetic 50,000-file / ~200 MB context: cold (empty index),
//!    warm no-op, and after a one-file edit, against hashing the context from scratch
//!    (`lcache keys --offline`'s path), and every file's mtime touched; then the heap the
//!    daemon holds per indexed file (a counting allocator: live bytes after the plans minus
//!    before, sled's cache included).
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

/// Counts live heap bytes, so the daemon's memory per indexed file is measured exactly
/// rather than read off a noisy RSS.
struct Counting;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, std::sync::atomic::Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_bytes() -> usize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

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
    let heap_before = live_bytes();
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
    // Every file's mtime moves, no content changes: each file is stat'ed and read once.
    let touch_all = median(
        (0..3i64)
            .map(|n| {
                let t = nix::sys::time::TimeSpec::new(1_700_000_000 + n, 0);
                for entry in walkdir(&root.join("src")) {
                    nix::sys::stat::utimensat(
                        nix::fcntl::AT_FDCWD,
                        &entry,
                        &t,
                        &t,
                        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                    )
                    .expect("touch");
                }
                std::thread::sleep(Duration::from_millis(100));
                time(|| assert!(client.plan(&inputs).expect("plan").report.hashed_files >= FILES))
            })
            .collect(),
    );
    // Settle: one more plan with no change, and time for the digests written behind to
    // leave the writer's queue; then what the daemon keeps.
    client.plan(&inputs).expect("plan");
    std::thread::sleep(Duration::from_secs(3));
    let per_file = live_bytes().saturating_sub(heap_before) as f64 / FILES as f64;
    eprintln!("\n== plan on {FILES} files (page cache warm)");
    row("hash from scratch (offline keys)", scratch, scratch, "");
    row("daemon plan, cold (empty index)", cold, scratch, "");
    row("daemon plan, warm no-op", warm, scratch, "(target <= 30 ms)");
    row("daemon plan, one file edited", edit, scratch, "(target <= 1500 ms)");
    row(
        "daemon plan, every mtime touched",
        touch_all,
        scratch,
        "(target <= 500 ms)",
    );
    eprintln!(
        "daemon heap held per indexed file: {per_file:.0} bytes (target <= 512; RSS now {} MiB)",
        rss_kib() / 1024
    );
    let _ = stop.send(());
}

/// Every file beneath `dir`.
fn walkdir(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// This process's resident set, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
