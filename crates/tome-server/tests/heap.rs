//! The heap policy, in a process of its own: it changes how every later allocation is served,
//! and resident-memory readings need no other test allocating beside them.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use tome_server::heap::{release_freed_memory, retain_freed_memory};

/// Resident memory of this process, in bytes.
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn freed_blocks_stay_for_reuse_until_released() {
    assert!(retain_freed_memory(1 << 30));
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
