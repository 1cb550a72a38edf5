//! How many threads candle's kernels on the host use.
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
    /// Large batches (training, evaluation): element-wise kernels share their work out.
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
