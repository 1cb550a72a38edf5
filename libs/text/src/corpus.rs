//! Finding the text files of a corpus.

use std::path::{Path, PathBuf};

use crate::Error;

/// The text files under `inputs`: a file is taken as given, a directory is walked
/// recursively for files ending in `.{extension}` (hidden entries skipped). Directories
/// are listed in byte order of their names, so the same tree always gives the same order
/// (the order decides the validation split of data preparation).
pub fn text_files(inputs: &[PathBuf], extension: &str) -> Result<Vec<PathBuf>, Error> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| io(input, e))?;
        if meta.is_dir() {
            walk(input, extension, &mut files)?;
        } else {
            files.push(input.clone());
        }
    }
    if files.is_empty() {
        return Err(Error::Corpus(format!(
            "no .{extension} files under {}",
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(files)
}

fn walk(dir: &Path, extension: &str, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| io(dir, e)))
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, extension, out)?;
        } else if path.extension().is_some_and(|e| e == extension) {
            out.push(path);
        }
    }
    Ok(())
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_walked_in_a_stable_order_and_filtered_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/.hidden")).unwrap();
        for f in [
            "b/2.txt",
            "a.txt",
            "b/1.txt",
            "b/skip.json",
            "b/.hidden/x.txt",
        ] {
            std::fs::write(root.join(f), "x").unwrap();
        }
        let files = text_files(&[root.to_path_buf()], "txt").unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["a.txt", "b/1.txt", "b/2.txt"]);
        let err = text_files(&[root.join("missing")], "txt").unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(text_files(&[root.join("b/.hidden")], "md").is_err());
    }
}
