//! Helpers for the end-to-end tests: find the real binaries, make build contexts in temp
//! directories, run `lcache` and read its JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The directory holding the workspace's built binaries (`target/debug`), found from the
/// test executable's own path (`target/debug/deps/…`) unless `LCACHE_BIN_DIR` says otherwise.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LCACHE_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Path of a workspace binary; fails with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run the tests with `cargo test --workspace`, which builds it",
        p.display()
    );
    p
}

/// A build context in a temp directory.
pub struct Project {
    dir: tempfile::TempDir,
}

impl Default for Project {
    fn default() -> Self {
        Self::new()
    }
}

impl Project {
    /// An empty context.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The context directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file (creating parent directories).
    pub fn write(&self, rel: &str, content: &str) -> &Self {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, content).expect("write");
        self
    }

    /// Runs `lcache ARGS` in the context directory.
    pub fn lcache(&self, args: &[&str]) -> Output {
        Command::new(bin("lcache"))
            .args(args)
            .current_dir(self.path())
            .output()
            .expect("run lcache")
    }

    /// Runs `lcache keys --json EXTRA .` and returns each step's key (or `pending`).
    pub fn keys(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["keys", "--json"];
        args.extend_from_slice(extra);
        args.push(".");
        let out = self.lcache(&args);
        assert!(
            out.status.success(),
            "lcache keys failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("keys JSON");
        v["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| s["key"].as_str().map_or_else(|| "pending".to_string(), str::to_string))
            .collect()
    }
}

/// Which steps' keys differ between two runs (same step count expected).
pub fn changed(before: &[String], after: &[String]) -> Vec<bool> {
    assert_eq!(before.len(), after.len(), "step count changed");
    before.iter().zip(after).map(|(a, b)| a != b).collect()
}
