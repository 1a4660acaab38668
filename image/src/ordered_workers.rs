//! Independent jobs run on worker threads ahead of one consumer that takes their results in
//! job order: a segmented layer's gzip members compressed (what a cold COPY's pack spends
//! its time on) or inflated (what the diff_id after an edit spends it on). The blob's digest
//! and the tar's SHA-256 stay sequential on the consumer, which is many times faster than
//! gzip. At most a few results wait at a time, so memory stays bounded.

use std::collections::HashMap;
use std::io;
use std::sync::{Condvar, Mutex};

/// How many results may wait per worker.
const AHEAD: usize = 2;

struct State<O> {
    /// The next job a worker takes.
    next: usize,
    /// How many results the writer has taken.
    taken: usize,
    done: HashMap<usize, io::Result<O>>,
    stop: bool,
}

/// The consumer's end: each job's result, in job order.
pub struct Fetcher<'a, O> {
    state: &'a Mutex<State<O>>,
    changed: &'a Condvar,
}

impl<O> Fetcher<'_, O> {
    /// The next job's result, waiting for it if a worker is still on it.
    pub fn take(&mut self) -> io::Result<O> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| io::Error::other("a worker thread failed"))?;
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
                .map_err(|_| io::Error::other("a worker thread failed"))?;
        }
    }
}

/// How many workers to run on: every core, up to four.
pub fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(4)
}

/// Runs `consume` with a [`Fetcher`] of `jobs` done by `work` on `workers` threads (taken
/// in order, at most `AHEAD` per worker past the consumer). The workers stop when
/// `consume` returns.
pub fn in_order<J: Sync, O: Send, T>(
    jobs: &[J],
    workers: usize,
    work: &(dyn Fn(&J) -> io::Result<O> + Sync),
    consume: impl FnOnce(&mut Fetcher<O>) -> io::Result<T>,
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
                let r = work(&jobs[k]);
                let Ok(mut st) = state.lock() else { return };
                st.done.insert(k, r);
                changed.notify_all();
            });
        }
        let out = consume(&mut Fetcher {
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
        let work = |j: &u64| {
            // Later jobs finish first.
            std::thread::sleep(std::time::Duration::from_micros(1000 - j * 20));
            Ok(*j as u8)
        };
        let got = in_order(&jobs, 4, &work, |f| {
            (0..jobs.len()).map(|_| f.take()).collect::<io::Result<Vec<u8>>>()
        })
        .unwrap();
        assert_eq!(got, (0..50u8).collect::<Vec<_>>());
    }

    #[test]
    fn a_failed_job_is_its_result_and_the_consumer_may_stop_early() {
        let jobs: Vec<u64> = (0..20).collect();
        let work = |j: &u64| {
            if *j == 3 {
                Err(io::Error::other("unreadable"))
            } else {
                Ok(())
            }
        };
        let r = in_order(&jobs, 2, &work, |f| {
            for _ in 0..jobs.len() {
                f.take()?;
            }
            Ok(())
        });
        assert!(r.is_err());
    }
}
