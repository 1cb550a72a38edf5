//! The bundled demo model: the checkpoint `generate`, `serve` and `eval` use when none is
//! given. Its files are compiled into the binary, so a binary copied elsewhere still has
//! it; next to the source tree the files are read in place.

use std::path::{Path, PathBuf};

/// Directory of the demo model in the source tree.
const SOURCE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/demo-model");

/// The demo model's files, compiled in.
const FILES: [(&str, &[u8]); 3] = [
    ("config.json", include_bytes!("../demo-model/config.json")),
    (
        "model.safetensors",
        include_bytes!("../demo-model/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../demo-model/tokenizer.json"),
    ),
];

/// `given`, or the demo model's directory.
pub fn checkpoint_or_demo(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(dir) => Ok(dir.to_path_buf()),
        None => demo_dir(),
    }
}

/// The tokenizer of a checkpoint: `given`, else the directory's `tokenizer.json` when
/// present.
pub fn tokenizer_of(checkpoint: &Path, given: Option<&Path>) -> Option<PathBuf> {
    let own = checkpoint.join("tokenizer.json");
    given
        .map(Path::to_path_buf)
        .or_else(|| own.is_file().then_some(own))
}

/// The source tree's copy when it matches the compiled-in files, else the compiled-in
/// files written once to a directory under the system's temporary directory.
fn demo_dir() -> anyhow::Result<PathBuf> {
    let source = Path::new(SOURCE_DIR);
    if matches(source) {
        return Ok(source.to_path_buf());
    }
    let weights = FILES[1].1;
    let tag = &bd3lm_training::data::checksum(&weights[..weights.len().min(1 << 20)])[..12];
    let dir = std::env::temp_dir().join(format!("bd3lm-demo-{tag}"));
    if matches(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in FILES {
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(dir)
}

/// Whether `dir` holds the compiled-in files (compared by size).
fn matches(dir: &Path) -> bool {
    FILES.iter().all(|(name, bytes)| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64)
    })
}
