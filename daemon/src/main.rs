use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use lcache_daemon::server::{shutdown_signal, Daemon, DaemonConfig};
use lcache_proto::endpoint::{default_socket, default_store, Endpoint};

/// lcached: the lcache daemon. Keeps step records and layer blobs, indexes build contexts,
/// and answers `lcache` over HTTP on a Unix socket and/or TCP.
#[derive(Debug, Parser)]
#[command(name = "lcached", version, about)]
struct Args {
    /// Where to listen: unix:///path/to.sock or tcp://host:port; may be given twice
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
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Watch {
    Auto,
    Off,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    let env = |k: &str| std::env::var(k).ok();
    let cfg = DaemonConfig {
        listen: if args.listen.is_empty() {
            vec![Endpoint::Unix(default_socket(uid, env("XDG_RUNTIME_DIR").as_deref()))]
        } else {
            args.listen
        },
        store: args
            .store
            .unwrap_or_else(|| default_store(uid, env("XDG_DATA_HOME").as_deref(), env("HOME").as_deref())),
        watch: matches!(args.watch, Watch::Auto),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lcached: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
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
    })
}
