//! Attention masks of block diffusion.
//!
//! Masks are additive: 0 where a query may attend a key, `-inf` elsewhere.

use candle_core::{DType, Device, Result, Tensor};

/// Whether query `i` may attend key `j` in the vectorised training pass over `[x_t ; x_0]`
/// of length `2n` with blocks of `block_size` tokens.
///
/// The union of three masks: block diagonal (same block, same half), offset block-causal
/// (a noisy block sees the clean copies of earlier blocks) and block-causal (a clean block
/// sees clean blocks up to itself).
pub fn train_allows(i: usize, j: usize, n: usize, block_size: usize) -> bool {
    let (clean_q, clean_k) = (i >= n, j >= n);
    let (bq, bk) = ((i % n) / block_size, (j % n) / block_size);
    let block_diagonal = bq == bk && clean_q == clean_k;
    let offset_block_causal = bq > bk && clean_k && !clean_q;
    let block_causal = bq >= bk && clean_k && clean_q;
    block_diagonal || offset_block_causal || block_causal
}

/// The (2n, 2n) training mask.
pub fn train_mask(n: usize, block_size: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let len = 2 * n;
    additive(
        len,
        len,
        |i, j| train_allows(i, j, n, block_size),
        dtype,
        device,
    )
}

/// Mask of `new` tokens that follow `prefix` cached tokens: every new token sees the whole
/// prefix, and new token `i` sees new token `j` when `j`'s block is not after `i`'s.
/// Shape (new, prefix + new).
pub fn block_causal_mask(
    prefix: usize,
    new: usize,
    block_size: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    additive(
        new,
        prefix + new,
        |i, j| j < prefix || (j - prefix) / block_size <= i / block_size,
        dtype,
        device,
    )
}

fn additive(
    rows: usize,
    cols: usize,
    allows: impl Fn(usize, usize) -> bool,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let data: Vec<f32> = (0..rows * cols)
        .map(|ij| {
            if allows(ij / cols, ij % cols) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Tensor::from_vec(data, (rows, cols), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask written out from the paper's definition with explicit halves and blocks,
    /// for block sizes 1 (AR), 2, 4, 8 and n (MDLM).
    #[test]
    fn training_mask_matches_the_paper_for_several_block_sizes() {
        let n = 16;
        for bs in [1, 2, 4, 8, 16] {
            for i in 0..2 * n {
                for j in 0..2 * n {
                    let (qi, kj) = (i % n, j % n);
                    let expected = match (i >= n, j >= n) {
                        (false, false) => qi / bs == kj / bs,
                        (false, true) => kj / bs < qi / bs,
                        (true, false) => false,
                        (true, true) => kj / bs <= qi / bs,
                    };
                    assert_eq!(train_allows(i, j, n, bs), expected, "bs {bs} i {i} j {j}");
                }
            }
        }
    }

    #[test]
    fn block_size_one_clean_half_is_causal_and_n_is_bidirectional() {
        let n = 8;
        for i in n..2 * n {
            for j in n..2 * n {
                assert_eq!(train_allows(i, j, n, 1), j <= i);
                assert!(train_allows(i, j, n, n));
            }
        }
    }

    #[test]
    fn block_causal_mask_sees_prefix_and_earlier_blocks() {
        let m = block_causal_mask(3, 6, 2, DType::F32, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let allowed: Vec<Vec<u8>> = m
            .iter()
            .map(|r| r.iter().map(|&x| (x == 0.0) as u8).collect())
            .collect();
        assert_eq!(allowed[0], [1, 1, 1, 1, 1, 0, 0, 0, 0]);
        assert_eq!(allowed[3], [1, 1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(allowed[5], [1; 9]);
    }
}
