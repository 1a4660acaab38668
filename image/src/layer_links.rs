//! A layer kept as its tar (`--layer-compression none`), packed by reference: the tar's own
//! bytes (each entry's header) are written to one file, its padding and end named as runs of
//! zeros, and each file's bytes as a run of the snapshot file they are, for lcached to
//! hard-link and name (`POST /v1/layers/linked`). Nothing of the files is written again,
//! nor read here: a cold build writes the layer's bytes once, as the snapshot, and they are
//! hashed once, by lcached, which answers the digest and the states at each segment's end.
//! The runs make exactly the bytes [`crate::layer_segments::pack_planned`] (a COPY's) or
//! [`crate::layer_diff::write_layer_tar`] (a RUN's) makes, cut into the same segments, so
//! a later edit of the step takes its unchanged runs as it would.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use lcache_proto::wire::{LinkedBlob, LinkedFile, LinkedRun, NamedLayer};

use crate::layer_diff::{put_layer_tar, Headers, LayerCompression, PackedLayer, TarOut};
use crate::layer_segments::{
    fingerprint, header, Packed, Planned, Segment, SegmentEntry, SegmentEntryKind, SegmentIndex, TRAILER,
};

/// The tar's own bytes as they are written to the file, and the runs of the whole.
struct Own {
    out: io::BufWriter<std::fs::File>,
    written: u64,
    len: u64,
    linked: LinkedBlob,
}

impl Own {
    /// Packing into `dest`, which is file 0 of the runs.
    fn create(dest: &Path) -> io::Result<Self> {
        let path = std::path::absolute(dest)?
            .into_os_string()
            .into_string()
            .map_err(|_| io::Error::other("the work directory's path is not UTF-8"))?;
        Ok(Own {
            out: io::BufWriter::with_capacity(1 << 20, std::fs::File::create(dest)?),
            written: 0,
            len: 0,
            linked: LinkedBlob {
                files: vec![LinkedFile { path, size: 0 }],
                ..LinkedBlob::default()
            },
        })
    }

    /// The runs, the file of own bytes complete (not synced: lcached links it and syncs its
    /// file system once).
    fn finish(self) -> io::Result<LinkedBlob> {
        let Own {
            out,
            written,
            mut linked,
            ..
        } = self;
        out.into_inner().map_err(|e| e.into_error())?;
        linked.files[0].size = written;
        Ok(linked)
    }
}

impl TarOut for Own {
    fn own(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.out.write_all(bytes)?;
        match self.linked.runs.last_mut() {
            Some(r) if r.file == 0 && r.offset + r.len == self.written => r.len += bytes.len() as u64,
            _ => self.linked.runs.push(LinkedRun {
                file: 0,
                offset: self.written,
                len: bytes.len() as u64,
            }),
        }
        self.written += bytes.len() as u64;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Named as a run of the file itself (where the kernel says the open file is), after
    /// checking its size; its bytes are not read.
    fn file(&mut self, file: std::fs::File, _path: &Path, size: u64) -> io::Result<()> {
        let path = path_of(&file)?
            .into_os_string()
            .into_string()
            .map_err(|p| io::Error::other(format!("{} is not UTF-8: it cannot be linked", Path::new(&p).display())))?;
        if file.metadata()?.len() != size {
            return Err(io::Error::other(format!(
                "{path} is not the size it was listed at: the snapshot changed"
            )));
        }
        self.linked.runs.push(LinkedRun {
            file: self.linked.files.len() as u32,
            offset: 0,
            len: size,
        });
        self.linked.files.push(LinkedFile { path, size });
        self.len += size;
        Ok(())
    }

    /// Named as a run of zeros, not written.
    fn zeros(&mut self, n: u64) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        match self.linked.runs.last_mut() {
            Some(r) if r.file == LinkedRun::ZEROS => r.len += n,
            _ => self.linked.runs.push(LinkedRun {
                file: LinkedRun::ZEROS,
                offset: 0,
                len: n,
            }),
        }
        self.len += n;
        Ok(())
    }
}

/// Where an open file is: what the kernel says of its descriptor (the snapshot file itself,
/// whatever path it was reached by).
fn path_of(file: &std::fs::File) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Gives a layer packed by reference the name the cache answered (`named`: its digest, and
/// the states at the marks, which are its segments' ends); false when the states do not fit
/// `index`, which then says nothing an edit can resume from.
pub fn take_name(layer: &mut PackedLayer, index: Option<&mut SegmentIndex>, named: &NamedLayer) -> bool {
    layer.digest.clone_from(&named.digest);
    layer.diff_id.clone_from(&named.digest);
    layer.size = named.size;
    match index {
        Some(index) if index.segments.len() == named.blob_states.len() => {
            for (s, state) in index.segments.iter_mut().zip(&named.blob_states) {
                s.tar_state.clone_from(state);
                s.blob_state.clone_from(state);
            }
            true
        }
        Some(_) => false,
        None => named.blob_states.is_empty(),
    }
}

/// A layer packed by reference, before the cache names it.
fn unnamed(dest: &Path, linked: &LinkedBlob) -> PackedLayer {
    PackedLayer {
        path: dest.to_path_buf(),
        digest: String::new(),
        diff_id: String::new(),
        size: linked.len(),
    }
}

/// Packs `plan` (every segment given by its entries: nothing to take from an earlier blob)
/// as a tar by reference: its own bytes into `dest`, its files as runs of themselves (each
/// opened through `open`, not read): `Packed::links`, with a mark at each segment's end.
/// The layer is not named, nor are its segments' states known, until the cache answers
/// ([`take_name`]).
pub fn pack_linked(
    plan: &[Planned],
    open: &(dyn Fn(&SegmentEntry) -> io::Result<std::fs::File> + Sync),
    dest: &Path,
) -> io::Result<Packed> {
    let mut own = Own::create(dest)?;
    let mut index = SegmentIndex {
        segments: Vec::new(),
        compression: LayerCompression::None,
    };
    let mut headers = Headers::new();
    for planned in plan {
        let Planned::Entries(seg) = planned else {
            return Err(io::Error::other(
                "a layer packed by reference takes nothing from an earlier blob",
            ));
        };
        let offset = own.len;
        for e in *seg {
            let path = Path::new(e.path);
            match &e.kind {
                SegmentEntryKind::Dir => {
                    let mut h = header(e, tar::EntryType::Directory, 0);
                    headers.empty(&mut own, &mut h, path)?;
                }
                SegmentEntryKind::Symlink { target } => {
                    let mut h = header(e, tar::EntryType::Symlink, 0);
                    headers.link(&mut own, &mut h, path, Path::new(target))?;
                }
                SegmentEntryKind::File { size, .. } => {
                    let mut h = header(e, tar::EntryType::Regular, *size);
                    headers.file(&mut own, &mut h, path, (open(e)?, path), *size)?;
                }
            }
        }
        own.linked.marks.push(own.len);
        index.segments.push(Segment {
            fingerprint: fingerprint(seg),
            offset,
            len: own.len - offset,
            tar_state: Vec::new(),
            last: seg.last().map(|e| e.path.to_string()).unwrap_or_default(),
            blob_state: Vec::new(),
        });
    }
    own.zeros(TRAILER as u64)?;
    let linked = own.finish()?;
    Ok(Packed {
        layer: unnamed(dest, &linked),
        index,
        pending: None,
        tail: None,
        parts: Vec::new(),
        unwritten: 0,
        links: Some(linked),
    })
}

/// A RUN's layer (its overlay's upper directory, kept as the step's snapshot) kept as its
/// tar, packed by reference: the tar's own bytes into `dest`, its files named; unnamed
/// until the cache answers ([`take_name`]).
pub fn pack_layer_linked(upper: &Path, dest: &Path) -> io::Result<(PackedLayer, LinkedBlob)> {
    let mut own = Own::create(dest)?;
    put_layer_tar(upper, &mut own)?;
    let linked = own.finish()?;
    Ok((unnamed(dest, &linked), linked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer_segments::{pack_planned, segment_ranges, TailDigests, TarHash};

    /// The blob `linked` describes, read from its files.
    fn assembled(linked: &LinkedBlob) -> Vec<u8> {
        let files: Vec<Vec<u8>> = linked.files.iter().map(|f| std::fs::read(&f.path).unwrap()).collect();
        let mut out = Vec::new();
        for r in &linked.runs {
            if r.file == LinkedRun::ZEROS {
                out.extend(std::iter::repeat_n(0u8, r.len as usize));
                continue;
            }
            let f = &files[r.file as usize];
            assert_eq!(f.len() as u64, linked.files[r.file as usize].size);
            out.extend_from_slice(&f[r.offset as usize..(r.offset + r.len) as usize]);
        }
        out
    }

    #[test]
    fn a_layer_packed_by_reference_is_the_tar_packing_it_whole_gives_and_names_the_snapshots_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        // Long names (a GNU long-name entry), empty files, a big one, symlinks.
        let mut list: Vec<(String, Vec<u8>, u8)> = vec![("app".into(), vec![], b'd')];
        let long = format!("app/{}", "n".repeat(150));
        list.push((long, b"long named".to_vec(), b'f'));
        list.push(("app/empty".into(), Vec::new(), b'f'));
        list.push((
            "app/big".into(),
            (0..3_000_000u32).map(|i| (i % 251) as u8).collect(),
            b'f',
        ));
        list.push(("app/link".into(), b"big".to_vec(), b'l'));
        for i in 0..3000 {
            list.push((
                format!("app/f{i:05}"),
                format!("{i}").repeat(i % 40 + 1).into_bytes(),
                b'f',
            ));
        }
        list.sort();
        std::fs::create_dir_all(root.join("app")).unwrap();
        for (p, b, kind) in &list {
            match kind {
                b'f' => std::fs::write(root.join(p), b).unwrap(),
                b'l' => std::os::unix::fs::symlink(std::str::from_utf8(b).unwrap(), root.join(p)).unwrap(),
                _ => {}
            }
        }
        let entries: Vec<SegmentEntry> = list
            .iter()
            .map(|(p, b, kind)| SegmentEntry {
                path: p,
                kind: match kind {
                    b'd' => SegmentEntryKind::Dir,
                    b'l' => SegmentEntryKind::Symlink {
                        target: std::str::from_utf8(b).unwrap(),
                    },
                    _ => SegmentEntryKind::File {
                        size: b.len() as u64,
                        content: *blake3::hash(b).as_bytes(),
                    },
                },
                mode: 0o644,
                uid: 1,
                gid: 2,
            })
            .collect();
        let plan: Vec<Planned> = segment_ranges(&entries)
            .0
            .into_iter()
            .map(|r| Planned::Entries(&entries[r]))
            .collect();
        assert!(plan.len() > 3, "several segments");
        let open = |e: &SegmentEntry| std::fs::File::open(root.join(e.path));
        let whole = pack_planned::<io::Empty>(
            &plan,
            &open,
            None,
            &dir.path().join("whole.tar"),
            TailDigests::Here,
            LayerCompression::None,
        )
        .unwrap();
        let linked = pack_linked(&plan, &open, &dir.path().join("own")).unwrap();
        let tar = std::fs::read(dir.path().join("whole.tar")).unwrap();
        let runs = linked.links.clone().unwrap();
        let bytes = assembled(&runs);
        assert_eq!(bytes, tar);
        // Named as lcached names it: the digest of the bytes and the states at the marks,
        // which are the whole pack's segments' states.
        let mut sha = TarHash::default();
        let mut at = 0usize;
        let mut states = Vec::new();
        for m in &runs.marks {
            sha.write_all(&bytes[at..*m as usize]).unwrap();
            at = *m as usize;
            states.push(sha.state());
        }
        sha.write_all(&bytes[at..]).unwrap();
        let named = NamedLayer {
            digest: sha.digest(),
            size: bytes.len() as u64,
            blob_states: states,
        };
        let (mut layer, mut index) = (linked.layer, linked.index);
        assert_eq!(layer.size, whole.layer.size);
        assert!(take_name(&mut layer, Some(&mut index), &named));
        assert_eq!(layer.digest, whole.layer.digest);
        assert_eq!(layer.diff_id, whole.layer.diff_id);
        assert_eq!(index, whole.index, "the same segments and states: an edit reuses them");
        // The files are named where they are, not copied: the file written holds the
        // headers only.
        assert!(runs.files[1..]
            .iter()
            .all(|f| f.path.starts_with(&*root.to_string_lossy())));
        assert_eq!(runs.files.len(), 1 + 3002, "every non-empty file once");
        let own = std::fs::metadata(dir.path().join("own")).unwrap().len();
        assert!(own < tar.len() as u64 / 2, "{own} of {}", tar.len());
    }

    #[test]
    fn a_file_that_changed_size_since_it_was_listed_fails_the_pack() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"longer than listed").unwrap();
        let entries = [SegmentEntry {
            path: "f",
            kind: SegmentEntryKind::File {
                size: 3,
                content: [0; 32],
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
        }];
        let plan = [Planned::Entries(&entries)];
        let open = |e: &SegmentEntry| std::fs::File::open(dir.path().join(e.path));
        assert!(pack_linked(&plan, &open, &dir.path().join("own")).is_err());
    }

    #[test]
    fn a_run_layer_packed_by_reference_is_the_tar_packing_it_whole_gives() {
        let up = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(up.path().join("usr/lib")).unwrap();
        for i in 0..200 {
            std::fs::write(up.path().join(format!("usr/lib/f{i}")), vec![i as u8; i * 97]).unwrap();
        }
        std::fs::hard_link(up.path().join("usr/lib/f7"), up.path().join("usr/f7-again")).unwrap();
        std::os::unix::fs::symlink("lib/f9", up.path().join("usr/f9")).unwrap();
        let mut whole = Vec::new();
        crate::layer_diff::write_layer_tar(up.path(), &mut whole).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let (layer, linked) = pack_layer_linked(up.path(), &dest.path().join("own")).unwrap();
        assert_eq!(assembled(&linked), whole);
        assert_eq!((layer.size, linked.marks.len()), (whole.len() as u64, 0));
        // Every non-empty file once; the hard link is the tar's link entry, not a file.
        assert_eq!(linked.files.len(), 1 + 199);
    }
}
