//! The command line: `frugal ssl-pretrain ...`. Flags override the pipeline file; the effective
//! config is saved in the run directory.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::active::{Strategy, ValidationSlice};
use crate::checkpoint::Checkpoint;
use crate::config::{DeviceKind, Method, PretrainConfig};
use crate::finetune::config::{ColdStart, FinetuneConfig, Freeze, SemiMethod, SemiTeacher};
use crate::finetune::{self, FinetuneRun};
use crate::labels::{self, LabelDb};
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
    /// Active learning on a pretrained encoder: buy labels where the model is least sure, train a
    /// classifier, evaluate on the test set.
    ///
    /// Rounds: a label-free first batch (--cold-start), then train (early stopping on a validation
    /// slice of the bought labels), score the unlabeled pool, buy the next batch (--strategy),
    /// until --labels are spent. Labels come only from the label database, which records and
    /// charges each one (<run>/labels.db unless --label-db). Writes checkpoints/<run>/:
    /// config.toml, labels.db, checkpoint.bin, metrics.csv (one row per round), predictions.csv,
    /// summary.json, TensorBoard events and the projector of the fine-tuned embeddings.
    Finetune(Box<FinetuneArgs>),
    /// Writes a pretrained encoder's features of every training and test image as NumPy arrays
    /// (no label is read), for analysis outside frugal.
    ///
    /// Writes <out>/train.npy ([train images, feature_dim] float32, row i = image i of the
    /// training file, the label database's item i), <out>/test.npy and <out>/embed.json (the
    /// encoder and the shapes). The features are the raw encoder output, not standardized.
    Embed(EmbedArgs),
    /// The label database: import the ground truth, show what was bought.
    #[command(subcommand)]
    Labels(LabelsCommand),
    /// Benchmarks: `frugal bench speed` times training steps and the scoring pass.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `frugal bench ...`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Images per second of a training step (reference models of ../shared/notes/burn-cpu.md, or
    /// the project's pretraining) or of the pool-scoring pass; prints one `RESULT key=value ...`
    /// line, as scripts/peer_torch.py does for PyTorch (scripts/speed-compare.sh runs both).
    Speed(crate::bench::SpeedArgs),
}

/// `frugal embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The pretrained encoder: a `frugal ssl-pretrain` run directory.
    #[arg(long, value_name = "DIR")]
    pub encoder: PathBuf,
    /// Output directory (created if missing; earlier arrays there are replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Directory with the Fashion-MNIST IDX files [default: /usr/share/datasets/fashion-mnist].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Embed only the first N training images [default: all].
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Embed only the first N test images [default: all].
    #[arg(long, value_name = "N")]
    pub test_limit: Option<usize>,
    /// Images per forward pass.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub batch_size: usize,
    /// Where to compute: cpu, cuda, cuda:N or auto (as for ssl-pretrain).
    #[arg(long, value_name = "cpu|cuda[:N]|auto", default_value = "cpu")]
    pub device: DeviceKind,
    /// CPU threads for the tensor kernels (0: one per core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
}

/// `frugal labels ...`.
#[derive(Debug, Subcommand)]
pub enum LabelsCommand {
    /// Creates a label database from the training label file (the only code that reads it).
    Import(LabelsImportArgs),
    /// Prints the budget, the labels spent, and the purchases per class and per round.
    Status(LabelsStatusArgs),
}

/// `frugal labels import`.
#[derive(Debug, Args)]
pub struct LabelsImportArgs {
    /// The database file to create (refused if it exists).
    #[arg(long, value_name = "FILE")]
    pub label_db: PathBuf,
    /// Directory with the Fashion-MNIST IDX files [default: /usr/share/datasets/fashion-mnist].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Import only the first N training items (the pool of a run with the same --limit).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// The most labels that may ever be bought from this database (unset: a finetune run sets
    /// it to its --labels).
    #[arg(long, value_name = "N")]
    pub budget: Option<u64>,
}

/// `frugal labels status`.
#[derive(Debug, Args)]
pub struct LabelsStatusArgs {
    /// The database file.
    #[arg(long, value_name = "FILE")]
    pub label_db: PathBuf,
}

/// `frugal finetune`.
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// The pretrained encoder: a `frugal ssl-pretrain` run directory [default:
    /// checkpoints/fashion-vae].
    #[arg(long, value_name = "DIR")]
    pub encoder: Option<PathBuf>,
    /// Label budget: the labels to buy in all [default: 2000].
    #[arg(long, value_name = "N")]
    pub labels: Option<u64>,
    /// Size of the first (cold-start) batch [default: 200].
    #[arg(long, value_name = "N")]
    pub initial: Option<u64>,
    /// Labels bought per later round [default: 200].
    #[arg(long, value_name = "N", conflicts_with = "rounds")]
    pub per_round: Option<u64>,
    /// Rounds after the first batch (sets --per-round to spread the rest of the budget evenly).
    #[arg(long, value_name = "N")]
    pub rounds: Option<u64>,
    /// How the first batch is chosen, label-free [default: kmeans].
    #[arg(long, value_enum)]
    pub cold_start: Option<ColdStart>,
    /// Which bought labels validate (early stopping, kept weights): split (a share,
    /// --validation-fraction, of what the strategy buys) or random (that share of the budget is
    /// a seeded random slice of the pool, bought first and never trained on: the same images for
    /// every strategy with the same seed, so validation accuracies compare) or audit (that share
    /// of the budget is a random slice that nothing trains or validates on, only reported as
    /// audit accuracy; the other labels are split as with split: it judges settings such as
    /// --semi-refit on bought labels) [default: split].
    #[arg(long, value_enum)]
    pub validation: Option<ValidationSlice>,
    /// Share of the labels that validate (see --validation) [default: 0.2].
    #[arg(long, value_name = "F")]
    pub validation_fraction: Option<f64>,
    /// Acquisition strategy of later rounds [default: margin: the smallest gap between the two
    /// most probable classes; chosen over margin-kcenter on a shared random validation slice].
    #[arg(long, value_enum)]
    pub strategy: Option<Strategy>,
    /// MC-dropout samples for --strategy bald [default: 10].
    #[arg(long, value_name = "N")]
    pub mc_samples: Option<usize>,
    /// Which weights train: encoder (frozen encoder, head only), partial (last conv block and
    /// head), none (everything) [default: encoder].
    #[arg(long, value_enum)]
    pub freeze: Option<Freeze>,
    /// Width of the head's hidden layer; 0 is a linear head on the encoder's features (what the
    /// encoder comparison uses) [default: 256].
    #[arg(long, value_name = "N")]
    pub hidden: Option<usize>,
    /// Augmented copies (shift, flip) of each bought image; 0 turns augmentation off [default: 2].
    #[arg(long, value_name = "N")]
    pub augment: Option<usize>,
    /// Most epochs per round (early stopping on the validation labels ends sooner) [default: 60].
    #[arg(long, value_name = "N")]
    pub epochs: Option<u64>,
    /// The pool: the first N training images [default: all].
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Evaluate on the first N test images [default: all].
    #[arg(long, value_name = "N")]
    pub test_limit: Option<usize>,
    /// The label database [default: <run>/labels.db, created from the training label file].
    #[arg(long, value_name = "FILE")]
    pub label_db: Option<PathBuf>,
    /// After the last purchase, train the final classifier on the unlabeled pool too: fixmatch
    /// (pseudo-labels from weak views, learnt on strong views; the whole encoder trains) or none
    /// [default: none].
    #[arg(long, value_enum)]
    pub semi: Option<SemiMethod>,
    /// Passes over the unlabeled pool in the semi-supervised stage [default: 10].
    #[arg(long, value_name = "N")]
    pub semi_epochs: Option<f64>,
    /// Peak learning rate of the semi-supervised stage (after its warm-up; a cosine decay follows)
    /// [default: 3e-4].
    #[arg(long, value_name = "LR")]
    pub semi_lr: Option<f64>,
    /// Which weights label the pool in the semi-supervised stage: model (the trained weights,
    /// FixMatch) or ema (their moving average, a mean teacher) [default: model].
    #[arg(long, value_enum, value_name = "model|ema")]
    pub semi_teacher: Option<SemiTeacher>,
    /// Each pass after the first trains on this share of the pool: the images with the highest
    /// loss when last seen (selection by loss) [default: 1, every image].
    #[arg(long, value_name = "F")]
    pub semi_select: Option<f64>,
    /// Train the semi-supervised stage on the validation slice of the bought labels too (refit):
    /// every bought label trains, and the stage keeps its last weights. `--semi-refit false`
    /// keeps the slice for validation [default: true; chosen on an audit slice of bought labels].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub semi_refit: Option<bool>,
    /// Test-time flip: the semi-supervised stage's final model predicts (test set, audit slice)
    /// the mean of each image's and its mirror image's class probabilities; the summary also
    /// reports the accuracies without it. `--test-time-flip false` turns it off [default: true
    /// with --semi fixmatch; chosen on an audit slice of bought labels].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub test_time_flip: Option<bool>,
    /// Mirrored pseudo-labels: the semi-supervised stage labels each pool image by the mean of
    /// its weak view's and that view's mirror image's class probabilities (one more forward pass
    /// per step) [default: false; a 500-label audit slice found no gain].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub pseudo_label_flip: Option<bool>,
    /// Stage members: the semi-supervised stage trains N times from the same start, each with its
    /// own random stream, and the final predictions average the N models' class probabilities
    /// (an ensemble; N times the stage's time) [default: 1].
    #[arg(long, value_name = "N")]
    pub semi_members: Option<usize>,
    /// Wall-clock minutes for the whole run, resumed sessions included: the semi-supervised stage
    /// plans its steps to end in time [default: none].
    #[arg(long, value_name = "MINUTES")]
    pub time_budget: Option<f64>,
    /// Join a finished run (with the semi-supervised stage): this run trains on the labels that
    /// run bought (its ledger is copied into this run's database; nothing is bought anew, so
    /// --strategy and --cold-start do not apply) and its final predictions average both runs'
    /// final models: an ensemble of two encoders on the same labels. The label flags must match
    /// that run's [default: none].
    #[arg(long, value_name = "RUN")]
    pub join: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Flags shared by every stage.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Pipeline file (TOML) with the defaults of this run; flags override it. Without it, the
    /// built-in defaults apply (those of pipelines/fashion-vae.toml for ssl-pretrain,
    /// pipelines/fashion-finetune.toml for finetune), or, with --resume, the config saved in the
    /// run directory.
    #[arg(long, value_name = "FILE")]
    pub pipeline: Option<PathBuf>,
    /// Run name: outputs go to <checkpoints>/<run>/ [default: the pipeline file's name, else
    /// fashion-vae for ssl-pretrain and finetune for finetune].
    #[arg(long, value_name = "NAME")]
    pub run: Option<String>,
    /// Root directory of the run directories.
    #[arg(long, value_name = "DIR", default_value = "checkpoints")]
    pub checkpoints: PathBuf,
    /// Directory with the Fashion-MNIST IDX files (gzipped or not) [default:
    /// /usr/share/datasets/fashion-mnist, from Debian's package dataset-fashion-mnist].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where to compute [default: the pipeline's, else cpu]:
    ///
    /// cpu: burn's flex backend. cuda or cuda:N: the first NVIDIA GPU, or GPU number N (from 0);
    /// needs a binary built with `--features cuda`, and at run time the NVIDIA driver, NVRTC and
    /// the CUDA headers (a CUDA toolkit, or $CUDA_PATH). auto: the first GPU when this binary has
    /// CUDA support and the GPU is usable, else the CPU; says which on stderr.
    #[arg(long, value_name = "cpu|cuda[:N]|auto")]
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
        Command::Finetune(args) => finetune_cmd(*args),
        Command::Embed(args) => {
            crate::device::ensure_available(args.device)?;
            let job = crate::embed::EmbedJob(crate::embed::EmbedRun {
                encoder: args.encoder,
                data_dir: args
                    .data_dir
                    .unwrap_or_else(|| PathBuf::from(crate::data::DEFAULT_DATA_DIR)),
                out: args.out.clone(),
                limit: args.limit,
                test_limit: args.test_limit,
                batch_size: args.batch_size,
            });
            let s = crate::device::run_on(args.device, args.threads, job)?;
            log(
                None,
                &format!(
                    "wrote {}/train.npy [{}, {}] and test.npy [{}, {}] in {:.0} s",
                    args.out.display(),
                    s.train_rows,
                    s.feature_dim,
                    s.test_rows,
                    s.feature_dim,
                    s.seconds
                ),
            );
            Ok(())
        }
        Command::Labels(LabelsCommand::Import(args)) => {
            let dir = args
                .data_dir
                .unwrap_or_else(|| PathBuf::from(crate::data::DEFAULT_DATA_DIR));
            let db = labels::import(&args.label_db, &dir, args.limit, args.budget)?;
            println!("{}", db.status()?);
            Ok(())
        }
        Command::Bench(BenchCommand::Speed(args)) => {
            println!("{}", crate::bench::speed(args)?.line());
            Ok(())
        }
        Command::Labels(LabelsCommand::Status(args)) => {
            let db = LabelDb::open(&args.label_db)?;
            println!("{}", db.status()?);
            Ok(())
        }
    }
}

/// The run name: `--run`, else the pipeline file's stem, else `default`.
fn run_name(c: &CommonArgs, default: &str) -> String {
    match (&c.run, &c.pipeline) {
        (Some(name), _) => name.clone(),
        (None, Some(p)) => p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        (None, None) => default.into(),
    }
}

fn finetune_cmd(args: FinetuneArgs) -> Result<()> {
    let c = &args.common;
    let run = RunDir::new(&c.checkpoints, &run_name(c, "finetune"))?;
    let saved = if c.resume {
        run.open_existing()?;
        if !run.config().exists() {
            bail!(
                "{} holds no config.toml: nothing to resume (run without --resume to start it)",
                run.root.display()
            );
        }
        Some(FinetuneConfig::from_file(&run.config())?)
    } else {
        None
    };
    let mut cfg = match (&c.pipeline, &saved) {
        (Some(path), _) => FinetuneConfig::from_file(path)?,
        (None, Some(saved)) => saved.clone(),
        (None, None) => FinetuneConfig::default(),
    };
    apply_finetune_flags(&mut cfg, &args);
    if cfg.semi.method == SemiMethod::None {
        if let Some(flag) = stage_flags(&args).first() {
            // Without the stage such a flag would silently do nothing.
            bail!(
                "{flag} sets the semi-supervised stage, and the stage is off: add --semi \
                 fixmatch, or drop {flag}"
            );
        }
    }
    cfg.validate(None)?;
    crate::device::ensure_available(cfg.device)?;
    if let Some(saved) = &saved {
        if saved.plan() != cfg.plan() {
            bail!(
                "cannot resume {} with another label plan, encoder, model or seed: leave those flags out (saved in {})",
                run.root.display(),
                run.config().display()
            );
        }
    } else {
        // A finetune run may die before its first checkpoint; what makes a directory a run is
        // its config and label database.
        if run.config().exists() || run.root.join("labels.db").exists() {
            bail!(
                "{} already holds a run: pass --resume to continue it, or choose another --run",
                run.root.display()
            );
        }
        run.create_fresh()?;
    }
    // The effective config records the device that runs it (`auto` resolved).
    cfg.device = crate::device::resolve(cfg.device)?;
    crate::checkpoint::write_atomic(&run.config(), cfg.to_toml()?.as_bytes())
        .context("cannot save the effective config")?;
    log(
        None,
        &format!(
            "finetune on {}: run {}, encoder {}, {} labels ({}{} first by {}, then {} per round by {}), freeze {:?}, seed {}",
            cfg.device,
            run.root.display(),
            cfg.encoder.display(),
            cfg.labels.budget,
            match (cfg.labels.validation_slice_size(), cfg.labels.validation) {
                (0, _) => String::new(),
                (n, ValidationSlice::Audit) => format!("an audit slice of {n}, "),
                (n, _) => format!("a random validation slice of {n}, "),
            },
            cfg.labels.initial,
            cfg.labels.cold_start.name(),
            cfg.labels.per_round,
            cfg.labels.strategy.name(),
            cfg.model.freeze,
            cfg.train.seed
        ),
    );
    let summary = finetune::finetune(FinetuneRun {
        cfg,
        run,
        resume: c.resume,
    })?;
    log(
        None,
        &format!(
            "done: {} labels bought, test accuracy {:.2}% ({} test images), {:.0} s; outputs in {}",
            summary.labels_bought,
            100.0 * summary.test_accuracy,
            summary.test_images,
            summary.seconds,
            summary.run_dir
        ),
    );
    Ok(())
}

/// The flags given that set the semi-supervised stage (a boolean only when turned on).
fn stage_flags(args: &FinetuneArgs) -> Vec<&'static str> {
    [
        ("--semi-epochs", args.semi_epochs.is_some()),
        ("--semi-lr", args.semi_lr.is_some()),
        ("--semi-teacher", args.semi_teacher.is_some()),
        ("--semi-select", args.semi_select.is_some()),
        ("--semi-members", args.semi_members.is_some()),
        ("--semi-refit", args.semi_refit == Some(true)),
        ("--test-time-flip", args.test_time_flip == Some(true)),
        ("--pseudo-label-flip", args.pseudo_label_flip == Some(true)),
    ]
    .into_iter()
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect()
}

fn apply_finetune_flags(cfg: &mut FinetuneConfig, args: &FinetuneArgs) {
    let c = &args.common;
    let l = &mut cfg.labels;
    if let Some(v) = &args.encoder {
        cfg.encoder = v.clone();
    }
    if let Some(v) = args.labels {
        l.budget = v;
    }
    if let Some(v) = args.initial {
        l.initial = v;
    }
    if let Some(v) = args.per_round {
        l.per_round = v;
    }
    if let Some(v) = args.validation {
        l.validation = v;
    }
    if let Some(v) = args.validation_fraction {
        l.validation_fraction = v;
    }
    if let Some(r) = args.rounds {
        l.per_round = l.per_round_for(r);
    }
    if let Some(v) = args.cold_start {
        l.cold_start = v;
    }
    if let Some(v) = args.strategy {
        l.strategy = v;
    }
    if let Some(v) = args.mc_samples {
        l.mc_samples = v;
    }
    if let Some(v) = &args.label_db {
        l.db = Some(v.clone());
    }
    if let Some(v) = &args.join {
        cfg.join = Some(v.clone());
    }
    if let Some(v) = args.freeze {
        cfg.model.freeze = v;
    }
    if let Some(v) = args.hidden {
        cfg.model.hidden = v;
    }
    if let Some(v) = args.augment {
        cfg.train.augment_copies = v;
    }
    if let Some(v) = args.epochs {
        cfg.train.max_epochs = v;
    }
    if let Some(v) = args.limit {
        cfg.data.limit = Some(v);
    }
    if let Some(v) = args.test_limit {
        cfg.data.test_limit = Some(v);
    }
    if let Some(v) = args.semi {
        cfg.semi.method = v;
    }
    if let Some(v) = args.semi_epochs {
        cfg.semi.epochs = v;
    }
    if let Some(v) = args.semi_lr {
        cfg.semi.learning_rate = v;
    }
    if let Some(v) = args.semi_teacher {
        cfg.semi.teacher = v;
    }
    if let Some(v) = args.semi_select {
        cfg.semi.select_fraction = v;
    }
    if let Some(v) = args.semi_refit {
        cfg.semi.train_on_validation = v;
    }
    if let Some(v) = args.test_time_flip {
        cfg.semi.test_time_flip = v;
    }
    if let Some(v) = args.semi_members {
        cfg.semi.members = v;
    }
    if let Some(v) = args.pseudo_label_flip {
        cfg.semi.pseudo_label_flip = v;
    }
    if let Some(v) = args.time_budget {
        cfg.time_budget_minutes = Some(v);
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

fn ssl_pretrain(args: PretrainArgs) -> Result<()> {
    let c = &args.common;
    let pipeline = match &c.pipeline {
        Some(path) => Some(PretrainConfig::from_file(path)?),
        None => None,
    };
    let method = args
        .method
        .or(pipeline.as_ref().map(|p| p.method))
        .unwrap_or(Method::Vae);
    let run = RunDir::new(
        &c.checkpoints,
        &run_name(c, &format!("fashion-{}", method.name())),
    )?;

    let saved = if c.resume {
        run.open_existing()?;
        Some(PretrainConfig::from_file(&run.config())?)
    } else {
        None
    };
    let mut cfg = match (pipeline, &saved) {
        (Some(p), _) => p,
        (None, Some(saved)) => saved.clone(),
        (None, None) => PretrainConfig::for_method(method),
    };
    apply_flags(&mut cfg, &args);
    cfg.validate()?;
    crate::device::ensure_available(cfg.device)?;
    // The effective config records the device that runs it (`auto` resolved).
    cfg.device = crate::device::resolve(cfg.device)?;

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
            "ssl-pretrain --method {} on {}: run {} ({} epochs, batch {}, seed {})",
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
            summary.last_epoch_losses["loss"],
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
