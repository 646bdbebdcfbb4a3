//! Asking for a GPU where there is none is an error saying why, on every machine: no driver, no
//! GPU, or an index past the GPUs present; never a panic, never a CPU run.

use tome_gpu::{gpus, Gpu, GpuError};

#[test]
fn a_gpu_past_those_present_is_refused_by_name() {
    match Gpu::open(4096) {
        Err(GpuError::Unavailable(why)) => assert!(why.contains("CUDA driver library") || why.contains("cuda:4096 was asked for"), "{why}"),
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("cuda:4096 opened"),
    }
}

#[test]
fn the_gpu_list_is_the_driver_s_or_says_why_there_is_none() {
    match gpus() {
        Ok(list) => {
            for (i, g) in list.iter().enumerate() {
                assert_eq!(g.index, i);
                assert!(!g.name.is_empty() && g.memory_bytes > 0 && g.compute_capability.0 >= 3, "{g:?}");
            }
        }
        Err(GpuError::Unavailable(why)) => assert!(why.contains("libcuda.so"), "{why}"),
        Err(other) => panic!("{other}"),
    }
}
