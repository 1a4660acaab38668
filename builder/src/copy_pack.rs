//! Packs a COPY layer from its entries, in segments (`lcache_image::layer_segments`): files
//! are read from whichever directory holds them (the layer's own, or its seed's whole
//! snapshot under a delta), and the segments unchanged since the seed layer's blob are taken from
//! that blob as it streams from the step cache, not read and compressed again.

use std::io::BufReader;
use std::path::Path;

use lcache_confine::Root;
use lcache_image::layer_segments::{pack_segmented, Packed, Reuse, SegmentEntry, SegmentEntryKind};

use crate::copy_seed::{load_segments, LayerEntries, Placed};
use crate::copy_step::CopyLayer;
use crate::step_cache::StepCache;

/// The layer's entries in the order a tar holds them: sorted, so parents come first.
fn sorted(entries: &LayerEntries) -> Vec<SegmentEntry<'_>> {
    let mut list: Vec<SegmentEntry> = entries
        .iter()
        .filter(|(path, _)| !path.is_empty())
        .map(|(path, placed)| match placed {
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
        })
        .collect();
    // Paths are unique: an unstable sort gives the one order, and sooner.
    list.sort_unstable_by(|a, b| a.path.cmp(b.path));
    list
}

/// Packs the COPY layer `layer`, built in `dir`, into `dest`; unchanged segments come
/// from the seed layer's own blob (so after a run of edits, the diff_id is hashed again
/// only from the newest change on, and with `defer` not here: see `Packed::pending`). A
/// seed blob that cannot be used (gone, or not what its index says) only costs the reuse.
pub fn pack_copy(
    steps: &dyn StepCache,
    layer: &CopyLayer,
    entries: &LayerEntries,
    dir: &Path,
    dest: &Path,
    defer: bool,
) -> std::io::Result<Packed> {
    let list = sorted(entries);
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
    let index = layer
        .reuse
        .as_ref()
        .and_then(|(digest, path)| Some((digest, load_segments(path)?)));
    if let Some((digest, index)) = index {
        let reused = std::thread::scope(|s| {
            let (reader, mut writer) = std::io::pipe()?;
            // When the pack stops reading (failed) the pipe closes and the download stops
            // with it; a pack that succeeded read the blob to its end, so the download
            // checked its digest: reused bytes from a corrupt copy are never kept.
            let download = s.spawn(move || steps.get_blob(digest, &mut writer));
            let reuse = Reuse {
                index: &index,
                blob: BufReader::with_capacity(256 * 1024, reader),
            };
            let packed = pack_segmented(&list, &open, Some(reuse), dest, defer)?;
            match download.join() {
                Ok(Ok(_)) => Ok(packed),
                _ => Err(std::io::Error::other("the seed layer's blob did not arrive whole")),
            }
        });
        if reused.is_ok() {
            return reused;
        }
    }
    pack_segmented::<std::io::Empty>(&list, &open, None, dest, defer)
}
