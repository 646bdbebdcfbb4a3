//! The process heap's policy for activations (glibc's malloc; elsewhere nothing to do).
//!
//! By default glibc gives every allocation above its mmap threshold (at most 32 MB) pages of
//! its own, fresh from the kernel, and unmaps them when freed; and a thread's own arena cannot
//! hold a block above 64 MB at all. A rank's whole-shard activations are such blocks (84 MB for
//! 55k tokens of a 384-wide model), made anew at every layer: each one is page-faulted and zeroed
//! by the kernel again, a tenth of the book job's time, and more for the linear families at a
//! million tokens.
//!
//! [`retain_freed_memory`] makes every thread allocate from the one main heap, serves large
//! blocks from it, and lets freed pages stay for reuse up to a bound at the top of the heap;
//! [`release_freed_memory`] hands every freed page back to the kernel, which callers do when a
//! job ends, so that an idle process holds no more than its live data.

/// Keeps up to `retain_bytes` of freed memory at the top of the heap for reuse, and serves
/// blocks up to that size from the heap instead of from their own mappings. Call it first thing
/// in `main`, before other threads exist (each would otherwise have made an arena of its own).
/// Returns false where the allocator is not glibc's, or it refused a setting.
pub fn retain_freed_memory(retain_bytes: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // mallopt takes an int: a larger bound is clamped to the largest it can express.
        let bound = libc::c_int::try_from(retain_bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets malloc's tunables; every thread's later allocations see them.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 && libc::mallopt(libc::M_MMAP_THRESHOLD, bound) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, bound) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = retain_bytes;
        false
    }
}

/// Returns the heap's freed pages to the kernel (a job has ended). Takes milliseconds per
/// gigabyte freed; a no-op where the allocator is not glibc's.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
