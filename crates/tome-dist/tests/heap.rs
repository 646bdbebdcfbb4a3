//! The heap policy, in a process of its own: it changes how every later allocation is served,
//! and resident-memory readings need no other test allocating beside them.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use tome_dist::heap::{release_freed_memory, retain_freed_memory, Heap, HUGE_BLOCK};

#[global_allocator]
static HEAP: Heap = Heap;

/// One test, its checks in turn: each reads what the process as a whole holds, and the policy
/// must be set before a second test thread could have made an arena of its own.
#[test]
fn the_heap_policy_retains_freed_blocks_and_advises_huge_pages() {
    assert!(retain_freed_memory(1 << 30));
    freed_blocks_stay_for_reuse_until_released();
    large_blocks_are_advised_onto_huge_pages();
}

/// Resident memory of this process, in bytes.
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn freed_blocks_stay_for_reuse_until_released() {
    // A fresh thread, as a rank's: it takes the main heap, having no arena yet.
    std::thread::spawn(|| {
        const BYTES: usize = 256 << 20;
        let touch = |v: &mut Vec<u8>| v.iter_mut().step_by(4096).for_each(|b| *b = 1);
        let mut block = vec![0u8; BYTES];
        touch(&mut block);
        let before_free = resident_bytes();
        drop(block);
        // glibc's default would have unmapped the block at once.
        assert!(resident_bytes() + BYTES / 2 > before_free, "the freed block's pages were kept");
        let mut again = vec![0u8; BYTES];
        touch(&mut again);
        assert!(resident_bytes() < before_free + BYTES / 2, "the second block reused the first one's pages");
        drop(again);
        release_freed_memory();
        assert!(resident_bytes() + BYTES / 2 < before_free, "the released pages went back to the kernel");
    })
    .join()
    .unwrap();
}

/// The flags of the mapping that holds `addr` (`VmFlags` of /proc/self/smaps).
fn vm_flags_at(addr: usize) -> Vec<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let range = line.split_whitespace().next().and_then(|r| r.split_once('-')).and_then(|(a, b)| Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?)));
        if let Some((start, end)) = range.filter(|_| !line.starts_with("VmFlags")) {
            inside = start <= addr && addr < end;
        } else if inside && line.starts_with("VmFlags:") {
            return line.split_whitespace().skip(1).map(str::to_string).collect();
        }
    }
    panic!("no mapping holds {addr:#x}");
}

fn large_blocks_are_advised_onto_huge_pages() {
    if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
        eprintln!("this kernel has no transparent huge pages: nothing to check");
        return;
    }
    for block in [vec![0u8; 4 * HUGE_BLOCK], Vec::with_capacity(HUGE_BLOCK)] {
        let first_whole_page = (block.as_ptr() as usize).next_multiple_of(2 << 20);
        let flags = vm_flags_at(first_whole_page);
        assert!(flags.iter().any(|f| f == "hg"), "a {} MB block is advised onto huge pages: {flags:?}", block.capacity() >> 20);
    }
}
