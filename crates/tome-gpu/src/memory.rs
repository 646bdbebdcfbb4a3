//! A GPU's memory as its stream-ordered allocator counts it: the bytes the device's default
//! memory pool has handed out now, and the most it has handed out since the mark was last
//! reset. Every device buffer of tome's GPU ranks comes from that pool (cudarc allocates with
//! `cuMemAllocAsync`), so the high-water mark is the measured peak of what a run held.

use cudarc::driver::sys::{self, CUmemPool_attribute, CUmemoryPool};

use crate::device::Gpu;
use crate::error::{GpuError, Result};

/// The default memory pool of one GPU.
pub struct PoolMeter {
    pool: CUmemoryPool,
    _gpu: Gpu,
}

fn check(op: &'static str, r: sys::CUresult) -> Result<()> {
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(GpuError::Driver { op, msg: format!("{e:?}") }),
    }
}

impl PoolMeter {
    /// The meter of `gpu`'s default pool; an error where the GPU has no stream-ordered
    /// allocator (then nothing can be measured this way).
    pub fn new(gpu: &Gpu) -> Result<Self> {
        if !gpu.ctx.has_async_alloc() {
            return Err(GpuError::Unavailable("this GPU has no stream-ordered allocator, so its memory peaks cannot be measured".into()));
        }
        let mut pool: CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer and the device handle is the context's own.
        check("cuDeviceGetDefaultMemPool", unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, gpu.ctx.cu_device()) })?;
        Ok(PoolMeter { pool, _gpu: gpu.clone() })
    }

    fn get(&self, attr: CUmemPool_attribute) -> Result<u64> {
        let mut value: u64 = 0;
        // SAFETY: both attributes are 64-bit counters, written to `value`.
        check("cuMemPoolGetAttribute", unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, (&mut value as *mut u64).cast()) })?;
        Ok(value)
    }

    /// Bytes handed out now.
    pub fn used(&self) -> Result<u64> {
        self.get(CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// The most bytes handed out at once since the last [`PoolMeter::reset_peak`].
    pub fn peak(&self) -> Result<u64> {
        self.get(CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    /// Starts the high-water mark again from what is handed out now.
    pub fn reset_peak(&self) -> Result<()> {
        let mut zero: u64 = 0;
        // SAFETY: resetting the high-water mark takes a 64-bit zero.
        check("cuMemPoolSetAttribute", unsafe { sys::cuMemPoolSetAttribute(self.pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut zero as *mut u64).cast()) })
    }
}
