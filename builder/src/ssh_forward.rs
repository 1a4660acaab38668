//! `RUN --mount=type=ssh`: a socket in the step's work directory, with the owner and mode
//! the mount asks for, that forwards each connection to the agent `lcache build --ssh`
//! named. The RUN sees this proxy, never the host's socket path or its permissions, and the
//! proxy is gone when the RUN ends, as BuildKit's is.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A running forwarder; dropping it stops it and removes its socket.
pub struct AgentForward {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AgentForward {
    /// Listens at `socket` (owned by `uid:gid`, `mode`) and forwards to `agent`, which must
    /// accept a connection now (so a wrong `--ssh` path fails before the RUN starts).
    pub fn start(agent: &Path, socket: &Path, owner: (u32, u32), mode: u32) -> io::Result<Self> {
        UnixStream::connect(agent)?;
        let listener = UnixListener::bind(socket)?;
        std::os::unix::fs::chown(socket, Some(owner.0), Some(owner.1))?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode & 0o7777))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, agent) = (stop.clone(), agent.to_path_buf());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(client) = conn {
                    let agent = agent.clone();
                    std::thread::spawn(move || pipe(client, &agent));
                }
            }
        });
        Ok(Self {
            socket: socket.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket to mount into the RUN.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for AgentForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The accept loop only sees the flag when a connection arrives: make one.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Copies both ways between a RUN's connection and a new one to the agent until either
/// side closes.
fn pipe(client: UnixStream, agent: &Path) {
    let Ok(upstream) = UnixStream::connect(agent) else {
        return;
    };
    let (Ok(mut client_r), Ok(mut upstream_w)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut client_r, &mut upstream_w);
        let _ = upstream_w.shutdown(std::net::Shutdown::Write);
    });
    let (mut upstream_r, mut client_w) = (upstream, client);
    let _ = io::copy(&mut upstream_r, &mut client_w);
    let _ = client_w.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn forwards_both_ways_with_the_asked_mode_and_stops_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let agent_path = dir.path().join("agent");
        let agent = UnixListener::bind(&agent_path).unwrap();
        let echo = std::thread::spawn(move || {
            // One probe connection from start(), then the real one.
            for conn in agent.incoming().take(2) {
                let mut c = conn.unwrap();
                let mut buf = Vec::new();
                c.read_to_end(&mut buf).unwrap();
                let _ = c.write_all(&buf.iter().rev().copied().collect::<Vec<_>>());
            }
        });
        let socket = dir.path().join("fwd");
        let fwd = AgentForward::start(&agent_path, &socket, (0, 0), 0o600).unwrap();
        assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
        let mut c = UnixStream::connect(fwd.socket()).unwrap();
        c.write_all(b"abc").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert_eq!(got, "cba");
        drop(fwd);
        assert!(!socket.exists(), "the socket goes with the forwarder");
        echo.join().unwrap();
        assert!(AgentForward::start(&dir.path().join("none"), &socket, (0, 0), 0o600).is_err());
    }
}
