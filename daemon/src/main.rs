use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use lcache_daemon::server::{shutdown_signal, Daemon, DaemonConfig, Limits, TlsFiles};
use lcache_daemon::upstream::Tier;
use lcache_proto::endpoint::{default_socket, default_store, Endpoint};
use lcache_remote::Remote;

/// lcached: the lcache daemon. Keeps step records and layer blobs, indexes build contexts,
/// and answers `lcache` over HTTP on a Unix socket and/or TCP.
#[derive(Debug, Parser)]
#[command(name = "lcached", version, about)]
struct Args {
    /// Where to listen: unix:///path/to.sock, tcp://host:port, or https://host:port (with
    /// --tls-cert and --tls-key); may be given more than once
    /// [default: /run/lcache/lcached.sock as root, else $XDG_RUNTIME_DIR/lcache/lcached.sock].
    #[arg(long, value_name = "ADDR")]
    listen: Vec<Endpoint>,
    /// The store directory [default: /var/lib/lcache as root, else $XDG_DATA_HOME/lcache].
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Watch build contexts for changes (auto), or re-stat them on every plan (off: for
    /// network filesystems).
    #[arg(long, value_enum, default_value_t = Watch::Auto)]
    watch: Watch,
    /// Open client connections at once; more wait to be accepted.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// The largest blob accepted (bytes, or with a K/M/G/T suffix: 512M, 64G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64G")]
    max_blob_size: u64,
    /// Seconds a client may take to send a request's headers (and an idle connection stays open).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    header_timeout: u64,
    /// Seconds a request body may pause before the request is dropped.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    body_timeout: u64,
    /// Builds the history keeps (`lcache history`, and what `explain` compares with): past
    /// it, the oldest go.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_builds)]
    max_builds: usize,
    /// The cache behind this one — another lcached (`tcp://…`, `https://…`) or an
    /// S3-compatible bucket (`s3://BUCKET/PREFIX`, configured by the AWS_* environment
    /// variables): local misses are looked up there and what builds store here is pushed
    /// to it in the background.
    #[arg(long, value_name = "ADDR|s3://BUCKET/PREFIX")]
    upstream: Option<String>,
    /// A file holding the token for the upstream (`lcache token create` on its machine);
    /// `LCACHE_TOKEN` gives the token itself.
    #[arg(long, value_name = "FILE", requires = "upstream")]
    upstream_token_file: Option<std::path::PathBuf>,
    /// For an https:// upstream: the CA certificate (PEM) that signed its certificate
    /// [default: the system's CAs].
    #[arg(long, value_name = "FILE", requires = "upstream")]
    upstream_ca: Option<std::path::PathBuf>,
    /// Seconds an upstream may go without sending or taking a byte (or take to accept a
    /// connection) before the request is given up; lookups then skip it for 30 s and
    /// builds go on from the local store.
    #[arg(long, value_name = "SECS", default_value_t = 30, requires = "upstream")]
    upstream_timeout: u64,
    /// Keep the blobs under this size (1024, 512M, 64G…): least recently used blobs and the
    /// step records that need them are evicted in the background [default: no limit].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_size: Option<u64>,
    /// Seconds lcached may take to stop after SIGTERM or SIGINT (open requests end, the
    /// upstream queue drains) before it exits regardless; a second signal exits at once.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    stop_timeout: u64,
    /// The certificate chain (PEM) https:// listeners serve.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

/// `1024`, `512K`, `64M`, `2G`, `1T` (binary units; `KiB`, `GB`… are read the same).
fn parse_size(v: &str) -> anyhow::Result<u64> {
    lcache_proto::byte_size::parse_size(v).ok_or_else(|| anyhow::anyhow!("'{v}' is not a size: write e.g. 512M or 64G"))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Watch {
    Auto,
    Off,
}

/// The tier `--upstream` names: a bucket for `s3://`, else another lcached.
fn upstream_tier(
    url: &str,
    token: Option<String>,
    ca: Option<&std::path::Path>,
    timeout: Duration,
) -> Result<Tier, String> {
    if url.starts_with("s3://") {
        return lcache_bucket::Bucket::from_url_with_stall(url, timeout)
            .map(Tier::Bucket)
            .map_err(|e| e.to_string());
    }
    let endpoint: Endpoint = url.parse().map_err(|e| format!("{e}"))?;
    Remote::new(endpoint, token, ca)
        .map(|r| Tier::Lcached(r.with_stall_timeout(timeout)))
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    // One TLS provider for the process: the registry client (reqwest) brings none of its
    // own, and the listener and upstream already use ring.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    let env = |k: &str| std::env::var(k).ok();
    let token = match &args.upstream_token_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => {
                eprintln!(
                    "lcached: cannot read the upstream token file {}: {e} — create a token on the upstream with `lcache token create NAME` and save it there",
                    f.display()
                );
                return ExitCode::FAILURE;
            }
        },
        None => env("LCACHE_TOKEN").filter(|t| !t.trim().is_empty()),
    };
    let upstream = match args.upstream.as_deref().map(|u| {
        upstream_tier(
            u,
            token,
            args.upstream_ca.as_deref(),
            Duration::from_secs(args.upstream_timeout.max(1)),
        )
    }) {
        Some(Err(e)) => {
            eprintln!("lcached: --upstream: {e}");
            return ExitCode::FAILURE;
        }
        Some(Ok(t)) => Some(t),
        None => None,
    };
    let cfg = DaemonConfig {
        upstream,
        max_size: args.max_size,
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| TlsFiles { cert, key }),
        listen: if args.listen.is_empty() {
            vec![Endpoint::Unix(default_socket(uid, env("XDG_RUNTIME_DIR").as_deref()))]
        } else {
            args.listen
        },
        store: args
            .store
            .unwrap_or_else(|| default_store(uid, env("XDG_DATA_HOME").as_deref(), env("HOME").as_deref())),
        watch: matches!(args.watch, Watch::Auto),
        limits: Limits {
            max_connections: args.max_connections,
            max_blob_size: args.max_blob_size,
            header_timeout: Duration::from_secs(args.header_timeout.max(1)),
            body_timeout: Duration::from_secs(args.body_timeout.max(1)),
            // At least the last: the build just posted is answered with itself.
            max_builds: args.max_builds.max(1),
        },
    };
    if let Err(e) = lcache_daemon::stop_watchdog::arm(Duration::from_secs(args.stop_timeout.max(1))) {
        eprintln!("lcached: cannot watch for stop signals: {e}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lcached: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        let shutdown = shutdown_signal();
        let daemon = match Daemon::start(&cfg).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("lcached: {e}");
                return ExitCode::FAILURE;
            }
        };
        for l in daemon.listening() {
            println!("lcached: listening on {l}");
        }
        println!("lcached: store {}", cfg.store.display());
        daemon.serve(shutdown).await;
        println!("lcached: stopped");
        ExitCode::SUCCESS
    });
    // The store is flushed by now: a task that never yields (one did, reading a parts
    // header in a loop) must not keep dropping the runtime, and the daemon, from ending.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}
