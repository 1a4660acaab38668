//! Cold context-digest throughput against `b3sum` over the same files, in the same run.
//!
//! Makes (once, under target/bench-context) a 50,000-file, ~200 MB context, then times
//! `lcache keys`' full offline path (walk, .dockerignore, selection, parallel BLAKE3, Merkle
//! digest, keys) against `find | xargs b3sum` on the same tree, both with a warm page cache,
//! best of several runs. Prints figures and the ratio; asserts nothing (machines are noisy).
//! Run: `cargo bench -p lcache-client --bench context_digest` (needs Debian's b3sum).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lcache_client::offline_keys::offline_keys;
use lcache_proto::platform::Platform;
use lcache_proto::wire::PlanInputs;

const FILES: usize = 50_000;
const DIRS: usize = 500;
const RUNS: usize = 5;

fn make_context(root: &Path) -> u64 {
    let marker = root.join(".complete");
    let mut total = 0u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let exists = marker.exists();
    let buf: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for d in 0..DIRS {
        let dir = root.join(format!("src/d{d:03}"));
        if !exists {
            std::fs::create_dir_all(&dir).expect("mkdir");
        }
        for f in 0..FILES / DIRS {
            // Sizes from 0 to 8 KiB, mean 4 KiB: ~200 MB in all, as in DESIGN.md's target.
            let size = (next() % 8192) as usize;
            total += size as u64;
            if !exists {
                let mut content = buf[..size].to_vec();
                content.extend_from_slice(format!("{d}/{f}").as_bytes());
                std::fs::write(dir.join(format!("f{f:03}.dat")), content).expect("write");
            }
        }
    }
    if !exists {
        std::fs::write(root.join("Dockerfile"), "FROM scratch\nCOPY src /src\nRUN true\n").expect("Dockerfile");
        std::fs::write(&marker, "").expect("marker");
    }
    total
}

fn best(mut f: impl FnMut()) -> Duration {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let root: PathBuf = std::env::var_os("LCACHE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-context"));
    let bytes = make_context(&root);
    let b3sum = || {
        let ok = Command::new("sh")
            .arg("-c")
            .arg("find src -type f -print0 | xargs -0 b3sum > /dev/null")
            .current_dir(&root)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "b3sum failed: install it with `apt-get install b3sum`");
    };
    b3sum(); // warm the page cache for both contenders
    let req = PlanInputs {
        dockerfile_name: "Dockerfile".into(),
        dockerfile: std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile"),
        context: std::fs::canonicalize(&root).expect("context").display().to_string(),
        build_args: BTreeMap::new(),
        target: None,
        platform: Platform::host().to_string(),
        all_files: false,
    };
    let b3 = best(b3sum);
    let lc = best(|| {
        let r = offline_keys(&req).expect("keys");
        assert_eq!(r.hashed_files, FILES);
    });
    let mb = bytes as f64 / 1e6;
    println!("context: {FILES} files, {mb:.1} MB (page cache warm, best of {RUNS})");
    println!(
        "b3sum (find | xargs b3sum):     {:>8.1} ms  {:>7.1} MB/s",
        ms(b3),
        mb / b3.as_secs_f64()
    );
    println!(
        "lcache keys, cold (no index):   {:>8.1} ms  {:>7.1} MB/s",
        ms(lc),
        mb / lc.as_secs_f64()
    );
    println!(
        "ratio lcache/b3sum throughput:  {:.2}  (target >= 0.90)",
        b3.as_secs_f64() / lc.as_secs_f64()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
