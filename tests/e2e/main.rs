//! End-to-end tests: the workspace's binaries run as separate processes.

mod chaos;
mod check_reference;
mod cluster;
mod distributed;
mod eviction;
mod generate;
mod integrity;
mod jobs;
mod models;
mod operations;
mod redis_cluster;
mod security;
mod training;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a workspace binary built next to this test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// The repository's test data directory.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// Runs `bd3lm` with `args`.
pub fn bd3lm(args: &[&str]) -> Output {
    Command::new(bin("bd3lm"))
        .args(args)
        .env("BD3LM_THREADS", "2")
        .output()
        .expect("run bd3lm")
}
