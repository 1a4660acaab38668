//! Packs a COPY layer from its entries, in segments (`lcache_image::layer_segments`): files
//! are read from whichever directory holds them (the layer's own, or its seed's whole
//! snapshot under a delta), and the segments unchanged since the seed layer's blob are taken from
//! that blob as it streams from the step cache, not read and compressed again.

use std::path::Path;

use lcache_confine::Root;
use lcache_image::layer_diff::LayerCompression;
use lcache_image::layer_links::pack_linked;
use std::collections::HashSet;

use lcache_image::layer_segments::{
    cuts_after, pack_planned, segment_ranges, skippable_front, Packed, Planned, Reuse, SegmentEntry, SegmentEntryKind,
    SegmentIndex, TailDigests,
};

use crate::byte_channel::byte_channel;
use crate::copy_seed::{segments_of, LayerDelta, LayerEntries, Placed, Seed};
use crate::copy_step::CopyLayer;
use crate::step_cache::StepCache;

/// The layer's entries in the order a tar holds them: sorted, so parents come first.
fn sorted(entries: &LayerEntries) -> Vec<SegmentEntry<'_>> {
    let mut list: Vec<SegmentEntry> = entries
        .iter()
        .filter(|(path, _)| !path.is_empty())
        .map(|(path, placed)| segment_entry(path, placed))
        .collect();
    // Paths are unique: an unstable sort gives the one order, and sooner.
    list.sort_unstable_by(|a, b| a.path.cmp(b.path));
    list
}

/// An entry as the pack sees it.
fn segment_entry<'a>(path: &'a str, placed: &'a Placed) -> SegmentEntry<'a> {
    match placed {
        Placed::File(f) => SegmentEntry {
            path,
            kind: SegmentEntryKind::File {
                size: f.size,
                content: f.content,
            },
            mode: f.mode,
            uid: f.uid,
            gid: f.gid,
        },
        Placed::Dir { mode, uid, gid } => SegmentEntry {
            path,
            kind: SegmentEntryKind::Dir,
            mode: *mode,
            uid: *uid,
            gid: *gid,
        },
        Placed::Symlink { target, uid, gid } => SegmentEntry {
            path,
            kind: SegmentEntryKind::Symlink { target },
            mode: 0o777,
            uid: *uid,
            gid: *gid,
        },
    }
}

/// Packs the COPY layer `layer`, built in `dir`, into `dest`; unchanged segments come
/// from the seed layer's own blob (so after a run of edits, the diff_id is hashed again
/// only from the newest change on, by whom `tail` says: see `Packed::pending` and
/// `Packed::tail`). A seed blob that cannot be used (gone, or not what its index says)
/// only costs the reuse.
#[allow(clippy::too_many_arguments)]
pub fn pack_copy(
    steps: &dyn StepCache,
    layer: &CopyLayer,
    entries: &LayerEntries,
    dir: &Path,
    dest: &Path,
    tail: TailDigests,
    compression: LayerCompression,
    links: bool,
) -> std::io::Result<Packed> {
    let list = sorted(entries);
    let plan: Vec<Planned> = segment_ranges(&list)
        .0
        .into_iter()
        .map(|r| Planned::Entries(&list[r]))
        .collect();
    let index = layer
        .reuse
        .as_ref()
        .and_then(|(digest, path)| segments_of(steps, digest, path));
    pack_with(
        steps,
        layer,
        &plan,
        index.as_ref(),
        dir,
        dest,
        tail,
        (compression, links),
    )
}

/// Packs a layer kept as its delta over `seed`'s base (`CopyLayer::over_seed`): only the
/// segments of the seed's blob an edit reaches are cut again from their entries, which are
/// read from the base's chunks near them; the others are named by index and taken from the
/// blob unread. The blob is the one packing every entry gives. Falls back to packing every
/// entry when the seed's index does not say where its segments end.
#[allow(clippy::too_many_arguments)]
pub fn pack_copy_over(
    steps: &dyn StepCache,
    layer: &CopyLayer,
    seed: &Seed,
    dir: &Path,
    dest: &Path,
    tail: TailDigests,
    compression: LayerCompression,
    links: bool,
) -> std::io::Result<Packed> {
    let index = layer
        .reuse
        .as_ref()
        .and_then(|(digest, path)| segments_of(steps, digest, path));
    let planned = match (&layer.delta, &index) {
        (Some(delta), Some(index)) => plan_over(seed, delta, index),
        _ => None,
    };
    if let Some(regions) = planned {
        let lists: Vec<Vec<SegmentEntry>> = regions
            .iter()
            .map(|r| match r {
                Region::Earlier(_) => Vec::new(),
                Region::Entries(e) => e.iter().map(|(p, placed)| segment_entry(p, placed)).collect(),
            })
            .collect();
        let mut plan = Vec::new();
        for (r, list) in regions.iter().zip(&lists) {
            match r {
                Region::Earlier(j) => plan.push(Planned::Earlier(*j)),
                Region::Entries(_) => {
                    plan.extend(segment_ranges(list).0.into_iter().map(|r| Planned::Entries(&list[r])))
                }
            }
        }
        if let Ok(packed) = pack_with(
            steps,
            layer,
            &plan,
            index.as_ref(),
            dir,
            dest,
            tail,
            (compression, links),
        ) {
            return Ok(packed);
        }
    }
    let entries = layer
        .entries_over(seed)
        .ok_or_else(|| std::io::Error::other("the seed's entries are unreadable"))?;
    pack_copy(steps, layer, &entries, dir, dest, tail, compression, links)
}

/// A stretch of the layer to pack: an earlier segment as it is, or entries to cut.
enum Region<'a> {
    Earlier(usize),
    Entries(Vec<(&'a String, &'a Placed)>),
}

/// Which of the seed blob's segments (`index`) the layer (`seed`'s base with `delta`
/// applied) leaves as they are, and the entries of the stretches between. A stretch starts
/// where a segment starts in both layers (after an entry that ends a segment by itself)
/// and is read on until it ends at an old segment's end with a cut: cuts depend only on
/// the entries near them, so from there on both layers are cut alike. `None` when the
/// index does not say where its segments end.
fn plan_over<'a>(seed: &'a Seed, delta: &'a LayerDelta, index: &'a SegmentIndex) -> Option<Vec<Region<'a>>> {
    let lasts: Vec<&str> = index.segments.iter().map(|s| s.last.as_str()).collect();
    if lasts.is_empty() || lasts.iter().any(|l| l.is_empty()) {
        return None;
    }
    let m = lasts.len();
    let removed: HashSet<&str> = delta.removed.iter().map(String::as_str).collect();
    let entry = |p: &str| -> Option<&'a Placed> {
        if removed.contains(p) {
            None
        } else {
            delta.changed.get(p).or_else(|| seed.base.get(p))
        }
    };
    // The paths whose entry may differ from the seed layer's: what either delta names.
    let mut touched = vec![false; m];
    let seed_delta = seed.delta.iter().map(|(_, d)| d);
    for d in seed_delta.chain(std::iter::once(delta)) {
        for p in d.changed.keys().chain(&d.removed).filter(|p| !p.is_empty()) {
            if entry(p) != seed.lookup(p).map(|(_, e)| e) {
                touched[lasts.partition_point(|l| *l < p.as_str()).min(m - 1)] = true;
            }
        }
    }
    let ends_segment = |p: &str| entry(p).is_some_and(|e| cuts_after(&segment_entry(p, e)));
    let mut regions: Vec<Region<'a>> = Vec::new();
    let mut k = 0;
    while k < m {
        if !touched[k] {
            regions.push(Region::Earlier(k));
            k += 1;
            continue;
        }
        let mut start = k;
        while start > 0 && !ends_segment(lasts[start - 1]) {
            start -= 1;
        }
        while matches!(regions.last(), Some(Region::Earlier(j)) if *j >= start) {
            regions.pop();
        }
        let mut end = k;
        loop {
            while end + 1 < m && touched[end + 1] {
                end += 1;
            }
            let after = start.checked_sub(1).map(|i| lasts[i]);
            let upto = (end + 1 < m).then(|| lasts[end]);
            let entries = layer_range(seed, delta, &removed, after, upto);
            let aligned = match upto {
                None => true,
                Some(u) => entries.last().is_some_and(|(p, _)| p.as_str() == u) && ends_segment(u),
            };
            if aligned {
                regions.push(Region::Entries(entries));
                break;
            }
            end += 1;
        }
        k = end + 1;
    }
    (!seed.base.damaged()).then_some(regions)
}

/// The layer's entries after `after` up to and including `upto`, in path order: the
/// base's there, less what `delta` removes or replaces, with what it puts.
fn layer_range<'a>(
    seed: &'a Seed,
    delta: &'a LayerDelta,
    removed: &HashSet<&str>,
    after: Option<&'a str>,
    upto: Option<&'a str>,
) -> Vec<(&'a String, &'a Placed)> {
    let within = |p: &str| after.is_none_or(|a| p > a) && upto.is_none_or(|u| p <= u);
    let mut out: Vec<(&String, &Placed)> = seed
        .base
        .range(after, upto)
        .filter(|(p, _)| !removed.contains(p.as_str()) && !delta.changed.contains_key(*p))
        .collect();
    out.extend(delta.changed.iter().filter(|(p, _)| within(p)));
    out.retain(|(p, _)| !p.is_empty());
    out.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out
}

/// Packs `plan`, reading files through the layer's roots and taking unchanged members from
/// the seed layer's blob as it streams from the step cache (the whole plan again, without
/// the blob, if the blob cannot be used, or is compressed otherwise, and the plan does not
/// need it). A tar layer with nothing to take, when `links` says the cache holds layers by
/// reference, is packed so (`layer_links`): its files are named, not written.
#[allow(clippy::too_many_arguments)]
fn pack_with(
    steps: &dyn StepCache,
    layer: &CopyLayer,
    plan: &[Planned],
    index: Option<&SegmentIndex>,
    dir: &Path,
    dest: &Path,
    tail: TailDigests,
    (compression, links): (LayerCompression, bool),
) -> std::io::Result<Packed> {
    // A seed kept the other way (built before `--layer-compression` changed) has no
    // members to give: it is neither fetched nor read.
    let index = index.filter(|i| i.compression == compression);
    // Read through the confined roots: a path that met a symlink on the way (sources
    // overlapping at the destination) must not read a file of the host into the layer.
    let own = Root::open(dir).map_err(std::io::Error::other)?;
    let base = match (&layer.delta, &layer.seed_base) {
        (Some(_), Some((_, base))) => Some(Root::open(base).map_err(std::io::Error::other)?),
        _ => None,
    };
    let open = |e: &SegmentEntry| {
        let root = match &base {
            Some(b) if layer.from_base(e.path) => b,
            _ => &own,
        };
        root.open_file(Path::new(e.path), false).map_err(std::io::Error::other)
    };
    let reuse = layer.reuse.as_ref().map(|(digest, _)| digest).zip(index);
    if let Some((digest, index)) = reuse {
        // The members in front of the first change are neither fetched nor written: the
        // blob's digest resumes from its state after them, and the cache is told they are
        // the seed's (the first of the parts), so its own copy of them is the new blob's.
        let skipped = skippable_front(plan, index);
        if tail == TailDigests::Cache {
            // The cache names the blob from its own copy of the seed's: nothing of it is
            // fetched here.
            let reuse = Reuse {
                index,
                blob: std::io::empty(),
                skipped,
            };
            if let Ok(packed) = pack_planned(plan, &open, Some(reuse), dest, tail, compression) {
                return Ok(packed);
            }
            return pack_planned::<std::io::Empty>(plan, &open, None, dest, TailDigests::Here, compression);
        }
        let first = index.front_end(skipped);
        let reused = std::thread::scope(|s| {
            let (mut writer, reader) = byte_channel();
            // When the pack stops reading (failed) the channel closes and the download stops
            // with it. The bytes after the front are not checked against the seed's digest
            // (a part of a blob cannot be): each member's CRC is checked when the diff_id
            // inflates it, and the cache checks the new blob whole against its digest.
            let download = s.spawn(move || steps.get_blob_from(digest, first, &mut writer));
            let reuse = Reuse {
                index,
                blob: reader,
                skipped,
            };
            let packed = pack_planned(plan, &open, Some(reuse), dest, tail, compression)?;
            match download.join() {
                Ok(Ok(_)) => Ok(packed),
                _ => Err(std::io::Error::other("the seed layer's blob did not arrive whole")),
            }
        });
        if reused.is_ok() {
            return reused;
        }
    }
    if links && compression == LayerCompression::None {
        // A file that cannot be named (a path that is not UTF-8) is packed as bytes.
        if let Ok(packed) = pack_linked(plan, &open, dest) {
            return Ok(packed);
        }
    }
    // Without the earlier blob a plan that names its segments cannot be packed: the
    // caller packs every entry instead.
    pack_planned::<std::io::Empty>(plan, &open, None, dest, tail, compression)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy_seed::load_segments;
    use crate::copy_seed::{save_segments, CopiedFrom};
    use crate::entry_chunks::EntryChunks;
    use crate::errors::CacheError;
    use crate::step_cache::BlobSource;
    use lcache_proto::wire::StepRecord;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Blobs in memory: the seed's blob streams from here as it would from lcached.
    #[derive(Default)]
    struct Blobs(Mutex<HashMap<String, Vec<u8>>>);

    impl StepCache for Blobs {
        fn get_step(&self, _: &str) -> Result<Option<StepRecord>, CacheError> {
            Ok(None)
        }
        fn put_step(&self, _: &StepRecord) -> Result<(), CacheError> {
            Ok(())
        }
        fn has_blob(&self, digest: &str) -> Result<bool, CacheError> {
            Ok(self.0.lock().unwrap().contains_key(digest))
        }
        fn get_blob(&self, digest: &str, out: &mut dyn std::io::Write) -> Result<u64, CacheError> {
            let blobs = self.0.lock().unwrap();
            let b = blobs.get(digest).ok_or_else(|| CacheError::UnusableBlob {
                digest: digest.into(),
                reason: "absent".into(),
            })?;
            out.write_all(b).map_err(|e| CacheError::Protocol(e.to_string()))?;
            Ok(b.len() as u64)
        }
        fn put_blob(&self, _: &str, _: BlobSource<'_>) -> Result<(), CacheError> {
            Ok(())
        }
    }

    fn file(bytes: &[u8]) -> Placed {
        Placed::File(CopiedFrom {
            dev: 0,
            ino: 0,
            ctime_ns: 0,
            mtime_ns: 0,
            size: bytes.len() as u64,
            mode: 0o644,
            uid: 0,
            gid: 0,
            content: *blake3::hash(bytes).as_bytes(),
        })
    }

    fn put(dir: &Path, path: &str, bytes: &[u8]) {
        std::fs::create_dir_all(dir.join(path).parent().unwrap()).unwrap();
        std::fs::write(dir.join(path), bytes).unwrap();
    }

    /// A small deterministic generator (the edits differ per round, the test does not).
    struct Mix(u64);
    impl Mix {
        fn next(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n
        }
    }

    /// Packs `layer` over `seed` both ways; they must give the same blob and index, and the
    /// plan must have left most segments unread.
    fn both_ways(steps: &Blobs, seed: &Seed, layer: &CopyLayer, dir: &Path, out: &Path, n: usize) -> Packed {
        let delta = layer.delta.as_ref().unwrap();
        let index = load_segments(&layer.reuse.as_ref().unwrap().1).unwrap();
        let regions = plan_over(seed, delta, &index).expect("a plan");
        let earlier = regions.iter().filter(|r| matches!(r, Region::Earlier(_))).count();
        assert!(
            earlier * 3 > index.segments.len(),
            "round {n}: {earlier} of {} segments unread",
            index.segments.len()
        );
        let planned = pack_copy_over(
            steps,
            layer,
            seed,
            dir,
            &out.join(format!("p{n}")),
            TailDigests::Here,
            LayerCompression::Gzip,
            false,
        )
        .unwrap();
        let all = layer.entries_over(seed).unwrap();
        let whole = pack_copy(
            steps,
            layer,
            &all,
            dir,
            &out.join(format!("w{n}")),
            TailDigests::Here,
            LayerCompression::Gzip,
            false,
        )
        .unwrap();
        assert_eq!(
            (&planned.layer.digest, &planned.layer.diff_id),
            (&whole.layer.digest, &whole.layer.diff_id),
            "round {n}"
        );
        assert!(planned.index == whole.index, "round {n}: the same index");
        planned
    }

    #[test]
    fn a_layer_packed_from_its_delta_over_the_seed_is_the_one_packing_every_entry_gives() {
        let base_dir = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut base: LayerEntries = HashMap::new();
        base.insert(
            "app".into(),
            Placed::Dir {
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
        );
        for d in 0..10 {
            base.insert(
                format!("app/d{d}"),
                Placed::Dir {
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                },
            );
        }
        for i in 0..6000 {
            let (path, bytes) = (format!("app/d{}/f{i:04}", i % 10), format!("{i}\n").repeat(i % 7 + 1));
            put(base_dir.path(), &path, bytes.as_bytes());
            base.insert(path, file(bytes.as_bytes()));
        }
        // A file big enough for a segment of its own: what ends the segment before it.
        let big = vec![b'b'; (1 << 20) + 10];
        put(base_dir.path(), "app/d5/big", &big);
        base.insert("app/d5/big".into(), file(&big));
        // The seed: the whole layer, its blob and index.
        let steps = Blobs::default();
        let whole = CopyLayer {
            entries: Some(base.clone()),
            seed_base: None,
            delta: None,
            reuse: None,
            over_seed: false,
        };
        let first = pack_copy(
            &steps,
            &whole,
            &base,
            base_dir.path(),
            &out.path().join("seed"),
            TailDigests::Here,
            LayerCompression::Gzip,
            false,
        )
        .unwrap();
        steps
            .0
            .lock()
            .unwrap()
            .insert(first.layer.digest.clone(), std::fs::read(&first.layer.path).unwrap());
        let snap = out.path().join("seed-snap");
        save_segments(&snap, &first.index).unwrap();
        let mut seed = Seed {
            base_digest: first.layer.digest.clone(),
            base_dir: base_dir.path().to_path_buf(),
            base: EntryChunks::from_entries(&base),
            delta: None,
            blob: (first.layer.digest.clone(), snap.with_extension("segments.bin")),
            sources_before: None,
        };

        // Rounds of edits, each over the last (the seed a delta from the second on): files
        // edited, removed, added, one directory's mode changed; each delta holds the last
        // one's changes too, as a re-run carries them.
        let mut mix = Mix(7);
        let mut delta = LayerDelta::default();
        let mut unread_fronts = 0;
        for n in 0..6 {
            let dir = out.path().join(format!("layer{n}"));
            std::fs::create_dir_all(&dir).unwrap();
            for (p, placed) in &delta.changed {
                if let Placed::File(_) = placed {
                    std::fs::create_dir_all(dir.join(p).parent().unwrap()).unwrap();
                    std::fs::copy(out.path().join(format!("layer{}", n - 1)).join(p), dir.join(p)).unwrap();
                }
            }
            for _ in 0..3 {
                let i = mix.next(6000);
                let path = format!("app/d{}/f{i:04}", i % 10);
                match mix.next(3) {
                    0 => {
                        let bytes = format!("edit {n} of {i}\n");
                        put(&dir, &path, bytes.as_bytes());
                        delta.changed.insert(path.clone(), file(bytes.as_bytes()));
                        delta.removed.retain(|r| *r != path);
                    }
                    1 => {
                        delta.changed.remove(&path);
                        if !delta.removed.contains(&path) {
                            delta.removed.push(path);
                        }
                    }
                    _ => {
                        let (path, bytes) = (format!("app/d{}/new{n}-{i}", i % 10), format!("new {n}\n"));
                        put(&dir, &path, bytes.as_bytes());
                        delta.changed.insert(path, file(bytes.as_bytes()));
                    }
                }
            }
            // Where cuts are made: a segment's last entry removed (its segment runs on into
            // the next), an entry put right after one, the big file made small and back.
            let index = load_segments(&seed.blob.1).unwrap();
            let last = index.segments[mix.next(index.segments.len() - 1)].last.clone();
            if base.contains_key(&last) && !last.ends_with("big") && matches!(base[&last], Placed::File(_)) {
                delta.changed.remove(&last);
                delta.removed.push(last.clone());
            }
            let after = format!("{}x{n}", index.segments[mix.next(index.segments.len())].last);
            put(&dir, &after, b"right after a cut\n");
            delta.changed.insert(after, file(b"right after a cut\n"));
            let big_now: &[u8] = if n % 2 == 0 { b"small now\n" } else { &big };
            put(&dir, "app/d5/big", big_now);
            delta.changed.insert("app/d5/big".into(), file(big_now));
            delta.changed.insert(
                format!("app/d{}", n % 10),
                Placed::Dir {
                    mode: 0o700 + n as u32,
                    uid: 0,
                    gid: 0,
                },
            );
            delta.removed.retain(|r| base.contains_key(r));
            delta.removed.sort();
            let layer = CopyLayer {
                entries: None,
                seed_base: Some((seed.base_digest.clone(), base_dir.path().to_path_buf())),
                delta: Some(delta.clone()),
                reuse: Some(seed.blob.clone()),
                over_seed: true,
            };
            let packed = both_ways(&steps, &seed, &layer, &dir, out.path(), n);
            // Stored as a cache stores parts: the front the file leaves unwritten is the
            // seed blob's.
            let mut stored = std::fs::read(&packed.layer.path).unwrap();
            let mut blobs = steps.0.lock().unwrap();
            let front = packed.unwritten as usize;
            unread_fronts += usize::from(front > 0);
            stored[..front].copy_from_slice(&blobs[&seed.blob.0][..front]);
            blobs.insert(packed.layer.digest.clone(), stored);
            drop(blobs);
            let snap = out.path().join(format!("snap{n}"));
            save_segments(&snap, &packed.index).unwrap();
            seed.delta = Some((dir, delta.clone()));
            seed.blob = (packed.layer.digest.clone(), snap.with_extension("segments.bin"));
        }
        assert!(unread_fronts > 0, "some rounds took their front unread");
    }
}
