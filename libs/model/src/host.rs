//! Kernels on the host: how many threads candle's use, and branch-free math for ours.
//!
//! candle reads its thread count at every matrix product: `RAYON_NUM_THREADS`, or else
//! the physical cores listed in `/proc/cpuinfo`, a file it opens and parses each time and
//! whose count ignores a container's CPU quota. Its element-wise kernels hand tensors of
//! 64K elements or more to a second pool of threads that spin while they wait; in a
//! process whose passes are a few rows each, those threads only take cores from the
//! products' threads.

/// What the process's tensor kernels mostly run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Passes over a few rows (sampling, serving): element-wise kernels run on the
    /// calling thread.
    Inference,
    /// Large batches (training, evaluation, or a process that trains beside serving):
    /// element-wise kernels share their work out (a training step on the calling
    /// thread's is 40% slower).
    Training,
}

/// Fixes the threads of candle's host kernels for this process: `threads` for matrix
/// products (default: `RAYON_NUM_THREADS` when set, else the cores this process may run
/// on, quota and affinity included), and the element-wise pool for `workload`
/// (`CANDLE_NUM_THREADS` when set wins).
///
/// # Safety
///
/// It sets environment variables, which candle reads: call it before the process starts
/// any other thread.
pub unsafe fn set_host_threads(threads: Option<usize>, workload: Workload) {
    let set = |name: &str, value: usize| {
        // SAFETY: the caller guarantees that no other thread exists yet.
        unsafe { std::env::set_var(name, value.to_string()) }
    };
    match threads {
        Some(n) => set("RAYON_NUM_THREADS", n.max(1)),
        None if std::env::var_os("RAYON_NUM_THREADS").is_none() => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            set("RAYON_NUM_THREADS", cores);
        }
        None => {}
    }
    if workload == Workload::Inference && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        set("CANDLE_NUM_THREADS", 1);
    }
}

/// The largest of `values` (-inf for none), in eight lanes so that it vectorises (the
/// largest of a set does not depend on the order it is read in).
#[inline(always)]
pub fn max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for l in 0..8 {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// The sum of `values` in eight lanes, so that it vectorises: lane l adds every eighth
/// value in order, then the lanes and the tail are added in order.
#[inline(always)]
pub fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            lanes[l] += c[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `e^x` in f32 without branches or library calls, so that loops over it vectorise:
/// `x = k ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by its Taylor series to degree 7 (a
/// truncation error below 1e-8, relative) and `2^k` built in the exponent bits. Within
/// 2 ulp of `f32::exp` over the range; arguments are clamped to [-87, 88], where `e^x` is
/// a normal float.
#[inline]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (|x| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let rounded = x * std::f32::consts::LOG2_E + ROUND;
    let k = rounded - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // `rounded`'s low mantissa bits hold k: its bits are those of ROUND plus k, so 2^k
    // is built with integer adds (a float-to-integer cast saturates, which does not
    // vectorise).
    let biased = rounded
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    p * f32::from_bits(biased << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 2 ulp of the library's `exp` over the whole unclamped range.
    #[test]
    fn exp_is_within_two_ulp_of_the_library() {
        let mut worst = 0f32;
        for i in 0..=400_000 {
            let x = -87.0 + 175.0 * i as f32 / 400_000.0;
            let (want, got) = (x.exp(), exp(x));
            worst = worst.max((got - want).abs() / (want * f32::EPSILON));
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(1000.0).is_finite());
    }
}
