//! Peak resident memory from /proc (Linux): the process's high-water mark, resettable so that a
//! case can report what its timed part alone added.

fn status_kb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Current resident memory, MB.
pub fn rss_mb() -> f64 {
    status_kb("VmRSS:") / 1024.0
}

/// Peak resident memory since the last reset, MB.
pub fn peak_mb() -> f64 {
    status_kb("VmHWM:") / 1024.0
}

/// Resets the high-water mark to the current resident memory (best effort: where the kernel
/// refuses, the peak stays the whole process's and the increment is an upper bound).
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
