//! The BD3-LM network and its forward modes.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::kv_cache::KvCache;
use crate::layers::{AttentionContext, DitBlock, FinalLayer, Rotary, TimestepEmbedder};
use crate::{Config, Error, Result, mask};

/// The BD3-LM DiT backbone.
///
/// Token ids are `u32` tensors of shape (batch, seq); noise levels `sigma` are tensors of
/// shape (batch,) (ignored, as zeros, unless the config enables time conditioning).
#[derive(Debug)]
pub struct Bd3lm {
    cfg: Config,
    vocab_embed: Tensor,
    sigma_map: Option<TimestepEmbedder>,
    rotary: Rotary,
    blocks: Vec<DitBlock>,
    output_layer: FinalLayer,
    /// Training masks by sequence length, built once.
    train_masks: Mutex<HashMap<usize, Tensor>>,
    /// The modulation of every layer when it cannot change: frozen weights and no time
    /// conditioning (sigma is then always replaced by zeros).
    fixed: Option<Conditioning>,
    dtype: DType,
    /// Precision of the keys and values its KV caches hold (see [`Bd3lm::with_kv_dtype`]).
    kv_dtype: DType,
    device: Device,
}

/// One sequence's block in a batched pass ([`Bd3lm::batch_pass`]).
pub struct BlockInput<'a> {
    /// The block's tokens: `block_size` of them.
    pub tokens: &'a [u32],
    /// The noise level the network is conditioned on (ignored without time conditioning).
    pub sigma: f32,
    /// The sequence's KV cache, of batch 1.
    pub cache: &'a mut KvCache,
    /// Commit the block to the cache after the pass (a finished block); else the cache is
    /// left as it was (a block being denoised).
    pub commit: bool,
}

/// The adaLN modulation of every layer and of the output layer for one sigma.
#[derive(Debug, Clone)]
struct Conditioning {
    layers: Vec<Option<Vec<Tensor>>>,
    output: Option<Vec<Tensor>>,
}

impl Bd3lm {
    /// Builds the network from `vb` (rooted above `backbone.`) for config `cfg`.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let vb = vb.pp("backbone");
        let vocab_embed = vb
            .pp("vocab_embed")
            .get((cfg.vocab_size, cfg.hidden_dim), "embedding")?;
        let sigma_map = if cfg.adaln {
            Some(TimestepEmbedder::load(vb.pp("sigma_map"), cfg)?)
        } else {
            None
        };
        let blocks = (0..cfg.n_blocks)
            .map(|i| DitBlock::load(vb.pp(format!("blocks.{i}")), cfg, i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut model = Self {
            cfg: cfg.clone(),
            vocab_embed,
            sigma_map,
            rotary: Rotary::new(cfg.head_dim()),
            blocks,
            output_layer: FinalLayer::load(vb.pp("output_layer"), cfg)?,
            train_masks: Mutex::new(HashMap::new()),
            fixed: None,
            dtype: vb.dtype(),
            kv_dtype: vb.dtype(),
            device: vb.device().clone(),
        };
        if !cfg.time_conditioning && !model.vocab_embed.track_op() {
            let zeros = Tensor::zeros(1, DType::F32, &model.device)?;
            model.fixed = Some(model.conditioning(&zeros)?);
        }
        Ok(model)
    }

    /// The modulation of every layer for `sigma` (batch,).
    fn conditioning(&self, sigma: &Tensor) -> Result<Conditioning> {
        if let Some(fixed) = &self.fixed {
            return Ok(fixed.clone());
        }
        let c = self.cond(sigma)?;
        let layers = self
            .blocks
            .iter()
            .map(|b| b.modulation(c.as_ref()))
            .collect::<candle_core::Result<_>>()?;
        let output = self.output_layer.modulation(c.as_ref())?;
        Ok(Conditioning { layers, output })
    }

    /// The configuration the network was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Compute dtype of the weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The network whose KV caches hold keys and values in `kv_dtype` (f32, bf16 or f16):
    /// they are computed in the compute dtype, rounded once as they are written to the
    /// cache, and attended over from there, the block's own keys included. Every path to
    /// a cache (a commit, a rebuild from tokens, an import) rounds the same way, so a
    /// session gets the same tokens from each. The default is the compute dtype.
    pub fn with_kv_dtype(mut self, kv_dtype: DType) -> Result<Self> {
        crate::kv_cache::check_kv_dtype(kv_dtype)?;
        self.kv_dtype = kv_dtype;
        Ok(self)
    }

    /// Precision of the keys and values its KV caches hold.
    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// An empty KV cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> Result<KvCache> {
        KvCache::new(&self.cfg, batch, self.kv_dtype, &self.device)
    }

    /// The conditioning vector `silu(sigma_map(sigma))` (batch, cond_dim); `None` without
    /// adaLN. Sigma is replaced by zeros unless time conditioning is on, as the reference does.
    pub fn cond(&self, sigma: &Tensor) -> Result<Option<Tensor>> {
        let Some(sigma_map) = &self.sigma_map else {
            return Ok(None);
        };
        let sigma = sigma.to_device(&self.device)?.to_dtype(DType::F32)?;
        let sigma = if self.cfg.time_conditioning {
            sigma
        } else {
            sigma.zeros_like()?
        };
        Ok(Some(sigma_map.forward(&sigma)?))
    }

    /// Vectorised training pass over `[x_t ; x_0]` (batch, 2n): logits of the noisy half,
    /// (batch, n, vocab).
    pub fn forward_train(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        self.train_pass(x, sigma, None)
    }

    /// [`Bd3lm::forward_train`] that also returns the hidden states of the noisy half: the
    /// embedding and each layer's output, each (batch, n, d).
    pub fn forward_train_hidden(
        &self,
        x: &Tensor,
        sigma: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut hidden = Vec::with_capacity(self.blocks.len() + 1);
        let logits = self.train_pass(x, sigma, Some(&mut hidden))?;
        Ok((logits, hidden))
    }

    fn train_pass(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        hidden: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (b, len) = self.check_tokens(x)?;
        let n = len / 2;
        if len % 2 != 0 || n % self.cfg.block_size != 0 || n > self.cfg.model_length {
            return Err(Error::Input(format!(
                "training input length {len} must be 2n with n a multiple of block_size ({}) and at most model_length ({})",
                self.cfg.block_size, self.cfg.model_length
            )));
        }
        self.check_sigma(sigma, b)?;
        let (cos, sin) = self
            .rotary
            .tables((0..n).chain(0..n), self.dtype, &self.device)?;
        let ctx = AttentionContext {
            cos,
            sin,
            mask: Some(self.train_mask(n)?),
            caches: Vec::new(),
        };
        let cond = self.conditioning(sigma)?;
        let x = self.layers(x, &cond, &ctx, false, hidden.map(|h| (h, n)))?;
        self.output_layer
            .forward(&x.narrow(1, 0, n)?, cond.output.as_deref())
            .map_err(Error::from)
    }

    fn train_mask(&self, n: usize) -> Result<Tensor> {
        let mut masks = self.train_masks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = masks.get(&n) {
            return Ok(m.clone());
        }
        let m = mask::train_mask(n, self.cfg.block_size, self.dtype, &self.device)?;
        masks.insert(n, m.clone());
        Ok(m)
    }

    /// Denoise pass over one block (batch, block_size) that follows the cached blocks: its
    /// queries attend to the cache and to the whole block. Returns logits (batch,
    /// block_size, vocab). The cache is not changed.
    pub fn denoise(&self, block: &Tensor, sigma: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        in_pool(|| {
            let (x, cond) = self.denoise_hidden(block, sigma, cache)?;
            self.output_layer
                .forward(&x, cond.output.as_deref())
                .map_err(Error::from)
        })
    }

    /// [`Bd3lm::denoise`] returning logits only at the block positions `rows` (the same for
    /// every sequence), shape (batch, rows, vocab): samplers need logits of masked positions
    /// only, and the vocabulary projection dominates a pass.
    pub fn denoise_rows(
        &self,
        block: &Tensor,
        sigma: &Tensor,
        cache: &mut KvCache,
        rows: &[u32],
    ) -> Result<Tensor> {
        in_pool(|| {
            let (x, cond) = self.denoise_hidden(block, sigma, cache)?;
            let b = x.dim(0)?;
            let picks: Vec<(usize, u32)> = (0..b)
                .flat_map(|i| rows.iter().map(move |&r| (i, r)))
                .collect();
            let logits = self.logits_at(&x, &cond, &picks)?;
            Ok(logits.reshape((b, rows.len(), self.cfg.vocab_size))?)
        })
    }

    /// One pass over the blocks of many sequences, each after its own KV cache (of batch
    /// 1, at any position and length): the logits of `rows[i]` of block `i`, block after
    /// block, in one (rows, vocab) tensor (one transfer from the device). Blocks marked
    /// `commit` are committed to their caches; the other caches are left as they were.
    ///
    /// Everything but attention is one product over all blocks' rows; attention runs per
    /// sequence over its own cache. A sequence's logits and committed keys are bit for bit
    /// those it gets alone on the CPU (see the batch-invariance tests), so finished blocks
    /// of some sessions are committed in the same pass that denoises the others.
    pub fn batch_pass(&self, blocks: &mut [BlockInput], rows: &[&[u32]]) -> Result<Tensor> {
        in_pool(|| {
            if rows.len() != blocks.len() {
                return Err(Error::Input(format!(
                    "{} blocks but rows for {}",
                    blocks.len(),
                    rows.len()
                )));
            }
            let (tokens, sigma) = self.stack(blocks)?;
            let commits: Vec<bool> = blocks.iter().map(|b| b.commit).collect();
            let mut caches: Vec<&mut KvCache> = blocks.iter_mut().map(|b| &mut *b.cache).collect();
            let (x, cond) = self.cached_pass(&tokens, &sigma, &mut caches, &commits)?;
            let picks: Vec<(usize, u32)> = rows
                .iter()
                .enumerate()
                .flat_map(|(i, r)| r.iter().map(move |&r| (i, r)))
                .collect();
            self.logits_at(&x, &cond, &picks)
        })
    }

    /// The blocks' tokens (batch, block_size) and noise levels (batch,).
    fn stack(&self, blocks: &[BlockInput]) -> Result<(Tensor, Tensor)> {
        let bs = self.cfg.block_size;
        let mut ids = Vec::with_capacity(blocks.len() * bs);
        for b in blocks {
            if b.tokens.len() != bs || b.cache.batch() != 1 {
                return Err(Error::Input(format!(
                    "a batched block has {bs} tokens and a cache of batch 1, found {} and {}",
                    b.tokens.len(),
                    b.cache.batch()
                )));
            }
            ids.extend_from_slice(b.tokens);
        }
        let sigma: Vec<f32> = blocks.iter().map(|b| b.sigma).collect();
        Ok((
            Tensor::from_vec(ids, (blocks.len(), bs), &self.device)?,
            Tensor::from_vec(sigma, blocks.len(), &self.device)?,
        ))
    }

    /// Logits (picks, vocab) of the hidden states `x` (batch, seq, d) at the picked
    /// (sequence, position) pairs, each with its sequence's output modulation.
    fn logits_at(&self, x: &Tensor, cond: &Conditioning, picks: &[(usize, u32)]) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        if let Some(&(_, bad)) = picks.iter().find(|&&(_, r)| r as usize >= s) {
            return Err(Error::Input(format!(
                "row {bad} is outside the block of {s}"
            )));
        }
        if picks.is_empty() {
            let shape = (0, self.cfg.vocab_size);
            return Ok(Tensor::zeros(shape, self.dtype, &self.device)?);
        }
        let flat: Vec<u32> = picks.iter().map(|&(i, r)| (i * s) as u32 + r).collect();
        let idx = Tensor::from_vec(flat, picks.len(), &self.device)?;
        let rows = x.reshape((b * s, d))?.index_select(&idx, 0)?.unsqueeze(1)?;
        // Per-sequence modulation (time conditioning) follows its rows.
        let m = match &cond.output {
            Some(m) if m[0].dim(0)? > 1 => {
                let seq: Vec<u32> = picks.iter().map(|&(i, _)| i as u32).collect();
                let seq = Tensor::from_vec(seq, picks.len(), &self.device)?;
                Some(
                    m.iter()
                        .map(|t| t.contiguous()?.index_select(&seq, 0))
                        .collect::<candle_core::Result<Vec<_>>>()?,
                )
            }
            other => other.clone(),
        };
        Ok(self.output_layer.forward(&rows, m.as_deref())?.squeeze(1)?)
    }

    fn denoise_hidden(
        &self,
        block: &Tensor,
        sigma: &Tensor,
        cache: &mut KvCache,
    ) -> Result<(Tensor, Conditioning)> {
        let (_, s) = self.check_tokens(block)?;
        if s != self.cfg.block_size {
            return Err(Error::Input(format!(
                "a denoised block has {} tokens, found {s}",
                self.cfg.block_size
            )));
        }
        self.cached_pass(block, sigma, &mut [cache], &[false])
    }

    /// Commit pass: appends the keys and values of finished blocks (batch, k * block_size)
    /// to the cache, dropping the oldest blocks past the window.
    ///
    /// Several blocks are committed with a block-causal mask, as many per pass as keep the
    /// window each block sees identical to committing them one by one; this also rebuilds
    /// a cache from a session's tokens.
    pub fn commit(&self, blocks: &Tensor, sigma: &Tensor, cache: &mut KvCache) -> Result<()> {
        in_pool(|| {
            let (_, s) = self.check_tokens(blocks)?;
            if s == 0 || s % self.cfg.block_size != 0 {
                return Err(Error::Input(format!(
                    "committed tokens must be whole blocks of {}, found {s}",
                    self.cfg.block_size
                )));
            }
            let mut done = 0;
            while done < s {
                let take = cache.max_commit_tokens().min(s - done);
                let part = blocks.narrow(1, done, take)?;
                self.cached_pass(&part, sigma, &mut [&mut *cache], &[true])?;
                done += take;
            }
            Ok(())
        })
    }

    /// One pass of new tokens (batch, s) after the caches, whose batches add up to the
    /// tokens' (one cache per sequence in a batched pass); the tokens of the caches marked
    /// in `commits` are committed. Returns the last hidden states and the conditioning
    /// they were computed with.
    fn cached_pass(
        &self,
        tokens: &Tensor,
        sigma: &Tensor,
        caches: &mut [&mut KvCache],
        commits: &[bool],
    ) -> Result<(Tensor, Conditioning)> {
        let (b, s) = self.check_tokens(tokens)?;
        let batch: usize = caches.iter().map(|c| c.batch()).sum();
        if batch != b {
            return Err(Error::Input(format!(
                "tokens have batch {b}, the KV caches {batch}"
            )));
        }
        self.check_sigma(sigma, b)?;
        for cache in caches.iter_mut() {
            cache.check_fits(&self.cfg, self.kv_dtype)?;
            cache.reserve(s)?;
        }
        let mask = match &caches[..] {
            _ if s <= self.cfg.block_size => None,
            [cache] => Some(mask::block_causal_mask(
                cache.len(),
                s,
                self.cfg.block_size,
                self.dtype,
                &self.device,
            )?),
            _ => {
                return Err(Error::Input(
                    "several caches advance by one block per pass".into(),
                ));
            }
        };
        let (cos, sin) = self.rotary_for(caches, s)?;
        let ctx = AttentionContext {
            cos,
            sin,
            mask,
            caches: caches.iter().map(|c| &**c).collect(),
        };
        let cond = self.conditioning(sigma)?;
        // When every sequence commits, nothing reads the last layer's output.
        let keys_only = commits.iter().all(|&c| c);
        let x = self.layers(tokens, &cond, &ctx, keys_only, None)?;
        drop(ctx);
        for (cache, _) in caches.iter_mut().zip(commits).filter(|(_, c)| **c) {
            cache.append_pending(s);
        }
        Ok((x, cond))
    }

    /// Rotary tables for `s` new tokens after each cache: shared (s, r / 2) when every
    /// sequence is at the same position, else per sequence (batch, s, r / 2).
    fn rotary_for(&self, caches: &[&mut KvCache], s: usize) -> Result<(Tensor, Tensor)> {
        let p0 = caches.first().map_or(0, |c| c.next_position());
        if caches.iter().all(|c| c.next_position() == p0) {
            return Ok(self.rotary.tables(p0..p0 + s, self.dtype, &self.device)?);
        }
        let positions = caches.iter().flat_map(|c| {
            let p = c.next_position();
            (0..c.batch()).flat_map(move |_| p..p + s)
        });
        let (cos, sin) = self.rotary.tables(positions, self.dtype, &self.device)?;
        let half = cos.dim(1)?;
        let b: usize = caches.iter().map(|c| c.batch()).sum();
        Ok((cos.reshape((b, s, half))?, sin.reshape((b, s, half))?))
    }

    /// Uncached pass over a window of tokens (batch, s) at positions `0..s` with the
    /// block-causal mask: logits (batch, s, vocab). This is the reference's sampling
    /// forward without a cache.
    pub fn forward_block_causal(&self, tokens: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        let (b, s) = self.check_tokens(tokens)?;
        if s > self.cfg.model_length {
            return Err(Error::Input(format!(
                "window of {s} tokens exceeds model_length {}",
                self.cfg.model_length
            )));
        }
        self.check_sigma(sigma, b)?;
        let (cos, sin) = self.rotary.tables(0..s, self.dtype, &self.device)?;
        let mask = mask::block_causal_mask(0, s, self.cfg.block_size, self.dtype, &self.device)?;
        let ctx = AttentionContext {
            cos,
            sin,
            mask: Some(mask),
            caches: Vec::new(),
        };
        let cond = self.conditioning(sigma)?;
        let x = self.layers(tokens, &cond, &ctx, false, None)?;
        self.output_layer
            .forward(&x, cond.output.as_deref())
            .map_err(Error::from)
    }

    /// Embeds `tokens` and runs every layer. A commit skips the last layer's attention and
    /// MLP (only its keys and values are needed); `hidden` collects the first `n` positions
    /// of the embedding and of each layer's output.
    fn layers(
        &self,
        tokens: &Tensor,
        cond: &Conditioning,
        ctx: &AttentionContext,
        commit: bool,
        mut hidden: Option<(&mut Vec<Tensor>, usize)>,
    ) -> Result<Tensor> {
        let (b, s) = tokens.dims2()?;
        let mut x = self
            .vocab_embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, s, self.cfg.hidden_dim))?;
        if let Some((h, n)) = hidden.as_mut() {
            h.push(x.narrow(1, 0, *n)?);
        }
        let last = self.blocks.len() - 1;
        for (i, block) in self.blocks.iter().enumerate() {
            let keys_only = commit && i == last;
            x = block.forward(&x, cond.layers[i].as_deref(), ctx, keys_only)?;
            if let Some((h, n)) = hidden.as_mut() {
                h.push(x.narrow(1, 0, *n)?);
            }
        }
        Ok(x)
    }

    /// Checks a token tensor: rank 2, integer ids inside the vocabulary. Returns (batch, seq).
    fn check_tokens(&self, tokens: &Tensor) -> Result<(usize, usize)> {
        let (b, s) = tokens.dims2().map_err(|_| {
            Error::Input(format!(
                "token ids must be (batch, seq), found shape {:?}",
                tokens.dims()
            ))
        })?;
        if tokens.dtype() != DType::U32 {
            return Err(Error::Input(format!(
                "token ids must be u32, found {:?}",
                tokens.dtype()
            )));
        }
        if b == 0 {
            return Err(Error::Input("empty batch".into()));
        }
        if s > 0 {
            let max = tokens.flatten_all()?.max(0)?.to_scalar::<u32>()?;
            if max as usize >= self.cfg.vocab_size {
                return Err(Error::Input(format!(
                    "token id {max} is outside the vocabulary of {}",
                    self.cfg.vocab_size
                )));
            }
        }
        Ok((b, s))
    }

    fn check_sigma(&self, sigma: &Tensor, b: usize) -> Result<()> {
        if sigma.dims() != [b] {
            return Err(Error::Input(format!(
                "sigma must have shape [{b}], found {:?}",
                sigma.dims()
            )));
        }
        Ok(())
    }
}

/// Runs a pass on a thread of the kernels' pool (inline when already on one): each of its
/// forty-odd parallel matrix products then splits its work inside the pool, where called
/// from another thread it would hand its work over and sleep until it is done (a fifth of
/// a single block's pass on two cores went to that).
fn in_pool<R: Send>(pass: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| pass())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, IndexOp, Tensor};

    use crate::test_util::{max_diff, small_config, small_model, tokens, zeros};

    /// With masked tokens in the noisy half, the training pass gives every noisy block the
    /// logits the cached sampler gives it after committing the clean blocks before it.
    /// Covers batch 3, a context of 24 tokens, and block sizes 1 (AR), 3, 4 and 24 (MDLM).
    #[test]
    fn training_pass_equals_cached_denoising_block_by_block() {
        for bs in [1, 3, 4, 24] {
            let cfg = small_config(bs);
            let model = small_model(&cfg);
            let (b, n) = (3, cfg.model_length);
            let x0 = tokens(b, n, cfg.vocab_size, 1);
            let mask = Tensor::full(cfg.mask_id(), (b, n), &Device::Cpu).unwrap();
            let pick = Tensor::from_vec(
                (0..b * n).map(|i| (i % 3 == 0) as u8).collect::<Vec<_>>(),
                (b, n),
                &Device::Cpu,
            )
            .unwrap();
            let xt = pick.where_cond(&mask, &x0).unwrap();
            let train = model
                .forward_train(&Tensor::cat(&[&xt, &x0], 1).unwrap(), &zeros(b))
                .unwrap();
            let mut cache = model.new_cache(b).unwrap();
            for k in 0..n / bs {
                let block = xt.narrow(1, k * bs, bs).unwrap();
                let cached = model.denoise(&block, &zeros(b), &mut cache).unwrap();
                let diff = max_diff(&cached, &train.narrow(1, k * bs, bs).unwrap());
                assert!(diff < 1e-4, "bs {bs} block {k}: {diff}");
                model
                    .commit(&x0.narrow(1, k * bs, bs).unwrap(), &zeros(b), &mut cache)
                    .unwrap();
            }
        }
    }

    /// Inside the window, the cached path equals the uncached block-causal pass.
    #[test]
    fn cached_equals_uncached_inside_the_window() {
        let cfg = small_config(4);
        let model = small_model(&cfg);
        let seq = tokens(2, cfg.model_length, cfg.vocab_size, 2);
        let full = model.forward_block_causal(&seq, &zeros(2)).unwrap();
        let mut cache = model.new_cache(2).unwrap();
        for k in 0..cfg.model_length / 4 {
            let block = seq.narrow(1, 4 * k, 4).unwrap();
            let cached = model.denoise(&block, &zeros(2), &mut cache).unwrap();
            assert!(max_diff(&cached, &full.narrow(1, 4 * k, 4).unwrap()) < 1e-4);
            model.commit(&block, &zeros(2), &mut cache).unwrap();
        }
    }

    /// Committing many blocks in one call (a cache rebuilt from tokens) gives the cache that
    /// committing them one by one gives, past the window too.
    #[test]
    fn bulk_commit_equals_block_by_block_commit() {
        let cfg = small_config(4);
        let model = small_model(&cfg);
        let seq = tokens(1, 3 * cfg.model_length, cfg.vocab_size, 3);
        let mut one_by_one = model.new_cache(1).unwrap();
        for k in 0..seq.dim(1).unwrap() / 4 {
            model
                .commit(
                    &seq.narrow(1, 4 * k, 4).unwrap(),
                    &zeros(1),
                    &mut one_by_one,
                )
                .unwrap();
        }
        let mut bulk = model.new_cache(1).unwrap();
        model.commit(&seq, &zeros(1), &mut bulk).unwrap();
        assert_eq!(
            (bulk.len(), bulk.next_position()),
            (one_by_one.len(), one_by_one.next_position())
        );
        let probe = tokens(1, 4, cfg.vocab_size, 4);
        let a = model.denoise(&probe, &zeros(1), &mut one_by_one).unwrap();
        let b = model.denoise(&probe, &zeros(1), &mut bulk).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
    }

    /// Over many windows the cache keeps `model_length - block_size` tokens, and rotary at
    /// absolute positions is equivalent to the reference's window-relative positions:
    /// shifting every position by a million changes no logit beyond float error.
    #[test]
    fn sliding_window_over_many_blocks_is_position_invariant() {
        let cfg = small_config(4);
        let model = small_model(&cfg);
        let seq = tokens(2, 6 * cfg.model_length, cfg.vocab_size, 5);
        let mut near = model.new_cache(2).unwrap();
        let mut far = model.new_cache(2).unwrap();
        far.shift_positions(1_000_000);
        for k in 0..seq.dim(1).unwrap() / 4 {
            let block = seq.narrow(1, 4 * k, 4).unwrap();
            let a = model.denoise(&block, &zeros(2), &mut near).unwrap();
            let b = model.denoise(&block, &zeros(2), &mut far).unwrap();
            assert!(max_diff(&a, &b) < 1e-4, "block {k}");
            model.commit(&block, &zeros(2), &mut near).unwrap();
            model.commit(&block, &zeros(2), &mut far).unwrap();
            assert_eq!(near.len(), (4 * (k + 1)).min(cfg.model_length - 4));
            assert_eq!(near.next_position(), 4 * (k + 1));
        }
    }

    /// A cache exported to bytes and imported gives bit-identical logits.
    #[test]
    fn exported_cache_gives_identical_logits() {
        let cfg = small_config(4);
        let model = small_model(&cfg);
        let mut cache = model.new_cache(2).unwrap();
        model
            .commit(&tokens(2, 32, cfg.vocab_size, 6), &zeros(2), &mut cache)
            .unwrap();
        let bytes = cache.to_bytes().unwrap();
        let mut imported = crate::KvCache::from_bytes(&bytes, &Device::Cpu).unwrap();
        assert_eq!(
            (imported.len(), imported.next_position()),
            (cache.len(), cache.next_position())
        );
        let probe = tokens(2, 4, cfg.vocab_size, 7);
        let a = model.denoise(&probe, &zeros(2), &mut cache).unwrap();
        let b = model.denoise(&probe, &zeros(2), &mut imported).unwrap();
        assert_eq!(max_diff(&a, &b), 0.0);
    }

    /// Each block exported right after its commit, and the live ones imported again, give
    /// the cache itself: how a worker rebuilds a session's cache from per-block blobs.
    #[test]
    fn per_block_segments_rebuild_the_cache_past_the_window() {
        let cfg = small_config(4);
        let model = small_model(&cfg);
        let mut cache = model.new_cache(1).unwrap();
        let mut blobs = Vec::new();
        for k in 0..12 {
            model
                .commit(&tokens(1, 4, cfg.vocab_size, k), &zeros(1), &mut cache)
                .unwrap();
            blobs.push(cache.export(4 * k, 4).unwrap());
        }
        let live = cache.len() / 4;
        let parts: Vec<&[u8]> = blobs[12 - live..].iter().map(Vec::as_slice).collect();
        let mut imported = crate::KvCache::import(&parts, &Device::Cpu).unwrap();
        assert_eq!(
            (imported.len(), imported.next_position()),
            (cache.len(), cache.next_position())
        );
        let probe = tokens(1, 4, cfg.vocab_size, 99);
        let a = model.denoise(&probe, &zeros(1), &mut cache).unwrap();
        let b = model.denoise(&probe, &zeros(1), &mut imported).unwrap();
        assert_eq!(max_diff(&a, &b), 0.0);
        assert!(cache.export(0, 4).is_err(), "slid out of the window");
        let gap: Vec<&[u8]> = vec![&blobs[9], &blobs[11]];
        assert!(crate::KvCache::import(&gap, &Device::Cpu).is_err());
    }

    #[test]
    fn denoise_rows_selects_rows_of_the_full_pass() {
        let cfg = small_config(4);
        let model = small_model(&cfg);
        let mut cache = model.new_cache(1).unwrap();
        model
            .commit(&tokens(1, 8, cfg.vocab_size, 8), &zeros(1), &mut cache)
            .unwrap();
        let block = tokens(1, 4, cfg.vocab_size, 9);
        let full = model.denoise(&block, &zeros(1), &mut cache).unwrap();
        let rows = model
            .denoise_rows(&block, &zeros(1), &mut cache, &[3, 1])
            .unwrap();
        assert!(max_diff(&rows.i((.., 0)).unwrap(), &full.i((.., 3)).unwrap()) < 1e-6);
        assert!(max_diff(&rows.i((.., 1)).unwrap(), &full.i((.., 1)).unwrap()) < 1e-6);
        assert!(
            model
                .denoise_rows(&block, &zeros(1), &mut cache, &[4])
                .is_err()
        );
    }

    /// A batched pass gives each sequence, bit for bit, the logits and the committed cache
    /// it gets alone: sequences at different positions (one past the window), different
    /// rows (one row, and more than 64 rows in all, which switch the vocabulary product's
    /// orientation), different noise levels under time conditioning, blocks committed in
    /// the pass that denoises others, then a pass that only commits.
    #[test]
    fn batched_passes_are_batch_invariant() {
        for time_conditioning in [false, true] {
            let mut cfg = crate::Config::new(crate::Shape {
                vocab_size: 300,
                model_length: 24,
                block_size: 4,
                backbone: crate::Backbone::TOY,
            });
            cfg.time_conditioning = time_conditioning;
            let model = small_model(&cfg);
            let n = 24;
            let cache = |i: usize| {
                let mut c = model.new_cache(1).unwrap();
                if !i.is_multiple_of(11) {
                    let t = tokens(1, 4 * (i % 11), cfg.vocab_size, i);
                    model.commit(&t, &zeros(1), &mut c).unwrap();
                }
                c
            };
            let mut alone: Vec<_> = (0..n).map(cache).collect();
            let mut together: Vec<_> = (0..n).map(cache).collect();
            let blocks: Vec<Vec<u32>> = tokens(n, 4, cfg.vocab_size, 77).to_vec2().unwrap();
            let rows: Vec<Vec<u32>> = (0..n as u32)
                .map(|i| {
                    if i % 2 == 0 {
                        vec![]
                    } else {
                        (i / 2 % 4..4).collect()
                    }
                })
                .collect();
            let sigma = |i: usize| 0.1 + i as f32 / 7.0;
            let row_refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
            let mut pass = |commit: &dyn Fn(usize) -> bool, rows: &[&[u32]]| {
                let mut inputs: Vec<_> = together
                    .iter_mut()
                    .enumerate()
                    .map(|(i, cache)| crate::BlockInput {
                        tokens: &blocks[i],
                        sigma: sigma(i),
                        cache,
                        commit: commit(i),
                    })
                    .collect();
                model.batch_pass(&mut inputs, rows).unwrap()
            };
            let logits = pass(&|i| i % 2 == 0, &row_refs);
            let none = vec![&[][..]; n];
            pass(&|i| i % 2 == 1, &none);
            let mut at = 0;
            for (i, own_cache) in alone.iter_mut().enumerate() {
                let block = Tensor::new(&blocks[i][..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let s = Tensor::new(&[sigma(i)], &Device::Cpu).unwrap();
                if !rows[i].is_empty() {
                    let own = model.denoise_rows(&block, &s, own_cache, &rows[i]).unwrap();
                    let theirs = logits.narrow(0, at, rows[i].len()).unwrap();
                    at += rows[i].len();
                    assert_eq!(
                        max_diff(&own.squeeze(0).unwrap(), &theirs),
                        0.0,
                        "logits {i}"
                    );
                }
                model.commit(&block, &s, own_cache).unwrap();
                let (a, b) = (
                    own_cache.to_bytes().unwrap(),
                    together[i].to_bytes().unwrap(),
                );
                assert!(a == b, "cache {i}");
            }
            assert_eq!(at, logits.dim(0).unwrap());
        }
    }

    /// Time conditioning feeds sigma through; without it sigma is ignored. Without adaLN
    /// the network has no conditioning at all.
    #[test]
    fn conditioning_variants() {
        let mut cfg = small_config(4);
        let x = tokens(2, 2 * cfg.model_length, cfg.vocab_size, 10);
        let sigma = Tensor::new(&[0.5f32, 2.0], &Device::Cpu).unwrap();
        let plain = small_model(&cfg);
        let a = plain.forward_train(&x, &zeros(2)).unwrap();
        assert_eq!(max_diff(&a, &plain.forward_train(&x, &sigma).unwrap()), 0.0);
        cfg.time_conditioning = true;
        let timed = small_model(&cfg);
        assert!(
            max_diff(
                &timed.forward_train(&x, &zeros(2)).unwrap(),
                &timed.forward_train(&x, &sigma).unwrap()
            ) > 1e-3
        );
        cfg.adaln = false;
        let no_adaln = small_model(&cfg);
        assert!(no_adaln.cond(&sigma).unwrap().is_none());
        let logits = no_adaln.forward_train(&x, &sigma).unwrap();
        assert_eq!(logits.dims(), [2, cfg.model_length, cfg.vocab_size]);
    }

    /// f16 weights and activations run on the CPU and stay close to f32.
    #[test]
    fn half_precision_runs_close_to_f32() {
        let cfg = small_config(4);
        let f32_model = small_model(&cfg);
        let f16_model =
            crate::checkpoint::random_model(&cfg, 0.2, 7, DType::F16, &Device::Cpu).unwrap();
        let seq = tokens(1, 12, cfg.vocab_size, 11);
        let mut c32 = f32_model.new_cache(1).unwrap();
        let mut c16 = f16_model.new_cache(1).unwrap();
        f32_model
            .commit(&seq.narrow(1, 0, 8).unwrap(), &zeros(1), &mut c32)
            .unwrap();
        f16_model
            .commit(&seq.narrow(1, 0, 8).unwrap(), &zeros(1), &mut c16)
            .unwrap();
        let block = seq.narrow(1, 8, 4).unwrap();
        let a = f32_model.denoise(&block, &zeros(1), &mut c32).unwrap();
        let b = f16_model.denoise(&block, &zeros(1), &mut c16).unwrap();
        assert_eq!(b.dtype(), DType::F16);
        assert!(max_diff(&a, &b) < 0.05, "{}", max_diff(&a, &b));
    }

    /// A bf16 or f16 KV cache holds half the bytes of an f32 one, gives the same logits
    /// after an export and import as in memory (keys are rounded once, as they are
    /// written), stays close to the f32 cache, and serves no model of another precision.
    #[test]
    fn narrower_kv_caches_halve_their_bytes_and_round_trip_exactly() {
        let cfg = small_config(4);
        let seq = tokens(1, 12, cfg.vocab_size, 11);
        let (context, block) = (seq.narrow(1, 0, 8).unwrap(), seq.narrow(1, 8, 4).unwrap());
        let f32_model = small_model(&cfg);
        let mut c32 = f32_model.new_cache(1).unwrap();
        f32_model.commit(&context, &zeros(1), &mut c32).unwrap();
        let exact = f32_model.denoise(&block, &zeros(1), &mut c32).unwrap();
        for kv in [DType::BF16, DType::F16] {
            let model = small_model(&cfg).with_kv_dtype(kv).unwrap();
            let mut cache = model.new_cache(1).unwrap();
            model.commit(&context, &zeros(1), &mut cache).unwrap();
            assert_eq!(
                (cache.dtype(), 2 * cache.live_bytes()),
                (kv, c32.live_bytes())
            );
            let mut imported =
                crate::KvCache::from_bytes(&cache.to_bytes().unwrap(), &Device::Cpu).unwrap();
            let in_memory = model.denoise(&block, &zeros(1), &mut cache).unwrap();
            let from_bytes = model.denoise(&block, &zeros(1), &mut imported).unwrap();
            assert_eq!(in_memory.dtype(), DType::F32);
            assert_eq!(max_diff(&in_memory, &from_bytes), 0.0, "{kv:?}");
            let off = max_diff(&in_memory, &exact);
            assert!(off > 0.0 && off < 0.05, "{kv:?}: {off}");
            assert!(f32_model.denoise(&block, &zeros(1), &mut imported).is_err());
        }
        assert!(small_model(&cfg).with_kv_dtype(DType::U8).is_err());
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let cfg = small_config(4);
        let model = small_model(&cfg);
        let mut cache = model.new_cache(2).unwrap();
        let out_of_vocab = Tensor::full(cfg.vocab_size as u32, (2, 4), &Device::Cpu).unwrap();
        assert!(
            model
                .denoise(&out_of_vocab, &zeros(2), &mut cache)
                .unwrap_err()
                .to_string()
                .contains("vocabulary")
        );
        assert!(
            model
                .denoise(&tokens(2, 3, 64, 0), &zeros(2), &mut cache)
                .is_err()
        );
        assert!(
            model
                .denoise(&tokens(1, 4, 64, 0), &zeros(1), &mut cache)
                .is_err()
        );
        assert!(
            model
                .denoise(&tokens(2, 4, 64, 0), &zeros(3), &mut cache)
                .is_err()
        );
        assert!(
            model
                .commit(&tokens(2, 6, 64, 0), &zeros(2), &mut cache)
                .is_err()
        );
        assert!(
            model
                .forward_train(&tokens(2, 7, 64, 0), &zeros(2))
                .is_err()
        );
        assert!(
            model
                .forward_block_causal(&tokens(1, 100, 64, 0), &zeros(1))
                .is_err()
        );
        let other = small_model(&small_config(3));
        assert!(
            other
                .denoise(&tokens(2, 3, 64, 0), &zeros(2), &mut cache)
                .is_err()
        );
    }
}
