//! `frugal bench speed`: images per second of a training step or of the pool-scoring pass, timed
//! the way `scripts/peer_torch.py` times PyTorch (same models, batch, optimizer, warm-up and
//! measured steps), printed as one `RESULT key=value ...` line so the two compare directly.

pub mod reference;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use clap::{Args, ValueEnum};

use crate::config::{DeviceKind, Method, PretrainConfig};
use crate::data::batch::{epoch_order, images_tensor, rng_for, stream};
use crate::data::{FashionMnist, Split, IMAGE_SIDE};
use crate::device::{self, BackendJob};
use crate::finetune::config::FinetuneConfig;
use crate::finetune::train::{score, Inputs, Set};
use crate::models::vae::vae_losses;
use crate::models::{Classifier, EncoderConfig};
use crate::pretrain::contrastive::nt_xent;
use crate::pretrain::driver::Objective;
use crate::pretrain::simclr::SimclrObjective;
use crate::pretrain::vae::VaeObjective;

/// What is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchModel {
    /// A training step of the reference VAE (`../shared/notes/burn-cpu.md`).
    ReferenceVae,
    /// A training step of the reference SimCLR model on the peer's views (shift, flip, brightness).
    ReferenceSimclr,
    /// A training step of the project's VAE pretraining (`pipelines/fashion-vae.toml` defaults).
    Vae,
    /// A training step of the project's SimCLR pretraining (its views, monitors and batch).
    Simclr,
    /// The pool-scoring pass of active learning: encoder, 256-wide head, softmax, to the host.
    Score,
    /// The pool-scoring pass with 10 MC-dropout samples of the head (what BALD reads).
    McDropout,
}

impl BenchModel {
    /// The name in `RESULT` lines: the peer's (`vae`, `simclr`) for the reference models.
    pub fn key(self) -> &'static str {
        match self {
            Self::ReferenceVae => "vae",
            Self::ReferenceSimclr => "simclr",
            Self::Vae => "frugal-vae",
            Self::Simclr => "frugal-simclr",
            Self::Score => "score",
            Self::McDropout => "mc-dropout",
        }
    }

    fn default_batch(self) -> usize {
        match self {
            Self::ReferenceVae | Self::ReferenceSimclr => 256,
            Self::Vae => PretrainConfig::for_method(Method::Vae).train.batch_size,
            Self::Simclr => PretrainConfig::for_method(Method::Simclr).train.batch_size,
            Self::Score | Self::McDropout => 1024,
        }
    }
}

/// `frugal bench speed`.
#[derive(Debug, Clone, Args)]
pub struct SpeedArgs {
    /// What to time: a training step of a reference model of ../shared/notes/burn-cpu.md or of
    /// the project's own pretraining, or the pool-scoring forward pass (plain or MC dropout).
    #[arg(long, value_enum)]
    pub model: BenchModel,
    /// Images per step [default: 256 for the reference models, the pipeline's batch for vae and
    /// simclr, 1024 for scoring].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Untimed steps first (allocation, caches, kernel compilation on a GPU).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed steps; images/s is batch * steps over their summed time.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Where to run: cpu, cuda, cuda:N (GPU N; a binary built with --features cuda) or auto.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
    /// CPU threads for the kernels (the peer uses 2; 0: one per core).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Directory with the Fashion-MNIST IDX files.
    #[arg(long, default_value = crate::data::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Seed of the data order, the weights and the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use burn's own convolution ops instead of frugal's CPU kernels (src/kernels): the
    /// "before" of the speed work.
    #[arg(long)]
    pub burn_conv: bool,
}

/// One benchmark's outcome.
#[derive(Debug, Clone)]
pub struct SpeedResult {
    pub model: BenchModel,
    pub device: String,
    pub batch: usize,
    pub steps: usize,
    /// Seconds of each step, warm-up included, in order.
    pub step_seconds: Vec<f64>,
    /// The loss of the first and last step (training benchmarks only).
    pub losses: Option<(f64, f64)>,
    pub warmup: usize,
    /// Whether burn's own convolution ops ran (`--burn-conv`).
    pub burn_conv: bool,
}

impl SpeedResult {
    /// Images per second over the measured steps.
    pub fn images_per_second(&self) -> f64 {
        let total: f64 = self.step_seconds[self.warmup..].iter().sum();
        (self.batch * self.steps) as f64 / total
    }

    /// The `RESULT key=value ...` line (keys as in `scripts/peer_torch.py`).
    pub fn line(&self) -> String {
        let mut m: Vec<f64> = self.step_seconds[self.warmup..].to_vec();
        m.sort_by(f64::total_cmp);
        let total: f64 = m.iter().sum();
        let ips = self.images_per_second();
        let mut s = format!(
            "RESULT framework=burn-0.21.0-{}{} model={} batch={} steps={} img_per_s={ips:.1} \
             mean_step_s={:.4} median_step_s={:.4} min_step_s={:.4} max_step_s={:.4} \
             first_step_s={:.3} epoch60k_s={:.1}",
            self.device,
            if self.burn_conv { "-burnconv" } else { "" },
            self.model.key(),
            self.batch,
            self.steps,
            total / m.len() as f64,
            m[m.len() / 2],
            m[0],
            m[m.len() - 1],
            self.step_seconds[0],
            60000.0 / ips,
        );
        if let Some((first, last)) = self.losses {
            s += &format!(" loss_first={first:.3} loss_last={last:.3}");
        }
        if let Some(kb) = peak_rss_kb() {
            s += &format!(" maxrss_kb={kb}");
        }
        s
    }
}

/// Peak resident memory of this process in KiB (`VmHWM` of /proc/self/status; Linux only).
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs `frugal bench speed` and returns its result.
pub fn speed(args: SpeedArgs) -> Result<SpeedResult> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let batch = args.batch.unwrap_or(args.model.default_batch());
    if batch < 2 {
        bail!("--batch must be at least 2 (SimCLR needs a negative, NT-Xent a pair)");
    }
    device::ensure_available(args.device)?;
    let train = Arc::new(FashionMnist::load_images(
        &args.data_dir,
        Split::Train,
        None,
    )?);
    if batch > train.len() {
        bail!(
            "--batch {batch} is larger than the {} training images",
            train.len()
        );
    }
    let (kind, threads, burn_conv) = (args.device, args.threads, args.burn_conv);
    let job = SpeedJob { args, batch, train };
    if burn_conv {
        return crate::kernels::with_burn_ops(|| device::run_on(kind, threads, job));
    }
    device::run_on(kind, threads, job)
}

struct SpeedJob {
    args: SpeedArgs,
    batch: usize,
    train: Arc<FashionMnist>,
}

impl SpeedJob {
    /// The images of each step (warm-up included): consecutive slices of seeded permutations,
    /// as the peer draws them.
    fn batches(&self) -> Vec<Vec<usize>> {
        let n = self.train.len();
        let mut order: Vec<usize> = Vec::new();
        let mut epoch = 0;
        (0..self.args.warmup + self.args.steps)
            .map(|_| {
                if order.len() < self.batch {
                    order = epoch_order(n, self.args.seed, epoch);
                    epoch += 1;
                }
                order.split_off(order.len() - self.batch)
            })
            .collect()
    }

    fn result(
        &self,
        device: String,
        step_seconds: Vec<f64>,
        losses: Option<(f64, f64)>,
    ) -> SpeedResult {
        SpeedResult {
            model: self.args.model,
            device,
            batch: self.batch,
            steps: self.args.steps,
            step_seconds,
            losses,
            warmup: self.args.warmup,
            burn_conv: self.args.burn_conv,
        }
    }
}

impl BackendJob for SpeedJob {
    type Output = SpeedResult;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<SpeedResult> {
        B::seed(&device, self.args.seed);
        let name = self.args.device.to_string();
        let batches = self.batches();
        let (seconds, losses) = match self.args.model {
            BenchModel::ReferenceVae => {
                let cfg = reference::vae();
                let model = cfg.init::<B>(&device);
                let latent = cfg.latent_dim;
                let train = self.train.clone();
                train_steps(model, &batches, |m, _, idx| {
                    let x = images_tensor::<B>(&train, idx, &device);
                    // Drawn on the device, as the peer's `randn_like`.
                    let noise = Tensor::<B, 2>::random(
                        [idx.len(), latent],
                        burn::tensor::Distribution::Normal(0.0, 1.0),
                        &device,
                    );
                    let (recon, kl) = vae_losses(&m.forward(x.clone(), noise), x);
                    Ok(vec![recon + kl])
                })?
            }
            BenchModel::ReferenceSimclr => {
                let cfg = reference::simclr();
                let model = cfg.init::<B>(&device);
                let mut rng = rng_for(self.args.seed, stream::VIEWS, 0);
                let train = self.train.clone();
                let temperature = cfg.temperature;
                train_steps(model, &batches, |m, _, idx| {
                    let n = idx.len();
                    let mut views = reference::views(&train, idx, &mut rng);
                    views.extend(reference::views(&train, idx, &mut rng));
                    let x = Tensor::<B, 4>::from_data(
                        TensorData::new(views, [2 * n, 1, IMAGE_SIDE, IMAGE_SIDE]),
                        &device,
                    );
                    let z = m.project(m.embed(x));
                    let (z1, z2) = (z.clone().narrow(0, 0, n), z.narrow(0, n, n));
                    Ok(vec![nt_xent(z1, z2, temperature)])
                })?
            }
            BenchModel::Vae => {
                let cfg = self.pretrain_config(Method::Vae);
                let objective = VaeObjective::<B>::new(&cfg, self.train.clone(), &device);
                objective_steps(objective, &batches, &device)?
            }
            BenchModel::Simclr => {
                let cfg = self.pretrain_config(Method::Simclr);
                let objective = SimclrObjective::<B>::new(&cfg, self.train.clone(), None, &device);
                objective_steps(objective, &batches, &device)?
            }
            BenchModel::Score | BenchModel::McDropout => {
                let mc = if self.args.model == BenchModel::McDropout {
                    10
                } else {
                    0
                };
                (
                    self.score_steps::<B::InnerBackend>(&batches, mc, &device)?,
                    None,
                )
            }
        };
        Ok(self.result(name, seconds, losses))
    }
}

impl SpeedJob {
    fn pretrain_config(&self, method: Method) -> PretrainConfig {
        let mut cfg = PretrainConfig::for_method(method);
        cfg.train.batch_size = self.batch;
        cfg.train.seed = self.args.seed;
        cfg
    }

    /// Times [`score`] (the finetune code path) on each batch: an encoder that trains
    /// (`--freeze partial|none`) reads images, so every step runs the encoder too.
    fn score_steps<B: Backend>(
        &self,
        batches: &[Vec<usize>],
        mc: usize,
        device: &B::Device,
    ) -> Result<Vec<f64>> {
        let mut cfg = FinetuneConfig::default();
        cfg.train.eval_batch_size = self.batch;
        cfg.train.seed = self.args.seed;
        let encoder = EncoderConfig::default();
        let model = Classifier::<B>::new(
            Some(encoder.init(device)),
            encoder.feature_dim(),
            cfg.model.hidden,
            crate::data::CLASS_NAMES.len(),
            device,
        );
        let inputs = Inputs::new(&self.train, &self.train, None, &cfg);
        let mut seconds = Vec::with_capacity(batches.len());
        for idx in batches {
            let t0 = Instant::now();
            let scores = score(&model, &inputs, Set::Pool, idx, &cfg, false, mc, device)?;
            std::hint::black_box(&scores);
            seconds.push(t0.elapsed().as_secs_f64());
        }
        Ok(seconds)
    }
}

/// Seconds of each step, and the first and last loss of a training benchmark.
type Timed = (Vec<f64>, Option<(f64, f64)>);

/// Times training steps of `model`: forward (`loss_of` gives the step's metrics, the loss first),
/// backward, Adam (lr 1e-3), and the metrics copied to the host, as the training loop does.
fn train_steps<B, M, F>(mut model: M, batches: &[Vec<usize>], mut loss_of: F) -> Result<Timed>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    F: FnMut(&M, u64, &[usize]) -> Result<Vec<Tensor<B, 1>>>,
{
    let mut optim = AdamConfig::new().init::<B, M>();
    let mut seconds = Vec::with_capacity(batches.len());
    let mut losses = Vec::with_capacity(batches.len());
    for (step, idx) in batches.iter().enumerate() {
        let t0 = Instant::now();
        let metrics = loss_of(&model, step as u64, idx)?;
        let loss = metrics[0].clone();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
        let values = crate::models::host_values(Tensor::cat(
            metrics.into_iter().map(|t| t.detach()).collect(),
            0,
        ))
        .context("reading the step's metrics")?;
        seconds.push(t0.elapsed().as_secs_f64());
        losses.push(values[0] as f64);
    }
    let first_last = (losses[0], losses[losses.len() - 1]);
    Ok((seconds, Some(first_last)))
}

/// [`train_steps`] over a pretraining method's own step ([`Objective::step`]).
fn objective_steps<B: AutodiffBackend, O: Objective<B>>(
    mut objective: O,
    batches: &[Vec<usize>],
    device: &B::Device,
) -> Result<Timed> {
    let model = objective.init(device);
    objective.plan(
        batches
            .iter()
            .enumerate()
            .map(|(s, b)| (s as u64, b.clone()))
            .collect(),
    );
    train_steps(model, batches, |m, step, idx| objective.step(m, step, idx))
}
