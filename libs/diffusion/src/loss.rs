//! The forward (noising) process and the block diffusion NELBO.

use bd3lm_model::Bd3lm;
use candle_core::{D, DType, Device, Tensor};
use rand::Rng;

use crate::schedule::Interval;
use crate::{Error, NoiseSchedule, Result, subs};

/// Most re-draws of one block's mask when resampling into the clipped interval.
const MAX_RESAMPLES: usize = 1000;

/// How clean sequences are noised for training: a noise level per block, shared by its
/// tokens, and tokens masked independently with the schedule's probability.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseProcess {
    /// Masking schedule.
    pub schedule: NoiseSchedule,
    /// Interval `t` is drawn from (the clipped schedule).
    pub interval: Interval,
    /// Block length `L'`; 1 trains the autoregressive special case.
    pub block_size: usize,
    /// Id written at masked positions.
    pub mask_id: u32,
    /// Stratify `t` over the batch x blocks grid.
    pub antithetic: bool,
    /// Re-draw a block whose masked fraction falls outside a clipped interval.
    pub resample: bool,
    /// Keep the first token (BOS) clean.
    pub ignore_bos: bool,
}

/// A noised batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Noised {
    /// Noised tokens, row-major (batch, n).
    pub xt: Vec<u32>,
    /// Noise level of each token (that of its block), row-major (batch, n).
    pub t: Vec<f32>,
    /// Sigma per row fed to a time-conditioned network: `-ln(1 - p)` of its first block.
    pub sigma: Vec<f32>,
}

impl NoiseProcess {
    /// The defaults of the paper for a model with `block_size` and `mask_id`.
    pub fn new(block_size: usize, mask_id: u32) -> Self {
        Self {
            schedule: NoiseSchedule::LogLinear,
            interval: Interval::default(),
            block_size,
            mask_id,
            antithetic: true,
            resample: true,
            ignore_bos: true,
        }
    }

    /// Noise levels for `count` blocks: `t_k = (u_k / K + k / K) mod 1` when antithetic,
    /// then scaled into the interval.
    pub fn sample_t(&self, count: usize, rng: &mut impl Rng) -> Vec<f64> {
        (0..count)
            .map(|k| {
                let u: f64 = rng.random();
                let u = if self.antithetic {
                    (u / count as f64 + k as f64 / count as f64) % 1.0
                } else {
                    u
                };
                self.interval.scale(u)
            })
            .collect()
    }

    /// Noises `x0` (batch, n), row-major. With block size 1 every token is masked at
    /// `t = 1`: the loss is then the exact autoregressive NLL.
    pub fn corrupt(
        &self,
        x0: &[u32],
        batch: usize,
        n: usize,
        rng: &mut impl Rng,
    ) -> Result<Noised> {
        if x0.len() != batch * n || n == 0 || !n.is_multiple_of(self.block_size) {
            return Err(Error::Param {
                name: "x0",
                reason: format!(
                    "expected {batch} rows of a multiple of {} tokens, found {} tokens",
                    self.block_size,
                    x0.len()
                ),
            });
        }
        let blocks = n / self.block_size;
        let t = if self.block_size == 1 {
            vec![1.0; batch * blocks]
        } else {
            self.sample_t(batch * blocks, rng)
        };
        let mut xt = x0.to_vec();
        for (k, (chunk, src)) in xt
            .chunks_mut(self.block_size)
            .zip(x0.chunks(self.block_size))
            .enumerate()
        {
            self.mask_block(chunk, src, self.schedule.move_chance(t[k]), rng);
        }
        if self.ignore_bos {
            for row in 0..batch {
                xt[row * n] = x0[row * n];
            }
        }
        let t_tokens: Vec<f32> = (0..batch * n)
            .map(|i| t[i / self.block_size] as f32)
            .collect();
        let sigma = (0..batch)
            .map(|row| {
                (-(1.0 - self.schedule.move_chance(t[row * blocks]))
                    .max(1e-6)
                    .ln()) as f32
            })
            .collect();
        Ok(Noised {
            xt,
            t: t_tokens,
            sigma,
        })
    }

    /// Masks each token of `block` with probability `p`; with resampling, re-draws while
    /// the masked fraction is outside a clipped bound (bounds at their defaults, 1e-3 and
    /// 1, are not enforced, as in the reference) and some fraction could satisfy it.
    fn mask_block(&self, block: &mut [u32], src: &[u32], p: f64, rng: &mut impl Rng) {
        let len = block.len();
        let low = if self.interval.min > 1e-3 {
            self.interval.min
        } else {
            f64::NEG_INFINITY
        };
        let high = if self.interval.max < 1.0 {
            self.interval.max
        } else {
            f64::INFINITY
        };
        let reachable = (0..=len).any(|m| (low..=high).contains(&(m as f64 / len as f64)));
        for _ in 0..MAX_RESAMPLES {
            let mut masked = 0;
            for (x, &s) in block.iter_mut().zip(src) {
                let hit = rng.random::<f64>() < p;
                *x = if hit { self.mask_id } else { s };
                masked += hit as usize;
            }
            let fraction = masked as f64 / len as f64;
            if !self.resample || !reachable || (low..=high).contains(&fraction) {
                return;
            }
        }
    }
}

/// NELBO terms of one batch.
#[derive(Debug, Clone)]
pub struct Nelbo {
    /// Per-token loss (batch, n).
    pub token_loss: Tensor,
    /// Mean over the positions of the loss mask: the training objective, differentiable.
    pub loss: Tensor,
}

/// Runs the vectorised training pass on `[x_t ; x_0]` and returns the NELBO with its mean
/// over `loss_mask` (batch, n) (all tokens for training, [`eval_mask`] for the bound).
pub fn nelbo(
    model: &Bd3lm,
    x0: &Tensor,
    noised: &Noised,
    schedule: NoiseSchedule,
    loss_mask: &Tensor,
) -> Result<Nelbo> {
    let (b, n) = x0.dims2()?;
    let device = model.device();
    let xt = Tensor::from_slice(&noised.xt, (b, n), device)?;
    let t = Tensor::from_slice(&noised.t, (b, n), device)?;
    let sigma = Tensor::from_slice(&noised.sigma, b, device)?;
    let logits = model.forward_train(&Tensor::cat(&[&xt, x0], 1)?, &sigma)?;
    let log_probs = subs::log_probs(&logits, &xt, model.config().mask_id())?;
    let token_loss = token_loss(&log_probs, x0, &t, schedule)?;
    let loss = ((&token_loss * loss_mask)?.sum_all()?
        / loss_mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?;
    Ok(Nelbo { token_loss, loss })
}

/// Per-token NELBO (batch, seq): `loss_scale(t) * log p(x0 | xt)` from SUBS log-probs
/// (batch, seq, vocab), clean tokens `x0` (batch, seq, u32) and noise levels `t`
/// (batch, seq). Positions that were not masked contribute 0: SUBS puts all their mass on
/// the clean token.
pub fn token_loss(
    log_probs: &Tensor,
    x0: &Tensor,
    t: &Tensor,
    schedule: NoiseSchedule,
) -> Result<Tensor> {
    let log_p = log_probs
        .gather(&x0.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let t = t.to_dtype(DType::F64)?;
    let scale = t.to_vec2::<f64>()?;
    let scale: Vec<f32> = scale
        .iter()
        .flatten()
        .map(|&t| schedule.loss_scale(t) as f32)
        .collect();
    let scale = Tensor::from_vec(scale, t.shape(), t.device())?;
    Ok((log_p.to_dtype(DType::F32)? * scale)?)
}

/// The evaluation mask (batch, seq) of the perplexity bound: 1 everywhere except the first
/// token, which is always given (BOS).
pub fn eval_mask(batch: usize, seq: usize, device: &Device) -> Result<Tensor> {
    let row: Vec<f32> = (0..seq).map(|i| if i == 0 { 0.0 } else { 1.0 }).collect();
    Ok(Tensor::from_vec(row, (1, seq), device)?.repeat((batch, 1))?)
}

/// Mean of `loss` (batch, seq) over the positions where `mask` (batch, seq) is 1: the NLL
/// per token, whose exponential is the perplexity bound.
pub fn mean_over(loss: &Tensor, mask: &Tensor) -> Result<f64> {
    let total = (loss * mask)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let count = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(total / count.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashMap;

    fn fixture() -> HashMap<String, Tensor> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/data/reference-bd3lm-bs4/fixtures.safetensors"
        );
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// From the reference's own logits, SUBS and every NELBO term match to 1e-5.
    #[test]
    fn reproduces_the_reference_loss_terms() {
        let f = fixture();
        let ids = |k: &str| f[k].to_dtype(DType::U32).unwrap();
        let (x0, xt) = (ids("x0"), ids("xt"));
        let log_probs = subs::log_probs(&f["train_logits"], &xt, 1023).unwrap();
        assert!(max_diff(&log_probs, &f["subs_logprobs"]) <= 1e-5);
        let loss = token_loss(&log_probs, &x0, &f["t"], NoiseSchedule::LogLinear).unwrap();
        assert!(max_diff(&loss, &f["nelbo_loss"]) <= 1e-5);
        let (b, n) = x0.dims2().unwrap();
        let mask = eval_mask(b, n, &Device::Cpu).unwrap();
        assert_eq!(max_diff(&mask, &f["nelbo_attention_mask"]), 0.0);
        assert!(max_diff(&(&loss * &mask).unwrap(), &f["nelbo_nlls"]) <= 1e-5);
        let mean = mean_over(&loss, &mask).unwrap();
        let reference = f["nelbo_token_nll"].to_vec1::<f32>().unwrap()[0] as f64;
        assert!((mean - reference).abs() <= 1e-5, "{mean} vs {reference}");
    }

    #[test]
    fn antithetic_levels_cover_every_stratum_of_the_interval() {
        let mut process = NoiseProcess::new(4, 9);
        process.interval = Interval::new(0.2, 0.6).unwrap();
        let t = process.sample_t(8, &mut ChaCha8Rng::seed_from_u64(1));
        for (k, &t) in t.iter().enumerate() {
            let u = (t - 0.2) / 0.4;
            assert!(u >= k as f64 / 8.0 && u < (k + 1) as f64 / 8.0, "{k}: {t}");
        }
    }

    #[test]
    fn corruption_shares_t_per_block_keeps_bos_and_resamples_into_the_interval() {
        let mut process = NoiseProcess::new(4, 99);
        process.interval = Interval::new(0.3, 0.8).unwrap();
        let x0: Vec<u32> = (0..2 * 32).map(|i| (i % 50) as u32).collect();
        let noised = process
            .corrupt(&x0, 2, 32, &mut ChaCha8Rng::seed_from_u64(2))
            .unwrap();
        assert_eq!((noised.xt[0], noised.xt[32]), (x0[0], x0[32]));
        for (k, block) in noised.xt.chunks(4).enumerate() {
            assert!(
                noised.t[4 * k..4 * k + 4]
                    .iter()
                    .all(|&t| t == noised.t[4 * k])
            );
            let masked = block.iter().filter(|&&x| x == 99).count() as f64 / 4.0;
            if k % 8 != 0 {
                assert!((0.3..=0.8).contains(&masked), "block {k}: {masked}");
            }
            for (j, &x) in block.iter().enumerate() {
                assert!(x == 99 || x == x0[4 * k + j]);
            }
        }
    }

    /// Block size 1 masks everything at t = 1 (scale -1): the loss is the AR NLL.
    #[test]
    fn block_size_one_is_the_autoregressive_likelihood() {
        let process = NoiseProcess::new(1, 99);
        let x0: Vec<u32> = (0..16).collect();
        let noised = process
            .corrupt(&x0, 1, 16, &mut ChaCha8Rng::seed_from_u64(3))
            .unwrap();
        assert_eq!(noised.xt[0], 0);
        assert!(noised.xt[1..].iter().all(|&x| x == 99));
        assert!(noised.t.iter().all(|&t| t == 1.0));
        assert_eq!(NoiseSchedule::LogLinear.loss_scale(1.0), -1.0);
    }

    #[test]
    fn nelbo_of_a_model_is_finite_and_positive() {
        let cfg = bd3lm_model::Config::new(bd3lm_model::Shape {
            vocab_size: 64,
            model_length: 16,
            block_size: 4,
            backbone: bd3lm_model::Backbone::TOY,
        });
        let model =
            bd3lm_model::checkpoint::random_model(&cfg, 0.1, 1, DType::F32, &Device::Cpu).unwrap();
        let x0: Vec<u32> = (0..32).map(|i| (i * 5 % 60) as u32).collect();
        let noised = NoiseProcess::new(4, 63)
            .corrupt(&x0, 2, 16, &mut ChaCha8Rng::seed_from_u64(4))
            .unwrap();
        let x0 = Tensor::from_vec(x0, (2, 16), &Device::Cpu).unwrap();
        let mask = eval_mask(2, 16, &Device::Cpu).unwrap();
        let out = nelbo(&model, &x0, &noised, NoiseSchedule::LogLinear, &mask).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{loss}");
    }
}
