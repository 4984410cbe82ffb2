use clap::Parser;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let cli = frugal::cli::Cli::parse();
    match frugal::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Every training step allocates and frees tensors of megabytes. glibc serves those with fresh
/// `mmap`s and returns them on free, so each step page-faults its memory in again (about 8% of a
/// VAE step in `perf`). Serving them from the heap and not trimming it keeps the pages mapped:
/// the peak RSS grows by at most a step's worth of buffers.
fn keep_freed_memory() {
    #[cfg(target_os = "linux")]
    // SAFETY: mallopt only changes allocator thresholds; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
