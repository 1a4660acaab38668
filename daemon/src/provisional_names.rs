//! Layers answered before they are named (`POST /v1/layers` with `name_later`): the
//! blob's SHA-256 runs over everything after an edit's change (about 0.1 s per 170 MB of
//! compressed layer), so a client that does not need the digest at once is answered with a
//! provisional name as soon as the sent bytes are durable, and the layer is checked and
//! named behind. What each name came to is kept in the store (the newest
//! [`KEPT`]), for deferred builds being named and for the client's next build, which
//! resolves the names its snapshots bear (`POST /v1/layers/provisional`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lcache_proto::wire::{NamedLayer, PROVISIONAL_PREFIX};
use tokio::sync::watch;

use crate::store::{ProvisionalOutcome, RecordStore, StoreError};

/// How many names' outcomes the store keeps: a client resolves its names at its next
/// build, so this is many builds' worth.
pub const KEPT: usize = 4096;

/// The names whose layers are being named.
#[derive(Default)]
pub struct ProvisionalNames {
    naming: Mutex<HashMap<String, watch::Receiver<Option<ProvisionalOutcome>>>>,
    given: AtomicU64,
}

/// A name given, whose outcome [`ProvisionalNames::finish`] reports.
pub struct Naming {
    name: String,
    tx: watch::Sender<Option<ProvisionalOutcome>>,
}

impl Naming {
    /// The provisional name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl ProvisionalNames {
    /// Gives a new name, being named from now on. Names sort by the time they were given
    /// (the store forgets the oldest first) and never repeat (a count and the process's id
    /// are hashed in).
    pub fn begin(&self) -> Naming {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let count = self.given.fetch_add(1, Ordering::Relaxed);
        let mut h = blake3::Hasher::new();
        h.update(&now.as_nanos().to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        h.update(&count.to_le_bytes());
        let unique = h.finalize().to_hex();
        let name = format!(
            "{PROVISIONAL_PREFIX}{:016x}{:08x}{}",
            now.as_millis() as u64,
            count as u32,
            &unique[..40]
        );
        let (tx, rx) = watch::channel(None);
        self.lock().insert(name.clone(), rx);
        Naming { name, tx }
    }

    /// Takes up naming `name` again (given before the daemon last stopped).
    pub fn resume(&self, name: &str) -> Naming {
        let (tx, rx) = watch::channel(None);
        self.lock().insert(name.to_string(), rx);
        Naming {
            name: name.to_string(),
            tx,
        }
    }

    /// Keeps what `name` came to in `records`, durably: called before the layer leaves
    /// `provisional/` as well as by [`Self::finish`], so a kill between the two loses
    /// neither the layer nor its name.
    pub fn keep(&self, records: &dyn RecordStore, name: &str, outcome: &ProvisionalOutcome) -> Result<(), StoreError> {
        records
            .put_provisional(name, outcome, KEPT)
            .and_then(|()| records.flush())
    }

    /// Reports what `naming` came to: kept in `records` first, so that a reader who no
    /// longer finds the name being named finds its outcome there.
    pub fn finish(&self, records: &dyn RecordStore, naming: Naming, outcome: ProvisionalOutcome) {
        let kept = self.keep(records, &naming.name, &outcome);
        if let Err(e) = kept {
            eprintln!("lcached: cannot keep what layer {} was named: {e}", naming.name);
        }
        let _ = naming.tx.send(Some(outcome));
        self.lock().remove(&naming.name);
    }

    /// What `name` came to, waiting while it is being named; `None` when it is unknown.
    pub async fn resolve(&self, records: &dyn RecordStore, name: &str) -> Option<ProvisionalOutcome> {
        let naming = self.lock().get(name).cloned();
        if let Some(mut rx) = naming {
            if let Ok(done) = rx.wait_for(Option::is_some).await {
                return done.clone();
            }
        }
        records.get_provisional(name).ok().flatten()
    }

    /// The layer `name` came to, or why there is none.
    pub async fn layer(&self, records: &dyn RecordStore, name: &str) -> Result<NamedLayer, String> {
        match self.resolve(records, name).await {
            Some(ProvisionalOutcome::Named(layer)) => Ok(layer),
            Some(ProvisionalOutcome::Failed(reason)) => Err(reason),
            None => Err("the daemon does not know it (it stopped before naming the layer, or forgot it)".into()),
        }
    }

    /// Whether `name` is being named or came to a stored layer.
    pub fn known(&self, records: &dyn RecordStore, name: &str) -> bool {
        self.lock().contains_key(name)
            || matches!(records.get_provisional(name), Ok(Some(ProvisionalOutcome::Named(_))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<Option<ProvisionalOutcome>>>> {
        self.naming.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_records::SledRecords;
    use lcache_proto::wire::is_provisional;
    use std::time::Duration;

    fn layer(digest: &str) -> NamedLayer {
        NamedLayer {
            digest: digest.into(),
            size: 7,
            blob_states: vec![vec![1, 2]],
        }
    }

    #[tokio::test]
    async fn a_name_resolves_once_named_and_after_a_restart_and_an_unknown_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let records = SledRecords::open(dir.path()).unwrap();
        let names = ProvisionalNames::default();
        let (a, b) = (names.begin(), names.begin());
        let (name_a, name_b) = (a.name().to_string(), b.name().to_string());
        assert!(is_provisional(&name_a), "{name_a}");
        assert!(name_a < name_b, "names sort by when they were given");
        assert!(names.known(&records, &name_a));

        // A reader waits while the layer is being named.
        let waiting = tokio::time::timeout(Duration::from_millis(50), names.resolve(&records, &name_a)).await;
        assert!(waiting.is_err(), "answered before the layer was named");
        names.finish(&records, a, ProvisionalOutcome::Named(layer("sha256:aa")));
        names.finish(&records, b, ProvisionalOutcome::Failed("damaged".into()));
        assert_eq!(names.layer(&records, &name_a).await, Ok(layer("sha256:aa")));
        assert_eq!(names.layer(&records, &name_b).await, Err("damaged".into()));
        assert!(!names.known(&records, &name_b), "a failed name stands for no layer");
        drop(records);

        let records = crate::store::sled_records::tests::reopen(dir.path());
        let names = ProvisionalNames::default();
        assert_eq!(names.layer(&records, &name_a).await, Ok(layer("sha256:aa")));
        let unknown = format!("{PROVISIONAL_PREFIX}{}", "0".repeat(64));
        assert!(names.resolve(&records, &unknown).await.is_none());
        assert!(!names.known(&records, &unknown));
    }

    #[test]
    fn the_store_keeps_the_newest_names_only() {
        let dir = tempfile::tempdir().unwrap();
        let records = SledRecords::open(dir.path()).unwrap();
        let names = ProvisionalNames::default();
        let given: Vec<String> = (0..5)
            .map(|i| {
                let n = names.begin();
                let name = n.name().to_string();
                records
                    .put_provisional(&name, &ProvisionalOutcome::Named(layer(&format!("sha256:{i}"))), 3)
                    .unwrap();
                name
            })
            .collect();
        for (i, name) in given.iter().enumerate() {
            assert_eq!(records.get_provisional(name).unwrap().is_some(), i >= 2, "{i}");
        }
        drop(records);
        // Counted again at open: one more forgets one more.
        let records = crate::store::sled_records::tests::reopen(dir.path());
        let last = names.begin();
        records
            .put_provisional(last.name(), &ProvisionalOutcome::Failed("x".into()), 3)
            .unwrap();
        assert!(records.get_provisional(&given[2]).unwrap().is_none());
        assert!(records.get_provisional(&given[3]).unwrap().is_some());
    }
}
