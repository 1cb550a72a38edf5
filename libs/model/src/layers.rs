//! The layers of the DiT backbone, one plain struct each with `load` and `forward`.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::Config;
use crate::kv_cache::KvCache;
use crate::{attention, ops};

/// Width of the sinusoidal timestep features fed to the sigma embedder.
pub const FREQUENCY_EMBEDDING_SIZE: usize = 256;

/// Outputs at least this many times wider than the input count as a vocabulary
/// projection, computed as `W x^T`.
const WIDE_RATIO: usize = 8;
/// Inputs with at most this many rows use the `W x^T` form of a wide projection.
const FEW_ROWS: usize = 64;

/// A linear layer `y = x W^T + b` whose weight is laid out for how it is used.
///
/// A matrix product with few input rows (a block of 4 to 16 tokens) costs about as much
/// as packing the weight, so frozen weights are stored in the orientation the kernel reads
/// fastest; weights that are training variables stay as they are so gradients reach them.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum Weight {
    /// A training variable, (out, in).
    Trainable(Tensor),
    /// Frozen, stored transposed (in, out) and contiguous.
    Transposed(Tensor),
    /// Frozen and much wider than tall (out, in), e.g. the vocabulary projection.
    Wide(Tensor),
}

impl Linear {
    /// Loads `weight` (out, in) and, when `bias`, `bias` (out) under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let w = vb.get((out_dim, in_dim), "weight")?;
        let weight = if w.track_op() {
            Weight::Trainable(w)
        } else if out_dim >= WIDE_RATIO * in_dim {
            Weight::Wide(w)
        } else {
            Weight::Transposed(w.t()?.contiguous()?)
        };
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
}

impl Linear {
    /// The weight's dtype.
    pub fn dtype(&self) -> DType {
        match &self.weight {
            Weight::Trainable(w) | Weight::Transposed(w) | Weight::Wide(w) => w.dtype(),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(1);
        let rows: usize = dims.iter().product();
        let mut x2 = x.reshape((rows, in_dim))?;
        // One row is computed as two: the matrix-vector kernel sums in another order than
        // the matrix kernel, and a row's result must not depend on how many rows share the
        // product (a session's tokens must not depend on its batch).
        if rows == 1 {
            x2 = Tensor::cat(&[&x2, &x2], 0)?;
        }
        let y = match &self.weight {
            Weight::Trainable(w) => x2.matmul(&w.t()?)?,
            Weight::Transposed(wt) => x2.matmul(wt)?,
            Weight::Wide(w) if rows <= FEW_ROWS => w.matmul(&x2.t()?)?.t()?.contiguous()?,
            Weight::Wide(w) => x2.matmul(&w.t()?)?,
        };
        let y = if rows == 1 { y.narrow(0, 0, 1)? } else { y };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        dims.push(y.dim(1)?);
        y.reshape(dims)
    }
}

/// Sinusoidal features of the noise level followed by a two-layer MLP (`sigma_map`).
#[derive(Debug, Clone)]
pub struct TimestepEmbedder {
    fc1: Linear,
    fc2: Linear,
    freqs: Tensor,
}

impl TimestepEmbedder {
    /// Loads `mlp.0` (c, 256) and `mlp.2` (c, c) under `vb`.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let half = FREQUENCY_EMBEDDING_SIZE / 2;
        // f32 arithmetic in the reference's order, so features match it bit for bit.
        let freqs: Vec<f32> = (0..half)
            .map(|k| (-(10000f64.ln()) as f32 * k as f32 / half as f32).exp())
            .collect();
        Ok(Self {
            fc1: Linear::load(vb.pp("mlp.0"), FREQUENCY_EMBEDDING_SIZE, cfg.cond_dim, true)?,
            fc2: Linear::load(vb.pp("mlp.2"), cfg.cond_dim, cfg.cond_dim, true)?,
            freqs: Tensor::from_vec(freqs, (1, half), vb.device())?,
        })
    }

    /// The conditioning vector `silu(mlp(features(sigma)))`, shape (batch, cond_dim), for
    /// `sigma` of shape (batch,).
    pub fn forward(&self, sigma: &Tensor) -> Result<Tensor> {
        let args = sigma
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&self.freqs)?;
        let features = Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?;
        let features = features.to_dtype(self.fc1.dtype())?;
        let hidden = features.apply(&self.fc1)?.silu()?;
        hidden.apply(&self.fc2)?.silu()
    }
}

/// Rotary position tables for arbitrary absolute positions.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f64>,
}

impl Rotary {
    /// Frequencies `10000^(-2j/r)` for head dimension `r`.
    pub fn new(head_dim: usize) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|j| 1.0 / 10000f64.powf(2.0 * j as f64 / head_dim as f64))
            .collect();
        Self { inv_freq }
    }

    /// `(cos, sin)` tables of shape (positions, head_dim / 2).
    ///
    /// Angles are formed in f64: positions far past the training context (long generations
    /// use absolute positions) would otherwise lose the angle's fractional part in f32.
    pub fn tables(
        &self,
        positions: impl Iterator<Item = usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in positions {
            for f in &self.inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let rows = cos.len() / self.inv_freq.len();
        let shape = (rows, self.inv_freq.len());
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Bias-free layer norm with a learned weight (`norm1`, `norm2`, `norm_final`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    zeros: Tensor,
}

impl LayerNorm {
    /// Loads `weight` (d) under `vb`.
    pub fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let zeros = Tensor::zeros(dim, weight.dtype(), weight.device())?;
        Ok(Self { weight, zeros })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.zeros)
    }
}

/// `x * scale1p + shift`, with `scale1p = 1 + scale` and `shift` of shape (batch, 1, d).
fn modulate(x: &Tensor, shift: &Tensor, scale1p: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(scale1p)?.broadcast_add(shift)
}

/// Splits an adaLN projection of `c` into `n` chunks of shape (batch, 1, d) and adds 1 to
/// the scales (chunks 1 and 4), which [`modulate`] takes as `1 + scale`.
fn modulation(ada_ln: &Linear, c: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let m = c.apply(ada_ln)?.unsqueeze(1)?;
    let mut chunks = m.chunk(n, D::Minus1)?;
    for i in [1, 4].into_iter().filter(|&i| i < n) {
        chunks[i] = (&chunks[i] + 1.0)?;
    }
    Ok(chunks)
}

/// What one pass's attention needs beyond the layer's input: rotary tables for the new
/// tokens' positions, an optional additive mask, and the KV caches of earlier blocks.
pub struct AttentionContext<'a> {
    /// Cosine table (new tokens, head_dim / 2), or (batch, new tokens, head_dim / 2) when
    /// the sequences are at different positions.
    pub cos: Tensor,
    /// Sine table, shaped as `cos`.
    pub sin: Tensor,
    /// Additive mask (0 or -inf) of shape (new tokens, keys), broadcast over batch and heads.
    pub mask: Option<Tensor>,
    /// Cached keys and values that the new tokens attend to besides themselves: the caches
    /// of consecutive runs of the batch's sequences, in order, each covering its own batch.
    /// Empty: no cache.
    pub caches: Vec<&'a KvCache>,
}

/// One transformer layer (`blocks.{i}`).
#[derive(Debug, Clone)]
pub struct DitBlock {
    norm1: LayerNorm,
    attn_qkv: Linear,
    attn_out: Linear,
    norm2: LayerNorm,
    mlp_in: Linear,
    mlp_out: Linear,
    ada_ln: Option<Linear>,
    n_heads: usize,
    head_dim: usize,
    index: usize,
}

impl DitBlock {
    /// Loads layer `index` of the backbone from `vb` (already prefixed with `blocks.{index}`).
    pub fn load(vb: VarBuilder, cfg: &Config, index: usize) -> Result<Self> {
        let d = cfg.hidden_dim;
        let ada_ln = if cfg.adaln {
            Some(Linear::load(
                vb.pp("adaLN_modulation"),
                cfg.cond_dim,
                6 * d,
                true,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), d)?,
            attn_qkv: Linear::load(vb.pp("attn_qkv"), d, 3 * d, false)?,
            attn_out: Linear::load(vb.pp("attn_out"), d, d, false)?,
            norm2: LayerNorm::load(vb.pp("norm2"), d)?,
            mlp_in: Linear::load(vb.pp("mlp.0"), d, 4 * d, true)?,
            mlp_out: Linear::load(vb.pp("mlp.2"), 4 * d, d, true)?,
            ada_ln,
            n_heads: cfg.n_heads,
            head_dim: cfg.head_dim(),
            index,
        })
    }

    /// The layer's adaLN modulation for conditioning `c` (batch, cond): shift, 1 + scale
    /// and gate of the attention, then of the MLP, each (batch, 1, d). `None` without adaLN.
    pub fn modulation(&self, c: Option<&Tensor>) -> Result<Option<Vec<Tensor>>> {
        match (&self.ada_ln, c) {
            (Some(ada_ln), Some(c)) => Ok(Some(modulation(ada_ln, c, 6)?)),
            _ => Ok(None),
        }
    }

    /// Runs the layer on `x` (batch, seq, d) with its modulation `m` (see
    /// [`DitBlock::modulation`]); the new tokens' keys (rotated) and values go to the
    /// context's caches, if any. With `keys_only`, the attention and MLP are skipped and
    /// the output is `x` unchanged: a commit pass needs nothing else from the last layer.
    pub fn forward(
        &self,
        x: &Tensor,
        m: Option<&[Tensor]>,
        ctx: &AttentionContext,
        keys_only: bool,
    ) -> Result<Tensor> {
        let mut u = x.apply(&self.norm1)?;
        if let Some(m) = m {
            u = modulate(&u, &m[0], &m[1])?;
        }
        let (q, k, v) = self.qkv(&u, ctx)?;
        if keys_only {
            self.write_pending(ctx, &k, &v)?;
            return Ok(x.clone());
        }
        let attn = self.attend(&q, &k, &v, ctx)?.apply(&self.attn_out)?;
        let x = match m {
            Some(m) => (x + attn.broadcast_mul(&m[2])?)?,
            None => (x + attn)?,
        };
        let mut u = x.apply(&self.norm2)?;
        if let Some(m) = m {
            u = modulate(&u, &m[3], &m[4])?;
        }
        let mlp = ops::gelu(&u.apply(&self.mlp_in)?)?.apply(&self.mlp_out)?;
        match m {
            Some(m) => x + mlp.broadcast_mul(&m[5])?,
            None => x + mlp,
        }
    }

    /// Projects to rotated queries and keys and plain values, each (batch, heads, seq, r).
    fn qkv(&self, u: &Tensor, ctx: &AttentionContext) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = u.dims3()?;
        let qkv = u
            .apply(&self.attn_qkv)?
            .reshape((b, s, 3, self.n_heads, self.head_dim))?;
        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let q = ops::rope(&part(0)?, &ctx.cos, &ctx.sin)?;
        let k = ops::rope(&part(1)?, &ctx.cos, &ctx.sin)?;
        let v = part(2)?.contiguous()?;
        Ok((q, k, v))
    }

    /// Scaled dot-product attention of the new queries over cached plus new keys.
    ///
    /// With several caches the attention is ragged: each run of sequences attends over its
    /// own cache, whatever its length, exactly as it would alone.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, ctx: &AttentionContext) -> Result<Tensor> {
        let (b, _, s, _) = q.dims4()?;
        let out = if ctx.caches.is_empty() {
            self.scaled_attention(q, k, v, ctx.mask.as_ref())?
        } else if let Some(out) = self.attend_on_host(q, k, v, ctx)? {
            out
        } else {
            self.write_pending(ctx, k, v)?;
            let (new, mut at) = (k.dim(2)?, 0);
            let mut outs = Vec::with_capacity(ctx.caches.len());
            for cache in &ctx.caches {
                let n = cache.batch();
                let (keys, values) = cache.keys_values(self.index, new, k.dtype())?;
                let q = q.narrow(0, at, n)?;
                outs.push(self.scaled_attention(&q, &keys, &values, ctx.mask.as_ref())?);
                at += n;
            }
            Tensor::cat(&outs, 0)?
        };
        out.transpose(1, 2)?
            .reshape((b, s, self.n_heads * self.head_dim))
    }

    /// The ragged host kernel's attention over the caches (see [`attention::ragged`]), once
    /// the new keys and values are written to them; `None` where it does not apply (a
    /// mask, not f32 on the host, or a head dimension it does not divide into lanes).
    fn attend_on_host(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &AttentionContext,
    ) -> Result<Option<Tensor>> {
        let host = q.device().is_cpu() && q.dtype() == DType::F32;
        if ctx.mask.is_some() || !host || !self.head_dim.is_multiple_of(attention::LANES) {
            return Ok(None);
        }
        self.write_pending(ctx, k, v)?;
        attention::ragged(q, &ctx.caches, self.index).map(Some)
    }

    /// Writes the new keys and values (batch, heads, new, r) of each run of sequences into
    /// its cache's pending slot.
    fn write_pending(&self, ctx: &AttentionContext, k: &Tensor, v: &Tensor) -> Result<()> {
        let mut at = 0;
        for cache in &ctx.caches {
            let n = cache.batch();
            cache.write_pending(self.index, &k.narrow(0, at, n)?, &v.narrow(0, at, n)?)?;
            at += n;
        }
        Ok(())
    }

    fn scaled_attention(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut scores = (q.matmul(&keys.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        ops::softmax_last_dim(&scores)?.matmul(values)
    }
}

/// The output layer: modulated norm and the vocabulary projection (`output_layer`).
#[derive(Debug, Clone)]
pub struct FinalLayer {
    norm: LayerNorm,
    linear: Linear,
    ada_ln: Option<Linear>,
}

impl FinalLayer {
    /// Loads `norm_final`, `linear` and (with adaLN) `adaLN_modulation` under `vb`.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let d = cfg.hidden_dim;
        let ada_ln = if cfg.adaln {
            Some(Linear::load(
                vb.pp("adaLN_modulation"),
                cfg.cond_dim,
                2 * d,
                true,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm: LayerNorm::load(vb.pp("norm_final"), d)?,
            linear: Linear::load(vb.pp("linear"), d, cfg.vocab_size, true)?,
            ada_ln,
        })
    }

    /// The output modulation for conditioning `c`: shift and 1 + scale, each (batch, 1, d).
    pub fn modulation(&self, c: Option<&Tensor>) -> Result<Option<Vec<Tensor>>> {
        match (&self.ada_ln, c) {
            (Some(ada_ln), Some(c)) => Ok(Some(modulation(ada_ln, c, 2)?)),
            _ => Ok(None),
        }
    }

    /// Logits (batch, seq, vocab) for hidden states `x` (batch, seq, d) and modulation `m`.
    pub fn forward(&self, x: &Tensor, m: Option<&[Tensor]>) -> Result<Tensor> {
        let mut u = x.apply(&self.norm)?;
        if let Some(m) = m {
            u = modulate(&u, &m[0], &m[1])?;
        }
        u.apply(&self.linear)
    }
}
