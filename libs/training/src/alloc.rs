//! Process-wide allocator settings for training.

/// Keeps freed memory in the process. A training step allocates and frees many tensors of
/// megabytes; glibc's default returns each to the kernel and faults it in again, which
/// doubled the step time on the CPU. Blocks up to 32 MiB (glibc's largest heap threshold)
/// now come from a heap that is not trimmed; larger ones are still mapped and unmapped,
/// which keeps the heap from fragmenting without bound.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before the training threads
    // allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
