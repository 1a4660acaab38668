//! Staying under `--max-size`: when the blobs' files take more than the limit on disk (each
//! file once, however many blobs link it: a blob kept as runs links its base's files; never
//! by reading them), the least recently used blobs are evicted with the step records that
//! need them, down to 90 % of the limit, each counted for the bytes its removal frees. Blobs that named images use are
//! never evicted (a base image must stay buildable from). An evicted record leaves a
//! tombstone, so `lcache explain` says "evicted", not "never built".

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::api::now_ms;
use crate::state::AppState;
use crate::store::StoreError;

/// How often the background task checks, besides being woken after uploads.
const INTERVAL: Duration = Duration::from_secs(30);

/// How long a pack no blob links is kept (for readers that opened a blob before it went).
const PACK_IDLE: Duration = Duration::from_secs(600);

/// What one pass evicted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Blobs removed.
    pub blobs: u64,
    /// The bytes their removal freed.
    pub bytes: u64,
    /// Step records removed with them.
    pub records: u64,
}

/// One pass: evicts least recently used blobs until the total is at most 90 % of `max`.
pub fn evict_to(state: &AppState, max: u64) -> Result<Evicted, StoreError> {
    let blobs = state.records.blobs()?;
    let mut out = Evicted::default();
    // The blobs' full sizes bound what their files take: under it, nothing to count.
    if blobs.iter().map(|b| b.size).sum::<u64>() <= max {
        return Ok(out);
    }
    let mut total = match state.blobs.disk_usage() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("lcached: cannot measure the blob store ({e}); counting each blob's full size");
            blobs.iter().map(|b| b.size).sum()
        }
    };
    if total <= max {
        return Ok(out);
    }
    let target = max / 10 * 9;
    let mut protected = HashSet::new();
    let mut after = String::new();
    loop {
        let page = state.records.images(&after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.name.clone();
        for i in &page {
            protected.extend(i.layers.iter().map(|l| l.digest.clone()));
            protected.insert(i.config_digest.clone());
            protected.insert(i.manifest_digest.clone());
        }
    }
    let used: HashMap<String, u64> = state.records.access_times()?.into_iter().collect();
    let mut keys_of: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for (id, s) in state.records.step_entries()? {
        if let Some(l) = &s.layer {
            keys_of.entry(l.digest.clone()).or_default().push(id);
        }
    }
    let mut candidates: Vec<_> = blobs.into_iter().filter(|b| !protected.contains(&b.digest)).collect();
    // Never used since it was stored counts as least recently used.
    candidates.sort_by_key(|b| used.get(&b.digest).copied().unwrap_or(0));
    let now = now_ms();
    for b in candidates {
        if total <= target {
            break;
        }
        let keys = keys_of.remove(&b.digest).unwrap_or_default();
        let freed = state.blobs.freed_by_removing(&b.digest);
        state.records.evict_blob(&b.digest, &keys, now)?;
        // The metadata is gone, so nothing serves the file while it is deleted.
        if let Err(e) = state.blobs.remove(&b.digest) {
            eprintln!("lcached: evicted blob {} but cannot delete its file: {e}", b.digest);
        }
        total = total.saturating_sub(freed);
        out.blobs += 1;
        out.bytes += freed;
        out.records += keys.len() as u64;
    }
    state.metrics.evicted_blobs.fetch_add(out.blobs, Ordering::Relaxed);
    state.metrics.evicted_bytes.fetch_add(out.bytes, Ordering::Relaxed);
    Ok(out)
}

/// Keeps the store under `max`: a pass every 30 s and whenever an upload wakes it.
pub async fn run(state: Arc<AppState>, max: u64) {
    loop {
        let woken = state.evict_wake.notified();
        let s = state.clone();
        let packs = state.clone();
        // Packs of evicted blobs go once nobody can still be reading them.
        let _ = tokio::task::spawn_blocking(move || packs.blobs.collect_packs(PACK_IDLE)).await;
        match tokio::task::spawn_blocking(move || evict_to(&s, max)).await {
            Ok(Ok(e)) if e.blobs > 0 => eprintln!(
                "lcached: evicted {} blobs ({} bytes) and {} step records to stay under --max-size",
                e.blobs, e.bytes, e.records
            ),
            Ok(Err(e)) => eprintln!("lcached: eviction failed: {e}"),
            _ => {}
        }
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}
