//! The `lcached` binary's surface: help, and bad arguments refused with a way forward.

use std::process::Command;

#[test]
fn help_documents_listen_store_and_watch() {
    let out = Command::new(env!("CARGO_BIN_EXE_lcached"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--listen", "--store", "--watch"] {
        assert!(text.contains(flag), "{flag} missing from help:\n{text}");
    }
}

#[test]
fn a_bad_listen_address_says_how_to_write_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_lcached"))
        .args(["--listen", "ftp://x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("unix:///path/to/lcached.sock, tcp://host:port or https://host:port"));
}
