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
    dtype: DType,
    device: Device,
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
        Ok(Self {
            cfg: cfg.clone(),
            vocab_embed,
            sigma_map,
            rotary: Rotary::new(cfg.head_dim()),
            blocks,
            output_layer: FinalLayer::load(vb.pp("output_layer"), cfg)?,
            train_masks: Mutex::new(HashMap::new()),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
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

    /// An empty KV cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> Result<KvCache> {
        KvCache::new(&self.cfg, batch, self.dtype, &self.device)
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
            cache: None,
        };
        let c = self.cond(sigma)?;
        let x = self.layers(x, c.as_ref(), &ctx, false, hidden.map(|h| (h, n)))?;
        self.output_layer
            .forward(&x.narrow(1, 0, n)?, c.as_ref())
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
        let x = self.denoise_hidden(block, sigma, cache)?;
        self.output_layer
            .forward(&x, self.cond(sigma)?.as_ref())
            .map_err(Error::from)
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
        let x = self.denoise_hidden(block, sigma, cache)?;
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= x.dim(1).unwrap_or(0)) {
            return Err(Error::Input(format!(
                "row {bad} is outside the block of {}",
                x.dim(1)?
            )));
        }
        let idx = Tensor::new(rows, &self.device)?;
        let x = x.index_select(&idx, 1)?;
        self.output_layer
            .forward(&x, self.cond(sigma)?.as_ref())
            .map_err(Error::from)
    }

    fn denoise_hidden(
        &self,
        block: &Tensor,
        sigma: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, s) = self.check_tokens(block)?;
        if s != self.cfg.block_size {
            return Err(Error::Input(format!(
                "a denoised block has {} tokens, found {s}",
                self.cfg.block_size
            )));
        }
        self.cached_pass(block, sigma, cache, b, false)
    }

    /// Commit pass: appends the keys and values of finished blocks (batch, k * block_size)
    /// to the cache, dropping the oldest blocks past the window.
    ///
    /// Several blocks are committed with a block-causal mask, as many per pass as keep the
    /// window each block sees identical to committing them one by one; this also rebuilds
    /// a cache from a session's tokens.
    pub fn commit(&self, blocks: &Tensor, sigma: &Tensor, cache: &mut KvCache) -> Result<()> {
        let (b, s) = self.check_tokens(blocks)?;
        if s == 0 || s % self.cfg.block_size != 0 {
            return Err(Error::Input(format!(
                "committed tokens must be whole blocks of {}, found {s}",
                self.cfg.block_size
            )));
        }
        let mut done = 0;
        while done < s {
            let take = cache.max_commit_tokens().min(s - done);
            self.cached_pass(&blocks.narrow(1, done, take)?, sigma, cache, b, true)?;
            done += take;
        }
        Ok(())
    }

    /// One pass of new tokens after the cache; returns the last hidden states.
    fn cached_pass(
        &self,
        tokens: &Tensor,
        sigma: &Tensor,
        cache: &mut KvCache,
        b: usize,
        commit: bool,
    ) -> Result<Tensor> {
        cache.check_fits(&self.cfg, self.dtype)?;
        if cache.batch() != b {
            return Err(Error::Input(format!(
                "tokens have batch {b}, the KV cache {}",
                cache.batch()
            )));
        }
        self.check_sigma(sigma, b)?;
        let s = tokens.dim(1)?;
        cache.reserve(s)?;
        let p0 = cache.next_position();
        let (cos, sin) = self.rotary.tables(p0..p0 + s, self.dtype, &self.device)?;
        let mask = if s > self.cfg.block_size {
            Some(mask::block_causal_mask(
                cache.len(),
                s,
                self.cfg.block_size,
                self.dtype,
                &self.device,
            )?)
        } else {
            None
        };
        let ctx = AttentionContext {
            cos,
            sin,
            mask,
            cache: Some(&*cache),
        };
        let x = self.layers(tokens, self.cond(sigma)?.as_ref(), &ctx, commit, None)?;
        if commit {
            cache.commit_pending(s);
        }
        Ok(x)
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
            cache: None,
        };
        let c = self.cond(sigma)?;
        let x = self.layers(tokens, c.as_ref(), &ctx, false, None)?;
        self.output_layer
            .forward(&x, c.as_ref())
            .map_err(Error::from)
    }

    /// Embeds `tokens` and runs every layer. A commit skips the last layer's attention and
    /// MLP (only its keys and values are needed); `hidden` collects the first `n` positions
    /// of the embedding and of each layer's output.
    fn layers(
        &self,
        tokens: &Tensor,
        c: Option<&Tensor>,
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
            let (out, k, v) = block.forward(&x, c, ctx, keys_only)?;
            if keys_only {
                if let Some(cache) = ctx.cache {
                    cache.write_pending(i, &k, &v)?;
                }
            }
            x = out;
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
