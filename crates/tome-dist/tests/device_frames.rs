//! Device frames between ranks of one process on GPU 0: a frame a GPU rank sends stays in its
//! buffers for a receiver on the same GPU (shared, not copied), is copied to the host for a
//! receiver that asks for a host frame, and a host frame arrives on the device for one that asks
//! for a device frame; shapes, element types and empty tensors cross intact, and bytes count as
//! on the wire. These need a GPU: a plain `cargo test` ignores them (nothing here counts as
//! passed without one); scripts/gpu-check.sh runs them with `--ignored`, where no GPU is an
//! error.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use cudarc::driver::{CudaContext, CudaStream};
use tome_dist::{frame_bytes, frame_to_device, frame_to_host, run_ranks, DeviceData, DistError, Frame, Group, InProcessGroup};

fn stream() -> Arc<CudaStream> {
    // SAFETY: only tries to open the driver library.
    assert!(unsafe { cudarc::driver::sys::is_culib_present() }, "these tests need the CUDA driver");
    CudaContext::new(0).expect("GPU 0").new_stream().expect("a stream on GPU 0")
}

/// A frame of every element type GPU ranks exchange, an empty tensor among them.
fn sample() -> Frame {
    let cpu = &Device::Cpu;
    vec![
        Tensor::arange(0f32, 24.0, cpu).unwrap().reshape((2, 3, 4)).unwrap(),
        Tensor::new(&[5i64, 6, 9], cpu).unwrap(),
        Tensor::new(&[1u8, 0, 1], cpu).unwrap(),
        Tensor::zeros((2, 0, 4), DType::F32, cpu).unwrap(),
    ]
}

fn assert_same(got: &Frame, want: &Frame) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.dtype(), g.dims()), (w.dtype(), w.dims()));
        let (g, w) = (g.flatten_all().unwrap().to_dtype(DType::F64).unwrap(), w.flatten_all().unwrap().to_dtype(DType::F64).unwrap());
        assert_eq!(g.to_vec1::<f64>().unwrap(), w.to_vec1::<f64>().unwrap());
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn a_frame_goes_to_the_device_and_back_intact() {
    let s = stream();
    let device = frame_to_device(&sample(), &s).unwrap();
    assert_eq!(device.iter().map(|t| t.gpu()).collect::<Vec<_>>(), vec![Some(0), Some(0), Some(0), None]);
    assert_same(&frame_to_host(&device).unwrap(), &sample());
    let bf16 = Tensor::zeros(3, DType::BF16, &Device::Cpu).unwrap();
    let refused = frame_to_device(&[bf16], &s).err().unwrap();
    assert!(matches!(&refused, DistError::Unsupported(m) if m.contains("BF16")), "{refused}");
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn ranks_on_one_gpu_share_device_frames_and_take_either_kind() {
    let streams = [stream(), stream()];
    let sent = frame_to_device(&sample(), &streams[0]).unwrap();
    let sent_keys = match sent[0].data() {
        Some(DeviceData::F32(k)) => k.clone(),
        _ => unreachable!("the sample's first tensor is f32"),
    };
    run_ranks(2, |g: &InProcessGroup| -> Result<(), DistError> {
        let s = &streams[g.rank()];
        if g.rank() == 0 {
            g.send_device(1, sent.clone())?;
            g.send_device(1, sent.clone())?;
            g.send(1, sample())?;
            assert_eq!(g.bytes_sent(), 3 * frame_bytes(&sample()), "device frames count as host frames do");
        } else {
            let shared = g.recv_device(0, s)?;
            match shared[0].data() {
                Some(DeviceData::F32(k)) => assert!(Arc::ptr_eq(k, &sent_keys), "a receiver on the sender's GPU takes its buffer, not a copy"),
                _ => panic!("keys arrived as {:?}", shared[0].dtype()),
            }
            assert_same(&frame_to_host(&shared)?, &sample());
            assert_same(&g.recv(0)?, &sample());
            let uploaded = g.recv_device(0, s)?;
            assert_eq!(uploaded[0].gpu(), Some(0));
            assert_same(&frame_to_host(&uploaded)?, &sample());
        }
        Ok(())
    })
    .unwrap();
}
