//! Helpers for the end-to-end tests: find the real binaries, make build contexts in temp
//! directories, run `lcache` and read its JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The directory holding the workspace's built binaries (`target/debug`), found from the
/// test executable's own path (`target/debug/deps/…`) unless `LCACHE_BIN_DIR` says otherwise.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LCACHE_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Path of a workspace binary; fails with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run the tests with `cargo test --workspace`, which builds it",
        p.display()
    );
    p
}

/// A build context in a temp directory.
pub struct Project {
    dir: tempfile::TempDir,
}

impl Default for Project {
    fn default() -> Self {
        Self::new()
    }
}

impl Project {
    /// An empty context.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The context directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file (creating parent directories).
    pub fn write(&self, rel: &str, content: &str) -> &Self {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, content).expect("write");
        self
    }

    /// Writes `n` files `DIR/fNNNN.txt` of 1 KiB that gzip cannot shrink to nothing: enough
    /// of them for a COPY layer of several segments.
    pub fn write_many(&self, dir: &str, n: u32) -> &Self {
        for i in 0..n {
            let body: String = (0..64u32).map(|j| format!("{:016x}", mixed(i * 64 + j))).collect();
            self.write(&format!("{dir}/f{i:04}.txt"), &body);
        }
        self
    }

    /// Runs `lcache ARGS` in the context directory.
    pub fn lcache(&self, args: &[&str]) -> Output {
        Command::new(bin("lcache"))
            .args(args)
            .current_dir(self.path())
            .output()
            .expect("run lcache")
    }

    /// Runs `lcache keys --json --offline EXTRA .` and returns each step's key (or `pending`).
    pub fn keys(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["keys", "--json", "--offline"];
        args.extend_from_slice(extra);
        args.push(".");
        let out = self.lcache(&args);
        assert!(
            out.status.success(),
            "lcache keys failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("keys JSON");
        v["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| s["key"].as_str().map_or_else(|| "pending".to_string(), str::to_string))
            .collect()
    }
}

/// Which steps' keys differ between two runs (same step count expected).
pub fn changed(before: &[String], after: &[String]) -> Vec<bool> {
    assert_eq!(before.len(), after.len(), "step count changed");
    before.iter().zip(after).map(|(a, b)| a != b).collect()
}

impl Project {
    /// Runs `lcache ARGS` against the daemon `d`.
    pub fn lcache_with(&self, d: &Daemon, args: &[&str]) -> Output {
        Command::new(bin("lcache"))
            .args(args)
            .env("LCACHE_DAEMON", d.endpoint())
            .current_dir(self.path())
            .output()
            .expect("run lcache")
    }

    /// `lcache plan --json .` through daemon `d`, parsed.
    pub fn plan_with(&self, d: &Daemon) -> serde_json::Value {
        let out = self.lcache_with(d, &["plan", "--json", "."]);
        assert!(
            out.status.success(),
            "lcache plan failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("plan JSON")
    }
}

/// Each step's key (or `pending`) from a plan's JSON.
pub fn plan_keys(plan: &serde_json::Value) -> Vec<String> {
    plan["report"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["key"].as_str().map_or_else(|| "pending".to_string(), str::to_string))
        .collect()
}

/// A real `lcached` on a temp Unix socket, a TCP loopback port and a temp store.
pub struct Daemon {
    child: std::process::Child,
    dir: tempfile::TempDir,
    /// The Unix socket.
    pub socket: PathBuf,
    /// The TCP address (`127.0.0.1:PORT`).
    pub tcp: String,
    /// The TLS address, when `extra` asked for an `https://` listener.
    pub https: Option<String>,
}

impl Daemon {
    /// The value of the counter `name` in `GET /metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.http("GET", "/metrics", b"");
        let prefix = format!("{name} ");
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Starts a daemon with its own store; `extra` are more `lcached` arguments.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, extra)
    }

    /// Starts a daemon on the store and socket of `dir` (kept from an earlier daemon).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::start_env(dir, extra, &[])
    }

    /// As [`Daemon::start_in`], with more environment variables for `lcached`.
    pub fn start_env(dir: tempfile::TempDir, extra: &[&str], envs: &[(String, String)]) -> Self {
        let socket = dir.path().join("lcached.sock");
        let (child, listening) =
            spawn_daemon_env(dir.path(), &socket, extra, envs).unwrap_or_else(|e| panic!("lcached did not start: {e}"));
        let find = |scheme: &str| {
            listening
                .iter()
                .find_map(|l| l.strip_prefix(scheme).map(str::to_string))
        };
        Self {
            child,
            dir,
            socket,
            tcp: find("tcp://").unwrap_or_default(),
            https: find("https://"),
        }
    }

    /// `unix://…` of the socket.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The store directory.
    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the daemon with SIGKILL and returns its directory, to start another on it.
    pub fn kill9(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"))
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait for lcached")
    }

    /// One raw HTTP/1.1 request over the Unix socket: status and body.
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        raw_http(&self.socket, method, path, body, None)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `lcached` on `dir/store`, listening on `socket` and an ephemeral TCP port, and
/// waits until it says where it listens.
pub fn spawn_daemon(dir: &Path, socket: &Path, extra: &[&str]) -> Result<(std::process::Child, Vec<String>), String> {
    spawn_daemon_env(dir, socket, extra, &[])
}

/// As [`spawn_daemon`], with more environment variables (`AWS_*` for a bucket tier).
pub fn spawn_daemon_env(
    dir: &Path,
    socket: &Path,
    extra: &[&str],
    envs: &[(String, String)],
) -> Result<(std::process::Child, Vec<String>), String> {
    use std::io::BufRead;
    let mut child = Command::new(bin("lcached"))
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        .arg("--listen")
        .arg("tcp://127.0.0.1:0")
        .arg("--store")
        .arg(dir.join("store"))
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut listening = Vec::new();
    let mut started = false;
    for line in lines.by_ref() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(a) = line.strip_prefix("lcached: listening on ") {
            listening.push(a.to_string());
        }
        if line.starts_with("lcached: store ") {
            started = true;
            break;
        }
    }
    // Keep draining stdout so the daemon never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    match started {
        true => {
            // Its log too: a daemon that logs more than a pipe holds would block on it.
            if let Some(mut e) = child.stderr.take() {
                std::thread::spawn(move || std::io::copy(&mut e, &mut std::io::sink()));
            }
            Ok((child, listening))
        }
        false => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            Err(err)
        }
    }
}

/// A body of parts over `base`: `runs` of the blob `whole` (offset, length), the first and
/// every other one taken from the base, the rest sent.
pub fn parts_body(base: &str, runs: &[(usize, usize)], whole: &[u8]) -> Vec<u8> {
    let parts: Vec<lcache_proto::wire::BlobPart> = runs
        .iter()
        .enumerate()
        .map(|(i, &(offset, len))| match i % 2 {
            0 => lcache_proto::wire::BlobPart::Base {
                offset: offset as u64,
                len: len as u64,
            },
            _ => lcache_proto::wire::BlobPart::Sent { len: len as u64 },
        })
        .collect();
    let mut body = lcache_proto::wire::BlobParts {
        base: base.to_string(),
        parts,
    }
    .head()
    .unwrap();
    for (i, &(offset, len)) in runs.iter().enumerate() {
        if i % 2 == 1 {
            body.extend_from_slice(&whole[offset..offset + len]);
        }
    }
    body
}

/// PUTs a body of parts, declaring `declared` bytes; the status (0 if the answer broke off).
pub fn put_parts(socket: &Path, digest: &str, body: &[u8], declared: usize) -> u16 {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    use std::io::Write;
    write!(
        s,
        "PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Type: {}\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n",
        lcache_proto::wire::BLOB_PARTS_TYPE
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// POSTs a body of parts (`BLOB_PARTS_TYPE`) to `path`: the status and the answer's body.
pub fn post_parts(socket: &Path, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect to lcached");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: lcached\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        lcache_proto::wire::BLOB_PARTS_TYPE,
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write head");
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    parse_response(&resp)
}

/// One HTTP/1.1 request on a fresh Unix-socket connection (`Connection: close`); when
/// `declared_len` is given, that Content-Length is sent whatever the body's real length.
pub fn raw_http(socket: &Path, method: &str, path: &str, body: &[u8], declared_len: Option<usize>) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect to lcached");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: lcached\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        declared_len.unwrap_or(body.len())
    );
    s.write_all(head.as_bytes()).expect("write head");
    // A daemon may answer and close before reading a refused body: that is not a failure.
    let _ = s.write_all(body);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    parse_response(&resp)
}

fn parse_response(resp: &[u8]) -> (u16, Vec<u8>) {
    let text = String::from_utf8_lossy(resp);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body_at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |p| p + 4);
    let head = &text[..body_at.min(text.len())];
    let body = &resp[body_at..];
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return (status, dechunk(body));
    }
    (status, body.to_vec())
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(p) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..p]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < p + 2 + n {
            break;
        }
        out.extend_from_slice(&b[p + 2..p + 2 + n]);
        b = &b[(p + 4 + n).min(b.len())..];
    }
    out
}

/// `sha256:<hex>` of bytes, as blob names are.
/// A well-mixed number.
fn mixed(n: u32) -> u64 {
    let mut x = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 32)
}

/// Bytes under `dir` held by files with no other link: what a blob lcached keeps as runs
/// (a directory of links and sent bytes) added to its store.
pub fn own_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .expect("read a blob's directory")
        .map(|e| e.expect("entry").metadata().expect("metadata"))
        .filter(|m| m.nlink() == 1)
        .map(|m| m.len())
        .sum()
}

/// The size of blob `digest` as lcached serves it (a blob kept as runs is a directory).
pub fn blob_size(d: &Daemon, digest: &str) -> u64 {
    let (status, body) = d.http("GET", &format!("/v1/blobs/{digest}"), b"");
    assert_eq!(status, 200, "blob {digest}");
    body.len() as u64
}

/// The blobs of `store` kept as runs (directories), not whole.
pub fn blobs_kept_as_runs(store: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(store.join("blobs/sha256"))
        .expect("blob directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect()
}

/// gunzip through the system's gzip, so the test crate needs no compression library.
pub fn gunzip(gz: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = gz.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut out)
        .expect("gzip -dc");
    writer.join().expect("writer").expect("gzip's stdin");
    assert!(child.wait().expect("gzip").success(), "not gzip");
    out
}

pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{:x}", sha2::Sha256::digest(data))
}

/// A daemon, a client cache and an imported busybox base: what a real build needs.
pub struct BuildEnv {
    /// The daemon.
    pub daemon: Daemon,
    cache: tempfile::TempDir,
    /// `LCACHE_LAYER_COMPRESSION` for every `lcache` run, when not the default.
    layer_compression: Option<&'static str>,
}

impl Default for BuildEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl BuildEnv {
    /// Starts a daemon and imports `busybox:latest` made from Debian's busybox-static.
    /// Builds need root, runc and overlayfs (`.ci/run` installs runc and busybox-static).
    pub fn new() -> Self {
        Self::with_daemon_args(&[])
    }

    /// As [`BuildEnv::new`], with `lcached` started with `extra` arguments.
    pub fn with_daemon_args(extra: &[&str]) -> Self {
        Self::with_daemon_env(extra, &[])
    }

    /// As [`BuildEnv::with_daemon_args`], with more environment variables for `lcached`.
    pub fn with_daemon_env(extra: &[&str], envs: &[(String, String)]) -> Self {
        let env = Self {
            daemon: Daemon::start_env(tempfile::tempdir().expect("temp dir"), extra, envs),
            cache: tempfile::tempdir().expect("temp dir"),
            layer_compression: None,
        };
        let tar = env.cache.path().join("busybox.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/busybox-rootfs");
        let out = Command::new(&script)
            .arg(&tar)
            .output()
            .expect("run scripts/busybox-rootfs");
        assert!(
            out.status.success(),
            "cannot make the busybox base: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let p = Project::new();
        let out = env.lcache(&p, &["image", "import", tar.to_str().expect("utf-8"), "busybox:latest"]);
        assert!(
            out.status.success(),
            "import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        env
    }

    /// This environment, its builds keeping gzip layers (`--layer-compression gzip`): for
    /// tests of what only a gzip blob has (members, CRCs, a blob that is one file).
    pub fn with_gzip_layers(mut self) -> Self {
        self.layer_compression = Some("gzip");
        self
    }

    /// The client cache directory (snapshots live under `snapshots/`).
    pub fn cache_dir(&self) -> PathBuf {
        self.cache.path().join("cache")
    }

    /// `lcache build --progress plain .` in `p`, failing the test if it still runs after
    /// `limit` (a bound on a hang, not a timing target); its exit status and stderr.
    pub fn build_within(
        &self,
        p: &Project,
        limit: std::time::Duration,
        what: &str,
    ) -> (std::process::ExitStatus, String) {
        let mut child = self
            .command(p, &["build", "--progress", "plain", "."])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run lcache build");
        // Read beside the wait: a build that logs more than a pipe holds must not block.
        let mut stderr = child.stderr.take().expect("stderr");
        let log = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let status = exits_within(&mut child, limit, what);
        (status, log.join().unwrap_or_default())
    }

    /// `lcache ARGS` in `p` against this daemon and cache, not started yet.
    pub fn command(&self, p: &Project, args: &[&str]) -> Command {
        let mut c = Command::new(bin("lcache"));
        c.args(args)
            .env("LCACHE_DAEMON", self.daemon.endpoint())
            .env("LCACHE_CACHE_DIR", self.cache.path().join("cache"))
            .current_dir(p.path());
        if let Some(how) = self.layer_compression {
            c.env("LCACHE_LAYER_COMPRESSION", how);
        }
        c
    }

    /// Runs `lcache ARGS` in `p` against this daemon and cache.
    pub fn lcache(&self, p: &Project, args: &[&str]) -> Output {
        self.command(p, args).output().expect("run lcache")
    }

    /// `lcache build --progress json EXTRA .`: each step's (instruction, cached), and the
    /// image digest. Fails the test if the build fails.
    pub fn build(&self, p: &Project, extra: &[&str]) -> (Vec<(String, bool)>, String) {
        let out = self.try_build(p, extra);
        assert!(
            out.status.success(),
            "build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut steps = Vec::new();
        let mut image = String::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("json event");
            match v["event"].as_str() {
                Some("step") => steps.push((
                    v["instruction"].as_str().unwrap_or_default().to_string(),
                    v["cached"].as_bool().unwrap_or(false),
                )),
                Some("summary") => image = v["image"].as_str().unwrap_or_default().to_string(),
                _ => {}
            }
        }
        (steps, image)
    }

    /// `lcache build --progress json EXTRA .`, whatever its outcome.
    pub fn try_build(&self, p: &Project, extra: &[&str]) -> Output {
        let mut args = vec!["build", "--progress", "json"];
        args.extend_from_slice(extra);
        args.push(".");
        self.lcache(p, &args)
    }
}

/// Makes a token on `d` through its socket; returns it.
pub fn make_token(d: &Daemon, name: &str, access: &str) -> String {
    let (status, body) = d.http(
        "POST",
        "/v1/tokens",
        format!(r#"{{"name":"{name}","access":"{access}"}}"#).as_bytes(),
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    v["token"].as_str().expect("token").to_string()
}

/// One HTTP/1.1 request over TCP with an optional bearer token; the status and body.
pub fn tcp_http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .expect("write");
    s.write_all(body).expect("write body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.as_bytes().to_vec())
        .unwrap_or_default();
    (status, body)
}

/// Just the cached flags of a build's steps.
pub fn cached(steps: &[(String, bool)]) -> Vec<bool> {
    steps.iter().map(|(_, c)| *c).collect()
}

/// A TCP port on 127.0.0.1 that nothing listens on (a server the test starts takes it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until `addr` accepts connections (up to 10 s); stops `child` and panics naming
/// `what` if it never does.
pub fn wait_for_port(addr: &str, child: &mut std::process::Child, what: &str) {
    for _ in 0..400 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{what} did not start on {addr}");
}

/// moto's S3 server on 127.0.0.1 with one empty bucket, stopped when dropped
/// (`scripts/setup --tests` installs moto).
pub struct S3Server {
    child: std::process::Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The bucket it holds.
    pub bucket: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// Starts it and makes `bucket`.
    pub fn start(bucket: &str) -> Self {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 with moto (pip install 'moto[server]'; scripts/setup --tests installs it)");
        wait_for_port(&addr, &mut child, "moto's S3 server");
        let server = Self {
            child,
            addr,
            bucket: bucket.to_string(),
        };
        // The port opens before the server answers: ask until it does (up to 10 s).
        let mut last = String::new();
        for _ in 0..100 {
            match server.try_http("PUT", &format!("/{bucket}")) {
                Ok((200, _)) => return server,
                Ok((status, body)) => last = format!("{status}: {body}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("moto's S3 server would not make the bucket: {last}");
    }

    fn try_http(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        let (status, body) = self.try_request(method, path, b"")?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    fn try_request(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        use std::io::{Read, Write};
        // Reading an object anonymously is a 403; moto checks no signature.
        const SIGNED: &str =
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";
        let mut s = std::net::TcpStream::connect(&self.addr)?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\nAuthorization: {SIGNED}\r\n\r\n",
            self.addr,
            body.len(),
        )?;
        s.write_all(body)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(out.len());
        let head = String::from_utf8_lossy(&out[..split]).into_owned();
        let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            return Err(std::io::Error::other(
                "moto answered chunked; read it with a Content-Length",
            ));
        }
        Ok((status, out.get(split + 4..).unwrap_or_default().to_vec()))
    }

    /// One HTTP request to it (signed by no one: moto checks no signature): status and body.
    pub fn http(&self, method: &str, path: &str) -> (u16, String) {
        self.try_http(method, path).expect("a request to moto's S3 server")
    }

    /// As [`S3Server::http`], with a body, and the answer's bytes.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        self.try_request(method, path, body)
            .expect("a request to moto's S3 server")
    }

    /// The AWS environment a client of it needs.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", &format!("http://{}", self.addr)),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

/// A loopback TCP address that takes connections and never answers or closes them: an
/// overloaded server, or one behind a firewall that drops packets.
pub fn silent_listener() -> std::net::SocketAddr {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = silent.local_addr().expect("its address");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            held.push(conn);
        }
    });
    addr
}

/// Waits for `child` to exit, killing it and failing the test (`what` says what it was
/// waiting for) after `limit`: a bound on a hang, not a timing target.
pub fn exits_within(
    child: &mut std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("still running after {} s: {what}", limit.as_secs());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
