//! Byte-level BPE tokenizers: training one on a corpus, and building GPT-2's from its
//! published `encoder.json` and `vocab.bpe`.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::{AddedToken, Tokenizer};

use crate::Error;

/// The document separator, BOS and EOS of the GPT-2 convention every tokenizer built
/// here follows.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// A byte-level BPE with `vocab_size` ids (the 256 byte symbols, [`END_OF_TEXT`] and the
/// learned merges; pairs seen fewer than `min_frequency` times are not merged) trained on
/// `files`. The model's `[MASK]` id is appended after it (see [`crate::Text::model_vocab`]).
pub fn train(files: &[PathBuf], vocab_size: usize, min_frequency: u64) -> Result<Tokenizer, Error> {
    if vocab_size < 258 {
        return Err(Error::Corpus(format!(
            "vocab_size {vocab_size} is too small: 256 bytes and {END_OF_TEXT} need 257 ids"
        )));
    }
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .initial_alphabet(
            tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
                .into_iter()
                .collect(),
        )
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .build()
        .into();
    let mut tokenizer = byte_level(BPE::default());
    let names = files.iter().map(|p| p.display().to_string()).collect();
    tokenizer
        .train_from_files(&mut trainer, names)
        .map_err(|e| Error::Corpus(format!("training the tokenizer: {e}")))?;
    Ok(tokenizer)
}

/// GPT-2's tokenizer from OpenAI's `encoder.json` (token → id) and `vocab.bpe` (merges):
/// 50257 ids, [`END_OF_TEXT`] = 50256.
pub fn gpt2(encoder: &Path, merges: &Path) -> Result<Tokenizer, Error> {
    let model = BPE::from_file(
        &encoder.display().to_string(),
        &merges.display().to_string(),
    )
    .build()
    .map_err(|e| Error::Load {
        path: format!("{} + {}", encoder.display(), merges.display()),
        reason: e.to_string(),
    })?;
    let mut tokenizer = byte_level(model);
    tokenizer
        .add_special_tokens([AddedToken::from(END_OF_TEXT, true)])
        .map_err(|e| Error::Corpus(format!("adding {END_OF_TEXT}: {e}")))?;
    Ok(tokenizer)
}

/// Writes `tokenizer` as a `tokenizer.json`.
pub fn save(tokenizer: &Tokenizer, path: &Path) -> Result<(), Error> {
    tokenizer
        .save(path, true)
        .map_err(|e| Error::Corpus(format!("writing {}: {e}", path.display())))
}

/// `model` with GPT-2's byte-level pre-tokenizer (no prefix space) and decoder.
fn byte_level(model: BPE) -> Tokenizer {
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true),
    ));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Text;

    #[test]
    fn a_trained_tokenizer_round_trips_text_and_appends_the_mask() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c.txt");
        let line = "the cat sat on the mat. the dog sat on the log.\n";
        std::fs::write(&corpus, line.repeat(50)).unwrap();
        let tokenizer = train(&[corpus], 300, 2).unwrap();
        let path = dir.path().join("tokenizer.json");
        save(&tokenizer, &path).unwrap();
        let size = tokenizer.get_vocab_size(true);
        assert!(size <= 300 && size > 257, "{size}");
        let text = Text::load(Some(&path), size + 1).unwrap();
        assert_eq!(text.bos, tokenizer.token_to_id(END_OF_TEXT).unwrap());
        assert_eq!(text.model_vocab(), Some((size + 1, size as u32)));
        let ids = text.encode("the cat sat on the log. Ünïcode!").unwrap();
        assert!(ids.len() < 30, "merges were learned: {ids:?}");
        assert_eq!(text.decode(&ids), "the cat sat on the log. Ünïcode!");
        assert!(train(&[dir.path().join("c.txt")], 100, 2).is_err());
    }

    /// The committed GPT-2 tokenizer is OpenAI's: the ids of the published models.
    #[test]
    fn the_committed_gpt2_tokenizer_has_the_published_ids() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tokenizers/gpt2/tokenizer.json");
        let text = Text::load(Some(&path), 50258).unwrap();
        assert_eq!(text.encode("Hello world").unwrap(), [15496, 995]);
        assert_eq!((text.bos, text.eos), (50256, 50256));
        assert_eq!(text.model_vocab(), Some((50258, 50257)));
        let ids = text.encode(" block diffusion<|endoftext|>").unwrap();
        assert_eq!(ids.last(), Some(&50256));
        assert_eq!(text.decode(&ids), " block diffusion<|endoftext|>");
    }
}
