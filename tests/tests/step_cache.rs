//! One conformance suite for every `StepCache` implementation, each against a real lcached
//! on a temp socket: the daemon client itself, and the read-only wrapper around it (which
//! reads everything the backing cache holds and stores nothing). A new implementation (an
//! upstream tier, a bucket) joins by adding a line to the table at the bottom.

use std::io::Write;

use lcache_builder::errors::CacheError;
use lcache_builder::step_cache::{BlobSource, ReadOnly, StepCache};
use lcache_client::daemon_client::DaemonClient;
use lcache_e2e::{sha256_digest, Daemon};
use lcache_proto::endpoint::Endpoint;
use lcache_proto::wire::{BlobPart, LayerRef, StepRecord};

/// What an implementation promises about writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// Stored, and visible to later reads.
    Stored,
    /// Accepted and dropped: never visible, never an error.
    Dropped,
}

fn client(d: &Daemon) -> DaemonClient {
    DaemonClient::new(Endpoint::Unix(d.socket.clone()), None).unwrap()
}

fn record(key: &str, blob: &str) -> StepRecord {
    StepRecord {
        key: key.to_string(),
        layer: Some(LayerRef {
            digest: blob.to_string(),
            blake3: String::new(),
            size: 0,
            diff_id: String::new(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }),
        duration_ms: 7,
        inputs: None,
        created_at_ms: 0,
    }
}

fn read(cache: &dyn StepCache, digest: &str) -> Result<Vec<u8>, CacheError> {
    let mut out = Vec::new();
    cache.get_blob(digest, &mut out)?;
    Ok(out)
}

fn conformance(name: &str, d: &Daemon, cache: &dyn StepCache, writes: Writes) {
    let stored = writes == Writes::Stored;

    // A miss is None, not an error.
    let key = "f".repeat(64);
    assert!(cache.get_step(&key).unwrap().is_none(), "{name}: unknown key");
    let missing = sha256_digest(b"never stored");
    assert!(!cache.has_blob(&missing).unwrap(), "{name}: unknown blob");
    let e = read(cache, &missing).unwrap_err();
    assert!(e.is_unusable_blob(), "{name}: {e}");

    // Blobs from memory and, streamed, from part of a file.
    let small = format!("config of {name}").into_bytes();
    let small_digest = sha256_digest(&small);
    cache.put_blob(&small_digest, BlobSource::Bytes(&small)).unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    file.write_all(b"prefix").unwrap();
    file.write_all(&big).unwrap();
    file.write_all(b"suffix").unwrap();
    let big_digest = sha256_digest(&big);
    cache
        .put_blob(
            &big_digest,
            BlobSource::File {
                path: file.path(),
                offset: 6,
                len: big.len() as u64,
            },
        )
        .unwrap();
    for (digest, bytes) in [(&small_digest, &small), (&big_digest, &big)] {
        assert_eq!(cache.has_blob(digest).unwrap(), stored, "{name}: has {digest}");
        match read(cache, digest) {
            Ok(b) => assert!(stored && b == *bytes, "{name}: read back {digest}"),
            Err(e) => assert!(!stored && e.is_unusable_blob(), "{name}: {e}"),
        }
    }

    // A blob given as runs of a stored one and of its own: it reads back whole, and the
    // daemon wrote only its own runs. Over a base the cache lacks, it is stored whole.
    let on_disk = |digest: &str| {
        d.store()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    for (base, edit_at) in [(&big_digest, 1_000_000usize), (&missing, 2_000_000)] {
        let mut edited = big.clone();
        edited[edit_at..edit_at + 10].copy_from_slice(b"0123456789");
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&edited).unwrap();
        let edited_digest = sha256_digest(&edited);
        let parts = [
            BlobPart::Base {
                offset: 0,
                len: edit_at as u64,
            },
            BlobPart::Sent { len: 10 },
            BlobPart::Base {
                offset: edit_at as u64 + 10,
                len: (big.len() - edit_at - 10) as u64,
            },
        ];
        let source = BlobSource::Parts {
            path: file.path(),
            len: edited.len() as u64,
            base,
            parts: &parts,
            unwritten: 0,
        };
        cache.put_blob(&edited_digest, source).unwrap();
        assert_eq!(cache.has_blob(&edited_digest).unwrap(), stored, "{name}: has parts");
        match read(cache, &edited_digest) {
            Ok(b) => assert!(stored && b == edited, "{name}: read back parts"),
            Err(e) => assert!(!stored && e.is_unusable_blob(), "{name}: {e}"),
        }
        if stored {
            assert_eq!(
                on_disk(&edited_digest).is_dir(),
                base == &big_digest,
                "{name}: kept as runs"
            );
        }
        // Parts whose bytes are not the digest's are refused (then whole: refused too).
        let wrong = sha256_digest(&edited[1..]);
        let put = cache.put_blob(
            &wrong,
            BlobSource::Parts {
                path: file.path(),
                len: edited.len() as u64,
                base,
                parts: &parts,
                unwritten: 0,
            },
        );
        assert_eq!(put.is_err(), stored, "{name}: parts under a wrong digest");
        assert!(!cache.has_blob(&wrong).unwrap(), "{name}: wrong digest kept");
    }

    // A range of a blob: its bytes from a first one on.
    let mut tail = Vec::new();
    match cache.get_blob_from(&big_digest, 2_999_000, &mut tail) {
        Ok(n) => assert!(stored && n == 1_000 && tail == big[2_999_000..], "{name}: range"),
        Err(e) => assert!(!stored && e.is_unusable_blob(), "{name}: {e}"),
    }

    // A file whose front was never written (the base's first bytes, which the first part
    // names): taken as parts; refused as parts, uploaded whole with its front filled from
    // the base; over a base the cache lacks, refused, and nothing kept.
    let (front, gap) = (1_500_000usize, 2_000_000usize);
    for (n, base, backwards) in [(0, &big_digest, false), (1, &big_digest, true), (2, &missing, false)] {
        // Backwards base runs are refused as parts: the whole upload has to be the blob.
        let again = if backwards { 0 } else { gap };
        let mut blob = big[..front].to_vec();
        blob.extend_from_slice(format!("edit {n}").as_bytes());
        blob.extend_from_slice(&big[again..]);
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&vec![0; front]).unwrap();
        file.write_all(&blob[front..]).unwrap();
        let parts = [
            BlobPart::Base {
                offset: 0,
                len: front as u64,
            },
            BlobPart::Sent { len: 6 },
            BlobPart::Base {
                offset: again as u64,
                len: (big.len() - again) as u64,
            },
        ];
        let digest = sha256_digest(&blob);
        let put = cache.put_blob(
            &digest,
            BlobSource::Parts {
                path: file.path(),
                len: blob.len() as u64,
                base,
                parts: &parts,
                unwritten: front as u64,
            },
        );
        let kept = stored && base == &big_digest;
        assert_eq!(put.is_ok(), kept || !stored, "{name}: holed parts over {base}: {put:?}");
        assert_eq!(cache.has_blob(&digest).unwrap(), kept, "{name}: holed parts kept");
        if kept {
            assert!(read(cache, &digest).unwrap() == blob, "{name}: holed parts read back");
            assert_eq!(on_disk(&digest).is_dir(), !backwards, "{name}: kept as runs");
        }
    }

    // A blob whose bytes do not hash to its name is refused and never kept.
    let wrong = sha256_digest(b"something else");
    let put = cache.put_blob(&wrong, BlobSource::Bytes(b"these bytes"));
    assert_eq!(put.is_err(), stored, "{name}: wrong digest");
    assert!(!cache.has_blob(&wrong).unwrap(), "{name}: wrong digest kept");

    // A record, once its blob is there.
    cache.put_step(&record(&key, &small_digest)).unwrap();
    let got = cache.get_step(&key).unwrap();
    assert_eq!(got.is_some(), stored, "{name}: record");
    if let Some(r) = got {
        assert_eq!(r.layer.unwrap().digest, small_digest, "{name}: record's layer");
        assert_eq!(r.duration_ms, 7);
    }

    // What the backing store holds is readable through every implementation.
    let shared = format!("shared for {name}").into_bytes();
    let shared_digest = sha256_digest(&shared);
    assert_eq!(d.http("PUT", &format!("/v1/blobs/{shared_digest}"), &shared).0, 201);
    assert_eq!(read(cache, &shared_digest).unwrap(), shared, "{name}: backing blob");

    // A blob damaged on disk is unusable, never served as good.
    let on_disk = on_disk(&shared_digest);
    let mut damaged = std::fs::read(&on_disk).unwrap();
    damaged[0] ^= 0xff;
    std::fs::write(&on_disk, damaged).unwrap();
    let e = read(cache, &shared_digest).unwrap_err();
    assert!(e.is_unusable_blob(), "{name}: {e}");
    assert!(
        !cache.has_blob(&shared_digest).unwrap(),
        "{name}: damaged blob reported present"
    );
}

#[test]
fn every_step_cache_implementation_keeps_the_same_promises() {
    let d = Daemon::start(&[]);
    conformance("daemon client", &d, &client(&d), Writes::Stored);
    let d = Daemon::start(&[]);
    conformance("read-only daemon client", &d, &ReadOnly(client(&d)), Writes::Dropped);
}
