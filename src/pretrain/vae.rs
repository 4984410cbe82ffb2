//! VAE pretraining: the training loop, its checkpoints and its TensorBoard reports.

use std::time::Instant;

use anyhow::{bail, Result};
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use burn::tensor::backend::AutodiffBackend;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::{log_weight_histograms, PretrainRun, PretrainSummary, ProjectorSample, STAGE};
use crate::checkpoint::{
    module_to_bytes, record_from_bytes, record_to_bytes, Checkpoint, CheckpointHeader,
};
use crate::data::batch::{self, epoch_order, fixed_subsample, images_tensor, rng_for};
use crate::data::{FashionMnist, Split, IMAGE_SIDE};
use crate::device::BackendJob;
use crate::models::vae::vae_losses;
use crate::models::{host_values, weights_fingerprint, Vae};
use crate::progress::{images_bar, log};
use crate::run::MetricsCsv;
use crate::tensorboard::{image_grid, EventWriter};

/// Pretrains a [`Vae`]; see [`super::pretrain`].
pub struct VaePretrain(pub PretrainRun);

/// Where training stands; saved in every checkpoint, so a resumed run continues exactly. The
/// counters live in the checkpoint header (the one place any stage reads them from); the rest goes
/// to the header's `extra`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Progress {
    /// Epochs completed.
    #[serde(skip)]
    epoch: u64,
    /// Batches of the current epoch done.
    #[serde(skip)]
    batch_in_epoch: u64,
    #[serde(skip)]
    global_step: u64,
    /// Images trained on, all epochs together.
    images: u64,
    /// Seconds spent in training steps, all sessions together.
    #[serde(skip)]
    train_seconds: f64,
    /// Running sums of the current epoch.
    sums: EpochSums,
    /// Mean losses of the last completed epoch: total, reconstruction, KL.
    last_epoch: Option<[f64; 3]>,
}

/// Per-image loss sums over the current epoch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EpochSums {
    total: f64,
    reconstruction: f64,
    kl: f64,
    images: u64,
    seconds: f64,
}

impl EpochSums {
    fn means(&self) -> [f64; 3] {
        let n = self.images.max(1) as f64;
        [self.total / n, self.reconstruction / n, self.kl / n]
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

impl BackendJob for VaePretrain {
    type Output = PretrainSummary;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<PretrainSummary> {
        let PretrainRun { cfg, run, resume } = self.0;
        let train = FashionMnist::load_images(&cfg.data.dir, Split::Train, cfg.data.limit)?;
        let projector = ProjectorSample::load(&cfg.data.dir, cfg.report.projector_samples)?;
        let n = train.len();
        let bs = cfg.train.batch_size;
        let seed = cfg.train.seed;
        let epochs = cfg.train.epochs;
        let steps_per_epoch = n.div_ceil(bs) as u64;
        let total_steps = steps_per_epoch * epochs;
        let ckpt_path = run.checkpoint();

        let mut optim = AdamConfig::new().init::<B, Vae<B>>();
        let mut model: Vae<B>;
        let mut p: Progress;
        match &resume {
            Some(ck) => {
                let model_record =
                    record_from_bytes::<B, _>(ck.blob(&ckpt_path, "model")?, &device)?;
                let optim_record =
                    record_from_bytes::<B, _>(ck.blob(&ckpt_path, "optimizer")?, &device)?;
                model = cfg.vae.init(&device).load_record(model_record);
                optim = optim.load_record(optim_record);
                let h = &ck.header;
                p = serde_json::from_value(h.extra.clone()).map_err(|e| {
                    anyhow::anyhow!("{}: unreadable progress record: {e}", ckpt_path.display())
                })?;
                (p.epoch, p.batch_in_epoch, p.global_step, p.train_seconds) =
                    (h.epoch, h.batch_in_epoch, h.global_step, h.train_seconds);
                if p.batch_in_epoch >= steps_per_epoch {
                    bail!(
                        "{}: batch {} is past the end of an epoch of {steps_per_epoch} batches \
                         (was data.limit or train.batch_size changed?)",
                        ckpt_path.display(),
                        p.batch_in_epoch
                    );
                }
                let msg = if p.epoch >= epochs {
                    format!(
                        "{} already completed {} epochs: nothing to train (pass a larger --epochs \
                         to go on)",
                        run.root.display(),
                        p.epoch
                    )
                } else {
                    format!(
                        "resuming {} after step {} (epoch {}, batch {}/{steps_per_epoch})",
                        run.root.display(),
                        p.global_step,
                        p.epoch + 1,
                        p.batch_in_epoch
                    )
                };
                log(None, &msg);
            }
            None => {
                B::seed(&device, seed);
                model = cfg.vae.init(&device);
                p = Progress::default();
            }
        }

        let mut tb = EventWriter::create(&run.root)?;
        let mut csv = MetricsCsv::open(
            &run.metrics(),
            &[
                "step",
                "epoch",
                "loss",
                "reconstruction",
                "kl",
                "learning_rate",
                "images_per_second",
            ],
            resume.as_ref().map(|_| p.global_step),
        )?;
        let recon_idx = fixed_subsample(n, cfg.report.reconstruction_images, seed);
        // TensorBoard drops what earlier processes logged past this point: after the checkpoint
        // on a resume; everything from a run that died before its first checkpoint on a fresh start.
        let first_new_step = if resume.is_some() {
            p.global_step + 1
        } else {
            0
        };
        tb.add_session_start(first_new_step)?;
        if resume.is_none() {
            log_reconstructions(&mut tb, &model, &train, &recon_idx, &device, 0)?;
            log_weight_histograms(&mut tb, &model, cfg.report.histogram_buckets, 0)?;
        }
        tb.flush()?;

        let save = |model: &Vae<B>, optim: &_, p: &Progress| -> Result<()> {
            let optim_record = Optimizer::<Vae<B>, B>::to_record(optim);
            Checkpoint {
                header: CheckpointHeader {
                    stage: STAGE.into(),
                    method: cfg.method.name().into(),
                    architecture: cfg.architecture(),
                    epoch: p.epoch,
                    batch_in_epoch: p.batch_in_epoch,
                    global_step: p.global_step,
                    seed,
                    train_seconds: p.train_seconds,
                    finished: p.epoch >= epochs,
                    frugal_version: env!("CARGO_PKG_VERSION").into(),
                    extra: serde_json::to_value(p)?,
                },
                blobs: vec![
                    ("model".into(), module_to_bytes::<B, _>(model.clone())?),
                    ("optimizer".into(), record_to_bytes::<B, _>(optim_record)?),
                ],
            }
            .save(&ckpt_path)
        };

        let done = (p.epoch * n as u64 + p.batch_in_epoch * bs as u64).min(epochs * n as u64);
        let bar = images_bar(epochs * n as u64, done, "vae");
        let mut last_ckpt = Instant::now();
        let mut last_line = Instant::now();
        let (mut window_images, mut window_seconds) = (0u64, 0.0f64);

        while p.epoch < epochs {
            let order = epoch_order(n, seed, p.epoch);
            for b in p.batch_in_epoch..steps_per_epoch {
                let t0 = Instant::now();
                let idx = &order[b as usize * bs..((b as usize + 1) * bs).min(n)];
                let x = images_tensor::<B>(&train, idx, &device);
                let eps = noise::<B>(seed, p.global_step, idx.len(), cfg.vae.latent_dim, &device);
                let out = model.forward(x.clone(), eps);
                let (recon, kl) = vae_losses(&out, x);
                let loss = recon.clone() + kl.clone() * cfg.train.kl_weight;
                let lr = cfg.learning_rate(p.global_step, total_steps);
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(lr, model, grads);
                // One copy to the host for the three numbers.
                let [loss, recon, kl]: [f32; 3] =
                    host_values(Tensor::cat(vec![loss, recon, kl], 0))?
                        .try_into()
                        .map_err(|_| anyhow::anyhow!("loss tensor of unexpected shape"))?;
                let (loss, recon, kl) = (loss as f64, recon as f64, kl as f64);
                if !loss.is_finite() {
                    bail!(
                        "the loss became {loss} at step {}: try a lower train.learning_rate; the \
                         last good checkpoint is {}",
                        p.global_step + 1,
                        ckpt_path.display()
                    );
                }
                let seconds = t0.elapsed().as_secs_f64();
                let k = idx.len();
                p.global_step += 1;
                p.batch_in_epoch = b + 1;
                p.train_seconds += seconds;
                p.images += k as u64;
                p.sums.total += loss * k as f64;
                p.sums.reconstruction += recon * k as f64;
                p.sums.kl += kl * k as f64;
                p.sums.images += k as u64;
                p.sums.seconds += seconds;
                window_images += k as u64;
                window_seconds += seconds;
                bar.inc(k as u64);

                let step = p.global_step;
                if step.is_multiple_of(cfg.report.log_every_steps) {
                    let ips = window_images as f64 / window_seconds.max(1e-9);
                    tb.add_scalar("loss/total", loss as f32, step)?;
                    tb.add_scalar("loss/reconstruction", recon as f32, step)?;
                    tb.add_scalar("loss/kl", kl as f32, step)?;
                    tb.add_scalar("train/learning_rate", lr as f32, step)?;
                    tb.add_scalar("train/images_per_second", ips as f32, step)?;
                    csv.row(&[
                        step.to_string(),
                        (p.epoch + 1).to_string(),
                        format!("{loss}"),
                        format!("{recon}"),
                        format!("{kl}"),
                        format!("{lr:e}"),
                        format!("{ips:.1}"),
                    ])?;
                    bar.set_message(format!("epoch {}/{epochs} loss {loss:.2}", p.epoch + 1));
                    if bar.is_hidden() && last_line.elapsed().as_secs() >= 30 {
                        let eta = (total_steps - step) as f64 * bs as f64 / ips.max(1e-9);
                        log(
                            None,
                            &format!(
                            "step {step}/{total_steps}: loss {loss:.2} (reconstruction {recon:.2}, \
                             kl {kl:.2}), {ips:.0} img/s, ETA {eta:.0} s"
                        ),
                        );
                        last_line = Instant::now();
                    }
                    (window_images, window_seconds) = (0, 0.0);
                    // On disk now, for a TensorBoard watching live (and for nothing to sit in a
                    // buffer for minutes).
                    tb.flush()?;
                }

                let by_steps = cfg.checkpoint.every_steps > 0
                    && step.is_multiple_of(cfg.checkpoint.every_steps);
                let by_time =
                    last_ckpt.elapsed().as_secs_f64() >= cfg.checkpoint.every_minutes * 60.0;
                if (by_steps || by_time) && p.batch_in_epoch < steps_per_epoch {
                    // Logs first: what the checkpoint covers is on disk before it.
                    tb.flush()?;
                    csv.flush()?;
                    save(&model, &optim, &p)?;
                    last_ckpt = Instant::now();
                }
            }

            // End of the epoch: report, then checkpoint at the boundary.
            let means = p.sums.means();
            let step = p.global_step;
            tb.add_scalar("epoch/loss", means[0] as f32, step)?;
            tb.add_scalar("epoch/reconstruction", means[1] as f32, step)?;
            tb.add_scalar("epoch/kl", means[2] as f32, step)?;
            log_reconstructions(&mut tb, &model, &train, &recon_idx, &device, step)?;
            log_weight_histograms(&mut tb, &model, cfg.report.histogram_buckets, step)?;
            let line = format!(
                "epoch {}/{epochs}: loss {:.2} (reconstruction {:.2}, kl {:.2}) per image, \
                 {:.0} img/s",
                p.epoch + 1,
                means[0],
                means[1],
                means[2],
                p.sums.images as f64 / p.sums.seconds.max(1e-9)
            );
            p.epoch += 1;
            p.batch_in_epoch = 0;
            p.sums = EpochSums::default();
            p.last_epoch = Some(means);
            tb.flush()?;
            csv.flush()?;
            save(&model, &optim, &p)?;
            last_ckpt = Instant::now();
            log(Some(&bar), &line);
        }
        bar.finish_and_clear();

        // The projector: embeddings (latent means) of fixed test images.
        if let Some(sample) = &projector {
            let inner = model.valid();
            let mut vectors = Vec::with_capacity(sample.indices.len() * cfg.vae.latent_dim);
            for chunk in sample.indices.chunks(500) {
                let x = images_tensor::<B::InnerBackend>(&sample.images, chunk, &device);
                vectors.extend(host_values(inner.embed(x))?);
            }
            sample.write(
                &run.projector(),
                "vae_latent_mean",
                &vectors,
                cfg.vae.latent_dim,
            )?;
        }
        tb.flush()?;

        let (weights_sum, weights_sum_squares) = weights_fingerprint(&model)?;
        let last = p.last_epoch.unwrap_or([f64::NAN; 3]);
        let summary = PretrainSummary {
            method: cfg.method.name().into(),
            run_dir: run.root.display().to_string(),
            device: format!("{:?}", cfg.device).to_lowercase(),
            images: n,
            epochs,
            global_step: p.global_step,
            train_seconds: p.train_seconds,
            images_per_second: p.images as f64 / p.train_seconds.max(1e-9),
            last_epoch_losses: serde_json::json!({
                "total": last[0], "reconstruction": last[1], "kl": last[2]
            }),
            weights_sum,
            weights_sum_squares,
            seed,
        };
        crate::checkpoint::write_atomic(
            &run.summary(),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        Ok(summary)
    }
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
