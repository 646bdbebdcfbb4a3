//! The operator suite (crates/tome-dist/tests/suite) on the NCCL backend: every rank a thread of
//! this test on its own GPU, its frames crossing NCCL; the communicators' ids travel over gRPC
//! peer streams on 127.0.0.1. NCCL refuses two ranks of a communicator on one GPU, so the suite
//! runs its cases of up to as many ranks as there are GPUs, and says which it leaves out;
//! without a GPU (or without CUDA or NCCL) every test returns at once, saying why.
#![cfg(feature = "nccl")]

#[path = "../../tome-dist/tests/suite/operators.rs"]
mod suite;

mod common;

use std::sync::OnceLock;

use tome_dist::{Group, RankError};
use tome_net::nccl::{gpus_available, NcclGroup};

use crate::common::launch_with;

fn gpus() -> usize {
    static GPUS: OnceLock<usize> = OnceLock::new();
    *GPUS.get_or_init(|| {
        gpus_available().unwrap_or_else(|why| {
            eprintln!("NCCL unavailable: {why}");
            0
        })
    })
}

pub fn available() -> bool {
    let n = gpus();
    if n == 0 {
        eprintln!("skipping: the NCCL operator suite needs a GPU; this machine has none");
    }
    n > 0
}

/// One rank per GPU.
pub fn max_ranks() -> usize {
    gpus()
}

/// Runs `f` on every rank of a new job over NCCL, rank r on GPU r.
pub fn launch<T: Send, E: RankError>(p: usize, f: impl Fn(&dyn Group) -> Result<T, E> + Sync) -> Result<Vec<T>, E> {
    launch_with(p, |peers| Ok(NcclGroup::join(&peers, peers.rank())?), f)
}

/// A device frame crosses NCCL from its sender's buffers into buffers on the receiver's GPU,
/// and either side may use host frames instead: the wire is the same.
#[test]
fn device_frames_cross_nccl_in_place_and_meet_host_frames() {
    if gpus() < 2 {
        eprintln!("skipping: device frames over NCCL need two GPUs (NCCL refuses two ranks of a communicator on one); this machine has {}", gpus());
        return;
    }
    use candle_core::{DType, Device, Tensor};
    use tome_dist::{frame_to_device, frame_to_host, DistError};
    let cpu = &Device::Cpu;
    let sample = || -> Vec<Tensor> {
        vec![
            Tensor::arange(0f32, 24.0, cpu).unwrap().reshape((2, 3, 4)).unwrap(),
            Tensor::new(&[5i64, 6, 9], cpu).unwrap(),
            Tensor::new(&[1u8, 0, 1], cpu).unwrap(),
            Tensor::zeros((2, 0, 4), DType::F32, cpu).unwrap(),
        ]
    };
    let values = |frame: &[Tensor]| -> Vec<(Vec<usize>, Vec<f64>)> {
        frame.iter().map(|t| (t.dims().to_vec(), t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap())).collect()
    };
    launch(2, |g| -> Result<(), DistError> {
        let stream = cudarc::driver::CudaContext::new(g.rank()).and_then(|c| c.new_stream()).map_err(|e| DistError::Unsupported(format!("{e:?}")))?;
        if g.rank() == 0 {
            let device = frame_to_device(&sample(), &stream)?;
            g.send_device(1, device.clone())?;
            g.send_device(1, device)?;
            g.send(1, sample())?;
        } else {
            let arrived = g.recv_device(0, &stream)?;
            assert_eq!(arrived.iter().map(|t| t.gpu()).collect::<Vec<_>>(), vec![Some(1), Some(1), Some(1), None], "received into GPU 1's buffers");
            assert_eq!(values(&frame_to_host(&arrived)?), values(&sample()));
            assert_eq!(values(&g.recv(0)?), values(&sample()));
            assert_eq!(values(&frame_to_host(&g.recv_device(0, &stream)?)?), values(&sample()));
        }
        Ok(())
    })
    .unwrap();
}
