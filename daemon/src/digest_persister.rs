//! Writes what plans learnt about context files to the record store on a thread of its own,
//! in the order plans learnt it. A plan waits for its write only when it read new contents
//! (so a digest that cost real reads survives a crash the moment the plan answers); a plan
//! that only found moved stamps (a touched tree, a checkout that rewrote files unchanged)
//! answers at once, and a crash before the write costs the next plan a re-read, never a
//! wrong digest: each stored digest is checked against its stamp before use.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::store::{CachedDigest, RecordStore, StoreError};

/// One plan's changes to one context's stored digests.
struct Job {
    root_key: String,
    upserts: Vec<(String, CachedDigest)>,
    removals: Vec<String>,
    done: Option<mpsc::Sender<Result<(), StoreError>>>,
}

/// The writer thread and its queue.
pub struct DigestPersister {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl DigestPersister {
    /// Starts the writer over `records`.
    pub fn start(records: Arc<dyn RecordStore>) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("digest-persister".into())
            .spawn(move || {
                for job in rx {
                    let written = write(&*records, &job);
                    if job.upserts.len() > 10_000 {
                        crate::memory_release::release_free_memory();
                    }
                    match job.done {
                        Some(done) => {
                            let _ = done.send(written);
                        }
                        None => {
                            if let Err(e) = written {
                                eprintln!("lcached: cannot keep file digests of {}: {e}", job.root_key);
                            }
                        }
                    }
                }
            })
            .ok();
        Self {
            queue: Mutex::new(thread.is_some().then_some(tx)),
            thread: Mutex::new(thread),
        }
    }

    /// Queues a write; with `wait`, returns once it is durable. Without a writer thread
    /// (one could not be started) the write is made here.
    pub fn persist(
        &self,
        records: &dyn RecordStore,
        root_key: &str,
        upserts: Vec<(String, CachedDigest)>,
        removals: Vec<String>,
        wait: bool,
    ) -> Result<(), StoreError> {
        let (done, finished) = if wait {
            let (tx, rx) = mpsc::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let mut job = Job {
            root_key: root_key.to_string(),
            upserts,
            removals,
            done,
        };
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = queue.as_ref() {
            match q.send(job) {
                Ok(()) => {
                    drop(queue);
                    return match finished.map(|f| f.recv()) {
                        Some(Ok(r)) => r,
                        Some(Err(_)) => Err(StoreError::Db("the digest writer stopped".into())),
                        None => Ok(()),
                    };
                }
                Err(mpsc::SendError(back)) => job = back,
            }
        }
        drop(queue);
        write(records, &job)
    }

    /// Waits until every queued write is durable (at shutdown, and in tests).
    pub fn drain(&self, records: &dyn RecordStore) -> Result<(), StoreError> {
        self.persist(records, "", Vec::new(), Vec::new(), true)
    }
}

impl Drop for DigestPersister {
    fn drop(&mut self) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn write(records: &dyn RecordStore, job: &Job) -> Result<(), StoreError> {
    if job.upserts.is_empty() && job.removals.is_empty() {
        return Ok(());
    }
    records.update_context_digests(&job.root_key, &job.upserts, &job.removals)?;
    // Hashing cost real reads; make it survive a crash so a restart does not repeat it.
    records.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_records::SledRecords;
    use lcache_proto::source_select::FileStamp;

    fn digest(n: u8) -> CachedDigest {
        CachedDigest {
            stamp: FileStamp {
                mtime_ns: i64::from(n),
                ..FileStamp::default()
            },
            size: 1,
            digest: [n; 32],
        }
    }

    #[test]
    fn writes_land_in_order_and_a_waited_write_is_stored_on_return() {
        let dir = tempfile::tempdir().unwrap();
        let records: Arc<dyn RecordStore> = Arc::new(SledRecords::open(&dir.path().join("db")).unwrap());
        let p = DigestPersister::start(records.clone());
        p.persist(&*records, "/ctx", vec![("a".into(), digest(1))], vec![], true)
            .unwrap();
        assert_eq!(
            records.context_digests("/ctx").unwrap(),
            vec![("a".to_string(), digest(1))]
        );
        for n in 2..50 {
            p.persist(&*records, "/ctx", vec![("a".into(), digest(n))], vec![], false)
                .unwrap();
        }
        p.persist(&*records, "/ctx", vec![("b".into(), digest(7))], vec![], false)
            .unwrap();
        p.drain(&*records).unwrap();
        let mut kept = records.context_digests("/ctx").unwrap();
        kept.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            kept,
            vec![("a".to_string(), digest(49)), ("b".to_string(), digest(7))],
            "the last write wins"
        );
        drop(p);
        // The writer is gone: writes are made in place.
        let p = DigestPersister::start(records.clone());
        p.queue.lock().unwrap().take();
        p.persist(&*records, "/ctx", vec![], vec!["b".into()], false).unwrap();
        assert_eq!(records.context_digests("/ctx").unwrap().len(), 1);
    }
}
