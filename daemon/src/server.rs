//! Starting the daemon: lock the store, open it, bind every listener (Unix socket and/or
//! TCP), serve HTTP/1.1 until a shutdown signal, then drain connections and flush.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use lcache_proto::endpoint::Endpoint;
use tokio::net::{TcpListener, UnixListener};

use crate::api;
use crate::context_index::ContextIndex;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::store::blob_store::BlobStore;
use crate::store::sled_records::SledRecords;
use crate::store::RecordStore;
use crate::store_lock::{lock_store, LockError};
use crate::upstream::Upstream;
use tokio_rustls::TlsAcceptor;

/// How the daemon is to run.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where to listen.
    pub listen: Vec<Endpoint>,
    /// The store directory.
    pub store: PathBuf,
    /// Watch contexts with notify (false: stat walks).
    pub watch: bool,
    /// What one client may take.
    pub limits: Limits,
    /// The cache behind this one, and the token to show it.
    pub upstream: Option<crate::upstream::Tier>,
    /// What `https://` listeners serve.
    pub tls: Option<TlsFiles>,
    /// Evict least recently used blobs to stay under this many bytes.
    pub max_size: Option<u64>,
}

/// What one client may take of the daemon: a client that is slow, idle, greedy or hostile
/// is cut off instead of holding resources forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// The largest blob accepted, whether its length is declared or it arrives chunked.
    pub max_blob_size: u64,
    /// How long a client may take to send a request's headers, and how long an idle
    /// keep-alive connection stays open.
    pub header_timeout: Duration,
    /// How long a request body may go without a byte arriving.
    pub body_timeout: Duration,
    /// How many builds the history keeps: past it, the oldest go.
    pub max_builds: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_blob_size: 64 << 30,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            max_builds: 10_000,
        }
    }
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store is locked or unusable.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The store could not be opened.
    #[error("cannot open the store {path}: {reason} — check the directory and the disk")]
    Store {
        /// The store directory.
        path: String,
        /// Why.
        reason: String,
    },
    /// Another daemon answers on the socket.
    #[error("another lcached already listens on {0} — stop it, or pass a different --listen")]
    SocketInUse(String),
    /// The store directory belongs to someone else.
    #[error(
        "the store {path} is owned by uid {owner}, not by this daemon's uid {uid} — use a store directory of your own"
    )]
    StoreOwner {
        /// The store directory.
        path: String,
        /// Its owner.
        owner: u32,
        /// Ours.
        uid: u32,
    },
    /// `--listen` names a file that is not a socket.
    #[error("{0} exists and is not a socket — lcached will not delete it; pass another --listen path")]
    NotASocket(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source} — pick a free address with --listen")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// An https:// listener has no usable certificate and key.
    #[error("cannot serve TLS on {addr}: {reason}")]
    Tls {
        /// The address.
        addr: String,
        /// What is wrong, and what to do.
        reason: String,
    },
}

/// The certificate chain and private key (PEM files) an `https://` listener serves.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A TLS acceptor for `files`.
fn tls_acceptor(addr: &str, files: Option<&TlsFiles>) -> Result<TlsAcceptor, StartError> {
    let fail = |reason: String| StartError::Tls {
        addr: addr.to_string(),
        reason,
    };
    let files = files.ok_or_else(|| fail("no certificate: pass --tls-cert FILE and --tls-key FILE (PEM)".into()))?;
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| fail(format!("cannot read {}: {e}", p.display())));
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("{} is not a PEM certificate chain: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(fail(format!("{} holds no certificate", files.cert.display())));
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| fail(format!("{} is not a PEM private key: {e}", files.key.display())))?
        .ok_or_else(|| fail(format!("{} holds no private key", files.key.display())))?;
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| fail(format!("the certificate and key do not make a TLS identity: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    Tls(TcpListener, TlsAcceptor),
}

/// A started daemon, bound and ready to serve.
pub struct Daemon {
    state: Arc<AppState>,
    listeners: Vec<Listener>,
    _lock: std::fs::File,
}

impl Daemon {
    /// Locks and opens the store and binds every listener.
    pub async fn start(cfg: &DaemonConfig) -> Result<Self, StartError> {
        let store_err = |e: &dyn std::fmt::Display| StartError::Store {
            path: cfg.store.display().to_string(),
            reason: e.to_string(),
        };
        // Everything the daemon creates is its own alone: blobs, records, sockets.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        std::fs::create_dir_all(&cfg.store).map_err(|e| store_err(&e))?;
        owner_only(&cfg.store)?;
        let lock = lock_store(&cfg.store)?;
        let blobs = BlobStore::open(&cfg.store.join("blobs")).map_err(|e| store_err(&e))?;
        let records: Arc<dyn RecordStore> =
            Arc::new(SledRecords::open(&cfg.store.join("db")).map_err(|e| store_err(&e))?);
        let mut listeners = Vec::new();
        let mut listen = Vec::new();
        for ep in &cfg.listen {
            match ep {
                Endpoint::Unix(path) => {
                    if let Ok(m) = std::fs::symlink_metadata(path) {
                        use std::os::unix::fs::FileTypeExt;
                        if !m.file_type().is_socket() {
                            return Err(StartError::NotASocket(path.display().to_string()));
                        }
                        if std::os::unix::net::UnixStream::connect(path).is_ok() {
                            return Err(StartError::SocketInUse(ep.to_string()));
                        }
                        // A socket file nobody answers on is left over from a killed daemon.
                        let _ = std::fs::remove_file(path);
                    }
                    if let Some(parent) = path.parent().filter(|p| !p.exists()) {
                        // A directory made for the socket is owner-only (the umask above).
                        std::fs::create_dir_all(parent).map_err(|source| StartError::Bind {
                            addr: ep.to_string(),
                            source,
                        })?;
                    }
                    let l = UnixListener::bind(path).map_err(|source| StartError::Bind {
                        addr: ep.to_string(),
                        source,
                    })?;
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
                    listen.push(ep.to_string());
                    listeners.push(Listener::Unix(l, path.clone()));
                }
                Endpoint::Tcp(addr) | Endpoint::Tls(addr) => {
                    // The certificate is checked before the port is taken.
                    let acceptor = match ep {
                        Endpoint::Tls(_) => Some(tls_acceptor(&ep.to_string(), cfg.tls.as_ref())?),
                        _ => None,
                    };
                    let l = TcpListener::bind(addr).await.map_err(|source| StartError::Bind {
                        addr: ep.to_string(),
                        source,
                    })?;
                    let scheme = if acceptor.is_some() { "https" } else { "tcp" };
                    let actual = l
                        .local_addr()
                        .map(|a| format!("{scheme}://{a}"))
                        .unwrap_or_else(|_| ep.to_string());
                    listen.push(actual);
                    listeners.push(match acceptor {
                        Some(a) => Listener::Tls(l, a),
                        None => Listener::Tcp(l),
                    });
                }
            }
        }
        let upstream = cfg.upstream.clone().map(Upstream::new);
        let state = Arc::new(AppState {
            index: ContextIndex::new(records.clone(), cfg.watch),
            listing_gc: crate::listing_gc::ListingCollector::new(),
            records,
            blobs,
            metrics: Metrics::default(),
            started: Instant::now(),
            listen,
            store_dir: cfg.store.clone(),
            build_seq: AtomicU64::new(0),
            limits: cfg.limits,
            upstream: upstream.as_ref().map(|(u, _)| u.clone()),
            evict_wake: tokio::sync::Notify::new(),
            layer_naming: Default::default(),
            provisional: Default::default(),
            deferred: Default::default(),
        });
        if let Some(max) = cfg.max_size {
            tokio::spawn(crate::eviction::run(state.clone(), max));
        }
        if let Some((u, rx)) = upstream {
            tokio::spawn(u.run(rx, state.clone()));
        }
        // Layers first: the builds being named wait for their names.
        crate::api::blobs::resume_provisional(&state);
        crate::deferred_naming::resume(&state);
        Ok(Self {
            state,
            listeners,
            _lock: lock,
        })
    }

    /// The addresses actually bound (a TCP port 0 resolved).
    pub fn listening(&self) -> &[String] {
        &self.state.listen
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets open requests finish
    /// (up to 10 s), flushes the store and removes the socket files.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let graceful = Arc::new(GracefulShutdown::new());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let limits = self.state.limits;
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
        let mut loops = Vec::new();
        let mut sockets = Vec::new();
        for l in self.listeners {
            let state = self.state.clone();
            let mut stop = stop_rx.clone();
            let graceful = graceful.clone();
            let slots = slots.clone();
            if let Listener::Unix(_, p) = &l {
                sockets.push(p.clone());
            }
            let origin = match l {
                Listener::Unix(..) => api::Origin::Local,
                Listener::Tcp(_) | Listener::Tls(..) => api::Origin::Network,
            };
            loops.push(tokio::spawn(async move {
                loop {
                    let io = tokio::select! {
                        _ = stop.changed() => break,
                        accepted = accept(&l) => accepted,
                    };
                    let Some((io, tls)) = io else { continue };
                    // At the limit this loop waits, so further connections wait in the
                    // kernel's backlog, not in memory.
                    let slot = tokio::select! {
                        _ = stop.changed() => break,
                        slot = slots.clone().acquire_owned() => slot,
                    };
                    let Ok(slot) = slot else { break };
                    let state = state.clone();
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move {
                            let r = AssertUnwindSafe(api::route(state, req, origin))
                                .catch_unwind()
                                .await
                                .unwrap_or_else(|_| {
                                    api::error(
                                        StatusCode::INTERNAL_SERVER_ERROR,
                                        "the daemon hit a bug handling this request",
                                        "report it with the request; the daemon keeps running",
                                    )
                                });
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    // A client that half-closes after its body (as `curl -T -` or a shell script may) still gets its answer.
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        // The TLS handshake runs here, not in the accept loop, so a client
                        // that stalls it holds one slot for at most the header timeout.
                        let io = match tls {
                            None => io,
                            Some(acceptor) => {
                                match tokio::time::timeout(limits.header_timeout, acceptor.accept(io)).await {
                                    Ok(Ok(s)) => Box::new(s) as Box<dyn IoStream>,
                                    _ => return,
                                }
                            }
                        };
                        let conn = http1::Builder::new()
                            .half_close(true)
                            .timer(TokioTimer::new())
                            .header_read_timeout(limits.header_timeout)
                            .serve_connection(TokioIo::new(io), svc);
                        let _ = watcher.watch(conn).await;
                        drop(slot);
                    });
                }
            }));
        }
        shutdown.await;
        let _ = stop_tx.send(true);
        for l in loops {
            let _ = l.await;
        }
        if let Ok(graceful) = Arc::try_unwrap(graceful) {
            let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
        }
        // What builds stored is pushed before the daemon goes (as long as the upstream
        // answers within the drain time); what is not is reported.
        if let Some(u) = &self.state.upstream {
            let report = u.sync(UPSTREAM_DRAIN, &self.state.metrics).await;
            for f in &report.failed {
                eprintln!("lcached: not pushed to upstream {}: {f}", report.upstream);
            }
        }
        if let Err(e) = self.state.index.drain() {
            eprintln!("lcached: {e}");
        }
        let _ = self.state.records.flush();
        for s in sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// How long shutdown waits for the upstream push queue to drain.
const UPSTREAM_DRAIN: Duration = Duration::from_secs(30);

/// Makes the store directory owner-only, refusing one that belongs to another user.
fn owner_only(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::metadata(dir).map_err(|e| StartError::Store {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let uid = nix::unistd::geteuid().as_raw();
    if m.uid() != uid {
        return Err(StartError::StoreOwner {
            path: dir.display().to_string(),
            owner: m.uid(),
            uid,
        });
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| StartError::Store {
            path: dir.display().to_string(),
            reason: format!("cannot make it owner-only: {e}"),
        })?;
    }
    Ok(())
}

/// Accepts one connection; `None` on a transient accept error (the loop goes on).
/// The next connection, and the TLS acceptor its handshake needs, if any.
async fn accept(l: &Listener) -> Option<(Box<dyn IoStream>, Option<TlsAcceptor>)> {
    match l {
        Listener::Unix(u, _) => Some((Box::new(u.accept().await.ok()?.0), None)),
        Listener::Tcp(t) | Listener::Tls(t, _) => {
            let (s, _) = t.accept().await.ok()?;
            let _ = s.set_nodelay(true);
            let tls = match l {
                Listener::Tls(_, a) => Some(a.clone()),
                _ => None,
            };
            Some((Box::new(s), tls))
        }
    }
}

/// A connected stream of either kind.
pub trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> IoStream for T {}

/// A future that resolves on SIGINT or SIGTERM. The handlers are installed by this call,
/// not on first poll, so a signal that arrives right after start-up is not fatal.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(term) => {},
            _ = wait(int) => {},
        }
    }
}
