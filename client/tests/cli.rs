//! The `lcache` binary's surface: it starts, names itself and documents its subcommands.

use std::process::Command;

#[test]
fn help_lists_the_subcommands() {
    let out = Command::new(env!("CARGO_BIN_EXE_lcache"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["parse", "keys"] {
        assert!(text.contains(cmd), "{cmd} missing from help:\n{text}");
    }
}
