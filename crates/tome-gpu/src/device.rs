//! Devices: what `--device` names, and the GPUs this process can use.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{result, CudaContext, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::error::{driver, GpuError, Result};
use crate::kernels::KernelSource;

/// Where a process's ranks compute: `cpu`, `cuda` (every GPU of the machine, ranks spread over
/// them) or `cuda:N` (GPU N alone).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// Every GPU: a process's ranks of a job take them in turn (its k-th rank GPU k mod the GPU
    /// count), one GPU each while there are enough.
    AllCuda,
    Cuda(usize),
}

impl DeviceSpec {
    /// The GPU the `slot`-th of a process's ranks of a job computes on, or `None` on the CPU;
    /// an error where there is no GPU.
    pub fn gpu_for(self, slot: usize) -> Result<Option<usize>> {
        match self {
            DeviceSpec::Cpu => Ok(None),
            DeviceSpec::Cuda(index) => Ok(Some(index)),
            DeviceSpec::AllCuda => match gpu_count()? {
                0 => Err(GpuError::Unavailable("the CUDA driver sees no GPU".into())),
                count => Ok(Some(slot % count)),
            },
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::AllCuda),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| format!("device '{s}': the GPU index must be a number, as in cuda:0")),
                None => Err(format!("unknown device '{s}' (expected cpu, cuda or cuda:N)")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::AllCuda => f.write_str("cuda"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// One GPU as the driver describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    pub memory_bytes: u64,
    /// (major, minor), e.g. (9, 0) for an H100.
    pub compute_capability: (u32, u32),
}

impl GpuInfo {
    /// The NVRTC architecture of this GPU's machine code, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

/// Whether the driver library can be opened, without calling into it (cudarc panics on a
/// missing library).
fn driver_present() -> Result<()> {
    // SAFETY: this only tries to open the shared library.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(GpuError::Unavailable("the CUDA driver library (libcuda.so) is not installed".into()))
    }
}

/// The GPUs this process can use; an error saying why when there is no driver. No GPU with a
/// driver present is an empty list. Asks the driver about each device without creating a
/// context on it (no device memory is taken).
pub fn gpus() -> Result<Vec<GpuInfo>> {
    (0..gpu_count()? as i32).map(describe).collect()
}

fn describe(ordinal: i32) -> Result<GpuInfo> {
    use cudarc::driver::sys::CUdevice_attribute::{CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR};
    let dev = result::device::get(ordinal).map_err(driver("cuDeviceGet"))?;
    // SAFETY: `dev` is a device handle the driver just returned.
    let (memory, major, minor) = unsafe { (result::device::total_mem(dev), result::device::get_attribute(dev, MAJOR), result::device::get_attribute(dev, MINOR)) };
    Ok(GpuInfo {
        index: ordinal as usize,
        name: result::device::get_name(dev).map_err(driver("cuDeviceGetName"))?,
        memory_bytes: memory.map_err(driver("cuDeviceTotalMem"))? as u64,
        compute_capability: (major.map_err(driver("cuDeviceGetAttribute"))?.max(0) as u32, minor.map_err(driver("cuDeviceGetAttribute"))?.max(0) as u32),
    })
}

/// How many GPUs the driver sees (0 with a driver and no GPU); an error without a driver.
pub fn gpu_count() -> Result<usize> {
    driver_present()?;
    match result::init() {
        Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => return Ok(0),
        other => other.map_err(driver("cuInit"))?,
    }
    Ok(result::device::get_count().map_err(driver("cuDeviceGetCount"))?.max(0) as usize)
}

/// [`gpus`], asked once per process (servers report it on every `Info`), with the reason as text.
pub fn present() -> &'static std::result::Result<Vec<GpuInfo>, String> {
    static PRESENT: OnceLock<std::result::Result<Vec<GpuInfo>, String>> = OnceLock::new();
    PRESENT.get_or_init(|| gpus().map_err(|e| e.to_string()))
}

/// A GPU opened for work: its primary context.
#[derive(Clone)]
pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
}

impl Gpu {
    /// Opens GPU `index`, or says why it cannot be used.
    pub fn open(index: usize) -> Result<Self> {
        driver_present()?;
        let count = gpu_count()?;
        if index >= count {
            return Err(GpuError::Unavailable(match count {
                0 => format!("cuda:{index} was asked for, and the driver sees no GPU"),
                n => format!("cuda:{index} was asked for, and the driver sees {n} GPU(s): cuda:0..cuda:{}", n - 1),
            }));
        }
        Ok(Gpu { ctx: CudaContext::new(index).map_err(driver("cuCtxCreate"))? })
    }

    pub fn info(&self) -> Result<GpuInfo> {
        describe(self.ctx.ordinal() as i32)
    }

    /// The GPU's default stream.
    pub fn stream(&self) -> Arc<CudaStream> {
        self.ctx.default_stream()
    }

    /// A stream of its own, for one rank's work.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx.new_stream().map_err(driver("cuStreamCreate"))
    }

    /// `kernel` compiled for this GPU (once per process and architecture) and loaded.
    pub fn load(&self, kernel: &KernelSource) -> Result<Arc<CudaModule>> {
        let cubin = crate::nvrtc::compile_cached(kernel, &self.info()?.arch())?;
        self.ctx.load_module(Ptx::from_binary(cubin)).map_err(driver("cuModuleLoadData"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::AllCuda);
        assert_eq!(DeviceSpec::AllCuda.to_string(), "cuda");
        assert_eq!(DeviceSpec::Cpu.gpu_for(3).unwrap(), None);
        assert_eq!(DeviceSpec::Cuda(2).gpu_for(5).unwrap(), Some(2));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        assert!("cuda:x".parse::<DeviceSpec>().unwrap_err().contains("must be a number"));
        assert!("gpu".parse::<DeviceSpec>().unwrap_err().contains("expected cpu, cuda or cuda:N"));
    }

    #[test]
    fn arch_names_follow_the_compute_capability() {
        let info = GpuInfo { index: 0, name: "H100".into(), memory_bytes: 80 << 30, compute_capability: (9, 0) };
        assert_eq!(info.arch(), "sm_90");
    }
}
