//! Pipeline configuration: serde structs with defaults, read from `pipelines/*.toml`, overridden by
//! command-line flags, saved as the effective config in the run directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::DEFAULT_DATA_DIR;
use crate::models::{SimclrConfig, VaeConfig};

/// Self-supervised pretraining methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Convolutional variational autoencoder.
    Vae,
    /// Contrastive learning of two augmented views per image (SimCLR, NT-Xent loss).
    Simclr,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Vae => "vae",
            Method::Simclr => "simclr",
        }
    }
}

/// Where the tensors live: `cpu`, `cuda` (the first GPU), `cuda:N` (GPU number N, from 0) or
/// `auto` (the first GPU when this binary has CUDA support and a GPU is usable, else the CPU).
/// Written the same way in pipeline files (`device = "cuda:1"`) and on the command line
/// (`--device cuda:1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceKind {
    /// burn's `flex` CPU backend.
    #[default]
    Cpu,
    /// An NVIDIA GPU, by index (0 is the first), through burn's CUDA backend (binary built with
    /// `--features cuda`).
    Cuda(usize),
    /// The first GPU if this binary has CUDA support and one is usable, else the CPU; resolved
    /// (and announced on stderr) when the run starts.
    Auto,
}

impl DeviceKind {
    /// The accepted spellings, for error messages and help.
    pub const FORMS: &'static str =
        "cpu, cuda (the first GPU), cuda:N (GPU number N, from 0) or auto (a GPU if usable, else the CPU)";
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceKind::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda(0)),
            "auto" => Ok(DeviceKind::Auto),
            _ => match s.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => n
                    .parse()
                    .map(DeviceKind::Cuda)
                    .map_err(|_| format!("GPU index too large in device {s:?}")),
                Some(_) => Err(format!(
                    "bad GPU index in device {s:?}: expected cuda:N with N a number (cuda:0 is the first GPU)"
                )),
                None => Err(format!(
                    "unknown device {s:?}: expected {}",
                    DeviceKind::FORMS
                )),
            },
        }
    }
}

/// `#[arg(long)] device: DeviceKind` (or `Option<DeviceKind>`) parses with [`str::parse`]: clap's
/// `value_enum` cannot take `cuda:N`.
impl clap::builder::ValueParserFactory for DeviceKind {
    type Parser = fn(&str) -> std::result::Result<DeviceKind, String>;
    fn value_parser() -> Self::Parser {
        |s| s.parse()
    }
}

impl Serialize for DeviceKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Learning-rate schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    /// Cosine decay from `learning_rate` to `learning_rate * min_lr_ratio` over the run.
    Cosine,
}

/// `frugal ssl-pretrain`: everything a run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    pub method: Method,
    pub device: DeviceKind,
    pub data: DataConfig,
    pub vae: VaeConfig,
    pub simclr: SimclrConfig,
    pub train: TrainConfig,
    pub checkpoint: CheckpointConfig,
    pub report: ReportConfig,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            method: Method::Vae,
            device: DeviceKind::Cpu,
            data: DataConfig::default(),
            vae: VaeConfig::default(),
            simclr: SimclrConfig::default(),
            train: TrainConfig::default(),
            checkpoint: CheckpointConfig::default(),
            report: ReportConfig::default(),
        }
    }
}

/// Which images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Directory with the IDX files (gzipped or not).
    pub dir: PathBuf,
    /// Use only the first N training images (all when absent).
    pub limit: Option<usize>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(DEFAULT_DATA_DIR),
            limit: None,
        }
    }
}

/// The optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: u64,
    /// Images per step (SimCLR sees two views of each).
    pub batch_size: usize,
    /// Adam's learning rate (peak, with a schedule).
    pub learning_rate: f64,
    pub lr_schedule: LrSchedule,
    /// Linear warm-up steps before the schedule.
    pub warmup_steps: u64,
    /// Floor of the cosine schedule, as a fraction of `learning_rate`.
    pub min_lr_ratio: f64,
    /// Adam's L2 weight decay (0: none).
    pub weight_decay: f64,
    /// Weight of the KL term (beta-VAE; 1 is the plain ELBO).
    pub kl_weight: f64,
    /// Seed of every random choice: initial weights, data order, noise.
    pub seed: u64,
    /// CPU threads for the tensor kernels (0: one per core).
    pub threads: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 256,
            learning_rate: 1e-3,
            lr_schedule: LrSchedule::Cosine,
            warmup_steps: 100,
            min_lr_ratio: 0.05,
            weight_decay: 0.0,
            kl_weight: 1.0,
            seed: 42,
            threads: 0,
        }
    }
}

/// When to write checkpoints (always at the end of every epoch, too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Also write one when this many minutes passed since the last.
    pub every_minutes: f64,
    /// Also write one every this many steps (0: off).
    pub every_steps: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every_minutes: 5.0,
            every_steps: 0,
        }
    }
}

/// What goes to TensorBoard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReportConfig {
    /// Log step scalars every this many steps.
    pub log_every_steps: u64,
    /// Images in the input/reconstruction grid.
    pub reconstruction_images: usize,
    /// Buckets of the weight histograms.
    pub histogram_buckets: usize,
    /// Test images shown in the embedding projector at the end (0: none).
    pub projector_samples: usize,
    /// SimCLR: images whose two views are shown side by side at the start of the run.
    pub view_pair_images: usize,
    /// SimCLR's dashboard k-NN classifier, after each epoch: a fixed random set of this many test
    /// images (with their labels) is the memory bank, the other test images are scored. For the
    /// dashboard only, never used to choose anything; 0 turns it off.
    pub knn_fit_images: usize,
    /// Neighbours that vote (by cosine similarity of the encoder's features).
    pub knn_k: usize,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self {
            log_every_steps: 10,
            reconstruction_images: 32,
            histogram_buckets: 30,
            projector_samples: 2000,
            view_pair_images: 16,
            knn_fit_images: 1000,
            knn_k: 20,
        }
    }
}

impl PretrainConfig {
    /// The built-in defaults of `method` (the same as `pipelines/fashion-<method>.toml`).
    pub fn for_method(method: Method) -> Self {
        match method {
            Method::Vae => Self::default(),
            Method::Simclr => Self {
                method,
                train: TrainConfig {
                    epochs: 8,
                    batch_size: 512,
                    warmup_steps: 50,
                    weight_decay: 1e-6,
                    ..TrainConfig::default()
                },
                ..Self::default()
            },
        }
    }

    /// Reads a pipeline file; missing fields take their defaults, unknown ones are errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_toml(path)
    }

    /// The config as TOML (the effective config saved in each run).
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// The model's architecture, as recorded in checkpoints.
    pub fn architecture(&self) -> serde_json::Value {
        match self.method {
            Method::Vae => serde_json::to_value(&self.vae).unwrap_or_default(),
            Method::Simclr => self.simclr.architecture(),
        }
    }

    /// Checks values that would otherwise fail deep inside training.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.epochs == 0 {
            bail!("train.epochs must be at least 1");
        }
        if t.batch_size == 0 {
            bail!("train.batch_size must be at least 1");
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            bail!(
                "train.learning_rate must be a positive number, got {}",
                t.learning_rate
            );
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            bail!(
                "train.min_lr_ratio must be in [0, 1], got {}",
                t.min_lr_ratio
            );
        }
        if !(t.kl_weight.is_finite() && t.kl_weight >= 0.0) {
            bail!("train.kl_weight must be >= 0, got {}", t.kl_weight);
        }
        if self.data.limit == Some(0) {
            bail!("data.limit must be at least 1");
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            bail!("train.weight_decay must be >= 0, got {}", t.weight_decay);
        }
        if self.vae.latent_dim == 0 || self.vae.encoder.channels.contains(&0) {
            bail!("vae.latent_dim and vae.encoder.channels must be positive");
        }
        let s = &self.simclr;
        s.encoder.validate("simclr.encoder")?;
        if s.projection_hidden == 0 || s.projection_dim == 0 {
            bail!("simclr.projection_hidden and simclr.projection_dim must be positive");
        }
        if !(s.temperature.is_finite() && s.temperature > 0.0) {
            bail!(
                "simclr.temperature must be a positive number, got {}",
                s.temperature
            );
        }
        s.augment.validate()?;
        if self.method == Method::Simclr {
            if t.batch_size < 2 {
                bail!("train.batch_size must be at least 2 for simclr (the other images of a batch are its negatives)");
            }
            if t.batch_size > crate::data::augment::MAX_VIEW_BATCH {
                bail!(
                    "train.batch_size must be at most {} for simclr",
                    crate::data::augment::MAX_VIEW_BATCH
                );
            }
            if self.report.knn_fit_images > 0 && self.report.knn_k == 0 {
                bail!("report.knn_k must be at least 1 (or set report.knn_fit_images = 0)");
            }
        }
        if self.report.log_every_steps == 0 {
            bail!("report.log_every_steps must be at least 1");
        }
        if !(self.checkpoint.every_minutes.is_finite() && self.checkpoint.every_minutes > 0.0) {
            bail!("checkpoint.every_minutes must be positive");
        }
        Ok(())
    }

    /// Learning rate at optimizer step `step` of `total_steps`.
    pub fn learning_rate(&self, step: u64, total_steps: u64) -> f64 {
        let t = &self.train;
        if step < t.warmup_steps {
            return t.learning_rate * (step + 1) as f64 / t.warmup_steps as f64;
        }
        match t.lr_schedule {
            LrSchedule::Constant => t.learning_rate,
            LrSchedule::Cosine => warmup_cosine(
                t.learning_rate,
                t.warmup_steps,
                t.min_lr_ratio,
                step,
                total_steps,
            ),
        }
    }
}

/// Learning rate at optimizer step `step` of `total_steps`: linear warm-up to `peak` over
/// `warmup` steps, then cosine decay to `peak * min_ratio` at the last step.
pub fn warmup_cosine(peak: f64, warmup: u64, min_ratio: f64, step: u64, total_steps: u64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total_steps.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let floor = peak * min_ratio;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Reads a TOML pipeline or saved config into `T`: missing fields take their defaults, unknown
/// ones are errors naming the file.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: invalid config: {}",
            path.display(),
            one_line(&e.to_string())
        )
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_pipelines_parse_and_validate() {
        for name in [
            "fashion-vae.toml",
            "smoke.toml",
            "fashion-simclr.toml",
            "fashion-simclr-wide.toml",
            "fashion-simclr-wide2.toml",
            "fashion-simclr-resnet.toml",
            "smoke-simclr.toml",
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("pipelines")
                .join(name);
            let cfg = PretrainConfig::from_file(&path).unwrap();
            cfg.validate().unwrap();
            let back: PretrainConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
            assert_eq!(back, cfg, "{name} survives a save/load");
        }
    }

    #[test]
    fn shipped_pipelines_are_the_builtin_defaults() {
        for method in [Method::Vae, Method::Simclr] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("pipelines")
                .join(format!("fashion-{}.toml", method.name()));
            let cfg = PretrainConfig::from_file(&path).unwrap();
            assert_eq!(
                cfg,
                PretrainConfig::for_method(method),
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn encoder_kinds_parse() {
        let cfg: PretrainConfig = toml::from_str(
            "method = \"simclr\"\n[simclr.encoder]\nkind = \"resnet\"\nwidths = [8, 16, 32]\nblocks = [1, 2, 1]\n",
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.simclr.encoder.feature_dim(), 32);
        let err = toml::from_str::<PretrainConfig>(
            "[simclr.encoder]\nkind = \"resnet\"\nwidthz = [8, 16, 32]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("widthz"), "{err}");
        let err = toml::from_str::<PretrainConfig>("[simclr.encoder]\nkind = \"vgg\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("vgg"), "{err}");
    }

    #[test]
    fn devices_parse_in_flags_and_pipelines() {
        for (text, kind) in [
            ("cpu", DeviceKind::Cpu),
            ("cuda", DeviceKind::Cuda(0)),
            ("cuda:0", DeviceKind::Cuda(0)),
            ("cuda:3", DeviceKind::Cuda(3)),
            ("auto", DeviceKind::Auto),
        ] {
            assert_eq!(text.parse::<DeviceKind>(), Ok(kind), "{text}");
            let cfg: PretrainConfig = toml::from_str(&format!("device = \"{text}\"\n")).unwrap();
            assert_eq!(cfg.device, kind, "{text} in a pipeline");
            let back: PretrainConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
            assert_eq!(back.device, kind, "{text} survives a save/load");
        }
        assert_eq!(DeviceKind::Cuda(2).to_string(), "cuda:2");
        for bad in [
            "gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cuda:1:2", "cuda0", "",
        ] {
            let err = bad.parse::<DeviceKind>().unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
            assert!(err.contains("cuda:N") || err.contains("cuda:0"), "{err}");
        }
        let err = toml::from_str::<PretrainConfig>("device = \"gpu\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("device") && err.contains("\"gpu\"") && err.contains("cuda:N"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(&p, "[train]\nepochz = 3\n").unwrap();
        let err = PretrainConfig::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("epochz") && err.contains("p.toml"), "{err}");
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = PretrainConfig::default();
        let lr = |s| cfg.learning_rate(s, 1000);
        assert!(lr(0) < lr(50) && lr(50) < lr(99));
        assert!((lr(99) - 1e-3).abs() < 1e-12);
        assert!(lr(500) < lr(100) && lr(999) >= 1e-3 * 0.05 - 1e-12);
    }
}
