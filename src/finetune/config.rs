//! `frugal finetune`: the pipeline config (serde structs with defaults, `pipelines/*.toml`,
//! overridden by flags, saved as `config.toml` in the run directory).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::active::pool::Labeled;
use crate::active::strategies::Strategy;
use crate::active::Pool;
pub use crate::active::ValidationSlice;
use crate::config::DeviceKind;
use crate::data::augment::ViewAugmentConfig;
use crate::data::DEFAULT_DATA_DIR;

/// How the first batch of labels is chosen, before any classifier exists. Both are label-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ColdStart {
    /// Uniformly at random from the pool.
    Random,
    /// k-means on the pretrained embedding, then the most typical image of each cluster
    /// (TypiClust), so the first batch covers the data.
    Kmeans,
}

impl ColdStart {
    pub fn name(self) -> &'static str {
        match self {
            ColdStart::Random => "random",
            ColdStart::Kmeans => "kmeans",
        }
    }
}

/// Which encoder weights train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Freeze {
    /// The encoder stays as pretrained; only the head trains (encoder features are computed once).
    Encoder,
    /// The last conv block and the head train; the first blocks stay frozen.
    Partial,
    /// Everything trains (full fine-tuning).
    None,
}

/// `frugal finetune`: everything a run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    pub device: DeviceKind,
    /// The pretrained encoder: a run directory of `frugal ssl-pretrain`.
    pub encoder: PathBuf,
    pub data: FinetuneData,
    pub labels: LabelPlan,
    pub model: HeadConfig,
    pub train: FinetuneTrain,
    pub semi: SemiConfig,
    pub report: FinetuneReport,
    /// Wall-clock minutes for the whole run (earlier sessions of a resumed run included): the
    /// semi-supervised stage gets what the rounds leave and plans its steps to end in time.
    /// Unset: no limit (the stage runs `semi.epochs`).
    pub time_budget_minutes: Option<f64>,
    /// A finished run (with the stage) whose bought labels this run reuses, copied into its own
    /// database (nothing is bought anew), and whose final model joins this run's in the final
    /// predictions (an ensemble of two encoders on the same labels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<PathBuf>,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            device: DeviceKind::Cpu,
            encoder: PathBuf::from("checkpoints/fashion-vae"),
            data: FinetuneData::default(),
            labels: LabelPlan::default(),
            model: HeadConfig::default(),
            train: FinetuneTrain::default(),
            semi: SemiConfig::default(),
            report: FinetuneReport::default(),
            time_budget_minutes: None,
            join: None,
        }
    }
}

/// Which images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneData {
    /// Directory with the IDX files (gzipped or not).
    pub dir: PathBuf,
    /// The pool: the first N training images (all when absent).
    pub limit: Option<usize>,
    /// Evaluate on the first N test images (all when absent).
    pub test_limit: Option<usize>,
}

impl Default for FinetuneData {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(DEFAULT_DATA_DIR),
            limit: None,
            test_limit: None,
        }
    }
}

/// How the label budget is spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelPlan {
    /// Labels to buy in all (the database enforces it).
    pub budget: u64,
    /// Size of the first batch (the cold start).
    pub initial: u64,
    /// Labels bought in each later round (the last round may buy fewer).
    pub per_round: u64,
    pub cold_start: ColdStart,
    pub strategy: Strategy,
    /// Uncertainty pre-filter of margin-kcenter: k-center runs among the `candidate_factor * k`
    /// most uncertain images.
    pub candidate_factor: usize,
    /// MC-dropout forward passes for BALD.
    pub mc_samples: usize,
    /// Which labels validate: `split` (a share of those the strategy bought), `random` (a
    /// random slice of the pool bought with the first batch, the same for every strategy) or
    /// `audit` (`split`, plus a random slice bought with the first batch that is reported on only).
    pub validation: ValidationSlice,
    /// Share of the bought labels held out for validation (early stopping, model choice); with
    /// `validation = "random"` or `"audit"`, the share of the budget spent on the random slice
    /// (with `"audit"` the same share of the other labels then validates).
    pub validation_fraction: f64,
    /// The label database [default: `<run>/labels.db`, created from the training label file].
    pub db: Option<PathBuf>,
}

impl Default for LabelPlan {
    fn default() -> Self {
        Self {
            budget: 2000,
            initial: 200,
            per_round: 200,
            cold_start: ColdStart::Kmeans,
            strategy: Strategy::Margin,
            candidate_factor: 10,
            mc_samples: 10,
            validation: ValidationSlice::Split,
            validation_fraction: 0.2,
            db: None,
        }
    }
}

impl LabelPlan {
    /// Labels of the random slice bought in round 0: `validation_fraction` of the budget (at
    /// least one) with `validation = "random"` or `"audit"`, else 0.
    pub fn validation_slice_size(&self) -> u64 {
        match self.validation {
            ValidationSlice::Split => 0,
            ValidationSlice::Random | ValidationSlice::Audit => {
                ((self.validation_fraction * self.budget as f64).round() as u64).max(1)
            }
        }
    }

    /// Labels bought in each round: the random slice (if any) and `initial`, then
    /// `per_round` until the budget is spent.
    pub fn round_sizes(&self) -> Vec<u64> {
        let slice = self.validation_slice_size().min(self.budget);
        let mut sizes = vec![slice + self.initial.min(self.budget - slice)];
        let mut spent = sizes[0];
        while spent < self.budget {
            let k = self.per_round.min(self.budget - spent);
            sizes.push(k);
            spent += k;
        }
        sizes
    }

    /// The bought labels as `(train, validation)` pairs `(item, label)` (see [`Pool::split`]).
    pub fn split(&self, pool: &Pool, seed: u64) -> (Vec<Labeled>, Vec<Labeled>) {
        pool.split(self.validation, self.validation_fraction, seed)
    }

    /// `per_round` for `rounds` rounds after the initial batch (and the random validation slice).
    pub fn per_round_for(&self, rounds: u64) -> u64 {
        self.budget
            .saturating_sub(self.initial + self.validation_slice_size())
            .div_ceil(rounds.max(1))
            .max(1)
    }
}

/// The classifier on top of the encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    pub freeze: Freeze,
    /// Width of the hidden layer (its activations are the embedding k-center and the projector
    /// use); 0 is a linear head (k-center then works on the features, the projector shows the
    /// predicted probabilities).
    pub hidden: usize,
    /// Dropout before the output layer (also what MC dropout samples).
    pub dropout: f64,
    /// With a frozen encoder: scale each feature to zero mean and unit variance over the pool
    /// (label-free statistics).
    pub standardize: bool,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            freeze: Freeze::Encoder,
            hidden: 256,
            dropout: 0.3,
            standardize: true,
        }
    }
}

/// The optimisation of each round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneTrain {
    /// Most epochs per round (early stopping on the validation labels usually ends sooner).
    pub max_epochs: u64,
    /// Stop after this many epochs without a better validation accuracy.
    pub patience: u64,
    pub batch_size: usize,
    /// Fewest optimizer steps per epoch (small label sets are passed over several times).
    pub min_steps_per_epoch: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Augmented copies of each bought image (random shift and horizontal flip); 0: off.
    pub augment_copies: usize,
    /// Largest shift of the augmentation, in pixels.
    pub augment_shift: usize,
    /// Images per forward pass when scoring the pool and the test set.
    pub eval_batch_size: usize,
    /// Seed of every random choice: head weights, data order, dropout, acquisition ties.
    pub seed: u64,
    /// CPU threads for the tensor kernels (0: one per core).
    pub threads: usize,
}

impl Default for FinetuneTrain {
    fn default() -> Self {
        Self {
            max_epochs: 60,
            patience: 12,
            batch_size: 64,
            min_steps_per_epoch: 20,
            learning_rate: 1e-3,
            weight_decay: 1e-4,
            augment_copies: 2,
            augment_shift: 2,
            eval_batch_size: 1024,
            seed: 42,
            threads: 0,
        }
    }
}

/// How the final classifier uses the unlabeled pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SemiMethod {
    /// The final classifier is the last round's (bought labels only).
    None,
    /// FixMatch: after the last purchase the whole network trains on the bought labels and on
    /// confident pseudo-labels of weakly augmented pool images, learnt on strongly augmented views.
    Fixmatch,
}

/// How a pool image's pseudo-label is judged confident enough to learn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SemiThresholds {
    /// FixMatch: top probability >= `threshold`, whatever the class.
    Fixed,
    /// FlexMatch (curriculum pseudo-labelling): each class's threshold is `threshold` scaled by
    /// how many pool images the model already predicts confidently as that class, so classes it
    /// finds hard (shirt, pullover, coat) get lower thresholds and learn sooner.
    Flex,
}

/// Which weights of the stage become the final classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SemiKeep {
    /// The moving average at the end of the schedule (FixMatch's protocol; no label decides).
    Last,
    /// The moving average at the validation with the best accuracy on the held-out bought labels.
    BestValidation,
}

/// Which weights label the pool's weak views in the stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SemiTeacher {
    /// The weights being trained (FixMatch).
    #[default]
    Model,
    /// Their exponential moving average (`ema_decay`): steadier pseudo-labels (a mean teacher).
    Ema,
}

impl SemiTeacher {
    fn is_model(&self) -> bool {
        *self == Self::Model
    }
}

/// The semi-supervised stage that trains the final classifier after the last purchase
/// (`[semi]`). Pseudo-labels never reach the label database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SemiConfig {
    pub method: SemiMethod,
    /// Passes over the unlabeled pool (`labeled_batch * unlabeled_ratio` pool images per step);
    /// `time_budget_minutes` may end the stage sooner.
    pub epochs: f64,
    /// A pool image's pseudo-label counts when the weak view's top class probability reaches this
    /// (with `thresholds = "flex"`: the highest of the per-class thresholds).
    pub threshold: f64,
    pub thresholds: SemiThresholds,
    pub keep: SemiKeep,
    /// Bought (training) images per step.
    pub labeled_batch: usize,
    /// Pool images per bought image in a step (FixMatch's mu).
    pub unlabeled_ratio: usize,
    /// Weight of the pseudo-label loss against the bought-label loss (FixMatch's lambda).
    pub unlabeled_weight: f64,
    /// Peak learning rate (Adam), reached after `warmup_steps`, then cosine decay to
    /// `learning_rate * min_lr_ratio` at the last step.
    pub learning_rate: f64,
    pub warmup_steps: u64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Decay of the exponential moving average of the weights that is validated and kept
    /// (0: the weights themselves).
    pub ema_decay: f64,
    /// Validation (on the held-out bought labels) every this many steps and at the end; the
    /// best validation accuracy picks the final weights.
    pub eval_every: u64,
    /// Minutes between checkpoints of the stage (and at its end).
    pub checkpoint_minutes: f64,
    /// The strong augmentation of pool images (weak: shift and flip of `train.augment_shift`).
    pub strong: ViewAugmentConfig,
    /// Share of the pool each pass after the first trains on: the images whose loss was highest
    /// when last seen (selection by loss, the SIFAL idea), so the steps go where the model is still
    /// wrong. 1: every image every pass. `epochs` then counts these shorter passes.
    #[serde(skip_serializing_if = "is_one")]
    pub select_fraction: f64,
    /// The validation slice of the bought labels trains too (refit): every bought label is used,
    /// and no validation is left, so `keep` must be `last`. On by default (chosen on an audit
    /// slice of bought labels, README); a `[semi]` table that leaves it out means off, as it did
    /// before, so saved runs resume with the plan they were started with.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub train_on_validation: bool,
    /// Which weights give the pseudo-labels: the trained ones, or their moving average.
    #[serde(skip_serializing_if = "SemiTeacher::is_model")]
    pub teacher: SemiTeacher,
    /// Test-time flip: the stage's final model predicts (test set, audit slice) the mean of each
    /// image's and its mirror image's class probabilities. On by default (chosen on an audit
    /// slice, README); as for `train_on_validation`, a `[semi]` table that leaves it out means
    /// off, so saved runs resume with the plan they were started with.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub test_time_flip: bool,
    /// Mirrored pseudo-labels: the stage labels each pool image by the mean of its weak view's
    /// and that view's mirror image's class probabilities (one more forward pass of the pool
    /// batch per step, without gradients), the test-time flip's second look used in training.
    /// Off by default: on for a while after a 250-label audit slice chose it, off again since a
    /// 500-label slice on fresh seeds found no gain for its extra stage time (README). A `[semi]`
    /// table that leaves it out means off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pseudo_label_flip: bool,
    /// Stage members: the stage trains this many times from the same start, each with its own
    /// random stream (data order, views, dropout), and the final predictions average their class
    /// probabilities (an ensemble). 1: one stage, as before members existed; the first member is
    /// always that stage.
    #[serde(skip_serializing_if = "is_one_member")]
    pub members: usize,
}

fn is_one_member(v: &usize) -> bool {
    *v == 1
}

/// Fields added after runs were saved are left out of the saved config (and of the plan a resume
/// compares) while they hold their old behaviour.
fn is_one(v: &f64) -> bool {
    *v == 1.0
}

impl Default for SemiConfig {
    fn default() -> Self {
        Self {
            method: SemiMethod::None,
            epochs: 10.0,
            threshold: 0.95,
            thresholds: SemiThresholds::Flex,
            keep: SemiKeep::Last,
            labeled_batch: 32,
            unlabeled_ratio: 7,
            unlabeled_weight: 1.0,
            learning_rate: 3e-4,
            warmup_steps: 50,
            min_lr_ratio: 0.05,
            weight_decay: 1e-4,
            ema_decay: 0.999,
            eval_every: 100,
            checkpoint_minutes: 5.0,
            strong: ViewAugmentConfig {
                crop_scale: [0.5, 1.0],
                erase_prob: 0.5,
                erase_scale: [0.02, 0.25],
                ..ViewAugmentConfig::default()
            },
            select_fraction: 1.0,
            train_on_validation: true,
            test_time_flip: true,
            pseudo_label_flip: false,
            teacher: SemiTeacher::Model,
            members: 1,
        }
    }
}

impl SemiConfig {
    /// Pool images per step.
    pub fn unlabeled_batch(&self) -> usize {
        self.labeled_batch * self.unlabeled_ratio
    }
}

/// What goes to TensorBoard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneReport {
    /// Images of each round's purchase shown in a grid (0: none).
    pub bought_grid: usize,
    /// Test images shown in the embedding projector at the end (0: none).
    pub projector_samples: usize,
    /// Least seconds between two epoch lines in the log while a round trains (0: every epoch).
    pub epoch_log_seconds: f64,
}

impl Default for FinetuneReport {
    fn default() -> Self {
        Self {
            bought_grid: 64,
            projector_samples: 2000,
            epoch_log_seconds: 30.0,
        }
    }
}

impl FinetuneConfig {
    /// Reads a pipeline file; missing fields take their defaults, unknown ones are errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::config::read_toml(path)
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).context("cannot serialise the config")
    }

    /// What must stay the same for `--resume` to continue a run rather than start another: the
    /// label plan, the model and the seed.
    pub fn plan(&self) -> serde_json::Value {
        let mut plan = serde_json::json!({
            "encoder": self.encoder,
            "pool_limit": self.data.limit,
            "labels": {
                "budget": self.labels.budget,
                "initial": self.labels.initial,
                "per_round": self.labels.per_round,
                "cold_start": self.labels.cold_start,
                "strategy": self.labels.strategy,
                "candidate_factor": self.labels.candidate_factor,
                "mc_samples": self.labels.mc_samples,
                "validation_fraction": self.labels.validation_fraction,
            },
            "model": self.model,
            "seed": self.train.seed,
        });
        // Plans from before the random slice existed stay resumable.
        if self.labels.validation != ValidationSlice::Split {
            plan["labels"]["validation"] = serde_json::json!(self.labels.validation);
        }
        // Runs without the stage keep the plan they were started with (and stay resumable).
        if self.semi.method != SemiMethod::None {
            plan["semi"] = serde_json::to_value(&self.semi).unwrap_or_default();
        }
        if let Some(join) = &self.join {
            plan["join"] = serde_json::json!(join);
        }
        plan
    }

    /// Checks values that would otherwise fail deep inside a run. `pool` is the pool size when
    /// known.
    pub fn validate(&self, pool: Option<u64>) -> Result<()> {
        let l = &self.labels;
        if l.budget == 0 {
            bail!("--labels must be at least 1");
        }
        if l.initial == 0 {
            bail!("--initial must be at least 1");
        }
        let slice = l.validation_slice_size();
        if l.initial + slice > l.budget {
            if slice > 0 {
                bail!(
                    "the label budget ({}) is smaller than the random slice ({slice}, \
                     labels.validation_fraction {} of the budget) plus the first batch \
                     (--initial {}): lower --initial or raise --labels",
                    l.budget,
                    l.validation_fraction,
                    l.initial
                );
            }
            bail!(
                "the label budget ({}) is smaller than the first batch (--initial {}): \
                 lower --initial or raise --labels",
                l.budget,
                l.initial
            );
        }
        if l.per_round == 0 {
            bail!("--per-round must be at least 1");
        }
        if let Some(pool) = pool {
            if l.budget > pool {
                bail!(
                    "the label budget ({}) is larger than the pool ({pool} training images): \
                     lower --labels",
                    l.budget
                );
            }
        }
        if !(0.0..0.9).contains(&l.validation_fraction) {
            bail!(
                "labels.validation_fraction must be in [0, 0.9), got {}",
                l.validation_fraction
            );
        }
        if l.validation != ValidationSlice::Split && l.validation_fraction == 0.0 {
            bail!(
                "--validation {} needs labels.validation_fraction > 0 (the share of the budget \
                 the random slice gets)",
                l.validation.name()
            );
        }
        if l.strategy.needs_mc_samples() && l.mc_samples < 2 {
            bail!("--mc-samples must be at least 2 for bald");
        }
        if l.candidate_factor == 0 {
            bail!("labels.candidate_factor must be at least 1");
        }
        let t = &self.train;
        if t.max_epochs == 0
            || t.batch_size == 0
            || t.eval_batch_size == 0
            || t.min_steps_per_epoch == 0
        {
            bail!("train.max_epochs, train.batch_size, train.min_steps_per_epoch and train.eval_batch_size must be at least 1");
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            bail!("train.learning_rate must be a positive number");
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            bail!("train.weight_decay must be >= 0");
        }
        if t.augment_shift > 8 {
            bail!("train.augment_shift must be at most 8 pixels");
        }
        let log_every = self.report.epoch_log_seconds;
        if !(log_every.is_finite() && log_every >= 0.0) {
            bail!("report.epoch_log_seconds must be a number >= 0 (0: a line every epoch)");
        }
        if !(0.0..1.0).contains(&self.model.dropout) {
            bail!("model.dropout must be in [0, 1)");
        }
        let s = &self.semi;
        if s.method != SemiMethod::None {
            if !(s.epochs.is_finite() && s.epochs > 0.0) {
                bail!("semi.epochs must be a positive number");
            }
            if !(0.0..=1.0).contains(&s.threshold) {
                bail!("semi.threshold must be in [0, 1], got {}", s.threshold);
            }
            if s.labeled_batch == 0 || s.unlabeled_ratio == 0 || s.eval_every == 0 {
                bail!("semi.labeled_batch, semi.unlabeled_ratio and semi.eval_every must be at least 1");
            }
            if !(s.select_fraction > 0.0 && s.select_fraction <= 1.0) {
                bail!(
                    "semi.select_fraction must be in (0, 1], got {}",
                    s.select_fraction
                );
            }
            if s.train_on_validation && s.keep == SemiKeep::BestValidation {
                bail!(
                    "semi.train_on_validation (refit, on by default) leaves no validation labels \
                     to pick the best weights: set semi.keep = \"last\", or turn the refit off \
                     (--semi-refit false)"
                );
            }
            if s.unlabeled_batch() > 1 << 15 {
                bail!("semi.labeled_batch * semi.unlabeled_ratio must be at most 32768");
            }
            if !(s.learning_rate.is_finite() && s.learning_rate > 0.0) {
                bail!("semi.learning_rate must be a positive number");
            }
            if !(s.unlabeled_weight.is_finite() && s.unlabeled_weight >= 0.0) {
                bail!("semi.unlabeled_weight must be >= 0");
            }
            if !(s.weight_decay.is_finite() && s.weight_decay >= 0.0) {
                bail!("semi.weight_decay must be >= 0");
            }
            if !(0.0..1.0).contains(&s.ema_decay) {
                bail!("semi.ema_decay must be in [0, 1)");
            }
            if !(0.0..=1.0).contains(&s.min_lr_ratio) {
                bail!("semi.min_lr_ratio must be in [0, 1]");
            }
            if !(s.checkpoint_minutes.is_finite() && s.checkpoint_minutes > 0.0) {
                bail!("semi.checkpoint_minutes must be positive");
            }
            if !(1..=16).contains(&s.members) {
                bail!("semi.members must be from 1 to 16, got {}", s.members);
            }
            s.strong.validate().context("semi.strong")?;
        }
        if let Some(m) = self.time_budget_minutes {
            if !(m.is_finite() && m > 0.0) {
                bail!("--time-budget must be a positive number of minutes, got {m}");
            }
            // Only the semi-supervised stage adapts to the budget; silently ignoring it would let a
            // user believe the rounds were limited.
            if s.method == SemiMethod::None {
                bail!(
                    "--time-budget limits the semi-supervised stage, which is off: add --semi \
                     fixmatch, or drop --time-budget"
                );
            }
        }
        if self.join.is_some() && s.method == SemiMethod::None {
            bail!(
                "--join averages this run's and the joined run's final models after the \
                 semi-supervised stage, which is off: add --semi fixmatch"
            );
        }
        if self.data.limit == Some(0) || self.data.test_limit == Some(0) {
            bail!("data.limit and data.test_limit must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_spend_the_budget_exactly() {
        let plan = LabelPlan {
            budget: 1000,
            initial: 150,
            per_round: 200,
            ..LabelPlan::default()
        };
        let sizes = plan.round_sizes();
        assert_eq!(sizes, vec![150, 200, 200, 200, 200, 50]);
        assert_eq!(sizes.iter().sum::<u64>(), 1000);
        assert_eq!(plan.per_round_for(4), 213);
    }

    #[test]
    fn a_random_validation_slice_is_bought_with_the_first_batch() {
        let mut plan = LabelPlan {
            budget: 1000,
            validation: ValidationSlice::Random,
            ..LabelPlan::default()
        };
        // 20% of the budget validates; the active schedule spends the other 800.
        assert_eq!(plan.validation_slice_size(), 200);
        assert_eq!(plan.round_sizes(), vec![400, 200, 200, 200]);
        assert_eq!(plan.per_round_for(3), 200);
        plan.validation_fraction = 0.1;
        assert_eq!(plan.round_sizes(), vec![300, 200, 200, 200, 100]);
        // A tiny share still buys one label; `split` buys none.
        plan.budget = 3;
        plan.initial = 1;
        assert_eq!(plan.validation_slice_size(), 1);
        plan.validation = ValidationSlice::Split;
        assert_eq!(plan.validation_slice_size(), 0);
        assert_eq!(plan.round_sizes(), vec![1, 2]);
    }

    #[test]
    fn an_audit_slice_leaves_the_schedule_of_the_smaller_budget() {
        // 1,250 labels with a fifth for the audit: the strategy's rounds are those of a
        // 1,000-label run, and the audit slice comes on top.
        let plan = LabelPlan {
            budget: 1250,
            validation: ValidationSlice::Audit,
            ..LabelPlan::default()
        };
        let plain = LabelPlan {
            budget: 1000,
            ..LabelPlan::default()
        };
        assert_eq!(plan.validation_slice_size(), 250);
        let mut sizes = plan.round_sizes();
        sizes[0] -= 250;
        assert_eq!(sizes, plain.round_sizes());
        let mut cfg = FinetuneConfig {
            labels: plan,
            ..FinetuneConfig::default()
        };
        assert_eq!(cfg.plan()["labels"]["validation"], "audit");
        cfg.validate(None).unwrap();
        cfg.labels.validation_fraction = 0.0;
        let err = cfg.validate(None).unwrap_err().to_string();
        assert!(err.contains("--validation audit needs"), "{err}");
    }

    #[test]
    fn the_validation_slice_is_part_of_the_plan_only_when_random() {
        let mut cfg = FinetuneConfig::default();
        assert!(!cfg.plan().to_string().contains("\"validation\""));
        let split = cfg.plan();
        cfg.labels.validation = ValidationSlice::Random;
        assert_eq!(cfg.plan()["labels"]["validation"], "random");
        assert_ne!(
            cfg.plan(),
            split,
            "a resume with the other slice is refused"
        );
        let back: FinetuneConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(back.labels.validation, ValidationSlice::Random);
        let err =
            toml::from_str::<FinetuneConfig>("[labels]\nvalidation = \"test\"\n").unwrap_err();
        assert!(err.to_string().contains("validation"), "{err}");
    }

    #[test]
    fn shipped_pipelines_parse_and_the_main_one_is_the_default() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        for name in [
            "fashion-finetune.toml",
            "smoke-finetune.toml",
            "fashion-semi.toml",
        ] {
            let cfg = FinetuneConfig::from_file(&dir.join(name)).unwrap();
            cfg.validate(None).unwrap();
            let back: FinetuneConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
            assert_eq!(back, cfg, "{name} survives a save/load");
        }
        let main = FinetuneConfig::from_file(&dir.join("fashion-finetune.toml")).unwrap();
        assert_eq!(main, FinetuneConfig::default());
        // The semi pipeline's [semi] is the built-in stage, switched on.
        let semi = FinetuneConfig::from_file(&dir.join("fashion-semi.toml")).unwrap();
        assert_eq!(
            semi.semi,
            SemiConfig {
                method: SemiMethod::Fixmatch,
                ..SemiConfig::default()
            }
        );
    }

    #[test]
    fn settings_added_later_leave_older_plans_resumable_and_round_trip() {
        let mut cfg = FinetuneConfig::default();
        cfg.semi.method = SemiMethod::Fixmatch;
        // At the values they stand for when absent they are not saved, so a run saved before they
        // existed keeps its plan.
        cfg.semi.train_on_validation = false;
        cfg.semi.test_time_flip = false;
        cfg.semi.pseudo_label_flip = false;
        let plan = cfg.plan().to_string();
        for key in [
            "teacher",
            "select_fraction",
            "train_on_validation",
            "test_time_flip",
            "pseudo_label_flip",
            "members",
        ] {
            assert!(!plan.contains(key), "{key} in {plan}");
        }
        let back: FinetuneConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(back, cfg, "refit off survives a save/load");
        // The refit is on by default: saved, and read back on.
        let refit = FinetuneConfig {
            semi: SemiConfig {
                method: SemiMethod::Fixmatch,
                ..SemiConfig::default()
            },
            ..FinetuneConfig::default()
        };
        assert!(refit.semi.train_on_validation);
        assert!(refit.semi.test_time_flip);
        assert!(!refit.semi.pseudo_label_flip);
        let text = refit.to_toml().unwrap();
        assert!(text.contains("train_on_validation = true"), "{text}");
        assert!(text.contains("test_time_flip = true"), "{text}");
        assert!(!text.contains("pseudo_label_flip"), "{text}");
        // Turned on, it is saved, and read back on.
        let mut mirrored = refit.clone();
        mirrored.semi.pseudo_label_flip = true;
        let text = mirrored.to_toml().unwrap();
        assert!(text.contains("pseudo_label_flip = true"), "{text}");
        assert_eq!(toml::from_str::<FinetuneConfig>(&text).unwrap(), mirrored);
        assert!(refit.plan().to_string().contains("test_time_flip"));
        let back: FinetuneConfig = toml::from_str(&refit.to_toml().unwrap()).unwrap();
        assert_eq!(back, refit);
        // A [semi] table written before it existed (or that leaves it out) means off.
        let old: FinetuneConfig = toml::from_str("[semi]\nmethod = \"fixmatch\"\n").unwrap();
        assert!(!old.semi.train_on_validation);
        assert!(!old.semi.test_time_flip);
        assert!(!old.semi.pseudo_label_flip);
        assert_eq!(old.semi.members, 1);
        // More than one member is saved, and read back.
        let mut two = refit.clone();
        two.semi.members = 2;
        let text = two.to_toml().unwrap();
        assert!(text.contains("members = 2"), "{text}");
        assert_eq!(toml::from_str::<FinetuneConfig>(&text).unwrap(), two);
        cfg.semi.teacher = SemiTeacher::Ema;
        let text = cfg.to_toml().unwrap();
        assert!(text.contains("teacher = \"ema\""), "{text}");
        let back: FinetuneConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.semi.teacher, SemiTeacher::Ema);
        // A resume with the other teacher is another plan, so it is refused.
        let mut model_teacher = back.clone();
        model_teacher.semi.teacher = SemiTeacher::Model;
        assert_ne!(back.plan(), model_teacher.plan());
        let err = toml::from_str::<FinetuneConfig>("[semi]\nteacher = \"student\"\n").unwrap_err();
        assert!(err.to_string().contains("teacher"), "{err}");
    }

    #[test]
    fn epoch_log_seconds_must_be_a_number_at_least_zero() {
        let mut cfg = FinetuneConfig::default();
        assert_eq!(cfg.report.epoch_log_seconds, 30.0);
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            cfg.report.epoch_log_seconds = bad;
            let err = cfg.validate(None).unwrap_err().to_string();
            assert!(err.contains("report.epoch_log_seconds"), "{bad}: {err}");
        }
        cfg.report.epoch_log_seconds = 0.0;
        cfg.validate(None).unwrap();
        // A saved config from before the setting reads with the default.
        let old: FinetuneConfig = toml::from_str("[report]\nbought_grid = 8\n").unwrap();
        assert_eq!(old.report.epoch_log_seconds, 30.0);
    }

    #[test]
    fn impossible_budgets_are_refused() {
        let mut cfg = FinetuneConfig::default();
        cfg.labels.budget = 100;
        let err = cfg.validate(None).unwrap_err().to_string();
        assert!(err.contains("smaller than the first batch"), "{err}");
        cfg.labels.budget = 5000;
        let err = cfg.validate(Some(1000)).unwrap_err().to_string();
        assert!(err.contains("larger than the pool"), "{err}");
        cfg.validate(Some(60_000)).unwrap();
        // The random validation slice comes out of the budget too.
        cfg.labels.budget = 220;
        cfg.labels.validation = ValidationSlice::Random;
        let err = cfg.validate(None).unwrap_err().to_string();
        assert!(err.contains("random slice (44"), "{err}");
        cfg.labels.budget = 250;
        cfg.validate(None).unwrap();
        cfg.labels.validation_fraction = 0.0;
        let err = cfg.validate(None).unwrap_err().to_string();
        assert!(err.contains("--validation random needs"), "{err}");
        cfg.labels.validation = ValidationSlice::Audit;
        let err = cfg.validate(None).unwrap_err().to_string();
        assert!(err.contains("--validation audit needs"), "{err}");
    }

    #[test]
    fn a_time_budget_needs_the_stage_it_limits() {
        let mut cfg = FinetuneConfig {
            time_budget_minutes: Some(10.0),
            ..FinetuneConfig::default()
        };
        let err = cfg.validate(None).unwrap_err().to_string();
        assert!(err.contains("--semi fixmatch"), "{err}");
        cfg.semi.method = SemiMethod::Fixmatch;
        cfg.validate(None).unwrap();
        cfg.time_budget_minutes = Some(0.0);
        assert!(cfg.validate(None).is_err());
    }
}
