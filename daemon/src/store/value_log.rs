//! An append-only log of keyed values, its index in memory: for the store's bulky values
//! that are written whole and seldom rewritten — a context's file digests (one value per
//! directory) and sources digests' directory listings. sled wrote those three to four
//! times over (26 MiB for 7.5 MB of values, measured alone); here a value is written once,
//! where it is appended. A newer value for a key, or its removal, is appended after it,
//! and the log is written anew once most of it is dead.
//!
//! Each record is checked by a BLAKE3 when the log is opened and again when it is read: a
//! damaged or cut-short tail (a crash mid-append) is cut off at open, and a value damaged
//! later reads as absent. Both kinds of value are caches of what can be learnt again.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The first bytes of a log.
const MAGIC: &[u8; 8] = b"lcvlog01";

/// A record's head: key length, value length (`REMOVED` for a removal).
const HEAD: usize = 8;
/// The BLAKE3 prefix after each record.
const CHECK: usize = 8;
const REMOVED: u32 = u32::MAX;

/// A log is written anew when it is over this size and over twice what is live in it.
const COMPACT_FROM: u64 = 16 << 20;

/// A key's value in the log: where its record starts, and its lengths.
#[derive(Debug, Clone, Copy)]
struct Slot {
    at: u64,
    key_len: u32,
    value_len: u32,
}

impl Slot {
    fn record_len(&self) -> u64 {
        (HEAD + CHECK) as u64 + u64::from(self.key_len) + u64::from(self.value_len)
    }
}

struct Inner {
    file: File,
    index: BTreeMap<Vec<u8>, Slot>,
    /// Where the next record goes.
    end: u64,
    /// The bytes of the records the index points at.
    live: u64,
    /// Appended since the last sync.
    dirty: bool,
}

/// One log file and its index.
pub struct ValueLog {
    path: PathBuf,
    inner: Mutex<Inner>,
}

fn check_of(head: &[u8], key: &[u8], value: &[u8]) -> [u8; CHECK] {
    let mut h = blake3::Hasher::new();
    h.update(head);
    h.update(key);
    h.update(value);
    let mut out = [0; CHECK];
    out.copy_from_slice(&h.finalize().as_bytes()[..CHECK]);
    out
}

/// One record's bytes (`None`: a removal).
fn record(key: &[u8], value: Option<&[u8]>) -> Vec<u8> {
    let value_len = value.map_or(REMOVED, |v| v.len() as u32);
    let mut head = [0u8; HEAD];
    head[..4].copy_from_slice(&(key.len() as u32).to_le_bytes());
    head[4..].copy_from_slice(&value_len.to_le_bytes());
    let value = value.unwrap_or_default();
    let mut out = Vec::with_capacity(HEAD + key.len() + value.len() + CHECK);
    out.extend_from_slice(&head);
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out.extend_from_slice(&check_of(&head, key, value));
    out
}

impl ValueLog {
    /// Opens (creating) the log at `path`, cutting off a damaged or unfinished tail.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut inner = Inner {
            file,
            index: BTreeMap::new(),
            end: 0,
            live: 0,
            dirty: false,
        };
        let len = inner.file.metadata()?.len();
        let mut magic = [0u8; 8];
        if len < MAGIC.len() as u64 || inner.file.read_exact_at(&mut magic, 0).is_err() || &magic != MAGIC {
            // New, or not a log this code wrote: what it held is learnt again.
            inner.file.set_len(0)?;
            inner.file.write_all_at(MAGIC, 0)?;
            inner.file.sync_all()?;
            inner.end = MAGIC.len() as u64;
        } else {
            inner.end = scan(&inner.file, &mut inner.index)?;
            inner.live = inner.index.values().map(Slot::record_len).sum();
            if inner.end < len {
                inner.file.set_len(inner.end)?;
                inner.file.sync_all()?;
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            inner: Mutex::new(inner),
        })
    }

    /// The log's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of `key`; a record damaged since it was written reads as absent.
    pub fn get(&self, key: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        let inner = self.lock();
        let Some(slot) = inner.index.get(key).copied() else {
            return Ok(None);
        };
        read_value(&inner.file, key, slot)
    }

    /// Whether `key` has a value.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.lock().index.contains_key(key)
    }

    /// Every key beginning with `prefix`, with its value (damaged ones left out), in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (k, slot) in inner.index.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            if let Some(v) = read_value(&inner.file, k, *slot)? {
                out.push((k.clone(), v));
            }
        }
        Ok(out)
    }

    /// Appends each key's new value (`None`: removed) in one write. Durable after [`Self::sync`].
    pub fn put_many<'a>(&self, changes: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>) -> std::io::Result<()> {
        let mut inner = self.lock();
        let mut bytes = Vec::new();
        let mut slots = Vec::new();
        for (key, value) in changes {
            let at = inner.end + bytes.len() as u64;
            bytes.extend_from_slice(&record(key, value));
            slots.push((
                key,
                value.map(|v| Slot {
                    at,
                    key_len: key.len() as u32,
                    value_len: v.len() as u32,
                }),
            ));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let end = inner.end;
        // On failure nothing the index points at moved; a part written is cut off at the
        // next open.
        inner.file.write_all_at(&bytes, end)?;
        inner.end += bytes.len() as u64;
        inner.dirty = true;
        for (key, slot) in slots {
            let before = match slot {
                Some(s) => {
                    inner.live += s.record_len();
                    inner.index.insert(key.to_vec(), s)
                }
                None => inner.index.remove(key),
            };
            if let Some(b) = before {
                inner.live -= b.record_len();
            }
        }
        if inner.end > COMPACT_FROM && inner.end > 2 * inner.live {
            self.compact(&mut inner)?;
        }
        Ok(())
    }

    /// Makes what was appended durable.
    pub fn sync(&self) -> std::io::Result<()> {
        let mut inner = self.lock();
        if inner.dirty {
            inner.file.sync_data()?;
            inner.dirty = false;
        }
        Ok(())
    }

    /// The log's size on disk and the bytes of its live records.
    pub fn sizes(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.end, inner.live)
    }

    /// Drops every key `keep` refuses and writes the log anew with the rest; returns how
    /// many were dropped. `keep` is asked under the log's lock, so no append lands between
    /// its answer and the rewrite.
    pub fn retain(&self, mut keep: impl FnMut(&[u8]) -> bool) -> std::io::Result<usize> {
        let mut inner = self.lock();
        let before = inner.index.len();
        inner.index.retain(|key, _| keep(key));
        let dropped = before - inner.index.len();
        inner.live = inner.index.values().map(Slot::record_len).sum();
        if dropped > 0 {
            // No removal records: the new log simply lacks them. Should the rewrite fail, the
            // old log is kept and what was dropped comes back at the next open, unharmed.
            self.compact(&mut inner)?;
        }
        Ok(dropped)
    }

    /// Writes the live records to a new log and renames it over this one.
    fn compact(&self, inner: &mut Inner) -> std::io::Result<()> {
        let tmp = self.path.with_extension("compacting");
        let mut out = std::io::BufWriter::new(File::create(&tmp)?);
        out.write_all(MAGIC)?;
        let mut at = MAGIC.len() as u64;
        let mut index = BTreeMap::new();
        for (key, slot) in &inner.index {
            // A value damaged on disk is dropped here, as a read would drop it.
            let Some(value) = read_value(&inner.file, key, *slot)? else {
                continue;
            };
            let r = record(key, Some(&value));
            out.write_all(&r)?;
            index.insert(key.clone(), Slot { at, ..*slot });
            at += r.len() as u64;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        inner.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        inner.live = at - MAGIC.len() as u64;
        inner.end = at;
        inner.index = index;
        inner.dirty = false;
        Ok(())
    }
}

/// Reads the value of the record at `slot`, checking it; `None` when it does not check.
fn read_value(file: &File, key: &[u8], slot: Slot) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; usize::try_from(slot.record_len()).unwrap_or(usize::MAX)];
    match file.read_exact_at(&mut buf, slot.at) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (head, rest) = buf.split_at(HEAD);
    let (stored_key, rest) = rest.split_at(slot.key_len as usize);
    let (value, check) = rest.split_at(slot.value_len as usize);
    Ok((stored_key == key && check == check_of(head, stored_key, value)).then(|| value.to_vec()))
}

/// Reads every record from the start, filling `index`; returns where the good records end.
fn scan(file: &File, index: &mut BTreeMap<Vec<u8>, Slot>) -> std::io::Result<u64> {
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut skip = [0u8; 8];
    r.read_exact(&mut skip)?;
    let mut at = MAGIC.len() as u64;
    let mut head = [0u8; HEAD];
    let mut body = Vec::new();
    loop {
        if r.read_exact(&mut head).is_err() {
            return Ok(at);
        }
        let key_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let value_len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let removed = value_len == REMOVED;
        let body_len = u64::from(key_len) + if removed { 0 } else { u64::from(value_len) } + CHECK as u64;
        // A length no record of ours has is a damaged head: the log ends before it.
        if body_len > 1 << 30 {
            return Ok(at);
        }
        body.resize(body_len as usize, 0);
        if r.read_exact(&mut body).is_err() {
            return Ok(at);
        }
        let (key, rest) = body.split_at(key_len as usize);
        let (value, check) = rest.split_at(rest.len() - CHECK);
        if check != check_of(&head, key, value) {
            return Ok(at);
        }
        if removed {
            index.remove(key);
        } else {
            index.insert(key.to_vec(), Slot { at, key_len, value_len });
        }
        at += (HEAD as u64) + body_len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(log: &ValueLog, key: &str, value: Option<&str>) {
        log.put_many([(key.as_bytes(), value.map(str::as_bytes))]).unwrap();
    }

    fn get(log: &ValueLog, key: &str) -> Option<String> {
        log.get(key.as_bytes()).unwrap().map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn retain_drops_what_it_refuses_and_the_log_reopens_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.log");
        {
            let log = ValueLog::open(&path).unwrap();
            for k in ["keep/1", "drop/1", "keep/2", "drop/2"] {
                put(&log, k, Some(&k.repeat(100)));
            }
            let before = log.sizes().0;
            let dropped = log.retain(|k| k.starts_with(b"keep/")).unwrap();
            assert_eq!(dropped, 2);
            assert_eq!(get(&log, "drop/1"), None);
            assert_eq!(get(&log, "keep/2").as_deref(), Some("keep/2".repeat(100).as_str()));
            let (end, live) = log.sizes();
            assert!(end < before, "written anew without the dropped records");
            assert_eq!(end, live + MAGIC.len() as u64);
            put(&log, "keep/3", Some("three"));
            log.sync().unwrap();
        }
        let log = ValueLog::open(&path).unwrap();
        let keys: Vec<_> = log.scan_prefix(b"").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, [b"keep/1".to_vec(), b"keep/2".to_vec(), b"keep/3".to_vec()]);
    }

    #[test]
    fn the_newest_value_and_removals_hold_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.log");
        {
            let log = ValueLog::open(&path).unwrap();
            put(&log, "a/1", Some("one"));
            put(&log, "a/2", Some("two"));
            put(&log, "b/1", Some("bee"));
            put(&log, "a/1", Some("uno"));
            put(&log, "a/2", None);
            log.sync().unwrap();
            assert_eq!(get(&log, "a/1").as_deref(), Some("uno"));
        }
        let log = ValueLog::open(&path).unwrap();
        assert_eq!(get(&log, "a/1").as_deref(), Some("uno"));
        assert_eq!(get(&log, "a/2"), None);
        assert!(log.contains(b"b/1"));
        let a: Vec<_> = log.scan_prefix(b"a/").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(a, [b"a/1".to_vec()]);
    }

    #[test]
    fn a_tail_cut_short_or_damaged_is_cut_off_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.log");
        let log = ValueLog::open(&path).unwrap();
        put(&log, "kept", Some("value"));
        log.sync().unwrap();
        let good = std::fs::metadata(&path).unwrap().len();
        put(&log, "lost", Some("a value the crash cut"));
        drop(log);
        // Cut mid-record, as a crash mid-append leaves it.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(good + 11).unwrap();
        drop(f);
        let log = ValueLog::open(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            good,
            "the partial record is cut off"
        );
        assert_eq!((get(&log, "kept").as_deref(), get(&log, "lost")), (Some("value"), None));
        put(&log, "next", Some("appended where the good records end"));
        drop(log);
        // A byte flipped in the last record's value: the log ends before it.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - CHECK - 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let log = ValueLog::open(&path).unwrap();
        assert_eq!((get(&log, "kept").as_deref(), get(&log, "next")), (Some("value"), None));
    }

    #[test]
    fn a_value_damaged_after_open_reads_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.log");
        let log = ValueLog::open(&path).unwrap();
        put(&log, "k", Some("value"));
        let bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(5).position(|w| w == b"value").unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"V", at as u64).unwrap();
        assert_eq!(get(&log, "k"), None);
        assert!(log.scan_prefix(b"").unwrap().is_empty());
    }

    #[test]
    fn a_file_that_is_not_a_log_is_started_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.log");
        std::fs::write(&path, b"something else entirely").unwrap();
        let log = ValueLog::open(&path).unwrap();
        assert!(log.scan_prefix(b"").unwrap().is_empty());
        put(&log, "k", Some("v"));
        drop(log);
        assert_eq!(get(&ValueLog::open(&path).unwrap(), "k").as_deref(), Some("v"));
    }

    #[test]
    fn a_log_mostly_dead_is_written_anew_with_what_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.log");
        let log = ValueLog::open(&path).unwrap();
        let big = "x".repeat(1 << 20);
        for round in 0..20 {
            for k in ["one", "two"] {
                put(&log, k, Some(&format!("{round}{big}")));
            }
        }
        put(&log, "two", None);
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len < 2 * COMPACT_FROM, "written anew: {len} bytes");
        assert!(get(&log, "one").unwrap().starts_with("19x"));
        drop(log);
        let log = ValueLog::open(&path).unwrap();
        assert!(get(&log, "one").unwrap().starts_with("19x"));
        assert_eq!(get(&log, "two"), None);
        assert!(!dir.path().join("v.compacting").exists());
    }
}
