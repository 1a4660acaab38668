//! The fresh gzip members of a segmented layer, compressed on worker threads ahead of the
//! writer and handed back in blob order. Compression is what a cold COPY's pack spends its
//! time on, and each segment's member is independent of the others; the blob's digest and
//! the tar's SHA-256 stay sequential on the writer, which is many times faster than gzip.
//! At most a few members wait compressed at a time, so memory stays bounded.

use std::collections::HashMap;
use std::io;
use std::sync::{Condvar, Mutex};

/// A segment compressed: its gzip member, and its tar bytes when they are to be hashed.
pub struct Compressed {
    /// The gzip member.
    pub member: Vec<u8>,
    /// The uncompressed tar bytes (empty unless asked for).
    pub tar: Vec<u8>,
}

/// How many members may wait compressed per worker.
const AHEAD: usize = 2;

struct State {
    /// The next job a worker takes.
    next: usize,
    /// How many results the writer has taken.
    taken: usize,
    done: HashMap<usize, io::Result<Compressed>>,
    stop: bool,
}

/// The writer's end: each job's result, in job order.
pub struct Fetcher<'a> {
    state: &'a Mutex<State>,
    changed: &'a Condvar,
}

impl Fetcher<'_> {
    /// The next job's result, waiting for it if a worker is still on it.
    pub fn take(&mut self) -> io::Result<Compressed> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| io::Error::other("a compression worker failed"))?;
        loop {
            let k = s.taken;
            if let Some(r) = s.done.remove(&k) {
                s.taken += 1;
                self.changed.notify_all();
                return r;
            }
            s = self
                .changed
                .wait(s)
                .map_err(|_| io::Error::other("a compression worker failed"))?;
        }
    }
}

/// How many workers to compress on: every core, up to four.
pub fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(4)
}

/// Runs `write` with a [`Fetcher`] of `jobs` compressed by `compress` on `workers` threads
/// (taken in order, at most `AHEAD` per worker past the writer). The workers stop when
/// `write` returns.
pub fn compressed_ahead<J: Sync, T>(
    jobs: &[J],
    workers: usize,
    compress: &(dyn Fn(&J) -> io::Result<Compressed> + Sync),
    write: impl FnOnce(&mut Fetcher) -> io::Result<T>,
) -> io::Result<T> {
    let state = Mutex::new(State {
        next: 0,
        taken: 0,
        done: HashMap::new(),
        stop: false,
    });
    let changed = Condvar::new();
    let window = workers.max(1) * AHEAD;
    std::thread::scope(|s| {
        for _ in 0..workers.max(1).min(jobs.len()) {
            s.spawn(|| loop {
                let k = {
                    let Ok(mut st) = state.lock() else { return };
                    while !st.stop && st.next < jobs.len() && st.next >= st.taken + window {
                        st = match changed.wait(st) {
                            Ok(st) => st,
                            Err(_) => return,
                        };
                    }
                    if st.stop || st.next >= jobs.len() {
                        return;
                    }
                    st.next += 1;
                    st.next - 1
                };
                let r = compress(&jobs[k]);
                let Ok(mut st) = state.lock() else { return };
                st.done.insert(k, r);
                changed.notify_all();
            });
        }
        let out = write(&mut Fetcher {
            state: &state,
            changed: &changed,
        });
        if let Ok(mut st) = state.lock() {
            st.stop = true;
        }
        changed.notify_all();
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_job_order_whatever_finishes_first() {
        let jobs: Vec<u64> = (0..50).collect();
        let compress = |j: &u64| {
            // Later jobs finish first.
            std::thread::sleep(std::time::Duration::from_micros(1000 - j * 20));
            Ok(Compressed {
                member: j.to_le_bytes().to_vec(),
                tar: Vec::new(),
            })
        };
        let got = compressed_ahead(&jobs, 4, &compress, |f| {
            (0..jobs.len())
                .map(|_| f.take().map(|c| c.member[0]))
                .collect::<io::Result<Vec<u8>>>()
        })
        .unwrap();
        assert_eq!(got, (0..50u8).collect::<Vec<_>>());
    }

    #[test]
    fn a_failed_job_is_its_result_and_the_writer_may_stop_early() {
        let jobs: Vec<u64> = (0..20).collect();
        let compress = |j: &u64| {
            if *j == 3 {
                Err(io::Error::other("unreadable"))
            } else {
                Ok(Compressed {
                    member: vec![],
                    tar: vec![],
                })
            }
        };
        let r = compressed_ahead(&jobs, 2, &compress, |f| {
            for _ in 0..jobs.len() {
                f.take()?;
            }
            Ok(())
        });
        assert!(r.is_err());
    }
}
