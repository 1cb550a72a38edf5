//! Small corpora, tokenizers and shards for the tests of this crate and of the crates built
//! on it (feature `test-util`).

use std::path::{Path, PathBuf};

use bd3lm_text::Text;

use crate::data::{self, PrepareOptions, ShardIndex};

/// The word-level test tokenizer: "w0" .. "w9" are ids 0-9 and `<|endoftext|>` is 10, so
/// the model vocabulary is 12 with `[MASK]` = 11.
pub fn word_tokenizer(dir: &Path) -> PathBuf {
    let path = dir.join("tokenizer.json");
    let words = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/words-tokenizer.json"
    );
    std::fs::copy(words, &path).unwrap();
    path
}

/// Writes `docs` as `doc-NN.txt` files under `dir/text` and prepares them into
/// `dir/shards` with rows of `row_length` ids, holding out every `val_every`-th document.
pub fn shards(
    dir: &Path,
    docs: &[String],
    row_length: usize,
    val_every: usize,
) -> (PathBuf, ShardIndex) {
    let text_dir = dir.join("text");
    std::fs::create_dir_all(&text_dir).unwrap();
    for (i, doc) in docs.iter().enumerate() {
        std::fs::write(text_dir.join(format!("doc-{i:02}.txt")), doc).unwrap();
    }
    let files = bd3lm_text::text_files(&[text_dir], "txt").unwrap();
    let tokenizer = word_tokenizer(dir);
    let text = Text::load(Some(&tokenizer), 12).unwrap();
    let out = dir.join("shards");
    let opts = PrepareOptions {
        row_length,
        val_every,
        shard_rows: 4,
        chunk_bytes: 64,
        vocab_size: 12,
        mask_id: 11,
    };
    let index = data::prepare(&files, &text, &out, &opts, |_, _| {}).unwrap();
    std::fs::copy(&tokenizer, out.join("tokenizer.json")).unwrap();
    (out, index)
}

/// `count` documents of a learnable pattern: counting up from a varying start, mod 10.
pub fn counting_docs(count: usize, words: usize) -> Vec<String> {
    (0..count)
        .map(|d| {
            (0..words)
                .map(|i| format!("w{}", (d + i) % 10))
                .collect::<Vec<_>>()
                .join(" ")
                + "\n"
        })
        .collect()
}

/// A small network over the word tokenizer's vocabulary (12 ids with `[MASK]`): d 32,
/// 2 heads, 2 layers, cond 16, on rows of `model_length` ids.
pub fn word_config(model_length: usize, block_size: usize) -> bd3lm_model::Config {
    bd3lm_model::Config::new(bd3lm_model::Shape {
        vocab_size: 12,
        model_length,
        block_size,
        backbone: bd3lm_model::Backbone {
            hidden_dim: 32,
            n_heads: 2,
            n_blocks: 2,
            cond_dim: 16,
        },
    })
}
