//! Every kernel compiles to machine code for sm_80 and sm_90 with NVRTC, here, without a GPU:
//! a kernel that does not compile fails CI. Needs NVRTC (`scripts/prereqs.sh nvrtc`).

use tome_gpu::kernels::{KernelSource, ALL, CI_ARCHES};
use tome_gpu::nvrtc::{compile_cubin, version};
use tome_gpu::GpuError;

#[test]
fn every_kernel_compiles_to_a_cubin_for_every_ci_architecture() {
    let (major, minor) = version().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("NVRTC {major}.{minor}");
    for kernel in ALL {
        for arch in CI_ARCHES {
            let cubin = compile_cubin(kernel, arch).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&cubin[..4], b"\x7fELF", "{} for {arch}: machine code, not PTX", kernel.name);
            for entry in kernel.entry_points {
                let found = cubin.windows(entry.len()).any(|w| w == entry.as_bytes());
                assert!(found, "{} for {arch} lacks the entry point {entry}", kernel.name);
            }
        }
    }
}

#[test]
fn a_kernel_that_does_not_compile_is_an_error_with_nvrtc_s_log() {
    let broken = KernelSource { name: "broken.cu", source: "extern \"C\" __global__ void f() { undeclared = 1; }", entry_points: &["f"] };
    match compile_cubin(&broken, "sm_90") {
        Err(GpuError::Compile { kernel, arch, log }) => {
            assert_eq!((kernel, arch.as_str()), ("broken.cu", "sm_90"));
            assert!(log.contains("undeclared"), "{log}");
        }
        other => panic!("expected a compile error, got {:?}", other.map(|c| c.len())),
    }
    let err = compile_cubin(&ALL[0], "compute_90").unwrap_err().to_string();
    assert!(err.contains("not a GPU architecture such as sm_90"), "{err}");
}
