//! The metrics log of a run.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::write_atomic;
use crate::{Error, Result};

/// The JSON-lines metrics log. Opening it for a resumed run drops the lines written after
/// the saved step, so the log stays one consistent curve.
pub(super) struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    pub(super) fn open(path: &Path, step: u64) -> Result<Self> {
        let kept: String = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("step")?.as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            Err(_) => String::new(),
        };
        write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(Error::io(path))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    pub(super) fn write(&mut self, kind: &str, record: &impl Serialize) -> Result<()> {
        let mut value = serde_json::to_value(record).expect("metrics serialize");
        value["kind"] = kind.into();
        writeln!(self.file, "{value}").map_err(Error::io(&self.path))
    }
}
