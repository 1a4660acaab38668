//! Layers' diff_ids, taken after their blob is stored (`POST /v1/layers`) while the build
//! goes on, and handed over by `POST /v1/layers/{digest}/diff-id`. A diff_id after an edit
//! is the tar behind the change inflated and hashed again: most of a second on a large
//! layer, which the build spends running the steps after its COPY instead of waiting.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use lcache_image::layer_segments::diff_id_after;
use lcache_proto::wire::{LayerDiffId, LayerTail};
use tokio::sync::watch;

use crate::store::blob_file::BlobFile;

/// What taking a diff_id came to: the diff_id, or why the layer's tar cannot be hashed.
pub type Outcome = Result<LayerDiffId, String>;

/// At most this many diff_ids wait for their build to ask; past it the oldest is dropped
/// (and taken again if it is asked for after all).
const KEPT: usize = 64;

/// The diff_ids being taken or waiting to be asked for.
#[derive(Default)]
pub struct LayerNaming {
    jobs: Mutex<Jobs>,
}

#[derive(Default)]
struct Jobs {
    by_key: HashMap<String, watch::Receiver<Option<Outcome>>>,
    order: VecDeque<String>,
}

/// A job is the layer and the tail it is hashed from: a request with another tail (which
/// only a client that lost track could send) is hashed afresh.
fn job_key(digest: &str, tail: &LayerTail) -> String {
    let mut h = blake3::Hasher::new();
    h.update(digest.as_bytes());
    h.update(&tail.tar_state);
    h.update(&tail.first.to_le_bytes());
    for m in &tail.members {
        h.update(&m.to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// The diff_id of `blob` after `tail` (blocking: inflates and hashes on every core).
pub fn diff_id_of(blob: &BlobFile, tail: &LayerTail) -> Outcome {
    let read = |buf: &mut [u8], offset: u64| blob.read_exact_at(buf, offset);
    diff_id_after(
        &read,
        blob.len(),
        &tail.tar_state,
        tail.first,
        &tail.members,
        tail.compression,
    )
    .map(|(diff_id, tar_states)| LayerDiffId { diff_id, tar_states })
    .map_err(|e| format!("the layer's tar after its change cannot be hashed: {e}"))
}

/// A diff_id being taken, not yet known by its layer's digest.
#[derive(Debug)]
pub struct Started(watch::Receiver<Option<Outcome>>);

impl Started {
    /// Whether it is done (a tar's diff_id is, as the layer is named).
    pub fn is_done(&self) -> bool {
        self.0.borrow().is_some()
    }
}

/// Starts taking the diff_id of `blob` after `tail` on the blocking pool (from the open
/// files of a blob still being checked: it need not wait for the blob's digest).
pub fn start(blob: BlobFile, tail: LayerTail) -> Started {
    let (tx, rx) = watch::channel(None);
    tokio::task::spawn_blocking(move || {
        let _ = tx.send(Some(diff_id_of(&blob, &tail)));
    });
    Started(rx)
}

/// A diff_id known as the layer is named (a tar's: its digest), as a finished job.
pub fn known(diff_id: LayerDiffId) -> Started {
    let (tx, rx) = watch::channel(Some(Ok(diff_id)));
    drop(tx);
    Started(rx)
}

impl LayerNaming {
    /// Keeps `started`, the diff_id of the layer stored as `digest` after `tail`, for
    /// [`Self::wait`].
    pub fn keep(&self, digest: &str, tail: &LayerTail, started: Started) {
        let key = job_key(digest, tail);
        if let Ok(mut jobs) = self.jobs.lock() {
            if jobs.by_key.insert(key.clone(), started.0).is_none() {
                jobs.order.push_back(key);
            }
            while jobs.order.len() > KEPT {
                if let Some(old) = jobs.order.pop_front() {
                    jobs.by_key.remove(&old);
                }
            }
        }
    }

    /// Keeps a diff_id already taken (by a build being named, for the next build of its
    /// step, which asks for the tar's states).
    pub fn keep_known(&self, digest: &str, tail: &LayerTail, diff_id: LayerDiffId) {
        self.keep(digest, tail, known(diff_id));
    }

    /// The diff_id of `digest` after `tail`: the one kept by [`Self::keep`], or else
    /// taken now from the blob `open` gives (`None`: it is not stored). Says too whether it
    /// was the kept one, started as the blob was named (a failure then means the blob, or
    /// the one its unchanged members came from, is damaged; for any other request it may
    /// as well be the request's).
    pub async fn wait(
        &self,
        digest: &str,
        tail: LayerTail,
        open: impl FnOnce() -> Option<BlobFile>,
    ) -> Option<(Outcome, bool)> {
        let key = job_key(digest, &tail);
        let job = self.jobs.lock().ok().and_then(|mut jobs| {
            jobs.order.retain(|k| *k != key);
            jobs.by_key.remove(&key)
        });
        if let Some(mut rx) = job {
            let outcome = match rx.wait_for(Option::is_some).await {
                Ok(done) => done.clone(),
                Err(_) => None,
            };
            // A job that ended without an outcome (its thread failed) is taken again.
            if let Some(outcome) = outcome {
                return Some((outcome, true));
            }
        }
        let blob = open()?;
        tokio::task::spawn_blocking(move || diff_id_of(&blob, &tail))
            .await
            .ok()
            .map(|outcome| (outcome, false))
    }
}
