//! The attention kernels on a real GPU (CUDA cores and tensor cores), against the naive
//! reference and the CPU kernel. These
//! need a GPU and NVRTC: they are ignored by a plain `cargo test` (so nothing here counts as
//! passed without one) and run by scripts/gpu-check.sh with `--ignored`, where no GPU is an error.

mod common;

use candle_core::{DType, Tensor};
use tome_attn::{Mask, Partial};
use tome_gpu::blas::Half;
use tome_gpu::{Gpu, GpuAttention};

fn kernel() -> GpuAttention {
    let gpu = Gpu::open(0).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("on {:?}", gpu.info().unwrap());
    GpuAttention::new(&gpu, gpu.stream()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn gpu_kernel_matches_the_reference_on_every_case() {
    let gpu = kernel();
    let run = |q: &Tensor, k: &Tensor, v: &Tensor, m: &Mask<'_>, s: f32| -> Partial { gpu.attention(q, k, v, m, s).unwrap() };
    for case in common::cases() {
        common::check_against_reference(&run, &case);
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn gpu_partials_of_key_blocks_merge_to_the_whole() {
    let gpu = kernel();
    let run = |q: &Tensor, k: &Tensor, v: &Tensor, m: &Mask<'_>, s: f32| -> Partial { gpu.attention(q, k, v, m, s).unwrap() };
    for case in common::cases() {
        for parts in [2, 4] {
            common::check_blocks_merge(&run, &case, parts);
        }
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn gpu_tensor_core_kernel_matches_the_reference_on_every_case() {
    let gpu = kernel();
    let run = |f16: bool, q: &Tensor, k: &Tensor, v: &Tensor, m: &Mask<'_>, s: f32| -> Partial {
        gpu.attention_tensor_cores(q, k, v, m, s, if f16 { Half::F16 } else { Half::Bf16 }).unwrap()
    };
    for case in common::cases() {
        common::check_tensor_cores(&run, &case);
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn gpu_kernel_matches_the_cpu_kernel() {
    let gpu = kernel();
    for case in common::cases().into_iter().filter(|c| !c.bf16) {
        let (q, k, v) = case.tensors();
        let on_gpu = gpu.attention(&q, &k, &v, &case.mask(), case.scale()).unwrap();
        let on_cpu = tome_attn::attention(&q, &k, &v, &case.mask(), case.scale()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            let (a, b) = (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            a.iter().zip(&b).filter(|(x, y)| !(x.is_infinite() && x == y)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
        };
        assert!(diff(&on_gpu.out, &on_cpu.out) <= 1e-5 && diff(&on_gpu.lse, &on_cpu.lse) <= 1e-5, "{}", case.name);
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn gpu_refuses_what_the_kernel_cannot_take() {
    let gpu = kernel();
    let pos: Vec<i64> = (0..8).collect();
    let t = |d: usize| Tensor::zeros((1, 8, d), DType::F32, &candle_core::Device::Cpu).unwrap();
    let err = gpu.attention(&t(256), &t(256), &t(256), &Mask::full(&pos, &pos), 1.0).unwrap_err().to_string();
    assert!(err.contains("multiples of 4 up to 128"), "{err}");
    let f16 = t(64).to_dtype(DType::F16).unwrap();
    let err = gpu.attention(&f16, &f16, &f16, &Mask::full(&pos, &pos), 1.0).unwrap_err().to_string();
    assert!(err.contains("f32 or bf16"), "{err}");
}
