//! Self-supervised pretraining on the unlabeled training images. One file per method over the
//! shared parts here: the run's state, checkpoints, TensorBoard reports and the summary.

pub mod contrastive;
pub mod driver;
pub mod knn;
pub mod simclr;
pub mod vae;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use burn::module::Module;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::config::{Method, PretrainConfig};
use crate::data::{batch, FashionMnist, Split, CLASS_NAMES, IMAGE_SIDE};
use crate::device;
use crate::models::named_params;
use crate::run::RunDir;
use crate::tensorboard::{write_projector, Embedding, EventWriter};

/// The stage name recorded in checkpoints.
pub const STAGE: &str = "pretrain";

/// A pretraining run, ready to start or to resume.
pub struct PretrainRun {
    pub cfg: PretrainConfig,
    pub run: RunDir,
    /// The checkpoint to continue from (`--resume`), already checked against `cfg`.
    pub resume: Option<Checkpoint>,
}

/// What a finished run reports (also written to `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainSummary {
    pub method: String,
    pub run_dir: String,
    pub device: String,
    pub images: usize,
    pub epochs: u64,
    pub global_step: u64,
    /// Seconds spent in training steps (summed over resumed sessions).
    pub train_seconds: f64,
    pub images_per_second: f64,
    /// Mean losses over the last epoch, per image.
    pub last_epoch_losses: serde_json::Value,
    /// The method's dashboard numbers after the last epoch (SimCLR: the test k-NN accuracy; for
    /// reporting only).
    #[serde(default)]
    pub dashboard: BTreeMap<String, f64>,
    /// Sum and sum of squares of all weights: equal for runs that trained identically.
    pub weights_sum: f64,
    pub weights_sum_squares: f64,
    pub seed: u64,
}

/// Runs (or resumes) pretraining on the configured device.
pub fn pretrain(run: PretrainRun) -> Result<PretrainSummary> {
    let (kind, threads) = (run.cfg.device, run.cfg.train.threads);
    match run.cfg.method {
        Method::Vae => device::run_on(kind, threads, vae::VaePretrain(run)),
        Method::Simclr => device::run_on(kind, threads, simclr::SimclrPretrain(run)),
    }
}

/// One histogram per parameter tensor, tagged `weights/<path>`.
pub fn log_weight_histograms<B: Backend, M: Module<B>>(
    tb: &mut EventWriter,
    module: &M,
    buckets: usize,
    step: u64,
) -> Result<()> {
    for (name, values) in named_params(module)? {
        tb.add_histogram(&format!("weights/{name}"), &values, buckets, step)?;
    }
    Ok(())
}

/// Test images for the projector: a fixed subsample with labels (used only to colour the plot).
pub struct ProjectorSample {
    pub images: FashionMnist,
    pub indices: Vec<usize>,
    pub labels: Vec<u8>,
}

impl ProjectorSample {
    /// Loads `k` fixed test images (the same for every run) and their labels; `None` for `k = 0`.
    pub fn load(dir: &Path, k: usize) -> Result<Option<Self>> {
        if k == 0 {
            return Ok(None);
        }
        let images = FashionMnist::load_images(dir, Split::Test, None)?;
        let all_labels = FashionMnist::load_labels(dir, Split::Test, &images)?;
        let indices = batch::fixed_subsample(images.len(), k, 0);
        let labels = indices.iter().map(|&i| all_labels[i]).collect();
        Ok(Some(Self {
            images,
            indices,
            labels,
        }))
    }

    /// Writes the projector files and an event file into `dir`; `vectors` is `[k, dim]`.
    pub fn write(&self, dir: &Path, name: &str, vectors: &[f32], dim: usize) -> Result<()> {
        let mut tb = EventWriter::create(dir)?;
        let metadata: Vec<Vec<String>> = self
            .labels
            .iter()
            .map(|&l| vec![l.to_string(), CLASS_NAMES[l as usize].to_string()])
            .collect();
        let sprite: Vec<f32> = self
            .indices
            .iter()
            .flat_map(|&i| self.images.image_f32(i))
            .collect();
        write_projector(
            dir,
            &Embedding {
                name,
                vectors,
                dim,
                metadata_header: &["label", "class"],
                metadata: &metadata,
                sprite: Some((&sprite, IMAGE_SIDE)),
            },
        )?;
        tb.add_scalar("projector/points", self.indices.len() as f32, 0)?;
        tb.flush()
    }
}
