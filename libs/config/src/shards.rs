//! Prepared token shards on disk: raw little-endian rows of `row_length` ids (u16 when the
//! vocabulary fits, else u32) and an `index.json` describing them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// File name of the index in a shard directory.
pub const INDEX_FILE: &str = "index.json";
/// Value of [`ShardIndex::format`].
/// Version 2: shard checksums are `bd3lm_bytes::checksum` (version 1 used byte-wise FNV-1a).
pub const FORMAT: &str = "bd3lm-shards/2";

/// The two splits of prepared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training rows.
    Train,
    /// Held-out rows.
    Validation,
}

impl Split {
    /// The name used in file names and the index.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
        }
    }
}

/// Width of one stored token id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenWidth {
    /// Two bytes: vocabularies up to 65536 ids.
    U16,
    /// Four bytes.
    U32,
}

impl TokenWidth {
    /// The narrowest width holding ids below `vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            Self::U16
        } else {
            Self::U32
        }
    }

    /// Bytes per id.
    pub fn bytes(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }

    /// Appends `id` to `out`.
    pub fn put(self, id: u32, out: &mut Vec<u8>) {
        match self {
            Self::U16 => out.extend_from_slice(&(id as u16).to_le_bytes()),
            Self::U32 => out.extend_from_slice(&id.to_le_bytes()),
        }
    }

    /// Decodes `bytes` (a whole number of ids).
    pub fn get(self, bytes: &[u8]) -> Vec<u32> {
        match self {
            Self::U16 => bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect(),
            Self::U32 => bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        }
    }
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name, inside the shard directory.
    pub file: String,
    /// Which split it holds.
    pub split: Split,
    /// Rows of `row_length` ids.
    pub rows: usize,
    /// [`checksum`] of the file's bytes.
    pub checksum: String,
}

/// Counts of one split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    /// Documents (files) read.
    pub documents: usize,
    /// Tokens of the documents, one EOS per document included.
    pub tokens: usize,
    /// Rows written.
    pub rows: usize,
    /// Tokens at the end that did not fill a row and were dropped.
    pub dropped_tokens: usize,
}

/// `index.json` of a shard directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    /// Always [`FORMAT`].
    pub format: String,
    /// Ids per row: the model length `n`.
    pub row_length: usize,
    /// Width of a stored id.
    pub width: TokenWidth,
    /// Ids of the model vocabulary (`[MASK]` included); every stored id is below it.
    pub vocab_size: usize,
    /// The `[MASK]` id of the model vocabulary (never stored).
    pub mask_id: u32,
    /// First id of every row.
    pub bos: u32,
    /// Last id of every row, and the separator between documents.
    pub eos: u32,
    /// The rule that assigned documents to the validation split.
    pub split_rule: String,
    /// Counts of the training split.
    pub train: SplitStats,
    /// Counts of the validation split.
    pub validation: SplitStats,
    /// The shard files, training shards first.
    pub shards: Vec<ShardEntry>,
}

impl ShardIndex {
    /// Reads and checks the index of the shard directory `dir`: the format, and that every
    /// shard file exists with the size its row count implies. Contents are checked when a
    /// shard is read ([`read_shard`]).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(INDEX_FILE);
        let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        let bad = |reason: String| Error::Shard {
            path: path.clone(),
            reason,
        };
        let index: Self = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if index.format != FORMAT {
            return Err(bad(format!(
                "format {:?}, expected {FORMAT:?}",
                index.format
            )));
        }
        if index.row_length < 2 {
            return Err(bad(format!("row_length {} < 2", index.row_length)));
        }
        for shard in &index.shards {
            if Path::new(&shard.file).components().count() != 1 {
                return Err(bad(format!(
                    "shard {:?} is not a plain file name",
                    shard.file
                )));
            }
            let file = dir.join(&shard.file);
            let len = std::fs::metadata(&file).map_err(Error::io(&file))?.len() as usize;
            let expected = shard.rows * index.row_length * index.width.bytes();
            if len != expected {
                return Err(Error::Shard {
                    path: file,
                    reason: format!(
                        "{len} bytes, expected {expected} ({} rows of {} {:?} ids): truncated or damaged",
                        shard.rows, index.row_length, index.width
                    ),
                });
            }
        }
        Ok(index)
    }

    /// The shards of `split`.
    pub fn shards(&self, split: Split) -> impl Iterator<Item = &ShardEntry> {
        self.shards.iter().filter(move |s| s.split == split)
    }

    /// Rows of `split`.
    pub fn rows(&self, split: Split) -> usize {
        self.shards(split).map(|s| s.rows).sum()
    }
}

/// Reads the shard `entry` of the directory `dir`: its ids, row-major, after checking its
/// size, checksum, ids below the vocabulary, and BOS/EOS framing of every row.
pub fn read_shard(dir: &Path, index: &ShardIndex, entry: &ShardEntry) -> Result<Vec<u32>> {
    let path: PathBuf = dir.join(&entry.file);
    let bytes = std::fs::read(&path).map_err(Error::io(&path))?;
    let bad = |reason: String| Error::Shard {
        path: path.clone(),
        reason,
    };
    let expected = entry.rows * index.row_length * index.width.bytes();
    if bytes.len() != expected {
        return Err(bad(format!(
            "{} bytes, expected {expected}: truncated or damaged",
            bytes.len()
        )));
    }
    let sum = checksum(&bytes);
    if sum != entry.checksum {
        return Err(bad(format!(
            "checksum {sum} does not match the index's {}: damaged",
            entry.checksum
        )));
    }
    let ids = index.width.get(&bytes);
    if let Some(pos) = ids.iter().position(|&id| id as usize >= index.vocab_size) {
        return Err(bad(format!(
            "id {} at position {pos} is outside the vocabulary of {}",
            ids[pos], index.vocab_size
        )));
    }
    for (r, row) in ids.chunks(index.row_length).enumerate() {
        if row[0] != index.bos || row[row.len() - 1] != index.eos {
            return Err(bad(format!(
                "row {r} does not start with BOS and end with EOS"
            )));
        }
    }
    Ok(ids)
}

/// The checksum of `bytes` ([`bd3lm_bytes::checksum`]), as 16 hex digits.
pub fn checksum(bytes: &[u8]) -> String {
    format!("{:016x}", bd3lm_bytes::checksum(bytes))
}
