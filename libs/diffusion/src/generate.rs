//! Generation of any length: the prompt placed in the first blocks, blocks denoised left to
//! right over the KV cache (sliding past the context), and the stop rules.
//!
//! Determinism: block `b` draws all its randomness from [`block_rng`]`(seed, b)`, and the
//! cache is always built the same way (the prompt's whole blocks in one commit, every later
//! block on its own), so a session resumed from its tokens continues exactly as it would
//! have.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bd3lm_model::{Bd3lm, BlockInput, KvCache};
use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use bd3lm_text::stop::{
    ENTROPY_FLOOR, ENTROPY_WINDOW, StopHook, StopReason, StopRules, low_entropy,
};

use crate::sampler::{BlockDenoiser, Denoiser, SamplingParams, drive};
use crate::{Error, Result};

/// The random stream of one block's sampling.
pub type BlockRng = ChaCha8Rng;

/// The random stream of block `block` of a request seeded with `seed`: a ChaCha8 stream,
/// identical on every platform.
pub fn block_rng(seed: u64, block: usize) -> BlockRng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(block as u64);
    rng
}

/// Sigma fed to a time-conditioned network at noise level `t`: `-ln(1 - t)`, bounded.
pub fn sigma(t: f64) -> f32 {
    (-(1.0 - t).max(1e-4).ln()) as f32
}

/// The network as the sampler sees it: logits of some rows of the block that follows
/// either a KV cache or (the reference's uncached sampler, for verification) a prefix of
/// tokens run again with the block-causal mask on every pass.
pub struct Net<'a> {
    model: &'a Bd3lm,
    context: Context<'a>,
}

enum Context<'a> {
    Cached(&'a mut KvCache),
    Uncached(&'a [u32]),
}

impl<'a> Net<'a> {
    /// Denoises blocks that follow the contents of `cache`.
    pub fn cached(model: &'a Bd3lm, cache: &'a mut KvCache) -> Self {
        Self {
            model,
            context: Context::Cached(cache),
        }
    }

    /// Denoises the block that follows `prefix` (whole blocks), without a cache.
    pub fn uncached(model: &'a Bd3lm, prefix: &'a [u32]) -> Self {
        Self {
            model,
            context: Context::Uncached(prefix),
        }
    }
}

impl Denoiser for Net<'_> {
    fn block_size(&self) -> usize {
        self.model.config().block_size
    }
    fn mask_id(&self) -> u32 {
        self.model.config().mask_id()
    }
    fn time_conditioned(&self) -> bool {
        self.model.config().time_conditioning
    }
    fn logits(&mut self, block: &[u32], t: f64, rows: &[u32]) -> Result<Vec<Vec<f32>>> {
        let device = self.model.device();
        let s = Tensor::new(&[sigma(t)], device)?;
        let logits = match &mut self.context {
            Context::Cached(cache) => {
                let x = Tensor::from_slice(block, (1, block.len()), device)?;
                self.model.denoise_rows(&x, &s, cache, rows)?.squeeze(0)?
            }
            Context::Uncached(prefix) => {
                let keep = (self.model.config().model_length - block.len()).min(prefix.len());
                let mut window = prefix[prefix.len() - keep..].to_vec();
                window.extend_from_slice(block);
                let x = Tensor::from_slice(&window, (1, window.len()), device)?;
                let all = self
                    .model
                    .forward_block_causal(&x, &s)?
                    .squeeze(0)?
                    .narrow(0, keep, block.len())?;
                all.index_select(&Tensor::new(rows, device)?, 0)?
            }
        };
        Ok(logits.to_dtype(DType::F32)?.to_vec2()?)
    }
}

/// Timings and counts of one committed block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockReport {
    /// Block index in the sequence (block 0 holds the first token).
    pub index: usize,
    /// The whole committed block.
    pub tokens: Vec<u32>,
    /// Forward passes of the denoising (the commit pass excluded).
    pub forward_passes: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Time spent denoising.
    pub denoise: Duration,
    /// Time of the commit pass.
    pub commit: Duration,
}

/// A sequence being generated: its tokens and the KV cache of its committed blocks.
#[derive(Debug)]
pub struct Session<'m> {
    model: &'m Bd3lm,
    cache: KvCache,
    /// Committed tokens, then (before the first block is denoised) the prompt's tail.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache: whole blocks.
    committed: usize,
}

impl<'m> Session<'m> {
    /// Starts a session on `prompt`: its whole blocks are committed now (one pass while
    /// the window allows); a partial last block keeps its prompt tokens fixed and is
    /// completed by the first denoised block.
    pub fn start(model: &'m Bd3lm, prompt: &[u32]) -> Result<Self> {
        let mut session = Self::resume(model, prompt, prompt.len(), 0)?;
        session.prefill()?;
        Ok(session)
    }

    /// Rebuilds a session whose first `committed` tokens (whole blocks) are committed, of
    /// `tokens` (committed blocks, then fixed tokens still to be placed), the first
    /// `prompt_len` of them the first prompt. The cache is computed exactly as an
    /// uninterrupted session computed it: the prompt's whole blocks in one commit, every
    /// later block on its own.
    pub fn resume(
        model: &'m Bd3lm,
        tokens: &[u32],
        prompt_len: usize,
        committed: usize,
    ) -> Result<Self> {
        let mut session = Self::with_cache(model, model.new_cache(1)?, tokens, prompt_len, 0)?;
        let bs = model.config().block_size;
        if !committed.is_multiple_of(bs) || committed > tokens.len() {
            return Err(Error::Param {
                name: "committed",
                reason: format!(
                    "expected whole blocks of {bs} within {} tokens, found {committed}",
                    tokens.len()
                ),
            });
        }
        if committed > 0 {
            let prompt_blocks = (prompt_len / bs * bs).min(committed);
            if prompt_blocks > 0 {
                session.commit_range(0, prompt_blocks)?;
            }
            while session.committed < committed {
                session.commit_range(session.committed, session.committed + bs)?;
            }
        }
        Ok(session)
    }

    /// A session around a cache restored elsewhere (e.g. from per-block blobs) that holds
    /// the state after the first `committed` of `tokens`.
    pub fn with_cache(
        model: &'m Bd3lm,
        cache: KvCache,
        tokens: &[u32],
        prompt_len: usize,
        committed: usize,
    ) -> Result<Self> {
        let cfg = model.config();
        if prompt_len == 0 {
            return Err(Error::Param {
                name: "prompt",
                reason: "expected at least one token".into(),
            });
        }
        if prompt_len > tokens.len() {
            return Err(Error::Param {
                name: "prompt_len",
                reason: format!(
                    "expected at most the session's {} tokens, found {prompt_len}",
                    tokens.len()
                ),
            });
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= cfg.vocab_size || t == cfg.mask_id())
        {
            return Err(Error::Param {
                name: "prompt",
                reason: format!(
                    "token id {bad} is the mask id or outside the vocabulary of {}",
                    cfg.vocab_size
                ),
            });
        }
        if cache.next_position() != committed || committed > tokens.len() {
            return Err(Error::Param {
                name: "cache",
                reason: format!(
                    "the cache ends at position {}, the session has {committed} committed tokens",
                    cache.next_position()
                ),
            });
        }
        Ok(Self {
            model,
            cache,
            tokens: tokens.to_vec(),
            prompt_len,
            committed,
        })
    }

    /// Commits the first prompt's whole blocks not committed yet (all of them for a new
    /// session, those after a shared prefix whose cache was imported); returns the number
    /// of blocks committed.
    pub fn prefill(&mut self) -> Result<usize> {
        let bs = self.model.config().block_size;
        let whole = self.prompt_len / bs * bs;
        if self.committed >= whole {
            return Ok(0);
        }
        let from = self.committed;
        self.commit_range(from, whole)?;
        Ok((whole - from) / bs)
    }

    /// The tokens, the first prompt's length, the committed count and the cache, for a
    /// caller that keeps sessions between requests.
    pub fn into_parts(self) -> (Vec<u32>, usize, usize, KvCache) {
        (self.tokens, self.prompt_len, self.committed, self.cache)
    }

    /// Number of committed tokens (whole blocks).
    pub fn committed(&self) -> usize {
        self.committed
    }

    fn commit_range(&mut self, from: usize, to: usize) -> Result<()> {
        let device = self.model.device();
        let x = Tensor::from_slice(&self.tokens[from..to], (1, to - from), device)?;
        let zero = Tensor::zeros(1, DType::F32, device)?;
        self.model.commit(&x, &zero, &mut self.cache)?;
        self.committed = to;
        Ok(())
    }

    /// Every token: prompt and generated.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of prompt tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Tokens generated after the prompt.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len.min(self.tokens.len())..]
    }

    /// Index of the next block to denoise.
    pub fn next_block_index(&self) -> usize {
        self.committed / self.model.config().block_size
    }

    /// The KV cache of the committed blocks.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Denoises the next block with the random stream of (`seed`, block index) and
    /// commits it.
    pub fn next_block(
        &mut self,
        params: &SamplingParams,
        seed: u64,
        cancel: Option<&AtomicBool>,
    ) -> Result<BlockReport> {
        let index = self.next_block_index();
        let denoiser = self.begin_block(params)?;
        let started = Instant::now();
        let outcome = drive(
            &mut Net::cached(self.model, &mut self.cache),
            denoiser,
            &mut block_rng(seed, index),
            cancel,
        )?;
        let denoise = started.elapsed();
        self.place_block(&outcome.tokens);
        let started = Instant::now();
        let bs = self.model.config().block_size;
        self.commit_range(self.committed, self.committed + bs)?;
        Ok(BlockReport {
            index,
            tokens: outcome.tokens,
            forward_passes: outcome.forward_passes,
            steps: outcome.steps,
            denoise,
            commit: started.elapsed(),
        })
    }

    /// The sampler of the next block: its fixed tokens (the prompt's tail) in place,
    /// `[MASK]` elsewhere. Drive it with the random stream [`block_rng`] of (seed, block
    /// index), then [`Session::place_block`] and commit.
    pub fn begin_block(&self, params: &SamplingParams) -> Result<BlockDenoiser> {
        let cfg = self.model.config();
        let bs = cfg.block_size;
        let fixed = (self.tokens.len() - self.committed).min(bs);
        let mut block: Vec<u32> = self.tokens[self.committed..self.committed + fixed].to_vec();
        block.resize(bs, cfg.mask_id());
        BlockDenoiser::new(&block, params, bs, cfg.mask_id(), cfg.time_conditioning)
    }

    /// Puts a denoised block in place of its fixed tokens (fixed tokens of later blocks
    /// stay), before its commit.
    pub fn place_block(&mut self, block: &[u32]) {
        let fixed = (self.tokens.len() - self.committed).min(block.len());
        self.tokens.splice(
            self.committed..self.committed + fixed,
            block.iter().copied(),
        );
    }

    /// The input of a batched pass ([`Bd3lm::batch_pass`]) that denoises `block`, the
    /// next block's current tokens, at noise level `t`; the cache stays as it was.
    pub fn denoise_input<'a>(&'a mut self, block: &'a [u32], t: f64) -> BlockInput<'a> {
        BlockInput {
            tokens: block,
            sigma: sigma(t),
            cache: &mut self.cache,
            commit: false,
        }
    }

    /// The input of a batched pass that commits the placed block (at noise level 0, as
    /// every commit). Once that pass succeeded, [`Session::mark_committed`].
    pub fn commit_input(&mut self) -> BlockInput<'_> {
        let bs = self.model.config().block_size;
        BlockInput {
            tokens: &self.tokens[self.committed..self.committed + bs],
            sigma: 0.0,
            cache: &mut self.cache,
            commit: true,
        }
    }

    /// Records the commit of the placed block by a pass of [`Session::commit_input`].
    pub fn mark_committed(&mut self) {
        self.committed += self.model.config().block_size;
    }
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The new tokens returned (stop sequences and tokens past a stop removed).
    pub tokens: Vec<u32>,
    /// Every block committed.
    pub blocks: Vec<BlockReport>,
    /// Forward passes of the denoising, all blocks together (commit passes excluded).
    pub forward_passes: usize,
    /// Why it ended.
    pub stop: StopReason,
}

/// Generates blocks on `session` until a stop rule fires, calling `on_block` with each
/// committed block and the new tokens it makes visible (streaming).
pub fn generate(
    session: &mut Session,
    params: &SamplingParams,
    seed: u64,
    rules: &mut StopRules,
    cancel: Option<&AtomicBool>,
    mut on_block: impl FnMut(&BlockReport, &[u32]),
) -> Result<Generation> {
    params.validate()?;
    if rules.max_new_tokens == 0 {
        return Err(Error::Param {
            name: "max_new_tokens",
            reason: "expected at least 1, found 0".into(),
        });
    }
    let start = session.generated().len();
    let (mut blocks, mut shown) = (Vec::new(), 0usize);
    let stop = loop {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            break StopReason::Cancelled;
        }
        let report = match session.next_block(params, seed, cancel) {
            Err(Error::Cancelled) => break StopReason::Cancelled,
            other => other?,
        };
        let generated = &session.generated()[start..];
        let (visible, stop) = rules.check(generated, session.tokens());
        on_block(&report, &generated[shown.min(visible)..visible]);
        shown = shown.max(visible);
        blocks.push(report);
        if let Some(stop) = stop {
            break stop;
        }
    };
    let tokens = session.generated()[start..start + shown].to_vec();
    let forward_passes = blocks.iter().map(|b: &BlockReport| b.forward_passes).sum();
    Ok(Generation {
        tokens,
        blocks,
        forward_passes,
        stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::{Sampler, denoise_block};
    use bd3lm_model::{Backbone, Config, Shape, checkpoint};
    use candle_core::Device;

    fn model(block_size: usize) -> Bd3lm {
        let cfg = Config::new(Shape {
            vocab_size: 64,
            model_length: 32,
            block_size,
            backbone: Backbone::TOY,
        });
        checkpoint::random_model(&cfg, 0.1, 11, DType::F32, &Device::Cpu).unwrap()
    }

    fn params(sampler: Sampler) -> SamplingParams {
        let mut p = SamplingParams::new(4);
        p.sampler = sampler;
        p.filter.top_p = 1.0;
        p
    }

    fn run(model: &Bd3lm, prompt: &[u32], p: &SamplingParams, seed: u64, max: usize) -> Generation {
        let mut session = Session::start(model, prompt).unwrap();
        generate(
            &mut session,
            p,
            seed,
            &mut StopRules::max_tokens(max),
            None,
            |_, _| {},
        )
        .unwrap()
    }

    /// Inside the window, the cached sampler and the reference's uncached one draw the
    /// same tokens from the same seed.
    #[test]
    fn cached_generation_equals_uncached_inside_the_window() {
        let model = model(4);
        for sampler in [
            Sampler::FirstHitting,
            Sampler::Ddpm,
            Sampler::Confidence { threshold: 0.2 },
        ] {
            let p = params(sampler);
            let cached = run(&model, &[62, 5, 9], &p, 3, 28);
            let mut seq = vec![62, 5, 9];
            for b in 0..cached.blocks.len() {
                let committed = b * 4;
                let mut block = seq[committed..].to_vec();
                block.resize(4, model.config().mask_id());
                let prefix = seq[..committed].to_vec();
                let out = denoise_block(
                    &mut Net::uncached(&model, &prefix),
                    &block,
                    &p,
                    &mut block_rng(3, b),
                    None,
                )
                .unwrap();
                seq.truncate(committed);
                seq.extend(out.tokens);
            }
            assert_eq!(&seq[3..31], cached.tokens.as_slice(), "{sampler:?}");
            let mut distinct = cached.tokens.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert!(
                distinct.len() > 8,
                "the test model must not be degenerate: {distinct:?}"
            );
        }
    }

    /// Interrupted after any block and resumed from its tokens, a session continues with
    /// exactly the tokens of an uninterrupted run, past the window too.
    #[test]
    fn resuming_from_a_committed_block_reproduces_the_rest() {
        let model = model(4);
        let p = params(Sampler::FirstHitting);
        let prompt = [62, 1, 2, 3, 4, 5];
        let full = run(&model, &prompt, &p, 8, 80);
        for cut in [1, 3, 9] {
            let mut first = Session::start(&model, &prompt).unwrap();
            for _ in 0..cut {
                first.next_block(&p, 8, None).unwrap();
            }
            let mut resumed =
                Session::resume(&model, first.tokens(), prompt.len(), first.committed()).unwrap();
            assert_eq!(resumed.next_block_index(), cut + 1);
            let already = first.generated().len();
            let rest = generate(
                &mut resumed,
                &p,
                8,
                &mut StopRules::max_tokens(80 - already),
                None,
                |_, _| {},
            )
            .unwrap();
            assert_eq!(
                &full.tokens[already..],
                rest.tokens.as_slice(),
                "cut after block {cut}"
            );
        }
    }

    #[test]
    fn prompt_tokens_stay_and_seeds_decide_the_draws() {
        let model = model(4);
        let p = params(Sampler::Ddpm);
        let mut session = Session::start(&model, &[62, 7, 8, 9, 10, 11]).unwrap();
        let out = generate(
            &mut session,
            &p,
            1,
            &mut StopRules::max_tokens(10),
            None,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(&session.tokens()[..6], &[62, 7, 8, 9, 10, 11]);
        assert_eq!(out.tokens.len(), 10);
        assert_eq!(out.stop, StopReason::MaxTokens);
        assert!(!out.tokens.contains(&model.config().mask_id()));
        assert_eq!(
            run(&model, &[62], &p, 1, 16).tokens,
            run(&model, &[62], &p, 1, 16).tokens
        );
        assert_ne!(
            run(&model, &[62], &p, 1, 16).tokens,
            run(&model, &[62], &p, 2, 16).tokens
        );
    }

    #[test]
    fn cancellation_and_bad_requests() {
        let model = model(4);
        let p = params(Sampler::FirstHitting);
        let cancel = AtomicBool::new(true);
        let mut session = Session::start(&model, &[62]).unwrap();
        let out = generate(
            &mut session,
            &p,
            1,
            &mut StopRules::max_tokens(8),
            Some(&cancel),
            |_, _| {},
        )
        .unwrap();
        assert_eq!((out.stop, out.tokens.len()), (StopReason::Cancelled, 0));
        assert!(Session::start(&model, &[]).is_err());
        assert!(
            Session::start(&model, &[63])
                .unwrap_err()
                .to_string()
                .contains("mask")
        );
        assert!(Session::start(&model, &[64]).is_err());
        assert!(
            generate(
                &mut session,
                &p,
                1,
                &mut StopRules::max_tokens(0),
                None,
                |_, _| {}
            )
            .is_err()
        );
    }

    /// Streaming hands out each visible token exactly once, in order.
    #[test]
    fn streamed_tokens_are_the_output() {
        let model = model(4);
        let mut session = Session::start(&model, &[62, 3]).unwrap();
        let mut streamed = Vec::new();
        let out = generate(
            &mut session,
            &params(Sampler::FirstHitting),
            4,
            &mut StopRules::max_tokens(13),
            None,
            |_, t| streamed.extend_from_slice(t),
        )
        .unwrap();
        assert_eq!(streamed, out.tokens);
        assert_eq!(out.tokens.len(), 13);
    }

    /// A prompt longer than the tokens is named as such, not as an empty prompt.
    #[test]
    fn a_prompt_length_past_the_tokens_is_named() {
        let model = model(4);
        let cache = model.new_cache(1).unwrap();
        let err = Session::with_cache(&model, cache, &[62, 3], 5, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("prompt_len") && err.contains("at most"),
            "{err}"
        );
    }
}
