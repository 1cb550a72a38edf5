//! Attention over the KV caches of many sequences in one call on the host (ragged: every
//! sequence attends over its own cache, whatever its length).
//!
//! candle's ops would take about seven calls per sequence and layer (two products, scale,
//! softmax, their buffers), and at a batch of eight blocks that was a quarter of a pass;
//! here a layer is one parallel loop. Each sequence's result is computed by the same
//! loop in the same order whatever else is in the call, so a sequence gets the same bits
//! alone or in any batch.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use crate::kv_cache::KvCache;
use crate::ops;

/// Scaled dot-product attention of the new queries `q` (batch, heads, s, head_dim) of each
/// sequence over the live keys of its cache at `layer` followed by its `s` pending ones
/// (already written), unmasked: a block sees itself and everything before it. `q` holds
/// f32 on the host, the caches f32, bf16 (each element widened to f32 as it is read, see
/// [`Widen`]) or f16 (widened head by head), and the head dimension is a multiple of
/// [`LANES`].
pub(crate) fn ragged(q: &Tensor, caches: &[&KvCache], layer: usize) -> Result<Tensor> {
    let (b, heads, s, r) = q.dims4()?;
    let q = q.contiguous()?;
    // Every sequence's cache, its index in that cache and its key count.
    let mut seqs = Vec::with_capacity(b);
    for cache in caches {
        for j in 0..cache.batch() {
            seqs.push((*cache, j, cache.len() + s));
        }
    }
    if seqs.len() != b {
        candle_core::bail!("queries of {b} sequences for caches of {}", seqs.len());
    }
    let scale = 1.0 / (r as f32).sqrt();
    let mut out = vec![0f32; b * heads * s * r];
    ops::with_host_f32(&q, |q| {
        out.par_chunks_mut(s * r)
            .zip(q.par_chunks(s * r))
            .enumerate()
            .try_for_each(|(unit, (out, q))| {
                let (cache, j, keys) = seqs[unit / heads];
                let head = unit % heads;
                let (kb, vb, start) = cache.layer_buffers(layer);
                let capacity = kb.dim(2)?;
                // Shared tokens first (a cache of one sequence), then the cache's own.
                let shared = cache.shared_buffers(layer).map(|(k, v, taken)| {
                    let at = (head * k.dims()[2] + taken.start) * r;
                    (k, v, at..at + taken.len() * r)
                });
                let own = keys - shared.as_ref().map_or(0, |(_, _, s)| s.len() / r);
                let at = ((j * heads + head) * capacity + start) * r;
                let unit = Unit {
                    keys: kb,
                    values: vb,
                    span: at..at + own * r,
                    shared,
                    r,
                    scale,
                };
                match kb.dtype() {
                    DType::BF16 => unit.attend::<half::bf16>(q, out),
                    DType::F16 => unit.attend_f16(q, out),
                    _ => unit.attend::<f32>(q, out),
                }
            })
    })??;
    Tensor::from_vec(out, (b, heads, s, r), &Device::Cpu)
}

/// One head of one sequence in a cache's buffers: its keys and values are elements
/// `span` of `keys` and `values`, after elements of the shared buffers when it has them.
struct Unit<'a> {
    keys: &'a Tensor,
    values: &'a Tensor,
    span: std::ops::Range<usize>,
    shared: Option<(&'a Tensor, &'a Tensor, std::ops::Range<usize>)>,
    r: usize,
    scale: f32,
}

impl Unit<'_> {
    /// Calls `f` with the unit's keys and values, each as its shared elements (empty
    /// without) and its own, as the buffers hold them (`T`).
    fn with_parts<T: candle_core::WithDType, R>(
        &self,
        f: impl FnOnce([&[T]; 2], [&[T]; 2]) -> R,
    ) -> Result<R> {
        let own = |shared_k: &[T], shared_v: &[T]| {
            let span = self.span.clone();
            ops::with_host::<T, _>(self.keys, span.clone(), |k| {
                ops::with_host::<T, _>(self.values, span, |v| f([shared_k, k], [shared_v, v]))
            })?
        };
        match &self.shared {
            None => own(&[], &[]),
            Some((k, v, span)) => ops::with_host::<T, _>(k, span.clone(), |k| {
                ops::with_host::<T, _>(v, span.clone(), |v| own(k, v))
            })??,
        }
    }

    /// [`head`] over the unit's keys and values, which hold `T`.
    fn attend<T: Widen>(&self, q: &[f32], out: &mut [f32]) -> Result<()> {
        let (r, scale) = (self.r, self.scale);
        self.with_parts::<T, _>(|k, v| head(q, k, v, r, scale, out))
    }

    /// [`head`] over the unit's f16 keys and values, widened first into this thread's
    /// buffers: f16 has no cheap scalar widening (bf16 is a shift), but the slice
    /// conversion uses the CPU's F16C instructions.
    fn attend_f16(&self, q: &[f32], out: &mut [f32]) -> Result<()> {
        use half::slice::HalfFloatSliceExt;
        let (r, scale) = (self.r, self.scale);
        self.with_parts::<half::f16, _>(|k, v| {
            WIDENED.with_borrow_mut(|(wide_k, wide_v)| {
                for (parts, wide) in [(k, &mut *wide_k), (v, &mut *wide_v)] {
                    wide.resize(parts[0].len() + parts[1].len(), 0.0);
                    let (first, second) = wide.split_at_mut(parts[0].len());
                    parts[0].convert_to_f32_slice(first);
                    parts[1].convert_to_f32_slice(second);
                }
                head(q, [wide_k, &[]], [wide_v, &[]], r, scale, out)
            })
        })
    }
}

thread_local! {
    /// One head's f16 keys and values widened to f32, reused by the thread's next head.
    static WIDENED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = std::cell::RefCell::default();
}

/// An element of a KV cache as the kernel reads it: widened to f32 in registers, so a
/// narrower cache is read at its own size, with no copy.
pub(crate) trait Widen: candle_core::WithDType + Copy {
    /// The value as f32 (exact: every bf16 is an f32).
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::bf16 {
    /// A bf16 is the upper half of an f32's bits: a shift, which vectorises.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// One head of one sequence: each query row of `q` (s, r) over `keys` and `values`
/// (t, r, each in two parts: the rows of the first, then of the second), into `out`
/// (s, r); `r` is a multiple of [`LANES`]. Every key's score is summed in the same order
/// wherever the key lies, so a split gives the bits of the rows held whole.
///
/// Compiled twice: for the baseline x86-64 (four-wide registers) and for AVX2 (eight),
/// chosen at run time. Each of the eight lanes adds in the same order either way, and
/// the AVX2 build's horizontal adds in the order the baseline writes out, so both give
/// the same bits: only the register width differs.
fn head<T: Widen>(
    q: &[f32],
    keys: Parts<T>,
    values: Parts<T>,
    r: usize,
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { head_avx2(q, keys, values, r, scale, out) };
    }
    head_lanes::<T, false>(q, keys, values, r, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn head_avx2<T: Widen>(
    q: &[f32],
    keys: Parts<T>,
    values: Parts<T>,
    r: usize,
    scale: f32,
    out: &mut [f32],
) {
    head_lanes::<T, true>(q, keys, values, r, scale, out)
}

/// Keys or values of one head in two parts, read one after the other.
type Parts<'a, T> = [&'a [T]; 2];

/// [`head`] in the lanes of the build's target; `AVX2` where that build is AVX2's.
#[inline(always)]
fn head_lanes<T: Widen, const AVX2: bool>(
    q: &[f32],
    keys: Parts<T>,
    values: Parts<T>,
    r: usize,
    scale: f32,
    out: &mut [f32],
) {
    let mut p = vec![0f32; (keys[0].len() + keys[1].len()) / r];
    for (q, out) in q.chunks_exact(r).zip(out.chunks_exact_mut(r)) {
        let mut scores = p.as_mut_slice();
        for part in keys {
            let mut eights = part.chunks_exact(8 * r);
            for k in eights.by_ref() {
                let (eight, rest) = scores.split_at_mut(8);
                eight.copy_from_slice(&dots8::<T, AVX2>(q, k, r).map(|d| d * scale));
                scores = rest;
            }
            for k in eights.remainder().chunks_exact(r) {
                let (one, rest) = scores.split_first_mut().expect("a score per key");
                *one = lane_sum(&dot_lanes(q, k)) * scale;
                scores = rest;
            }
        }
        let max = crate::host::max(&p);
        p.iter_mut().for_each(|x| *x = crate::host::exp(*x - max));
        let inv = 1.0 / crate::host::sum(&p);
        p.iter_mut().for_each(|x| *x *= inv);
        let p = p.split_at(values[0].len() / r);
        let mut groups = out.chunks_exact_mut(GROUP * LANES);
        for (g, out) in groups.by_ref().enumerate() {
            weighted_rows::<GROUP, T>(p, values, r, g * GROUP * LANES, out);
        }
        let done = r - groups.into_remainder().len();
        for (c, out) in out[done..].chunks_exact_mut(LANES).enumerate() {
            weighted_rows::<1, T>(p, values, r, done + c * LANES, out);
        }
    }
}

/// Vectors of [`LANES`] columns that [`weighted_rows`] sums at once.
const GROUP: usize = 4;

/// Fills `out`, the output's columns `from..` (`N` vectors of [`LANES`]), with the sum of
/// the value rows (two parts) weighted by `p` (two parts), over every row in order. `N` vectors at once keep
/// the sums in registers and read each row's columns once; every lane adds in the same
/// order whatever `N`, so the bits do not depend on it.
#[inline(always)]
fn weighted_rows<const N: usize, T: Widen>(
    p: (&[f32], &[f32]),
    values: Parts<T>,
    r: usize,
    from: usize,
    out: &mut [f32],
) {
    let mut acc = [[0f32; LANES]; N];
    for (p, values) in [(p.0, values[0]), (p.1, values[1])] {
        for (&p, v) in p.iter().zip(values.chunks_exact(r)) {
            let v = &v[from..from + N * LANES];
            for (acc, v) in acc.iter_mut().zip(v.chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] += p * v[l].widen();
                }
            }
        }
    }
    for (out, acc) in out.chunks_exact_mut(LANES).zip(&acc) {
        out.copy_from_slice(acc);
    }
}

/// Columns one vectorised step of the kernel handles; head dimensions must be multiples.
pub(crate) const LANES: usize = 8;

/// The lanes of `a . b` for lengths that are multiples of [`LANES`]: the products summed
/// in that many lanes, so that it vectorises (a float sum in one accumulator cannot be
/// reordered).
#[inline(always)]
fn dot_lanes<T: Widen>(a: &[f32], b: &[T]) -> [f32; LANES] {
    let mut acc = [0f32; LANES];
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l].widen();
        }
    }
    acc
}

/// The sum of a dot product's lanes, in pairs: ((0+1) + (2+3)) + ((4+5) + (6+7)), the
/// order in which [`dots8`] sums eight at once.
#[inline(always)]
fn lane_sum(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// `q` against the eight key rows of `keys`, each score with the bits of [`dot_lanes`]
/// and [`lane_sum`]. On AVX2 the eight keys' lane sums take six horizontal adds: a key's
/// lanes summed on their own take seven shuffles and adds, which bound the scores' loop.
#[inline(always)]
fn dots8<T: Widen, const AVX2: bool>(q: &[f32], keys: &[T], r: usize) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: only the AVX2 build of the kernel asks, which runs where the CPU has it.
        return unsafe { dots8_avx2(q, keys, r) };
    }
    std::array::from_fn(|k| lane_sum(&dot_lanes(q, &keys[k * r..][..r])))
}

/// [`dots8`] in AVX2 registers: each vector of the query against the eight keys (the
/// products added lane by lane, as [`dot_lanes`] adds them), then [`lane_sum`] of the
/// eight in horizontal adds: a pair's sums first, then pairs of pairs, then the halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn dots8_avx2<T: Widen>(q: &[f32], keys: &[T], r: usize) -> [f32; 8] {
    use std::arch::x86_64::*;
    let load = |v: &[f32]| {
        let v: &[f32; LANES] = v.try_into().expect("a vector");
        // SAFETY: eight f32 are read from an array of eight.
        unsafe { _mm256_loadu_ps(v.as_ptr()) }
    };
    let mut acc = [_mm256_setzero_ps(); 8];
    for (c, x) in q.chunks_exact(LANES).enumerate() {
        let x = load(x);
        for (k, acc) in acc.iter_mut().enumerate() {
            let y = &keys[k * r + c * LANES..][..LANES];
            let y: [f32; LANES] = std::array::from_fn(|l| y[l].widen());
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, load(&y)));
        }
    }
    // [k0 01, k0 23, k1 01, k1 23 | k0 45, k0 67, k1 45, k1 67], and so on.
    let pairs = [
        _mm256_hadd_ps(acc[0], acc[1]),
        _mm256_hadd_ps(acc[2], acc[3]),
        _mm256_hadd_ps(acc[4], acc[5]),
        _mm256_hadd_ps(acc[6], acc[7]),
    ];
    // [k0 0123, k1 0123, k2 0123, k3 0123 | k0 4567, ...], and k4 to k7.
    let low = _mm256_hadd_ps(pairs[0], pairs[1]);
    let high = _mm256_hadd_ps(pairs[2], pairs[3]);
    let sums = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(low, high),
        _mm256_permute2f128_ps::<0x31>(low, high),
    );
    let mut out = [0f32; 8];
    // SAFETY: eight f32 are written to an array of eight.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sums) };
    out
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::test_util::max_diff;
    use crate::{Backbone, Config, Shape};

    fn normal(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let data: Vec<f32> = (0..n as u64)
            .map(|i| ((i * 2_654_435_761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// A cache of batch 1 in `dtype` holding `len` committed tokens and `new` pending ones
    /// at layer 0.
    fn cache(cfg: &Config, dtype: DType, len: usize, new: usize, seed: u64) -> KvCache {
        cache_of(cfg, dtype, len, new, seed, false)
    }

    /// [`cache`], its committed tokens moved to a [`crate::SharedKv`] when `shared`.
    fn cache_of(
        cfg: &Config,
        dtype: DType,
        len: usize,
        new: usize,
        seed: u64,
        shared: bool,
    ) -> KvCache {
        let mut cache = KvCache::new(cfg, 1, dtype, &Device::Cpu).unwrap();
        let (h, r) = (cfg.n_heads, cfg.head_dim());
        for (i, n) in [(0, len), (1, new)] {
            cache.reserve(n).unwrap();
            let (k, v) = (
                normal((1, h, n, r), seed + i),
                normal((1, h, n, r), seed + 9 + i),
            );
            cache.write_pending(0, &k, &v).unwrap();
            if i == 0 {
                cache.append_pending(n);
                if shared {
                    cache.share().unwrap();
                }
            }
        }
        cache
    }

    /// candle's composite: softmax(q k^T / sqrt(r)) v over the cache's keys and values.
    fn composite(q: &Tensor, cache: &KvCache, new: usize) -> Tensor {
        let (k, v) = cache.keys_values(0, new, DType::F32).unwrap();
        let scale = 1.0 / (q.dim(3).unwrap() as f64).sqrt();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        crate::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v)
            .unwrap()
    }

    /// Sequences with caches of different lengths, in each precision a cache holds, get
    /// candle's attention over the cache's keys and values, and each one's result is the
    /// same bits alone as in the batch.
    #[test]
    fn ragged_attention_matches_candle_and_is_batch_invariant() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            ragged_attention_matches_candle_in(dtype);
        }
    }

    fn ragged_attention_matches_candle_in(dtype: DType) {
        let cfg = Config::new(Shape {
            vocab_size: 64,
            model_length: 64,
            block_size: 4,
            backbone: Backbone {
                hidden_dim: 64,
                n_heads: 2,
                n_blocks: 4,
                cond_dim: 16,
            },
        });
        let (h, r, s) = (cfg.n_heads, cfg.head_dim(), cfg.block_size);
        let caches: Vec<KvCache> = [0, 12, 40]
            .iter()
            .enumerate()
            .map(|(i, &len)| cache(&cfg, dtype, len, s, i as u64))
            .collect();
        let q = normal((3, h, s, r), 5);
        let refs: Vec<&KvCache> = caches.iter().collect();
        let batched = ragged(&q, &refs, 0).unwrap();
        for (i, cache) in caches.iter().enumerate() {
            let qi = q.narrow(0, i, 1).unwrap();
            let want = composite(&qi, cache, s);
            let got = batched.narrow(0, i, 1).unwrap();
            assert!(max_diff(&got, &want) < 1e-6, "{dtype:?}: sequence {i}");
            let alone = ragged(&qi, &[cache], 0).unwrap();
            assert_eq!(max_diff(&alone, &got), 0.0, "{dtype:?}: sequence {i} alone");
        }
        let too_few = ragged(&q.narrow(0, 0, 2).unwrap(), &refs, 0);
        assert!(too_few.is_err());
        // A cache whose committed tokens are shared gives the bits of one holding them.
        let shared = cache_of(&cfg, dtype, 40, s, 2, true);
        assert!(shared.shared().is_some());
        let q2 = q.narrow(0, 2, 1).unwrap();
        let got = ragged(&q2, &[&shared], 0).unwrap();
        assert_eq!(
            max_diff(&got, &batched.narrow(0, 2, 1).unwrap()),
            0.0,
            "{dtype:?}"
        );
        let want = composite(&q2, &shared, s);
        assert!(
            max_diff(&got, &want) < 1e-6,
            "{dtype:?}: candle over shared tokens"
        );
    }

    /// The AVX2 build of the head loop gives the baseline build's bits (on a CPU without
    /// AVX2 both calls run the baseline).
    #[test]
    fn every_build_of_the_head_loop_gives_the_same_bits() {
        let (r, s, t) = (32, 4, 300);
        let data = |n: usize, seed: u64| {
            let x = normal((1, 1, n, r), seed);
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (q, k, v) = (data(s, 1), data(t, 2), data(t, 3));
        let (mut dispatched, mut baseline) = (vec![0f32; s * r], vec![0f32; s * r]);
        head(&q, [&k, &[]], [&v, &[]], r, 0.17, &mut dispatched);
        head_lanes::<f32, false>(&q, [&k, &[]], [&v, &[]], r, 0.17, &mut baseline);
        assert_eq!(dispatched, baseline);
    }
}
