//! Snapshots of layers lcached answered with a provisional name (`name_later`): a build
//! that hands its image to lcached does not wait for the blob's SHA-256, which runs over
//! everything after an edit's change. Such a snapshot is kept under the name's hex; once
//! the build that made it no longer uses it, the name is listed in `provisional/`, and the
//! next build asks lcached what each name came to and renames the snapshot to its digest
//! (completing its segment index with the blob's states, which only that hashing gives),
//! or removes a snapshot that stands for no stored layer.

use std::path::Path;

use lcache_proto::wire::{NamedLayer, PROVISIONAL_PREFIX};

use crate::cache_dir::CacheDir;
use crate::copy_seed::{keep_blob_states, segments_beside, DeltaUnit};
use crate::snapshot_prune::remove_snapshot;
use crate::step_cache::StepCache;

/// The directory of names to resolve, one empty file per name's hex.
const LISTED: &str = "provisional";

fn hex_of(name: &str) -> Option<&str> {
    lcache_proto::wire::is_provisional(name).then(|| &name[PROVISIONAL_PREFIX.len()..])
}

/// Lists `names` for the next build to resolve: call once this build no longer uses their
/// snapshots (another build renames them). A name that cannot be listed leaves its
/// snapshot to be pruned, unused.
pub fn list(cache: &CacheDir, names: &[String]) {
    if names.is_empty() {
        return;
    }
    let dir = cache.root().join(LISTED);
    let _ = std::fs::create_dir_all(&dir);
    for hex in names.iter().filter_map(|n| hex_of(n)) {
        let _ = std::fs::File::create(dir.join(hex));
    }
}

/// What [`resolve`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Snapshots renamed to their layer's digest.
    pub renamed: usize,
    /// Snapshots removed: their name stood for no stored layer (or the digest's snapshot
    /// was there already).
    pub removed: usize,
}

/// Resolves every listed name with `steps` (the cache that gave them). Costs a directory
/// read when none is listed; leaves them listed when the cache cannot answer.
pub fn resolve(cache: &CacheDir, steps: &dyn StepCache) -> Resolved {
    let dir = cache.root().join(LISTED);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Resolved::default();
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .map(|hex| format!("{PROVISIONAL_PREFIX}{hex}"))
        .filter(|n| hex_of(n).is_some())
        .collect();
    let mut done = Resolved::default();
    if names.is_empty() {
        return done;
    }
    let Ok(layers) = steps.resolve_layers(&names) else {
        return done;
    };
    for (name, layer) in names.iter().zip(layers) {
        let Some(hex) = hex_of(name) else { continue };
        let renamed = layer.is_some_and(|l| rename(cache, name, &l).unwrap_or(false));
        if renamed {
            done.renamed += 1;
        } else {
            let _ = remove_snapshot(cache, hex);
            done.removed += 1;
        }
        let _ = std::fs::remove_file(dir.join(hex));
    }
    done
}

/// Renames the snapshot of `provisional` (whole or a delta, with what is kept beside it)
/// to `layer`'s digest. False when there is nothing to rename, or the digest's snapshot is
/// there already (as good: the caller removes this one).
fn rename(cache: &CacheDir, provisional: &str, layer: &NamedLayer) -> std::io::Result<bool> {
    let from = cache.snapshot(provisional);
    let to = cache.snapshot(&layer.digest);
    if !layer.digest.starts_with("sha256:") || from == to {
        return Ok(false);
    }
    let (from_unit, to_unit) = (from.with_extension("delta"), to.with_extension("delta"));
    let (tree, dest) = if from.is_dir() {
        (from.clone(), to.clone())
    } else if from_unit.is_dir() {
        (from_unit, to_unit)
    } else {
        return Ok(false);
    };
    if to.exists() || to_unit_taken(&to) {
        return Ok(false);
    }
    keep_blob_states(
        &segments_beside(&from, &DeltaUnit::of(cache, provisional)),
        &layer.blob_states,
    )?;
    // What is kept beside a whole snapshot first, the snapshot last: a tree found under
    // the digest has what goes with it (what is missing is only a speed-up).
    for ext in [
        "entries.bin",
        "segments.bin",
        "segments.pending",
        "segments.states",
        "used",
    ] {
        rename_if_there(&from.with_extension(ext), &to.with_extension(ext))?;
    }
    std::fs::rename(&tree, &dest)?;
    Ok(true)
}

fn to_unit_taken(to: &Path) -> bool {
    to.with_extension("delta").exists()
}

fn rename_if_there(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy_seed::keep_pending_segments;
    use crate::errors::CacheError;
    use crate::step_cache::BlobSource;
    use lcache_image::layer_segments::{Segment, SegmentIndex};
    use lcache_proto::wire::{LayerTail, StepRecord};

    /// A cache that resolves names as `answers` says (`None`: it cannot be asked).
    struct Names(Option<Vec<(String, Option<NamedLayer>)>>);

    impl StepCache for Names {
        fn get_step(&self, _: &str) -> Result<Option<StepRecord>, CacheError> {
            Ok(None)
        }
        fn put_step(&self, _: &StepRecord) -> Result<(), CacheError> {
            Ok(())
        }
        fn has_blob(&self, _: &str) -> Result<bool, CacheError> {
            Ok(false)
        }
        fn get_blob(&self, digest: &str, _: &mut dyn std::io::Write) -> Result<u64, CacheError> {
            Err(CacheError::UnusableBlob {
                digest: digest.into(),
                reason: "none here".into(),
            })
        }
        fn put_blob(&self, _: &str, _: BlobSource<'_>) -> Result<(), CacheError> {
            Ok(())
        }
        fn resolve_layers(&self, names: &[String]) -> Result<Vec<Option<NamedLayer>>, CacheError> {
            let answers = self.0.as_ref().ok_or(CacheError::Protocol("unreachable".into()))?;
            Ok(names
                .iter()
                .map(|n| answers.iter().find(|(a, _)| a == n).and_then(|(_, l)| l.clone()))
                .collect())
        }
    }

    fn name(c: char) -> String {
        format!("{PROVISIONAL_PREFIX}{}", c.to_string().repeat(64))
    }

    fn segment(blob_state: Vec<u8>) -> Segment {
        Segment {
            fingerprint: [0; 32],
            offset: 0,
            len: 1,
            tar_state: vec![],
            last: "f".into(),
            blob_state,
        }
    }

    /// A delta unit under `name`, its index pending with the states after its first
    /// segment only, as a build that handed its image to lcached keeps it.
    fn unit(cache: &CacheDir, name: &str) {
        let unit = DeltaUnit::of(cache, name);
        std::fs::create_dir_all(unit.tree().join("src")).unwrap();
        std::fs::write(unit.tree().join("src/f"), "edited").unwrap();
        std::fs::write(cache.snapshot(name).with_extension("used"), "").unwrap();
        let index = SegmentIndex {
            segments: vec![segment(vec![1]), segment(vec![]), segment(vec![])],
            compression: Default::default(),
        };
        let tail = LayerTail {
            tar_state: vec![],
            first: 1,
            blob_state: vec![],
            members: vec![1, 1],
            compression: Default::default(),
        };
        keep_pending_segments(cache, name, &index, &tail).unwrap();
    }

    fn layer(c: char) -> NamedLayer {
        NamedLayer {
            digest: format!("sha256:{}", c.to_string().repeat(64)),
            size: 3,
            blob_states: vec![vec![2], vec![3]],
        }
    }

    #[test]
    fn listed_snapshots_take_their_digest_and_states_or_go_and_stay_listed_while_nobody_answers() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let (named, failed) = (name('a'), name('b'));
        unit(&cache, &named);
        unit(&cache, &failed);
        list(&cache, &[named.clone(), failed.clone(), "sha256:00".into()]);
        let listed = || std::fs::read_dir(dir.path().join(LISTED)).unwrap().count();
        assert_eq!(listed(), 2, "only provisional names are listed");

        // The cache cannot answer: nothing moves.
        assert_eq!(resolve(&cache, &Names(None)), Resolved::default());
        assert_eq!(listed(), 2);

        let answers = vec![(named.clone(), Some(layer('c'))), (failed.clone(), None)];
        let done = resolve(&cache, &Names(Some(answers)));
        assert_eq!(done, Resolved { renamed: 1, removed: 1 });
        assert_eq!(listed(), 0);
        let digest = layer('c').digest;
        let renamed = DeltaUnit::of(&cache, &digest);
        assert_eq!(std::fs::read(renamed.tree().join("src/f")).unwrap(), b"edited");
        assert!(cache.snapshot(&digest).with_extension("used").exists());
        assert!(!DeltaUnit::of(&cache, &named).tree().exists());
        assert!(
            !DeltaUnit::of(&cache, &failed).tree().exists(),
            "a name that came to nothing"
        );
        assert!(!cache.snapshot(&failed).with_extension("used").exists());
        // The blob's states after the change wait beside the index for the next edit.
        assert!(renamed.segments().with_extension("pending").exists());
        let bytes = std::fs::read(renamed.segments().with_extension("states")).unwrap();
        let (states, _): (Vec<Vec<u8>>, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(states, [vec![2], vec![3]]);
    }

    #[test]
    fn a_snapshot_whose_digest_is_there_already_goes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let named = name('d');
        unit(&cache, &named);
        let digest = layer('e').digest;
        std::fs::create_dir_all(DeltaUnit::of(&cache, &digest).tree()).unwrap();
        list(&cache, std::slice::from_ref(&named));
        let done = resolve(&cache, &Names(Some(vec![(named.clone(), Some(layer('e')))])));
        assert_eq!(done, Resolved { renamed: 0, removed: 1 });
        assert!(!DeltaUnit::of(&cache, &named).tree().exists());
        assert!(
            DeltaUnit::of(&cache, &digest).tree().is_dir(),
            "the other build's stays"
        );
    }
}
