//! NVRTC, the run-time CUDA compiler: where the library comes from, and kernel sources compiled
//! to machine code (cubin) for one architecture.
//!
//! Kernels are compiled to cubin for the exact GPU (`sm_90` on an H100), never shipped as PTX:
//! a driver older than the compiler cannot read newer PTX, while a cubin only needs the GPU's
//! architecture. The library is found by its soname (the CUDA toolkit's `lib64` on the loader's
//! path), or taken from `TOME_NVRTC_DIR` (`scripts/prereqs.sh nvrtc` installs NVIDIA's PyPI
//! wheel into `.tools/nvrtc`, which `.cargo/config.toml` names for every cargo command here).

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{result, sys};

use crate::error::{GpuError, Result};
use crate::kernels::KernelSource;

/// The environment variable naming a directory that holds `libnvrtc.so.*`.
pub const DIR_VAR: &str = "TOME_NVRTC_DIR";

/// Loads NVRTC once per process, or says why it cannot.
fn ensure_loaded() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED.get_or_init(load).clone().map_err(GpuError::Nvrtc)
}

fn load() -> std::result::Result<(), String> {
    let preloaded = match std::env::var_os(DIR_VAR) {
        Some(dir) => Some(preload_from(Path::new(&dir))?),
        None => None,
    };
    // SAFETY: this only tries to open the shared library.
    if unsafe { sys::is_culib_present() } {
        // cudarc opens NVRTC by name; the library found that way must be the one named.
        if let Some((path, want)) = preloaded {
            let (mut major, mut minor) = (0, 0);
            // SAFETY: two valid out-pointers.
            unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| format!("nvrtcVersion: {e:?}"))?;
            if (major, minor) != want {
                return Err(format!(
                    "{DIR_VAR} names NVRTC {}.{} ({}), but NVRTC {major}.{minor} from the loader's path answers: put its directory first on LD_LIBRARY_PATH, or unset {DIR_VAR}",
                    want.0,
                    want.1,
                    path.display()
                ));
            }
        }
        Ok(())
    } else {
        Err(format!(
            "libnvrtc.so was not found: put the CUDA toolkit's lib64 on LD_LIBRARY_PATH, or set {DIR_VAR} to a directory holding libnvrtc.so.12 (scripts/prereqs.sh nvrtc installs one into .tools/nvrtc)"
        ))
    }
}

/// Opens `dir`'s `libnvrtc.so.*` by path and keeps it for the process, so that cudarc's open by
/// soname finds it already loaded; returns its path and version.
fn preload_from(dir: &Path) -> std::result::Result<(std::path::PathBuf, (i32, i32)), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{DIR_VAR}={}: {e}", dir.display()))?;
    let mut names: Vec<_> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libnvrtc.so"))).collect();
    names.sort();
    let Some(path) = names.last() else {
        return Err(format!("{DIR_VAR}={} holds no libnvrtc.so*", dir.display()));
    };
    // SAFETY: NVRTC's initialisers only set up the compiler; the library stays loaded for the
    // life of the process (leaked on purpose), as cudarc's own handle does.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| format!("{}: {e}", path.display()))?;
    type Version = unsafe extern "C" fn(*mut std::ffi::c_int, *mut std::ffi::c_int) -> std::ffi::c_int;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: `nvrtcVersion` has this signature in every NVRTC; two valid out-pointers.
    let status = unsafe { lib.get::<Version>(b"nvrtcVersion\0").map(|f| f(&mut major, &mut minor)) }.map_err(|e| format!("{}: {e}", path.display()))?;
    if status != 0 {
        return Err(format!("{}: nvrtcVersion failed ({status})", path.display()));
    }
    std::mem::forget(lib);
    Ok((path.clone(), (major, minor)))
}

/// NVRTC's version, (major, minor).
pub fn version() -> Result<(i32, i32)> {
    ensure_loaded()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| GpuError::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// A program being compiled, destroyed when dropped.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by `create_program` and destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// Compiles `kernel` to machine code for `arch` (`sm_80`, `sm_90`, ...), returning the cubin, or
/// NVRTC's log when the source does not compile.
pub fn compile_cubin(kernel: &KernelSource, arch: &str) -> Result<Vec<u8>> {
    ensure_loaded()?;
    let failed = |log: String| GpuError::Compile { kernel: kernel.name, arch: arch.to_string(), log };
    if !arch.strip_prefix("sm_").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric())) {
        return Err(failed(format!("'{arch}' is not a GPU architecture such as sm_90")));
    }
    let source = CString::new(kernel.source).map_err(|_| failed("the source holds a NUL byte".into()))?;
    let name = CString::new(kernel.name).map_err(|_| failed("the name holds a NUL byte".into()))?;
    let program = Program(result::create_program(&source, Some(&name)).map_err(|e| failed(format!("nvrtcCreateProgram: {e:?}")))?);
    let options = [format!("--gpu-architecture={arch}"), "--std=c++17".to_string(), "--fmad=true".to_string()];
    // SAFETY: `program` is live until dropped below.
    if let Err(e) = unsafe { result::compile_program(program.0, &options) } {
        return Err(failed(format!("{e:?}\n{}", program_log(&program))));
    }
    let mut size = 0usize;
    // SAFETY: `program` compiled; `size` is a valid out-pointer.
    unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) }.result().map_err(|e| failed(format!("nvrtcGetCUBINSize: {e:?}")))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds the `size` bytes NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast::<c_char>()) }.result().map_err(|e| failed(format!("nvrtcGetCUBIN: {e:?}")))?;
    if cubin.is_empty() {
        return Err(failed("NVRTC produced no machine code".into()));
    }
    Ok(cubin)
}

/// Compiled kernels by (source name, architecture).
type Cubins = HashMap<(&'static str, String), Vec<u8>>;

/// [`compile_cubin`], once per process for each kernel and architecture.
pub fn compile_cached(kernel: &KernelSource, arch: &str) -> Result<Vec<u8>> {
    static CUBINS: OnceLock<Mutex<Cubins>> = OnceLock::new();
    let cache = CUBINS.get_or_init(Mutex::default);
    let key = (kernel.name, arch.to_string());
    if let Some(cubin) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(cubin.clone());
    }
    let cubin = compile_cubin(kernel, arch)?;
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, cubin.clone());
    Ok(cubin)
}

fn program_log(program: &Program) -> String {
    // SAFETY: `program` is live; the log is NUL-terminated.
    match unsafe { result::get_program_log(program.0) } {
        Ok(raw) if !raw.is_empty() => unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned(),
        _ => String::new(),
    }
}
