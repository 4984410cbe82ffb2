//! The run directory `checkpoints/<run>/`: effective config, checkpoint, metrics, TensorBoard logs.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Files of one run.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    /// The directory of run `name` under `checkpoints`.
    pub fn new(checkpoints: &Path, name: &str) -> Result<Self> {
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            bail!(
                "--run must be a plain name (got {name:?}); use --checkpoints to pick another root"
            );
        }
        Ok(Self {
            root: checkpoints.join(name),
        })
    }

    /// Prepares a fresh run: refuses a directory that already holds a checkpoint (that is what
    /// `--resume` is for; nothing is ever overwritten), creates it and checks it is writable.
    pub fn create_fresh(&self) -> Result<()> {
        if self.checkpoint().exists() {
            bail!(
                "{} already holds a run (its checkpoint is {}): pass --resume to continue it, or \
                 choose another --run",
                self.root.display(),
                self.checkpoint().display()
            );
        }
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create run directory {}", self.root.display()))?;
        self.check_writable()
    }

    /// Checks an existing run for `--resume`, and removes temporary files that a process killed in
    /// the middle of an atomic write or of a label-database import left behind (the real files were
    /// never touched).
    pub fn open_existing(&self) -> Result<()> {
        if !self.root.is_dir() {
            bail!(
                "run directory {} does not exist: nothing to resume (run without --resume to start it)",
                self.root.display()
            );
        }
        self.check_writable()?;
        for entry in std::fs::read_dir(&self.root)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && (name.contains(".tmp.") || name.contains(".partial-")) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        let probe = self
            .root
            .join(format!(".write-test.{}", std::process::id()));
        std::fs::write(&probe, b"")
            .with_context(|| format!("run directory {} is not writable", self.root.display()))?;
        let _ = std::fs::remove_file(probe);
        Ok(())
    }

    /// The effective config of the run.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// The latest checkpoint (model, optimizer, progress, RNG state).
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint.bin")
    }

    /// Per-step metrics as CSV.
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.csv")
    }

    /// The final summary.
    pub fn summary(&self) -> PathBuf {
        self.root.join("summary.json")
    }

    /// Where the end-of-run embedding projector goes (its own TensorBoard run, so that a
    /// TensorBoard already open picks it up: it reads projector configs when runs appear).
    pub fn projector(&self) -> PathBuf {
        self.root.join("projector")
    }
}

/// `metrics.csv`: one row per logged step, kept consistent with the checkpoint on resume.
pub struct MetricsCsv {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsCsv {
    /// Opens the file for appending; with `resume_step`, first drops rows of steps after it (left
    /// by the interrupted process after its last checkpoint), so the file reads like one run.
    pub fn open(path: &Path, header: &[&str], resume_step: Option<u64>) -> Result<Self> {
        let header_line = header.join(",");
        let mut kept = format!("{header_line}\n");
        if let (Some(step), Ok(old)) = (resume_step, std::fs::read_to_string(path)) {
            for line in old.lines().skip(1) {
                let row_step = line.split(',').next().and_then(|s| s.parse::<u64>().ok());
                if matches!(row_step, Some(s) if s <= step) {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        crate::checkpoint::write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self {
            path: path.into(),
            file,
        })
    }

    /// Appends a row (the first value must be the step).
    pub fn row(&mut self, values: &[String]) -> Result<()> {
        writeln!(self.file, "{}", values.join(","))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Puts the rows on disk.
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("cannot flush {}", self.path.display()))
    }
}
