//! Makes sure lcached ends once asked to, even when its runtime cannot: SIGTERM and SIGINT
//! are also caught outside tokio, by a plain thread that ends the process a grace period
//! after the first signal, or at once on a second one (Ctrl-C twice). A task that never
//! yields (one did: a reader that spun on a request) starves tokio's own signal handling
//! and keeps its shutdown from finishing. The store survives a kill mid-write, so ending
//! the process this way loses nothing that was acknowledged.

use std::io::Read;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Arms the watchdog: from now on, the process ends `grace` after a SIGTERM or SIGINT (a
/// clean stop takes less), or at a second one.
pub fn arm(grace: Duration) -> std::io::Result<()> {
    let (mut heard, tell) = UnixStream::pair()?;
    tell.set_nonblocking(true)?;
    // Open for the life of the process: the handlers write to it.
    let tell = tell.into_raw_fd();
    for signal in [nix::libc::SIGTERM, nix::libc::SIGINT] {
        // SAFETY: the action only calls write(2), which is async-signal-safe, on a
        // descriptor that is never closed; a full buffer just drops the byte.
        unsafe {
            signal_hook_registry::register(signal, move || {
                let _ = nix::libc::write(tell, [1u8].as_ptr().cast(), 1);
            })?;
        }
    }
    std::thread::Builder::new()
        .name("stop-watchdog".into())
        .spawn(move || {
            let mut byte = [0u8; 1];
            if !matches!(heard.read(&mut byte), Ok(1)) {
                return;
            }
            eprintln!(
                "lcached: stopping (at most {} s more; a second signal exits at once)",
                grace.as_secs()
            );
            let why = match heard.set_read_timeout(Some(grace)).and_then(|()| heard.read(&mut byte)) {
                Ok(1) => "a second signal".to_string(),
                _ => format!("still running {} s after the signal", grace.as_secs()),
            };
            eprintln!(
                "lcached: {why}; exiting now (what the store acknowledged is kept; --stop-timeout sets the wait)"
            );
            std::process::exit(1);
        })?;
    Ok(())
}
