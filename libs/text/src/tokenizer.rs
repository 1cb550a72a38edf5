//! A tokenizer with the special ids generation needs.

use std::path::Path;

use tokenizers::Tokenizer;

/// Names tried, in order, for the beginning-of-sequence token.
const BOS_NAMES: [&str; 4] = ["<|endoftext|>", "<s>", "<bos>", "[CLS]"];
/// Names tried, in order, for the end-of-sequence token.
const EOS_NAMES: [&str; 4] = ["<|endoftext|>", "</s>", "<eos>", "[SEP]"];
/// Names of a tokenizer's own mask token.
const MASK_NAMES: [&str; 3] = ["[MASK]", "<mask>", "<|mask|>"];

/// Errors of tokenization.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tokenizer file could not be loaded.
    #[error("{path}: not a usable tokenizer.json: {reason}")]
    Load {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Text was given but there is no tokenizer.
    #[error("text needs a tokenizer; give token ids instead")]
    NoTokenizer,
    /// The tokenizer failed on an input.
    #[error("tokenizing: {0}")]
    Encode(String),
    /// A corpus file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A corpus or tokenizer-training input is unusable.
    #[error("{0}")]
    Corpus(String),
}

/// A tokenizer (optional: models can be driven by ids alone) and its BOS and EOS ids.
#[derive(Clone, Debug)]
pub struct Text {
    tokenizer: Option<Tokenizer>,
    /// Beginning-of-sequence id, put before text prompts.
    pub bos: u32,
    /// End-of-sequence id, for variable-length generation.
    pub eos: u32,
}

impl Text {
    /// Loads `path` when given. Special ids come from the tokenizer's vocabulary, else
    /// follow the GPT-2 convention of the published models: BOS = EOS = `vocab_size - 2`.
    pub fn load(path: Option<&Path>, vocab_size: usize) -> Result<Self, Error> {
        let fallback = vocab_size.saturating_sub(2) as u32;
        let Some(path) = path else {
            return Ok(Self {
                tokenizer: None,
                bos: fallback,
                eos: fallback,
            });
        };
        let tokenizer = Tokenizer::from_file(path).map_err(|e| Error::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let find = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| tokenizer.token_to_id(n))
                .unwrap_or(fallback)
        };
        let (bos, eos) = (find(&BOS_NAMES), find(&EOS_NAMES));
        Ok(Self {
            tokenizer: Some(tokenizer),
            bos,
            eos,
        })
    }

    /// The model vocabulary this tokenizer calls for, as `(vocab_size, mask_id)`: the
    /// tokenizer's own mask token when it has one, else one id appended after its
    /// vocabulary (GPT-2: 50257 ids, `[MASK]` = 50257, vocab_size 50258).
    pub fn model_vocab(&self) -> Option<(usize, u32)> {
        let tokenizer = self.tokenizer.as_ref()?;
        let size = tokenizer.get_vocab_size(true);
        Some(
            match MASK_NAMES.iter().find_map(|n| tokenizer.token_to_id(n)) {
                Some(id) => (size, id),
                None => (size + 1, size as u32),
            },
        )
    }

    /// Whether text can be encoded.
    pub fn has_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        let tokenizer = self.tokenizer.as_ref().ok_or(Error::NoTokenizer)?;
        let enc = tokenizer
            .encode(text, false)
            .map_err(|e| Error::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// A text prompt as ids: BOS, then the text's tokens.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, Error> {
        Ok(std::iter::once(self.bos)
            .chain(self.encode(text)?)
            .collect())
    }

    /// The text of `ids`; without a tokenizer, the ids separated by spaces.
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.tokenizer {
            Some(t) => t.decode(ids, false).unwrap_or_default(),
            None => ids.iter().map(|i| format!("{i} ")).collect(),
        }
    }

    /// A stop rule for text stop sequences: the number of generated tokens to keep (the
    /// longest prefix whose text contains none of `stops`) once one appears.
    pub fn stop_hook(&self, stops: Vec<String>) -> Option<crate::StopHook> {
        if stops.is_empty() {
            return None;
        }
        let text = self.clone();
        // A stop string ends in the new tokens and spans at most this many before them
        // (a token decodes to at least one byte, save for rare special ones: the margin).
        let lookback = 2 * stops.iter().map(String::len).max().unwrap_or(0) + 8;
        let mut scanned = 0;
        Some(Box::new(move |generated: &[u32]| {
            if generated.len() < scanned {
                scanned = 0;
            }
            let start = scanned.saturating_sub(lookback);
            scanned = generated.len();
            let contains = |ids: &[u32]| {
                let s = text.decode(ids);
                stops.iter().any(|stop| s.contains(stop.as_str()))
            };
            if !contains(&generated[start..]) {
                return None;
            }
            // Kept: everything before the token that completes the first stop string.
            let end = (start + 1..=generated.len())
                .find(|&k| contains(&generated[start..k]))
                .unwrap_or(generated.len());
            Some(end - 1)
        }))
    }
}

/// Turns a stream of token ids into a stream of text pieces: a character may span the
/// tokens of two blocks, so a piece is held back while its text ends in an incomplete
/// character. Each push decodes only the tokens since the last complete piece (and the
/// piece before them, for tokenizers whose decoding depends on the previous token), so
/// its cost does not grow with the generation.
pub struct Decoder<'a> {
    text: &'a Text,
    ids: Vec<u32>,
    /// Start of the tokens decoded for context.
    prefix: usize,
    /// End of the tokens whose text was returned.
    read: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder with nothing decoded yet.
    pub fn new(text: &'a Text) -> Self {
        Self {
            text,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds `ids` and returns the new text.
    pub fn push(&mut self, ids: &[u32]) -> String {
        self.ids.extend_from_slice(ids);
        let before = self.text.decode(&self.ids[self.prefix..self.read]);
        let now = self.text.decode(&self.ids[self.prefix..]);
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return String::new();
        }
        let piece = match now.strip_prefix(before.as_str()) {
            Some(suffix) => suffix.to_string(),
            None => self.text.decode(&self.ids[self.read..]),
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        piece
    }

    /// The text held back at the end (an incomplete character), once no token follows.
    pub fn finish(&mut self) -> String {
        let rest = self.text.decode(&self.ids[self.read..]);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-level test tokenizer: "w0" .. "w9", plus "<|endoftext|>" = 10.
    fn words(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("tokenizer.json");
        std::fs::copy(WORDS, &path).unwrap();
        path
    }

    /// The bundled demo model's byte-level BPE tokenizer.
    fn demo() -> Text {
        const DEMO: &str = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../services/bd3lm/demo-model/tokenizer.json"
        );
        Text::load(Some(Path::new(DEMO)), 8192).unwrap()
    }

    const WORDS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/words-tokenizer.json"
    );

    #[test]
    fn special_ids_come_from_the_tokenizer_or_the_gpt2_convention() {
        let dir = tempfile::tempdir().unwrap();
        let text = Text::load(Some(&words(dir.path())), 12).unwrap();
        assert_eq!((text.bos, text.eos), (10, 10));
        assert_eq!(text.encode_prompt("w3 w4").unwrap(), [10, 3, 4]);
        let bare = Text::load(None, 1024).unwrap();
        assert_eq!((bare.bos, bare.eos), (1022, 1022));
        assert!(matches!(bare.encode("x"), Err(Error::NoTokenizer)));
        assert_eq!(bare.decode(&[1, 2]), "1 2 ");
        std::fs::write(dir.path().join("bad.json"), "{").unwrap();
        assert!(
            Text::load(Some(&dir.path().join("bad.json")), 12)
                .unwrap_err()
                .to_string()
                .contains("bad.json")
        );
    }

    /// Streamed in blocks of any size, a byte-level BPE output's pieces add up to its
    /// whole text, characters split across blocks included; text stops checked block by
    /// block stop where a check of the whole output does.
    #[test]
    fn streamed_pieces_and_stops_match_the_whole_text() {
        let text = demo();
        let sample = "Héllo wörld — 日本語 and 🎉, again: naïve café. ".repeat(8);
        let ids = text.encode(&sample).unwrap();
        for block in 1..6 {
            let mut decoder = Decoder::new(&text);
            let mut streamed: String = ids.chunks(block).map(|b| decoder.push(b)).collect();
            streamed.push_str(&decoder.finish());
            assert_eq!(streamed, text.decode(&ids), "blocks of {block}");
            let whole = text.stop_hook(vec!["café. Héllo".into()]).unwrap()(&ids);
            let mut hook = text.stop_hook(vec!["café. Héllo".into()]).unwrap();
            let streamed = (block..ids.len() + block)
                .step_by(block)
                .find_map(|end| hook(&ids[..end.min(ids.len())]));
            assert_eq!(streamed, whole, "blocks of {block}");
            assert!(whole.is_some());
        }
    }

    /// Over a 16,384-token generation in blocks of 4, the stop rules (EOS, a token stop
    /// sequence, a text stop string) and the streaming decoder cost as much per block at
    /// the end as at the start: it prints both (a figure, not a timed assertion).
    #[test]
    fn per_block_stop_checks_stay_flat_over_16384_tokens() {
        let text = demo();
        // Varied ids (the low-entropy rule would stop a repeated text).
        let ids: Vec<u32> = (0..16_384u32)
            .map(|i| 256 + i.wrapping_mul(2_654_435_761) % 7000)
            .collect();
        let mut rules = crate::StopRules::new(
            1 << 20,
            Some(8192),
            vec![vec![8191, 8191]],
            text.stop_hook(vec!["never said".into()]),
        );
        let mut decoder = Decoder::new(&text);
        let mut per_block = Vec::new();
        for end in (4..=ids.len()).step_by(4) {
            let started = std::time::Instant::now();
            let (kept, stop) = rules.check(&ids[..end], &ids[..end]);
            decoder.push(&ids[end - 4..end]);
            per_block.push(started.elapsed().as_secs_f64() * 1e6);
            assert_eq!((kept, stop), (end, None));
        }
        // Medians: a busy machine's pauses would swamp a mean.
        let median = |xs: &[f64]| {
            let mut xs = xs.to_vec();
            xs.sort_by(f64::total_cmp);
            xs[xs.len() / 2]
        };
        let (first, last) = (&per_block[..512], &per_block[per_block.len() - 512..]);
        eprintln!(
            "stop check + decode per block of 4 (median): first 512 blocks {:.1} us, last 512 blocks {:.1} us ({} tokens)",
            median(first),
            median(last),
            ids.len()
        );
    }

    #[test]
    fn text_stops_keep_the_longest_clean_prefix_and_decoding_streams() {
        let dir = tempfile::tempdir().unwrap();
        let text = Text::load(Some(&words(dir.path())), 12).unwrap();
        let mut hook = text.stop_hook(vec!["w5".into()]).unwrap();
        assert_eq!(hook(&[1, 2, 3]), None);
        assert_eq!(hook(&[1, 2, 5, 6]), Some(2));
        let mut decoder = Decoder::new(&text);
        let pieces: String = [&[1u32, 2][..], &[3]]
            .iter()
            .map(|ids| decoder.push(ids))
            .collect();
        assert_eq!(
            pieces.split_whitespace().collect::<Vec<_>>(),
            ["w1", "w2", "w3"]
        );
    }
}
