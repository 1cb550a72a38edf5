//! Generates the gRPC code of `proto/bd3lm/v1` and the descriptor set served by reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "bd3lm/v1/generation.proto",
        "bd3lm/v1/training.proto",
        "bd3lm/v1/worker.proto",
    ]
    .map(|f| root.join(f));
    let descriptor =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("bd3lm_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .compile_protos(&files, std::slice::from_ref(&root))?;
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    Ok(())
}
