//! Picks the burn backend at run time: `flex` on the CPU, CUDA when built with `--features cuda`.
//!
//! Every stage is generic over the backend and takes its device from here; this is the only file
//! that names a concrete backend.

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use crate::config::DeviceKind;
use crate::progress::log;

/// Work that runs on any autodiff backend. The CLI picks the backend from `--device` and calls
/// [`BackendJob::run`] with it.
pub trait BackendJob {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Runs `job` on the backend for `kind` (`auto` is resolved first, see [`resolve`]). `threads` > 0
/// caps the CPU threads of the kernels.
pub fn run_on<J: BackendJob>(kind: DeviceKind, threads: usize, job: J) -> Result<J::Output> {
    if threads > 0 {
        // Fails only if the pool was already built (e.g. twice in one test process): harmless.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    flush_denormals_on_kernel_threads();
    match resolve(kind)? {
        DeviceKind::Cpu | DeviceKind::Auto => {
            job.run::<burn::backend::Autodiff<burn::backend::Flex>>(burn::backend::flex::FlexDevice)
        }
        DeviceKind::Cuda(index) => run_cuda(index, job),
    }
}

/// Checks that `kind` can be used by this binary on this machine, before any work starts: for
/// `cuda:N`, that the driver loads, GPU N exists, and the run-time kernel compiler (NVRTC) and
/// CUDA headers are there. `auto` is always usable (it falls back to the CPU).
pub fn ensure_available(kind: DeviceKind) -> Result<()> {
    match kind {
        DeviceKind::Cpu | DeviceKind::Auto => Ok(()),
        DeviceKind::Cuda(index) => cuda_probe(index).map(|_| ()),
    }
}

/// The device `kind` means on this machine: `auto` becomes `cuda:0` when this binary has CUDA
/// support and GPU 0 is usable, else `cpu`, and the choice is announced on stderr. Other kinds are
/// returned unchanged (checked by [`ensure_available`], not here).
pub fn resolve(kind: DeviceKind) -> Result<DeviceKind> {
    if kind != DeviceKind::Auto {
        return Ok(kind);
    }
    let chosen = match cuda_probe(0) {
        Ok(gpu) => {
            log(None, &format!("--device auto: using cuda:0 ({gpu})"));
            DeviceKind::Cuda(0)
        }
        Err(why) => {
            let why = format!("{why:#}");
            let why = why.trim_start_matches("--device cuda: ");
            log(None, &format!("--device auto: using the CPU ({why})"));
            DeviceKind::Cpu
        }
    };
    Ok(chosen)
}

#[cfg(not(feature = "cuda"))]
fn not_built_with_cuda() -> anyhow::Error {
    anyhow::anyhow!(
        "--device cuda: this frugal was built without CUDA support; rebuild with \
         `cargo build --release --features cuda`"
    )
}

#[cfg(not(feature = "cuda"))]
fn cuda_probe(_index: usize) -> Result<String> {
    Err(not_built_with_cuda())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<J: BackendJob>(_index: usize, _job: J) -> Result<J::Output> {
    Err(not_built_with_cuda())
}

#[cfg(feature = "cuda")]
fn run_cuda<J: BackendJob>(index: usize, job: J) -> Result<J::Output> {
    cuda_probe(index)?;
    let device = burn::backend::cuda::CudaDevice::new(index);
    job.run::<burn::backend::Autodiff<burn::backend::Cuda>>(device)
}

#[cfg(feature = "cuda")]
use cuda::probe as cuda_probe;

/// What burn's CUDA backend needs at run time, checked up front: it panics (or, without a driver,
/// dies on an unwrap in another thread) instead of returning an error when something is missing.
#[cfg(feature = "cuda")]
mod cuda {
    use std::ffi::{c_char, c_int, c_uint, CStr};
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use anyhow::{bail, Result};
    use libloading::{Library, Symbol};

    type CuResult = c_int;

    /// The driver, loaded once and kept (unloading it after `cuInit` is asking for trouble).
    fn driver() -> Result<&'static Library> {
        static DRIVER: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
        DRIVER
            .get_or_init(|| {
                let mut errors = Vec::new();
                for name in ["libcuda.so.1", "libcuda.so"] {
                    // SAFETY: loading the NVIDIA driver library runs only its initialisers.
                    match unsafe { Library::new(name) } {
                        Ok(lib) => return Ok(lib),
                        Err(e) => errors.push(format!("{e}")),
                    }
                }
                Err(errors.join("; "))
            })
            .as_ref()
            .map_err(|e| {
                anyhow::anyhow!(
                    "--device cuda: cannot load the NVIDIA driver ({e}); is there a GPU and its driver?"
                )
            })
    }

    /// `CUDA_ERROR_...` name of a driver status, when the driver can tell.
    fn error_name(lib: &Library, status: CuResult) -> String {
        // SAFETY: cuGetErrorName(CUresult, const char**) per the CUDA driver API; the string it
        // returns is static.
        unsafe {
            let Ok(f): std::result::Result<
                Symbol<unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult>,
                _,
            > = lib.get(b"cuGetErrorName\0") else {
                return format!("error {status}");
            };
            let mut p: *const c_char = std::ptr::null();
            if f(status, &mut p) == 0 && !p.is_null() {
                format!("{} ({status})", CStr::from_ptr(p).to_string_lossy())
            } else {
                format!("error {status}")
            }
        }
    }

    /// Checks that GPU `index` can run burn's CUDA backend; returns its name.
    pub fn probe(index: usize) -> Result<String> {
        let lib = driver()?;
        let sym_err = |name: &str, e: libloading::Error| {
            anyhow::anyhow!("--device cuda: the NVIDIA driver has no {name} ({e}): too old?")
        };
        // SAFETY: the signatures are the CUDA driver API's: cuInit(unsigned), cuDeviceGetCount(int*),
        // cuDeviceGet(CUdevice*, int), cuDeviceGetName(char*, int, CUdevice); CUdevice is an int.
        let name = unsafe {
            let init: Symbol<unsafe extern "C" fn(c_uint) -> CuResult> =
                lib.get(b"cuInit\0").map_err(|e| sym_err("cuInit", e))?;
            let get_count: Symbol<unsafe extern "C" fn(*mut c_int) -> CuResult> = lib
                .get(b"cuDeviceGetCount\0")
                .map_err(|e| sym_err("cuDeviceGetCount", e))?;
            let get: Symbol<unsafe extern "C" fn(*mut c_int, c_int) -> CuResult> = lib
                .get(b"cuDeviceGet\0")
                .map_err(|e| sym_err("cuDeviceGet", e))?;
            let get_name: Symbol<unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult> = lib
                .get(b"cuDeviceGetName\0")
                .map_err(|e| sym_err("cuDeviceGetName", e))?;
            let status = init(0);
            if status != 0 {
                bail!(
                    "--device cuda: the NVIDIA driver loads but finds no usable GPU (cuInit: {})",
                    error_name(lib, status)
                );
            }
            let mut count: c_int = 0;
            let status = get_count(&mut count);
            if status != 0 {
                bail!(
                    "--device cuda: cannot count the GPUs (cuDeviceGetCount: {})",
                    error_name(lib, status)
                );
            }
            let count = count.max(0) as usize;
            if index >= count {
                match count {
                    0 => bail!("--device cuda:{index}: the NVIDIA driver sees no GPU"),
                    1 => bail!(
                        "--device cuda:{index}: no such GPU: the driver sees one (cuda:0)"
                    ),
                    n => bail!(
                        "--device cuda:{index}: no such GPU: the driver sees {n} (cuda:0 to cuda:{})",
                        n - 1
                    ),
                }
            }
            let mut dev: c_int = 0;
            let mut buf = [0 as c_char; 256];
            let name = if get(&mut dev, index as c_int) == 0
                && get_name(buf.as_mut_ptr(), buf.len() as c_int, dev) == 0
            {
                CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
            } else {
                "unnamed GPU".to_string()
            };
            name
        };
        nvrtc()?;
        headers()?;
        Ok(name)
    }

    /// burn's CUDA backend compiles its kernels when they are first used, with NVRTC (part of the
    /// CUDA toolkit, and of PyTorch's CUDA wheels), loaded by name like this.
    fn nvrtc() -> Result<()> {
        let names = [
            "libnvrtc.so",
            "libnvrtc.so.13",
            "libnvrtc.so.12",
            "libnvrtc.so.11",
        ];
        for name in names {
            // SAFETY: loading NVRTC runs only its initialisers; the library stays loaded for
            // cudarc, which opens it again by the same name.
            if let Ok(lib) = unsafe { Library::new(name) } {
                std::mem::forget(lib);
                return Ok(());
            }
        }
        bail!(
            "--device cuda: cannot load NVRTC ({}), the CUDA run-time compiler that burn's CUDA \
             backend compiles its kernels with: install the CUDA toolkit, or put the folder that \
             holds libnvrtc.so.* (the toolkit's lib64, or PyTorch's nvidia/*/lib) on LD_LIBRARY_PATH",
            names.join(", ")
        )
    }

    /// The CUDA toolkit folder as burn's CUDA backend finds it (cubecl-cuda 0.10's
    /// `install::cuda_path`): `$CUDA_PATH`, else /usr/local/cuda, /opt/cuda, or /usr when
    /// /usr/bin/nvcc exists. Its kernels include `cuda_runtime.h` from there.
    fn headers() -> Result<()> {
        let root = if let Some(p) = std::env::var_os("CUDA_PATH") {
            Some(PathBuf::from(p))
        } else if std::path::Path::new("/usr/local/cuda").exists() {
            Some(PathBuf::from("/usr/local/cuda"))
        } else if std::path::Path::new("/opt/cuda").exists() {
            Some(PathBuf::from("/opt/cuda"))
        } else if std::path::Path::new("/usr/bin/nvcc").exists() {
            Some(PathBuf::from("/usr"))
        } else {
            None
        };
        let Some(root) = root else {
            bail!(
                "--device cuda: no CUDA headers (no $CUDA_PATH, /usr/local/cuda or /opt/cuda): \
                 burn's CUDA backend compiles its kernels at run time and includes cuda_runtime.h; \
                 install the CUDA toolkit or set CUDA_PATH to a folder with include/cuda_runtime.h"
            );
        };
        let header = root.join("include").join("cuda_runtime.h");
        if !header.exists() {
            bail!(
                "--device cuda: {} does not exist: burn's CUDA backend compiles its kernels at run \
                 time and includes it; set CUDA_PATH to a CUDA toolkit folder",
                header.display()
            );
        }
        Ok(())
    }
}

/// Makes this thread and every thread of rayon's global pool (where burn's and our CPU kernels
/// run) treat subnormal floats as zero, in inputs and in results.
///
/// Why: Adam with L2 weight decay shrinks a weight that gets no gradient from the data (a dead
/// ReLU's) by `lr * wd / eps` of itself per step, so such weights sink through the subnormal range
/// (below 1.2e-38) instead of reaching zero. x86 cores take a slow path for each subnormal operand:
/// the whole network fine-tuned on all 60,000 labels had 11% subnormal weights by its last epoch,
/// and its epochs slowed from 41 s to 110-140 s. Values that small change no prediction. On CPUs
/// other than x86-64 this does nothing.
pub fn flush_denormals_on_kernel_threads() {
    set_flush_to_zero();
    rayon::broadcast(|_| set_flush_to_zero());
}

/// Sets the FTZ (flush results to zero) and DAZ (read subnormal inputs as zero) bits of this
/// thread's MXCSR register, which SSE and AVX arithmetic obey.
#[cfg(target_arch = "x86_64")]
fn set_flush_to_zero() {
    const FTZ: u32 = 1 << 15;
    const DAZ: u32 = 1 << 6;
    let mut csr: u32 = 0;
    // SAFETY: `stmxcsr`/`ldmxcsr` read and write this thread's SSE control register through a
    // valid pointer to a local; setting FTZ and DAZ changes only how subnormals are rounded.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
        csr |= FTZ | DAZ;
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn set_flush_to_zero() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_always_usable_and_resolves_to_a_concrete_device() {
        ensure_available(DeviceKind::Auto).unwrap();
        ensure_available(DeviceKind::Cpu).unwrap();
        let chosen = resolve(DeviceKind::Auto).unwrap();
        assert_ne!(chosen, DeviceKind::Auto);
        if cfg!(not(feature = "cuda")) {
            assert_eq!(chosen, DeviceKind::Cpu);
        }
        assert_eq!(resolve(DeviceKind::Cuda(3)).unwrap(), DeviceKind::Cuda(3));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        for kind in [DeviceKind::Cuda(0), DeviceKind::Cuda(1)] {
            let err = ensure_available(kind).unwrap_err().to_string();
            assert!(err.contains("built without CUDA support"), "{err}");
        }
    }

    /// Adds a subnormal to zero and halves the smallest normal float on the calling thread.
    #[cfg(target_arch = "x86_64")]
    fn subnormal_arithmetic() -> (f32, f32) {
        use std::hint::black_box;
        let sum = black_box(1e-40_f32) + black_box(0.0_f32);
        let product = black_box(f32::MIN_POSITIVE) * black_box(0.5_f32);
        (sum, product)
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kernel_threads_read_and_write_subnormals_as_zero() {
        // A thread nobody set up keeps IEEE subnormals: the check below can fail.
        let plain = std::thread::spawn(subnormal_arithmetic).join().unwrap();
        assert!(plain.0 > 0.0 && plain.1 > 0.0, "{plain:?}");
        flush_denormals_on_kernel_threads();
        assert_eq!(subnormal_arithmetic(), (0.0, 0.0));
        for on_worker in rayon::broadcast(|_| subnormal_arithmetic()) {
            assert_eq!(on_worker, (0.0, 0.0));
        }
    }
}
