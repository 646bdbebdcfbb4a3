//! kernels/attention.cu run on the CPU under tests/emulated/cuda_emulation.h (each CUDA thread
//! of a block a coroutine, barriers and warp shuffles passing control round-robin), against
//! the naive reference: the kernel's indexing, masking, tiling and online softmax are checked
//! here, where there is no GPU. The same cases run on a GPU in tests/gpu.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use tome_attn::{Mask, Partial};

/// The harness binary, compiled once with the host's C++ compiler (`CXX`, default `c++`).
fn harness() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulated");
        let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("attention_harness");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&cxx)
            .args(["-std=c++20", "-O2", "-Wall", "-Wno-unknown-pragmas", "-o"])
            .arg(&bin)
            .arg(dir.join("attention_harness.cpp"))
            .status()
            .unwrap_or_else(|e| panic!("{cxx}: {e} (scripts/prereqs.sh cxx installs a C++ compiler)"));
        assert!(status.success(), "the emulated kernel does not compile with {cxx}");
        bin
    })
}

/// Values as the harness reads them (little-endian, as this host is).
fn bytes_of<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn elements(t: &Tensor) -> Vec<u8> {
    let flat = t.flatten_all().unwrap();
    match t.dtype() {
        DType::BF16 => bytes_of(&flat.to_vec1::<half::bf16>().unwrap().into_iter().map(half::bf16::to_bits).collect::<Vec<_>>()),
        _ => bytes_of(&flat.to_vec1::<f32>().unwrap()),
    }
}

/// One kernel call through the harness.
fn emulated(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32) -> Partial {
    let (hq, nq, d) = q.dims3().unwrap();
    let (hk, nk, _) = k.dims3().unwrap();
    let dv = v.dims3().unwrap().2;
    let header = [
        i64::from(q.dtype() == DType::BF16),
        hq as i64,
        hk as i64,
        nq as i64,
        nk as i64,
        d as i64,
        dv as i64,
        i64::from(mask.causal),
        mask.window.map_or(-1, |w| w as i64),
        i64::from(mask.key_valid.is_some()),
    ];
    let mut input = bytes_of(&header);
    input.extend(scale.to_le_bytes());
    for t in [q, k, v] {
        input.extend(elements(t));
    }
    input.extend(bytes_of(mask.q_pos));
    input.extend(bytes_of(mask.k_pos));
    if let Some(valid) = mask.key_valid {
        input.extend(valid.iter().map(|&b| u8::from(b)));
    }
    let dir = tempdir();
    let (inp, out) = (dir.join("in"), dir.join("out"));
    std::fs::write(&inp, input).unwrap();
    let status = Command::new(harness()).arg(&inp).arg(&out).status().unwrap();
    assert!(status.success(), "the harness failed: {status}");
    let raw: Vec<f32> = std::fs::read(&out).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    std::fs::remove_dir_all(&dir).unwrap();
    let (o, l) = raw.split_at(hq * nq * dv);
    Partial::from_vecs(o.to_vec(), l.to_vec(), hq, nq, dv).unwrap()
}

fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emulated-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn emulated_kernel_matches_the_reference_on_every_case() {
    for case in common::cases() {
        common::check_against_reference(&emulated, &case);
    }
}

#[test]
fn emulated_kernel_partials_of_key_blocks_merge_to_the_whole() {
    for case in common::cases() {
        common::check_blocks_merge(&emulated, &case, 3);
    }
}
