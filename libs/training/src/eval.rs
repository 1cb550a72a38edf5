//! Quality of a model's own samples: generative perplexity under a judge model, and the
//! unigram entropy that exposes repetitive text a low perplexity would hide.

use bd3lm_diffusion::{SamplingParams, Session, StopRules, generate};
use bd3lm_model::Bd3lm;
use bd3lm_text::Text;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::judge::Judge;

/// Figures of a set of samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleReport {
    /// Samples drawn.
    pub samples: usize,
    /// Tokens per sample (model tokens).
    pub tokens_per_sample: usize,
    /// `exp` of the judge's mean NLL per judge token, over all samples.
    pub gen_ppl: f64,
    /// Judge tokens scored.
    pub judged_tokens: usize,
    /// Mean over samples of the entropy (nats) of each sample's token frequencies.
    pub unigram_entropy: f64,
    /// What drawing the samples took (absent for texts that were not drawn).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub cost: Option<SamplingCost>,
    /// The samples' text.
    pub texts: Vec<String>,
}

/// What drawing samples took: the speed side of the quality/speed trade-off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingCost {
    /// Denoising forward passes per generated token (commit passes excluded, as in the
    /// paper's NFE).
    pub forward_passes_per_token: f64,
    /// Generated tokens per second of sampling (commit passes included; one sample at a
    /// time).
    pub tokens_per_s: f64,
}

/// Draws `samples` samples of `length` tokens from BOS (seeds `seed`, `seed + 1`, ...),
/// and judges them. EOS tokens inside a sample (document breaks) are dropped from the
/// judged text.
pub fn sample_quality(
    model: &Bd3lm,
    text: &Text,
    judge: &mut Judge,
    params: &SamplingParams,
    samples: usize,
    length: usize,
    seed: u64,
) -> Result<SampleReport> {
    let mut drawn = Vec::with_capacity(samples);
    let (started, mut passes) = (std::time::Instant::now(), 0);
    for i in 0..samples {
        let mut session = Session::start(model, &[text.bos])?;
        let mut rules = StopRules::max_tokens(length);
        let out = generate(
            &mut session,
            params,
            seed + i as u64,
            &mut rules,
            None,
            |_, _| {},
        )?;
        passes += out.forward_passes;
        drawn.push(out.tokens);
    }
    let seconds = started.elapsed().as_secs_f64();
    let tokens = drawn.iter().map(Vec::len).sum::<usize>().max(1) as f64;
    let mut report = judge_token_texts(text, judge, &drawn)?;
    report.cost = Some(SamplingCost {
        forward_passes_per_token: passes as f64 / tokens,
        tokens_per_s: tokens / seconds,
    });
    Ok(report)
}

/// Judges texts given as model token ids (EOS dropped): the figures of
/// [`sample_quality`] for any texts, e.g. held-out rows for scale.
pub fn judge_token_texts(
    text: &Text,
    judge: &mut Judge,
    samples: &[Vec<u32>],
) -> Result<SampleReport> {
    let (mut nll, mut judged, mut entropy) = (0.0, 0usize, 0.0);
    let mut texts = Vec::with_capacity(samples.len());
    for tokens in samples {
        entropy += unigram_entropy(tokens);
        let ids: Vec<u32> = tokens.iter().copied().filter(|&t| t != text.eos).collect();
        let sample = text.decode(&ids);
        let (sum, count) = judge.nll(&sample)?;
        nll += sum;
        judged += count;
        texts.push(sample);
    }
    Ok(SampleReport {
        samples: samples.len(),
        tokens_per_sample: samples.first().map_or(0, Vec::len),
        gen_ppl: (nll / judged.max(1) as f64).exp(),
        judged_tokens: judged,
        unigram_entropy: entropy / samples.len().max(1) as f64,
        cost: None,
        texts,
    })
}

/// Entropy (nats) of the frequency distribution of `tokens`.
pub fn unigram_entropy(tokens: &[u32]) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for &t in tokens {
        *counts.entry(t).or_insert(0usize) += 1;
    }
    let n = tokens.len() as f64;
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_uniform_and_constant_sequences() {
        assert_eq!(unigram_entropy(&[7; 16]), 0.0);
        let uniform: Vec<u32> = (0..8).collect();
        assert!((unigram_entropy(&uniform) - 8f64.ln()).abs() < 1e-12);
    }
}
