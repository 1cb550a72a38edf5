//! Data preparation: text files in, wrapped token rows out, as shards.
//!
//! Documents (one per file) are tokenized and joined with EOS, and the stream of each split
//! is cut into rows `[BOS] + (n - 2) tokens + [EOS]`: the "wrapped" data of the paper.
//! File `i` of the sorted file list goes to validation when `i % val_every == val_every - 1`
//! (every `val_every`-th document, so the held-out part spans the whole corpus).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use bd3lm_text::Text;

use crate::{Error, Result};
use bd3lm_config::shards::{
    FORMAT, INDEX_FILE, ShardEntry, ShardIndex, Split, SplitStats, TokenWidth, checksum,
};

/// Options of [`prepare`].
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Ids per row, the model length `n`.
    pub row_length: usize,
    /// Every `val_every`-th document is held out; 0 holds out nothing.
    pub val_every: usize,
    /// Rows per shard file.
    pub shard_rows: usize,
    /// Text is tokenized in pieces of about this many bytes, cut at line ends, so memory
    /// stays bounded whatever the size of a file.
    pub chunk_bytes: usize,
    /// Ids of the model vocabulary (`[MASK]` included).
    pub vocab_size: usize,
    /// The `[MASK]` id, which text must never produce.
    pub mask_id: u32,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            row_length: 1024,
            val_every: 20,
            shard_rows: 16384,
            chunk_bytes: 1 << 20,
            vocab_size: 50258,
            mask_id: 50257,
        }
    }
}

/// Tokenizes `files` with `text` into shards in `out` (created; existing shard files
/// replaced) and writes `index.json` last. `progress` is called with the bytes read so far
/// and the total.
pub fn prepare(
    files: &[PathBuf],
    text: &Text,
    out: &Path,
    opts: &PrepareOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<ShardIndex> {
    let mut writer = ShardWriter::new(out, opts, text.bos, text.eos)?;
    let mut total = 0;
    for f in files {
        total += std::fs::metadata(f).map_err(Error::io(f))?.len();
    }
    let mut done = 0;
    for (i, file) in files.iter().enumerate() {
        let split = if opts.val_every > 0 && i % opts.val_every == opts.val_every - 1 {
            Split::Validation
        } else {
            Split::Train
        };
        for_each_chunk(file, opts.chunk_bytes, |chunk| {
            done += chunk.len() as u64;
            writer.push(split, &text.encode(chunk)?)?;
            progress(done, total);
            Ok(())
        })?;
        writer.end_document(split)?;
    }
    writer.finish(format!(
        "file i of {} (inputs in order, directories walked in sorted order) is held out when i % {} == {}",
        files.len(),
        opts.val_every,
        opts.val_every.saturating_sub(1)
    ))
}

/// Writes documents given as ids into shards: the part of [`prepare`] after tokenization,
/// for callers that have ids already.
pub struct ShardWriter<'a> {
    out: &'a Path,
    opts: PrepareOptions,
    bos: u32,
    eos: u32,
    train: RowWriter<'a>,
    validation: RowWriter<'a>,
}

impl<'a> ShardWriter<'a> {
    /// A writer into `out` (created) with rows framed by `bos` and `eos`.
    pub fn new(out: &'a Path, opts: &PrepareOptions, bos: u32, eos: u32) -> Result<Self> {
        if opts.row_length < 3 {
            return Err(Error::Param {
                name: "row_length",
                reason: format!("must be at least 3, found {}", opts.row_length),
            });
        }
        if opts.shard_rows == 0 {
            return Err(Error::Param {
                name: "shard_rows",
                reason: "must be positive".into(),
            });
        }
        std::fs::create_dir_all(out).map_err(Error::io(out))?;
        Ok(Self {
            out,
            opts: opts.clone(),
            bos,
            eos,
            train: RowWriter::new(out, Split::Train, bos, eos, opts),
            validation: RowWriter::new(out, Split::Validation, bos, eos, opts),
        })
    }

    fn split(&mut self, split: Split) -> &mut RowWriter<'a> {
        match split {
            Split::Train => &mut self.train,
            Split::Validation => &mut self.validation,
        }
    }

    /// Appends ids of the current document of `split`.
    pub fn push(&mut self, split: Split, ids: &[u32]) -> Result<()> {
        self.split(split).push(ids)
    }

    /// Ends the current document of `split` with EOS.
    pub fn end_document(&mut self, split: Split) -> Result<()> {
        let eos = self.eos;
        let writer = self.split(split);
        writer.stats.documents += 1;
        writer.push(&[eos])
    }

    /// Writes the last shards and then `index.json`, recording `split_rule`.
    pub fn finish(mut self, split_rule: String) -> Result<ShardIndex> {
        let mut shards = self.train.finish()?;
        shards.extend(self.validation.finish()?);
        let index = ShardIndex {
            format: FORMAT.to_string(),
            row_length: self.opts.row_length,
            width: TokenWidth::for_vocab(self.opts.vocab_size),
            vocab_size: self.opts.vocab_size,
            mask_id: self.opts.mask_id,
            bos: self.bos,
            eos: self.eos,
            split_rule,
            train: std::mem::take(&mut self.train.stats),
            validation: std::mem::take(&mut self.validation.stats),
            shards,
        };
        let json = serde_json::to_string_pretty(&index).expect("the index serializes");
        write_atomic(&self.out.join(INDEX_FILE), json.as_bytes())?;
        Ok(index)
    }
}

/// Calls `f` with consecutive pieces of the UTF-8 text of `file`, each about `size` bytes
/// and ending at a line end.
fn for_each_chunk(file: &Path, size: usize, mut f: impl FnMut(&str) -> Result<()>) -> Result<()> {
    let handle = std::fs::File::open(file).map_err(Error::io(file))?;
    let mut reader = BufReader::new(handle);
    let mut chunk = String::new();
    loop {
        let read = reader.read_line(&mut chunk).map_err(|e| Error::Io {
            path: file.to_path_buf(),
            source: e,
        })?;
        if read == 0 || chunk.len() >= size {
            if !chunk.is_empty() {
                f(&chunk)?;
                chunk.clear();
            }
            if read == 0 {
                return Ok(());
            }
        }
    }
}

/// Cuts one split's token stream into rows and rows into shard files.
struct RowWriter<'a> {
    dir: &'a Path,
    split: Split,
    bos: u32,
    eos: u32,
    width: TokenWidth,
    body: usize,
    shard_rows: usize,
    vocab_size: usize,
    mask_id: u32,
    pending: Vec<u32>,
    shard: Vec<u8>,
    rows_in_shard: usize,
    shards: Vec<ShardEntry>,
    stats: SplitStats,
}

impl<'a> RowWriter<'a> {
    fn new(dir: &'a Path, split: Split, bos: u32, eos: u32, opts: &PrepareOptions) -> Self {
        Self {
            dir,
            split,
            bos,
            eos,
            width: TokenWidth::for_vocab(opts.vocab_size),
            body: opts.row_length - 2,
            shard_rows: opts.shard_rows,
            vocab_size: opts.vocab_size,
            mask_id: opts.mask_id,
            pending: Vec::new(),
            shard: Vec::new(),
            rows_in_shard: 0,
            shards: Vec::new(),
            stats: SplitStats::default(),
        }
    }

    fn push(&mut self, ids: &[u32]) -> Result<()> {
        let bad = |&&id: &&u32| id as usize >= self.vocab_size || id == self.mask_id;
        if let Some(&id) = ids.iter().find(bad) {
            return Err(Error::Param {
                name: "vocab_size",
                reason: format!(
                    "the tokenizer produced id {id}: outside the vocabulary of {} or [MASK]",
                    self.vocab_size
                ),
            });
        }
        self.stats.tokens += ids.len();
        self.pending.extend_from_slice(ids);
        let full = self.pending.len() / self.body * self.body;
        let rows: Vec<u32> = self.pending.drain(..full).collect();
        for body in rows.chunks(self.body) {
            self.width.put(self.bos, &mut self.shard);
            for &id in body {
                self.width.put(id, &mut self.shard);
            }
            self.width.put(self.eos, &mut self.shard);
            self.rows_in_shard += 1;
            self.stats.rows += 1;
            if self.rows_in_shard == self.shard_rows {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.rows_in_shard == 0 {
            return Ok(());
        }
        let file = format!("{}-{:05}.bin", self.split.name(), self.shards.len());
        write_atomic(&self.dir.join(&file), &self.shard)?;
        self.shards.push(ShardEntry {
            file,
            split: self.split,
            rows: self.rows_in_shard,
            checksum: checksum(&self.shard),
        });
        self.shard.clear();
        self.rows_in_shard = 0;
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<ShardEntry>> {
        self.flush()?;
        self.stats.dropped_tokens = self.pending.len();
        Ok(std::mem::take(&mut self.shards))
    }
}

/// Writes `bytes` to a temporary name beside `path`, then renames it into place.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string());
    let tmp = path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()));
    let mut file = std::fs::File::create(&tmp).map_err(Error::io(&tmp))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(Error::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io(path))
}
