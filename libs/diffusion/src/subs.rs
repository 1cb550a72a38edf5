//! The SUBS parameterisation: the model never predicts `[MASK]`, and tokens that are not
//! masked are copied.

use candle_core::{D, DType, Device, Tensor};

use crate::Result;

/// The log-probability standing in for `-inf`, as in the reference.
pub const NEG_INFINITY: f64 = -1e6;

/// Log-probabilities (batch, seq, vocab) in f32 from `logits` given the noised input `xt`
/// (batch, seq, u32): `-1e6` is added at the mask id, the logits are log-normalised, and
/// every position whose input is not `[MASK]` becomes a point mass on its input token
/// (0 there, `-1e6` elsewhere).
///
/// The arithmetic follows the reference's order in f32, so its values are reproduced to
/// rounding, the `-1e6` entries included.
pub fn log_probs(logits: &Tensor, xt: &Tensor, mask_id: u32) -> Result<Tensor> {
    let (_, _, vocab) = logits.dims3()?;
    let device = logits.device();
    let logits = logits
        .to_dtype(DType::F32)?
        .broadcast_add(&mask_bias(vocab, mask_id, device)?)?;
    let lse = logits.log_sum_exp(D::Minus1)?.unsqueeze(D::Minus1)?;
    let log_probs = logits.broadcast_sub(&lse)?;
    let point_mass =
        ((candle_nn::encoding::one_hot(xt.clone(), vocab, 1f32, 0f32)? - 1.0)? * -NEG_INFINITY)?;
    let unmasked = xt
        .ne(mask_id)?
        .unsqueeze(D::Minus1)?
        .broadcast_as(log_probs.shape())?;
    Ok(unmasked.where_cond(&point_mass, &log_probs)?)
}

/// A (vocab,) row with `-1e6` at the mask id and 0 elsewhere.
fn mask_bias(vocab: usize, mask_id: u32, device: &Device) -> Result<Tensor> {
    let mut bias = vec![0f32; vocab];
    if let Some(b) = bias.get_mut(mask_id as usize) {
        *b = NEG_INFINITY as f32;
    }
    Ok(Tensor::from_vec(bias, vocab, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_rows_normalise_without_mask_and_clean_rows_copy() {
        let logits = Tensor::new(
            &[[[1f32, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]]],
            &Device::Cpu,
        )
        .unwrap();
        let xt = Tensor::new(&[[3u32, 1]], &Device::Cpu).unwrap();
        let lp = log_probs(&logits, &xt, 3)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let p: Vec<f32> = lp[0][0].iter().map(|x| x.exp()).collect();
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(p[3], 0.0);
        assert!(p[2] > p[1] && p[1] > p[0]);
        assert_eq!(lp[0][1], [-1e6, 0.0, -1e6, -1e6]);
    }
}
