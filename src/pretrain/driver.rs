//! The training loop every pretraining method shares: data order, optimizer and learning-rate
//! schedule, checkpoints and `--resume`, step and epoch logs, TensorBoard, the projector and the
//! summary. A method plugs in as an [`Objective`]: its model, its loss and its own reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use burn::module::{AutodiffModule, Module};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::{log_weight_histograms, PretrainRun, PretrainSummary, ProjectorSample, STAGE};
use crate::checkpoint::{
    module_to_bytes, record_from_bytes, record_to_bytes, Checkpoint, CheckpointHeader,
};
use crate::data::batch::{epoch_order, images_tensor};
use crate::data::FashionMnist;
use crate::models::{host_values, weights_fingerprint};
use crate::progress::{images_bar, log};
use crate::run::MetricsCsv;
use crate::tensorboard::EventWriter;

/// A number a method reports for every step, and as a per-image mean over each epoch.
pub struct Metric {
    /// Name in `metrics.csv`, in logs, in the summary, and in the epoch tag `epoch/<key>`.
    pub key: &'static str,
    /// TensorBoard tag of the step values.
    pub tag: &'static str,
}

/// A batch of the plan: `(global step, image indices)`, the step counted from 0.
pub type PlannedBatch = (u64, Vec<usize>);

/// What a pretraining method supplies to [`train`].
pub trait Objective<B: AutodiffBackend> {
    type Model: AutodiffModule<B> + Clone;

    /// Label of the progress bar.
    const NAME: &'static str;

    /// The step metrics; the first is the loss that is minimised.
    const METRICS: &'static [Metric];

    /// A model with fresh weights (after the backend was seeded).
    fn init(&self, device: &B::Device) -> Self::Model;

    /// The batches the loop will ask for next, in order: the rest of the current epoch. Called
    /// before the first step of each epoch (and of a resumed session).
    fn plan(&mut self, batches: Vec<PlannedBatch>);

    /// The step metrics of batch `indices` at global step `step` (0-based), as `[1]` tensors in
    /// the order of [`Objective::METRICS`]; the first carries the graph the loop back-propagates.
    fn step(
        &mut self,
        model: &Self::Model,
        step: u64,
        indices: &[usize],
    ) -> Result<Vec<Tensor<B, 1>>>;

    /// The method's own reports (images, dashboards) at `step`: before the first step of a fresh
    /// run (`step = 0`) and after each epoch. Returns dashboard numbers `(tag, value)`, which the
    /// loop logs as scalars and keeps for the summary.
    fn report(
        &mut self,
        tb: &mut EventWriter,
        model: &Self::Model,
        step: u64,
    ) -> Result<Vec<(String, f64)>>;

    /// The embedding the projector shows, `[batch, 1, 28, 28]` -> `[batch, embedding_dim]`, and
    /// its name and width.
    fn embed(
        &self,
        model: &<Self::Model as AutodiffModule<B>>::InnerModule,
        images: Tensor<B::InnerBackend, 4>,
    ) -> Tensor<B::InnerBackend, 2>;
    fn embedding(&self) -> (&'static str, usize);
}

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
    epoch_sums: EpochSums,
    /// Per-image means of the metrics over the last completed epoch.
    last_epoch_means: Option<Vec<f64>>,
    /// The method's dashboard numbers after the last completed epoch.
    dashboard: BTreeMap<String, f64>,
}

/// Per-image sums of the metrics over the current epoch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EpochSums {
    metrics: Vec<f64>,
    images: u64,
    seconds: f64,
}

impl EpochSums {
    fn add(&mut self, values: &[f64], k: usize, seconds: f64) {
        self.metrics.resize(values.len(), 0.0);
        for (s, v) in self.metrics.iter_mut().zip(values) {
            *s += v * k as f64;
        }
        self.images += k as u64;
        self.seconds += seconds;
    }

    fn means(&self) -> Vec<f64> {
        let n = self.images.max(1) as f64;
        self.metrics.iter().map(|s| s / n).collect()
    }
}

/// `key value, key value` for log lines.
fn listing<'a>(pairs: impl Iterator<Item = (&'a str, f64)>) -> String {
    pairs
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Trains (or resumes) `objective` on `train` as `run` says; see [`super::pretrain`].
pub fn train<B: AutodiffBackend, O: Objective<B>>(
    run: PretrainRun,
    train: Arc<FashionMnist>,
    mut objective: O,
    device: B::Device,
) -> Result<PretrainSummary> {
    let PretrainRun { cfg, run, resume } = run;
    let projector = ProjectorSample::load(&cfg.data.dir, cfg.report.projector_samples)?;
    let metrics = O::METRICS;
    let n = train.len();
    let bs = cfg.train.batch_size;
    let seed = cfg.train.seed;
    let epochs = cfg.train.epochs;
    let steps_per_epoch = n.div_ceil(bs) as u64;
    let total_steps = steps_per_epoch * epochs;
    let ckpt_path = run.checkpoint();

    let mut adam = AdamConfig::new();
    if cfg.train.weight_decay > 0.0 {
        adam = adam.with_weight_decay(Some(WeightDecayConfig::new(cfg.train.weight_decay as f32)));
    }
    let mut optim = adam.init::<B, O::Model>();
    let mut model: O::Model;
    let mut p: Progress;
    match &resume {
        Some(ck) => {
            let model_record = record_from_bytes::<B, _>(ck.blob(&ckpt_path, "model")?, &device)?;
            let optim_record =
                record_from_bytes::<B, _>(ck.blob(&ckpt_path, "optimizer")?, &device)?;
            model = objective.init(&device).load_record(model_record);
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
            model = objective.init(&device);
            p = Progress::default();
        }
    }

    let mut tb = EventWriter::create(&run.root)?;
    let mut columns = vec!["step", "epoch"];
    columns.extend(metrics.iter().map(|m| m.key));
    columns.extend(["learning_rate", "images_per_second"]);
    let mut csv = MetricsCsv::open(
        &run.metrics(),
        &columns,
        resume.as_ref().map(|_| p.global_step),
    )?;
    // TensorBoard drops what earlier processes logged past this point: after the checkpoint on a
    // resume; everything from a run that died before its first checkpoint on a fresh start.
    let first_new_step = if resume.is_some() {
        p.global_step + 1
    } else {
        0
    };
    tb.add_session_start(first_new_step)?;
    if resume.is_none() {
        for (tag, value) in objective.report(&mut tb, &model, 0)? {
            tb.add_scalar(&tag, value as f32, 0)?;
        }
        log_weight_histograms(&mut tb, &model, cfg.report.histogram_buckets, 0)?;
    }
    tb.flush()?;

    let save = |model: &O::Model, optim: &_, p: &Progress| -> Result<()> {
        let optim_record = Optimizer::<O::Model, B>::to_record(optim);
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
    let bar = images_bar(epochs * n as u64, done, O::NAME);
    let mut last_ckpt = Instant::now();
    let mut last_line = Instant::now();
    let (mut window_images, mut window_seconds) = (0u64, 0.0f64);

    while p.epoch < epochs {
        let order = epoch_order(n, seed, p.epoch);
        let batch = |b: u64| &order[b as usize * bs..((b as usize + 1) * bs).min(n)];
        let first = p.global_step - p.batch_in_epoch;
        objective.plan(
            (p.batch_in_epoch..steps_per_epoch)
                .map(|b| (first + b, batch(b).to_vec()))
                .collect(),
        );
        for b in p.batch_in_epoch..steps_per_epoch {
            let t0 = Instant::now();
            let idx = batch(b);
            let values = objective.step(&model, p.global_step, idx)?;
            let lr = cfg.learning_rate(p.global_step, total_steps);
            let grads = GradientsParams::from_grads(values[0].backward(), &model);
            model = optim.step(lr, model, grads);
            // One copy to the host for all the numbers.
            let values: Vec<f64> = host_values(Tensor::cat(values, 0))?
                .into_iter()
                .map(f64::from)
                .collect();
            if values.len() != metrics.len() {
                bail!("step metrics of unexpected shape");
            }
            let loss = values[0];
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
            p.epoch_sums.add(&values, k, seconds);
            window_images += k as u64;
            window_seconds += seconds;
            bar.inc(k as u64);

            let step = p.global_step;
            if step.is_multiple_of(cfg.report.log_every_steps) {
                let ips = window_images as f64 / window_seconds.max(1e-9);
                for (m, v) in metrics.iter().zip(&values) {
                    tb.add_scalar(m.tag, *v as f32, step)?;
                }
                tb.add_scalar("train/learning_rate", lr as f32, step)?;
                tb.add_scalar("train/images_per_second", ips as f32, step)?;
                let mut row = vec![step.to_string(), (p.epoch + 1).to_string()];
                row.extend(values.iter().map(|v| format!("{v}")));
                row.extend([format!("{lr:e}"), format!("{ips:.1}")]);
                csv.row(&row)?;
                bar.set_message(format!("epoch {}/{epochs} loss {loss:.4}", p.epoch + 1));
                if bar.is_hidden() && last_line.elapsed().as_secs() >= 30 {
                    let eta = (total_steps - step) as f64 * bs as f64 / ips.max(1e-9);
                    let named = listing(metrics.iter().map(|m| m.key).zip(values.iter().copied()));
                    log(
                        None,
                        &format!(
                            "step {step}/{total_steps}: {named}, {ips:.0} img/s, ETA {eta:.0} s"
                        ),
                    );
                    last_line = Instant::now();
                }
                (window_images, window_seconds) = (0, 0.0);
                // On disk now, for a TensorBoard watching live (and for nothing to sit in a
                // buffer for minutes).
                tb.flush()?;
            }

            let by_steps =
                cfg.checkpoint.every_steps > 0 && step.is_multiple_of(cfg.checkpoint.every_steps);
            let by_time = last_ckpt.elapsed().as_secs_f64() >= cfg.checkpoint.every_minutes * 60.0;
            if (by_steps || by_time) && p.batch_in_epoch < steps_per_epoch {
                // Logs first: what the checkpoint covers is on disk before it.
                tb.flush()?;
                csv.flush()?;
                save(&model, &optim, &p)?;
                last_ckpt = Instant::now();
            }
        }

        // End of the epoch: report, then checkpoint at the boundary.
        let means = p.epoch_sums.means();
        let step = p.global_step;
        for (m, v) in metrics.iter().zip(&means) {
            tb.add_scalar(&format!("epoch/{}", m.key), *v as f32, step)?;
        }
        let dashboard = objective.report(&mut tb, &model, step)?;
        for (tag, value) in &dashboard {
            tb.add_scalar(tag, *value as f32, step)?;
        }
        log_weight_histograms(&mut tb, &model, cfg.report.histogram_buckets, step)?;
        let mut line = format!(
            "epoch {}/{epochs}: {} per image",
            p.epoch + 1,
            listing(metrics.iter().map(|m| m.key).zip(means.iter().copied()))
        );
        if !dashboard.is_empty() {
            line += &format!(
                "; {}",
                listing(dashboard.iter().map(|(t, v)| (t.as_str(), *v)))
            );
        }
        line += &format!(
            "; {:.0} img/s",
            p.epoch_sums.images as f64 / p.epoch_sums.seconds.max(1e-9)
        );
        p.epoch += 1;
        p.batch_in_epoch = 0;
        p.epoch_sums = EpochSums::default();
        p.last_epoch_means = Some(means);
        p.dashboard = dashboard.into_iter().collect();
        tb.flush()?;
        csv.flush()?;
        save(&model, &optim, &p)?;
        last_ckpt = Instant::now();
        log(Some(&bar), &line);
    }
    bar.finish_and_clear();

    // The projector: embeddings of fixed test images.
    if let Some(sample) = &projector {
        let inner = model.valid();
        let (name, dim) = objective.embedding();
        let mut vectors = Vec::with_capacity(sample.indices.len() * dim);
        for chunk in sample.indices.chunks(500) {
            let x = images_tensor::<B::InnerBackend>(&sample.images, chunk, &device);
            vectors.extend(host_values(objective.embed(&inner, x))?);
        }
        sample.write(&run.projector(), name, &vectors, dim)?;
    }
    tb.flush()?;

    let (weights_sum, weights_sum_squares) = weights_fingerprint(&model)?;
    let last = p
        .last_epoch_means
        .unwrap_or_else(|| vec![f64::NAN; metrics.len()]);
    let last_epoch: serde_json::Map<String, serde_json::Value> = metrics
        .iter()
        .zip(&last)
        .map(|(m, v)| (m.key.to_string(), serde_json::json!(v)))
        .collect();
    let summary = PretrainSummary {
        method: cfg.method.name().into(),
        run_dir: run.root.display().to_string(),
        device: cfg.device.to_string(),
        images: n,
        epochs,
        global_step: p.global_step,
        train_seconds: p.train_seconds,
        images_per_second: p.images as f64 / p.train_seconds.max(1e-9),
        last_epoch_losses: serde_json::Value::Object(last_epoch),
        dashboard: p.dashboard,
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
