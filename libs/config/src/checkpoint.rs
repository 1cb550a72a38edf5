//! The files of a checkpoint in the published Hugging Face layout: a directory with
//! `config.json` and either `model.safetensors` or a sharded
//! `model.safetensors.index.json` naming its shard files. Reading the tensors themselves
//! is the model crate's work; what is here needs no tensor library.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{Config, Error, Result};

/// File name of the config.
pub const CONFIG_FILE: &str = "config.json";
/// File name of a single-file checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Reads and validates the `config.json` of the checkpoint in `dir`.
pub fn read_config(dir: &Path) -> Result<Config> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
    Config::from_json(&text)
}

/// The weight files of the checkpoint in `dir`, sorted: `model.safetensors`, or the
/// shards its index names (each a plain file name in `dir`, each present).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(INDEX_FILE);
    if !index_path.is_file() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} is present"),
        });
    }
    let text = std::fs::read_to_string(&index_path).map_err(Error::io(&index_path))?;
    let bad = |reason: String| Error::Checkpoint {
        path: index_path.clone(),
        reason,
    };
    let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("expected an object field `weight_map`".into()))?;
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry `{name}` is not a file name")))?;
        if Path::new(file).components().count() != 1 {
            return Err(bad(format!(
                "shard `{file}` must be a plain file name in the checkpoint directory"
            )));
        }
        files.insert(file.to_string());
    }
    let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(bad(format!("shard {} does not exist", missing.display())));
    }
    Ok(paths)
}

/// A hash of the bytes of the weight files `files` (16 hex digits; sorted and deduplicated
/// first, so the order they are named in does not matter): KV state computed by other
/// weights is never used.
pub fn fingerprint<'a>(files: impl IntoIterator<Item = &'a Path>) -> Result<String> {
    let mut files: Vec<&Path> = files.into_iter().collect();
    files.sort();
    files.dedup();
    let mut sum = bd3lm_bytes::Checksum::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        let mut f = std::fs::File::open(path).map_err(Error::io(path))?;
        loop {
            let n = f.read(&mut buf).map_err(Error::io(path))?;
            if n == 0 {
                break;
            }
            sum.update(&buf[..n]);
        }
    }
    Ok(format!("{:016x}", sum.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sharded index must name plain, present files; the fingerprint follows the bytes,
    /// not the order the files are named in.
    #[test]
    fn sharded_layouts_are_checked_and_fingerprinted_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(
            weight_files(d)
                .unwrap_err()
                .to_string()
                .contains(WEIGHTS_FILE)
        );
        std::fs::write(d.join("a.safetensors"), b"first").unwrap();
        std::fs::write(d.join("b.safetensors"), b"second").unwrap();
        let index = r#"{"weight_map": {"x": "b.safetensors", "y": "a.safetensors"}}"#;
        std::fs::write(d.join(INDEX_FILE), index).unwrap();
        let files = weight_files(d).unwrap();
        assert_eq!(
            files,
            vec![d.join("a.safetensors"), d.join("b.safetensors")]
        );
        let reversed: Vec<&Path> = files.iter().rev().map(PathBuf::as_path).collect();
        let print = fingerprint(files.iter().map(PathBuf::as_path)).unwrap();
        assert_eq!(print, fingerprint(reversed).unwrap());
        std::fs::write(d.join("b.safetensors"), b"changed").unwrap();
        assert_ne!(
            print,
            fingerprint(files.iter().map(PathBuf::as_path)).unwrap()
        );
        std::fs::write(d.join(INDEX_FILE), r#"{"weight_map": {"x": "../up"}}"#).unwrap();
        assert!(
            weight_files(d)
                .unwrap_err()
                .to_string()
                .contains("plain file")
        );
    }
}
