//! Tensor operations with a fused kernel for inference and a differentiable composite
//! for training.
//!
//! candle's fused kernels (layer norm, softmax, rotary) have no backward pass. Each op here
//! takes the fused path when no gradient flows through its input and the composite path
//! otherwise, so one network definition serves sampling and training.

use candle_core::{D, DType, Device, Result, Storage, Tensor, WithDType};

use crate::host;

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

/// GELU with the tanh approximation, as the reference's MLP computes it.
///
/// On the host in f32 it is one vectorised loop: `0.5 x (1 + tanh(u))` is
/// `x / (1 + e^(-2u))`, and [`host::exp`] is branch-free, where candle's kernel calls `tanhf`
/// element by element (a twentieth of a batched pass went there).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    if x.track_op() || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return x.gelu();
    }
    let x = x.contiguous()?;
    let out: Vec<f32> = with_host_f32(&x, |v| {
        v.iter()
            .map(|&v| {
                let u = SQRT_TWO_OVER_PI * v * (1.0 + 0.044_715 * v * v);
                v / (1.0 + host::exp(-2.0 * u))
            })
            .collect()
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

/// Calls `f` with the elements of `x`, a contiguous f32 tensor on the host.
pub(crate) fn with_host_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_host(x, 0..x.elem_count(), f)
}

/// Calls `f` with elements `span` of `x`, a contiguous tensor of `T` on the host.
pub(crate) fn with_host<T: WithDType, R>(
    x: &Tensor,
    span: std::ops::Range<usize>,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a tensor on the host")
    };
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor")
    };
    let span = start + span.start..start + span.end;
    match cpu.as_slice::<T>()?.get(span.clone()) {
        Some(elements) => Ok(f(elements)),
        None => candle_core::bail!("elements {span:?} out of range"),
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
        let g = gelu(&x).unwrap();
        assert!(max_diff(&g, &gelu(tracked.as_tensor()).unwrap()) < 1e-6);
    }

    /// The host GELU stays within 1e-6 of candle's (relative where it is large).
    #[test]
    fn host_gelu_matches_candle() {
        let x: Vec<f32> = (0..20_001).map(|i| (i as f32 - 10_000.0) / 800.0).collect();
        let x = Tensor::from_vec(x, 20_001, &Device::Cpu).unwrap();
        let (want, got) = (x.gelu().unwrap(), gelu(&x).unwrap());
        let diff = (&got - &want).unwrap().abs().unwrap();
        let bound = (want.abs().unwrap() * 1e-6)
            .unwrap()
            .clamp(1e-6, f32::MAX)
            .unwrap();
        let over = diff.gt(&bound).unwrap().to_dtype(DType::F32).unwrap();
        let over = over.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(over, 0.0, "gelu differs from candle's beyond 1e-6");
    }
}
