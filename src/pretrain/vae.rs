//! VAE pretraining: the loss and the reconstruction grids, on the shared loop of [`super::driver`].

use std::sync::Arc;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use burn::tensor::backend::AutodiffBackend;
use rand_distr::{Distribution, StandardNormal};

use super::driver::{self, Metric, Objective, PlannedBatch};
use super::{PretrainRun, PretrainSummary};
use crate::data::batch::{self, fixed_subsample, images_tensor, rng_for};
use crate::data::{FashionMnist, Split, IMAGE_SIDE};
use crate::device::BackendJob;
use crate::models::vae::vae_losses;
use crate::models::{host_values, Vae, VaeConfig};
use crate::tensorboard::{image_grid, EventWriter};

/// Pretrains a [`Vae`]; see [`super::pretrain`].
pub struct VaePretrain(pub PretrainRun);

impl BackendJob for VaePretrain {
    type Output = PretrainSummary;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<PretrainSummary> {
        let cfg = &self.0.cfg;
        let train = Arc::new(FashionMnist::load_images(
            &cfg.data.dir,
            Split::Train,
            cfg.data.limit,
        )?);
        let objective = VaeObjective::<B>::new(cfg, train.clone(), &device);
        driver::train(self.0, train, objective, device)
    }
}

/// The VAE's loss (negative ELBO per image, with a KL weight) and reports.
pub(crate) struct VaeObjective<B: AutodiffBackend> {
    cfg: VaeConfig,
    kl_weight: f64,
    seed: u64,
    /// Training images shown with their reconstructions.
    recon_idx: Vec<usize>,
    train: Arc<FashionMnist>,
    device: B::Device,
}

impl<B: AutodiffBackend> VaeObjective<B> {
    /// The objective of `cfg` on the images `train` (also used by `frugal bench speed`).
    pub(crate) fn new(
        cfg: &crate::config::PretrainConfig,
        train: Arc<FashionMnist>,
        device: &B::Device,
    ) -> Self {
        Self {
            cfg: cfg.vae.clone(),
            kl_weight: cfg.train.kl_weight,
            seed: cfg.train.seed,
            recon_idx: fixed_subsample(
                train.len(),
                cfg.report.reconstruction_images,
                cfg.train.seed,
            ),
            train,
            device: device.clone(),
        }
    }
}

impl<B: AutodiffBackend> Objective<B> for VaeObjective<B> {
    type Model = Vae<B>;
    const NAME: &'static str = "vae";
    const METRICS: &'static [Metric] = &[
        Metric {
            key: "loss",
            tag: "loss/total",
        },
        Metric {
            key: "reconstruction",
            tag: "loss/reconstruction",
        },
        Metric {
            key: "kl",
            tag: "loss/kl",
        },
    ];

    fn init(&self, device: &B::Device) -> Vae<B> {
        self.cfg.init(device)
    }

    fn plan(&mut self, _batches: Vec<PlannedBatch>) {}

    fn step(&mut self, model: &Vae<B>, step: u64, indices: &[usize]) -> Result<Vec<Tensor<B, 1>>> {
        let x = images_tensor::<B>(&self.train, indices, &self.device);
        let eps = noise::<B>(
            self.seed,
            step,
            indices.len(),
            self.cfg.latent_dim,
            &self.device,
        );
        let out = model.forward(x.clone(), eps);
        let (recon, kl) = vae_losses(&out, x);
        let loss = recon.clone() + kl.clone() * self.kl_weight;
        Ok(vec![loss, recon.detach(), kl.detach()])
    }

    fn report(
        &mut self,
        tb: &mut EventWriter,
        model: &Vae<B>,
        step: u64,
    ) -> Result<Vec<(String, f64)>> {
        log_reconstructions(tb, model, &self.train, &self.recon_idx, &self.device, step)?;
        Ok(Vec::new())
    }

    fn embed(
        &self,
        model: &Vae<B::InnerBackend>,
        images: Tensor<B::InnerBackend, 4>,
    ) -> Tensor<B::InnerBackend, 2> {
        model.embed(images)
    }

    fn embedding(&self) -> (&'static str, usize) {
        ("vae_latent_mean", self.cfg.latent_dim)
    }
}

/// Standard normal noise `[batch, latent]` for step `step`, drawn on the host from the run's seed:
/// the same step sees the same noise after a resume, on every backend.
fn noise<B: Backend>(
    seed: u64,
    step: u64,
    batch: usize,
    latent: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let mut rng = rng_for(seed, batch::stream::NOISE, step);
    let values: Vec<f32> = (0..batch * latent)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_data(TensorData::new(values, [batch, latent]), device)
}

/// A grid of fixed training images and their reconstructions (decoded latent means): rows of
/// eight inputs, each followed by the row of their reconstructions. Tag `reconstructions`.
fn log_reconstructions<B: AutodiffBackend>(
    tb: &mut EventWriter,
    model: &Vae<B>,
    data: &FashionMnist,
    indices: &[usize],
    device: &B::Device,
    step: u64,
) -> Result<()> {
    if indices.is_empty() {
        return Ok(());
    }
    let inner = model.valid();
    let x = images_tensor::<B::InnerBackend>(data, indices, device);
    let recon = sigmoid(inner.decode(inner.embed(x)));
    let recon = host_values(recon)?;
    let px = IMAGE_SIDE * IMAGE_SIDE;
    let inputs: Vec<Vec<f32>> = indices.iter().map(|&i| data.image_f32(i)).collect();
    let cols = indices.len().min(8);
    let mut tiles: Vec<&[f32]> = Vec::new();
    for (row, chunk) in inputs.chunks(cols).enumerate() {
        // A short last row is padded with blank tiles so reconstructions stay under their inputs.
        let blank = cols - chunk.len();
        tiles.extend(chunk.iter().map(|v| v.as_slice()));
        tiles.extend(std::iter::repeat_n(&[][..], blank));
        tiles.extend(recon[row * cols * px..].chunks(px).take(chunk.len()));
        tiles.extend(std::iter::repeat_n(&[][..], blank));
    }
    let grid = image_grid(&tiles, IMAGE_SIDE, IMAGE_SIDE, cols, 2);
    tb.add_image("reconstructions", &grid, step)
}
