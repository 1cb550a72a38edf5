//! The perplexity bound on held-out rows, and the data-driven clipped-schedule search
//! that reuses the same passes.

use std::path::Path;

use bd3lm_diffusion::loss::{self, NoiseProcess};
use bd3lm_diffusion::schedule::Interval;
use bd3lm_model::Bd3lm;
use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::data::{Loader, Position, Split};

/// The NELBO of held-out data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    /// Mean negative log-likelihood bound per token (nats), first token excluded.
    pub nll: f64,
    /// `exp(nll)`: the perplexity bound.
    pub ppl: f64,
    /// Tokens it is averaged over.
    pub tokens: usize,
}

/// The loss of one block of a held-out pass at its noise level, for the clipped-schedule
/// search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockLoss {
    /// The block's noise level.
    pub t: f64,
    /// Its per-token loss, averaged over the block.
    pub loss: f64,
}

/// The perplexity bound of `model` on the validation rows of the shard directory `data`:
/// `batches` batches (at most, and by default, the whole split) of `batch` rows (fewer when the split is
/// smaller), read in file order, with `t` over the paper's evaluation interval
/// `[1e-3, 1]` (antithetic) and noise drawn from `seed`, so repeated evaluations are
/// comparable. Each block's loss is pushed to `blocks` when given.
pub fn perplexity_bound(
    model: &Bd3lm,
    data: &Path,
    batches: Option<usize>,
    batch: usize,
    seed: u64,
    mut blocks: Option<&mut Vec<BlockLoss>>,
) -> Result<Bound> {
    let block_size = model.config().block_size;
    let (mut total, mut count) = (0.0, 0usize);
    let passes = HeldOut::open(data, batches, batch)?;
    passes.run(model, Interval::default(), seed, |pass| {
        total += pass.sum;
        count += pass.tokens;
        if let Some(blocks) = blocks.as_deref_mut() {
            let token_loss = pass.token_loss.flatten_all()?.to_vec1::<f32>()?;
            for (k, chunk) in token_loss.chunks(block_size).enumerate() {
                blocks.push(BlockLoss {
                    t: pass.t[k * block_size] as f64,
                    loss: chunk.iter().map(|&l| l as f64).sum::<f64>() / block_size as f64,
                });
            }
        }
        Ok(())
    })?;
    let nll = total / count.max(1) as f64;
    Ok(Bound {
        nll,
        ppl: nll.exp(),
        tokens: count,
    })
}

/// How much the training objective's estimate varies from batch to batch: the variance
/// the paper's clipped schedules are chosen to lower.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveVariance {
    /// Interval the noise levels were drawn from.
    pub eps_min: f64,
    /// Its upper end.
    pub eps_max: f64,
    /// Batches estimated.
    pub batches: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// Mean over batches of the per-token NELBO estimate.
    pub mean: f64,
    /// Sample variance over batches of that estimate.
    pub variance: f64,
}

/// The variance over `batches` held-out batches of `batch` rows of the per-token NELBO
/// estimate with `t` drawn from `interval`, as a training step draws it (antithetic over
/// each batch's blocks).
pub fn objective_variance(
    model: &Bd3lm,
    data: &Path,
    batches: usize,
    batch: usize,
    seed: u64,
    interval: Interval,
) -> Result<ObjectiveVariance> {
    let mut estimates = Vec::with_capacity(batches);
    let passes = HeldOut::open(data, Some(batches), batch)?;
    let (batches, batch) = (passes.batches, passes.batch);
    passes.run(model, interval, seed, |pass| {
        estimates.push(pass.sum / pass.tokens.max(1) as f64);
        Ok(())
    })?;
    let mean = estimates.iter().sum::<f64>() / estimates.len().max(1) as f64;
    let spread: f64 = estimates.iter().map(|e| (e - mean).powi(2)).sum();
    Ok(ObjectiveVariance {
        eps_min: interval.min,
        eps_max: interval.max,
        batches,
        batch_size: batch,
        mean,
        variance: spread / (estimates.len().max(2) - 1) as f64,
    })
}

/// Batches of held-out rows, read in file order.
struct HeldOut {
    loader: Loader,
    batches: usize,
    batch: usize,
}

/// The losses of one held-out batch.
struct Pass {
    /// Per-token loss (batch, n), zero at the excluded first token of each row.
    token_loss: Tensor,
    /// Noise level of each token.
    t: Vec<f32>,
    /// Sum of `token_loss`.
    sum: f64,
    /// Tokens it counts.
    tokens: usize,
}

impl HeldOut {
    /// `batches` (at most, and by default, the whole split) of `batch` rows (fewer when
    /// the split is smaller).
    fn open(data: &Path, batches: Option<usize>, batch: usize) -> Result<Self> {
        let loader = Loader::open(data, Split::Validation, None, Position::default())?;
        let batch = batch.min(loader.rows()).max(1);
        let batches = batches
            .unwrap_or(usize::MAX)
            .min(loader.rows() / batch)
            .max(1);
        Ok(Self {
            loader,
            batches,
            batch,
        })
    }

    /// Runs `model` over every batch with noise levels from `interval` and noise drawn
    /// from `seed`, giving each batch's losses to `each`.
    fn run(
        mut self,
        model: &Bd3lm,
        interval: Interval,
        seed: u64,
        mut each: impl FnMut(Pass) -> Result<()>,
    ) -> Result<()> {
        let cfg = model.config();
        let (batch, n) = (self.batch, self.loader.index().row_length);
        let mut process = NoiseProcess::new(cfg.block_size, cfg.mask_id());
        process.interval = interval;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let device = model.device();
        let mask = loss::eval_mask(batch, n, device)?;
        for _ in 0..self.batches {
            let ids = self.loader.next_batch(batch)?;
            let noised = process.corrupt(&ids, batch, n, &mut rng)?;
            let x0 = Tensor::from_vec(ids, (batch, n), device)?;
            let out = loss::nelbo(model, &x0, &noised, process.schedule, &mask)?;
            let token_loss = (&out.token_loss * &mask)?;
            let sum = token_loss
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            each(Pass {
                token_loss,
                t: noised.t,
                sum,
                tokens: batch * (n - 1),
            })?;
        }
        Ok(())
    }
}

/// The grid of the clipped-schedule search: interval widths, and starts in steps of
/// `stride` with the interval inside [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct ClipGrid {
    /// Interval widths tried.
    pub widths: Vec<f64>,
    /// Spacing of the starts.
    pub stride: f64,
    /// Fewest block losses an interval needs for its variance to count.
    pub min_samples: usize,
}

impl Default for ClipGrid {
    /// The paper's grid: widths 0.5 to 1 by 0.1, starts by 0.05.
    fn default() -> Self {
        Self {
            widths: vec![0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
            stride: 0.05,
            min_samples: 32,
        }
    }
}

/// The clipped interval with the least variance of the block losses whose noise level
/// falls inside it: blocks with `t` in `[s, s + w]` are draws of `t ~ U[s, s + w]`, so one
/// set of passes over `[1e-3, 1]` serves every interval of the grid. Returns the interval
/// and its variance, or `None` when no interval has enough samples.
pub fn clipped_interval(blocks: &[BlockLoss], grid: &ClipGrid) -> Option<(Interval, f64)> {
    let mut best: Option<(Interval, f64)> = None;
    for &w in &grid.widths {
        let starts = ((1.0 - w) / grid.stride + 1e-9).floor() as usize;
        for i in 0..=starts {
            let s = i as f64 * grid.stride;
            let hi = (s + w).min(1.0);
            let Ok(interval) = Interval::new(s.max(1e-3), hi) else {
                continue;
            };
            let losses: Vec<f64> = blocks
                .iter()
                .filter(|b| interval.contains(b.t))
                .map(|b| b.loss)
                .collect();
            if losses.len() < grid.min_samples.max(2) {
                continue;
            }
            let mean = losses.iter().sum::<f64>() / losses.len() as f64;
            let var =
                losses.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (losses.len() - 1) as f64;
            if best.is_none_or(|(_, v)| var < v) {
                best = Some((interval, var));
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{counting_docs, shards, word_config};
    use bd3lm_model::checkpoint;
    use candle_core::Device;
    use rand::Rng;

    /// The per-batch estimates average to the bound when drawn alike, and spread far less
    /// on a clipped interval, where no block's loss is scaled by `1/t` for a tiny `t`.
    #[test]
    fn the_objective_varies_less_on_a_clipped_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = shards(dir.path(), &counting_docs(20, 60), 16, 2);
        let cfg = word_config(16, 4);
        let weights = checkpoint::init_weights(&cfg, 3).unwrap();
        let model = checkpoint::from_weights(&cfg, weights, DType::F32, &Device::Cpu).unwrap();
        let bound = perplexity_bound(&model, &data, Some(8), 2, 7, None).unwrap();
        let full = objective_variance(&model, &data, 8, 2, 7, Interval::default()).unwrap();
        assert_eq!((full.batches, full.batch_size), (8, 2));
        assert!((full.mean - bound.nll).abs() < 1e-9, "{full:?} {bound:?}");
        let clipped = Interval::new(0.5, 1.0).unwrap();
        let clipped = objective_variance(&model, &data, 8, 2, 7, clipped).unwrap();
        assert!(
            clipped.variance * 4.0 < full.variance,
            "{clipped:?} against {full:?}"
        );
    }

    /// Losses whose spread is small only for t in [0.4, 0.9]: the search finds that band.
    #[test]
    fn the_search_picks_the_interval_of_least_variance() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let blocks: Vec<BlockLoss> = (0..20000)
            .map(|_| {
                let t: f64 = rng.random();
                let spread = if (0.4..=0.9).contains(&t) { 0.1 } else { 3.0 };
                BlockLoss {
                    t,
                    loss: 2.0 + spread * (rng.random::<f64>() - 0.5),
                }
            })
            .collect();
        let (interval, var) = clipped_interval(&blocks, &ClipGrid::default()).unwrap();
        assert!((interval.min - 0.4).abs() < 1e-9, "{interval:?}");
        assert!((interval.max - 0.9).abs() < 1e-9, "{interval:?}");
        assert!(var < 0.01, "{var}");
        assert!(clipped_interval(&blocks[..10], &ClipGrid::default()).is_none());
    }
}
