//! The block diffusion NELBO.

use candle_core::{D, DType, Tensor};

use crate::{NoiseSchedule, Result};

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
pub fn eval_mask(batch: usize, seq: usize, device: &candle_core::Device) -> Result<Tensor> {
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
