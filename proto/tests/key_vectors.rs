//! The test vectors of docs/cache-keys.md, read from the document itself, so the text a
//! re-implementer follows and the code cannot drift apart.

use lcache_proto::cache_key::KeyInputs;
use lcache_proto::source_select::{ContextEntry, EntryKind, FileStamp, SelectedRoot};
use lcache_proto::sources_digest::sources_digest;

const DOC: &str = include_str!("../../docs/cache-keys.md");

/// Blocks of the form ```` ```json vector ```` … ```` ``` ```` followed by `encoding:` and `key:` lines.
fn vectors() -> Vec<(KeyInputs, String, String)> {
    let mut out = Vec::new();
    let mut rest = DOC;
    while let Some(start) = rest.find("```json vector\n") {
        let body = &rest[start + 15..];
        let end = body.find("```").expect("closed block");
        let inputs: KeyInputs = serde_json::from_str(&body[..end]).expect("vector JSON");
        let after = &body[end + 3..];
        let field = |name: &str| -> String {
            let at = after.find(name).unwrap_or_else(|| panic!("{name} after vector"));
            let line = after[at + name.len()..].lines().next().unwrap_or_default();
            line.trim().trim_matches('`').to_string()
        };
        out.push((inputs, field("encoding:"), field("key:")));
        rest = &body[end..];
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_documented_vector_encodes_and_hashes_as_written() {
    let v = vectors();
    assert!(
        v.len() >= 3,
        "the document should hold at least 3 vectors, found {}",
        v.len()
    );
    for (inputs, encoding, key) in v {
        assert_eq!(hex(&inputs.encode()), encoding, "encoding of {inputs:?}");
        assert_eq!(inputs.key(), key, "key of {inputs:?}");
    }
}

#[test]
fn the_documented_sources_digest_example_holds() {
    let entries = vec![
        ContextEntry {
            path: "src".into(),
            kind: EntryKind::Dir,
            mode: 0o755,
            link_target: None,
            size: 0,
            stamp: FileStamp::default(),
            shared: false,
        },
        ContextEntry {
            path: "src/a.txt".into(),
            kind: EntryKind::File,
            mode: 0o644,
            link_target: None,
            size: 3,
            stamp: FileStamp::default(),
            shared: false,
        },
        ContextEntry {
            path: "src/l".into(),
            kind: EntryKind::Symlink,
            mode: 0o777,
            link_target: Some("a.txt".into()),
            size: 0,
            stamp: FileStamp::default(),
            shared: false,
        },
    ];
    let roots = vec![SelectedRoot {
        path: "src".into(),
        entry: Some(0),
        members: vec![1, 2],
    }];
    let content = *blake3::hash(b"hi\n").as_bytes();
    let d = sources_digest(&entries, &roots, &|_| content);
    let documented = DOC
        .lines()
        .find_map(|l| l.strip_prefix("sources digest of the example: "))
        .expect("documented example digest")
        .trim()
        .trim_matches('`');
    assert_eq!(d.digest, documented);
}
