//! Cold context-digest throughput against `b3sum` over the same files, in the same run.
//!
//! Uses the synthetic 50,000-file, ~200 MB context (made once under target/bench-context)
//! and times `lcache keys --offline`'s whole path (walk, .dockerignore, selection, parallel
//! BLAKE3, Merkle digest, keys) against `find | xargs b3sum` on the same tree, both with a
//! warm page cache, best of several runs. Prints figures and the ratio; asserts nothing.
//! Run: `cargo bench -p lcache-client --bench context_digest` (needs Debian's b3sum).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use lcache_client::offline_keys::offline_keys;
use lcache_context::synthetic_context::{make_synthetic_context, FILES};
use lcache_proto::platform::Platform;
use lcache_proto::wire::PlanInputs;

const RUNS: usize = 5;

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
    let bytes = make_synthetic_context(&root).expect("make the bench context");
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
        dockerfile_path: String::new(),
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
