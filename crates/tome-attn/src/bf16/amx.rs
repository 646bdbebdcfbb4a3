//! The AMX tile: [`ROWS`] rows by up to [`PANELS`] panels of 16 columns, accumulated in AMX
//! tile registers by `tdpbf16ps`, 16 input pairs a step. Owns the AMX state of the thread that
//! runs it: whether this process may use AMX at all (the CPU's AMX-BF16, and Linux's permission
//! for tile data, asked for once), the tile configuration (a [`Session`] per task) and the
//! tiles' operations, behind [`Tiles`] so that the tests run the same tile loop on a model of
//! the instructions.
//!
//! Every tile register is 16 rows of 64 bytes: C (`tmm0`–`tmm3`) 16 × 16 f32 sums, A
//! (`tmm4`, `tmm5`) 16 rows × 16 pairs of activations, B (`tmm6`, `tmm7`) 16 pairs × 16
//! columns of a panel, which is the packed weights' layout as it is.
//!
//! `tdpbf16ps` sums a step's even and odd products apart and adds them to the accumulator at the
//! end of the step (Intel's SDM), so its bits differ from the vector kernels' (one sum per
//! pair); a row's result still depends on that row alone, so P ranks whose CPUs all run AMX
//! give one rank's bits.

use std::arch::asm;
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::OnceLock;

use super::packed::{PAIR_STEP, PANEL};

/// Rows per tile: two A tiles.
pub(super) const ROWS: usize = 32;
/// Panels per tile: two B tiles.
pub(super) const PANELS: usize = 2;
/// Bytes in a tile register's row.
const ROW_BYTES: usize = 64;

/// Whether this process may run AMX-BF16 tiles: the CPU has AMX-TILE, AMX-BF16 and AVX-512F
/// (which the code around the tiles uses; every AMX CPU has it), and Linux granted the process
/// the tile-data state (asked for once, on the first call).
pub(super) fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        // CPUID leaf 7, sub-leaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let cpu_has = leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0 && std::arch::is_x86_feature_detected!("avx512f");
        cpu_has && tile_data_permitted()
    })
}

/// Asks Linux for the AMX tile-data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`); without it the first tile instruction faults.
#[cfg(target_os = "linux")]
fn tile_data_permitted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: `arch_prctl` with this request reads its two integer arguments and changes only
    // which extended states this process may use.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn tile_data_permitted() -> bool {
    false
}

/// `ldtilecfg`'s 64-byte operand: palette 1, every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
pub(super) struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// The configuration every [`Session`] loads.
static CONFIG: Config = Config {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [
        ROW_BYTES as u16,
        ROW_BYTES as u16,
        ROW_BYTES as u16,
        ROW_BYTES as u16,
        ROW_BYTES as u16,
        ROW_BYTES as u16,
        ROW_BYTES as u16,
        ROW_BYTES as u16,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The operations the tile loop uses, on tile registers named by number.
pub(super) trait Tiles {
    /// Zeroes tile `T`.
    ///
    /// # Safety
    /// The tiles are configured on this thread.
    unsafe fn zero<const T: u8>(&mut self);
    /// Loads tile `T`'s 16 rows of 64 bytes from `src`, rows `stride` bytes apart.
    ///
    /// # Safety
    /// As [`zero`](Self::zero); the 16 rows lie in memory this thread may read.
    unsafe fn load<const T: u8>(&mut self, src: *const u32, stride: usize);
    /// `tdpbf16ps`: tile `C` (16 × 16 f32) plus tile `A` (16 rows × 16 pairs) times tile `B`
    /// (16 pairs × 16 columns).
    ///
    /// # Safety
    /// As [`zero`](Self::zero).
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self);
    /// Stores tile `T` to `dst`, rows `stride` bytes apart.
    ///
    /// # Safety
    /// As [`zero`](Self::zero); the 16 rows lie in memory this thread may write.
    unsafe fn store<const T: u8>(&mut self, dst: *mut f32, stride: usize);
}

/// The AMX instructions themselves.
pub(super) struct Amx;

impl Tiles for Amx {
    #[inline(always)]
    unsafe fn zero<const T: u8>(&mut self) {
        // SAFETY: the caller configured the tiles on this thread.
        unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, nomem, preserves_flags)) };
    }

    #[inline(always)]
    unsafe fn load<const T: u8>(&mut self, src: *const u32, stride: usize) {
        // SAFETY: the caller configured the tiles and keeps the 16 rows readable.
        unsafe { asm!("tileloadd tmm{t}, [{src} + {stride}*1]", t = const T, src = in(reg) src, stride = in(reg) stride, options(nostack, readonly, preserves_flags)) };
    }

    #[inline(always)]
    unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
        // SAFETY: the caller configured the tiles on this thread.
        unsafe { asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B, options(nostack, nomem, preserves_flags)) };
    }

    #[inline(always)]
    unsafe fn store<const T: u8>(&mut self, dst: *mut f32, stride: usize) {
        // SAFETY: the caller configured the tiles and keeps the 16 rows writable.
        unsafe { asm!("tilestored [{dst} + {stride}*1], tmm{t}", t = const T, dst = in(reg) dst, stride = in(reg) stride, options(nostack, preserves_flags)) };
    }
}

/// The tiles configured on this thread, released when the last session of the thread is
/// dropped (so a thread between products carries no tile state). Sessions nest: a task that
/// runs inside another's (a product inside an attention task, or a task rayon runs on a thread
/// waiting inside a session) finds the tiles configured and leaves them so; every session loads
/// the same configuration. Not `Send`: the configuration belongs to the thread.
pub(super) struct Session(PhantomData<*const ()>);

thread_local! {
    /// Live sessions on this thread.
    static SESSIONS: Cell<usize> = const { Cell::new(0) };
}

impl Session {
    /// Configures this thread's tiles, unless a live session has.
    ///
    /// # Safety
    /// [`usable`] returned true.
    pub(super) unsafe fn begin() -> Self {
        if SESSIONS.get() == 0 {
            // SAFETY: the CPU has AMX and the process its tile-data state; `CONFIG` is a valid
            // palette-1 configuration.
            unsafe { asm!("ldtilecfg [{cfg}]", cfg = in(reg) &raw const CONFIG, options(nostack, readonly, preserves_flags)) };
        }
        SESSIONS.set(SESSIONS.get() + 1);
        Session(PhantomData)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let live = SESSIONS.get() - 1;
        SESSIONS.set(live);
        if live == 0 {
            // SAFETY: the first session of this thread configured its tiles, which
            // `tilerelease` returns to their initial state.
            unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
        }
    }
}

/// Accumulates rows `x` ([`ROWS`] rows, `stride` pairs apart, every lane a bf16 pair) times
/// `NP` panels `w` (`stride × 16` lanes apart) into `tile` (`ROWS` rows of `16 · NP` f32), which
/// it overwrites. `stride` is a multiple of [`PAIR_STEP`]; the lanes past a row's pairs are zero
/// in both operands.
///
/// # Safety
/// The tiles are configured on this thread (a live [`Session`], or the model's equivalent);
/// `NP` is 1 or 2; `stride` is a multiple of [`PAIR_STEP`]; `x` holds `ROWS · stride` lanes,
/// `w` `NP · stride · 16` and `tile` `ROWS · NP · 16` values.
#[inline(always)]
pub(super) unsafe fn tile<T: Tiles, const NP: usize>(t: &mut T, x: &[u32], w: &[u32], stride: usize, tile: &mut [f32]) {
    debug_assert!(stride.is_multiple_of(PAIR_STEP) && w.len() >= NP * stride * PANEL);
    // SAFETY: the caller's contract, which is `tile_steps`'s with `stride / 16` steps.
    unsafe { tile_steps::<T, NP>(t, x, stride / PAIR_STEP, w, Panels::Stepped, tile) }
}

/// Accumulates `steps` A-tile pairs of rows `x` ([`ROWS`] rows of `steps · 16` pairs, the rows
/// `steps · 16` lanes apart) times the same 16 pairs of `NP` panels `w` (16 × 16 lanes apart),
/// `Σₛ xₛ · w`, into `tile` (`ROWS` rows of `16 · NP` f32), which it overwrites: a product whose
/// left operand is a sum of terms, each term's step accumulating in the tiles.
///
/// # Safety
/// The tiles are configured on this thread; `NP` is 1 or 2; `x` holds `ROWS · steps · 16`
/// lanes, `w` `NP · 16 · 16` and `tile` `ROWS · NP · 16` values.
#[inline(always)]
pub(super) unsafe fn tile_shared_b<T: Tiles, const NP: usize>(t: &mut T, x: &[u32], steps: usize, w: &[u32], tile: &mut [f32]) {
    debug_assert!(w.len() >= NP * PAIR_STEP * PANEL);
    // SAFETY: the caller's contract is `tile_steps`'s.
    unsafe { tile_steps::<T, NP>(t, x, steps, w, Panels::Shared, tile) }
}

/// What a tile loop's B tiles read at each step.
#[derive(Clone, Copy, PartialEq)]
enum Panels {
    /// The step's own 16 pairs of each panel; panels `steps × 16` pairs apart.
    Stepped,
    /// The same 16 pairs of each panel at every step; panels 16 pairs apart.
    Shared,
}

/// The tile loop of [`tile`] and [`tile_shared_b`]: `steps` steps of 16 pairs, A tiles from
/// `x` (rows `steps · 16` lanes apart), B tiles from `w` as `panels` says, C tiles zeroed first
/// and stored into `tile` (`ROWS` rows of `16 · NP` f32) last.
///
/// # Safety
/// The tiles are configured on this thread; `NP` is 1 or 2; `x` holds `ROWS · steps · 16`
/// lanes, `w` the `NP` panels `panels` reads, and `tile` `ROWS · NP · 16` values.
#[inline(always)]
unsafe fn tile_steps<T: Tiles, const NP: usize>(t: &mut T, x: &[u32], steps: usize, w: &[u32], panels: Panels, tile: &mut [f32]) {
    let stride = steps * PAIR_STEP;
    debug_assert!(x.len() >= ROWS * stride && tile.len() >= ROWS * NP * PANEL && (1..=PANELS).contains(&NP));
    let (x, w, out) = (x.as_ptr(), w.as_ptr(), tile.as_mut_ptr());
    let x_row_bytes = stride * 4;
    // Lanes from one panel to the next, and from one step's 16 pairs to the next's.
    let (panel_lanes, step_lanes) = match panels {
        Panels::Stepped => (stride * PANEL, PAIR_STEP * PANEL),
        Panels::Shared => (PAIR_STEP * PANEL, 0),
    };
    // SAFETY (every call below): the tiles are configured (the caller); A tiles read rows
    // `0..32` of `x`, lanes `s · 16..s · 16 + 16` (`s < steps`); B tiles read 16 pairs of panel
    // `j < NP` within `w`; C tiles write rows `0..32`, columns `j · 16..j · 16 + 16` of `tile`:
    // all within the lengths the caller gives.
    unsafe {
        t.zero::<0>();
        t.zero::<2>();
        if NP == 2 {
            t.zero::<1>();
            t.zero::<3>();
        }
        for s in 0..steps {
            let lane = s * PAIR_STEP;
            t.load::<4>(x.add(lane), x_row_bytes);
            t.load::<5>(x.add(16 * stride + lane), x_row_bytes);
            if s == 0 || panels == Panels::Stepped {
                t.load::<6>(w.add(s * step_lanes), ROW_BYTES);
                if NP == 2 {
                    t.load::<7>(w.add(panel_lanes + s * step_lanes), ROW_BYTES);
                }
            }
            t.dot::<0, 4, 6>();
            t.dot::<2, 5, 6>();
            if NP == 2 {
                t.dot::<1, 4, 7>();
                t.dot::<3, 5, 7>();
            }
        }
        let out_row_bytes = NP * PANEL * 4;
        t.store::<0>(out, out_row_bytes);
        t.store::<2>(out.add(16 * NP * PANEL), out_row_bytes);
        if NP == 2 {
            t.store::<1>(out.add(PANEL), out_row_bytes);
            t.store::<3>(out.add(16 * NP * PANEL + PANEL), out_row_bytes);
        }
    }
}

/// A model of the tile registers and instructions, in scalar code, for the tests: the same tile
/// loop runs on it on any CPU.
#[cfg(any(test, feature = "tile-model"))]
pub(super) mod model {
    use super::super::convert::from_bf16_bits;
    use super::Tiles;

    /// Eight tile registers of 16 rows × 16 32-bit lanes.
    pub(in super::super) struct Model {
        tiles: [[[u32; 16]; 16]; 8],
    }

    impl Model {
        pub(in super::super) fn new() -> Self {
            // Unconfigured registers hold what a previous task left: not zero.
            Model { tiles: [[[0x7fc0_0001; 16]; 16]; 8] }
        }
    }

    /// `v`, or zero of its sign where it is subnormal (AMX's DAZ and FTZ).
    fn flush(v: f32) -> f32 {
        if v.is_subnormal() {
            0.0_f32.copysign(v)
        } else {
            v
        }
    }

    impl Tiles for Model {
        unsafe fn zero<const T: u8>(&mut self) {
            self.tiles[T as usize] = [[0; 16]; 16];
        }

        unsafe fn load<const T: u8>(&mut self, src: *const u32, stride: usize) {
            for (r, row) in self.tiles[T as usize].iter_mut().enumerate() {
                // SAFETY: the caller keeps the 16 rows of 64 bytes readable.
                let src = unsafe { std::slice::from_raw_parts(src.cast::<u8>().add(r * stride).cast::<u32>(), 16) };
                row.copy_from_slice(src);
            }
        }

        /// Intel's SDM: per output, the step's even products summed in one f32 and its odd ones
        /// in another, in pair order, each sum rounded to nearest even and flushed; then their sum
        /// added to the accumulator.
        unsafe fn dot<const C: u8, const A: u8, const B: u8>(&mut self) {
            let (a, b) = (self.tiles[A as usize], self.tiles[B as usize]);
            let half = |lane: u32, odd: bool| flush(from_bf16_bits(if odd { (lane >> 16) as u16 } else { lane as u16 }));
            for (m, row) in self.tiles[C as usize].iter_mut().enumerate() {
                for (n, c) in row.iter_mut().enumerate() {
                    let (mut even, mut odd) = (0f32, 0f32);
                    for k in 0..16 {
                        even = flush(even + half(a[m][k], false) * half(b[k][n], false));
                        odd = flush(odd + half(a[m][k], true) * half(b[k][n], true));
                    }
                    *c = flush(f32::from_bits(*c) + flush(even + odd)).to_bits();
                }
            }
        }

        unsafe fn store<const T: u8>(&mut self, dst: *mut f32, stride: usize) {
            for (r, row) in self.tiles[T as usize].iter().enumerate() {
                // SAFETY: the caller keeps the 16 rows of 64 bytes writable.
                let dst = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>().add(r * stride).cast::<f32>(), 16) };
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d = f32::from_bits(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::convert::{from_bf16_bits, pair};
    use super::*;

    /// `tile_shared_b` on the model: every step of the left operand times the same panels.
    #[test]
    fn the_shared_b_loop_sums_every_step_against_the_same_panels() {
        let value = |i: usize| ((i as f32 * 0.37).sin() * 2.0).clamp(-2.0, 2.0);
        for (steps, np) in [(1, 1), (3, 2), (2, 1)] {
            let x: Vec<u32> = (0..ROWS * steps * PAIR_STEP).map(|i| pair(value(2 * i), value(2 * i + 1))).collect();
            let w: Vec<u32> = (0..np * PAIR_STEP * PANEL).map(|i| pair(value(7 * i + 3), value(7 * i + 5))).collect();
            let mut got = vec![f32::NAN; ROWS * np * PANEL];
            let mut model = model::Model::new();
            // SAFETY: the model needs no configuration; the lengths are the function's.
            unsafe {
                match np {
                    1 => tile_shared_b::<_, 1>(&mut model, &x, steps, &w, &mut got),
                    _ => tile_shared_b::<_, 2>(&mut model, &x, steps, &w, &mut got),
                }
            }
            let half = |lane: u32, odd: bool| from_bf16_bits(if odd { (lane >> 16) as u16 } else { lane as u16 }) as f64;
            for r in 0..ROWS {
                for c in 0..np * PANEL {
                    let (panel, col) = (c / PANEL, c % PANEL);
                    let want: f64 = (0..steps * PAIR_STEP)
                        .map(|k| {
                            let (a, b) = (x[r * steps * PAIR_STEP + k], w[(panel * PAIR_STEP + k % PAIR_STEP) * PANEL + col]);
                            half(a, false) * half(b, false) + half(a, true) * half(b, true)
                        })
                        .sum();
                    let g = got[r * np * PANEL + c] as f64;
                    assert!((g - want).abs() < 1e-4, "{steps} steps, {np} panels, ({r}, {c}): {g} vs {want}");
                }
            }
        }
    }
}
