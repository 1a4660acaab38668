//! What the daemon benchmarks share: an in-process daemon on real sockets, and timing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lcache_daemon::server::{Daemon, DaemonConfig};
use lcache_proto::endpoint::Endpoint;
use lcache_proto::platform::Platform;
use lcache_proto::wire::PlanInputs;

/// Starts a daemon on its own 2-worker runtime; returns where it listens and a stop handle.
pub fn start_daemon(store: PathBuf, listen: Vec<Endpoint>) -> (Vec<String>, tokio::sync::oneshot::Sender<()>) {
    start_daemon_with(store, listen, None)
}

/// As [`start_daemon`], with a cache behind it.
pub fn start_daemon_with(
    store: PathBuf,
    listen: Vec<Endpoint>,
    upstream: Option<lcache_daemon::upstream::Tier>,
) -> (Vec<String>, tokio::sync::oneshot::Sender<()>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let d = Daemon::start(&DaemonConfig {
                listen,
                store,
                watch: true,
                limits: Default::default(),
                upstream,
                tls: None,
                max_size: None,
            })
            .await
            .expect("daemon start");
            ready_tx.send(d.listening().to_vec()).expect("ready");
            d.serve(async {
                let _ = stop_rx.await;
            })
            .await;
        });
    });
    (ready_rx.recv().expect("daemon ready"), stop_tx)
}

/// How long `f` takes.
pub fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints one figure and its ratio to the baseline measured in the same run.
pub fn row(label: &str, d: Duration, baseline: Duration, note: &str) {
    eprintln!("{label:<36} {:>10.2} ms  {:>8.4}  {note}", ms(d), ms(d) / ms(baseline));
}

/// Plan inputs for `dockerfile` over the context at `root`, for this machine's platform.
pub fn inputs(root: &std::path::Path, dockerfile: String) -> PlanInputs {
    PlanInputs {
        dockerfile_name: "Dockerfile".into(),
        dockerfile_path: String::new(),
        dockerfile,
        context: root.display().to_string(),
        build_args: Default::default(),
        target: None,
        platform: Platform::host().to_string(),
        all_files: false,
    }
}

/// A read token made through `client` (the daemon's socket), for its TCP listener.
pub fn read_token(client: &lcache_client::daemon_client::DaemonClient) -> String {
    let made: serde_json::Value = client
        .json(
            hyper::Method::POST,
            "/v1/tokens",
            Some(&serde_json::json!({"name": "bench", "access": "read"})),
        )
        .expect("token");
    made["token"].as_str().expect("token").to_string()
}

/// The size of the layer the restore benches move.
pub const SIZE: usize = 200 << 20;

/// Incompressible bytes, quickly: xorshift.
pub fn layer(path: &std::path::Path) -> String {
    use sha2::Digest;
    use std::io::Write;
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

pub fn median(mut v: Vec<std::time::Duration>) -> std::time::Duration {
    v.sort();
    v[v.len() / 2]
}

/// The record of a step whose layer is the bench's [`layer`].
pub fn layer_record(key: &str, digest: &str) -> lcache_proto::wire::StepRecord {
    lcache_proto::wire::StepRecord {
        key: key.to_string(),
        layer: Some(lcache_proto::wire::LayerRef {
            digest: digest.to_string(),
            blake3: String::new(),
            size: SIZE as u64,
            diff_id: String::new(),
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        }),
        duration_ms: 1,
        inputs: None,
        created_at_ms: 0,
    }
}
