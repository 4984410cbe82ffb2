//! Picks the burn backend at run time: `flex` on the CPU, CUDA when built with `--features cuda`.

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use crate::config::DeviceKind;

/// Work that runs on any autodiff backend. The CLI picks the backend from `--device` and calls
/// [`BackendJob::run`] with it.
pub trait BackendJob {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Runs `job` on the backend for `kind`. `threads` > 0 caps the CPU threads of the kernels.
pub fn run_on<J: BackendJob>(kind: DeviceKind, threads: usize, job: J) -> Result<J::Output> {
    if threads > 0 {
        // Fails only if the pool was already built (e.g. twice in one test process): harmless.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    match kind {
        DeviceKind::Cpu => {
            job.run::<burn::backend::Autodiff<burn::backend::Flex>>(burn::backend::flex::FlexDevice)
        }
        DeviceKind::Cuda => run_cuda(job),
    }
}

/// Checks that `kind` can be used by this binary on this machine, before any work starts.
pub fn ensure_available(kind: DeviceKind) -> Result<()> {
    match kind {
        DeviceKind::Cpu => Ok(()),
        DeviceKind::Cuda => cuda_available(),
    }
}

#[cfg(feature = "cuda")]
fn cuda_available() -> Result<()> {
    // burn's CUDA backend panics at the first tensor when the driver is missing: look first.
    // SAFETY: loading the NVIDIA driver library runs only its initialisers.
    match unsafe { libloading::Library::new("libcuda.so.1") } {
        Ok(_) => Ok(()),
        Err(e) => anyhow::bail!(
            "--device cuda: cannot load the NVIDIA driver (libcuda.so.1: {e}); is there a GPU and its driver?"
        ),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_available() -> Result<()> {
    Err(not_built_with_cuda())
}

#[cfg(not(feature = "cuda"))]
fn not_built_with_cuda() -> anyhow::Error {
    anyhow::anyhow!(
        "--device cuda: this frugal was built without CUDA support; rebuild with \
         `cargo build --release --features cuda`"
    )
}

#[cfg(feature = "cuda")]
fn run_cuda<J: BackendJob>(job: J) -> Result<J::Output> {
    cuda_available()?;
    let device = burn::backend::cuda::CudaDevice::default();
    job.run::<burn::backend::Autodiff<burn::backend::Cuda>>(device)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<J: BackendJob>(_job: J) -> Result<J::Output> {
    Err(not_built_with_cuda())
}
