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
//!
//! [`Heap`], the binaries' global allocator, is the system allocator that, once the policy is on,
//! also asks the kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`) on every block of
//! [`HUGE_BLOCK`] or more. Attention over a million tokens reads key blocks from anywhere in
//! 100 MB tensors (BigBird's random blocks): with 4 KB pages nearly every such read misses the
//! TLB, with 2 MB pages a whole tensor takes a few dozen entries.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks from this size up are advised onto huge pages (each holds at least one whole 2 MB page).
pub const HUGE_BLOCK: usize = 8 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// Whether [`Heap`] advises huge pages: set with the policy by [`retain_freed_memory`].
static ADVISE_HUGE_PAGES: AtomicBool = AtomicBool::new(false);

/// The system allocator, advising huge pages for large blocks once the heap policy is on.
/// A binary installs it with `#[global_allocator] static HEAP: Heap = Heap;`.
pub struct Heap;

// SAFETY: every call is forwarded to `System` unchanged; `advise_huge_pages` only changes how the
// kernel backs pages of a block the caller now owns, never its contents or its extent.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let block = unsafe { System.alloc(layout) };
        advise_huge_pages(block, layout.size());
        block
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let block = unsafe { System.alloc_zeroed(layout) };
        advise_huge_pages(block, layout.size());
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let moved = unsafe { System.realloc(block, layout, new_size) };
        advise_huge_pages(moved, new_size);
        moved
    }
}

/// Asks the kernel to back the whole 2 MB pages inside `block..block + size` with huge pages,
/// where the policy is on and the block is large. A refusal (no THP support) changes nothing.
fn advise_huge_pages(block: *mut u8, size: usize) {
    if size < HUGE_BLOCK || block.is_null() || !ADVISE_HUGE_PAGES.load(Ordering::Relaxed) {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let start = (block as usize).next_multiple_of(HUGE_PAGE);
        let end = (block as usize + size) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside a block the allocator just handed out, and
            // MADV_HUGEPAGE changes only how its pages are backed, not what they hold.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

/// Keeps up to `retain_bytes` of freed memory at the top of the heap for reuse, and serves
/// blocks up to that size from the heap instead of from their own mappings; [`Heap`] then advises
/// huge pages for large blocks. Call it first thing in `main`, before other threads exist (each
/// would otherwise have made an arena of its own). Returns false where the allocator is not
/// glibc's, or it refused a setting.
pub fn retain_freed_memory(retain_bytes: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // mallopt takes an int: a larger bound is clamped to the largest it can express.
        let bound = libc::c_int::try_from(retain_bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets malloc's tunables; every thread's later allocations see them.
        let retained = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 && libc::mallopt(libc::M_MMAP_THRESHOLD, bound) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, bound) == 1 };
        ADVISE_HUGE_PAGES.store(retained, Ordering::Relaxed);
        retained
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
