//! The command line: `frugal ssl-pretrain ...`. Flags override the pipeline file; the effective
//! config is saved in the run directory.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::checkpoint::Checkpoint;
use crate::config::{DeviceKind, Method, PretrainConfig};
use crate::pretrain::{self, PretrainRun, STAGE};
use crate::progress::log;
use crate::run::RunDir;

/// frugal: label-efficient image classification. Learn from all unlabeled images first, then
/// spend a small label budget where the model is least sure.
#[derive(Debug, Parser)]
#[command(name = "frugal", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Self-supervised pretraining on all training images (their labels are never read).
    ///
    /// Writes checkpoints/<run>/: config.toml (the effective config), checkpoint.bin (model,
    /// optimizer, progress, RNG state), metrics.csv, summary.json, TensorBoard event files and the
    /// embedding projector (projector/). Watch it with `tensorboard --logdir checkpoints`.
    SslPretrain(PretrainArgs),
}

/// Flags shared by every stage.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Pipeline file (TOML) with the defaults of this run; flags below override it.
    /// Without it, the built-in defaults (those of pipelines/fashion-vae.toml) apply, or, with
    /// --resume, the config saved in the run directory.
    #[arg(long, value_name = "FILE")]
    pub pipeline: Option<PathBuf>,
    /// Run name: outputs go to <checkpoints>/<run>/ [default: the pipeline file's name, or
    /// fashion-vae].
    #[arg(long, value_name = "NAME")]
    pub run: Option<String>,
    /// Root directory of the run directories.
    #[arg(long, value_name = "DIR", default_value = "checkpoints")]
    pub checkpoints: PathBuf,
    /// Directory with the Fashion-MNIST IDX files (gzipped or not) [default:
    /// /usr/share/datasets/fashion-mnist, from Debian's package dataset-fashion-mnist].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where to compute: cpu (burn flex) or cuda (needs a binary built with --features cuda).
    #[arg(long, value_enum)]
    pub device: Option<DeviceKind>,
    /// Seed of every random choice (weights, data order, noise).
    #[arg(long)]
    pub seed: Option<u64>,
    /// CPU threads for the tensor kernels (0: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Continue the run from its last checkpoint, with the same data order as if it had never
    /// stopped. Refused if the checkpoint is missing, damaged or of another model.
    #[arg(long)]
    pub resume: bool,
}

/// `frugal ssl-pretrain`.
#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Pretraining method.
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Number of epochs over the training images (on --resume: the new total).
    #[arg(long, value_name = "N")]
    pub epochs: Option<u64>,
    /// Use only the first N training images.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Batch size.
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Parses the command line and runs it.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::SslPretrain(args) => ssl_pretrain(args),
    }
}

fn ssl_pretrain(args: PretrainArgs) -> Result<()> {
    let c = &args.common;
    let run_name = match (&c.run, &c.pipeline) {
        (Some(name), _) => name.clone(),
        (None, Some(p)) => p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        (None, None) => "fashion-vae".into(),
    };
    let run = RunDir::new(&c.checkpoints, &run_name)?;

    let saved = if c.resume {
        run.open_existing()?;
        Some(PretrainConfig::from_file(&run.config())?)
    } else {
        None
    };
    let mut cfg = match (&c.pipeline, &saved) {
        (Some(path), _) => PretrainConfig::from_file(path)?,
        (None, Some(saved)) => saved.clone(),
        (None, None) => PretrainConfig::default(),
    };
    apply_flags(&mut cfg, &args);
    cfg.validate()?;
    crate::device::ensure_available(cfg.device)?;

    let resume = match &saved {
        Some(saved) => {
            let ck = Checkpoint::load(&run.checkpoint())?;
            ck.expect(
                &run.checkpoint(),
                STAGE,
                cfg.method.name(),
                &cfg.architecture(),
            )?;
            let order = |c: &PretrainConfig| (c.train.seed, c.train.batch_size, c.data.limit);
            if order(saved) != order(&cfg) {
                bail!(
                    "cannot resume {} with another seed, batch size or data limit (saved: \
                     seed {}, batch_size {}, limit {:?}): the data order would change",
                    run.root.display(),
                    saved.train.seed,
                    saved.train.batch_size,
                    saved.data.limit
                );
            }
            Some(ck)
        }
        None => {
            run.create_fresh()?;
            None
        }
    };
    crate::checkpoint::write_atomic(&run.config(), cfg.to_toml()?.as_bytes())
        .context("cannot save the effective config")?;

    log(
        None,
        &format!(
            "ssl-pretrain --method {} on {:?}: run {} ({} epochs, batch {}, seed {})",
            cfg.method.name(),
            cfg.device,
            run.root.display(),
            cfg.train.epochs,
            cfg.train.batch_size,
            cfg.train.seed
        ),
    );
    let summary = pretrain::pretrain(PretrainRun { cfg, run, resume })?;
    log(
        None,
        &format!(
            "done: {} steps, {:.0} s of training, {:.0} img/s; last epoch loss {}; outputs in {}",
            summary.global_step,
            summary.train_seconds,
            summary.images_per_second,
            summary.last_epoch_losses["total"],
            summary.run_dir
        ),
    );
    Ok(())
}

fn apply_flags(cfg: &mut PretrainConfig, args: &PretrainArgs) {
    let c = &args.common;
    if let Some(m) = args.method {
        cfg.method = m;
    }
    if let Some(e) = args.epochs {
        cfg.train.epochs = e;
    }
    if let Some(l) = args.limit {
        cfg.data.limit = Some(l);
    }
    if let Some(b) = args.batch_size {
        cfg.train.batch_size = b;
    }
    if let Some(lr) = args.lr {
        cfg.train.learning_rate = lr;
    }
    if let Some(d) = &c.data_dir {
        cfg.data.dir = d.clone();
    }
    if let Some(d) = c.device {
        cfg.device = d;
    }
    if let Some(s) = c.seed {
        cfg.train.seed = s;
    }
    if let Some(t) = c.threads {
        cfg.train.threads = t;
    }
}
