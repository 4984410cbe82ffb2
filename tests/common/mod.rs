//! Shared helpers of the integration tests: the real binary, and data directories cut from the
//! real Fashion-MNIST files.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use frugal::checkpoint::Checkpoint;

use frugal::data::idx;
use frugal::data::DEFAULT_DATA_DIR;

/// The `frugal` binary built for these tests.
pub fn frugal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_frugal"))
}

/// The repository root (pipelines live there).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The smoke pipeline.
pub fn smoke_pipeline() -> PathBuf {
    repo().join("pipelines/smoke.toml")
}

/// Runs `cmd` to the end and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("cannot start frugal")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn real(name: &str) -> PathBuf {
    let p = Path::new(DEFAULT_DATA_DIR).join(name);
    assert!(
        p.exists(),
        "{} is missing: install Debian's package dataset-fashion-mnist (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A data directory holding the first `train` training images and the first `test` test images
/// and labels of the real dataset, gzipped IDX files as Debian ships them. No training labels: the
/// pretraining stage must not need them.
pub fn sliced_data_dir(dir: &Path, train: usize, test: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let side = 28;
    for (split, n) in [("train", train), ("t10k", test)] {
        let images =
            idx::read_images(&real(&format!("{split}-images-idx3-ubyte.gz")), side, side).unwrap();
        let pixels = &images.pixels[..n * side * side];
        std::fs::write(
            dir.join(format!("{split}-images-idx3-ubyte.gz")),
            gz(&idx::encode(&[n, side, side], pixels)),
        )
        .unwrap();
    }
    let labels = idx::read_labels(&real("t10k-labels-idx1-ubyte.gz"), 10).unwrap();
    std::fs::write(
        dir.join("t10k-labels-idx1-ubyte.gz"),
        gz(&idx::encode(&[test], &labels[..test])),
    )
    .unwrap();
    dir.to_path_buf()
}

/// Like [`sliced_data_dir`], plus the first `train` training labels: what the label database's
/// import reads (and nothing else does).
pub fn sliced_data_dir_with_labels(dir: &Path, train: usize, test: usize) -> PathBuf {
    sliced_data_dir(dir, train, test);
    let labels = idx::read_labels(&real("train-labels-idx1-ubyte.gz"), 10).unwrap();
    std::fs::write(
        dir.join("train-labels-idx1-ubyte.gz"),
        gz(&idx::encode(&[train], &labels[..train])),
    )
    .unwrap();
    dir.to_path_buf()
}

/// `frugal finetune` on the smoke-finetune pipeline with outputs under `root`, data from `data`
/// and the encoder run `encoder`.
pub fn smoke_finetune(root: &Path, data: &Path, encoder: &Path, run_name: &str) -> Command {
    finetune_with(
        &repo().join("pipelines/smoke-finetune.toml"),
        root,
        data,
        encoder,
        run_name,
    )
}

/// `frugal finetune` on `pipeline`, otherwise as [`smoke_finetune`].
pub fn finetune_with(
    pipeline: &Path,
    root: &Path,
    data: &Path,
    encoder: &Path,
    run_name: &str,
) -> Command {
    let mut cmd = frugal();
    cmd.args(["finetune", "--pipeline"])
        .arg(pipeline)
        .args(["--run", run_name, "--checkpoints"])
        .arg(root)
        .arg("--data-dir")
        .arg(data)
        .arg("--encoder")
        .arg(encoder)
        .args(["--threads", "2"]);
    cmd
}

/// `frugal ssl-pretrain` on the smoke pipeline with outputs under `root` and data from `data`.
pub fn smoke(root: &Path, data: &Path, run_name: &str) -> Command {
    smoke_with(&smoke_pipeline(), root, data, run_name)
}

/// `frugal ssl-pretrain` on the SimCLR smoke pipeline (`pipelines/smoke-simclr.toml`).
pub fn smoke_simclr(root: &Path, data: &Path, run_name: &str) -> Command {
    smoke_with(
        &repo().join("pipelines/smoke-simclr.toml"),
        root,
        data,
        run_name,
    )
}

/// `frugal ssl-pretrain` on `pipeline` with outputs under `root` and data from `data`.
pub fn smoke_with(pipeline: &Path, root: &Path, data: &Path, run_name: &str) -> Command {
    let mut cmd = frugal();
    cmd.args(["ssl-pretrain", "--pipeline"])
        .arg(pipeline)
        .args(["--run", run_name, "--checkpoints"])
        .arg(root)
        .arg("--data-dir")
        .arg(data)
        .args(["--threads", "2"]);
    cmd
}

/// The per-step columns of a run's metrics.csv that must match between runs (all but images/s).
pub fn metric_rows(run_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(run_dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_string())
        .collect()
}

/// Reads `summary.json` of a run.
pub fn summary(run_dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run_dir.join("summary.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Starts `cmd`, waits until the run's checkpoint has reached at least `step` without being
/// finished, then SIGKILLs it. Returns the checkpoint step at the kill, or None if the process
/// ended first.
pub fn kill_after_checkpoint(
    cmd: &mut std::process::Command,
    run_dir: &Path,
    step: u64,
) -> Option<u64> {
    // Let it run on a little past the checkpoint, so there is work to lose; briefly, as a small
    // run on a fast machine does 150 steps a second and would finish before the kill.
    kill_when(cmd, run_dir, Duration::from_millis(25), |ck| {
        (ck.header.global_step >= step && !ck.header.finished).then_some(ck.header.global_step)
    })
}

/// Starts `cmd` and SIGKILLs it `settle` after `at` first returns `Some` for the run's
/// checkpoint; returns that value, or None if the process ended first. Fails after 5 minutes.
pub fn kill_when(
    cmd: &mut std::process::Command,
    run_dir: &Path,
    settle: Duration,
    at: impl Fn(&Checkpoint) -> Option<u64>,
) -> Option<u64> {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        if let Some(v) = Checkpoint::load(&run_dir.join("checkpoint.bin"))
            .ok()
            .and_then(|ck| at(&ck))
        {
            std::thread::sleep(settle);
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return Some(v);
        }
        assert!(
            Instant::now() < deadline,
            "the run never got to the kill point"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
