//! A network connection that fails once nothing has moved either way for a while. hyper
//! waits for an answer as long as the peer keeps the connection open, and a peer that
//! accepted and went silent (overloaded, or behind a firewall that drops packets) would
//! hold a build for ever. A deadline on progress, not on the whole exchange, so that a
//! large upload or download that keeps moving is never cut.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The message that marks a stall, so callers can tell it from other I/O errors.
const STALLED: &str = "no byte moved either way within the stall limit";

/// Whether `e` is a guard's stall.
pub fn is_stall(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut && e.get_ref().is_some_and(|inner| inner.to_string() == STALLED)
}

/// `inner`, failing with a stall once `limit` passes without a byte read or written.
pub struct StallGuard<S> {
    inner: S,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> StallGuard<S> {
    /// Guards `inner`; the clock starts now.
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
        }
    }

    fn moved(&mut self) {
        let next = Instant::now() + self.limit;
        self.deadline.as_mut().reset(next);
    }

    /// A write's outcome: progress if it took bytes, else (pending) the deadline's check.
    fn wrote(&mut self, r: Poll<io::Result<usize>>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.waiting(cx),
        }
    }

    /// Called when the inner side has nothing yet: an error once the deadline has passed
    /// (its timer now wakes the task when it does).
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, STALLED))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.waiting(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(r, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => self.waiting(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => self.waiting(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_a_stall_and_a_slow_steady_one_is_not() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(ours, Duration::from_secs(5));
        // A byte every 4 s keeps a 5 s guard from firing, over 20 s in all.
        let feeder = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                theirs.write_all(b"x").await.unwrap();
            }
            theirs
        });
        let mut got = [0u8; 5];
        guarded.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"xxxxx");
        let _theirs = feeder.await.unwrap();
        // Then silence: the read fails as a stall once 5 s pass.
        let e = guarded.read_u8().await.unwrap_err();
        assert!(is_stall(&e), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_stalls_the_writer() {
        let (ours, _theirs) = tokio::io::duplex(16);
        let mut guarded = StallGuard::new(ours, Duration::from_secs(5));
        let e = guarded.write_all(&[0u8; 1024]).await.unwrap_err();
        assert!(is_stall(&e), "{e}");
        assert!(!is_stall(&io::Error::new(io::ErrorKind::TimedOut, "another timeout")));
    }
}
