//! `bd3lm bench model`: time the network's cached passes the way a sampler drives them.
//!
//! Generation starts from a single BOS in the first block (or after a prefilled context)
//! and unmasks one token per denoise pass, greedily, so each block costs one pass per
//! masked token plus one commit pass: the reference's first-hitting sampler with its KV
//! cache. As in the library's first-hitting sampler, the position is chosen first and a
//! denoise pass computes logits for that position only. Each figure is the median of
//! three generations (the machine's timing is noisy).

use std::time::{Duration, Instant};

use anyhow::Context;
use bd3lm_model::{Bd3lm, Config, checkpoint};
use candle_core::{D, DType, Device, Tensor};
use serde::Serialize;

/// Timings of one generation.
#[derive(Debug, Serialize)]
pub struct PassStats {
    /// Block size of the model.
    pub block_size: usize,
    /// Tokens in the cache before the timed generation started.
    pub context: usize,
    /// Tokens generated (the BOS counts when starting from empty).
    pub tokens: usize,
    /// Denoise passes run.
    pub denoise_passes: usize,
    /// Commit passes run.
    pub commit_passes: usize,
    /// Average milliseconds per denoise pass.
    pub denoise_ms: f64,
    /// Average milliseconds per commit pass.
    pub commit_ms: f64,
    /// Average milliseconds over all passes.
    pub pass_ms: f64,
    /// Generated tokens per second of wall time.
    pub tokens_per_s: f64,
}

/// Builds the random-weight model of `cfg`: weights N(0, 0.02²), f32 on the CPU.
pub fn random_model(cfg: &Config, seed: u64) -> anyhow::Result<Bd3lm> {
    Ok(checkpoint::random_model(
        cfg,
        0.02,
        seed,
        DType::F32,
        &Device::Cpu,
    )?)
}

/// Generates `tokens` tokens after `context` prefilled ones and times every pass.
pub fn generate(model: &Bd3lm, tokens: usize, context: usize) -> anyhow::Result<PassStats> {
    let cfg = model.config();
    let bs = cfg.block_size;
    anyhow::ensure!(
        tokens.is_multiple_of(bs) && context.is_multiple_of(bs),
        "tokens and context must be multiples of the block size {bs}"
    );
    let zeros = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    let mut cache = model.new_cache(1)?;
    if context > 0 {
        let ids: Vec<u32> = (0..context)
            .map(|i| (i * 7919 % (cfg.vocab_size - 1)) as u32)
            .collect();
        model.commit(
            &Tensor::from_vec(ids, (1, context), &Device::Cpu)?,
            &zeros,
            &mut cache,
        )?;
    }
    let bos = (cfg.vocab_size - 2) as u32;
    let (mut denoise, mut commit) = (Vec::new(), Vec::new());
    let wall = Instant::now();
    for b in 0..tokens / bs {
        let mut block = vec![cfg.mask_id(); bs];
        if b == 0 && context == 0 {
            block[0] = bos;
        }
        while let Some(pos) = (0..bs as u32).find(|&i| block[i as usize] == cfg.mask_id()) {
            let input = Tensor::from_vec(block.clone(), (1, bs), &Device::Cpu)?;
            let t = Instant::now();
            let logits = model.denoise_rows(&input, &zeros, &mut cache, &[pos])?;
            // Exclude [MASK], as SUBS does, and take the most likely token.
            let best = logits
                .narrow(D::Minus1, 0, cfg.vocab_size - 1)?
                .argmax(D::Minus1)?;
            block[pos as usize] = best.flatten_all()?.to_vec1::<u32>()?[0];
            denoise.push(t.elapsed());
        }
        let input = Tensor::from_vec(block, (1, bs), &Device::Cpu)?;
        let t = Instant::now();
        model.commit(&input, &zeros, &mut cache)?;
        commit.push(t.elapsed());
    }
    let wall = wall.elapsed().as_secs_f64();
    let ms = |d: &[Duration]| {
        d.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / d.len().max(1) as f64
    };
    let all: Vec<Duration> = denoise.iter().chain(&commit).copied().collect();
    Ok(PassStats {
        block_size: bs,
        context,
        tokens,
        denoise_passes: denoise.len(),
        commit_passes: commit.len(),
        denoise_ms: ms(&denoise),
        commit_ms: ms(&commit),
        pass_ms: ms(&all),
        tokens_per_s: tokens as f64 / wall,
    })
}

/// Runs the model benchmark for each block size: from BOS, and after a `context`-token
/// prefill. Prints one JSON line per run.
pub fn run(block_sizes: &[usize], tokens: usize, context: usize, seed: u64) -> anyhow::Result<()> {
    for &bs in block_sizes {
        let cfg = Config::tiny(bs);
        cfg.validate().with_context(|| format!("block size {bs}"))?;
        let model = random_model(&cfg, seed)?;
        // One untimed warm-up generation pages the weights in and sizes the buffers.
        generate(&model, 4 * bs, 0)?;
        for prefill in [0, context] {
            let prefill = prefill.min(cfg.model_length) / bs * bs;
            let mut runs = (0..3)
                .map(|_| generate(&model, tokens, prefill))
                .collect::<anyhow::Result<Vec<_>>>()?;
            runs.sort_by(|a, b| a.pass_ms.total_cmp(&b.pass_ms));
            println!("{}", serde_json::to_string(&runs[1])?);
        }
    }
    Ok(())
}

/// One local generation's throughput.
#[derive(Debug, Serialize)]
pub struct GenerationStats {
    /// Block size of the model.
    pub block_size: usize,
    /// Sampler name.
    pub sampler: &'static str,
    /// Tokens generated.
    pub tokens: usize,
    /// Generated tokens per second, wall time of the whole generation.
    pub tokens_per_s: f64,
    /// Denoising forward passes (commits excluded).
    pub forward_passes: usize,
    /// Denoising forward passes per generated token.
    pub passes_per_token: f64,
    /// Commit passes.
    pub commits: usize,
}

/// Local generation from a single BOS with the library's sampler, first-hitting (one
/// token per step, T = block size, nucleus 0.9) and confidence-threshold mode. One JSON
/// line per run.
pub fn run_generate(
    block_sizes: &[usize],
    tokens: usize,
    threshold: f64,
    seed: u64,
) -> anyhow::Result<()> {
    use bd3lm_diffusion::{Sampler, SamplingParams, Session, StopRules, generate};
    for &bs in block_sizes {
        let cfg = Config::tiny(bs);
        cfg.validate().with_context(|| format!("block size {bs}"))?;
        let model = random_model(&cfg, seed)?;
        let bos = (cfg.vocab_size - 2) as u32;
        for sampler in [Sampler::FirstHitting, Sampler::Confidence { threshold }] {
            let params = SamplingParams {
                sampler,
                ..SamplingParams::new(bs)
            };
            let run = |max: usize| -> anyhow::Result<(bd3lm_diffusion::Generation, f64)> {
                let started = Instant::now();
                let mut session = Session::start(&model, &[bos])?;
                let out = generate(
                    &mut session,
                    &params,
                    seed,
                    &mut StopRules::max_tokens(max),
                    None,
                    |_, _| {},
                )?;
                Ok((out, started.elapsed().as_secs_f64()))
            };
            run(4 * bs)?;
            let (out, secs) = run(tokens)?;
            let stats = GenerationStats {
                block_size: bs,
                sampler: sampler.name(),
                tokens: out.tokens.len(),
                tokens_per_s: out.tokens.len() as f64 / secs,
                forward_passes: out.forward_passes,
                passes_per_token: out.forward_passes as f64 / out.tokens.len() as f64,
                commits: out.blocks.len(),
            };
            println!("{}", serde_json::to_string(&stats)?);
        }
    }
    Ok(())
}
