//! Tar layers held by reference (`POST /v1/layers/linked`, the Unix socket only): a
//! layer kept as its tar (`--layer-compression none`) is the client's snapshot files and
//! the tar's headers, so the store keeps hard links to those files — a pack — rather than a
//! copy of the tar: a cold build writes the layer's bytes once, as the snapshot. Each file
//! is linked (copied where it cannot be: another file system, a file with too many links),
//! checked to be a regular file of the stated size, and stamped with its size and
//! modification time, which every later read checks (`blob_file::Pack`); the whole is
//! hashed through the links — lcached names the layer, the client never reads its files —
//! and made durable with one `syncfs` (the client's files are not synced when written).
//!
//! A blob reads a pack through a link to its manifest; a pack no blob links any more is
//! removed once it has been so for a while (`collect_packs`), so a reader that opened a
//! blob just before it was evicted can finish.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lcache_proto::wire::{LinkedBlob, LinkedRun};

use super::blob_file::{
    open_nofollow, pack_link_name, BlobFile, Pack, PackManifest, PackRun, Recipe, RecipeRun, Stamp, PACK_MANIFEST,
    RECIPE,
};
use super::blob_states::GridSha;
use super::blob_store::{BlobStore, IngestError};
use super::BlobMeta;
use crate::server::Limits;

/// The most files one linked blob may read.
pub const MAX_LINKED_FILES: usize = 1_000_000;

fn bad(what: impl Into<String>) -> IngestError {
    IngestError::BadParts(what.into())
}

/// Refuses a linked blob whose runs do not lie within its files, or that is too big.
fn check(linked: &LinkedBlob, limits: &Limits) -> Result<(), IngestError> {
    if linked.files.len() > MAX_LINKED_FILES {
        return Err(bad(format!("more than {MAX_LINKED_FILES} files")));
    }
    if let Some(f) = linked
        .files
        .iter()
        .find(|f| !f.path.starts_with('/') || f.path.contains('\0'))
    {
        return Err(bad(format!("'{}' is not an absolute path", f.path.escape_debug())));
    }
    let mut total = 0u64;
    for r in &linked.runs {
        if r.file == LinkedRun::ZEROS {
            total = total.saturating_add(r.len);
            continue;
        }
        let size = linked
            .files
            .get(r.file as usize)
            .ok_or_else(|| bad(format!("a run reads file {}, which is not listed", r.file)))?
            .size;
        if r.offset.checked_add(r.len).is_none_or(|end| end > size) {
            return Err(bad(format!(
                "a run ends past the end of {} ({size} bytes)",
                linked.files[r.file as usize].path
            )));
        }
        total = total.saturating_add(r.len);
    }
    if total > limits.max_blob_size {
        return Err(IngestError::TooLarge {
            limit: limits.max_blob_size,
        });
    }
    Ok(())
}

/// Keeps `from` as `to`: a hard link, or a copy where a link cannot be made. Either way
/// `to` must then be a regular file of `size` bytes; returns its stamp.
fn keep_file(from: &Path, to: &Path, size: u64) -> Result<Stamp, IngestError> {
    if let Err(e) = std::fs::hard_link(from, to) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return Err(bad(format!("{}: no such file", from.display())));
        }
        // Another file system (EXDEV), too many links (EMLINK), a file the daemon may not
        // link (EPERM): its bytes are copied instead.
        let mut src = open_nofollow(from).map_err(|e| bad(format!("{}: {e}", from.display())))?;
        if !src.metadata()?.is_file() {
            return Err(bad(format!("{} is not a regular file", from.display())));
        }
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(to)?;
        std::io::copy(&mut src, &mut out)?;
    }
    // What was linked, not what the path names now: a symlink or a device is linked as
    // itself, and refused here.
    let meta = std::fs::symlink_metadata(to)?;
    if !meta.is_file() {
        return Err(bad(format!("{} is not a regular file", from.display())));
    }
    if meta.len() != size {
        return Err(bad(format!(
            "{} has {} bytes, not the {size} stated (it changed after it was packed)",
            from.display(),
            meta.len()
        )));
    }
    Ok(Stamp::of(&meta))
}

impl BlobStore {
    /// Stores the tar layer `linked` describes, holding its files by hard links (see the
    /// module's doc), under the digest its bytes hash to. Returns it, and the SHA-256's
    /// states at `linked.marks`.
    pub async fn ingest_linked(
        &self,
        linked: LinkedBlob,
        limits: &Limits,
    ) -> Result<(BlobMeta, Vec<Vec<u8>>), IngestError> {
        check(&linked, limits)?;
        let linked_marks = linked.marks.len();
        if linked.marks.windows(2).any(|w| w[0] > w[1]) || linked.marks.last().is_some_and(|m| *m > linked.len()) {
            return Err(bad("the marks are not ascending within the blob"));
        }
        let stage = self.temp_path("k");
        let blob_stage = self.temp_path("d");
        let _guards = (TempDir(stage.clone()), TempDir(blob_stage.clone()));
        let id = self.pack_id(linked.files.first().map_or("", |f| f.path.as_str()));
        let packs = self.packs.clone();
        let made = blob_stage.clone();
        let (digest, states, size, marked) = tokio::task::spawn_blocking(move || -> Result<_, IngestError> {
            let blob_stage = made;
            std::fs::create_dir(&stage)?;
            let mut files = Vec::with_capacity(linked.files.len());
            for (k, f) in linked.files.iter().enumerate() {
                files.push(keep_file(Path::new(&f.path), &stage.join(k.to_string()), f.size)?);
            }
            let manifest = PackManifest {
                files,
                runs: linked
                    .runs
                    .iter()
                    .filter(|r| r.len > 0)
                    .map(|r| PackRun {
                        file: r.file,
                        offset: r.offset,
                        len: r.len,
                    })
                    .collect(),
            };
            let encoded =
                bincode::serde::encode_to_vec(&manifest, bincode::config::standard()).map_err(std::io::Error::other)?;
            let pack = Arc::new(Pack::from_manifest(&id, stage.clone(), manifest)?);
            let size = pack.len();
            // Read back through the links: what is named is what will be served.
            let mut sha = GridSha::default().marking(&linked.marks);
            BlobFile::of_pack(pack)?.copy_to(&mut sha)?;
            let marked = sha.marked().to_vec();
            let (actual, states) = sha.finish();
            std::fs::write(stage.join(PACK_MANIFEST), encoded)?;
            // The client's files, its headers' file and what was copied, at once.
            let dir = std::fs::File::open(&stage)?;
            nix::unistd::syncfs(&dir).map_err(std::io::Error::from)?;
            let placed = packs.join(&id);
            std::fs::rename(&stage, &placed)?;
            std::fs::File::open(&packs)?.sync_all()?;
            std::fs::create_dir(&blob_stage)?;
            std::fs::hard_link(placed.join(PACK_MANIFEST), blob_stage.join(pack_link_name(&id)))?;
            let recipe = Recipe {
                runs: vec![RecipeRun {
                    file: id,
                    offset: 0,
                    len: size,
                    pack: true,
                }]
                .into_iter()
                .filter(|r| r.len > 0)
                .collect(),
                origin: None,
            };
            let f = std::fs::File::create(blob_stage.join(RECIPE))?;
            serde_json::to_writer(&f, &recipe).map_err(std::io::Error::other)?;
            f.sync_all()?;
            std::fs::File::open(&blob_stage)?.sync_all()?;
            Ok((actual, states, size, marked))
        })
        .await
        .map_err(|e| IngestError::Io(std::io::Error::other(e)))??;
        if marked.len() != linked_marks {
            return Err(bad("a mark lies past the blob's end"));
        }
        self.commit(&blob_stage, &self.destination(&digest)?).await?;
        self.save_states(&digest, &states);
        let meta = BlobMeta {
            digest,
            // Nothing reads a blob's BLAKE3 (as for blobs kept as runs).
            blake3: String::new(),
            size,
        };
        Ok((meta, marked))
    }

    /// A fresh pack id: a plain name no other pack has.
    fn pack_id(&self, digest: &str) -> String {
        let mut h = blake3::Hasher::new();
        h.update(digest.as_bytes());
        h.update(self.temp_path("").as_os_str().as_encoded_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        h.update(&now.as_nanos().to_le_bytes());
        h.finalize().to_hex()[..16].to_string()
    }

    /// Removes the packs no blob has linked for at least `idle` (their manifest's link
    /// count is one, and its change time, which a link's removal sets, is that old); returns
    /// how many.
    pub fn collect_packs(&self, idle: Duration) -> std::io::Result<usize> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let mut removed = 0;
        for e in std::fs::read_dir(&self.packs)? {
            let dir = e?.path();
            let unused = match std::fs::symlink_metadata(dir.join(PACK_MANIFEST)) {
                Ok(m) => m.nlink() <= 1 && now.saturating_sub(m.ctime()) >= idle.as_secs() as i64,
                // Packs are renamed in whole: one without a manifest is nobody's.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(_) => false,
            };
            if unused && std::fs::remove_dir_all(&dir).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The bytes pack `id`'s files take (0 when it cannot be read).
    pub(crate) fn pack_bytes(&self, id: &str) -> u64 {
        Pack::load(&self.packs, id).map_or(0, |p| p.bytes())
    }
}

/// Removes a directory unless the ingest moved it into place.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::blob_parts::tests::{body, digest_of};
    use lcache_proto::wire::{BlobPart, LinkedFile, LinkedRun};

    /// A "client" beside the store: files and a file of "headers" between them.
    struct Client {
        dir: tempfile::TempDir,
        linked: LinkedBlob,
        bytes: Vec<u8>,
    }

    fn client_in(parent: &Path, n: usize) -> Client {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let mut headers = Vec::new();
        let mut linked = LinkedBlob::default();
        let mut bytes = Vec::new();
        linked.files.push(LinkedFile {
            path: dir.path().join("headers").display().to_string(),
            size: 0,
        });
        for k in 0..n {
            let h = format!("<header {k}>").into_bytes();
            linked.runs.push(LinkedRun {
                file: 0,
                offset: headers.len() as u64,
                len: h.len() as u64,
            });
            headers.extend_from_slice(&h);
            bytes.extend_from_slice(&h);
            let content: Vec<u8> = (0..1000 + k * 37).map(|i| (i * 7 + k) as u8).collect();
            let path = dir.path().join(format!("f{k}"));
            std::fs::write(&path, &content).unwrap();
            linked.runs.push(LinkedRun {
                file: linked.files.len() as u32,
                offset: 0,
                len: content.len() as u64,
            });
            linked.files.push(LinkedFile {
                path: path.display().to_string(),
                size: content.len() as u64,
            });
            bytes.extend_from_slice(&content);
        }
        // The tar's end: zeros no file holds.
        linked.runs.push(LinkedRun {
            file: LinkedRun::ZEROS,
            offset: 0,
            len: 1024,
        });
        bytes.extend_from_slice(&[0u8; 1024]);
        std::fs::write(dir.path().join("headers"), &headers).unwrap();
        linked.files[0].size = headers.len() as u64;
        Client { dir, linked, bytes }
    }

    fn read(s: &BlobStore, digest: &str) -> Vec<u8> {
        let mut out = Vec::new();
        s.open_blob(digest).unwrap().unwrap().copy_to(&mut out).unwrap();
        out
    }

    fn packs(s: &BlobStore) -> usize {
        std::fs::read_dir(&s.packs).unwrap().count()
    }

    #[tokio::test]
    async fn a_linked_layer_is_kept_as_the_clients_files_and_an_edit_over_it_links_only_its_pack() {
        let root = tempfile::tempdir().unwrap();
        let s = BlobStore::open(&root.path().join("blobs")).unwrap();
        let c = client_in(root.path(), 200);
        let d = digest_of(&c.bytes);
        let usage_before = s.disk_usage().unwrap();
        let (meta, _) = s.ingest_linked(c.linked.clone(), &Limits::default()).await.unwrap();
        assert_eq!(meta.digest, d, "named by what its bytes hash to");
        // Named again, with the states at the marks.
        let mut marked = c.linked.clone();
        marked.marks = vec![0, 5000, c.bytes.len() as u64];
        let (named, states) = s.ingest_linked(marked.clone(), &Limits::default()).await.unwrap();
        assert_eq!(named.digest, d);
        let mut sha = GridSha::default().marking(&marked.marks);
        std::io::Write::write_all(&mut sha, &c.bytes).unwrap();
        assert_eq!(states, sha.marked());
        marked.marks = vec![5000, 10];
        assert!(s.ingest_linked(marked.clone(), &Limits::default()).await.is_err());
        marked.marks = vec![c.bytes.len() as u64 + 1];
        assert!(s.ingest_linked(marked, &Limits::default()).await.is_err());
        assert_eq!(
            s.collect_packs(Duration::ZERO).unwrap(),
            1,
            "the pack the second one replaced"
        );
        assert_eq!(meta.size, c.bytes.len() as u64);
        assert_eq!(read(&s, &d), c.bytes);
        assert_eq!(s.temp_files(), 0);
        // The store's file is the client's: the same inode, nothing copied.
        let client_file = std::fs::metadata(c.dir.path().join("f7")).unwrap();
        assert_eq!(client_file.nlink(), 2);
        let in_pack = std::fs::read_dir(&s.packs).unwrap().next().unwrap().unwrap().path();
        assert_eq!(std::fs::metadata(in_pack.join("8")).unwrap().ino(), client_file.ino());
        assert!(s.disk_usage().unwrap() >= usage_before + c.bytes.len() as u64 - 200 * 16);

        // An edit of one file, sent as parts over it: one link to the pack, not one per file.
        let cut = 50_000u64;
        let mut edited = c.bytes[..cut as usize].to_vec();
        edited.extend_from_slice(b"EDIT");
        edited.extend_from_slice(&c.bytes[cut as usize + 10..]);
        let parts = [
            BlobPart::Base { offset: 0, len: cut },
            BlobPart::Sent { len: 4 },
            BlobPart::Base {
                offset: cut + 10,
                len: c.bytes.len() as u64 - cut - 10,
            },
        ];
        let d2 = digest_of(&edited);
        s.ingest_parts(&d2, body(&d, &parts, b"EDIT"), None, &Limits::default())
            .await
            .unwrap();
        assert_eq!(read(&s, &d2), edited);
        let names = std::fs::read_dir(s.path_of(&d2).unwrap()).unwrap().count();
        assert!(names <= 4, "the edit's directory holds {names} names");

        // The client's cache drops its snapshot, and the first blob goes: the edit still
        // reads, its pack is not collected while it links it; once it goes too, it is.
        let client_dir = c.dir.path().to_path_buf();
        drop(c);
        assert!(!client_dir.exists());
        s.remove(&d).unwrap();
        assert_eq!(s.collect_packs(Duration::ZERO).unwrap(), 0);
        assert_eq!(read(&s, &d2), edited);
        assert!(
            s.freed_by_removing(&d2) > 100_000,
            "the last blob to read the pack frees it"
        );
        s.remove(&d2).unwrap();
        assert_eq!(
            s.collect_packs(Duration::from_secs(3600)).unwrap(),
            0,
            "not idle long enough"
        );
        assert_eq!(s.collect_packs(Duration::ZERO).unwrap(), 1);
        assert_eq!(packs(&s), 0);
    }

    #[tokio::test]
    async fn a_linked_upload_that_lies_leaves_nothing_and_never_reads_a_link_or_a_fifo() {
        let root = tempfile::tempdir().unwrap();
        let s = BlobStore::open(&root.path().join("blobs")).unwrap();
        let c = client_in(root.path(), 5);
        let d = digest_of(&c.bytes);
        let secret = root.path().join("secret");
        std::fs::write(&secret, vec![b's'; 1037]).unwrap();
        let link = c.dir.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let fifo = c.dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut cases: Vec<(&str, LinkedBlob)> = Vec::new();
        for (what, path) in [("a symlink", &link), ("a fifo", &fifo)] {
            let mut l = c.linked.clone();
            l.files[2].path = path.display().to_string();
            cases.push((what, l));
        }
        let mut l = c.linked.clone();
        l.files[2].size += 1;
        l.runs[3].len += 1;
        cases.push(("a wrong size", l));
        let mut l = c.linked.clone();
        l.runs[3].offset = 5;
        cases.push(("a run past its file", l));
        let mut l = c.linked.clone();
        l.files[2].path = "relative/f1".into();
        cases.push(("a relative path", l));
        let mut l = c.linked.clone();
        l.runs[1].file = 99;
        cases.push(("an unlisted file", l));
        let mut l = c.linked.clone();
        l.files[2].path = c.dir.path().join("gone").display().to_string();
        cases.push(("a missing file", l));
        for (what, linked) in cases {
            let e = s.ingest_linked(linked, &Limits::default()).await.unwrap_err();
            assert!(matches!(e, IngestError::BadParts(_)), "{what}: {e}");
            assert!(!s.exists(&d), "{what}");
            assert_eq!((s.temp_files(), packs(&s)), (0, 0), "{what}");
        }
        let small = Limits {
            max_blob_size: 100,
            ..Limits::default()
        };
        let e = s.ingest_linked(c.linked.clone(), &small).await.unwrap_err();
        assert!(matches!(e, IngestError::TooLarge { .. }), "{e}");
        assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);
    }

    #[tokio::test]
    async fn a_file_on_another_file_system_is_copied() {
        // /dev/shm is a tmpfs where there is one: a link from there fails with EXDEV.
        let shm = Path::new("/dev/shm");
        let root = tempfile::tempdir().unwrap();
        let other_fs =
            shm.is_dir() && std::fs::metadata(shm).unwrap().dev() != std::fs::metadata(root.path()).unwrap().dev();
        if !other_fs {
            eprintln!("no second file system here: the copy is not exercised");
            return;
        }
        let s = BlobStore::open(&root.path().join("blobs")).unwrap();
        let c = client_in(shm, 20);
        let d = digest_of(&c.bytes);
        s.ingest_linked(c.linked.clone(), &Limits::default()).await.unwrap();
        assert_eq!(
            std::fs::metadata(c.dir.path().join("f3")).unwrap().nlink(),
            1,
            "copied, not linked"
        );
        drop(c);
        let mut out = Vec::new();
        s.open_blob(&d).unwrap().unwrap().copy_to(&mut out).unwrap();
        assert_eq!(digest_of(&out), d);
    }

    #[tokio::test]
    async fn a_pack_a_killed_daemon_left_without_its_blob_is_removed_at_the_next_start() {
        let root = tempfile::tempdir().unwrap();
        let blobs = root.path().join("blobs");
        let s = BlobStore::open(&blobs).unwrap();
        let c = client_in(root.path(), 30);
        let d = digest_of(&c.bytes);
        s.ingest_linked(c.linked.clone(), &Limits::default()).await.unwrap();
        // Killed after the pack was moved into place, before its blob was: the blob's
        // directory (and its link to the pack) never appeared.
        std::fs::remove_dir_all(s.path_of(&d).unwrap()).unwrap();
        drop(s);
        let s = BlobStore::open(&blobs).unwrap();
        assert_eq!(packs(&s), 0);
        assert_eq!(std::fs::metadata(c.dir.path().join("f3")).unwrap().nlink(), 1);
        // A blob that still reads its pack keeps it across a restart.
        s.ingest_linked(c.linked.clone(), &Limits::default()).await.unwrap();
        drop(s);
        let s = BlobStore::open(&blobs).unwrap();
        assert_eq!(packs(&s), 1);
        assert_eq!(read(&s, &d), c.bytes);
    }
}
