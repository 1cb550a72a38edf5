//! Tensor operations with a fused kernel for inference and a differentiable composite
//! for training.
//!
//! candle's fused kernels (layer norm, softmax, rotary) have no backward pass. Each op here
//! takes the fused path when no gradient flows through its input and the composite path
//! otherwise, so one network definition serves sampling and training.

use candle_core::{D, DType, Result, Tensor};

/// Layer norm without bias and without its own affine (eps 1e-5), computed in f32 and cast
/// back, then multiplied by `weight`. `zeros` is a zero vector of the same width: the bias
/// slot of the fused kernel.
pub fn layer_norm(x: &Tensor, weight: &Tensor, zeros: &Tensor) -> Result<Tensor> {
    const EPS: f64 = 1e-5;
    let dtype = x.dtype();
    if dtype == DType::F32 && !x.track_op() && !weight.track_op() {
        return candle_nn::ops::layer_norm(&x.contiguous()?, weight, zeros, EPS as f32);
    }
    let xf = x.to_dtype(DType::F32)?;
    let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + EPS)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Half-split rotary embedding of `x` (batch, heads, seq, head_dim) with tables
/// `cos`, `sin` of shape (seq, head_dim / 2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::rotary_emb::rope_slow(x, cos, sin)
    } else {
        candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;
    use candle_core::{Device, Var};

    fn sample(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 1.5)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The fused and the differentiable paths compute the same function.
    #[test]
    fn fused_and_composite_paths_agree() {
        let x = sample(&[2, 3, 5, 8]);
        let tracked = Var::from_tensor(&x).unwrap();
        let w = sample(&[8]);
        let zeros = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
        let ln = layer_norm(&x, &w, &zeros).unwrap();
        assert!(max_diff(&ln, &layer_norm(tracked.as_tensor(), &w, &zeros).unwrap()) < 1e-5);
        let sm = softmax_last_dim(&x).unwrap();
        assert!(max_diff(&sm, &softmax_last_dim(tracked.as_tensor()).unwrap()) < 1e-6);
        let cos = sample(&[5, 4]).cos().unwrap();
        let sin = sample(&[5, 4]).sin().unwrap();
        let r = rope(&x, &cos, &sin).unwrap();
        assert!(max_diff(&r, &rope(tracked.as_tensor(), &cos, &sin).unwrap()) < 1e-6);
    }
}
