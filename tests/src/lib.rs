//! End-to-end tests of the BD3-LM system live in `e2e/`; they run the workspace's binaries
//! as separate processes. Build the binaries first: `cargo build --workspace --bins`.
