//! The machine's f32 FMA peak, measured: independent fused multiply-adds on every core, with
//! enough accumulators in flight to hide the FMA latency, at the widest vector width the CPU
//! has (AVX-512 where present: on cores with full-width 512-bit units it doubles AVX2's peak).

use std::time::Instant;

/// GFLOP/s of `threads` threads each running `iters` rounds of 12 independent FMAs of the
/// widest vectors the CPU has.
pub fn fma_peak_gflops(threads: usize, iters: u64) -> f64 {
    let started = Instant::now();
    let lanes = std::thread::scope(|s| {
        let running: Vec<_> = (0..threads).map(|_| s.spawn(move || fma_loop(iters))).collect();
        running.into_iter().map(|t| t.join().map_or(0, |(lanes, _)| lanes)).max().unwrap_or(0)
    });
    let flops = threads as f64 * iters as f64 * 12.0 * lanes as f64 * 2.0;
    flops / started.elapsed().as_secs_f64() / 1e9
}

/// Runs the loop; the f32 lanes per FMA it used, and its result (kept so it is computed).
fn fma_loop(iters: u64) -> (usize, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU reported AVX-512F.
        return (16, std::hint::black_box(unsafe { fma_loop_avx512(iters) }));
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU reported AVX2 and FMA.
        return (8, std::hint::black_box(unsafe { fma_loop_avx2(iters) }));
    }
    (8, std::hint::black_box(fma_loop_scalar(iters)))
}

/// 96 scalar accumulators: 12 rounds of 8, as the vector loops count them.
fn fma_loop_scalar(iters: u64) -> f32 {
    let mut acc = [1.0f32; 96];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_loop_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (m, a) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, m, a);
        }
    }
    let mut lanes = [0f32; 8];
    let mut total = _mm256_setzero_ps();
    for x in acc {
        total = _mm256_add_ps(total, x);
    }
    // SAFETY: `lanes` holds eight f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
    lanes.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_loop_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (m, a) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); 12];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, m, a);
        }
    }
    let mut total = _mm512_setzero_ps();
    for x in acc {
        total = _mm512_add_ps(total, x);
    }
    _mm512_reduce_add_ps(total)
}
